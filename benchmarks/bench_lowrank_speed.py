"""How fast is LowRankLinear on CPU, before and after the layout change, per layer and whole model.

Usage (from the repository root, HF_HUB_OFFLINE=1):

    python benchmarks/bench_lowrank_speed.py [--threads 2] [--runs 30] [--ratios 0.5,0.25]
        [--batch-sizes 1,32] [--skip-layers] [--skip-model] [--compile] [--profile] [--json PATH]

Part 1, per layer (weight shapes out x in = 384x384, 1536x384, 384x1536, the MiniLM matrices;
``32 * 128`` tokens, and ``128`` with ``--batch-sizes 1``): the dense ``nn.Linear`` against

- ``before``: the original forward, ``F.linear(F.linear(x, B), A, b)`` with contiguous factors;
- ``addmm``: one ``mm`` and one fused ``addmm`` with the bias on 2-D views, contiguous factors;
- ``after``: ``LowRankLinear`` as it is now (same forward, factors stored transposed in memory);
- for the 384x384 shape, ``qkv-merged``: the three first-stage matmuls of query/key/value
  (which share their input) merged into one, against three ``after`` layers.

Part 2, the real MiniLM (``AutoModel``), low-rank at each ratio: dense, ``before`` (factors made
contiguous) and ``after`` timed interleaved in one process, plus the MAC ratios of the factorized
layers and of the whole model; ``--compile`` adds ``torch.compile`` of dense and ``after``,
``--profile`` prints the top operators of both at the largest batch.

Timings are medians (and minima, the least disturbed run) of ``--runs`` interleaved runs after
warm-up; on a shared machine they are noisy, so the load average is printed with them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factorlab.bench.latency import benchmark_models, profile_table
from factorlab.bench.macs import count_macs
from factorlab.layers import LowRankLinear
from factorlab.methods import LowRankConfig, factorize_
from factorlab.projections.svd import rank_for_param_ratio

SHAPES = [(384, 384), (1536, 384), (384, 1536)]


def time_interleaved(
    fns: dict[str, Callable[[], Any]], runs: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved (order reversed every other run)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for i in range(warmup + runs):
            for name in names if i % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                fns[name]()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def make_before(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose low-rank factors are contiguous: the original layout."""
    before = copy.deepcopy(model)
    for module in before.modules():
        if isinstance(module, LowRankLinear):
            module.A.data = module.A.data.contiguous()
            module.B.data = module.B.data.contiguous()
    return before


def bench_layers(ratios: list[float], tokens_list: list[int], runs: int) -> list[dict[str, Any]]:
    """Part 1: per-layer latencies (seconds) and ratios to dense."""
    rows = []
    torch.manual_seed(0)
    for tokens in tokens_list:
        for m, n in SHAPES:
            for ratio in ratios:
                rank = rank_for_param_ratio(m, n, ratio)
                dense = nn.Linear(n, m)
                A, B = torch.randn(m, rank) / rank**0.5, torch.randn(rank, n) / n**0.5
                after = LowRankLinear.from_factors(A, B, dense.bias.detach())
                Ac, Bc, b = A.contiguous(), B.contiguous(), dense.bias.detach()
                x = torch.randn(tokens // 128 if tokens >= 128 else 1, min(tokens, 128), n)
                x2 = x.view(-1, n)
                fns: dict[str, Callable[[], Any]] = {
                    "dense": lambda d=dense, x=x: d(x),
                    "before": lambda x=x, A=Ac, B=Bc, b=b: F.linear(F.linear(x, B), A, b),
                    "addmm": lambda x2=x2, A=Ac, B=Bc, b=b: torch.addmm(b, x2 @ B.t(), A.t()),
                    "after": lambda layer=after, x=x: layer(x),
                }
                if (m, n) == (384, 384):
                    layers = [after, copy.deepcopy(after), copy.deepcopy(after)]
                    B3 = torch.cat([la.B for la in layers]).t().contiguous().t()  # (3r, n), NN

                    def merged(x2=x2, B3=B3, layers=layers, r=rank):
                        h = x2 @ B3.t()
                        return [
                            F.linear(h[:, i * r : (i + 1) * r], la.A, la.bias)
                            for i, la in enumerate(layers)
                        ]

                    fns["qkv-3x-after"] = lambda layers=layers, x=x: [la(x) for la in layers]
                    fns["qkv-merged"] = merged
                times = time_interleaved(fns, runs)
                med = {k: statistics.median(v) for k, v in times.items()}
                low = {k: min(v) for k, v in times.items()}
                rows.append(
                    {
                        "shape": f"{m}x{n}",
                        "tokens": x2.shape[0],
                        "param_ratio": ratio,
                        "rank": rank,
                        "mac_ratio": rank * (m + n) / (m * n),
                        "median_s": med,
                        "min_s": low,
                        "ratio_median": {k: med[k] / med["dense"] for k in med},
                        "ratio_min": {k: low[k] / low["dense"] for k in low},
                    }
                )
                r = rows[-1]
                cells = " ".join(
                    f"{k}={r['ratio_median'][k]:.3f}/{r['ratio_min'][k]:.3f}"
                    for k in med
                    if k != "dense" and not k.startswith("qkv")
                )
                qkv = ""
                if "qkv-merged" in med:
                    qkv = f" | qkv merged/3x after = {med['qkv-merged'] / med['qkv-3x-after']:.3f}"
                print(
                    f"{r['shape']:>9} tokens {r['tokens']:>5} p={ratio:<5} r={rank:<4} "
                    f"MAC {r['mac_ratio']:.3f} dense {1e3 * med['dense']:7.2f} ms  {cells}{qkv}",
                    flush=True,
                )
    return rows


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def gemm_share(
    dense: nn.Module, factorized: nn.Module, batch: int, threads: int, layer_mac_ratio: float
) -> dict[str, float]:
    """Self CPU seconds of the matmuls of the linear layers (``mm``/``addmm``, their bias copy
    excluded) and of everything else, for both models (median of 5 profiled passes each), and
    the whole-model latency ratio that would follow if only the GEMM time shrank, by the MAC
    ratio of the factorized layers: ``(gemm_dense * layer_mac_ratio + other_dense) / total``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from factorlab.bench.macs import random_input_ids

    def split(model: nn.Module) -> tuple[float, float]:
        ids = random_input_ids(model.config, batch, 128)
        gemm, other = [], []
        with torch.inference_mode():
            model(input_ids=ids)
            for _ in range(5):
                with torch_profile(activities=[ProfilerActivity.CPU]) as p:
                    model(input_ids=ids)
                g = o = 0.0
                for e in p.key_averages():
                    t = e.self_cpu_time_total / 1e6
                    if e.key in GEMM_OPS:
                        g += t
                    else:
                        o += t
                gemm.append(g)
                other.append(o)
        return statistics.median(gemm), statistics.median(other)

    torch.set_num_threads(threads)
    gd, od = split(dense)
    gf, of = split(factorized)
    ideal = (gd * layer_mac_ratio + od) / (gd + od)
    print(
        f"-- GEMM self time: dense {gd:.3f} s of {gd + od:.3f} s ({100 * gd / (gd + od):.0f}%), "
        f"factorized {gf:.3f} s of {gf + of:.3f} s; GEMM ratio {gf / gd:.3f} (MAC ratio of the "
        f"layers {layer_mac_ratio:.3f}); non-GEMM ratio {of / od:.3f}; whole-model ratio if only "
        f"GEMMs shrank by the MAC ratio: {ideal:.3f}"
    )
    return {
        "dense_gemm_s": gd,
        "dense_other_s": od,
        "factorized_gemm_s": gf,
        "factorized_other_s": of,
        "ideal_model_ratio": ideal,
    }


def bench_model(
    ratios: list[float],
    batch_sizes: list[int],
    runs: int,
    threads: int,
    compile_: bool,
    profile: bool,
) -> list[dict[str, Any]]:
    """Part 2: whole MiniLM, dense vs before vs after (vs compiled), per ratio and batch size."""
    from transformers import AutoModel

    from factorlab.models import default_model_path

    rows = []
    dense = AutoModel.from_pretrained(default_model_path()).float().eval()
    for ratio in ratios:
        after = copy.deepcopy(dense)
        factorize_(after, LowRankConfig(param_ratio=ratio))
        after.eval()
        before = make_before(after)
        macs = count_macs(after, 1, 128)
        models = {"dense": dense, "before": before, "after": after}
        if compile_:
            models["dense-compiled"] = torch.compile(dense)
            models["after-compiled"] = torch.compile(after)
        for batch in batch_sizes:
            results = benchmark_models(
                list(models.values()), batch, 128, runs, warmup=3, threads=threads, memory=False
            )
            med = {k: r.median_s for k, r in zip(models, results, strict=True)}
            low = {k: r.min_s for k, r in zip(models, results, strict=True)}
            row = {
                "param_ratio": ratio,
                "batch_size": batch,
                "threads": threads,
                "mac_ratio_factorized_layers": macs.factorized_ratio,
                "mac_ratio_model": macs.total / macs.dense_total,
                "median_s": med,
                "min_s": low,
                "ratio_median": {k: med[k] / med["dense"] for k in med},
                "ratio_min": {k: low[k] / low["dense"] for k in low},
                "loadavg_1m": os.getloadavg()[0],
            }
            rows.append(row)
            cells = " ".join(
                f"{k}={row['ratio_median'][k]:.3f}/{row['ratio_min'][k]:.3f}"
                for k in med
                if k != "dense"
            )
            print(
                f"MiniLM p={ratio:<5} batch {batch:>3} threads {threads}: MAC layers "
                f"{macs.factorized_ratio:.3f} model {row['mac_ratio_model']:.3f}; dense "
                f"{1e3 * med['dense']:8.2f} ms; latency ratio median/min {cells} "
                f"(load {row['loadavg_1m']:.1f})",
                flush=True,
            )
            if profile and batch == max(batch_sizes):
                print(f"-- top ops, low-rank {ratio}, batch {batch}:")
                print(profile_table(after, batch, 128, threads))
                print(f"-- top ops, dense, batch {batch}:")
                print(profile_table(dense, batch, 128, threads))
                row["gemm_share"] = gemm_share(dense, after, batch, threads, macs.factorized_ratio)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run both parts, print them and optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--ratios", default="0.5,0.25")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    p.add_argument("--profile", action="store_true", help="top operators at the largest batch")
    p.add_argument("--json", help="write all numbers here")
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; ratios are median/min over {args.runs} runs"
    )
    out: dict[str, Any] = {"threads": args.threads, "runs": args.runs}
    if not args.skip_layers:
        out["layers"] = bench_layers(ratios, [128 * b for b in batches], args.runs)
    if not args.skip_model:
        out["model"] = bench_model(
            ratios, batches, args.runs, args.threads, args.compile, args.profile
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
