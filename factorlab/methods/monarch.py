"""Monarch factorization: closed-form projection onto ``P_out L P R`` [D22, G24, METHODS.md §2]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from factorlab.allocation import Spectrum
from factorlab.errors import ConfigError
from factorlab.layers.monarch import MonarchLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.registry import Method, ModuleBudget, Projected, register_method
from factorlab.projections.block_low_rank import block_rank_for_param_ratio, padded_size
from factorlab.projections.monarch import monarch_num_parameters, monarch_project


@dataclass
class MonarchConfig(FactorizationConfig):
    """Monarch factorization of every targeted weight (Dao et al. 2022 ICML; METHODS.md §2).

    Each ``m x n`` weight becomes ``P_out L P R`` with ``nblocks`` blocks on both sides and the
    block rank chosen for ``param_ratio``: ``r = floor(p m n / (b (m + n)))`` (padded sizes when
    ``b`` does not divide them), so the kept fraction never exceeds ``p``. An ``int`` in
    ``rank_pattern`` is the block rank. A module whose Monarch form would not be smaller than the
    dense weight is left dense. See ``FactorizationConfig`` for the shared fields.

    Attributes:
        nblocks: number of diagonal blocks ``b`` of ``L`` and ``R`` (input and output blocks),
            ``>= 1``. Larger ``b``: smaller blocks, higher block rank for the same budget.

    Raises:
        ConfigError: ``nblocks`` is not an int ``>= 1`` (plus the shared checks).
    """

    method = "monarch"

    nblocks: int = field(
        default=4, metadata={"help": "blocks of the block-diagonal factors L and R (>= 1)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nblocks(self.nblocks)


def check_nblocks(nblocks: object) -> None:
    """Raise ``ConfigError`` unless ``nblocks`` is an int ``>= 1``."""
    if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks < 1:
        raise ConfigError(f"nblocks must be an int >= 1, got {nblocks!r}")


def plan_block_rank(m: int, n: int, budget: ModuleBudget, nblocks: int) -> int | None:
    """Block rank of an ``m x n`` weight with ``nblocks`` blocks, or ``None`` to leave it dense.

    An explicit ``budget.rank`` is the block rank (capped at the smaller block side); otherwise
    ``block_rank_for_param_ratio``. ``None`` when the factors would not be smaller than ``m n``.

    Raises:
        ConfigError: ``nblocks`` exceeds a dimension (no block structure fits: a silently dense
            module would keep more than asked), or the ratio is infeasible even at block rank 1
            (names the smallest feasible).
    """
    if nblocks > min(m, n):
        raise ConfigError(
            f"nblocks {nblocks} exceeds the smaller side of a {m}x{n} weight: every block "
            f"needs at least one row and column. Choose nblocks <= {min(m, n)} (4 is typical)."
        )
    block_min = min(padded_size(m, nblocks) // nblocks, padded_size(n, nblocks) // nblocks)
    if budget.rank is not None:
        rank = min(budget.rank, block_min)
    else:
        rank = block_rank_for_param_ratio(m, n, nblocks, budget.param_ratio)
    return None if monarch_num_parameters(m, n, nblocks, rank) >= m * n else rank


def plan_monarch(m: int, n: int, budget: ModuleBudget, config: FactorizationConfig) -> int | None:
    """``Method.plan`` of Monarch: ``plan_block_rank`` with ``config.nblocks``."""
    assert isinstance(config, MonarchConfig)
    return plan_block_rank(m, n, budget, config.nblocks)


def block_spectrum(singular_values: torch.Tensor, m: int, n: int, nblocks: int) -> Spectrum:
    """Allocation data of a block method: one unit of block rank adds a singular triplet to
    every block, so its gain is the sum over blocks of their next ``sigma^2``.

    Args:
        singular_values: ``(nblocks_out, nblocks_in, q)`` float64, each block's full spectrum.
    """
    gains = singular_values.detach().double().square().sum(dim=(0, 1))
    cost = monarch_num_parameters(m, n, nblocks, 1)
    max_rank = min(len(gains), (m * n - 1) // cost)
    return Spectrum(gains, cost, max_rank, m * n)


def spectrum_monarch(weight: torch.Tensor, stats: object, config: FactorizationConfig) -> Spectrum:
    """Block spectra of the permuted weight that ``monarch_project`` truncates."""
    assert isinstance(config, MonarchConfig)
    f = monarch_project(weight, config.nblocks, config.nblocks, 1)
    return block_spectrum(f.singular_values, *weight.shape, config.nblocks)


def build_monarch(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: FactorizationConfig,
    stats: object,
) -> Projected:
    """``Method.build`` of Monarch: ``monarch_project`` then ``MonarchLinear.from_factors``."""
    assert isinstance(config, MonarchConfig)
    f = monarch_project(weight, config.nblocks, config.nblocks, rank)
    layer = MonarchLinear.from_factors(f.L, f.R, f.in_features, f.out_features, bias)
    return Projected(layer, f.rel_error)


MONARCH = register_method(
    Method("monarch", MonarchConfig, plan_monarch, build_monarch, spectrum=spectrum_monarch)
)
