"""Factorization methods: a config dataclass per method, a registry, and ``factorize_``."""

from factorlab.methods.apply import (
    FactorizationReport,
    ModuleReport,
    count_parameters,
    factorize_,
    factorized_modules,
)
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.low_rank import LowRankConfig
from factorlab.methods.registry import (
    METHODS,
    Method,
    ModuleBudget,
    Projected,
    get_method,
    make_config,
    register_method,
)

__all__ = [
    "METHODS",
    "FactorizationConfig",
    "FactorizationReport",
    "LowRankConfig",
    "Method",
    "ModuleBudget",
    "ModuleReport",
    "Projected",
    "count_parameters",
    "factorize_",
    "factorized_modules",
    "get_method",
    "make_config",
    "register_method",
]
