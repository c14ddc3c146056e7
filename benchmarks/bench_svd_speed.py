"""How fast the truncated SVD of all 36 MiniLM matrices can be, and what each shortcut costs.

Times, for every targeted matrix of all-MiniLM-L6-v2 at param_ratio 0.5 (rank 96 for 384 x 384,
153 for 1536 x 384): the full float64 SVD (``torch.linalg.svd``), float32 SVD, the float64
eigendecomposition of the smaller Gram matrix ``W^T W`` or ``W W^T`` (``torch.linalg.eigh``),
and ``factorize_`` itself. For each shortcut it reports the largest change of the relative
truncation error ``||W - A B|| / ||W||`` against float64 SVD, over all matrices.

Usage: python benchmarks/bench_svd_speed.py [--ratio 0.5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModel

import factorlab as fl
from factorlab.models import default_model_path
from factorlab.projections.svd import rank_for_param_ratio
from factorlab.targets import select_targets


def svd64(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]


def svd32(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
    return (U[:, :r] * S[:r]).double(), Vh[:r].double()


def gram_eigh64(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.double()
    if w.shape[0] >= w.shape[1]:  # right singular vectors from W^T W (n x n)
        _, V = torch.linalg.eigh(w.T @ w)
        V = V[:, -r:].flip(1)
        return w @ V, V.T
    _, U = torch.linalg.eigh(w @ w.T)
    U = U[:, -r:].flip(1)
    return U, U.T @ w


def rel_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    w = w.double()
    return ((w - a @ b).norm() / w.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = AutoModel.from_pretrained(default_model_path())
    weights = [t.weight.detach() for t in select_targets(model)]
    ranks = [rank_for_param_ratio(*w.shape, args.ratio) for w in weights]
    print(f"{len(weights)} matrices, {torch.get_num_threads()} threads, ratio {args.ratio}")
    reference = [rel_error(w, *svd64(w, r)) for w, r in zip(weights, ranks, strict=True)]
    for name, fn in (("svd float64", svd64), ("svd float32", svd32), ("gram eigh", gram_eigh64)):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            factors = [fn(w, r) for w, r in zip(weights, ranks, strict=True)]
            best = min(best, time.perf_counter() - start)
        errors = [rel_error(w, *f) for w, f in zip(weights, factors, strict=True)]
        worst = max(abs(e - ref) for e, ref in zip(errors, reference, strict=True))
        print(f"{name:12s} {best:6.2f} s   max |rel error - float64 SVD's| {worst:.1e}")
    best = float("inf")
    for _ in range(args.repeats):
        copy = AutoModel.from_pretrained(default_model_path())
        start = time.perf_counter()
        fl.factorize_(copy, fl.LowRankConfig(param_ratio=args.ratio), progress=False)
        best = min(best, time.perf_counter() - start)
    print(f"factorize_   {best:6.2f} s   (low-rank, the whole call)")


if __name__ == "__main__":
    main()
