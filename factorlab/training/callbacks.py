"""Callbacks: the hooks of the training loop (``factorlab.training.finetune.train``).

A callback sees every optimizer step of a run and may add to it: parameter groups of its own
(for example movement-pruning scores with their own learning rate and no weight decay) and extra
loss terms (for example an L1 penalty on those scores). The loop calls, in this order::

    on_train_begin
    for every optimizer step:
        on_step_begin
        for every micro-batch (gradient accumulation):   loss_terms   (added to the loss)
        on_before_optimizer_step                         (gradients are available)
        on_step_end                                      (after optimizer and schedule stepped)
    on_train_end

Each hook gets one ``TrainContext``. ``TrainContext.state`` is one dict shared by every callback
of the run and recorded in ``results.json`` (under ``train.state``), so a callback keeps what it
wants reported there (JSON values only), under its own key.

The layout follows Hugging Face ``transformers.TrainerCallback`` (names of the hooks) and the
movement-pruning example's ``emmental`` (masked layers driven from the loop).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn


@dataclass
class TrainContext:
    """What a callback hook sees.

    Attributes:
        model: the model being trained, unwrapped (module names as in the model, no ``module.``
            prefix of a distributed wrapper); its parameters are the ones the optimizer updates.
        optimizer: the prepared optimizer; ``optimizer.param_groups[i]["lr"]`` is the current
            learning rate of group ``i`` and every group has a ``"name"``.
        accelerator: the run's ``Accelerator`` (process count, device, ``is_main_process``).
        step: optimizer steps done so far, counted over the whole run (a staged run's later
            phases start where the earlier ones stopped).
        num_steps: the step at which this ``train`` call ends (``step == num_steps`` at the end).
        state: shared by every callback, recorded in ``results.json``; JSON values only.
        batch: the current micro-batch in ``loss_terms`` (tensors on the device, ``labels``
            included), else ``None``.
        outputs: the model's outputs on ``batch`` in ``loss_terms``, else ``None``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator
    step: int
    num_steps: int
    state: dict[str, Any] = field(default_factory=dict)
    batch: dict[str, torch.Tensor] | None = None
    outputs: Any = None


class Callback:
    """Base class of training callbacks: every hook does nothing unless overridden."""

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups this callback contributes, built before the optimizer.

        Each group is a ``torch.optim`` group dict (``params``, and optionally ``lr``,
        ``weight_decay`` - default 0 here - and ``name``); its parameters are left out of the
        default groups. Learning rates follow the run's warm-up/decay schedule from their own
        peak value.
        """
        return []

    def on_train_begin(self, ctx: TrainContext) -> None:
        """Before the first step (the optimizer is built and prepared)."""

    def on_step_begin(self, ctx: TrainContext) -> None:
        """Before the forward passes of one optimizer step."""

    def loss_terms(self, ctx: TrainContext) -> torch.Tensor | None:
        """An extra scalar loss for the micro-batch in ``ctx.batch`` (``None``: nothing)."""
        return None

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        """After the backward passes and gradient clipping, before ``optimizer.step()``."""

    def on_step_end(self, ctx: TrainContext) -> None:
        """After ``optimizer.step()`` and the learning-rate schedule step."""

    def on_train_end(self, ctx: TrainContext) -> None:
        """After the last step."""


class CallbackList(Callback):
    """Several callbacks called in order; ``loss_terms`` sums their terms."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks = list(callbacks)

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [group for cb in self.callbacks for group in cb.parameter_groups(model)]

    def on_train_begin(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(ctx)

    def on_step_begin(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_step_begin(ctx)

    def loss_terms(self, ctx: TrainContext) -> torch.Tensor | None:
        terms = [t for t in (cb.loss_terms(ctx) for cb in self.callbacks) if t is not None]
        return torch.stack(terms).sum() if terms else None

    def on_before_optimizer_step(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_before_optimizer_step(ctx)

    def on_step_end(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_step_end(ctx)

    def on_train_end(self, ctx: TrainContext) -> None:
        for cb in self.callbacks:
            cb.on_train_end(ctx)
