"""The training recipe and the distillation recipe: plain dataclasses, importable without torch
(the CLI builds its parser from their defaults)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from factorlab.errors import ConfigError


@dataclass
class TrainingConfig:
    """The fine-tuning recipe.

    Attributes:
        learning_rate: peak AdamW learning rate, reached after warm-up, then linear decay to 0.
        epochs: passes over the training set (fractions allowed); ignored when ``max_steps`` is set.
        max_steps: optimizer steps in total, overriding ``epochs``.
        batch_size: training examples per optimizer step, over all processes and accumulation
            steps (one process with accumulation 4 and batch 32 runs micro-batches of 8).
        gradient_accumulation_steps: micro-batches per optimizer step on each process, >= 1.
        eval_batch_size: examples per evaluation batch.
        max_seq_length: tokens per example after truncation; batches are padded dynamically.
        warmup_ratio: fraction of the steps spent warming the learning rate up from 0.
        weight_decay: AdamW weight decay, not applied to biases and LayerNorm weights.
        factor_weight_decay: AdamW weight decay of the factor matrices of factorized layers
            (``None``: ``weight_decay``). Decay on both factors of ``A B`` acts like a
            nuclear-norm penalty on the product (``||A||^2 + ||B||^2 >= 2 ||A B||_*``); with
            decoupled decay each factor shrinks by ``lr x decay`` per step, the product about
            twice as fast as a dense weight.
        max_grad_norm: gradient clipping threshold (L2 norm); 0 disables it.
        seed: seeds the head initialization, the data order and dropout.
        train_samples: train on a random subset of this many examples (``None``: all).
        train_fraction: train on a random subset of this fraction of the examples, in (0, 1]
            (``None``: all); excludes ``train_samples``. The subset is drawn with ``seed``.
        group_by_length: draw batches of examples of similar length (transformers'
            ``LengthGroupedSampler``: a seeded random order cut into mega-batches of 50 batches,
            each sorted by length), so dynamic padding pads less: the same examples per epoch
            in another order, fewer tokens per step. ``False``: a plain seeded shuffle.
    """

    learning_rate: float = 1e-4
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    eval_batch_size: int = 128
    max_seq_length: int = 128
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    factor_weight_decay: float | None = None
    max_grad_norm: float = 1.0
    seed: int = 42
    train_samples: int | None = None
    train_fraction: float | None = None
    group_by_length: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.batch_size >= 1 and self.eval_batch_size >= 1, "batch sizes must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (
                self.factor_weight_decay is None or self.factor_weight_decay >= 0,
                "factor_weight_decay must be >= 0",
            ),
            (self.max_seq_length >= 8, "max_seq_length must be >= 8"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.train_samples is None or self.train_samples >= 1, "train_samples must be >= 1"),
            (
                isinstance(self.seed, int) and 0 <= self.seed < 2**32,
                f"seed must be an integer in [0, 2**32), got {self.seed!r}",
            ),
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
class DistillationConfig:
    """Knowledge distillation from a teacher (METHODS.md §10; defaults from nn_pruning).

    Attributes:
        teacher: folder of the teacher: a factorlab checkpoint or a Hugging Face model with a
            sequence-classification head for the same task (same number of labels).
        alpha: weight of the distillation term, in [0, 1]; the task loss gets ``1 - alpha``.
        temperature: softmax temperature T > 0 of the KL term (the term is scaled by T^2 so its
            gradients keep their size as T changes); not used for regression.
        hidden_weight: weight of the per-block hidden-state MSE, >= 0 (0: off).
    """

    teacher: str
    alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.alpha <= 1, f"distill alpha must be in [0, 1], got {self.alpha}"),
            (self.temperature > 0, f"distill temperature must be > 0, got {self.temperature}"),
            (
                self.hidden_weight >= 0,
                f"distill hidden weight must be >= 0, got {self.hidden_weight}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
