"""factorlab: compress pretrained transformers by factorizing their weight matrices."""

from factorlab import models
from factorlab.checkpoint import densify, load, save
from factorlab.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FactorlabError,
    OutputExistsError,
    TargetError,
)
from factorlab.layers import FactorizedLinear, LowRankLinear
from factorlab.layers.block_low_rank import BlockLowRankLinear
from factorlab.layers.monarch import MonarchLinear
from factorlab.methods import (
    ActSVDConfig,
    AutoencoderConfig,
    BlockLowRankConfig,
    FactorizationConfig,
    FactorizationReport,
    FWSVDConfig,
    LowRankConfig,
    MonarchConfig,
    count_parameters,
    factorize_,
    factorized_modules,
    make_config,
)

__version__ = "0.1.0"

__all__ = [
    "ActSVDConfig",
    "AutoencoderConfig",
    "BlockLowRankConfig",
    "BlockLowRankLinear",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FWSVDConfig",
    "FactorizationConfig",
    "FactorizationReport",
    "FactorizedLinear",
    "FactorlabError",
    "LowRankConfig",
    "LowRankLinear",
    "MonarchConfig",
    "MonarchLinear",
    "OutputExistsError",
    "TargetError",
    "__version__",
    "count_parameters",
    "densify",
    "factorize_",
    "factorized_modules",
    "load",
    "make_config",
    "models",
    "save",
]
