"""The training loss as a component: the task loss, plus optional distillation from a teacher.

Task loss: cross-entropy for classification, MSE on the score for regression (STS-B), the losses
Hugging Face's sequence classifiers compute. Distillation (METHODS.md §10, after Hinton et al.
2015, as used by movement pruning, CoFi and LoSparse)::

    loss = (1 - alpha) * task + alpha * KD + hidden_weight * HID
    KD   = KL(softmax(z_t / T) || softmax(z_s / T)) * T^2      (classification)
    KD   = MSE(z_s, z_t)                                       (regression)
    HID  = mean over blocks l of MSE(h_s[l], h_t[l])            (optional)

with ``z`` the logits, ``h[l]`` the hidden states after block ``l`` (student and teacher must have
the same depth and width for HID). The teacher - usually the dense model fine-tuned on the task,
e.g. a ``factorlab finetune`` output - runs in eval mode without gradients on the same batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from factorlab.errors import ConfigError
from factorlab.training.config import DistillationConfig


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy of ``logits`` (batch, classes) against class ids ``labels`` (batch,), or
    for ``regression`` the MSE of ``logits`` (batch, 1) against scores ``labels`` (batch,)."""
    if regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, regression: bool
) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T)) * T^2`` averaged over the batch, or for
    regression the MSE between the scores. Both logits have shape (batch, classes)."""
    if regression:
        return F.mse_loss(student.float(), teacher.float())
    t = temperature
    return (
        F.kl_div(
            F.log_softmax(student.float() / t, dim=-1),
            F.log_softmax(teacher.float() / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )


def hidden_loss(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Mean over blocks of the MSE between hidden states after each block (the embedding output,
    entry 0 of Hugging Face's ``hidden_states``, is left out)."""
    pairs = list(zip(student[1:], teacher[1:], strict=True))
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean()


class Objective:
    """Computes a micro-batch's loss: the task loss, with distillation when a teacher is given.

    Args:
        regression: the task is a regression (one score, MSE) instead of classification.
        distillation: the distillation recipe, or ``None`` for the task loss alone.
        teacher: the loaded teacher model (needed with ``distillation``); it is put in eval mode
            and its parameters are frozen here.

    Raises:
        ConfigError: ``distillation`` without a teacher, or a teacher without one.
    """

    def __init__(
        self,
        regression: bool,
        distillation: DistillationConfig | None = None,
        teacher: nn.Module | None = None,
    ):
        if (distillation is None) != (teacher is None):
            raise ConfigError("distillation needs both its config and a loaded teacher model")
        self.regression = regression
        self.distillation = distillation
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    @property
    def needs_hidden_states(self) -> bool:
        return self.distillation is not None and self.distillation.hidden_weight > 0

    def to(self, device: torch.device) -> Objective:
        """Move the teacher to ``device`` (the training batches' device)."""
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    def forward(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Any, dict[str, torch.Tensor]]:
        """``(loss, student outputs, {component: detached value})`` on ``batch`` (which holds
        ``labels``). Components: ``task``, and with distillation ``kd`` (and ``hidden``)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = self.needs_hidden_states
        outputs = model(**inputs, output_hidden_states=hidden) if hidden else model(**inputs)
        task = task_loss(outputs.logits, batch["labels"], self.regression)
        parts = {"task": task.detach()}
        if self.distillation is None:
            return task, outputs, parts
        d = self.distillation
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, output_hidden_states=hidden)  # type: ignore[misc]
        kd = kd_loss(outputs.logits, teacher_out.logits, d.temperature, self.regression)
        loss = (1 - d.alpha) * task + d.alpha * kd
        parts["kd"] = kd.detach()
        if hidden:
            h = hidden_loss(outputs.hidden_states, teacher_out.hidden_states)
            loss = loss + d.hidden_weight * h
            parts["hidden"] = h.detach()
        return loss, outputs, parts

    __call__ = forward


def check_teacher(
    teacher_config: Any, student_config: Any, distillation: DistillationConfig, num_labels: int
) -> None:
    """Refuse a teacher that cannot teach this student, from the two model configs alone.

    Raises:
        ConfigError: the teacher has no sequence-classification head, another number of labels,
            another vocabulary, or (with ``hidden_weight > 0``) another depth or width.
    """
    where = f"teacher {distillation.teacher}"
    architectures = getattr(teacher_config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(
            f"{where} has no sequence-classification head (architectures {architectures}); "
            "give a model fine-tuned on the task, e.g. the output of `factorlab finetune --task T`"
        )
    if teacher_config.num_labels != num_labels:
        raise ConfigError(
            f"{where} has {teacher_config.num_labels} labels but the task has {num_labels}; "
            "give a teacher fine-tuned on this task"
        )
    if getattr(teacher_config, "vocab_size", None) != getattr(student_config, "vocab_size", None):
        raise ConfigError(
            f"{where} has vocabulary size {getattr(teacher_config, 'vocab_size', None)}, the "
            f"student {getattr(student_config, 'vocab_size', None)}: they must share a tokenizer"
        )
    if distillation.hidden_weight > 0:
        shape = ("num_hidden_layers", "hidden_size")
        t = tuple(getattr(teacher_config, k, None) for k in shape)
        s = tuple(getattr(student_config, k, None) for k in shape)
        if t != s:
            raise ConfigError(
                f"hidden-state distillation needs a teacher of the student's depth and width "
                f"(layers, hidden): teacher {t}, student {s}; set --distill-hidden 0"
            )
