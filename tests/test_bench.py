"""MAC counts, latency/memory measurement, ``factorlab bench`` and the LowRankLinear forward."""

import copy
import json

import pytest
import torch
from tiny import tiny_bert
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import factorlab as fl
from factorlab.bench.latency import (
    LatencyResult,
    activation_peak_bytes,
    bench,
    compare_to_dense,
    format_bench,
    num_threads,
)
from factorlab.bench.macs import attention_macs, count_macs
from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.layers import LowRankLinear

H, LAYERS, FFN, LABELS = 32, 2, 64, 2  # tests/tiny.py's BERT


def hand_macs(batch: int, seq: int) -> int:
    """tiny_bert by hand: per token and layer Q, K, V, O (H x H) and the FFN (2 H x FFN); per
    sequence the attention matmuls (2 L^2 H per layer), the pooler (H x H), the head (H x 2)."""
    per_token = LAYERS * (4 * H * H + 2 * H * FFN)
    per_seq = LAYERS * 2 * seq * seq * H + H * H + H * LABELS
    return batch * (seq * per_token + per_seq)


def test_macs_of_tiny_bert_match_hand_count_and_flop_counter():
    model = tiny_bert()
    count = count_macs(model, batch_size=3, seq_len=16)
    assert count.total == hand_macs(3, 16) == count.dense_total
    assert count.attention == attention_macs(model.config, 3, 16) == LAYERS * 2 * 3 * 16 * 16 * H
    assert count.factorized == count.factorized_dense == 0 and count.factorized_ratio == 1.0
    assert count.per_module["bert.encoder.layer.1.intermediate.dense"] == 3 * 16 * H * FFN
    assert count.per_module["classifier"] == 3 * H * LABELS  # one row per sequence
    # independent check: PyTorch's FLOP counter on the eager-attention forward (FLOPs = 2 MACs)
    model.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(input_ids=torch.randint(2, 100, (3, 16)))
    assert counter.get_total_flops() == 2 * count.total


def test_low_rank_macs_are_rank_times_in_plus_out():
    layer = LowRankLinear(in_features=48, out_features=20, rank=5)
    assert layer.macs_per_token() == 5 * (48 + 20)
    assert layer.dense_macs_per_token() == 48 * 20
    # the base-class default (stored factor values) agrees for low-rank
    assert fl.FactorizedLinear.macs_per_token(layer) == layer.macs_per_token()

    model = tiny_bert()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=0.5))
    count = count_macs(model, batch_size=2, seq_len=8)
    layers = fl.factorized_modules(model)
    assert len(layers) == 12
    assert count.factorized == sum(
        2 * 8 * m.rank * (m.in_features + m.out_features) for m in layers.values()
    )
    assert count.factorized_dense == 2 * 8 * LAYERS * (4 * H * H + 2 * H * FFN)
    assert count.dense_total == hand_macs(2, 8)
    assert count.total == count.dense_total - count.factorized_dense + count.factorized
    assert 0.4 < count.factorized_ratio <= 0.5


def test_latency_statistics():
    result = LatencyResult(batch_size=4, seq_len=8, threads=1, warmup=0)
    result.times_s = [float(t) for t in range(1, 22)]  # 1..21 s
    assert result.runs == 21 and result.median_s == 11.0 and result.min_s == 1.0
    assert result.p10_s == pytest.approx(3.0) and result.p90_s == pytest.approx(19.0)
    assert result.iqr_s == pytest.approx(10.0)
    assert result.throughput == pytest.approx(4 / 11.0)
    assert result.peak_memory_bytes is None
    result.param_bytes, result.activation_peak_bytes = 100, 50
    assert result.peak_memory_bytes == 150


class _Allocates(nn.Module):
    """Allocates 4 MB, frees it, then 12 MB + the 2 MB output: peak live 14 MB (+ small)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(500_000)  # 2 MB, the output
        del a
        c = torch.ones(3_000_000)  # 12 MB
        return b + c[:500_000]


def test_activation_peak_bytes_tracks_live_allocations():
    peak = activation_peak_bytes(_Allocates(), torch.zeros(1, 4, dtype=torch.long))
    # a, b live: 6 MB; a freed then c: 14 MB; the output of the add: 16 MB
    assert peak == pytest.approx(16_000_000, rel=0.01)


def test_dense_model_ratios_are_one():
    model = tiny_bert()
    comparison = compare_to_dense(model, batch_size=2, seq_len=8, runs=3, warmup=1, threads=1)
    assert comparison.model is comparison.dense
    assert comparison.latency_ratio == comparison.throughput_ratio == 1.0
    assert comparison.memory_ratio == 1.0
    result = bench(model, [1], seq_len=8, threads=1, runs=3, warmup=1)
    assert not result["factorized"] and result["parameters"]["ratio"] == 1.0
    assert result["macs"]["ratio"] == 1.0 and result["batches"][0]["latency_ratio"] == 1.0


def test_bench_factorized_model_returns_sane_numbers():
    model = tiny_bert()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=0.25))
    before = copy.deepcopy(model.state_dict())
    threads = torch.get_num_threads()
    result = bench(model, [1, 3], seq_len=16, threads=1, runs=5, warmup=1, name="tiny")
    assert torch.get_num_threads() == threads  # restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the model is not modified (densify works on a copy)
    assert result["factorized"] and result["threads"] == 1
    assert result["parameters"]["model"] < result["parameters"]["dense"]
    assert 0 < result["macs"]["ratio"] < 1 and 0 < result["macs"]["factorized_ratio"] <= 0.25
    assert [b["batch_size"] for b in result["batches"]] == [1, 3]
    for b in result["batches"]:
        assert len(b["model"]["times_s"]) == len(b["dense"]["times_s"]) == 5
        assert b["latency_ratio"] > 0 and b["throughput_ratio"] == pytest.approx(
            1 / b["latency_ratio"]
        )
        m = b["model"]
        assert 0 < m["p10_s"] <= m["median_s"] <= m["p90_s"] and m["throughput_seq_per_s"] > 0
        assert m["peak_memory_bytes"] > m["param_bytes"] > 0 and 0 < b["memory_ratio"] < 1
        assert b["macs_per_batch"] == b["batch_size"] * result["macs"]["total"]
    text = format_bench(result)
    assert "latency x" in text and "MACs/seq" in text
    json.dumps(result)  # serializable


def test_bench_cli_writes_json(tmp_path, tiny_model_dir, capsys):
    ckpt = tmp_path / "lr"
    assert main(["compress", "--model", str(tiny_model_dir), "--param-ratio", "0.5",
                 "--output", str(ckpt), "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "bench.json"
    argv = ["bench", str(ckpt), "--batch-sizes", "1,2", "--seq-len", "16", "--threads", "1"]
    assert main([*argv, "--runs", "20", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["factorized"] and result["model"] == str(ckpt)
    assert [b["batch_size"] for b in result["batches"]] == [1, 2]
    assert all(b["model"]["runs"] == 20 and b["latency_ratio"] > 0 for b in result["batches"])
    assert "latency x" in printed and str(out) in printed
    assert main(["bench", str(ckpt), "--batch-sizes", "0"]) == 2  # user error -> exit 2
    assert main(["bench", str(ckpt), "--threads", "0"]) == 2


def test_protocol_errors():
    with pytest.raises(ConfigError):
        compare_to_dense(tiny_bert(), batch_size=0, seq_len=8)
    with pytest.raises(ConfigError), num_threads(0):
        pass
    with pytest.raises(ConfigError, match="float32"):
        compare_to_dense(tiny_bert().double(), batch_size=1, seq_len=8, runs=1)


def _layer(m: int = 24, n: int = 40, r: int = 6, bias: bool = True) -> LowRankLinear:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    return LowRankLinear.from_factors(A, B, torch.randn(m, generator=g) if bias else None)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "make_input",
    [
        lambda: torch.randn(7, 40),  # 2-D
        lambda: torch.randn(3, 5, 40),  # 3-D
        lambda: torch.randn(40, 5, 3).permute(2, 1, 0),  # non-contiguous 3-D
        lambda: torch.randn(9, 80)[:, ::2],  # non-contiguous 2-D (strided columns)
    ],
)
def test_low_rank_forward_equals_dense_weight(make_input, bias):
    layer = _layer(bias=bias)
    x = make_input()
    expected = x @ layer.to_dense().T + (layer.bias if bias else 0)
    assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_low_rank_layout_and_round_trip(tmp_path):
    layer = _layer()
    # shapes and names unchanged; memory holds the transposes ("NN" GEMM operands)
    assert layer.A.shape == (24, 6) and layer.B.shape == (6, 40)
    assert layer.A.t().is_contiguous() and layer.B.t().is_contiguous()
    assert set(layer.state_dict()) == {"A", "B", "bias"}
    # gradients keep the parameters' shapes; a contiguous replacement still computes the same
    x = torch.randn(4, 40)
    layer(x).square().sum().backward()
    assert layer.A.grad.shape == layer.A.shape and layer.B.grad.shape == layer.B.shape
    other = copy.deepcopy(layer)
    other.A.data, other.B.data = other.A.data.contiguous(), other.B.data.contiguous()
    assert_close(other(x), layer(x))
    # a checkpoint round trip keeps values and the layout
    model = tiny_bert()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=0.5))
    fl.save(model, tmp_path / "ck")
    loaded = fl.load(tmp_path / "ck")
    for name, mod in fl.factorized_modules(loaded).items():
        assert mod.A.t().is_contiguous(), name
        assert_close(mod.to_dense(), model.get_submodule(name).to_dense())
    ids = torch.randint(2, 100, (2, 8))
    with torch.inference_mode():
        assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
