"""Save and load factorized models: Hugging Face config + tokenizer, a JSON spec, safetensors.

Layout of a checkpoint directory::

    config.json, tokenizer files     Hugging Face, unchanged
    factorlab.json                   {"schema_version", "factorlab_version", "architecture",
                                      "method", "modules": {name: layer spec},
                                      ["shared_modules": {name: module spec}]}
    model.safetensors                dense models (no factorized module): a plain HF checkpoint
    factorized.safetensors           factorized models

A factorized model's weights are deliberately NOT called ``model.safetensors``: loading one with
``AutoModel.from_pretrained`` would otherwise silently build a dense model with random weights in
the factorized places. Loading rebuilds the factorized modules from the spec (no projection is
re-run, following NVIDIA ModelOpt's save/restore) and then loads every tensor strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from factorlab.errors import CheckpointError, DataError
from factorlab.io import atomic_directory, write_json_atomic
from factorlab.layers.base import FactorizedLinear, build_shared_module
from factorlab.methods.apply import factorized_modules

SCHEMA_VERSION = 1
SPEC_FILE = "factorlab.json"
DENSE_WEIGHTS = "model.safetensors"
FACTORIZED_WEIGHTS = "factorized.safetensors"


def _version() -> str:
    from factorlab import __version__

    return __version__


def build_spec(model: nn.Module, method: dict[str, Any] | None = None) -> dict[str, Any]:
    """The factorization spec of ``model``: its architecture and every factorized layer's spec,
    plus ``"shared_modules"`` (each module several layers share, e.g. a decoder) when there are
    any.

    Raises:
        CheckpointError: two different module objects claim the same shared name.
    """
    config = getattr(model, "config", None)
    layers = factorized_modules(model)
    spec: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "factorlab_version": _version(),
        "architecture": type(model).__name__,
        "method": method,
        "modules": {name: layer.spec() for name, layer in layers.items()},
        "model_type": getattr(config, "model_type", None),
    }
    shared: dict[str, nn.Module] = {}
    for name, layer in layers.items():
        for key, module in layer.shared_modules().items():
            if shared.setdefault(key, module) is not module:
                raise CheckpointError(
                    f"{name} uses a shared module named {key!r} that is not the module other "
                    "layers use under that name; give distinct modules distinct names"
                )
    if shared:
        spec["shared_modules"] = {key: module.spec() for key, module in shared.items()}
    return spec


def save(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    tokenizer: Any = None,
    method: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (dense or factorized) to ``directory`` atomically.

    Args:
        model: a Hugging Face ``PreTrainedModel``, possibly modified by ``factorize_``.
        directory: created or replaced as a whole; nothing is visible there until all is written.
        tokenizer: saved beside the model when given.
        method: the factorization config (``config.to_dict()``) to record in the spec.
        extra_files: ``{file name: JSON-serializable}`` written into the same directory
            (``results.json``); they land in the same atomic rename.

    Returns:
        The directory path.
    """
    spec = build_spec(model, method)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    with atomic_directory(directory) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weights = FACTORIZED_WEIGHTS if spec["modules"] else DENSE_WEIGHTS
        save_model(model, str(tmp / weights), metadata={"format": "pt"})
        write_json_atomic(tmp / SPEC_FILE, spec)
        for name, data in (extra_files or {}).items():
            write_json_atomic(tmp / name, data)
    return Path(directory)


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    """The spec of a factorlab checkpoint (``factorlab.json``), validated.

    Raises:
        DataError: the directory or its spec file is missing.
        CheckpointError: unreadable JSON or an unknown schema version.
    """
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise DataError(
            f"{directory} is not a factorlab checkpoint (no {SPEC_FILE}). Save one with "
            "factorlab.save or `factorlab compress`, or pass a Hugging Face model to --model."
        )
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); the checkpoint is damaged"
        ) from exc
    if spec.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has schema_version {spec.get('schema_version')!r}; this factorlab reads "
            f"version {SCHEMA_VERSION}. Use the factorlab version that wrote it "
            f"({spec.get('factorlab_version')})."
        )
    return spec


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a factorlab spec file."""
    return (Path(path) / SPEC_FILE).is_file()


def load(directory: str | os.PathLike, device: str | torch.device | None = None) -> PreTrainedModel:
    """Load a checkpoint written by ``save``: the same modules, parameters and outputs.

    An empty model of the saved architecture is built from ``config.json``, each factorized module
    is rebuilt from its spec (``FactorizedLinear.from_spec``; no projection runs), and every tensor
    is loaded strictly. A shared module (``"shared_modules"``) is built once and given to every
    layer naming it, so sharing survives the round trip. The model is returned in eval mode.

    Raises:
        DataError: missing directory, spec or weights file.
        CheckpointError: the spec names a module the architecture lacks, or the tensors do not
            match the spec (missing, unexpected or mis-shaped tensors).
    """
    directory = Path(directory)
    spec = read_spec(directory)
    config = AutoConfig.from_pretrained(directory)
    model_cls = getattr(transformers, spec["architecture"], None)
    if model_cls is None:
        raise CheckpointError(
            f"architecture {spec['architecture']!r} is not in this transformers version"
        )
    model = model_cls(config).to(device or "cpu")

    shared = {
        key: build_shared_module(module_spec).to(device=device or "cpu")
        for key, module_spec in spec.get("shared_modules", {}).items()
    }
    for name, layer_spec in spec["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(
                f"the spec factorizes {name!r}, which {spec['architecture']} has no module of"
            ) from exc
        layer = FactorizedLinear.from_spec(layer_spec, shared)
        model.set_submodule(name, layer.to(device=device or "cpu"))

    weights = directory / (FACTORIZED_WEIGHTS if spec["modules"] else DENSE_WEIGHTS)
    if not weights.is_file():
        raise DataError(f"{weights} is missing; the checkpoint is incomplete")
    try:
        missing, unexpected = load_model(
            model, str(weights), strict=False, device=str(device or "cpu")
        )
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its spec: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its spec {directory / SPEC_FILE}: missing tensors "
            f"{sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.eval()
    return model


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Replace every factorized layer by the dense module it stands for, in place.

    Each layer becomes ``nn.Linear`` (or GPT-2 ``Conv1D`` if that is what it replaced) with weight
    ``to_dense()`` and the same bias, so the model can be saved as a plain Hugging Face model.
    Returns ``model``.
    """
    for name, layer in factorized_modules(model).items():
        weight = layer.to_dense()
        has_bias = layer.bias is not None
        if layer.source == "conv1d":
            dense: nn.Module = Conv1D(layer.out_features, layer.in_features)
            dense.weight.data = weight.t().contiguous()
            if has_bias:
                dense.bias.data = layer.bias.detach().clone()
            else:
                dense.bias.data.zero_()
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=has_bias)
            dense.weight.data = weight.contiguous()
            if has_bias:
                dense.bias.data = layer.bias.detach().clone()
        dense.to(device=weight.device, dtype=weight.dtype).train(layer.training)
        model.set_submodule(name, dense)
    return model
