"""Block-wise low-rank factorization: a truncated SVD per block of a grid [G24, METHODS.md §3]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from factorlab.allocation import Spectrum
from factorlab.layers.block_low_rank import BlockLowRankLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.monarch import block_spectrum, check_nblocks, plan_block_rank
from factorlab.methods.registry import Method, ModuleBudget, Projected, register_method
from factorlab.projections.block_low_rank import block_low_rank_project


@dataclass
class BlockLowRankConfig(FactorizationConfig):
    """Block-wise low-rank factorization of every targeted weight (Gupta et al. 2024, §3).

    Each ``m x n`` weight is split into an ``nblocks x nblocks`` grid of contiguous blocks and
    every block gets its own rank-``r`` truncated SVD; ``r = floor(p m n / (b (m + n)))`` (padded
    sizes when ``b`` does not divide them), the same rank and parameter count as Monarch. An
    ``int`` in ``rank_pattern`` is the block rank. A module whose factors would not be smaller than
    the dense weight is left dense. See ``FactorizationConfig`` for the shared fields.

    Attributes:
        nblocks: blocks per side of the grid ``b`` (``b x b`` blocks), ``>= 1``.

    Raises:
        ConfigError: ``nblocks`` is not an int ``>= 1`` (plus the shared checks).
    """

    method = "block-low-rank"

    nblocks: int = field(default=4, metadata={"help": "blocks per side of the grid (>= 1)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nblocks(self.nblocks)


def plan_block_low_rank(
    m: int, n: int, budget: ModuleBudget, config: FactorizationConfig
) -> int | None:
    """``Method.plan`` of block-wise low-rank: ``plan_block_rank`` with ``config.nblocks``."""
    assert isinstance(config, BlockLowRankConfig)
    return plan_block_rank(m, n, budget, config.nblocks)


def build_block_low_rank(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: FactorizationConfig,
    stats: object,
) -> Projected:
    """``Method.build``: ``block_low_rank_project`` then ``BlockLowRankLinear.from_factors``."""
    assert isinstance(config, BlockLowRankConfig)
    f = block_low_rank_project(weight, config.nblocks, config.nblocks, rank)
    layer = BlockLowRankLinear.from_factors(f.U, f.V, f.in_features, f.out_features, bias)
    return Projected(layer, f.rel_error)


def spectrum_block_low_rank(
    weight: torch.Tensor, stats: object, config: FactorizationConfig
) -> Spectrum:
    """Spectra of the contiguous blocks that ``block_low_rank_project`` truncates."""
    assert isinstance(config, BlockLowRankConfig)
    f = block_low_rank_project(weight, config.nblocks, config.nblocks, 1)
    return block_spectrum(f.singular_values, *weight.shape, config.nblocks)


BLOCK_LOW_RANK = register_method(
    Method(
        "block-low-rank",
        BlockLowRankConfig,
        plan_block_low_rank,
        build_block_low_rank,
        spectrum=spectrum_block_low_rank,
    )
)
