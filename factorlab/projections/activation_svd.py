"""Activation-aware (data-aware) SVD: truncate in the norm of the layer's outputs [METHODS.md §5].

The baseline of DRONE (Chen et al., "DRONE: Data-aware Low-rank Compression for Large NLP Models",
NeurIPS 2021) and SVD-LLM (Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition
for Large Language Model Compression", 2024): for calibration inputs ``X`` (tokens x n) with Gram
matrix ``G = X^T X``, the rank-r ``W_hat`` minimizing ``||X W^T - X W_hat^T||_F`` is found from
``G = C C^T``: SVD of ``W C = U S V^T``, keep r, ``A = U_r S_r^{1/2}``,
``B = S_r^{1/2} V_r^T C^{-1}``. (Since ``||X E^T||_F^2 = tr(E G E^T) = ||E C||_F^2``, this is
Eckart-Young in the whitened space.)

Numerics (everything in float64): ``G`` is damped with ``eps * mean(diag G)`` on the diagonal,
which bounds its condition number by about ``1 + n / eps``; ``C`` is the Cholesky factor, or, if
Cholesky still fails (an indefinite ``G`` from rounding, e.g. rank-deficient statistics), the
symmetric square root ``Q Lambda^{1/2}`` of the eigen-decomposition with eigenvalues clamped to the
damping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factorlab.projections.svd import (
    LowRankFactors,
    split_singular_values,
    top_singular,
)
from factorlab.projections.weighted_svd import plain_relative_error

DEFAULT_EPS = 1e-2
"""Default relative damping of the Gram matrix (see ``ActSVDConfig.eps`` for why)."""


@dataclass(frozen=True)
class ActivationSVDFactors(LowRankFactors):
    """``LowRankFactors`` plus how the Gram matrix was factored.

    ``singular_values`` are those of ``W C`` (the whitened weight); ``rel_error`` is the plain
    ``||W - A B||_F / ||W||_F``; ``output_rel_error`` is ``||(W - A B) C||_F / ||W C||_F``, the
    relative error of the outputs on the (damped) calibration inputs; ``decomposition`` is
    ``"cholesky"``, ``"eigh"`` (fallback) or ``"identity"`` (an all-zero Gram: plain SVD);
    ``damping`` is the value added to the diagonal.
    """

    output_rel_error: float = 0.0
    decomposition: str = "cholesky"
    damping: float = 0.0


def whitening_factor(
    gram: torch.Tensor, eps: float = DEFAULT_EPS, inverse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, str, float]:
    """``(C, C^{-1}, decomposition, damping)`` with ``C C^T = G + damping I`` in float64.

    ``inverse=False`` skips forming the Cholesky factor's inverse (``n^3`` work: most of the
    projection time of a 5632-wide FFN input); ``C^{-1}`` is then ``None`` unless the eigh
    fallback made it anyway, and ``unwhiten`` applies it by a triangular solve.

    ``damping = eps * mean(diag G)``. ``C`` is lower triangular (Cholesky) or, if Cholesky fails,
    ``Q Lambda^{1/2}`` from ``eigh`` with eigenvalues clamped to at least ``damping`` (or to
    ``1e-12 * max eigenvalue`` when ``eps = 0``). An all-zero ``G`` gives ``C = I``.

    Raises:
        ValueError: ``gram`` not square, non-finite, or ``eps`` negative.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (in, in), got shape {tuple(gram.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    G = gram.detach().double()
    if not torch.isfinite(G).all():
        raise ValueError("gram holds non-finite values; the calibration statistics are broken")
    G = (G + G.T) / 2
    n = G.shape[0]
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    scale = G.diagonal().mean().item()
    if scale <= 0:
        return eye, eye, "identity", 0.0
    damping = eps * scale
    damped = G + damping * eye
    L, info = torch.linalg.cholesky_ex(damped)
    if info.item() == 0 and torch.isfinite(L).all() and (L.diagonal() > 0).all():
        L_inv = torch.linalg.solve_triangular(L, eye, upper=False) if inverse else None
        return L, L_inv, "cholesky", damping
    values, Q = torch.linalg.eigh(damped)
    floor = damping if damping > 0 else 1e-12 * max(values.max().item(), 1e-300)
    values = values.clamp_min(floor)
    root = values.sqrt()
    return Q * root, (Q / root).T, "eigh", damping


def unwhiten(B_white: torch.Tensor, C: torch.Tensor, C_inv: torch.Tensor | None) -> torch.Tensor:
    """``B_white C^{-1}`` (r x n), by a triangular solve with the Cholesky factor ``C`` when
    ``C_inv`` was not formed (``r n^2`` instead of ``n^3`` work)."""
    if C_inv is not None:
        return B_white @ C_inv
    return torch.linalg.solve_triangular(C.T, B_white.T, upper=True).T


def compensated_weight(
    weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """The full-rank ``M`` (m x n, float64) whose outputs on the compressed inputs best match
    ``weight``'s on the dense ones: ``min ||X W^T - X_c M^T||_F^2 + d ||M - W||_F^2``.

    ``gram = X_c^T X_c`` and ``cross = X^T X_c`` (n x n; ``X`` the layer's inputs in the dense
    model, ``X_c`` in the compressed one, on the same tokens), ``d = eps * mean(diag gram)`` (the
    damping of ``activation_svd``). Solution ``M = W (cross + d I)(gram + d I)^{-1}``; the
    objective of any ``A B`` is ``const + ||(M - A B) C||_F^2`` with ``C C^T = gram + d I``, so
    the best rank-r ``A B`` is ``activation_svd(M, r, gram, eps)``. ``M = W`` when
    ``X_c = X``. The ridge pulls toward ``W``, not toward 0, so directions the calibration data
    does not reach keep ``W``; with ``eps = 0`` (or an all-zero ``gram``) a ridge of
    ``1e-12 * max(diag gram, 1)`` keeps the solve defined.

    Source: the error feedback of GPTQ (Frantar et al. 2023, §3: later weights absorb the error
    of earlier ones) applied across layers, solved in closed form for the low-rank fit of
    activation-aware SVD (SVD-LLM, Wang et al. 2024); ours, METHODS.md §5 gives act-svd only.

    Raises:
        ValueError: shapes do not fit, ``eps`` negative or non-finite statistics.
    """
    m, n = weight.shape
    for name, value in (("gram", gram), ("cross", cross)):
        if tuple(value.shape) != (n, n):
            raise ValueError(
                f"{name} must be ({n}, {n}) for weight {(m, n)}, got {tuple(value.shape)}"
            )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    G = gram.detach().double().to(weight.device)
    K = cross.detach().double().to(weight.device)
    if not (torch.isfinite(G).all() and torch.isfinite(K).all()):
        raise ValueError("the calibration statistics hold non-finite values")
    G = (G + G.T) / 2
    damping = eps * G.diagonal().mean().item()
    if damping <= 0:  # no inputs reached the layer, or no ridge: keep W where G is singular
        damping = 1e-12 * max(G.diagonal().max().item(), 1.0)
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    W = weight.detach().double()
    # M^T = (G + d I)^{-1} (K + d I)^T W^T, G + d I symmetric positive definite
    return torch.linalg.solve(G + damping * eye, (K + damping * eye).T @ W.T).T


def activation_svd(
    weight: torch.Tensor, rank: int, gram: torch.Tensor, eps: float = DEFAULT_EPS
) -> ActivationSVDFactors:
    """Rank-``rank`` factors of ``weight`` (m x n) minimizing the output error on inputs with
    Gram matrix ``gram`` (n x n): ``||X (W - A B)^T||_F``.

    ``A = U_r S_r^{1/2}`` (m x r), ``B = S_r^{1/2} V_r^T C^{-1}`` (r x n) from the SVD of ``W C``
    (see ``whitening_factor``). With ``gram = I`` and ``eps = 0`` this is exactly
    ``truncated_svd``. Computed in float64, returned in ``weight.dtype``.

    Raises:
        ValueError: shapes do not fit, ``rank`` outside ``[1, min(m, n)]``, non-finite ``gram``.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    m, n = weight.shape
    if gram.shape != (n, n):
        raise ValueError(f"gram must be ({n}, {n}) for weight {(m, n)}, got {tuple(gram.shape)}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for shape {(m, n)}, got {rank}")
    W = weight.detach().double()
    C, C_inv, decomposition, damping = whitening_factor(gram.to(W.device), eps, inverse=False)
    WC = W @ C
    U, S, Vh = top_singular(WC, rank)
    A, B_white = split_singular_values(U, S, Vh, rank)
    B = unwhiten(B_white, C, C_inv)
    energy = S.square()
    total = energy.sum().item()
    output_rel = (max(energy[rank:].sum().item(), 0.0) / total) ** 0.5 if total > 0 else 0.0
    return ActivationSVDFactors(
        A=A.to(weight.dtype),
        B=B.to(weight.dtype),
        singular_values=S,
        rel_error=plain_relative_error(W, A, B),
        output_rel_error=output_rel,
        decomposition=decomposition,
        damping=damping,
    )
