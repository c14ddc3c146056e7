"""Factorization methods: one config dataclass per method and a registry (see ``api``).

The package loads lazily: ``from factorlab.methods import LowRankConfig`` imports torch and
registers every method on first use, while ``factorlab.methods.names`` stays import-light for the
command line.
"""

from importlib import import_module
from typing import Any

from factorlab.methods.names import METHOD_NAMES as METHOD_NAMES


def __getattr__(name: str) -> Any:
    api = import_module("factorlab.methods.api")  # not `from . import`: that asks __getattr__
    try:
        value = getattr(api, name)
    except AttributeError:
        raise AttributeError(f"module 'factorlab.methods' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(["METHOD_NAMES", *import_module("factorlab.methods.api").__all__])
