"""Plain low-rank factorization by truncated SVD [G24, METHODS.md §1]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factorlab.allocation import Spectrum, low_rank_spectrum
from factorlab.layers.low_rank import LowRankLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.registry import Method, ModuleBudget, Projected, register_method
from factorlab.projections.svd import rank_for_param_ratio, singular_values, truncated_svd


@dataclass
class LowRankConfig(FactorizationConfig):
    """Truncated SVD of every targeted weight: ``W ~ A B``, rank ``floor(p m n / (m + n))``.

    See ``FactorizationConfig`` for the shared fields. A module whose factorized form would not be
    smaller than the dense one (``r (m + n) >= m n``) is left dense and reported as such.
    """

    method = "low-rank"


def plan_low_rank(m: int, n: int, budget: ModuleBudget, config: FactorizationConfig) -> int | None:
    rank = (
        budget.rank if budget.rank is not None else rank_for_param_ratio(m, n, budget.param_ratio)
    )
    rank = min(rank, min(m, n))
    return None if rank * (m + n) >= m * n else rank


def build_low_rank(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: FactorizationConfig,
    stats: object,
) -> Projected:
    factors = truncated_svd(weight, rank)
    return Projected(LowRankLinear.from_factors(factors.A, factors.B, bias), factors.rel_error)


def spectrum_low_rank(weight: torch.Tensor, stats: object, config: FactorizationConfig) -> Spectrum:
    """Singular values of ``W`` (float64): plain SVD's truncation error."""
    return low_rank_spectrum(singular_values(weight.detach()), *weight.shape)


LOW_RANK = register_method(
    Method("low-rank", LowRankConfig, plan_low_rank, build_low_rank, spectrum=spectrum_low_rank)
)
