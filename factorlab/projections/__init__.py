"""Pure tensor math: dense weights (plus optional statistics) in, factors out. No nn.Module here."""

from factorlab.projections.block_low_rank import (
    BlockLowRankFactors,
    block_low_rank_num_parameters,
    block_low_rank_project,
    block_rank_for_param_ratio,
)
from factorlab.projections.monarch import (
    MonarchFactors,
    monarch_num_parameters,
    monarch_project,
    stride_permutation,
)
from factorlab.projections.svd import (
    LowRankFactors,
    rank_for_param_ratio,
    relative_error_from_spectrum,
    split_singular_values,
    truncated_svd,
)

__all__ = [
    "BlockLowRankFactors",
    "LowRankFactors",
    "MonarchFactors",
    "block_low_rank_num_parameters",
    "block_low_rank_project",
    "block_rank_for_param_ratio",
    "monarch_num_parameters",
    "monarch_project",
    "rank_for_param_ratio",
    "relative_error_from_spectrum",
    "split_singular_values",
    "stride_permutation",
    "truncated_svd",
]

from factorlab.projections.activation_svd import activation_svd
from factorlab.projections.autoencoder import fit_autoencoder, latent_size
from factorlab.projections.weighted_svd import fisher_weights, weighted_svd

__all__ += ["activation_svd", "fisher_weights", "fit_autoencoder", "latent_size", "weighted_svd"]
