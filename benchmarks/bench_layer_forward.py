"""Forward latency of one factorized linear layer at equal parameters (METHODS.md §2, §3, §9).

Compares dense ``nn.Linear``, ``LowRankLinear``, ``MonarchLinear`` and ``BlockLowRankLinear`` on one
``out x in`` layer (default 3072 x 768, BERT-base's intermediate layer) at each ``param_ratio``:
the low-rank rank is ``floor(p m n / (m + n))`` and the block rank ``floor(p m n / (b (m + n)))``,
so all three factorized layers keep about the same number of parameters. Input ``(batch, seq, in)``
in float32, a fixed thread count, ``torch.inference_mode()``; the layers are timed round-robin
(one call of each per round) so that load from other processes hits all of them alike, and the
median over the rounds after warm-up is reported, in milliseconds and as ratios to low-rank and to
dense measured in the same process. Factor values are random (latency does not depend on them).

Usage::

    python benchmarks/bench_layer_forward.py [--runs 20] [--threads 2] [--device cpu] [--json PATH]

The issue's goal: Monarch and BLR no slower than 1.5x ``LowRankLinear`` at equal parameters.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from factorlab.layers import BlockLowRankLinear, LowRankLinear, MonarchLinear
from factorlab.projections import (
    block_low_rank_num_parameters,
    block_rank_for_param_ratio,
    rank_for_param_ratio,
)


def _randomize(layer: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return layer.eval()


def build_layers(
    out_features: int, in_features: int, param_ratio: float, nblocks: int
) -> dict[str, tuple[nn.Module, str]]:
    """``{name: (layer, description)}``: dense, low-rank, Monarch and BLR at ``param_ratio``."""
    m, n = out_features, in_features
    r_lr = rank_for_param_ratio(m, n, param_ratio)
    r_b = block_rank_for_param_ratio(m, n, nblocks, param_ratio)
    return {
        "dense": (_randomize(nn.Linear(n, m), 0), "nn.Linear"),
        "low_rank": (_randomize(LowRankLinear(n, m, r_lr), 1), f"rank {r_lr}"),
        "monarch": (_randomize(MonarchLinear(n, m, nblocks, r_b), 2), f"b={nblocks} r={r_b}"),
        "block_low_rank": (
            _randomize(BlockLowRankLinear(n, m, nblocks, r_b), 3),
            f"b={nblocks} r={r_b}",
        ),
    }


def time_layers(
    layers: dict[str, nn.Module], x: torch.Tensor, runs: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per forward call of each layer, ``runs`` rounds after ``warmup`` rounds.

    On CUDA the device is synchronized before and after each call (wall-clock per call).
    """
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in layers}
    with torch.inference_mode():
        for rnd in range(warmup + runs):
            for name, layer in layers.items():
                sync()
                start = time.perf_counter()
                layer(x)
                sync()
                elapsed = time.perf_counter() - start
                if rnd >= warmup:
                    times[name].append(elapsed)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-features", type=int, default=3072)
    parser.add_argument("--in-features", type=int, default=768)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--runs", type=int, default=20, help="timed rounds (>= 20 recommended)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (the issue's setting) or cuda")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")

    torch.set_num_threads(args.threads)
    m, n = args.out_features, args.in_features
    device = torch.device(args.device)
    x = torch.randn(args.batch, args.seq, n, generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    header = (
        f"{'p':>5}  {'layer':<15} {'config':<12} {'params':>10} {'kept':>6} "
        f"{'median ms':>10} {'min ms':>8} {'x low_rank':>10} {'x dense':>8}"
    )
    print(
        f"forward latency: {m}x{n} layer, input {tuple(x.shape)} fp32 on {device}, "
        f"{args.threads} CPU threads, "
        f"median of {args.runs} rounds after {args.warmup} warm-up (torch {torch.__version__})"
    )
    print(header)
    print("-" * len(header))
    for ratio in args.ratios:
        built = build_layers(m, n, ratio, args.nblocks)
        layers = {k: v[0].to(device) for k, v in built.items()}
        times = time_layers(layers, x, args.runs, args.warmup)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, (layer, desc) in built.items():
            weights = sum(p.numel() for p in layer.parameters()) - m  # minus the bias
            row = {
                "param_ratio": ratio,
                "layer": name,
                "config": desc,
                "weight_params": weights,
                "kept": weights / (m * n),
                "median_ms": 1e3 * medians[name],
                "min_ms": 1e3 * min(times[name]),
                "vs_low_rank": medians[name] / medians["low_rank"],
                "vs_dense": medians[name] / medians["dense"],
                "times_ms": [1e3 * t for t in times[name]],
            }
            results.append(row)
            print(
                f"{ratio:>5}  {name:<15} {desc:<12} {weights:>10,} {row['kept']:>6.3f} "
                f"{row['median_ms']:>10.2f} {row['min_ms']:>8.2f} {row['vs_low_rank']:>10.2f} "
                f"{row['vs_dense']:>8.2f}"
            )
        r_b = block_rank_for_param_ratio(m, n, args.nblocks, ratio)
        assert block_low_rank_num_parameters(m, n, args.nblocks, r_b) <= ratio * m * n
    worst = max(r["vs_low_rank"] for r in results if r["layer"] in ("monarch", "block_low_rank"))
    print(f"slowest block layer vs low-rank: {worst:.2f}x (goal: <= 1.5x)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "shape": [m, n],
                    "input": list(x.shape),
                    "threads": args.threads,
                    "device": str(device),
                    "runs": args.runs,
                    "warmup": args.warmup,
                    "nblocks": args.nblocks,
                    "torch": torch.__version__,
                    "machine": platform.processor() or platform.machine(),
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
