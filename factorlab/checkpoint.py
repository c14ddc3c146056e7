"""Save and load factorized models: Hugging Face config + tokenizer, a JSON spec, safetensors.

Layout of a checkpoint directory::

    config.json, tokenizer files     Hugging Face, unchanged
    factorlab.json                   {"schema_version", "factorlab_version", "architecture",
                                      "model_type", "dtype", "method",
                                      "modules": {name: layer spec},
                                      ["shared_modules": {name: module spec}]}
    model.safetensors                dense models (no factorized module): a plain HF checkpoint
    factorized.safetensors           factorized models

A factorized model's weights are deliberately NOT called ``model.safetensors``: loading one with
``AutoModel.from_pretrained`` would otherwise silently build a dense model with random weights in
the factorized places. Loading builds the model on the meta device, rebuilds the factorized
modules from the spec (no projection is re-run, following NVIDIA ModelOpt's save/restore) and
then assigns every saved tensor strictly, in its saved dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from factorlab.errors import CheckpointError, DataError
from factorlab.io import atomic_directory, fix_mode, write_json_atomic
from factorlab.layers.base import FactorizedLinear, build_shared_module
from factorlab.methods.apply import factorized_modules

SCHEMA_VERSION = 1
SPEC_FILE = "factorlab.json"
DENSE_WEIGHTS = "model.safetensors"
FACTORIZED_WEIGHTS = "factorized.safetensors"


def _version() -> str:
    from factorlab import __version__

    return __version__


def _dtype_name(model: nn.Module) -> str | None:
    """``"float32"``, ``"bfloat16"``...: the dtype of the model's floating-point parameters
    (``None`` when it has none), as the spec records it."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


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
        "dtype": _dtype_name(model),
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
        fix_mode(tmp / weights)  # safetensors writes it 0600; the rest of the run is 0644
        write_json_atomic(tmp / SPEC_FILE, spec)
        for name, data in (extra_files or {}).items():
            write_json_atomic(tmp / name, data)
    return Path(directory)


def model_classes() -> frozenset[str]:
    """The Hugging Face model classes a checkpoint may name: every class in the Auto* mappings
    of the installed transformers (``BertForSequenceClassification``, ``LlamaForCausalLM``...).
    A checkpoint's ``architecture`` is looked up in this allowlist, never with ``getattr`` on an
    arbitrary string."""
    from transformers.models.auto import modeling_auto

    return mapping_classes(k for k in dir(modeling_auto) if k.endswith("_MAPPING_NAMES"))


def mapping_classes(mappings: Any) -> frozenset[str]:
    """The class names of the given ``transformers.models.auto.modeling_auto`` mappings (by
    name, e.g. ``"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"``); a value may be one name or several."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for mapping in mappings:
        for value in getattr(modeling_auto, mapping).values():
            names.update([value] if isinstance(value, str) else value)
    return frozenset(names)


def _spec_problem(spec: Any) -> str | None:
    """What is wrong with a parsed spec's fields (types, known names), or ``None``."""
    from factorlab.layers.base import LAYER_TYPES, SHARED_MODULE_TYPES
    from factorlab.methods import METHODS

    if not isinstance(spec, dict):
        return f"the spec is a {type(spec).__name__}, not a JSON object"
    required = {
        "schema_version": int,
        "factorlab_version": str,
        "architecture": str,
        "modules": dict,
    }
    for key, kind in required.items():
        if key not in spec:
            return f"the field {key!r} is missing"
        if not isinstance(spec[key], kind) or isinstance(spec[key], bool):
            return f"{key!r} must be a {kind.__name__}, got {spec[key]!r}"
    if spec["architecture"] not in model_classes():
        return (
            f"architecture {spec['architecture']!r} is not a model class of transformers "
            f"{transformers.__version__}"
        )
    if spec.get("model_type") is not None and not isinstance(spec["model_type"], str):
        return f"'model_type' must be a string, got {spec['model_type']!r}"
    if spec.get("dtype") is not None and not isinstance(
        getattr(torch, str(spec["dtype"]), None), torch.dtype
    ):
        return (
            f"'dtype' must be null or a torch dtype name such as 'bfloat16', got {spec['dtype']!r}"
        )
    method = spec.get("method")
    if method is not None and not (
        isinstance(method, dict) and isinstance(method.get("method"), str)
    ):
        return f"'method' must be null or an object with a 'method' name, got {method!r}"
    if method is not None and method["method"] not in METHODS:
        return (
            f"method {method['method']!r} is unknown to this factorlab (it knows "
            f"{', '.join(sorted(METHODS))})"
        )
    shared = spec.get("shared_modules", {})
    if not isinstance(shared, dict) or any(
        not isinstance(v, dict) or v.get("kind") not in SHARED_MODULE_TYPES for v in shared.values()
    ):
        return f"'shared_modules' must map names to specs of {sorted(SHARED_MODULE_TYPES)}"
    for name, layer in spec["modules"].items():
        if not isinstance(layer, dict):
            return f"module {name!r}: its spec must be an object, got {layer!r}"
        if layer.get("kind") not in LAYER_TYPES:
            return f"module {name!r}: unknown layer kind {layer.get('kind')!r}"
        for key in ("in_features", "out_features"):
            value = layer.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"module {name!r}: {key!r} must be an int >= 1, got {value!r}"
        if not isinstance(layer.get("bias"), bool):
            return f"module {name!r}: 'bias' must be true or false, got {layer.get('bias')!r}"
        if layer.get("source", "linear") not in ("linear", "conv1d"):
            return f"module {name!r}: 'source' must be 'linear' or 'conv1d'"
    return None


def read_spec(directory: str | os.PathLike) -> dict[str, Any]:
    """The spec of a factorlab checkpoint (``factorlab.json``), validated field by field.

    Raises:
        DataError: the directory or its spec file is missing.
        CheckpointError: unreadable JSON, an unknown schema version, or a field that is missing,
            of the wrong type, or names something this version does not know (an architecture
            outside ``model_classes()``, an unknown method or layer kind).
    """
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise DataError(
            f"{directory} is not a factorlab checkpoint (no {SPEC_FILE}). Save one with "
            "factorlab.save or `factorlab compress`, or pass a Hugging Face model to --model."
        )
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); the checkpoint is damaged"
        ) from exc
    if isinstance(spec, dict) and spec.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has schema_version {spec.get('schema_version')!r}; this factorlab reads "
            f"version {SCHEMA_VERSION}. Use the factorlab version that wrote it "
            f"({spec.get('factorlab_version')})."
        )
    problem = _spec_problem(spec)
    if problem is not None:
        raise CheckpointError(
            f"{path} is not a valid factorlab spec: {problem}. The checkpoint is damaged or was "
            "written by another factorlab version; save it again."
        )
    with torch.device("meta"):  # every layer spec builds (shapes only, no memory)
        shared = {k: build_shared_module(v) for k, v in spec.get("shared_modules", {}).items()}
        for layer_spec in spec["modules"].values():
            FactorizedLinear.from_spec(layer_spec, shared)
    return spec


def check_weights(directory: str | os.PathLike, spec: dict[str, Any]) -> Path:
    """The checkpoint's weights file, after checking that it exists and that its safetensors
    header reads (a truncated or foreign file fails here, not deep inside loading).

    Raises:
        DataError: the weights file is missing. CheckpointError: it is not a safetensors file.
    """
    weights = Path(directory) / (FACTORIZED_WEIGHTS if spec["modules"] else DENSE_WEIGHTS)
    if not weights.is_file():
        raise DataError(f"{weights} is missing; the checkpoint is incomplete")
    try:
        with safe_open(str(weights), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{weights} is not a readable safetensors file ({exc}); the checkpoint is damaged "
            "or was cut short. Save it again."
        ) from exc
    return weights


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a factorlab spec file."""
    return (Path(path) / SPEC_FILE).is_file()


def _read_in_layout(path: Path, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each copied into a fresh tensor with the strides of
    the model's (empty) tensor of that name and the saved dtype.

    Layers choose their memory layout (``LowRankLinear`` keeps its factors transposed for faster
    GEMMs); assigning safetensors' contiguous tensors as they come would change it, and the
    loaded model's outputs would then differ from the saved model's in the last bits. One tensor
    at a time, so the extra memory is one tensor.
    """
    template = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}  # tied tensors: safetensors saved one name of each group
    for name, tensor in template.items():
        aliases.setdefault(id(tensor), []).append(name)
    state = {}
    with safe_open(str(path), "pt", device=str(device)) as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            saved = f.get_tensor(key)
            empty = template.get(key)
            if empty is not None and empty.shape == saved.shape:
                out = torch.empty_strided(
                    saved.shape, empty.stride(), dtype=saved.dtype, device=device
                )
            else:  # a mismatch: load_state_dict names it
                out = torch.empty_like(saved)
            state[key] = out.copy_(saved)
    for names in aliases.values():
        present = [n for n in names if n in state]
        for name in names:
            if present and name not in state:
                state[name] = state[present[0]]
    return state


def load(directory: str | os.PathLike, device: str | torch.device | None = None) -> PreTrainedModel:
    """Load a checkpoint written by ``save``: the same modules, parameters, dtypes and outputs.

    The model of the saved architecture is built from ``config.json`` with its parameters on the
    meta device (no random initialization; buffers are built as usual), each factorized module is
    rebuilt from its spec the same way (``FactorizedLinear.from_spec``; no projection runs), and
    the saved tensors are then assigned in place of the empty ones, strictly, keeping the saved
    dtype (a bf16 checkpoint loads as bf16). A shared module (``"shared_modules"``) is built once
    and given to every layer naming it, so sharing survives the round trip; tied weights (an LM
    head saved once with its embedding) are tied again. The model is returned in eval mode.

    Raises:
        DataError: missing directory, spec or weights file.
        CheckpointError: the spec names a module the architecture lacks, or the tensors do not
            match the spec (missing, unexpected or mis-shaped tensors).
    """
    from accelerate import init_empty_weights

    directory = Path(directory)
    spec = read_spec(directory)
    weights = check_weights(directory, spec)
    device = torch.device(device or "cpu")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory}/config.json cannot be read: {exc}") from exc
    model_cls = getattr(transformers, spec["architecture"])  # in model_classes(): checked
    with init_empty_weights(include_buffers=False):
        model = model_cls(config)
        shared = {
            key: build_shared_module(module_spec)
            for key, module_spec in spec.get("shared_modules", {}).items()
        }
        for name, layer_spec in spec["modules"].items():
            try:
                model.get_submodule(name)
            except AttributeError as exc:
                raise CheckpointError(
                    f"the spec factorizes {name!r}, which {spec['architecture']} has no module of"
                ) from exc
            model.set_submodule(name, FactorizedLinear.from_spec(layer_spec, shared))
    if hasattr(model, "tie_weights"):  # not tied under init_empty_weights (it re-registers)
        model.tie_weights()

    try:
        state = _read_in_layout(weights, model, device)
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"{weights} does not match its spec: {exc}") from exc
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match its spec {directory / SPEC_FILE}: missing tensors "
            f"{sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}"
        )
    model.to(device)  # buffers built on the CPU
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
