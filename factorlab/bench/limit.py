"""The achievable limit of a factorized model's speed-up: how fast it would run if its
factorized layers were exactly as fast, relative to the dense layers they replace, as their
multiply-accumulates say, and everything else (attention, norms, activations, embeddings, the
head) stayed as it is.

On the dense reference, forward pre/post hooks time every module that the model factorized
(``time.perf_counter`` around each call, CPU, synchronous); the rest of the forward pass is
``other``. Then ``ideal = other + linear x MAC ratio`` (the MAC ratio of the factorized layers
alone) and ``ideal_ratio = ideal / dense``. A factorized model whose measured ratio is near its
ideal ratio has nothing left to gain in its layers; a large gap points at the layers' kernels.

In ONNX Runtime (``onnx_runtime_limit``) the dense reference's exported file is profiled by ONNX
Runtime itself: ``linear`` is the kernel time of the nodes the exporter recorded as running
inside a factorized module (their MatMuls, and bias Adds that were not fused into a node
spanning other modules), ``dense`` the time of the whole run.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from factorlab.bench.latency import num_threads
from factorlab.bench.macs import random_input_ids
from factorlab.errors import ConfigError, ExportError
from factorlab.methods.apply import factorized_modules

if TYPE_CHECKING:
    from factorlab.bench.onnx_runtime import OrtModel


@dataclass(frozen=True)
class AchievableLimit:
    """Seconds (medians over runs) of the dense reference: ``dense_s`` the whole forward pass,
    ``linear_s`` inside the modules the model factorized, ``other_s`` the rest;
    ``linear_mac_ratio`` the factorized layers' MACs over their dense MACs; ``ideal_s`` and
    ``ideal_ratio`` (fraction of ``dense_s``) as in the module docstring."""

    dense_s: float
    linear_s: float
    other_s: float
    linear_mac_ratio: float
    ideal_s: float
    ideal_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _limit(dense_s: float, linear_s: float, ratio: float) -> AchievableLimit:
    other_s = max(dense_s - linear_s, 0.0)
    ideal_s = other_s + linear_s * ratio
    return AchievableLimit(dense_s, linear_s, other_s, ratio, ideal_s, ideal_s / dense_s)


def linear_mac_ratio(model: nn.Module) -> float:
    """MACs per token of ``model``'s factorized layers over those of the dense layers they
    replace.

    Raises:
        ConfigError: ``model`` has no factorized layer.
    """
    layers = factorized_modules(model).values()
    if not layers:
        raise ConfigError("the model has no factorized layer; its limit is itself")
    return sum(m.macs_per_token() for m in layers) / sum(m.dense_macs_per_token() for m in layers)


@torch.inference_mode()
def achievable_limit(
    model: nn.Module,
    dense: nn.Module,
    batch_size: int,
    seq_len: int = 128,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> AchievableLimit:
    """Profile ``dense`` (the reference of the factorized ``model``, same module names) and
    return the achievable limit of ``model`` at this batch size (see the module docstring).

    Raises:
        ConfigError: ``model`` has no factorized layer, or ``dense`` lacks one of its modules.
    """
    ratio = linear_mac_ratio(model)
    modules = dict(dense.named_modules())
    missing = [n for n in factorized_modules(model) if n not in modules]
    if missing:
        raise ConfigError(f"the dense reference has no module {missing[0]!r}")
    inside = [0.0]
    starts: dict[int, float] = {}

    def before(module: nn.Module, args: Any) -> None:
        starts[id(module)] = time.perf_counter()

    def after(module: nn.Module, args: Any, output: Any) -> None:
        inside[0] += time.perf_counter() - starts.pop(id(module))

    handles = []
    for name in factorized_modules(model):
        handles.append(modules[name].register_forward_pre_hook(before))
        handles.append(modules[name].register_forward_hook(after))
    ids = random_input_ids(dense.config, batch_size, seq_len)
    totals, linears = [], []
    dense.eval()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with num_threads(threads):
            for i in range(warmup + runs):
                inside[0] = 0.0
                start = time.perf_counter()
                dense(input_ids=ids)
                total = time.perf_counter() - start
                if i >= warmup:
                    totals.append(total)
                    linears.append(inside[0])
    finally:
        for handle in handles:
            handle.remove()
        if gc_was_enabled:
            gc.enable()
    return _limit(statistics.median(totals), statistics.median(linears), ratio)


def onnx_runtime_limit(
    model: nn.Module,
    reference: OrtModel,
    batch_size: int,
    seq_len: int = 128,
    runs: int = 20,
    warmup: int = 3,
) -> AchievableLimit:
    """The achievable limit of the factorized ``model`` in ONNX Runtime, from ONNX Runtime's
    profile of ``reference`` (its dense reference, exported by ``factorlab.export``, float32 or
    int8): see the module docstring.

    Raises:
        ConfigError: ``model`` has no factorized layer.
        ExportError: no profiled node of ``reference`` runs inside a factorized module (the
            file does not record the modules its nodes came from).
    """
    from factorlab.bench.onnx_runtime import node_modules, scopes_of

    ratio = linear_mac_ratio(model)
    targets = set(factorized_modules(model))
    modules = node_modules(reference.source)
    ids = random_input_ids(reference.config, batch_size, seq_len)
    profile = reference.profile(ids, runs, warmup)
    totals = profile.call_s
    linears = [
        sum(s for n, s in nodes.items() if not targets.isdisjoint(scopes_of(modules, n)))
        for nodes in profile.node_s
    ]
    if not any(linears):
        raise ExportError(
            f"ONNX Runtime's profile of {reference.source.name} names no node of the factorized "
            "modules: export it with factorlab.export.export_onnx, which records them"
        )
    return _limit(statistics.median(totals), statistics.median(linears), ratio)
