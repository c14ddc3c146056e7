"""Truncated SVD: the optimal rank-r approximation in Frobenius norm [G24, METHODS.md §1]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRankFactors:
    """``W ~ A B`` with ``A`` (m x r) and ``B`` (r x n), in the dtype of the input weight.

    ``singular_values`` holds all ``min(m, n)`` singular values of the matrix that was truncated
    (float64, descending); ``rel_error`` is ``||W - A B||_F / ||W||_F`` (a fraction; 0 when W = 0).
    """

    A: torch.Tensor
    B: torch.Tensor
    singular_values: torch.Tensor
    rel_error: float

    @property
    def rank(self) -> int:
        return self.A.shape[1]


def rank_for_param_ratio(out_features: int, in_features: int, param_ratio: float) -> int:
    """Largest rank ``r`` with ``r (m + n) <= p m n``, at least 1: ``floor(p m n / (m + n))``.

    Example: 768 x 768 gives 192 at p = 0.5 and 96 at p = 0.25; 3072 x 768 gives 307 and 153.

    Raises:
        ValueError: ``param_ratio`` outside (0, 1] or a dimension below 1.
    """
    if not 0.0 < param_ratio <= 1.0:
        raise ValueError(f"param_ratio must be in (0, 1], got {param_ratio}")
    if out_features < 1 or in_features < 1:
        raise ValueError(f"dimensions must be >= 1, got {out_features} x {in_features}")
    m, n = out_features, in_features
    return max(1, math.floor(param_ratio * m * n / (m + n) + 1e-9))


def relative_error_from_spectrum(singular_values: torch.Tensor, rank: int) -> float:
    """``sqrt(sum_{i >= rank} s_i^2 / sum_i s_i^2)``: the Eckart-Young relative Frobenius error."""
    energy = singular_values.double().square()
    total = energy.sum()
    if total == 0:
        return 0.0
    return math.sqrt(max(energy[rank:].sum().item(), 0.0) / total.item())


def split_singular_values(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` factors with ``S^{1/2}`` folded into both sides: ``(U_r S_r^½, S_r^½ Vh_r)``.

    Balancing the singular values keeps both factors at similar scale, which trains better than
    putting all of ``S`` on one side.
    """
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def top_singular(
    matrix: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S, Vh_r)``: the top ``rank`` singular vectors of a float64 ``matrix`` (m x n) and
    all ``min(m, n)`` singular values (descending), from the eigendecomposition of its smaller
    Gram matrix (``W^T W`` when ``m >= n``, else ``W W^T``; ``torch.linalg.eigh``).

    Exact up to rounding, not randomized: about 3x faster than ``torch.linalg.svd`` on MiniLM's
    matrices (``benchmarks/bench_svd_speed.py``). Squaring the matrix squares its condition
    number, so singular values below ``sqrt(eps) * s_1`` (about 1e-8 s_1 in float64) lose their
    relative accuracy; they are at most the discarded tail, and the truncation error, a sum of
    squares, is accurate to ``eps * s_1^2`` per value. A top singular value that is zero to that
    accuracy gets zero vectors on its unknown side (the product ``U_r S_r Vh_r`` stays right).
    ``benchmarks/bench_svd_speed.py`` measures the largest change of any MiniLM matrix's
    truncation error against ``torch.linalg.svd`` (below 1e-12).
    """
    m, n = matrix.shape
    tall = m >= n
    gram = matrix.T @ matrix if tall else matrix @ matrix.T
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    S = values.sqrt()
    known = vectors[:, :rank]
    s = S[:rank]
    floor = s[0] * 1e-12 if s.numel() and s[0] > 0 else 1.0
    inverse = torch.where(s > floor, 1 / s.clamp_min(floor), torch.zeros_like(s))
    if tall:
        return (matrix @ known) * inverse, S, known.T
    return known, S, (matrix.T @ known * inverse).T


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All ``min(m, n)`` singular values of ``matrix`` (descending, float64), from the
    eigenvalues of its smaller Gram matrix (see ``top_singular`` for the accuracy)."""
    matrix = matrix.double()
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def truncated_svd(weight: torch.Tensor, rank: int) -> LowRankFactors:
    """Best rank-``rank`` approximation of ``weight`` (m x n) by truncated SVD.

    Computed in float64 (``top_singular``) and returned in ``weight.dtype`` on its device.
    ``A = U_r S_r^{1/2}`` (m x r), ``B = S_r^{1/2} V_r^T`` (r x n). By Eckart-Young the squared
    Frobenius error equals the sum of the discarded squared singular values.

    Raises:
        ValueError: ``weight`` is not 2-D, or ``rank`` is outside ``[1, min(m, n)]``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(
            f"rank must be in [1, {min(weight.shape)}] for shape {tuple(weight.shape)}, got {rank}"
        )
    U, S, Vh = top_singular(weight.detach().double(), rank)
    A, B = split_singular_values(U, S, Vh, rank)
    return LowRankFactors(
        A=A.to(weight.dtype),
        B=B.to(weight.dtype),
        singular_values=S,
        rel_error=relative_error_from_spectrum(S, rank),
    )
