"""Low-rank layer: ``W = A B`` with ``A`` (out x rank) and ``B`` (rank x in)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from factorlab.layers.base import FactorizedLinear, register_layer


@register_layer
class LowRankLinear(FactorizedLinear):
    """``y = (x B^T) A^T + b``: a rank-``r`` factorization of a linear layer [G24, METHODS.md §1].

    Factors: ``A`` of shape ``(out_features, rank)`` and ``B`` of shape ``(rank, in_features)``;
    ``rank * (in_features + out_features)`` parameters plus the bias. The forward pass is two
    matmuls, the second fused with the bias (``F.linear`` folds the leading dimensions into one
    ``addmm``), and never forms the dense weight: ``rank * (in + out)`` MACs per token.

    Memory layout: ``A`` and ``B`` keep their shapes and names (checkpoints are unchanged) but are
    stored transposed in memory (``A`` is the transpose of a contiguous ``(rank, out)`` array,
    ``B`` of an ``(in, rank)`` one), so both matmuls read their right-hand operand row-major
    ("NN" GEMM). On CPU (MKL, fp32, 1 thread) the layer measured 8-18% faster than with
    contiguous factors at 128 tokens and about 5-10% at 4096 tokens (MiniLM shapes; see
    ``benchmarks/bench_lowrank_speed.py``). Replacing ``A.data`` by a contiguous tensor stays
    correct, only slower.
    """

    kind = "low_rank"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        source: str = "linear",
    ):
        super().__init__(in_features, out_features, bias, source)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.A = nn.Parameter(torch.zeros(rank, out_features).t())  # (out, rank), "NN" layout
        self.B = nn.Parameter(torch.zeros(in_features, rank).t())  # (rank, in), "NN" layout

    @classmethod
    def from_factors(
        cls,
        A: torch.Tensor,
        B: torch.Tensor,
        bias: torch.Tensor | None = None,
        source: str = "linear",
    ) -> LowRankLinear:
        """Build a layer holding copies of ``A`` (m x r), ``B`` (r x n) and ``bias`` (m,), in
        ``A``'s dtype and device."""
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(
                f"A (m x r) and B (r x n) expected, got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        layer = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, source=source)
        layer.to(device=A.device, dtype=A.dtype)  # a bf16 fit stays bf16 until it is swapped in
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.A @ self.B

    def macs_per_token(self) -> int:
        """``rank * (in_features + out_features)``: the two matmuls of the forward pass."""
        return self.rank * (self.in_features + self.out_features)

    def _spec_extra(self) -> dict[str, Any]:
        return {"rank": self.rank}
