"""The deployment table from ``benchmarks/deploy_table.sh``'s output folder.

One row per model and runtime (eager PyTorch float32, ONNX Runtime float32, ONNX Runtime int8):
SST-2 dev accuracy of the deployed model, bytes (parameters and buffers in PyTorch, the ONNX
file in ONNX Runtime), median latency at batch 1 and 32, the ratio to the dense model in the same
runtime (measured interleaved by ``factorlab bench``) and the ratio to dense eager PyTorch
float32 (the median of the dense references of the PyTorch benches, run one after the other).

Usage: python benchmarks/deploy_summary.py OUT_DIR [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

TAGS = {"torch": "torch fp32", "onnxruntime": "ORT fp32", "onnxruntimeint8": "ORT int8"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    rows = []
    benches = {}
    for path in sorted(args.out.glob("*.bench.json")):
        name, tag = path.name.removesuffix(".bench.json").rsplit(".", 1)
        benches[(name, tag)] = json.loads(path.read_text())
    # eager dense PyTorch: any torch bench's interleaved dense reference (the densified model has
    # the dense model's shapes and ops), median over those benches
    references: dict[int, list[float]] = {}
    for (_, tag), result in benches.items():
        if tag == "torch":
            for batch in result["batches"]:
                references.setdefault(batch["batch_size"], []).append(batch["dense"]["median_s"])
    eager_dense = {b: statistics.median(v) for b, v in references.items()}
    for (name, tag), result in benches.items():
        evaluation = args.out / f"{name}.{tag}.eval.json"
        accuracy = None
        if evaluation.is_file():
            accuracy = json.loads(evaluation.read_text())["metrics"].get("accuracy")
        cells = [name, TAGS.get(tag, tag), "-" if accuracy is None else f"{100 * accuracy:.2f}"]
        first = result["batches"][0]["model"]
        cells.append(f"{first['param_bytes'] / 2**20:.1f} MiB")
        for batch in result["batches"]:
            median = batch["model"]["median_s"]
            same = batch["latency_ratio"]
            eager = "-"
            if batch["batch_size"] in eager_dense:
                eager = f"{median / eager_dense[batch['batch_size']]:.2f}"
            cells.append(f"{1e3 * median:.1f} ms ({same:.2f} / {eager})")
        rows.append(cells)
    sizes = [b["batch_size"] for b in next(iter(benches.values()))["batches"]] if benches else []
    header = ["model", "runtime", "SST-2 acc", "bytes"]
    header += [f"batch {b}: ms (x same-runtime dense / x eager dense)" for b in sizes]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
