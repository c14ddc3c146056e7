"""DSFormer projection error on the real MiniLM weights: budget rules vs truncated SVD [C23, §8].

For every targeted matrix of all-MiniLM-L6-v2 (36: query, key, value, attention output,
intermediate and output of 6 blocks; ``factorlab.targets.select_targets``) and each
``param_ratio`` p, fits ``W ~ C D`` (``factorlab.projections.dense_sparse``, no calibration) with
``(k, s)`` from several candidate rules, all with ``g k n + m s <= p m n`` and ``s <= k``:

* ``density q``: ``s = floor(q k)``, ``k`` as large as fits (``factorlab.methods.dsformer``);
* ``basis f``: the basis takes a fraction ``f`` of the budget, the coefficients the rest
  (``s = floor((1 - f) / f * g n / m * k)``, at most ``k``: at ``s = k`` it is low rank, and the
  basis grows until the budget is spent);

and prints the mean relative Frobenius error ``||W - C D|| / ||W||`` over the 36 matrices, with
truncated SVD at equal parameters (rank ``floor(p m n / (m + n))``) and at equal bytes (the rank
whose fp32 factors take the bytes of the default rule's values plus its int16 indices), and the
default rule at SVD's bytes (``4 (g k n + m s) + 2 m s <= 4 p m n``) and without the alternating
rounds (``iterations=0``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/dsformer_projection.py [--ratios 0.5 0.357 0.28]
        [--iterations 3] [--json PATH]

The rules are compared at ``--iterations`` alternating rounds (default 3, to keep the full
comparison at CPU-minutes), the default rule also at ``DEFAULT_ITERATIONS`` (its column, and the
byte-matched one, use that). ``DEFAULT_DENSITY`` in
``factorlab/methods/dsformer.py`` records the table this printed and the rule it chose.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from factorlab.methods.dsformer import DEFAULT_DENSITY, largest_basis, nnz_for_basis
from factorlab.models import default_model_path
from factorlab.projections.dense_sparse import DEFAULT_ITERATIONS, dense_sparse_project
from factorlab.targets import select_targets

DENSITIES = (0.125, 0.25, 0.375, 0.5, 0.75)
FRACTIONS = (0.25, 0.5, 0.75)


def svd_error(singular_values: torch.Tensor, rank: int) -> float:
    energy = singular_values.square()
    return math.sqrt(energy[rank:].sum().item() / energy.sum().item())


def fraction_rule(m: int, n: int, f: float, groups: int = 1) -> Callable[[int], int]:
    return lambda k: max(1, min(k, math.floor((1 - f) / f * groups * n / m * k + 1e-9)))


def bytes_basis(m: int, n: int, p: float, density: float) -> tuple[int, int]:
    """The density rule's largest ``(k, s)`` within SVD's fp32 bytes: ``4 (k n + m s) + 2 m s
    <= 4 p m n``."""
    best = (1, 1)
    for k in range(1, min(m, n) + 1):
        s = nnz_for_basis(k, density)
        if 4 * (k * n + m * s) + 2 * m * s > 4 * p * m * n:
            break
        best = (k, s)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.357, 0.28])
    parser.add_argument("--iterations", type=int, default=3, help="rounds for the rule comparison")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--default-only", action="store_true", help="skip the rule comparison (default rule only)"
    )
    args = parser.parse_args()

    from transformers import AutoModel

    model = AutoModel.from_pretrained(default_model_path())
    targets = select_targets(model)
    weights = [t.weight.detach().double() for t in targets]
    spectra = [torch.linalg.svdvals(w) for w in weights]
    print(f"{len(targets)} matrices of {default_model_path()}", file=sys.stderr)

    rules: dict[str, Callable[[int, int], Callable[[int], int]]] = {}
    for q in () if args.default_only else DENSITIES:
        rules[f"density {q:g}"] = lambda m, n, q=q: lambda k: nnz_for_basis(k, q)
    for f in () if args.default_only else FRACTIONS:
        rules[f"basis {f:g}"] = lambda m, n, f=f: fraction_rule(m, n, f)

    results: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    for p in args.ratios:
        row: dict[str, float] = {}
        errs: dict[str, list[float]] = {name: [] for name in rules}
        extra: dict[str, list[float]] = {
            "svd @params": [],
            "svd @bytes": [],
            "default @svd bytes": [],
            "default iters=0": [],
            f"default iters={DEFAULT_ITERATIONS}": [],
        }
        for W, S in zip(weights, spectra, strict=True):
            m, n = W.shape
            for name, rule in rules.items():
                k, s = largest_basis(m, n, p, 1, rule(m, n))
                errs[name].append(
                    dense_sparse_project(W, k, s, iterations=args.iterations).rel_error
                )
            r = max(1, math.floor(p * m * n / (m + n) + 1e-9))
            extra["svd @params"].append(svd_error(S, r))
            k, s = largest_basis(m, n, p, 1, lambda k: nnz_for_basis(k, DEFAULT_DENSITY))
            ds_bytes = 4 * (k * n + m * s) + 2 * m * s
            extra["svd @bytes"].append(svd_error(S, min(min(m, n), ds_bytes // (4 * (m + n)))))
            kb, sb = bytes_basis(m, n, p, DEFAULT_DENSITY)
            extra["default @svd bytes"].append(
                dense_sparse_project(W, kb, sb, iterations=DEFAULT_ITERATIONS).rel_error
            )
            extra["default iters=0"].append(dense_sparse_project(W, k, s, iterations=0).rel_error)
            extra[f"default iters={DEFAULT_ITERATIONS}"].append(
                dense_sparse_project(W, k, s, iterations=DEFAULT_ITERATIONS).rel_error
            )
        for name, values in {**errs, **extra}.items():
            row[name] = sum(values) / len(values)
        results[f"{p:g}"] = row
        print(f"p={p:g} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    names = list(next(iter(results.values())))
    width = max(len(n) for n in names)
    print(f"mean relative error over {len(targets)} MiniLM matrices (iterations {args.iterations})")
    print("rule".ljust(width) + "".join(f"  p={p:<6}" for p in results))
    for name in names:
        print(name.ljust(width) + "".join(f"  {results[p][name]:.4f}  " for p in results))
    for p, row in results.items():
        if rules:
            best = min(rules, key=lambda n: row[n])
            print(f"p={p}: best rule {best} ({row[best]:.4f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
