"""Which modules to factorize: presets per architecture, name/regex matching, per-module budgets.

This is the only place that knows module names. Presets name the attention and feed-forward
matrices of the transformer blocks; embeddings, poolers and task heads are never targeted by
default. For an architecture without a preset, every linear layer inside the model's repeated
blocks is a target: the blocks of every stack (each outermost ``nn.ModuleList`` of same-type
blocks: encoder and decoder, cross-attention included; ALBERT's one shared layer once).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from factorlab.errors import TargetError
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.registry import ModuleBudget

_BERT_BLOCK = (
    r"(.*\.)?encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
PRESETS: dict[str, str] = {
    "bert": _BERT_BLOCK,
    "roberta": _BERT_BLOCK,
    "xlm-roberta": _BERT_BLOCK,
    "electra": _BERT_BLOCK,
    "camembert": _BERT_BLOCK,
    "distilbert": (
        r"(.*\.)?transformer\.layer\.\d+\."
        r"(attention\.(q_lin|k_lin|v_lin|out_lin)|ffn\.(lin1|lin2))"
    ),
}
"""``config.model_type`` -> regex (full match) of the modules factorized by default."""

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class Target:
    """One module chosen for factorization; ``weight`` is ``(out_features, in_features)``."""

    name: str
    module: nn.Module
    source: str

    @property
    def weight(self) -> torch.Tensor:
        return dense_weight(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.source == "conv1d" else (w.shape[0], w.shape[1])


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``nn.Linear`` or GPT-2 ``Conv1D`` as ``(out_features, in_features)``.

    ``Conv1D`` stores its weight as ``(in, out)`` and computes ``x W + b``; it is transposed here.
    """
    if isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def _source(module: nn.Module) -> str:
    return "conv1d" if isinstance(module, Conv1D) else "linear"


def _matches(name: str, spec: Sequence[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` / ``Conv1D`` in ``model``, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]


def summarize_names(names: Sequence[str]) -> str:
    """``encoder.layer.N.attention.self.query (x6), ...``: names with layer indices folded."""
    folded = Counter(re.sub(r"\.\d+\.", ".N.", name) for name in names)
    return ", ".join(f"{k} (x{v})" if v > 1 else k for k, v in folded.items())


def _block_lists(model: nn.Module) -> list[str]:
    """Names of the outermost ``nn.ModuleList``s of same-type blocks that hold linear layers.

    Every stack counts: an encoder-decoder model has two (T5's ``encoder.block`` and
    ``decoder.block``), a shared-layer model one list of one block (ALBERT's
    ``albert_layer_groups``). Lists nested inside a found list (experts inside a block) belong to
    its blocks; lists of bare linear layers are not blocks.
    """
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(f"{outer}.") or not outer for outer in found):
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or issubclass(kinds.pop(), SUPPORTED_TYPES):
            continue
        if any(isinstance(m, SUPPORTED_TYPES) for m in module.modules()):
            found.append(name)
    return found


def _repeated_block_prefixes(model: nn.Module) -> list[str]:
    """Prefixes (``"transformer.h.3."``) of every block of every stack, in module order."""
    modules = dict(model.named_modules())
    return [
        f"{name}.{i}." if name else f"{i}."
        for name in _block_lists(model)
        for i in range(len(modules[name]))
    ]


def _tied_linear_names(model: nn.Module) -> set[str]:
    """Linear modules whose weight is also registered elsewhere (an LM head tied to the input
    embedding): factorizing one would untie them."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rsplit(".", 1)[0])
    return {n for names in owners.values() if len(names) > 1 for n in names}


def default_target_names(model: nn.Module) -> list[str]:
    """The preset targets of ``model``'s architecture, else every linear inside the blocks of
    every stack (never embeddings, heads or tied weights)."""
    names = linear_module_names(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PRESETS:
        return [n for n in names if re.fullmatch(PRESETS[model_type], n)]
    prefixes = _repeated_block_prefixes(model)
    tied = _tied_linear_names(model)
    return [n for n in names if n not in tied and any(n.startswith(p) for p in prefixes)]


def select_targets(
    model: nn.Module,
    target_modules: Sequence[str] | str | None = None,
    exclude_modules: Sequence[str] | str | None = None,
) -> list[Target]:
    """Resolve which modules of ``model`` to factorize, checking everything before any change.

    Args:
        model: any ``nn.Module``; presets apply when ``model.config.model_type`` has one.
        target_modules / exclude_modules: see ``FactorizationConfig``.

    Returns:
        The targets in module order, each with its weight shape ``(out_features, in_features)``.

    Raises:
        TargetError: a name or regex matches no module (the message lists the model's linear
            modules), a matched module is not ``nn.Linear``/``Conv1D``, or nothing is left.
    """
    modules = dict(model.named_modules())
    linear_names = linear_module_names(model)
    listing = summarize_names(linear_names) or "(none)"
    if target_modules is None:
        chosen = default_target_names(model)
    else:
        chosen = [n for n in modules if n and _matches(n, target_modules)]
        if isinstance(target_modules, str):
            unmatched = [] if chosen else [target_modules]
        else:
            unmatched = [k for k in target_modules if not any(_matches(n, [k]) for n in chosen)]
        if unmatched:
            raise TargetError(
                f"target_modules entries {unmatched} match no module of this model. "
                f"Its linear modules are: {listing}"
            )
        unsupported = [n for n in chosen if not isinstance(modules[n], SUPPORTED_TYPES)]
        if unsupported:
            kinds = sorted({type(modules[n]).__name__ for n in unsupported})
            raise TargetError(
                f"target_modules matched {unsupported[:5]}{'...' if len(unsupported) > 5 else ''} "
                f"of type(s) {kinds}; only nn.Linear and transformers' Conv1D can be factorized. "
                f"Its linear modules are: {listing}"
            )
    if exclude_modules is not None:
        if isinstance(exclude_modules, str) and not any(
            _matches(n, exclude_modules) for n in modules
        ):
            raise TargetError(
                f"exclude_modules {exclude_modules!r} matches no module. "
                f"Its linear modules are: {listing}"
            )
        chosen = [n for n in chosen if not _matches(n, exclude_modules)]
    if not chosen:
        raise TargetError(
            "no module left to factorize"
            + (
                " (this architecture has no preset and no repeated blocks were found)"
                if target_modules is None
                else ""
            )
            + f". Pass target_modules; the model's linear modules are: {listing}"
        )
    return [Target(n, modules[n], _source(modules[n])) for n in chosen]


def budget_for(name: str, config: FactorizationConfig) -> ModuleBudget:
    """The budget of module ``name``: the first ``rank_pattern`` regex found in it, else
    ``param_ratio``."""
    for pattern, value in config.rank_pattern.items():
        if re.search(pattern, name):
            if isinstance(value, int):
                return ModuleBudget(param_ratio=config.param_ratio, rank=value)
            return ModuleBudget(param_ratio=float(value))
    return ModuleBudget(param_ratio=config.param_ratio)


def group_by_block(model: nn.Module, names: Sequence[str]) -> list[list[str]]:
    """Split module ``names`` into one group per repeated transformer block, in module order.

    The blocks are those of every stack of the model (BERT: ``bert.encoder.layer.3.``, GPT-2:
    ``transformer.h.3.``, T5: ``encoder.block.3.`` then ``decoder.block.3.``), so this works for
    any architecture without code per model. Used by staged factorization (METHODS.md §4) to
    make one stage per block, and by block-by-block calibration.

    Args:
        model: the model the names belong to.
        names: full module names (as ``select_targets`` returns them).

    Returns:
        Groups of names, one per block that holds at least one name, ordered from the first
        (bottom) block to the last, names in module order. A name outside every block forms a
        group of its own, placed where it appears in module order.

    Raises:
        TargetError: a name is not a module of ``model``.
    """
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    unknown = [n for n in names if n not in order]
    if unknown:
        raise TargetError(f"{unknown[:5]} are not modules of this model")
    prefixes = _repeated_block_prefixes(model)
    groups: dict[str, list[str]] = {}
    for name in sorted(names, key=order.__getitem__):
        key = next((p for p in prefixes if name.startswith(p)), name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())
