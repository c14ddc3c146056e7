"""ONNX Runtime latency of MiniLM exported with and without ``fuse_shared_input_matmuls`` (Q, K
and V, or their first low-rank factors, as one MatMul), dense and low-rank, all four files timed
interleaved (``factorlab.bench.latency.benchmark_models``). Time it on an otherwise idle machine.

Usage: python benchmarks/bench_fused_matmuls.py [--ratio 0.25] [--threads 2] [--runs 20]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import factorlab as fl
from factorlab.bench.latency import benchmark_models, load_for_bench
from factorlab.bench.onnx_runtime import OrtModel
from factorlab.export import export_onnx
from factorlab.models import default_model_path, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ratio", type=float, default=0.25, help="param_ratio of the low-rank model"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batch-sizes", default="1,32")
    args = parser.parse_args()
    dense = load_for_bench(None)
    factorized = copy.deepcopy(dense)
    fl.factorize_(factorized, fl.LowRankConfig(param_ratio=args.ratio))
    tokenizer = load_tokenizer(default_model_path())
    with tempfile.TemporaryDirectory(prefix="factorlab-fused-") as folder:
        models = {}
        for name, model in (("dense", dense), (f"low-rank {args.ratio}", factorized)):
            for fuse in (False, True):
                path = Path(folder) / f"{name.replace(' ', '-')}-{fuse}.onnx"
                export_onnx(model, tokenizer, path, fuse_matmuls=fuse)
                label = f"{name}, {'fused' if fuse else 'separate'}"
                models[label] = OrtModel(path, model.config, args.threads)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            results = benchmark_models(list(models.values()), batch, runs=args.runs)
            base = {}
            for label, result in zip(models, results, strict=True):
                base.setdefault(label.split(",")[0], result.median_s)
                change = result.median_s / base[label.split(",")[0]] - 1
                print(
                    f"batch {batch:3d}  {label:28s} {1e3 * result.median_s:8.1f} ms "
                    f"(p10-p90 {1e3 * result.p10_s:.1f}-{1e3 * result.p90_s:.1f}; "
                    f"{100 * change:+.1f}% vs separate)"
                )


if __name__ == "__main__":
    main()
