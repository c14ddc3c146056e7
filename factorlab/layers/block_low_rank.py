"""Block-wise low-rank layer, and the two-``bmm`` machinery it shares with ``MonarchLinear``.

A weight split into a ``b_out x b_in`` grid of blocks ``W_jk = U_jk V_jk`` (rank ``r`` each)
computes ``y_j = sum_k U_jk (V_jk x_k)`` [G24, METHODS.md §3]. Monarch [D22, METHODS.md §2] is the
same computation with the output rows interleaved (row ``lam * b_out + jj`` of output block
``jj``), so both layers are ``BlockFactorLinear`` subclasses that differ in one flag.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from factorlab.layers.base import FactorizedLinear, register_layer

_CHUNK_BYTES = 24 * 2**20
"""Largest temporary of Monarch's output permutation (inference path). A temporary as large as
the whole output (50 MB for 4096 tokens x 3072 fp32) is fresh memory on every call (glibc maps
blocks above 32 MB anew), and its page faults cost about as much as the permutation itself; one
chunk-sized buffer, reused across the chunks, avoids most of that. In interleaved runs (2 threads,
(32, 128, 768) -> 3072, equal parameters) the unchunked path took 1.4-1.6x the time of
``LowRankLinear``, the chunked one 1.1-1.45x; see benchmarks/bench_layer_forward.py."""


def _padded(size: int, nblocks: int) -> int:
    return -(-size // nblocks) * nblocks


class BlockFactorLinear(FactorizedLinear):
    """Base of layers whose weight is ``sum_k left_jk right_jk`` over a grid of blocks.

    Shapes (``k = nblocks`` input blocks, ``j = nblocks_out`` output blocks, ``r = rank``; the
    dimensions are zero-padded to ``n_pad``, ``m_pad``, multiples of ``k`` and ``j``):

    - right factor ``(k, j r, i)`` with ``i = n_pad / k``: block ``(jj, kk)``'s right factor is
      ``right[kk, jj r:(jj+1) r]`` (``r x i``);
    - left factor ``(j, l, k r)`` with ``l = m_pad / j``: its left factor is
      ``left[jj, :, kk r:(kk+1) r]`` (``l x r``).

    Forward for ``x`` of shape ``(..., in_features)`` (``T`` tokens): the input is viewed as
    ``(k, T, i)`` (a strided view, no copy), ``h = bmm(x, right^T)`` gives ``(k, T, j r)``, one
    permuting copy turns it into ``(j, T, k r)``, ``bmm(h, left^T)`` gives ``(j, T, l)``, written
    into the ``(T, m_pad)`` output in the subclass's row order together with the bias. The dense
    weight is never formed. Without autograd the last step is fused: block-wise low-rank writes
    the second ``bmm`` straight into the output (``baddbmm(out=...)``, the output blocks are
    contiguous column ranges); Monarch's output rows are interleaved, which no BLAS call can
    write, so it runs the second ``bmm`` over chunks of tokens into one buffer (under
    ``_CHUNK_BYTES``; the dead stage-one output when large enough) and permutes each chunk into
    the output while adding the bias (``add(out=...)``). With autograd both use one ``bmm`` and
    differentiable copies.
    Non-divisible dimensions cost one extra copy of the input (padding) and of the output.

    Memory layout: the factors keep the logical shapes above (and in checkpoints) but are stored
    as transposes of contiguous ``(k, i, j r)`` / ``(j, k r, l)`` arrays, so both ``bmm`` read
    their right-hand operand row-major ("NN" GEMM), as ``LowRankLinear`` does. At 4096 tokens
    this measured the same as contiguous factors; at 128 tokens (1 thread) 10-30% faster.

    Subclasses set ``kind``, ``strided_rows`` and ``factor_names``.
    """

    strided_rows: ClassVar[bool] = False
    """``True``: output block ``jj`` holds rows ``lam * j + jj`` (Monarch); ``False``: rows
    ``jj * l + lam`` (contiguous blocks)."""
    factor_names: ClassVar[tuple[str, str]]
    """Attribute (and checkpoint) names of the (left, right) factors."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nblocks: int,
        rank: int,
        bias: bool = True,
        source: str = "linear",
        nblocks_out: int | None = None,
    ):
        super().__init__(in_features, out_features, bias, source)
        nblocks_out = nblocks if nblocks_out is None else nblocks_out
        for name, value, dim in (
            ("nblocks", nblocks, in_features),
            ("nblocks_out", nblocks_out, out_features),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= dim:
                raise ValueError(f"{name} must be an int in [1, {dim}], got {value!r}")
        self.nblocks = nblocks
        self.nblocks_out = nblocks_out
        self.in_padded = _padded(in_features, nblocks)
        self.out_padded = _padded(out_features, nblocks_out)
        self.block_in = self.in_padded // nblocks
        self.block_out = self.out_padded // nblocks_out
        max_rank = min(self.block_in, self.block_out)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ValueError(
                f"rank must be an int in [1, {max_rank}] (the smaller side of a "
                f"{self.block_out}x{self.block_in} block), got {rank!r}"
            )
        self.rank = rank
        left, right = self.factor_names
        setattr(self, left, self._empty_factor(self.left_shape))
        setattr(self, right, self._empty_factor(self.right_shape))

    @property
    def right_shape(self) -> tuple[int, int, int]:
        """``(nblocks, nblocks_out * rank, in_padded / nblocks)``."""
        return (self.nblocks, self.nblocks_out * self.rank, self.block_in)

    @property
    def left_shape(self) -> tuple[int, int, int]:
        """``(nblocks_out, out_padded / nblocks_out, nblocks * rank)``."""
        return (self.nblocks_out, self.block_out, self.nblocks * self.rank)

    @staticmethod
    def _empty_factor(shape: tuple[int, int, int]) -> nn.Parameter:
        """A zero factor of logical ``shape`` (b, p, q) stored as the transpose of a contiguous
        (b, q, p) array, so that ``bmm(., factor^T)`` reads it row-major ("NN" GEMM)."""
        return nn.Parameter(torch.zeros(shape[0], shape[2], shape[1]).transpose(1, 2))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)``: the two factor parameters."""
        left, right = self.factor_names
        return getattr(self, left), getattr(self, right)

    @classmethod
    def _from_block_factors(
        cls,
        left: torch.Tensor,
        right: torch.Tensor,
        in_features: int | None,
        out_features: int | None,
        bias: torch.Tensor | None,
        source: str,
    ) -> BlockFactorLinear:
        if left.ndim != 3 or right.ndim != 3:
            raise ValueError(
                f"left (j, l, k r) and right (k, j r, i) must be 3-D, got {tuple(left.shape)} "
                f"and {tuple(right.shape)}"
            )
        j, lb, kr = left.shape
        k, jr, i = right.shape
        if kr % k or jr % j or kr // k != jr // j or kr == 0:
            raise ValueError(
                f"inconsistent factors: left {tuple(left.shape)} should be (j, l, k r) and right "
                f"{tuple(right.shape)} (k, j r, i) for one block rank r"
            )
        n = k * i if in_features is None else in_features
        m = j * lb if out_features is None else out_features
        if _padded(n, k) != k * i or _padded(m, j) != j * lb:
            raise ValueError(
                f"in_features={n}, out_features={m} do not pad to the factors' "
                f"{k * i} x {j * lb} (= {k} x {i} and {j} x {lb})"
            )
        layer = cls(n, m, k, kr // k, bias=bias is not None, source=source, nblocks_out=j)
        layer = layer.to(device=right.device, dtype=right.dtype)
        with torch.no_grad():
            new_left, new_right = layer._factors()
            new_left.copy_(left)
            new_right.copy_(right)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def _padded_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.out_padded == self.out_features:
            return self.bias
        return F.pad(self.bias, (0, self.out_padded - self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self._factors()
        k, j, r = self.nblocks, self.nblocks_out, self.rank
        i, lb = self.block_in, self.block_out
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        t = x2.shape[0]
        if self.in_padded != self.in_features:
            x2 = F.pad(x2, (0, self.in_padded - self.in_features))
        # stage 1: (k, T, i) strided view of the input times the right factors -> (k, T, j r)
        h1 = torch.bmm(x2.reshape(t, k, i).transpose(0, 1), right.transpose(1, 2))
        h = h1.view(k, t, j, r).permute(2, 1, 0, 3).reshape(j, t, k * r)  # (j, T, k r)
        # stage 2: one matmul per output block, written into y in this layer's row order
        y = h.new_empty(t, self.out_padded)
        bias = self._padded_bias()
        if self.strided_rows:  # row lam * j + jj
            dst = y.view(t, lb, j).permute(2, 0, 1)
            bias_v = None if bias is None else bias.view(lb, j).t().unsqueeze(1)
        else:  # row jj * l + lam
            dst = y.view(t, j, lb).transpose(0, 1)
            bias_v = None if bias is None else bias.view(j, 1, lb)
        left_t = left.transpose(1, 2)
        if torch.is_grad_enabled():
            dst.copy_(torch.bmm(h, left_t))
            if bias is not None:
                y = y + bias
        elif not self.strided_rows:  # dst has unit inner stride: BLAS writes into it directly
            if bias_v is None:
                torch.bmm(h, left_t, out=dst)
            else:
                torch.baddbmm(bias_v, h, left_t, out=dst)
        else:  # Monarch: dst's inner stride is j; permute through a chunk-sized temporary
            chunks = -(-t * self.out_padded * y.element_size() // _CHUNK_BYTES)
            step = max(1, -(-t // max(chunks, 1)))
            need = j * step * lb
            # one buffer for all chunks: the dead stage-1 output when it is large enough (and
            # not aliased by h, which a reshape can make a view of it), else a fresh one
            reuse = h1.numel() >= need and h1.data_ptr() != h.data_ptr()
            buf = h1.view(-1)[:need] if reuse else h.new_empty(need)
            for s in range(0, t, step):
                e = min(t, s + step)
                o = torch.bmm(h[:, s:e], left_t, out=buf[: j * (e - s) * lb].view(j, e - s, lb))
                if bias_v is None:
                    dst[:, s:e].copy_(o)
                else:
                    torch.add(o, bias_v, out=dst[:, s:e])
        if self.out_padded != self.out_features:
            y = y[:, : self.out_features].contiguous()
        return y.view(*lead, self.out_features)

    def to_dense(self) -> torch.Tensor:
        left, right = self._factors()
        k, j, r = self.nblocks, self.nblocks_out, self.rank
        i, lb = self.block_in, self.block_out
        U = left.reshape(j, lb, k, r)
        V = right.reshape(k, j, r, i)
        rows = "ljki" if self.strided_rows else "jlki"
        dense = torch.einsum(f"jlkr,kjri->{rows}", U, V).reshape(self.out_padded, self.in_padded)
        return dense[: self.out_features, : self.in_features].contiguous()

    def _spec_extra(self) -> dict[str, Any]:
        return {"nblocks": self.nblocks, "rank": self.rank, "nblocks_out": self.nblocks_out}


@register_layer
class BlockLowRankLinear(BlockFactorLinear):
    """Block-wise low-rank linear layer [G24, METHODS.md §3]: ``y_j = sum_k U_jk (V_jk x_k) + b_j``.

    The weight (zero-padded to multiples of the block counts) is a ``nblocks_out x nblocks``
    grid of contiguous blocks of ``l x i`` (``l = m_pad / nblocks_out``, ``i = n_pad / nblocks``),
    each of rank ``rank``. Parameters:

    - ``V``: ``(nblocks, nblocks_out * rank, i)``, ``V[k, j r:(j+1) r] = V_jk``;
    - ``U``: ``(nblocks_out, l, nblocks * rank)``, ``U[j, :, k r:(k+1) r] = U_jk``;

    ``rank * (nblocks * m_pad + nblocks_out * n_pad)`` values plus the bias. Forward: two
    ``torch.bmm`` and reshapes (see ``BlockFactorLinear``); the dense weight is never formed.

    Raises (constructor):
        ValueError: a block count outside ``[1, dimension]`` or ``rank`` outside ``[1, min(l, i)]``.
    """

    kind = "block_low_rank"
    strided_rows = False
    factor_names = ("U", "V")

    @classmethod
    def from_factors(
        cls,
        U: torch.Tensor,
        V: torch.Tensor,
        in_features: int | None = None,
        out_features: int | None = None,
        bias: torch.Tensor | None = None,
        source: str = "linear",
    ) -> BlockLowRankLinear:
        """A layer holding copies of ``U`` (j, l, k r), ``V`` (k, j r, i) and ``bias`` (m,).

        ``in_features`` / ``out_features`` default to the padded sizes ``k i`` / ``j l``; pass the
        original sizes for factors of a padded weight (``BlockLowRankFactors`` carries them). The
        layer takes the factors' dtype and device.

        Raises:
            ValueError: the shapes are inconsistent with each other or with the sizes.
        """
        return cls._from_block_factors(U, V, in_features, out_features, bias, source)
