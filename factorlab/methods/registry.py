"""The method registry: config class -> (rank planning, projection + layer construction).

Adding a method is one config dataclass, one ``Method`` and one ``register_method`` call; nothing
dispatches on method names anywhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from factorlab.allocation import Spectrum
from factorlab.errors import ConfigError
from factorlab.layers.base import FactorizedLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.names import METHOD_NAMES


@dataclass(frozen=True)
class ModuleBudget:
    """One module's budget: an explicit ``rank`` (from ``rank_pattern``) or a ``param_ratio``."""

    param_ratio: float
    rank: int | None = None


@dataclass(frozen=True)
class Projected:
    """What a method's ``build`` returns: the new layer and its relative Frobenius error.

    ``rank`` and ``params``, when given, replace the planned rank and ``layer.num_parameters()``
    in the report (a layer sharing a module with others reports its fair share of it);
    ``details`` (JSON values) goes into the module's report as is (e.g. EM objectives)."""

    layer: FactorizedLinear
    rel_error: float
    rank: int | None = None
    params: int | None = None
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class GroupMember:
    """One module handed to a method's ``build_group``: name, weight ``(out, in)``, bias
    ``(out,)`` or ``None``, its budget, its planned rank and its calibration statistics."""

    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    budget: ModuleBudget
    rank: int
    stats: Any = None


PlanFn = Callable[[int, int, ModuleBudget, Any], "int | None"]
BuildFn = Callable[[torch.Tensor, "torch.Tensor | None", int, Any, Any], Projected]
GroupBuildFn = Callable[[list[GroupMember], Any], "dict[str, Projected]"]
SpectrumFn = Callable[[torch.Tensor, Any, Any], "Spectrum"]


@dataclass(frozen=True)
class Method:
    """A factorization method.

    Attributes:
        name: the CLI name (``"low-rank"``).
        config_cls: its configuration dataclass.
        plan: ``(out_features, in_features, budget, config) -> rank | None``. Chooses the rank
            without touching weights; ``None`` leaves the module dense (the factorized form would
            not be smaller). Raises ``ConfigError`` when the budget is infeasible.
        build: ``(weight (out, in), bias (out,) | None, rank, config, statistics) -> Projected``.
            ``statistics`` is the module's calibration statistics, or ``None``.
        needs_calibration: whether ``build`` requires statistics.
        statistics: which calibration statistics ``build`` reads (``"fisher"``, ``"gram"``: fields
            of ``factorlab.calibration.ModuleStatistics``), so callers collect only those.
        build_group: for methods that fit several modules jointly (a shared decoder):
            ``(members, config) -> {name: Projected}`` over every module that ``plan`` did not
            leave dense; a module missing from the result stays dense. When set, ``factorize_``
            calls it once instead of ``build`` per module.
        spectrum: ``(weight (out, in), statistics, config) -> Spectrum``: the gains per unit of
            rank in the method's own objective, for global rank allocation
            (``factorlab.allocation``); ``None``: the method supports only uniform allocation.
        compensates: ``build`` reads ``statistics.cross`` (inputs of the dense model times
            those of the model compressed so far), so ``config.compensate`` is allowed.
    """

    name: str
    config_cls: type[FactorizationConfig]
    plan: PlanFn
    build: BuildFn
    needs_calibration: bool = False
    statistics: tuple[str, ...] = ()
    build_group: GroupBuildFn | None = None
    spectrum: SpectrumFn | None = None
    compensates: bool = False


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (by name and by config class)."""
    if method.name in METHODS:
        raise RuntimeError(f"method {method.name!r} registered twice")
    if method.name not in METHOD_NAMES:
        raise RuntimeError(f"add {method.name!r} to factorlab.methods.names.METHOD_NAMES")
    if method.config_cls.method != method.name:
        raise RuntimeError(f"{method.config_cls.__name__}.method must be {method.name!r}")
    METHODS[method.name] = method
    return method


def get_method(name_or_config: str | FactorizationConfig) -> Method:
    """Look a method up by CLI name or by config instance.

    Raises:
        ConfigError: unknown method; the message lists the known ones.
    """
    name = name_or_config if isinstance(name_or_config, str) else name_or_config.method
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    if not isinstance(name_or_config, (str, method.config_cls)):
        raise ConfigError(f"{type(name_or_config).__name__} is not a {method.config_cls.__name__}")
    return method


def make_config(method: str, **options: Any) -> FactorizationConfig:
    """Build the config of ``method`` from keyword options (as the CLI and sweeps do).

    Raises:
        ConfigError: unknown method, or an option that method does not take.
    """
    config_cls = get_method(method).config_cls
    known = {f for f in config_cls.__dataclass_fields__}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"method {method!r} does not take option(s) {unknown}; it takes {sorted(known)}"
        )
    return config_cls(**options)
