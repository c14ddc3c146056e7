"""Modules that run factors. One base class, one file per structure."""

from factorlab.layers.base import LAYER_TYPES, FactorizedLinear, register_layer
from factorlab.layers.block_low_rank import BlockFactorLinear, BlockLowRankLinear
from factorlab.layers.low_rank import LowRankLinear
from factorlab.layers.monarch import MonarchLinear

__all__ = ["LAYER_TYPES", "FactorizedLinear", "LowRankLinear", "register_layer"]
__all__ += ["BlockFactorLinear", "BlockLowRankLinear", "MonarchLinear"]

from factorlab.layers.decoded_rows import DecodedLinear, RowDecoder  # noqa: E402

__all__ += ["DecodedLinear", "RowDecoder"]

from factorlab.layers.dense_sparse import DenseSparseLinear, DenseSparseSTFLinear  # noqa: E402

__all__ += ["DenseSparseLinear", "DenseSparseSTFLinear"]
