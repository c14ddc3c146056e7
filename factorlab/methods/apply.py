"""``factorize_``: apply a method to a model in place, and the report of what it did."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from factorlab.allocation import BUDGET_ALLOCATIONS, allocate_global
from factorlab.calibration import statistics_bytes
from factorlab.errors import ConfigError
from factorlab.layers.base import FactorizedLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.registry import GroupMember, ModuleBudget, Projected, get_method
from factorlab.sensitivity import DEFAULT_FRACTIONS, Curves, sensitivity_spectra
from factorlab.targets import budget_for, group_by_block, select_targets


@dataclass(frozen=True)
class ModuleReport:
    """One targeted module: shape ``(out_features, in_features)``, rank (``None`` = left dense),
    parameter counts (weights and bias) before and after, relative Frobenius error (fraction),
    and the method's ``details`` (``Projected.details``), if any."""

    name: str
    out_features: int
    in_features: int
    kind: str
    rank: int | None
    params_before: int
    params_after: int
    rel_error: float
    details: dict[str, Any] | None = None


@dataclass
class FactorizationReport:
    """What ``factorize_`` did, module by module, with parameter totals."""

    method: str
    config: dict[str, Any]
    modules: list[ModuleReport] = field(default_factory=list)
    calibration_peak_bytes: int | None = None
    """Most bytes of calibration statistics held at once (``None``: statistics were passed in)."""

    @property
    def targeted_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def targeted_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def kept_ratio(self) -> float:
        """Fraction of the targeted parameters kept (weights and biases)."""
        return self.targeted_after / max(self.targeted_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "config": self.config,
            "targeted_before": self.targeted_before,
            "targeted_after": self.targeted_after,
            "kept_ratio": self.kept_ratio,
            "calibration_peak_bytes": self.calibration_peak_bytes,
            "modules": [asdict(m) for m in self.modules],
        }

    def format_table(self) -> str:
        """A plain-text table, one row per module, with a total line."""
        rows = [("module", "shape", "kind", "rank", "params", "kept", "rel_err")]
        for m in self.modules:
            rows.append(
                (
                    m.name,
                    f"{m.out_features}x{m.in_features}",
                    m.kind,
                    "-" if m.rank is None else str(m.rank),
                    f"{m.params_before:,}->{m.params_after:,}",
                    f"{m.params_after / m.params_before:.3f}",
                    f"{m.rel_error:.4f}",
                )
            )
        rows.append(
            (
                f"total ({len(self.modules)} modules)",
                "",
                self.method,
                "",
                f"{self.targeted_before:,}->{self.targeted_after:,}",
                f"{self.kept_ratio:.3f}",
                "",
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        )


def can_stream(method: Any, config: FactorizationConfig) -> bool:
    """Whether ``method``'s statistics can come block by block: Gram statistics only, uniform
    allocation, no joint fit of several modules (``build_group``)."""
    return _gram_only(method) and config.allocation == "uniform"


def _gram_only(method: Any) -> bool:
    return (
        method.needs_calibration
        and method.build_group is None
        and "fisher" not in method.statistics
    )


def _check_sequential(method: Any, config: FactorizationConfig) -> None:
    if config.sequential and not _gram_only(method):
        reads = ", ".join(method.statistics) or "no statistics"
        raise ConfigError(
            "sequential calibration projects each block on Gram statistics of the model "
            f"compressed so far; {method.name} reads {reads}"
            + (" and fits several modules jointly" if method.build_group is not None else "")
            + ". Drop --sequential, or use act-svd"
        )
    if config.compensate and not method.compensates:
        raise ConfigError(
            f"{method.name} cannot compensate the error of earlier blocks (it does not read the "
            "dense model's inputs); drop --compensate, or use act-svd"
        )


def plan_modules(
    model: nn.Module,
    config: FactorizationConfig,
    calibration: dict[str, Any] | None = None,
    statistics_later: bool = False,
    probe: Sequence[Mapping[str, torch.Tensor]] | None = None,
    sensitivity_curves: Curves | None = None,
) -> tuple[list[Any], list[ModuleBudget], list[int | None]]:
    """Select the targets of ``config`` in ``model`` and plan each one's rank, touching nothing.

    Uniform allocation needs only shapes, so it also runs on a model built on the meta device
    (a run checks its plan before loading weights; calibration is then not required). Global
    allocation (``config.allocation``) reads every weight's spectrum in the method's objective
    (``Method.spectrum``, with the module's calibration statistics) and spends
    ``floor(param_ratio * sum m n)`` parameters with ``factorlab.allocation.allocate_global``;
    on meta weights it checks only the targets (and returns no budgets or ranks). Sensitivity
    allocation spends the same budget on the model's output change per matrix and rank,
    measured on ``probe`` batches (``factorlab.sensitivity``; the model is left as it was);
    ``sensitivity_curves`` caches the measured curves (read and filled: ``sensitivity_spectra``).

    ``statistics_later``: the statistics come block by block after planning (uniform
    allocation only), so none are required now.

    Returns:
        ``(targets, budgets, ranks)``, one entry per targeted module; a rank of ``None`` leaves
        that module dense.

    Raises:
        TargetError: see ``select_targets``. ConfigError: missing calibration statistics for a
            data-aware method, an infeasible budget, a method without ``spectrum`` under global
            or sensitivity allocation, sensitivity allocation without ``probe`` batches, or a
            plan that would factorize no module at all although
            ``param_ratio < 1`` (the model would keep everything while the run reported it).
    """
    method = get_method(config)
    _check_sequential(method, config)
    targets = select_targets(model, config.target_modules, config.exclude_modules)
    on_meta = any(t.weight.is_meta for t in targets)
    if method.needs_calibration and not on_meta and not statistics_later:
        missing = [t.name for t in targets if calibration is None or t.name not in calibration]
        if missing:
            raise ConfigError(
                f"method {method.name!r} needs calibration statistics; none for {missing[:3]}... "
                "Collect them with factorlab.calibration first."
            )
    if config.allocation in BUDGET_ALLOCATIONS:
        if method.spectrum is None:
            raise ConfigError(
                f"method {method.name!r} has no spectrum to allocate ranks to one budget; use "
                "allocation='uniform'"
            )
        if on_meta:
            return targets, [], []
        if config.allocation == "sensitivity" and not probe:
            raise ConfigError(
                "sensitivity allocation measures the model's output: pass probe batches "
                "(a run takes them from its calibration data: --calibration-task or "
                "--calibration-file, or --task)"
            )
        spectra = {
            t.name: method.spectrum(
                t.weight, calibration.get(t.name) if calibration else None, config
            )
            for t in targets
        }
        if config.allocation == "sensitivity":
            spectra = sensitivity_spectra(
                model,
                targets,
                method,
                config,
                calibration,
                probe,
                spectra,  # type: ignore[arg-type]
                config.sensitivity_fractions or DEFAULT_FRACTIONS,
                config.sensitivity_interpolation,
                sensitivity_curves,
            )
        budget = math.floor(config.param_ratio * sum(s.dense_params for s in spectra.values()))
        ranks = allocate_global(
            spectra, budget, config.min_rank, config.max_param_ratio, config.allocation_normalize
        )
        budgets = [ModuleBudget(config.param_ratio, rank=ranks[t.name]) for t in targets]
    else:
        budgets = [budget_for(t.name, config) for t in targets]
    plans = [method.plan(*t.shape, b, config) for t, b in zip(targets, budgets, strict=True)]
    if all(rank is None for rank in plans) and config.param_ratio < 1 and not config.rank_pattern:
        raise ConfigError(
            f"{method.name} at param_ratio {config.param_ratio} would factorize none of the "
            f"{len(targets)} targeted modules (each factorized form would be at least as large "
            "as its dense weight), so the model would keep everything. Lower --param-ratio or "
            "choose other targets."
        )
    return targets, budgets, plans


STREAM_ABOVE_BYTES = 2**30
"""``factorize_`` streams statistics block by block by default when all targets' Grams could
take more than this many bytes (1 GiB)."""


@torch.no_grad()
def factorize_(
    model: nn.Module,
    config: FactorizationConfig,
    calibration: dict[str, Any] | None = None,
    progress: bool | None = None,
    calibrate: Callable[[list[str]], dict[str, Any]] | None = None,
    stream: bool | None = None,
    probe: Sequence[Mapping[str, torch.Tensor]] | None = None,
    sensitivity_curves: Curves | None = None,
) -> FactorizationReport:
    """Replace the targeted linear layers of ``model`` by factorized layers, in place.

    Select, plan, project, swap: every target and its rank are resolved and checked first, so a
    bad pattern or an infeasible budget raises before any projection; then every module is
    projected (on its own device, in float64 where the projection needs it), and only when all
    projections have succeeded is each swapped for the method's layer, which keeps the original
    bias and dtype. Any error before the swap leaves the model untouched.
    Modules whose factorized form would not be smaller stay dense.
    A method with a ``build_group`` (one that fits several modules jointly, e.g. a shared
    decoder) gets all planned modules in one call before any module is swapped.

    Statistics come either whole (``calibration``) or from ``calibrate``, a function of module
    names. With ``calibrate``, a method that reads only Gram statistics (act-svd, DSFormer's
    whitened basis) under uniform allocation can stream: one transformer block at a time (every
    stack, ``group_by_block``) is calibrated, projected and its statistics dropped, so the
    statistics held at once are one block's (SVD-LLM's and GPTQ's block-wise pipelines). It
    costs a partial pass over the calibration data per block (about half the depth in full
    passes), so by default (``stream=None``) it streams only where the statistics of all
    targets could exceed ``STREAM_ABOVE_BYTES`` (sum of ``in_features^2`` float64 values:
    BERT-base and larger, not MiniLM) or with ``config.sequential``. Other methods (Fisher
    statistics, global allocation, grouped fits) calibrate all targets once. Global or
    sensitivity allocation with ``config.sequential`` plans every rank on the dense model's
    statistics of all targets (held while planning), then projects block by block on the
    compressed model's statistics.

    Args:
        model: any model whose targets are ``nn.Linear`` or GPT-2 ``Conv1D``.
        config: a registered method's config (``LowRankConfig(param_ratio=0.5)``, ...).
        calibration: per-module statistics ``{module name: stats}`` for data-aware methods.
        progress: a bar over the projections; ``None`` shows it only on a terminal.
        calibrate: ``(module names) -> {name: stats}`` statistics of the model as it is now.
            With ``config.sequential`` (streaming only) each block's layers are swapped as soon
            as it is projected, so block ``l`` is calibrated on the outputs of the
            already-compressed blocks ``1 .. l-1``; a failure then puts the originals back.
        stream: with ``calibrate``: ``True`` streams where the method allows, ``False`` never
            (unless ``config.sequential``), ``None`` decides by size (above).
        probe: tokenized batches on which ``allocation="sensitivity"`` measures the output
            (``factorlab.sensitivity``); unused otherwise.
        sensitivity_curves: with sensitivity allocation, a cache of the measured loss curves,
            read and filled, so that several budgets (``param_ratio``) or interpolations of the
            same model, probe, method and statistics measure them once; the caller keeps it to
            those (``factorlab.sensitivity.sensitivity_spectra``).

    Returns:
        A ``FactorizationReport`` with one ``ModuleReport`` per target;
        ``calibration_peak_bytes`` when ``calibrate`` was used.

    Raises:
        ConfigError: unknown method, infeasible budget, missing calibration statistics, both
            ``calibration`` and ``calibrate``, or ``config.sequential`` without ``calibrate`` or
            for a method that reads more than Gram statistics or fits modules jointly.
        TargetError: see ``select_targets``.
    """
    method = get_method(config)
    sequential = config.sequential
    _check_sequential(method, config)
    if calibration is not None and calibrate is not None:
        raise ConfigError("factorize_: pass calibration statistics or calibrate, not both")
    if sequential and calibrate is None:
        raise ConfigError("sequential calibration needs a calibrate function, not statistics")
    if not method.needs_calibration:
        calibrate = None  # nothing to collect
    chosen = select_targets(model, config.target_modules, config.exclude_modules)
    streaming = calibrate is not None and (sequential or can_stream(method, config))
    if streaming and stream is None:
        whole = sum(8 * t.shape[1] ** 2 for t in chosen)  # float64 Grams, none shared
        stream = sequential or whole > STREAM_ABOVE_BYTES
    streaming = streaming and (bool(stream) or sequential)
    # global and sensitivity allocation plan on the dense model's statistics of all targets;
    # a sequential run then projects each block on statistics of the model compressed so far
    plan_on_whole = streaming and config.allocation != "uniform"
    peak = None
    if calibrate is not None and (not streaming or plan_on_whole):
        calibration = calibrate([t.name for t in chosen])
        peak = statistics_bytes(calibration)
    targets, budgets, plans = plan_modules(
        model,
        config,
        calibration,
        statistics_later=streaming and not plan_on_whole,
        probe=probe,
        sensitivity_curves=sensitivity_curves,
    )
    if plan_on_whole:
        calibration = None  # free the dense statistics before the block-by-block pass
    by_name = {
        t.name: (t, budget, rank) for t, budget, rank in zip(targets, budgets, plans, strict=True)
    }

    projected: dict[str, Projected] = {}
    if method.build_group is not None:
        members = [
            GroupMember(
                t.name,
                t.weight,
                t.module.bias,
                budget,
                rank,
                calibration.get(t.name) if calibration else None,
            )
            for t, budget, rank in by_name.values()
            if rank is not None
        ]
        projected = method.build_group(members, config) if members else {}
    elif streaming:
        planned = [t.name for t, _, rank in by_name.values() if rank is not None]
        swapped: dict[str, nn.Module] = {}
        try:
            for block in group_by_block(model, planned):
                statistics = calibrate(block)  # type: ignore[misc]
                peak = max(peak or 0, statistics_bytes(statistics))
                for name in block:
                    target, _, rank = by_name[name]
                    projected[name] = method.build(
                        target.weight, target.module.bias, rank, config, statistics.get(name)
                    )
                del statistics
                if sequential:
                    for name in block:
                        swapped[name] = by_name[name][0].module
                        _swap(model, by_name[name][0], projected[name])
        except BaseException:
            for name, module in swapped.items():
                model.set_submodule(name, module)
            raise
    else:
        bar = tqdm(
            [(t, rank) for t, _, rank in by_name.values() if rank is not None],
            desc=f"factorize ({method.name})",
            disable=None if progress is None else not progress,
            leave=False,
        )
        for target, rank in bar:
            stats = calibration.get(target.name) if calibration else None
            projected[target.name] = method.build(
                target.weight, target.module.bias, rank, config, stats
            )

    # every projection has succeeded: swap them all
    report = FactorizationReport(method.name, config.to_dict(), calibration_peak_bytes=peak)
    for target, _, rank in by_name.values():
        module = target.module
        before = sum(p.numel() for p in module.parameters())
        m, n = target.shape
        result = projected.get(target.name)
        if result is None:
            report.modules.append(
                ModuleReport(target.name, m, n, "dense", None, before, before, 0.0)
            )
            continue
        layer = _swap(model, target, result) if not sequential else model.get_submodule(target.name)
        report.modules.append(
            ModuleReport(
                target.name,
                m,
                n,
                layer.kind,
                rank if result.rank is None else result.rank,
                before,
                layer.num_parameters() if result.params is None else result.params,
                result.rel_error,
                result.details,
            )
        )
    return report


def _swap(model: nn.Module, target: Any, projected: Projected) -> FactorizedLinear:
    """Put ``projected``'s layer in ``target``'s place, with its dtype, device, source and mode."""
    weight = target.weight
    layer: FactorizedLinear = projected.layer.to(device=weight.device, dtype=weight.dtype)
    layer.source = target.source
    layer.train(target.module.training)
    model.set_submodule(target.name, layer)
    return layer


def factorized_modules(model: nn.Module) -> dict[str, FactorizedLinear]:
    """``{name: layer}`` for every factorized layer in ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def targeted_bytes(model: nn.Module, report: FactorizationReport) -> tuple[int, int]:
    """``(before, after)``: bytes of the report's targeted modules as dense weights (at the
    current dtype) and as they are now in ``model`` (``FactorizedLinear.storage_bytes``: factor
    values, index buffers such as DSFormer's int16 columns, biases)."""
    before = after = 0
    for entry in report.modules:
        module = model.get_submodule(entry.name)
        dense_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        if isinstance(module, FactorizedLinear):
            element = next(module.parameters()).element_size()
            before += module.dense_num_parameters() * element
            after += module.storage_bytes()
        else:
            before += dense_bytes
            after += dense_bytes
    return before, after


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter values in ``model`` (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())
