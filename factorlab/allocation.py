"""Rank allocation to a global parameter budget (METHODS.md §11).

``uniform`` (the default) gives every targeted matrix the same ``param_ratio``. ``global`` spends
one budget ``B = floor(param_ratio * sum_i m_i n_i)`` over all targeted matrices, greedily, where
it costs the method's own objective least (as in ASVD, SVD-LLM v2 and AdaSVD's allocators)::

    start every matrix at rank ``min_rank``;
    repeat: add one rank to the matrix whose next unit drops the squared truncation error most
            per parameter, gain / cost = sigma_{i, r_i + 1}^2 / (params per unit rank of i),
    while the unit still fits the budget.

``sigma`` are the singular values the method truncates: those of ``W`` (low-rank), of the
Fisher-weighted ``D W`` (fwsvd), of the activation-whitened ``W C`` (act-svd), or per unit of
block rank the sum over blocks of the blocks' ``sigma^2`` (Monarch, block-low-rank). Each
matrix's gains are non-increasing in its rank, so the greedy choice is the optimal split of the
budget up to the last unit that does not fit (a fractional-knapsack argument); with equal costs it
is exactly the top-k of all gains. A matrix's rank is capped so its factors stay smaller than the
dense weight (``max_rank``) and at ``max_param_ratio`` of it.

``sensitivity`` runs the same greedy on gains measured on the model's output instead of the
matrix's own error: ``factorlab.sensitivity`` (ASVD's sensitivity-based rank search).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from factorlab.errors import ConfigError

ALLOCATIONS = ("uniform", "global", "sensitivity")
BUDGET_ALLOCATIONS = ("global", "sensitivity")
"""Allocations that spend one budget over all targeted matrices (and so choose every rank)."""


@dataclass(frozen=True)
class Spectrum:
    """One matrix's allocation data.

    Attributes:
        gains: ``(R,)`` float64, non-increasing: ``gains[j]`` is the drop of the method's squared
            error when the rank goes from ``j`` to ``j + 1``.
        cost: parameters added per unit of rank (``m + n`` for low-rank).
        max_rank: the largest rank whose factors are still smaller than the dense matrix (and
            at most ``len(gains)``).
        dense_params: ``m n``, the matrix's size, whose sum over matrices sets the budget.
    """

    gains: torch.Tensor
    cost: int
    max_rank: int
    dense_params: int


def low_rank_spectrum(singular_values: torch.Tensor, m: int, n: int) -> Spectrum:
    """The spectrum of a rank-``r`` factorization ``A B`` (``r (m + n)`` parameters) whose error
    is the tail of ``singular_values`` (Eckart-Young)."""
    gains = singular_values.detach().double().square()
    max_rank = min(len(gains), (m * n - 1) // (m + n))
    return Spectrum(gains, m + n, max_rank, m * n)


def allocate_global(
    spectra: dict[str, Spectrum],
    budget: int,
    min_rank: int = 1,
    max_param_ratio: float = 1.0,
    normalize: bool = False,
) -> dict[str, int]:
    """Ranks that spend at most ``budget`` parameters where they drop the error most.

    Args:
        spectra: ``{module name: Spectrum}``.
        budget: parameters to spend over all matrices (``sum_i r_i cost_i <= budget``).
        min_rank: every matrix keeps at least this rank (>= 1).
        max_param_ratio: no matrix keeps more than this fraction of its dense parameters, in
            (0, 1].
        normalize: divide each matrix's gains by their sum, so the greedy minimizes the sum of
            RELATIVE squared errors (scale-free); ``False`` (default): the sum of the absolute
            squared errors, the method's own objective over all matrices.

    Returns:
        ``{module name: rank}`` with ``min_rank <= rank <= the matrix's cap``.

    Raises:
        ConfigError: ``min_rank`` or ``max_param_ratio`` out of range, or the floors alone
            exceed the budget (names the smallest feasible ``param_ratio``).
    """
    check_allocation("global", min_rank, max_param_ratio)
    gains = {
        name: s.gains / s.gains.sum().clamp_min(1e-300) if normalize else s.gains
        for name, s in spectra.items()
    }
    caps = {
        name: min(s.max_rank, math.floor(max_param_ratio * s.dense_params / s.cost))
        for name, s in spectra.items()
    }
    ranks = {name: min(min_rank, caps[name]) for name in spectra}
    spent = sum(ranks[name] * s.cost for name, s in spectra.items())
    if spent > budget:
        total = sum(s.dense_params for s in spectra.values())
        raise ConfigError(
            f"the global budget of {budget:,} parameters cannot give every matrix rank "
            f"{min_rank} ({spent:,} parameters); use param_ratio >= {spent / total:.4f} or a "
            "lower min_rank"
        )
    # max-heap of the next unit's gain per parameter; ties broken by name for determinism
    heap = [
        (-gains[name][ranks[name]].item() / s.cost, name)
        for name, s in spectra.items()
        if ranks[name] < caps[name]
    ]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        s = spectra[name]
        if spent + s.cost > budget:
            continue  # this matrix's unit no longer fits; a cheaper one may
        ranks[name] += 1
        spent += s.cost
        if ranks[name] < caps[name]:
            heapq.heappush(heap, (-gains[name][ranks[name]].item() / s.cost, name))
    return ranks


def check_allocation(allocation: str, min_rank: int = 1, max_param_ratio: float = 1.0) -> None:
    """Validate allocation options (a config's, before any work).

    Raises:
        ConfigError: ``allocation`` not in ``ALLOCATIONS``, ``min_rank`` not an int >= 1, or
            ``max_param_ratio`` not in (0, 1].
    """
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise ConfigError(f"min_rank must be an int >= 1, got {min_rank!r}")
    if not isinstance(max_param_ratio, (int, float)) or not 0 < max_param_ratio <= 1:
        raise ConfigError(f"max_param_ratio must be in (0, 1], got {max_param_ratio!r}")
