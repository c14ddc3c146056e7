"""Per-token decode latency of causal LMs with a KV cache, the cost users of compressed decoders
care about besides prefill (which ``benchmark_models`` times as a forward pass over the prompt).

Protocol: each model prefills the same random prompt of ``context`` tokens once (cache on);
every timed run then feeds one new token with that cache and crops the cache back to
``context`` tokens afterwards, so every run decodes at the same context length. Runs of the
models are interleaved (order reversed every other run), inside ``torch.inference_mode()`` with
the garbage collector paused, as in ``benchmark_models``.
"""

from __future__ import annotations

import gc
import inspect
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from factorlab.bench.latency import LatencyResult, num_threads
from factorlab.bench.macs import random_input_ids
from factorlab.errors import ConfigError


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a decoder-only Hugging Face model with an LM head (it can
    ``generate`` and is not an encoder-decoder)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    return bool(can_generate()) and not getattr(config, "is_encoder_decoder", False)


def _cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (older versions)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _prefill(model: nn.Module, prompt: torch.Tensor) -> Any:
    """The KV cache after one forward pass of ``model`` over ``prompt``."""
    output = model.eval()(input_ids=prompt, use_cache=True)
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def benchmark_decode(
    models: Sequence[nn.Module],
    context: int = 128,
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = None,
    seed: int = 0,
) -> list[LatencyResult]:
    """Seconds per generated token at batch 1 after a prompt of ``context`` tokens.

    Args:
        models: float32 causal LMs (``is_causal_lm``) with the same vocabulary.
        context: prompt tokens in the cache when each timed token is decoded.
        runs / warmup / threads / seed: as in ``benchmark_models``.

    Returns:
        One ``LatencyResult`` per model (``batch_size`` 1, ``seq_len`` 1: one new token per run).

    Raises:
        ConfigError: a model that is not a causal LM, ``context < 1``, runs < 1 or warmup < 0.
    """
    if context < 1 or runs < 1 or warmup < 0:
        raise ConfigError(f"need context >= 1, runs >= 1, warmup >= 0; got {context, runs, warmup}")
    for model in models:
        if not is_causal_lm(model):
            raise ConfigError(f"{type(model).__name__} is not a causal LM; decode needs one")
    prompt = random_input_ids(models[0].config, 1, context + 1, seed=seed)
    with num_threads(threads) as used, torch.inference_mode():
        caches = [_prefill(m, prompt[:, :context]) for m in models]
        keys = [_cache_argument(m) for m in models]
        results = [LatencyResult(1, 1, used, warmup) for _ in models]
        token = prompt[:, context:]
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            order = list(range(len(models)))
            for i in range(warmup + runs):
                for k in order if i % 2 == 0 else order[::-1]:
                    start = time.perf_counter()
                    models[k](input_ids=token, use_cache=True, **{keys[k]: caches[k]})
                    seconds = time.perf_counter() - start
                    caches[k].crop(-1)  # drop the new token: the next run decodes at context
                    if i >= warmup:
                        results[k].times_s.append(seconds)
        finally:
            if gc_was_enabled:
                gc.enable()
    return results
