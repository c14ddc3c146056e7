"""Calibration statistics for data-aware factorization, streamed with forward/backward hooks.

Two statistics per targeted linear module (METHODS.md §5):

- **Fisher information** of its weight [H22]: ``I = mean over batches of (dL/dW)^2``, shape
  ``(out_features, in_features)``, where ``L`` is the model's task loss on one batch (the mean over
  the batch's examples, as ``model(**batch).loss`` returns it). It is the *empirical* Fisher: the
  gradients use the data's labels, so it needs labelled data and a model with a task head.
- **Gram matrix** of its inputs: ``G = X^T X`` summed over every non-padding token of the
  calibration data, shape ``(in_features, in_features)``, accumulated in float64. This is what
  activation-aware SVD (DRONE, SVD-LLM) whitens with.

Nothing but the running sums is kept: each batch's activations are folded into ``G`` inside a
forward pre-hook and dropped; gradients are taken with ``torch.autograd.grad`` (never ``backward``),
so no ``.grad`` of the model is written and the model is returned unchanged (same mode, same
``requires_grad`` flags). The model runs in eval mode (no dropout), so statistics are deterministic.

Calibration data comes from a GLUE task's training split (labels: Fisher and Gram) or from a plain
text file, one example per line (no labels: Gram only). ``calibration_loader`` builds either.
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from factorlab.errors import ConfigError, DataError, TargetError
from factorlab.targets import SUPPORTED_TYPES, Target, dense_weight, select_targets

STATISTICS = ("fisher", "gram")
"""Names of the statistics ``collect_statistics`` can gather (fields of ``ModuleStatistics``)."""


@dataclass
class CalibrationConfig:
    """Which data a run calibrates on (see ``calibration_loader``).

    Attributes:
        task: GLUE task whose training split is used (labelled: Fisher and Gram).
        file: UTF-8 text file, one example per line (no labels: Gram only).
        samples: seeded random subset of this many examples (``None``: all).
        batch_size: examples per batch.
        seed: seeds the subset.
    """

    task: str | None = None
    file: str | None = None
    samples: int | None = 512
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"calibration samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ModuleStatistics:
    """Calibration statistics of one linear module.

    Attributes:
        fisher: ``(out_features, in_features)`` float32, the mean over batches of the squared
            gradient of the batch loss w.r.t. the weight (``None`` when not collected).
        gram: ``(in_features, in_features)`` float64, ``X^T X`` summed over all non-padding input
            tokens (``None`` when not collected). Not normalized: divide by ``num_tokens`` for the
            second moment.
        num_batches: batches seen.
        num_tokens: input rows (tokens) folded into ``gram`` (0 when it is not collected);
            padding tokens are excluded when the module's input is laid out as
            ``(batch, sequence, features)`` like the attention mask (else they are included and a
            warning says so).
    """

    fisher: torch.Tensor | None
    gram: torch.Tensor | None
    num_batches: int
    num_tokens: int


def _resolve_targets(
    model: nn.Module, targets: Sequence[str] | Sequence[Target] | None
) -> dict[str, nn.Module]:
    if targets is None:
        return {t.name: t.module for t in select_targets(model)}
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for t in targets:
        name = t.name if isinstance(t, Target) else t
        module = modules.get(name)
        if module is None:
            raise TargetError(f"{name!r} is not a module of this model")
        if not isinstance(module, SUPPORTED_TYPES):
            raise TargetError(
                f"{name!r} is a {type(module).__name__}; statistics are collected for nn.Linear "
                "and transformers' Conv1D only"
            )
        out[name] = module
    if not out:
        raise TargetError("no target module given")
    return out


def _in_features(module: nn.Module) -> int:
    w = module.weight
    return w.shape[0] if isinstance(module, Conv1D) else w.shape[1]


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    targets: Sequence[str] | Sequence[Target] | None = None,
    fisher: bool = True,
    gram: bool = True,
    progress: bool = True,
    description: str = "calibration",
) -> dict[str, ModuleStatistics]:
    """Stream ``batches`` through ``model`` and collect Fisher and/or Gram statistics per target.

    Args:
        model: a Hugging Face model (any ``nn.Module`` called as ``model(**batch)``). For
            ``fisher`` it must return a ``.loss``: a model with a task head and labelled batches.
        batches: an iterable of batches (dicts of tensors, e.g. a ``DataLoader`` from
            ``calibration_loader``); ``attention_mask``, when present, excludes padding tokens
            from the Gram matrices. Tensors are moved to the model's device.
        targets: module names (or ``Target`` objects from ``select_targets``); ``None``: the
            model's default targets.
        fisher / gram: which statistics to collect (at least one).
        progress: show a tqdm bar over the batches.

    Returns:
        ``{module name: ModuleStatistics}`` in target order.

    Raises:
        ConfigError: nothing to collect, no batches, or ``fisher`` requested for batches without
            labels / a model that returns no loss.
        TargetError: a target is not a linear module of ``model``.
    """
    if not (fisher or gram):
        raise ConfigError("collect_statistics: ask for fisher, gram or both")
    modules = _resolve_targets(model, targets)
    names = list(modules)
    device = next(model.parameters()).device
    grams = {
        n: torch.zeros(_in_features(m), _in_features(m), dtype=torch.float64, device=device)
        for n, m in modules.items()
        if gram
    }
    fishers = {
        n: torch.zeros(tuple(dense_weight(m).shape), dtype=torch.float32, device=device)
        for n, m in modules.items()
        if fisher
    }
    tokens = dict.fromkeys(names, 0)
    state: dict[str, Any] = {"mask": None, "unmasked": set()}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            mask = state["mask"]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask]
            else:
                if mask is not None:
                    state["unmasked"].add(name)
                x = x.reshape(-1, x.shape[-1])
            x = x.double()
            grams[name].addmm_(x.T, x)
            tokens[name] += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items() if gram]
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    was_training = model.training
    model.eval()
    num_batches = 0
    try:
        if fisher:
            for w in weights:
                w.requires_grad_(True)
        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        for batch in tqdm(batches, total=total, desc=description, disable=not progress):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            mask = batch.get("attention_mask")
            state["mask"] = mask.bool() if mask is not None else None
            if fisher:
                if "labels" not in batch:
                    raise ConfigError(
                        "Fisher statistics need labelled batches (the task loss); these batches "
                        "have no 'labels'. Use a GLUE task for calibration, or collect the Gram "
                        "statistics only (gram=True, fisher=False)."
                    )
                with torch.enable_grad():
                    loss = getattr(model(**batch), "loss", None)
                    if loss is None:
                        raise ConfigError(
                            f"{type(model).__name__} returned no loss for a labelled batch; "
                            "Fisher statistics need a model with a task head "
                            "(e.g. AutoModelForSequenceClassification)."
                        )
                    grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for name, g in zip(names, grads, strict=True):
                    if g is None:
                        continue
                    if isinstance(modules[name], Conv1D):
                        g = g.T
                    fishers[name].add_(g.detach().float().square())
            else:
                with torch.no_grad():
                    model(**{k: v for k, v in batch.items() if k != "labels"})
            num_batches += 1
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    if num_batches == 0:
        raise ConfigError("collect_statistics: the calibration data holds no batch")
    if state["unmasked"]:
        warnings.warn(
            f"the inputs of {sorted(state['unmasked'])[:3]} are not laid out like the attention "
            "mask; their Gram matrices include padding tokens",
            stacklevel=2,
        )
    return {
        n: ModuleStatistics(
            fisher=fishers[n].div_(num_batches) if fisher else None,
            gram=grams[n] if gram else None,
            num_batches=num_batches,
            num_tokens=tokens[n],
        )
        for n in names
    }


class _TextDataset(torch.utils.data.Dataset):
    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def read_text_file(path: str | os.PathLike, samples: int | None, seed: int = 0) -> list[str]:
    """The non-empty lines of a UTF-8 text file, or a seeded random subset of ``samples`` of them
    (kept in file order).

    Raises:
        DataError: the file is missing or holds no non-empty line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"calibration file {path} holds no non-empty line")
    if samples is not None and samples < len(lines):
        keep = sorted(random.Random(seed).sample(range(len(lines)), samples))
        lines = [lines[i] for i in keep]
    return lines


def calibration_loader(
    tokenizer: Any,
    task: str | None = None,
    file: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    samples: int | None = 512,
    max_seq_length: int = 128,
    batch_size: int = 32,
    seed: int = 0,
) -> DataLoader:
    """Batches of calibration data: a GLUE task's training split (labelled) or a text file.

    Args:
        tokenizer: the model's tokenizer.
        task: GLUE task name; its ``train`` split is read from ``data_dir`` (as ``load_split``).
        file: a UTF-8 text file, one example per line (no labels: Gram statistics only).
        samples: a seeded random subset of this many examples (``None``: all).
        max_seq_length: tokens per example after truncation; batches are padded dynamically.
        batch_size: examples per batch. The Fisher average is over batches, so its scale (not
            its shape) depends on this.
        seed: seeds the subset.

    Raises:
        ConfigError: neither or both of ``task`` and ``file``, or ``samples`` < 1.
        DataError: the data is missing.
    """
    from transformers import DataCollatorWithPadding

    from factorlab.tasks import load_split
    from factorlab.training import EncodedSplit, make_loader

    if (task is None) == (file is None):
        raise ConfigError("calibration data: give either a GLUE task or a text file, not both")
    if samples is not None and samples < 1:
        raise ConfigError(f"calibration samples must be >= 1, got {samples}")
    if task is not None:
        split = load_split(task, "train", data_dir)
        if samples is not None and samples < len(split):
            split = split.subset(samples, seed=seed)
        encoded = EncodedSplit(split, tokenizer, max_seq_length)
        return make_loader(encoded, tokenizer, batch_size, shuffle=False)
    lines = read_text_file(file, samples, seed)  # type: ignore[arg-type]
    enc = tokenizer(lines, truncation=True, max_length=max_seq_length)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(lines))]
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(_TextDataset(features), batch_size=batch_size, collate_fn=collate)


def check_calibration_inputs(
    task: str | None,
    file: str | os.PathLike | None,
    data_dir: str | os.PathLike | None,
    statistics: Sequence[str],
    samples: int | None = None,
) -> None:
    """Cheap pre-flight check of calibration inputs (nothing is read but file existence).

    Raises:
        ConfigError: neither or both sources, an unknown task, ``samples`` < 1, or Fisher
            statistics asked of a text file (which has no labels).
        DataError: the task's training split or the file is missing.
    """
    from factorlab.tasks import check_task_available, get_task

    unknown = sorted(set(statistics) - set(STATISTICS))
    if unknown:
        raise ConfigError(f"unknown calibration statistics {unknown}; known: {STATISTICS}")
    if (task is None) == (file is None):
        raise ConfigError(
            "calibration needs data: give a GLUE task (--calibration-task, labelled) or a text "
            "file (--calibration-file, one example per line), not both"
        )
    if samples is not None and samples < 1:
        raise ConfigError(f"--calibration-samples must be >= 1, got {samples}")
    if task is not None:
        check_task_available(get_task(task), data_dir, splits=("train",))
        return
    if not Path(file).is_file():  # type: ignore[arg-type]
        raise DataError(f"calibration file {file} does not exist")
    if "fisher" in statistics:
        raise ConfigError(
            f"a text file ({file}) has no labels, so it gives only Gram statistics "
            "(act-svd); Fisher statistics (fwsvd) need the task loss: calibrate on a GLUE task "
            "with --calibration-task."
        )


def resolve_calibration(
    calibration: CalibrationConfig | None,
    method: str | None,
    task: str | None,
    data_dir: str | os.PathLike | None,
    model_path: str,
) -> CalibrationConfig | None:
    """The calibration a run needs, checked before any work (``prepare_run`` calls this).

    A method with ``needs_calibration`` gets ``calibration``, or, when that names no data, the
    run's own ``task`` (its training split). A method without it must not be given calibration
    data (it would be silently unused).

    Raises:
        ConfigError: calibration for a method that takes none; a calibration method without data;
            Fisher statistics from a text file, or for a model without a task head (no ``task``
            and not a factorlab checkpoint, which keeps its head).
        DataError: the calibration data is missing.
    """
    from factorlab.checkpoint import is_checkpoint
    from factorlab.methods import get_method

    given = calibration is not None and (calibration.task or calibration.file)
    needs = method is not None and get_method(method).needs_calibration
    if not needs:
        if given:
            raise ConfigError(
                f"method {method or 'dense'!r} takes no calibration data; drop "
                "--calibration-task/--calibration-file (fwsvd and act-svd use them)"
            )
        return None
    statistics = get_method(method).statistics  # type: ignore[arg-type]
    resolved = calibration or CalibrationConfig()
    if not given:
        if task is None:
            raise ConfigError(
                f"method {method!r} needs calibration data: pass --calibration-task (a GLUE "
                "task, labelled) or --calibration-file (text, one example per line; Gram "
                "statistics only), or --task to calibrate on the task's training split"
            )
        resolved = dataclasses.replace(resolved, task=task)
    check_calibration_inputs(
        resolved.task, resolved.file, data_dir, statistics, samples=resolved.samples
    )
    if "fisher" in statistics and task is None and not is_checkpoint(model_path):
        raise ConfigError(
            f"{method} needs Fisher statistics, i.e. the task loss of a model with its task head; "
            f"{model_path} is loaded without one when no --task is given. Pass --task (the head "
            "is then initialized for it; better: a --model fine-tuned on the task, e.g. a "
            "`factorlab finetune` output)"
        )
    return resolved


def run_calibration(
    model: nn.Module,
    tokenizer: Any,
    factorization: Any,
    calibration: CalibrationConfig,
    data_dir: str | os.PathLike | None,
    max_seq_length: int,
    progress: bool = True,
    modules: Sequence[str] | None = None,
) -> dict[str, ModuleStatistics]:
    """Collect the statistics ``factorization``'s method needs on ``calibration``'s data, for the
    modules it targets, or only ``modules`` (one stage of a staged run): ``collect_statistics``
    on ``calibration_loader``."""
    from factorlab.methods import get_method

    statistics = get_method(factorization).statistics
    loader = calibration_loader(
        tokenizer,
        task=calibration.task,
        file=calibration.file,
        data_dir=data_dir,
        samples=calibration.samples,
        max_seq_length=max_seq_length,
        batch_size=calibration.batch_size,
        seed=calibration.seed,
    )
    targets: Sequence[str] | Sequence[Target] = (
        list(modules)
        if modules is not None
        else select_targets(model, factorization.target_modules, factorization.exclude_modules)
    )
    return collect_statistics(
        model,
        loader,
        targets,
        fisher="fisher" in statistics,
        gram="gram" in statistics,
        progress=progress,
    )
