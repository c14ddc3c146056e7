"""The achievable limit (bench's ideal ratio): time inside the factorized modules of the dense
reference, scaled by their MAC ratio, plus everything else."""

from __future__ import annotations

import time

import pytest

import factorlab as fl
from factorlab.bench.latency import bench, dense_reference
from factorlab.bench.limit import achievable_limit, linear_mac_ratio
from factorlab.errors import ConfigError
from tests.tiny import tiny_bert


def factorized(ratio=0.25):
    model = tiny_bert()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=ratio))
    return model


def test_mac_ratio_of_the_factorized_layers_alone():
    model = factorized()
    layers = fl.factorized_modules(model).values()
    expected = sum(m.rank * (m.in_features + m.out_features) for m in layers) / sum(
        m.in_features * m.out_features for m in layers
    )
    assert linear_mac_ratio(model) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="no factorized layer"):
        linear_mac_ratio(tiny_bert())


def test_time_inside_the_targets_is_what_they_take():
    model = factorized()
    dense = dense_reference(model)
    names = list(fl.factorized_modules(model))
    for name in names:  # every target takes 10 ms more: the limit must see it inside
        dense.get_submodule(name).register_forward_hook(lambda *a: time.sleep(0.01))
    limit = achievable_limit(model, dense, batch_size=2, seq_len=8, runs=3, warmup=1)
    assert limit.linear_s >= 0.01 * len(names)
    assert limit.other_s == pytest.approx(limit.dense_s - limit.linear_s)
    assert limit.other_s < 0.5 * limit.linear_s
    assert limit.ideal_s == pytest.approx(limit.other_s + limit.linear_s * limit.linear_mac_ratio)
    assert limit.linear_mac_ratio < limit.ideal_ratio < 1


def test_bench_reports_the_ideal_for_factorized_models_in_torch():
    result = bench(factorized(), [1], seq_len=8, runs=3, warmup=1, memory=False)
    entry = result["batches"][0]
    assert entry["ratio_to_ideal"] == pytest.approx(
        entry["latency_ratio"] / entry["limit"]["ideal_ratio"]
    )
    dense = bench(tiny_bert(), [1], seq_len=8, runs=3, warmup=1, memory=False)
    assert dense["batches"][0]["limit"] is None
