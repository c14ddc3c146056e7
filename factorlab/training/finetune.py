"""Fine-tuning and evaluation on ``accelerate``: the same code on one CPU or under
``accelerate launch`` on several devices."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
from factorlab.training.data import EncodedSplit, make_loader

logger = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    """The fine-tuning recipe.

    Attributes:
        learning_rate: peak AdamW learning rate, reached after warm-up, then linear decay to 0.
        epochs: passes over the training set (fractions allowed); ignored when ``max_steps`` is set.
        max_steps: optimizer steps in total, overriding ``epochs``.
        batch_size: training examples per optimizer step (over all devices).
        eval_batch_size: examples per evaluation batch.
        max_seq_length: tokens per example after truncation; batches are padded dynamically.
        warmup_ratio: fraction of the steps spent warming the learning rate up from 0.
        weight_decay: AdamW weight decay, not applied to biases and LayerNorm weights.
        max_grad_norm: gradient clipping threshold (L2 norm); 0 disables it.
        seed: seeds the head initialization, the data order and dropout.
        train_samples: train on a random subset of this many examples (``None``: all).
        train_fraction: train on a random subset of this fraction of the examples, in (0, 1]
            (``None``: all); excludes ``train_samples``. The subset is drawn with ``seed``.
    """

    learning_rate: float = 1e-4
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    eval_batch_size: int = 128
    max_seq_length: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    train_samples: int | None = None
    train_fraction: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.max_seq_length >= 8, "max_seq_length must be >= 8"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.train_samples is None or self.train_samples >= 1, "train_samples must be >= 1"),
            (
                self.train_fraction is None or 0 < self.train_fraction <= 1,
                "train_fraction must be in (0, 1]",
            ),
            (
                self.train_samples is None or self.train_fraction is None,
                "train_samples and train_fraction exclude each other; give one",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message} (TrainingConfig: {asdict(self)})")

    def num_steps(self, num_examples: int) -> int:
        """Optimizer steps for a training set of ``num_examples``."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * math.ceil(num_examples / self.batch_size)))


@dataclass
class TrainResult:
    """Steps run, wall-clock seconds, and the mean training loss per logged interval."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def make_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters; no decay on biases and normalization weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name else decay).append(
            param
        )
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate)


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
    optimizer_hook: Callable[[torch.optim.Optimizer], None] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``dataset`` for ``num_steps`` (default ``config.num_steps``).

    A fresh AdamW optimizer and linear warm-up/decay schedule are built over the model's current
    parameters at every call, so a caller that replaced modules in between never trains stale
    tensors. The data order is seeded with ``config.seed``; runs repeat exactly on CPU.

    ``skip_steps`` starts the data stream where a run of that many steps would have left it (the
    batches of those steps are drawn and dropped), so several calls together see exactly the
    batches of one long call. ``optimizer_hook`` is called once with the prepared optimizer before
    the first step (to inspect its parameters or register step hooks).
    """
    accelerator = accelerator or Accelerator()
    steps = num_steps if num_steps is not None else config.num_steps(len(dataset))
    loader = make_loader(dataset, tokenizer, config.batch_size, shuffle=True, seed=config.seed)
    optimizer = make_optimizer(model, config)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * steps), steps)
    model_p, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    if optimizer_hook is not None:
        optimizer_hook(optimizer)
    model_p.train()
    losses: list[float] = []
    running, count, step = 0.0, 0, 0
    log_every = max(1, steps // 20)
    start = time.perf_counter()
    bar = tqdm(
        total=steps, desc=description, disable=not progress or not accelerator.is_main_process
    )
    epoch = 0
    while step < steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            if skip_steps > 0:
                skip_steps -= 1
                continue
            loss = model_p(**batch).loss
            accelerator.backward(loss)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model_p.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            count += 1
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == steps:
                losses.append(running / count)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if not progress and accelerator.is_main_process and step % (2 * log_every) == 0:
                    elapsed = time.perf_counter() - start
                    logger.info(
                        f"{description}: step {step}/{steps} loss {losses[-1]:.4f} {elapsed:.0f} s"
                    )
                running, count = 0.0, 0
            if step >= steps:
                break
        epoch += 1
    bar.close()
    accelerator.free_memory()
    return TrainResult(steps=steps, seconds=time.perf_counter() - start, losses=losses)


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: EncodedSplit,
    tokenizer: Any,
    batch_size: int = 128,
    accelerator: Accelerator | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Predictions on ``dataset`` in order: class ids, or float scores for regression tasks."""
    accelerator = accelerator or Accelerator()
    loader = accelerator.prepare(make_loader(dataset, tokenizer, batch_size, shuffle=False))
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
