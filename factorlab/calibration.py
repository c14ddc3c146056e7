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
forward pre-hook and dropped; modules that read the same input tensor (Q, K and V; LLaMA's gate
and up projections; cross-attention keys and values) share one Gram, found in the first batch;
a Gram-only pass stops as soon as every target has run (later layers and the LM head are
skipped); gradients are taken with ``torch.autograd.grad`` (never ``backward``),
so no ``.grad`` of the model is written and the model is returned unchanged (same mode, same
``requires_grad`` flags). The model runs in eval mode (no dropout), so statistics are deterministic.

Calibration data comes from a GLUE task's training split (labels: Fisher and Gram) or from a plain
text file, one example per line (no labels: Gram only). ``calibration_loader`` builds either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import warnings
from collections import Counter
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
        cross: ``(in_features, in_features)`` float64, ``X_ref^T X`` summed over the same
            tokens, where ``X_ref`` are the module's inputs in a reference model (the dense
            model, for error compensation: ``ActSVDConfig.compensate``) on the same batches
            (``None`` without a reference).
        input_sum / reference_sum: ``(in_features,)`` float64, the sums over the same tokens of
            the module's inputs (in ``model`` / in the reference), for mean-centred fits
            (``ActSVDConfig.bias_correction``); ``None`` when not collected.
    """

    fisher: torch.Tensor | None
    gram: torch.Tensor | None
    num_batches: int
    num_tokens: int
    cross: torch.Tensor | None = None
    input_sum: torch.Tensor | None = None
    reference_sum: torch.Tensor | None = None


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


def _decoder_modules(model: nn.Module, names: Sequence[str]) -> set[str]:
    """The names among ``names`` inside the decoder stack of an encoder-decoder model (Hugging
    Face names it ``decoder``): their inputs follow ``decoder_attention_mask``, except the
    cross-attention keys and values, which read the encoder's output."""
    if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return set()
    return {n for n in names if re.search(r"(^|\.)decoder\.", n)}


def _watch_encoder_output(model: nn.Module, state: dict[str, Any]) -> Any:
    """Record the encoder's output tensor in ``state["encoder_output"]`` on every forward of an
    encoder-decoder model; returns the hook handle (``None`` for a model without
    ``get_encoder``)."""
    get_encoder = getattr(model, "get_encoder", None)
    if not callable(get_encoder):
        return None

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        state["encoder_output"] = output[0]  # a tuple or a ModelOutput

    return get_encoder().register_forward_hook(hook)


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    targets: Sequence[str] | Sequence[Target] | None = None,
    fisher: bool = True,
    gram: bool = True,
    progress: bool = True,
    description: str = "calibration",
    reference: nn.Module | None = None,
) -> dict[str, ModuleStatistics]:
    """Stream ``batches`` through ``model`` and collect Fisher and/or Gram statistics per target.

    Args:
        model: a Hugging Face model (any ``nn.Module`` called as ``model(**batch)``). For
            ``fisher`` it must return a ``.loss``: a model with a task head and labelled batches.
        batches: an iterable of batches (dicts of tensors, e.g. a ``DataLoader`` from
            ``calibration_loader``); ``attention_mask``, when present, excludes padding tokens
            from the Gram matrices (in an encoder-decoder model the decoder's modules follow
            ``decoder_attention_mask`` instead, and its cross-attention keys and values, which
            read the encoder's output, the encoder's mask). Tensors are moved to the model's
            device.
        targets: module names (or ``Target`` objects from ``select_targets``); ``None``: the
            model's default targets.
        fisher / gram: which statistics to collect (at least one).
        progress: show a tqdm bar over the batches.
        reference: a model with the same module names (the dense original of a partly
            compressed ``model``), run on every batch first: each target's ``cross`` statistic is
            ``X_ref^T X``, its inputs there times its inputs in ``model``. Gram only.

    Returns:
        ``{module name: ModuleStatistics}`` in target order.

    Raises:
        ConfigError: nothing to collect, no batches, or ``fisher`` requested for batches without
            labels / a model that returns no loss; a ``reference`` with ``fisher`` or without
            ``gram``, or in which a target is missing or runs more than once per forward.
        TargetError: a target is not a linear module of ``model``.
    """
    if not (fisher or gram):
        raise ConfigError("collect_statistics: ask for fisher, gram or both")
    if reference is not None and (fisher or not gram):
        raise ConfigError(
            "collect_statistics: a reference model gives cross Grams only (gram=True, fisher=False)"
        )
    modules = _resolve_targets(model, targets)
    names = list(modules)
    reference_modules = dict(reference.named_modules()) if reference is not None else {}
    missing = [n for n in names if reference is not None and n not in reference_modules]
    if missing:
        raise ConfigError(f"the reference model has no module {missing[0]!r}")
    device = next(model.parameters()).device
    grams: dict[str, torch.Tensor] = {}  # allocated when a module first runs
    crosses: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    reference_sums: dict[str, torch.Tensor] = {}
    reference_inputs: dict[str, torch.Tensor] = {}  # this batch's, in the reference model
    shares: dict[str, str] = {}  # module -> the module whose input (and Gram) it shares
    fishers = {
        n: torch.zeros(tuple(dense_weight(m).shape), dtype=torch.float32, device=device)
        for n, m in modules.items()
        if fisher
    }
    tokens = dict.fromkeys(names, 0)
    state: dict[str, Any] = {"mask": None, "decoder_mask": None, "unmasked": set()}
    state |= {"previous": (None, None), "calls": Counter(), "first_batch": True, "once": False}
    in_decoder = _decoder_modules(model, names)

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            previous_name, previous_input = state["previous"]
            state["previous"] = (name, args[0])  # held only until the next target runs
            state["calls"][name] += 1
            same_input = args[0] is previous_input and previous_name != name
            if state["first_batch"] and same_input and name not in grams:
                shares[name] = shares.get(previous_name, previous_name)  # Q, K, V: one Gram
            if name in shares:
                if not same_input:
                    raise RuntimeError(
                        f"{name} shared the input of {shares[name]} in the first calibration "
                        "batch but not in this one; collect its statistics separately"
                    )
                return
            x = args[0].detach()
            encoder_output = state.get("encoder_output")
            reads_encoder = (
                encoder_output is not None
                and x.data_ptr() == encoder_output.data_ptr()
                and x.shape == encoder_output.shape
            )
            mask = state["decoder_mask" if name in in_decoder and not reads_encoder else "mask"]
            if mask is not None and tuple(x.shape[:-1]) != tuple(mask.shape):
                state["unmasked"].add(name)
            x = _token_rows(x, mask).double()
            if name not in grams:
                grams[name] = x.new_zeros(x.shape[-1], x.shape[-1])
                sums[name] = x.new_zeros(x.shape[-1])
            grams[name].addmm_(x.T, x)
            sums[name].add_(x.sum(0))
            tokens[name] += x.shape[0]
            if reference is not None:
                x_ref = reference_inputs.get(name)
                if x_ref is None or x_ref.shape[:-1] != args[0].shape[:-1]:
                    raise ConfigError(
                        f"{name} did not run on this batch's tokens in the reference model; "
                        "the reference must be the same architecture (a copy of the dense model)"
                    )
                if name not in crosses:
                    crosses[name] = x.new_zeros(x.shape[-1], x.shape[-1])
                    reference_sums[name] = x.new_zeros(x.shape[-1])
                x_ref = _token_rows(x_ref, mask).double()
                crosses[name].addmm_(x_ref.T, x)
                reference_sums[name].add_(x_ref.sum(0))

        return hook

    def keep_reference_input(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in reference_inputs:
                raise ConfigError(
                    f"{name} runs more than once per forward pass (a shared layer); its inputs "
                    "in the reference model are ambiguous, so it cannot be compensated"
                )
            reference_inputs[name] = args[0].detach()
            if len(reference_inputs) == len(names):
                raise _AllTargetsSeen  # the rest of the reference's forward is not needed

        return hook

    def stop_when_all_seen(module: nn.Module, args: Any, output: Any) -> None:
        # only where the first batch ran every target exactly once (not ALBERT's shared layer)
        if state["once"] and len(state["calls"]) == len(names):
            raise _AllTargetsSeen

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items() if gram]
    if not fisher:  # the rest of the forward pass changes no statistic
        handles += [m.register_forward_hook(stop_when_all_seen) for m in modules.values()]
    encoder_hook = _watch_encoder_output(model, state) if gram and in_decoder else None
    if encoder_hook is not None:
        handles.append(encoder_hook)
    if reference is not None:
        handles += [
            reference_modules[n].register_forward_pre_hook(keep_reference_input(n)) for n in names
        ]
        reference_training = reference.training
        reference.eval()
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
            for key, field in (
                ("mask", "attention_mask"),
                ("decoder_mask", "decoder_attention_mask"),
            ):
                mask = batch.get(field)
                state[key] = mask.bool() if mask is not None else None
            state["calls"] = Counter()
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
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                if reference is not None:
                    reference_inputs.clear()
                    with torch.no_grad(), contextlib.suppress(_AllTargetsSeen):
                        reference(**inputs)
                with torch.no_grad(), contextlib.suppress(_AllTargetsSeen):
                    model(**inputs)
                reference_inputs.clear()
            if state["first_batch"]:
                calls = state["calls"]
                state["once"] = len(calls) == len(names) and set(calls.values()) == {1}
            state["previous"] = (None, None)
            state["first_batch"] = False
            num_batches += 1
    finally:
        for h in handles:
            h.remove()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
        if reference is not None:
            reference.train(reference_training)
    if num_batches == 0:
        raise ConfigError("collect_statistics: the calibration data holds no batch")
    if state["unmasked"]:
        warnings.warn(
            f"the inputs of {sorted(state['unmasked'])[:3]} are not laid out like the attention "
            "mask; their Gram matrices include padding tokens",
            stacklevel=2,
        )
    for n in names:  # a module the data never reached (an unrouted expert): zero statistics
        if gram and n not in grams and n not in shares:
            size = _in_features(modules[n])
            grams[n] = torch.zeros(size, size, dtype=torch.float64, device=device)
    return {
        n: ModuleStatistics(
            fisher=fishers[n].div_(num_batches) if fisher else None,
            gram=grams[shares.get(n, n)] if gram else None,
            num_batches=num_batches,
            num_tokens=tokens[shares.get(n, n)] if gram else 0,
            cross=_cross_or_zeros(crosses, grams, shares.get(n, n)) if reference else None,
            input_sum=_sum_or_zeros(sums, grams, shares.get(n, n)) if gram else None,
            reference_sum=_sum_or_zeros(reference_sums, grams, shares.get(n, n))
            if reference
            else None,
        )
        for n in names
    }


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` (..., features) as rows of non-padding tokens: ``x[mask]`` when ``x`` is laid out
    like ``mask`` (batch, sequence), else every row."""
    if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def _cross_or_zeros(
    crosses: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], name: str
) -> torch.Tensor:
    if name in crosses:
        return crosses[name]
    return torch.zeros_like(grams[name])  # the data never reached it: zero, like its Gram


def _sum_or_zeros(
    sums: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], name: str
) -> torch.Tensor:
    if name in sums:
        return sums[name]
    return grams[name].new_zeros(grams[name].shape[0])


def as_own_reference(statistics: dict[str, ModuleStatistics]) -> dict[str, ModuleStatistics]:
    """``statistics`` of a model that is still its own (dense) reference, as if collected with
    ``reference=``: the module inputs are the reference's, so each ``cross`` is the ``gram`` and
    each ``reference_sum`` the ``input_sum`` (the same tensors, not copies). Saves error
    compensation the reference's forward pass and the cross Grams' memory wherever nothing has
    been compressed yet (its planning pass, its first block). Updates and returns ``statistics``.
    """
    for s in statistics.values():
        s.cross, s.reference_sum = s.gram, s.input_sum
    return statistics


def statistics_bytes(statistics: Mapping[str, ModuleStatistics]) -> int:
    """Bytes held by the statistics' tensors, each shared Gram counted once."""
    tensors = {
        id(t): t
        for s in statistics.values()
        for t in (s.fisher, s.gram, s.cross, s.input_sum, s.reference_sum)
        if t is not None
    }
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _AllTargetsSeen(Exception):
    """Raised from a hook to end a Gram-only forward pass once every target has run."""


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
    allocation: str = "uniform",
) -> CalibrationConfig | None:
    """The calibration a run needs, checked before any work (``prepare_run`` calls this).

    A method with ``needs_calibration``, or any method under ``allocation="sensitivity"`` (which
    measures the output on calibration examples), gets ``calibration``, or, when that names no
    data, the run's own ``task`` (its training split). Other runs must not be given calibration
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
    sensitivity = method is not None and allocation == "sensitivity"
    needs = method is not None and (get_method(method).needs_calibration or sensitivity)
    if not needs:
        if given:
            raise ConfigError(
                f"method {method or 'dense'!r} takes no calibration data; drop "
                "--calibration-task/--calibration-file (fwsvd and act-svd use them, and "
                "--allocation sensitivity)"
            )
        return None
    statistics = get_method(method).statistics  # type: ignore[arg-type]
    resolved = calibration or CalibrationConfig()
    if not given:
        if task is None:
            what = "--allocation sensitivity" if sensitivity else f"method {method!r}"
            raise ConfigError(
                f"{what} needs calibration data: pass --calibration-task (a GLUE "
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


def probe_batches(
    tokenizer: Any,
    calibration: CalibrationConfig,
    data_dir: str | os.PathLike | None,
    max_seq_length: int,
    samples: int,
) -> list[dict[str, torch.Tensor]]:
    """The batches sensitivity allocation measures the output on: a seeded subset of
    ``samples`` examples of ``calibration``'s data (``calibration_loader``; labels, where the
    data has them, are left in and ignored by ``factorlab.sensitivity.OutputProbe``)."""
    loader = calibration_loader(
        tokenizer,
        task=calibration.task,
        file=calibration.file,
        data_dir=data_dir,
        samples=samples,
        max_seq_length=max_seq_length,
        batch_size=calibration.batch_size,
        seed=calibration.seed,
    )
    return list(loader)


def run_calibration(
    model: nn.Module,
    tokenizer: Any,
    factorization: Any,
    calibration: CalibrationConfig,
    data_dir: str | os.PathLike | None,
    max_seq_length: int,
    progress: bool = True,
    modules: Sequence[str] | None = None,
    reference: nn.Module | None = None,
) -> dict[str, ModuleStatistics]:
    """Collect the statistics ``factorization``'s method needs on ``calibration``'s data, for the
    modules it targets, or only ``modules`` (one stage of a staged run): ``collect_statistics``
    on ``calibration_loader``; ``reference``: the dense model, for the cross statistics of
    error compensation."""
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
        reference=reference,
    )
