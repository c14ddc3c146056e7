"""Forward latency of the DSFormer deployed layer's kernels on MiniLM shapes [C23, METHODS.md §8].

For each shape ``out x in`` (384x384 attention, 1536x384 intermediate, 384x1536 output) the
``(k, s)`` of ``param_ratio`` p under the default budget rule (``factorlab.methods.dsformer``)
and random factors, it times ``h = x D^T`` followed by

* ``gather``: ``h[:, idx] * values`` summed over the ``s`` entries (materializes tokens x m x s);
* ``embedding_bag``: the fused gather + weighted sum ``F.embedding_bag(idx, h^T, values)``;
* ``csr``: ``C_csr @ h^T`` with ``C`` a ``torch.sparse_csr`` tensor built from (indices, values)
  at every call, as a layer whose values train would have to;

against the dense coefficient product ``h C^T`` (``C`` dense ``m x k``), the layer itself
(``DenseSparseLinear``, which runs that product with ``C`` cached) and the dense equivalent
``nn.Linear`` (an ``m x n`` product). Float32, ``torch.inference_mode()``, a fixed thread count,
round-robin timing (one call of each per round, so background load hits all alike), median ms.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_dense_sparse_forward.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/bench_dense_sparse_forward.py --threads 2

The layer's docstring records the numbers this measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from factorlab.layers import DenseSparseLinear
from factorlab.methods.dsformer import dsformer_sizes

SHAPES = ((384, 384), (1536, 384), (384, 1536))


def kernels(layer: DenseSparseLinear, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    m, n, k, s = layer.out_features, layer.in_features, layer.basis_size, layer.nnz_per_row
    D = layer.basis.reshape(-1, n)
    rows = m // layer.groups  # column of each value in h of all groups, (g k) wide
    idx = layer.indices.long() + (torch.arange(m) // rows * k)[:, None]
    values = layer.values
    crow = torch.arange(0, m * s + 1, s)
    col = idx.reshape(-1)
    dense_w = layer.to_dense()
    dense_c = layer.sparse_coefficients()

    def gather() -> torch.Tensor:
        h = F.linear(x, D)
        return (h[:, idx] * values).sum(-1)

    def embedding_bag() -> torch.Tensor:
        h = F.linear(x, D)
        return F.embedding_bag(idx, h.t().contiguous(), per_sample_weights=values, mode="sum").t()

    def csr() -> torch.Tensor:
        h = F.linear(x, D)
        C = torch.sparse_csr_tensor(crow, col, values.reshape(-1), (m, k))
        return (C @ h.t()).t()

    def dense_coefficients() -> torch.Tensor:
        return F.linear(F.linear(x, D), dense_c)

    def dense() -> torch.Tensor:
        return F.linear(x, dense_w)

    def layer_forward() -> torch.Tensor:
        return layer(x)

    return {
        "gather": gather,
        "embedding_bag": embedding_bag,
        "csr": csr,
        "layer": layer_forward,
        "dense_coef": dense_coefficients,
        "dense": dense,
    }


def random_layer(m: int, n: int, k: int, s: int, seed: int = 0) -> DenseSparseLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = DenseSparseLinear(n, m, k, s)
    with torch.no_grad():
        layer.basis.normal_(generator=gen)
        layer.values.normal_(generator=gen)
        idx = torch.rand(m, k, generator=gen).argsort(1)[:, :s].sort(1).values
        layer.indices.copy_(idx.to(torch.int16))
    return layer.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--param-ratio", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 16, 4, 1])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)  # "sparse CSR support is in beta"
    print(f"threads {torch.get_num_threads()}, param_ratio {args.param_ratio}, median ms")
    header = None
    for m, n in SHAPES:
        k, s = dsformer_sizes(m, n, args.param_ratio)
        layer = random_layer(m, n, k, s)
        for tokens in args.tokens:
            x = torch.randn(tokens, n)
            with torch.inference_mode():
                fns = kernels(layer, x)
                reference = fns["dense"]()
                for fn in fns.values():
                    torch.testing.assert_close(fn(), reference, atol=1e-3, rtol=1e-3)
                for fn in fns.values():  # warm-up
                    fn()
                times: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(args.runs):
                    for name, fn in fns.items():
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
            if header is None:
                header = f"{'shape':>10} {'k':>4} {'s':>4} {'tokens':>6} " + " ".join(
                    f"{name:>13}" for name in fns
                )
                print(header)
            print(
                f"{m}x{n:<6} {k:>4} {s:>4} {tokens:>6} "
                + " ".join(f"{statistics.median(t) * 1e3:>13.3f}" for t in times.values())
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
