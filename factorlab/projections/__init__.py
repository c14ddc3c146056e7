"""Pure tensor math: dense weights (plus optional statistics) in, factors out. No nn.Module here."""

from factorlab.projections.svd import (
    LowRankFactors,
    rank_for_param_ratio,
    relative_error_from_spectrum,
    split_singular_values,
    truncated_svd,
)

__all__ = [
    "LowRankFactors",
    "rank_for_param_ratio",
    "relative_error_from_spectrum",
    "split_singular_values",
    "truncated_svd",
]
