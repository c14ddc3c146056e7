"""Weighted low-rank approximation with diagonal weights: FWSVD [H22, METHODS.md §5].

Hsu et al., "Language Model Compression with Weighted Low-Rank Factorization", ICLR 2022 (FWSVD):
the Fisher information ``I`` (``(m, n)``, see ``factorlab.calibration``) says how much each weight
matters to the task loss. Assuming equal importance within a row, the row weights are
``w_i = sqrt(sum_j I_ij)`` and ``min_{rank(AB) <= r} ||D (W - A B)||_F`` with ``D = diag(w)`` has
the closed form: SVD of ``D W``, ``A = D^{-1} U_r S_r``, ``B = V_r^T``. Public implementations
disagree on the axis, so input columns are supported too (``W D``, ``B = S_r V_r^T D^{-1}``).
"""

from __future__ import annotations

import math

import torch

from factorlab.projections.svd import (
    LowRankFactors,
    relative_error_from_spectrum,
    split_singular_values,
    top_singular,
)

WEIGHT_FLOOR = 1e-6
"""Weights are divided by their mean and then clamped to at least this (a fraction of the mean),
so a row or column with no Fisher mass keeps a tiny positive weight and ``D`` stays invertible."""


def fisher_weights(fisher: torch.Tensor, axis: str = "out") -> torch.Tensor:
    """FWSVD importance weights from a Fisher matrix ``(m, n)``: ``sqrt`` of its row sums
    (``axis="out"``, shape ``(m,)``) or of its column sums (``axis="in"``, shape ``(n,)``).

    Raises:
        ValueError: ``fisher`` is not 2-D, has negative or non-finite entries, or ``axis`` is
            not ``"out"`` / ``"in"``.
    """
    if fisher.ndim != 2:
        raise ValueError(f"fisher must be 2-D (out, in), got shape {tuple(fisher.shape)}")
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' (rows of W) or 'in' (columns), got {axis!r}")
    f = fisher.detach().double()
    if not torch.isfinite(f).all() or (f < 0).any():
        raise ValueError("fisher must be finite and non-negative (a mean of squared gradients)")
    return f.sum(dim=1 if axis == "out" else 0).sqrt()


def _normalized(weights: torch.Tensor | None, size: int, what: str) -> torch.Tensor | None:
    if weights is None:
        return None
    w = weights.detach().double().reshape(-1)
    if w.numel() != size:
        raise ValueError(f"{what} must have {size} entries, got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{what} must be finite and non-negative")
    mean = w.mean()
    if mean == 0:
        return torch.ones_like(w)  # no information: unweighted
    return (w / mean).clamp_min(WEIGHT_FLOOR)


def weighted_svd(
    weight: torch.Tensor,
    rank: int,
    row_weights: torch.Tensor | None = None,
    col_weights: torch.Tensor | None = None,
) -> LowRankFactors:
    """Best rank-``rank`` approximation of ``weight`` (m x n) in the weighted norm
    ``||D_r (W - A B) D_c||_F`` with ``D_r = diag(row_weights)``, ``D_c = diag(col_weights)``.

    Closed form [H22]: SVD of ``D_r W D_c = U S V^T``, ``A = D_r^{-1} U_r S_r^{1/2}`` (m x r),
    ``B = S_r^{1/2} V_r^T D_c^{-1}`` (r x n) (``S`` split over both sides as in ``truncated_svd``;
    the product is the same as the paper's ``A = D^{-1} U_r S_r``, ``B = V_r^T``). Weights are
    scale-free: they are divided by their mean and clamped to ``WEIGHT_FLOOR`` (see there); all-zero
    weights mean no weighting. Uniform weights give exactly ``truncated_svd``. Computed in float64,
    returned in ``weight.dtype``.

    Returns:
        ``LowRankFactors`` whose ``singular_values`` are those of the weighted matrix and whose
        ``rel_error`` is the plain (unweighted) ``||W - A B||_F / ||W||_F``.

    Raises:
        ValueError: ``weight`` not 2-D, ``rank`` outside ``[1, min(m, n)]``, or weights of the
            wrong length, negative or non-finite.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for shape {(m, n)}, got {rank}")
    W = weight.detach().double()
    r = _normalized(row_weights, m, "row_weights")
    c = _normalized(col_weights, n, "col_weights")
    U, S, Vh = top_singular(_scale(W, r, c), rank)
    A, B = split_singular_values(U, S, Vh, rank)
    if r is not None:
        A = A / r[:, None]
    if c is not None:
        B = B / c[None, :]
    return LowRankFactors(
        A=A.to(weight.dtype),
        B=B.to(weight.dtype),
        singular_values=S,
        rel_error=plain_relative_error(W, A, B),
    )


def _scale(W: torch.Tensor, r: torch.Tensor | None, c: torch.Tensor | None) -> torch.Tensor:
    if r is not None:
        W = r[:, None] * W
    if c is not None:
        W = W * c[None, :]
    return W


def weighted_matrix(
    weight: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    col_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``D_r W D_c`` in float64 (weights normalized as in ``weighted_svd``), the matrix whose
    SVD ``weighted_svd`` truncates; shape ``(m, n)``."""
    m, n = weight.shape
    r = _normalized(row_weights, m, "row_weights")
    c = _normalized(col_weights, n, "col_weights")
    return _scale(weight.detach().double(), r, c)


def plain_relative_error(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``||W - A B||_F / ||W||_F`` (a fraction, computed in float64; 0 when ``W = 0``)."""
    W = weight.detach().double()
    norm = torch.linalg.matrix_norm(W).item()
    if norm == 0:
        return 0.0
    err = torch.linalg.matrix_norm(W - A.detach().double() @ B.detach().double()).item()
    return err / norm


def weighted_relative_error(singular_values: torch.Tensor, rank: int) -> float:
    """The weighted objective's relative error ``||D (W - A B)|| / ||D W||`` (Eckart-Young on the
    weighted matrix's spectrum); for diagnostics, the reports use ``plain_relative_error``."""
    value = relative_error_from_spectrum(singular_values, rank)
    return value if math.isfinite(value) else float("nan")
