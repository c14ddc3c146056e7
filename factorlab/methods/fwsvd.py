"""Fisher-weighted SVD (FWSVD) [H22, METHODS.md §5]: truncated SVD weighted by task importance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from factorlab.allocation import Spectrum, low_rank_spectrum
from factorlab.errors import ConfigError
from factorlab.layers.low_rank import LowRankLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.low_rank import plan_low_rank
from factorlab.methods.registry import Method, Projected, register_method
from factorlab.projections.svd import singular_values
from factorlab.projections.weighted_svd import fisher_weights, weighted_matrix, weighted_svd

FISHER_AXES = ("out", "in")


@dataclass
class FWSVDConfig(FactorizationConfig):
    """FWSVD [Hsu et al., ICLR 2022]: ``min ||D (W - A B)||_F`` with Fisher weights ``D``.

    Needs calibration: the Fisher information of every targeted weight (``collect_statistics``
    with ``fisher=True``, labelled task data, a model with its task head). The rank is the same
    as low-rank's, ``floor(p m n / (m + n))``, and the layer is the same ``LowRankLinear``, so
    checkpoints, loading and benchmarks are unchanged. The report's ``rel_error`` is the plain
    ``||W - A B||_F / ||W||_F`` (not the weighted objective), comparable across methods.

    Attributes:
        fisher_axis: ``"out"``: one weight per output row, ``w_i = sqrt(sum_j I_ij)`` (the
            paper's and [K23]'s choice); ``"in"``: one weight per input column,
            ``w_j = sqrt(sum_i I_ij)``. Public implementations disagree; the benchmark reports
            both.
    """

    method = "fwsvd"

    fisher_axis: str = "out"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fisher_axis not in FISHER_AXES:
            raise ConfigError(
                f"fisher_axis must be 'out' (rows of W) or 'in' (columns), got {self.fisher_axis!r}"
            )


def _importance(weight: torch.Tensor, stats: object, config: FWSVDConfig) -> dict[str, Any]:
    """``weighted_svd``'s keyword for the config's axis: ``row_weights`` or ``col_weights``."""
    fisher = getattr(stats, "fisher", None)
    if fisher is None:
        raise ConfigError("fwsvd needs Fisher statistics (collect_statistics(..., fisher=True))")
    if tuple(fisher.shape) != tuple(weight.shape):
        raise ConfigError(
            f"Fisher statistics of shape {tuple(fisher.shape)} do not fit the weight "
            f"{tuple(weight.shape)}; were they collected on another model?"
        )
    weights = fisher_weights(fisher.to(weight.device), config.fisher_axis)
    return {"row_weights" if config.fisher_axis == "out" else "col_weights": weights}


def spectrum_fwsvd(weight: torch.Tensor, stats: object, config: FWSVDConfig) -> Spectrum:
    """Singular values of the Fisher-weighted matrix that fwsvd truncates."""
    scaled = weighted_matrix(weight, **_importance(weight, stats, config))
    return low_rank_spectrum(singular_values(scaled), *weight.shape)


def build_fwsvd(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: FWSVDConfig,
    stats: object,
) -> Projected:
    factors = weighted_svd(weight, rank, **_importance(weight, stats, config))
    return Projected(LowRankLinear.from_factors(factors.A, factors.B, bias), factors.rel_error)


FWSVD = register_method(
    Method(
        "fwsvd",
        FWSVDConfig,
        plan_low_rank,
        build_fwsvd,
        needs_calibration=True,
        statistics=("fisher",),
        spectrum=spectrum_fwsvd,
    )
)
