"""Schedules: how factorization and fine-tuning interleave. A run asks its schedule to run.

``Simultaneous`` projects every targeted module at once, then fine-tunes (or only projects when
there is no task); ``StagedSchedule`` (``factorlab.training.staged``) projects a few blocks at a
time with fine-tuning in between. Both take the same ``TrainingJob`` and return a
``ScheduleResult``, so ``factorlab.runs`` does not know which one it runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import nn

from factorlab.methods import FactorizationConfig, FactorizationReport, factorize_
from factorlab.training.callbacks import Callback
from factorlab.training.data import EncodedSplit
from factorlab.training.finetune import TrainingConfig, TrainResult, train
from factorlab.training.losses import Objective


@dataclass
class TrainingJob:
    """What a schedule fine-tunes on: data, recipe, loss, callbacks, the accelerator."""

    dataset: EncodedSplit
    tokenizer: Any
    config: TrainingConfig
    accelerator: Accelerator
    objective: Objective | None = None
    callbacks: Sequence[Callback] = ()
    progress: bool = True
    log: Callable[[str], None] | None = None


@dataclass
class ScheduleResult:
    """The model after the schedule (factorized and/or fine-tuned, unwrapped), the factorization
    report (``None`` for a dense run), the training result (``None`` without a task) and the
    seconds per phase (``calibration``, ``factorize``)."""

    model: nn.Module
    report: FactorizationReport | None
    train: TrainResult | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Simultaneous:
    """Project every targeted module at once (``factorize_``), then fine-tune the whole model
    for the full step budget. With no method it only fine-tunes (the dense baseline); with no
    job it only projects."""

    name: ClassVar[str] = "simultaneous"

    def check(self, factorization: FactorizationConfig | None, has_task: bool) -> None:
        """Nothing to refuse: every method and the dense baseline run simultaneously."""

    def run(
        self,
        model: nn.Module,
        factorization: FactorizationConfig | None,
        job: TrainingJob | None,
        calibrate: Callable[..., dict[str, Any]] | None = None,
        probe: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> ScheduleResult:
        """Calibrate (when ``calibrate`` is given), factorize every target, then fine-tune on
        ``job`` for its full step budget; ``factorization=None``: only fine-tune; ``job=None``:
        only factorize. ``probe``: batches for sensitivity allocation (``factorize_``). The
        model changes in place."""
        timings: dict[str, float] = {}
        report = None
        if factorization is not None:
            calibration_seconds = 0.0

            def timed_calibrate(names: list[str]) -> dict[str, Any]:
                nonlocal calibration_seconds
                start = time.perf_counter()
                statistics = calibrate(model, names)  # type: ignore[misc]
                calibration_seconds += time.perf_counter() - start
                return statistics

            start = time.perf_counter()
            report = factorize_(
                model,
                factorization,
                calibrate=timed_calibrate if calibrate else None,
                probe=probe,
            )
            if calibrate is not None:
                timings["calibration"] = calibration_seconds
            timings["factorize"] = time.perf_counter() - start - calibration_seconds
        result = None
        if job is not None:
            result = train(
                model,
                job.dataset,
                job.tokenizer,
                job.config,
                accelerator=job.accelerator,
                progress=job.progress,
                objective=job.objective,
                callbacks=job.callbacks,
            )
            model = job.accelerator.unwrap_model(model)
        return ScheduleResult(model, report, result, timings)
