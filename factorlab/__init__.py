"""factorlab: compress pretrained transformers by factorizing their weight matrices.

Names load on first use (``factorlab.LowRankConfig`` imports torch then), so ``factorlab --help``
and argument errors answer without importing torch or transformers.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "models": None,
    "densify": "factorlab.checkpoint",
    "load": "factorlab.checkpoint",
    "save": "factorlab.checkpoint",
    "CheckpointError": "factorlab.errors",
    "ConfigError": "factorlab.errors",
    "DataError": "factorlab.errors",
    "FactorlabError": "factorlab.errors",
    "OutputExistsError": "factorlab.errors",
    "TargetError": "factorlab.errors",
    "FactorizedLinear": "factorlab.layers",
    "LowRankLinear": "factorlab.layers",
    "BlockLowRankLinear": "factorlab.layers.block_low_rank",
    "MonarchLinear": "factorlab.layers.monarch",
    "ActSVDConfig": "factorlab.methods",
    "AutoencoderConfig": "factorlab.methods",
    "BlockLowRankConfig": "factorlab.methods",
    "FactorizationConfig": "factorlab.methods",
    "FactorizationReport": "factorlab.methods",
    "FWSVDConfig": "factorlab.methods",
    "LowRankConfig": "factorlab.methods",
    "MonarchConfig": "factorlab.methods",
    "count_parameters": "factorlab.methods",
    "factorize_": "factorlab.methods",
    "factorized_modules": "factorlab.methods",
    "make_config": "factorlab.methods",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'factorlab' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = (
        import_module(f"factorlab.{name}")
        if module is None
        else getattr(import_module(module), name)
    )
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
