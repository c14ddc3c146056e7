"""Sparsity-aware SVD: the best rank-r fit of a pruned matrix's KEPT entries [R23, METHODS.md §7].

LPAF (Ren & Zhu 2023) factorizes a pruned weight with an SVD that knows which entries were
pruned: the pruned entries are unknowns, not zeros, so the factors should fit only the kept ones,

    min_{A, B} || M * (W - A B) ||_F        (M: the 0/1 pruning mask, * elementwise),

a weighted low-rank approximation with 0/1 weights, which has no closed form. We solve it by EM
(Srebro & Jaakkola 2003, "Weighted Low-Rank Approximations", §3; "hard impute" in matrix
completion): fill the pruned entries with the current approximation, take the truncated SVD of the
filled matrix, repeat. Each step cannot increase the objective::

    ||M*(W - A'B')|| <= ||X - A'B'|| <= ||X - A B|| = ||M*(W - A B)||,   X = M*W + (1-M)*(A B),

(the first because X agrees with W on the kept entries, the second by Eckart-Young). The start is
the truncated SVD of the pruned matrix ``M * W`` (our reading of the paper, whose text was not
available: METHODS.md §7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from factorlab.projections.svd import split_singular_values


@dataclass(frozen=True)
class MaskedSVDResult:
    """``M * W ~ M * (A B)`` with ``A`` (m x r), ``B`` (r x n) in the weight's dtype.

    Attributes:
        objectives: ``||M * (W - A B)||_F / ||M * W||_F`` (a fraction; with ``pruned_weight``
            lambda the pruned entries' ``sqrt(lambda) A B`` count too) of the start and after
            every EM iteration: non-increasing.
        iterations: EM iterations run (0: the start was kept).
        converged: the last iteration's relative decrease of the objective was below ``tol``.
    """

    A: torch.Tensor
    B: torch.Tensor
    objectives: list[float] = field(default_factory=list)
    iterations: int = 0
    converged: bool = False

    @property
    def rel_error(self) -> float:
        """The final masked relative error (the last entry of ``objectives``)."""
        return self.objectives[-1]


def _truncate(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return split_singular_values(U, S, Vh, rank)


def masked_svd(
    weight: torch.Tensor,
    mask: torch.Tensor,
    rank: int,
    iterations: int = 10,
    tol: float = 1e-4,
    pruned_weight: float = 0.0,
) -> MaskedSVDResult:
    """Rank-``rank`` factors fitting ``weight`` on the entries where ``mask`` is true, by EM.

    Args:
        weight: ``(m, n)``; its values at pruned entries are ignored.
        mask: ``(m, n)`` bool (or 0/1) tensor, true where an entry was KEPT by pruning.
        rank: in ``[1, min(m, n)]``.
        iterations: at most this many EM steps after the start (0: the SVD of the pruned matrix).
        tol: stop when an iteration lowers the objective by less than this fraction of it.
        pruned_weight: ``lambda`` in [0, 1], the weight of the pruned entries, whose target is 0:
            the objective is ``||M * (W - A B)||^2 + lambda ||(1 - M) * A B||^2``. 0 (default)
            leaves them free (the pure masked fit above); 1 is the plain SVD of ``M * W``; in
            between the EM step fills them with ``(1 - lambda) A B`` (Srebro & Jaakkola's EM for
            weights in [0, 1]), which keeps the factors' values at pruned entries from growing
            where the kept entries do not determine them.

    Computed in float64 on the weight's device; the factors come back in ``weight.dtype``. With an
    all-true mask it is the plain truncated SVD (the first step cannot improve on it).

    Raises:
        ValueError: shapes that differ or are not 2-D, a rank outside ``[1, min(m, n)]``,
            ``iterations < 0`` or ``tol < 0``.
    """
    if weight.ndim != 2 or tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(
            f"weight (m, n) and a mask of the same shape expected, got {tuple(weight.shape)} "
            f"and {tuple(mask.shape)}"
        )
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(
            f"rank must be in [1, {min(weight.shape)}] for shape {tuple(weight.shape)}, got {rank}"
        )
    if iterations < 0 or not tol >= 0 or not 0 <= pruned_weight <= 1:
        raise ValueError(
            f"iterations must be >= 0, tol >= 0 and pruned_weight in [0, 1], got {iterations}, "
            f"{tol} and {pruned_weight}"
        )
    keep = mask.to(device=weight.device, dtype=torch.bool)
    target = torch.where(keep, weight.detach().double(), 0.0)
    scale = torch.linalg.matrix_norm(target).item() or 1.0

    root = math.sqrt(pruned_weight)

    def objective(A: torch.Tensor, B: torch.Tensor) -> float:
        residual = torch.where(keep, target - A @ B, -root * (A @ B))
        return torch.linalg.matrix_norm(residual).item() / scale

    A, B = _truncate(target, rank)
    objectives = [objective(A, B)]
    done, converged = 0, False
    for _ in range(iterations):
        filled = torch.where(keep, target, (1.0 - pruned_weight) * (A @ B))
        A_new, B_new = _truncate(filled, rank)
        value = objective(A_new, B_new)
        done += 1
        if value > objectives[-1]:  # round-off at the optimum: keep the better factors
            converged = True
            break
        decrease = objectives[-1] - value
        A, B = A_new, B_new
        objectives.append(value)
        if decrease <= tol * max(objectives[-2], math.ulp(1.0)):
            converged = True
            break
    return MaskedSVDResult(
        A.to(weight.dtype), B.to(weight.dtype), objectives, iterations=done, converged=converged
    )
