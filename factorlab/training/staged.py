"""Staged factorization: project the model a few blocks at a time, fine-tuning in between.

Source: Gupta, Mahdipour Saravani, Sadayappan, Srikumar, "An Empirical Investigation of Matrix
Factorization Methods for Pre-trained Transformers", arXiv 2406.11307, 2024 [G24], its staged
factorization and stability study (Fig. 3, 4). The schedule follows METHODS.md §4, since the
paper's exact schedule was not available:

* the targeted modules are split into stages, by default one transformer block per stage, the top
  (last) block first; ``order="bottom-up"``, ``blocks_per_stage=K`` or explicit ``groups`` change
  that;
* each stage projects its modules from their CURRENT weights (already fine-tuned by the earlier
  stages), then fine-tunes the whole model for its share of the step budget with a fresh AdamW
  optimizer and a fresh warm-up/decay schedule;
* a final phase of the same length follows the last stage;
* the step budget is ``training_config.num_steps(len(dataset))``, the same as the simultaneous
  baseline (project everything, then train): ``total // (stages + 1)`` steps per stage and the
  rest in the final phase, so both schedules take exactly the same number of optimizer steps and,
  since every phase continues the data stream of the previous one, see the same batches in the
  same order.

Works with every registered method: a stage is ``factorize_`` with the config's
``target_modules`` narrowed to the stage's modules (``dataclasses.replace``); nothing here knows
a method. Module names come from ``factorlab.targets`` (``select_targets``, ``group_by_block``).
Consequences: ranks and per-module budgets are the same as in the simultaneous run; a method that
fits several modules jointly (``build_group``) fits each stage's modules together, not all of
them; a data-aware method gets statistics of the current model per stage through ``calibrate``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from accelerate import Accelerator
from torch import nn

from factorlab.errors import ConfigError
from factorlab.methods import FactorizationConfig, FactorizationReport, factorize_, get_method
from factorlab.targets import budget_for, group_by_block, select_targets
from factorlab.training.callbacks import Callback, TrainContext
from factorlab.training.data import EncodedSplit
from factorlab.training.finetune import TrainingConfig, TrainResult, train
from factorlab.training.losses import Objective
from factorlab.training.schedules import ScheduleResult, TrainingJob

ORDERS = ("top-down", "bottom-up")


@dataclass
class StagedSchedule:
    """How to split the targeted modules into stages (METHODS.md §4).

    Attributes:
        order: ``"top-down"`` (default: the last transformer block is projected first) or
            ``"bottom-up"`` (the first block first).
        blocks_per_stage: consecutive transformer blocks projected together in one stage, >= 1.
            With 6 blocks and 4 per stage there are 2 stages (4 blocks, then 2).
        groups: explicit stages instead of blocks, run in the given order: each group is a list of
            module names or name suffixes, or one regex (the forms of ``target_modules``). The
            groups must not overlap and must together cover exactly the config's targets.
            ``order`` and ``blocks_per_stage`` do not apply to them (``blocks_per_stage`` must
            stay 1).
    """

    order: Literal["top-down", "bottom-up"] = "top-down"
    blocks_per_stage: int = 1
    groups: list[list[str] | str] | None = None

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ConfigError(f"stage order must be one of {ORDERS}, got {self.order!r}")
        if (
            isinstance(self.blocks_per_stage, bool)
            or not isinstance(self.blocks_per_stage, int)
            or self.blocks_per_stage < 1
        ):
            raise ConfigError(f"blocks_per_stage must be an int >= 1, got {self.blocks_per_stage}")
        if self.groups is not None:
            if self.blocks_per_stage != 1:
                raise ConfigError("blocks_per_stage does not apply to explicit groups; leave it 1")
            if not self.groups or any(
                not g or not (isinstance(g, str) or all(isinstance(n, str) for n in g))
                for g in self.groups
            ):
                raise ConfigError(
                    "groups must be a non-empty list of non-empty module-name lists (or regexes), "
                    f"got {self.groups!r}"
                )
            self.groups = [g if isinstance(g, str) else list(g) for g in self.groups]

    name: ClassVar[str] = "staged"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (stored in a run's config, so caching and reruns see it)."""
        return dataclasses.asdict(self)

    def check(self, factorization: FactorizationConfig | None, has_task: bool) -> None:
        """Refuse what this schedule cannot run, before any work.

        Raises:
            ConfigError: no task or no method (nothing to fine-tune between stages), or a
                method config staging would change (``check_stageable``).
        """
        if not has_task or factorization is None:
            raise ConfigError(
                "staged factorization fine-tunes between stages: it needs a task (--task) and a "
                "method (not the dense baseline)"
            )
        check_stageable(factorization)

    def run(
        self,
        model: nn.Module,
        factorization: FactorizationConfig | None,
        job: TrainingJob | None,
        calibrate: Callable[..., dict[str, Any]] | None = None,
    ) -> ScheduleResult:
        """Factorize and fine-tune stage by stage (``finetune_staged``)."""
        self.check(factorization, job is not None)
        assert factorization is not None and job is not None
        result, report = finetune_staged(
            model,
            factorization,
            self,
            job.dataset,
            job.tokenizer,
            job.config,
            accelerator=job.accelerator,
            progress=job.progress,
            log=job.log,
            calibrate=calibrate,
            objective=job.objective,
            callbacks=job.callbacks,
        )
        factorize = sum(s.factorize_seconds for s in result.stages)
        return ScheduleResult(model, report, result, {"factorize": factorize})


def check_stageable(config: FactorizationConfig) -> None:
    """Refuse a method config that a staged schedule would silently change.

    Raises:
        ConfigError: ``config.staging_problem()`` names one (e.g. the autoencoder with
            ``sharing="stacked"``, whose one decoder per matrix type spans all blocks).
    """
    problem = config.staging_problem()
    if problem is not None:
        raise ConfigError(f"method {config.method!r} cannot be staged: {problem}")


def plan_stages(
    model: nn.Module, config: FactorizationConfig, schedule: StagedSchedule
) -> list[list[str]]:
    """The stages of ``schedule`` for ``model``: full module names per stage, in stage order.

    Nothing is changed; every name is resolved and checked here, before any training.

    Raises:
        TargetError: see ``select_targets`` (the config's or a group's patterns).
        ConfigError: explicit groups overlap or do not cover exactly the config's targets.
    """
    targets = [t.name for t in select_targets(model, config.target_modules, config.exclude_modules)]
    if schedule.groups is not None:
        stages = [
            [t.name for t in select_targets(model, group, config.exclude_modules)]
            for group in schedule.groups
        ]
        flat = [n for stage in stages for n in stage]
        repeated = sorted({n for n in flat if flat.count(n) > 1})
        extra = sorted(set(flat) - set(targets))
        missing = [n for n in targets if n not in set(flat)]
        if repeated or extra or missing:
            raise ConfigError(
                "staged groups must split the targets exactly: "
                + "; ".join(
                    f"{what}: {names[:5]}{'...' if len(names) > 5 else ''}"
                    for what, names in (
                        ("in several groups", repeated),
                        ("not targeted by the method config", extra),
                        ("targeted but in no group", missing),
                    )
                    if names
                )
            )
        return stages
    blocks = group_by_block(model, targets)
    if schedule.order == "top-down":
        blocks = blocks[::-1]
    k = schedule.blocks_per_stage
    return [[n for block in blocks[i : i + k] for n in block] for i in range(0, len(blocks), k)]


def split_steps(total: int, num_stages: int) -> list[int]:
    """Steps per phase: ``total // (num_stages + 1)`` per stage, the rest in the final phase.

    Returns:
        ``num_stages + 1`` step counts summing to ``total``.

    Raises:
        ConfigError: fewer than ``num_stages + 1`` steps (a stage would not train at all).
    """
    if num_stages < 1:
        raise ConfigError(f"a staged schedule needs at least one stage, got {num_stages}")
    per = total // (num_stages + 1)
    if per < 1:
        raise ConfigError(
            f"{total} training steps cannot be split over {num_stages} stages and a final phase; "
            f"train for at least {num_stages + 1} steps (more epochs or data, or fewer stages "
            "with blocks_per_stage)"
        )
    return [per] * num_stages + [total - per * num_stages]


@dataclass
class StageInfo:
    """One phase of a staged run.

    Attributes:
        index: 1-based stage number; the final phase is ``num_stages + 1``.
        modules: full names of the modules projected at the start of this phase (empty for the
            final phase).
        steps: optimizer steps of this phase.
        factorize_seconds / train_seconds: wall-clock seconds of projecting / fine-tuning.
        losses: mean training loss per logged interval of this phase.
        optimizer_params: names of the parameters the phase's optimizer updated (checked to be
            exactly the model's trainable parameters at that point).
    """

    index: int
    modules: list[str]
    steps: int
    factorize_seconds: float = 0.0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    optimizer_params: list[str] = field(default_factory=list)

    @property
    def is_final(self) -> bool:
        return not self.modules

    def to_dict(self) -> dict[str, Any]:
        """For ``results.json``: names, steps, timings, losses, number of optimizer parameters."""
        return {
            "stage": "final" if self.is_final else self.index,
            "modules": self.modules,
            "steps": self.steps,
            "factorize_seconds": self.factorize_seconds,
            "train_seconds": self.train_seconds,
            "final_loss": self.losses[-1] if self.losses else None,
            "optimizer_tensors": len(self.optimizer_params),
        }


@dataclass
class StagedTrainResult(TrainResult):
    """A ``TrainResult`` over all phases (``steps`` and ``seconds`` summed, ``losses``
    concatenated) with one ``StageInfo`` per phase, the final phase last."""

    stages: list[StageInfo] = field(default_factory=list)


class OptimizerCheck(Callback):
    """Records the optimizer's parameters in ``info`` at the start of a phase and raises unless
    they are exactly the model's trainable parameters (none stale, none missing)."""

    def __init__(self, info: StageInfo):
        self.info = info

    def on_train_begin(self, ctx: TrainContext) -> None:
        expected = {id(p): n for n, p in ctx.model.named_parameters() if p.requires_grad}
        held = [p for group in ctx.optimizer.param_groups for p in group["params"]]
        names = [expected.get(id(p)) for p in held]
        if None in names or len(set(names)) != len(expected) or len(names) != len(expected):
            raise RuntimeError(
                f"stage {self.info.index}: the optimizer holds {len(held)} tensors, "
                f"{names.count(None)} of them not in the model, but the model has "
                f"{len(expected)} trainable tensors"
            )
        self.info.optimizer_params = sorted(n for n in names if n is not None)


def finetune_staged(
    model: nn.Module,
    factorization_config: FactorizationConfig,
    schedule: StagedSchedule,
    dataset: EncodedSplit,
    tokenizer: Any,
    training_config: TrainingConfig,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_phase_end: Callable[[StageInfo, nn.Module], None] | None = None,
    calibrate: Callable[[nn.Module, list[str]], dict[str, Any]] | None = None,
    objective: Objective | None = None,
    callbacks: Sequence[Callback] = (),
) -> tuple[StagedTrainResult, FactorizationReport]:
    """Factorize ``model`` stage by stage, fine-tuning the whole model after each stage.

    The model is changed in place (its targeted modules become the method's layers). Under
    ``accelerate`` the model is unwrapped before every projection, and every phase's ``train``
    call prepares it again with a new optimizer over its current parameters, so no optimizer
    ever holds a replaced (stale) tensor; this is checked at every phase.

    Args:
        model: a model with a task head (``model(**batch).loss``), dense in the targeted modules.
        factorization_config: any registered method's config; its ``target_modules`` /
            ``exclude_modules`` choose the modules, split by ``schedule`` into stages.
        schedule: the stages (``StagedSchedule()``: one block per stage, top block first).
        dataset / tokenizer / training_config: as for ``train``; the total number of optimizer
            steps is ``training_config.num_steps(len(dataset))``, split by ``split_steps``.
        accelerator: shared by every phase (default: a new ``Accelerator()``).
        progress: show a progress bar per phase.
        log: called with one line per phase (``None``: silent).
        on_phase_end: called after each phase with its ``StageInfo`` and the (unwrapped) model.
        calibrate: for data-aware methods: ``(model, stage module names) -> {name: statistics}``,
            called before each stage's projection, so the statistics describe the current
            (already fine-tuned, partly factorized) model.
        objective / callbacks: as for ``train``, shared by every phase (a callback's hooks run
            once per phase: ``on_train_begin`` and ``on_train_end`` too).

    Returns:
        ``(result, report)``: per-phase information, and one ``FactorizationReport`` over all
        stages (modules in model order, the method config as given).

    Raises:
        TargetError / ConfigError: bad targets or groups, too few steps for the stages, or a
            config staging would change (``check_stageable``); raised before the model is touched.
        RuntimeError: an optimizer did not hold exactly the model's trainable parameters (a bug).
    """
    check_stageable(factorization_config)
    accelerator = accelerator or Accelerator()
    say = log or (lambda _line: None)
    if get_method(factorization_config).needs_calibration and calibrate is None:
        raise ConfigError(
            f"method {factorization_config.method!r} needs calibration statistics: pass "
            "calibrate=(model, module names) -> statistics to finetune_staged"
        )
    stages = plan_stages(model, factorization_config, schedule)
    total = training_config.num_steps(len(dataset))
    steps = split_steps(total, len(stages))
    targets = select_targets(
        model, factorization_config.target_modules, factorization_config.exclude_modules
    )
    method = get_method(factorization_config)
    for t in targets:  # every stage's budget is feasible, checked before any training
        method.plan(*t.shape, budget_for(t.name, factorization_config), factorization_config)
    model_order = [t.name for t in targets]

    reports: list[FactorizationReport] = []
    phases: list[StageInfo] = []
    phase_results: list[TrainResult] = []
    done = 0
    for index, (modules, phase_steps) in enumerate(zip([*stages, []], steps, strict=True), start=1):
        model = accelerator.unwrap_model(model)
        info = StageInfo(index=index, modules=list(modules), steps=phase_steps)
        if modules:
            start = time.perf_counter()
            stage_config = dataclasses.replace(factorization_config, target_modules=list(modules))
            statistics = calibrate(model, list(modules)) if calibrate is not None else None
            reports.append(factorize_(model, stage_config, statistics))
            info.factorize_seconds = time.perf_counter() - start

        label = f"stage {index}/{len(stages)}" if modules else "final"
        result = train(
            model,
            dataset,
            tokenizer,
            training_config,
            num_steps=phase_steps,
            accelerator=accelerator,
            progress=progress,
            description=label,
            skip_steps=done,
            objective=objective,
            callbacks=[OptimizerCheck(info), *callbacks],
        )
        done += phase_steps
        phase_results.append(result)
        info.train_seconds, info.losses = result.seconds, result.losses
        phases.append(info)
        say(
            f"{label}: projected {len(modules)} modules in {info.factorize_seconds:.1f}s, "
            f"trained {phase_steps} steps in {info.train_seconds:.1f}s, "
            f"loss {result.final_loss:.4f}"
        )
        if on_phase_end is not None:
            on_phase_end(info, accelerator.unwrap_model(model))

    model = accelerator.unwrap_model(model)
    position = {name: i for i, name in enumerate(model_order)}
    merged = FactorizationReport(
        reports[0].method,
        factorization_config.to_dict(),
        sorted((m for r in reports for m in r.modules), key=lambda m: position[m.name]),
    )
    result = StagedTrainResult(
        steps=sum(p.steps for p in phases),
        seconds=sum(p.train_seconds for p in phases),
        losses=[loss for p in phases for loss in p.losses],
        examples=sum(r.examples for r in phase_results),
        num_processes=phase_results[-1].num_processes,
        loss_parts=phase_results[-1].loss_parts,
        optimizer=phase_results[-1].optimizer,
        state=phase_results[-1].state,
        stages=phases,
    )
    return result, merged
