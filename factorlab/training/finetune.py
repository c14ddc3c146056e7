"""The training loop and evaluation on ``accelerate``: the same code on one CPU or on several
processes (``torch.distributed.run`` / ``accelerate launch``), with callbacks
(``factorlab.training.callbacks``), an injectable loss (``factorlab.training.losses``) and
gradient accumulation."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from factorlab.errors import ConfigError
from factorlab.tasks import compute_metrics
from factorlab.training.callbacks import Callback, CallbackList, TrainContext
from factorlab.training.config import TrainingConfig
from factorlab.training.data import EncodedSplit, make_loader
from factorlab.training.losses import Objective

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What one ``train`` call did.

    Attributes:
        steps: optimizer steps run.
        seconds: wall-clock seconds of the loop.
        losses: mean training loss (over processes and the steps of each logged interval).
        examples: training examples that went into the steps, summed over all processes.
        num_processes: processes that trained (``accelerator.num_processes``).
        loss_parts: the last logged interval's mean of each loss component (``task``, ``kd``...).
        optimizer: one entry per parameter group: name, peak learning rate, weight decay, tensors.
        state: the callbacks' shared state (``TrainContext.state``).
        phases: for schedules with several training phases (LPAF), one JSON entry per phase.
    """

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    examples: int = 0
    num_processes: int = 1
    loss_parts: dict[str, float] = field(default_factory=dict)
    optimizer: list[dict[str, Any]] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "LayerNorm" in name or "norm" in name


def make_optimizer(
    model: nn.Module,
    config: TrainingConfig,
    extra_groups: Sequence[dict[str, Any]] = (),
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters, in named parameter groups.

    Groups: ``decay`` (weights, ``config.weight_decay``), ``no_decay`` (biases and normalization
    weights), ``factors`` (the factor matrices of factorized layers, ``config.factor_weight_decay``,
    by default the same as ``weight_decay``), then ``extra_groups`` (from callbacks: their own
    ``lr``, default ``config.learning_rate``, and ``weight_decay``, default 0). A parameter in an
    extra group is left out of the default groups. Empty groups are dropped.

    Raises:
        ConfigError: a parameter in two extra groups.
    """
    from factorlab.layers import FactorizedLinear

    claimed: dict[int, str] = {}
    for i, group in enumerate(extra_groups):
        for p in group["params"]:
            if id(p) in claimed:
                raise ConfigError(
                    f"a parameter is in two callback parameter groups "
                    f"({claimed[id(p)]!r} and {group.get('name', i)!r})"
                )
            claimed[id(p)] = group.get("name", f"group{i}")
    factor_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, FactorizedLinear)
        for name, p in module.named_parameters()
        if name != "bias"
    }
    decay, no_decay, factors = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in claimed:
            continue
        if id(param) in factor_ids:
            factors.append(param)
        elif _is_no_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    factor_decay = (
        config.weight_decay if config.factor_weight_decay is None else config.factor_weight_decay
    )
    groups = [
        {"name": "decay", "params": decay, "weight_decay": config.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        {"name": "factors", "params": factors, "weight_decay": factor_decay},
    ]
    for i, group in enumerate(extra_groups):
        groups.append(
            {"name": f"group{i}", "weight_decay": 0.0, "lr": config.learning_rate}
            | dict(group)
            | {"params": list(group["params"])}
        )
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def micro_batch_size(config: TrainingConfig, num_processes: int) -> int:
    """Examples per forward pass on one process: ``batch_size`` over processes and
    accumulation steps.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``num_processes x
            gradient_accumulation_steps``.
    """
    split = num_processes * config.gradient_accumulation_steps
    if config.batch_size % split:
        raise ConfigError(
            f"batch_size {config.batch_size} (examples per optimizer step over all processes) "
            f"is not divisible by {num_processes} process(es) x "
            f"{config.gradient_accumulation_steps} accumulation step(s); choose a batch size that "
            f"is a multiple of {split}"
        )
    return config.batch_size // split


def _micro_batches(loader: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch, for ever."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def train(
    model: nn.Module,
    dataset: EncodedSplit,
    tokenizer: Any,
    config: TrainingConfig,
    num_steps: int | None = None,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    description: str = "train",
    skip_steps: int = 0,
    objective: Objective | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Fine-tune ``model`` on ``dataset`` for ``num_steps`` optimizer steps (default
    ``config.num_steps``), calling ``callbacks`` at every step.

    Each optimizer step takes ``config.batch_size`` examples over all processes:
    ``gradient_accumulation_steps`` micro-batches of ``micro_batch_size`` examples on each
    process, gradients averaged (the loss of each micro-batch is divided by the number of
    accumulation steps; gradients are synchronized across processes only on the last one). The
    learning rate warms up linearly over ``warmup_ratio`` of the steps, then decays linearly to 0
    at the last step; the schedule steps once per optimizer step on every process (it is not
    handed to ``accelerator.prepare``, whose wrapper would step it once per process).

    A fresh AdamW optimizer (``make_optimizer``, plus the callbacks' parameter groups) and
    schedule are built over the model's current parameters at every call, so a caller that
    replaced modules in between never trains stale tensors. The data order is seeded with
    ``config.seed``; runs repeat exactly on CPU. ``skip_steps`` starts the data stream where a run
    of that many steps would have left it (their micro-batches are drawn and dropped), so several
    calls together see exactly the batches of one long call; callbacks count steps from it.

    Args:
        objective: the loss (default: the task loss of ``dataset``'s task).
        callbacks: see ``factorlab.training.callbacks``.

    Raises:
        ConfigError: a batch size that does not split over processes and accumulation steps, or
            an empty dataset.
    """
    accelerator = accelerator or Accelerator()
    steps = num_steps if num_steps is not None else config.num_steps(len(dataset))
    micro = micro_batch_size(config, accelerator.num_processes)
    if len(dataset) == 0:
        raise ConfigError("the training set is empty")
    objective = objective or Objective(dataset.task.is_regression)
    objective.to(accelerator.device)
    hooks = CallbackList(callbacks)
    loader = make_loader(
        dataset,
        tokenizer,
        micro,
        shuffle=True,
        seed=config.seed,
        group_by_length=config.group_by_length,
    )
    optimizer = make_optimizer(model, config, hooks.parameter_groups(model))
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
    model_p, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # clip over the model's parameters (in their order: the same norm as a plain loop), then
    # any callback parameter that lives outside the model
    params = list(model_p.parameters())
    in_model = {id(p) for p in params}
    params += [p for g in optimizer.param_groups for p in g["params"] if id(p) not in in_model]
    accum = config.gradient_accumulation_steps
    ctx = TrainContext(
        model=accelerator.unwrap_model(model_p),
        optimizer=optimizer,
        accelerator=accelerator,
        step=skip_steps,
        num_steps=skip_steps + steps,
    )
    batches = _micro_batches(loader)
    for _ in range(skip_steps * accum):
        next(batches)

    model_p.train()
    hooks.on_train_begin(ctx)
    zero = torch.zeros((), device=accelerator.device)
    losses: list[float] = []
    running, parts_sum, interval = zero.clone(), {}, 0
    loss_parts: dict[str, float] = {}
    examples = zero.clone()
    log_every = max(1, steps // 20)
    start = time.perf_counter()
    bar = tqdm(
        total=steps, desc=description, disable=not progress or not accelerator.is_main_process
    )
    for local_step in range(1, steps + 1):
        hooks.on_step_begin(ctx)
        for micro_step in range(accum):
            batch = next(batches)
            sync = micro_step == accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model_p):
                loss, outputs, parts = objective(model_p, batch)
                ctx.batch, ctx.outputs = batch, outputs
                extra = hooks.loss_terms(ctx)
                if extra is not None:
                    loss = loss + extra
                accelerator.backward(loss / accum)
            ctx.batch = ctx.outputs = None
            running += loss.detach() / accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, zero) + v / accum
            examples += batch["labels"].shape[0]
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        hooks.on_before_optimizer_step(ctx)
        optimizer.step()
        if not getattr(optimizer, "step_was_skipped", False):
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.step += 1
        interval += 1
        hooks.on_step_end(ctx)
        bar.update(1)
        if local_step % log_every == 0 or local_step == steps:
            # one device sync per logged interval, not per step
            means = accelerator.reduce(torch.stack([running, *parts_sum.values()]), "mean")
            values = (means / interval).tolist()
            losses.append(values[0])
            loss_parts = dict(zip(parts_sum, values[1:], strict=True))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if not progress and accelerator.is_main_process and local_step % (2 * log_every) == 0:
                elapsed = time.perf_counter() - start
                logger.info(
                    f"{description}: step {local_step}/{steps} loss {losses[-1]:.4f} "
                    f"{elapsed:.0f} s"
                )
            running, parts_sum, interval = zero.clone(), {}, 0
    hooks.on_train_end(ctx)
    bar.close()
    seconds = time.perf_counter() - start
    total_examples = int(accelerator.reduce(examples, "sum").item())
    groups = [
        {
            "name": g["name"],
            "lr": g["initial_lr"],
            "weight_decay": g["weight_decay"],
            "tensors": len(g["params"]),
        }
        for g in optimizer.param_groups
    ]
    accelerator.free_memory()
    return TrainResult(
        steps=steps,
        seconds=seconds,
        losses=losses,
        examples=total_examples,
        num_processes=accelerator.num_processes,
        loss_parts=loss_parts,
        optimizer=groups,
        state=ctx.state,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: EncodedSplit,
    tokenizer: Any,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Predictions on ``dataset`` in order, one per example: class ids, or float scores for
    regression tasks.

    The model is moved to ``accelerator.device`` (where the batches go). On several processes
    each process predicts its shard and ``gather_for_metrics`` returns every example exactly once
    (the padding of an uneven last batch dropped), on every process.
    """
    accelerator = accelerator or Accelerator()
    loader = accelerator.prepare(make_loader(dataset, tokenizer, batch_size, shuffle=False))
    model.to(accelerator.device)
    was_training = model.training
    model.eval()
    outputs = []
    for batch in tqdm(
        loader, desc="evaluate", disable=not progress or not accelerator.is_main_process
    ):
        batch.pop("labels")
        logits = model(**batch).logits
        preds = logits.squeeze(-1) if dataset.task.is_regression else logits.argmax(-1)
        outputs.append(accelerator.gather_for_metrics(preds).cpu())
    model.train(was_training)
    return torch.cat(outputs).numpy()


def evaluate(
    model: nn.Module,
    dataset: EncodedSplit,
    tokenizer: Any,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """GLUE metrics of ``model`` on ``dataset`` (METHODS.md §9), as fractions, not percent."""
    predictions = predict(model, dataset, tokenizer, batch_size, accelerator, progress)
    return compute_metrics(dataset.task, predictions, dataset.labels)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""
    set_seed(seed)
