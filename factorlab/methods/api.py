"""The public API of ``factorlab.methods``: a config per method, the registry, ``factorize_``."""

from factorlab.methods.act_svd import ActSVDConfig
from factorlab.methods.apply import (
    FactorizationReport,
    ModuleReport,
    count_parameters,
    factorize_,
    factorized_modules,
    plan_modules,
    targeted_bytes,
)
from factorlab.methods.autoencoder import AutoencoderConfig
from factorlab.methods.block_low_rank import BlockLowRankConfig
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.dsformer import DSFormerConfig
from factorlab.methods.fwsvd import FWSVDConfig
from factorlab.methods.low_rank import LowRankConfig
from factorlab.methods.lpaf import LPAFConfig
from factorlab.methods.monarch import MonarchConfig
from factorlab.methods.registry import (
    METHODS,
    GroupMember,
    Method,
    ModuleBudget,
    Projected,
    get_method,
    make_config,
    register_method,
)

__all__ = [
    "METHODS",
    "BlockLowRankConfig",
    "FactorizationConfig",
    "FactorizationReport",
    "LowRankConfig",
    "Method",
    "ModuleBudget",
    "ModuleReport",
    "MonarchConfig",
    "Projected",
    "count_parameters",
    "factorize_",
    "factorized_modules",
    "get_method",
    "make_config",
    "plan_modules",
    "register_method",
    "targeted_bytes",
]
__all__ += ["ActSVDConfig", "AutoencoderConfig", "FWSVDConfig", "GroupMember", "LPAFConfig"]
__all__ += ["DSFormerConfig"]
