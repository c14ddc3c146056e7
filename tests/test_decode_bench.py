"""Decode latency of causal LMs (KV cache, one token per run) in `factorlab bench`."""

from __future__ import annotations

import pytest

import factorlab as fl
from factorlab.bench.decode import _cache_argument, benchmark_decode, is_causal_lm
from factorlab.bench.latency import bench, format_bench
from factorlab.errors import ConfigError
from tests.architectures import build_family
from tests.tiny import tiny_bert, tiny_llama


def test_every_timed_token_is_decoded_at_the_same_context_length():
    model = tiny_llama()
    key = _cache_argument(model)
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: (
            seen.append(kwargs[key].get_seq_length()) if key in kwargs else None
        ),
        with_kwargs=True,
    )
    (result,) = benchmark_decode([model], context=12, runs=5, warmup=2)
    assert len(result.times_s) == 5 and all(t > 0 for t in result.times_s)
    assert seen == [12] * 7  # warm-up and timed runs, each on a cache cropped back to 12 tokens
    assert (result.batch_size, result.seq_len) == (1, 1)


def test_bench_reports_decode_against_dense_for_causal_lms_only():
    model = tiny_llama()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=0.5))
    result = bench(model, [1], seq_len=16, runs=3, warmup=1, memory=False)
    decode = result["decode"]
    assert decode["context"] == 16
    assert decode["latency_ratio"] == pytest.approx(
        decode["model"]["median_s"] / decode["dense"]["median_s"]
    )
    assert "ms/token" in format_bench(result)
    assert bench(tiny_bert(), [1], seq_len=16, runs=3, warmup=1, memory=False)["decode"] is None


def test_only_decoder_only_lms_count_as_causal():
    assert is_causal_lm(tiny_llama())
    assert not is_causal_lm(tiny_bert())
    assert not is_causal_lm(build_family("t5").model)
    with pytest.raises(ConfigError, match="not a causal LM"):
        benchmark_decode([tiny_bert()], context=4, runs=1)
