"""The Straight-Through Factorizer (STF) schedule of DSFormer [C23, METHODS.md §8].

Source: Chand, Prabhu, Kumar, "DSFormer: Effective Compression of Text-Transformers by Dense-Sparse
Weight Factorization", arXiv 2312.13211, 2023 [C23]: instead of fitting every factorization to
its weight first and fine-tuning afterwards, learn all factorizations jointly on the task
objective. Here: every targeted module is projected into the training form
(``DenseSparseSTFLinear``: a dense basis and dense latent coefficients, initialized by the
projection), the whole model trains on ``job.objective`` (task loss, optionally with distillation)
while the forward pass uses the top-s latents per row and the gradient reaches all latents; then
every training-form layer is swapped for its deployed form (``DenseSparseLinear``), so saving,
loading and benchmarks only ever see the deployed form.

Our choices: the support is recomputed every ``refresh_interval`` optimizer steps (after the
optimizer step, so the next forward uses it) and once more at the end; without a task the schedule
only projects and deploys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from factorlab.errors import ConfigError
from factorlab.layers.dense_sparse import DenseSparseLinear, DenseSparseSTFLinear
from factorlab.methods import FactorizationConfig
from factorlab.training.callbacks import Callback, TrainContext
from factorlab.training.schedules import ScheduleResult, Simultaneous, TrainingJob

MAX_RECORDED = 20
"""At most this many entries in ``state["stf"]["changed"]`` (refreshes are averaged in chunks)."""


def training_layers(model: nn.Module) -> dict[str, DenseSparseSTFLinear]:
    """``{name: layer}`` of every training-form DSFormer layer in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, DenseSparseSTFLinear)}


def deploy_(model: nn.Module) -> int:
    """Swap every ``DenseSparseSTFLinear`` of ``model`` for ``to_deployed()``, in place; returns
    how many were swapped."""
    layers = training_layers(model)
    for name, layer in layers.items():
        model.set_submodule(name, layer.to_deployed())
    return len(layers)


class STFCallback(Callback):
    """Refreshes the top-s supports of every training-form layer every ``refresh_interval``
    optimizer steps and at the end of training.

    Records in ``ctx.state["stf"]``: ``refresh_interval``, ``refreshes`` (count), ``changed``
    (the fraction of all support entries, over all layers, that changed, averaged over chunks of
    consecutive refreshes so that at most ``MAX_RECORDED`` values are kept) and ``steps`` (the
    last step of each chunk).
    """

    def __init__(self, refresh_interval: int = 1):
        if refresh_interval < 1:
            raise ConfigError(f"refresh_interval must be >= 1, got {refresh_interval}")
        self.refresh_interval = refresh_interval
        self._layers: list[DenseSparseSTFLinear] = []
        self._chunk = 1
        self._pending: list[float] = []

    def on_train_begin(self, ctx: TrainContext) -> None:
        self._layers = list(training_layers(ctx.model).values())
        expected = max(1, (ctx.num_steps - ctx.step) // self.refresh_interval + 1)
        self._chunk = math.ceil(expected / MAX_RECORDED)
        self._pending = []
        ctx.state["stf"] = {
            "refresh_interval": self.refresh_interval,
            "refreshes": 0,
            "changed": [],
            "steps": [],
        }

    def _refresh(self, ctx: TrainContext, final: bool) -> None:
        if not self._layers:
            return
        changed = sum(layer.refresh_support() for layer in self._layers)
        total = sum(layer.support.numel() for layer in self._layers)
        state = ctx.state["stf"]
        state["refreshes"] += 1
        self._pending.append(changed / total)
        if len(self._pending) == self._chunk or final:
            state["changed"].append(sum(self._pending) / len(self._pending))
            state["steps"].append(ctx.step)
            self._pending = []

    def on_step_end(self, ctx: TrainContext) -> None:
        if ctx.step % self.refresh_interval == 0:
            self._refresh(ctx, final=False)

    def on_train_end(self, ctx: TrainContext) -> None:
        self._refresh(ctx, final=True)


@dataclass
class STFSchedule:
    """Project every target into the STF training form, train jointly, deploy (METHODS.md §8).

    The interface of ``factorlab.training.schedules.Simultaneous``. The refresh interval comes
    from the config's ``refresh_interval`` (default 1: every step). With no job (no task) it
    only projects and deploys."""

    name: ClassVar[str] = "stf"

    def check(self, factorization: FactorizationConfig | None, has_task: bool) -> None:
        """Refuses only a run without a method (there is nothing to factorize); without a task
        the schedule projects and deploys.

        Raises:
            ConfigError: ``factorization`` is ``None``.
        """
        if factorization is None:
            raise ConfigError("the STF schedule factorizes; it needs a method (dsformer)")

    def run(
        self,
        model: nn.Module,
        factorization: FactorizationConfig | None,
        job: TrainingJob | None,
        calibrate: Callable[..., dict[str, Any]] | None = None,
    ) -> ScheduleResult:
        """Calibrate (when ``calibrate`` is given), factorize every target (training form when
        the config asks for STF), train on ``job`` with the STF callback (plus the job's own
        callbacks and objective), then deploy every training-form layer. The model changes in
        place; the returned ``ScheduleResult.model`` is unwrapped and deployed.

        Raises:
            ConfigError: ``factorization`` is ``None``.
        """
        self.check(factorization, job is not None)
        if job is not None:
            interval = getattr(factorization, "refresh_interval", 1)
            job = dataclasses.replace(job, callbacks=[*job.callbacks, STFCallback(interval)])
        outcome = Simultaneous().run(model, factorization, job, calibrate)
        model, report = outcome.model, outcome.report
        deploy_(model)
        report.modules = [  # the report names the deployed kind
            dataclasses.replace(m, kind=DenseSparseLinear.kind)
            if m.kind == DenseSparseSTFLinear.kind
            else m
            for m in report.modules
        ]
        return ScheduleResult(model, report, outcome.train, outcome.timings)
