"""Modules that run factors. One base class, one file per structure."""

from factorlab.layers.base import LAYER_TYPES, FactorizedLinear, register_layer
from factorlab.layers.low_rank import LowRankLinear

__all__ = ["LAYER_TYPES", "FactorizedLinear", "LowRankLinear", "register_layer"]
