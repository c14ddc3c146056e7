"""Block-by-block calibration: shared Grams, early-stopped passes, bounded memory, sequential."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

import factorlab as fl
from factorlab.calibration import collect_statistics, statistics_bytes
from factorlab.targets import select_targets
from tests.architectures import build_family
from tests.test_calibration import padded_batches
from tests.tiny import tiny_bert, tokens

ACT_SVD = fl.ActSVDConfig(param_ratio=0.5)


def grams_of(model, names=None):
    return collect_statistics(model, padded_batches(), names, fisher=False, progress=False)


def calibrate_for(model):
    return lambda names: grams_of(model, names)


def test_query_key_value_share_one_gram_counted_once():
    stats = grams_of(tiny_bert())
    layer = "bert.encoder.layer.0.attention.self."
    q, k, v = (stats[layer + m].gram for m in ("query", "key", "value"))
    assert q is k is v
    separate = collect_statistics(
        tiny_bert(), padded_batches(), [layer + "key"], fisher=False, progress=False
    )
    assert_close(separate[layer + "key"].gram, q, rtol=0, atol=0)
    distinct = {id(s.gram): s.gram for s in stats.values()}
    assert statistics_bytes(stats) == sum(g.numel() * 8 for g in distinct.values())
    assert len(distinct) == 2 * 4  # per block: Q/K/V, attention output, and the two FFN inputs


def test_gram_only_pass_stops_after_the_last_target():
    model = tiny_bert()
    calls = []
    model.classifier.register_forward_hook(lambda *a: calls.append(1))
    grams_of(model)
    assert len(calls) == 1  # the first batch runs through; the second stops at the last target
    collect_statistics(model, padded_batches(), fisher=True, gram=True, progress=False)
    assert len(calls) == 3  # Fisher needs the loss: every batch runs through


def test_shared_layer_runs_count_every_pass():
    family = build_family("albert")
    stats = collect_statistics(family.model, [family.batch] * 2, fisher=False, progress=False)
    tokens_per_batch = int(family.batch["attention_mask"].sum())
    query = "albert.encoder.albert_layer_groups.0.albert_layers.0.attention.query"
    assert stats[query].num_tokens == 2 * tokens_per_batch * family.model.config.num_hidden_layers


def test_streaming_equals_calibrating_everything_first():
    whole, streamed = tiny_bert(), tiny_bert()
    fl.factorize_(whole, ACT_SVD, calibration=grams_of(whole))
    report = fl.factorize_(streamed, ACT_SVD, calibrate=calibrate_for(streamed), stream=True)
    ids = tokens()
    assert_close(streamed(input_ids=ids).logits, whole(input_ids=ids).logits, rtol=0, atol=0)
    per_block = statistics_bytes(
        grams_of(tiny_bert(), [t.name for t in select_targets(tiny_bert())][:6])
    )
    assert report.calibration_peak_bytes == per_block


def test_peak_calibration_memory_does_not_grow_with_depth():
    peaks = []
    for layers in (2, 4):
        model = tiny_bert(num_layers=layers)
        report = fl.factorize_(model, ACT_SVD, calibrate=calibrate_for(model), stream=True)
        peaks.append(report.calibration_peak_bytes)
    assert peaks[0] == peaks[1] > 0
    model = tiny_bert(num_layers=4)  # small statistics: by default they come in one pass
    whole = fl.factorize_(model, ACT_SVD, calibrate=calibrate_for(model))
    assert whole.calibration_peak_bytes == statistics_bytes(grams_of(tiny_bert(num_layers=4)))
    assert whole.calibration_peak_bytes == 4 * peaks[1]


def test_sequential_calibrates_each_block_on_the_compressed_blocks_before_it():
    sequential = tiny_bert()
    config = fl.ActSVDConfig(param_ratio=0.5, sequential=True)
    fl.factorize_(sequential, config, calibrate=calibrate_for(sequential))

    manual = tiny_bert()
    names = [t.name for t in select_targets(manual)]
    block0, block1 = names[:6], names[6:]
    fl.factorize_(
        manual, fl.ActSVDConfig(param_ratio=0.5, target_modules=block0), grams_of(manual, block0)
    )
    fl.factorize_(
        manual, fl.ActSVDConfig(param_ratio=0.5, target_modules=block1), grams_of(manual, block1)
    )
    ids = tokens()
    assert_close(sequential(input_ids=ids).logits, manual(input_ids=ids).logits, rtol=0, atol=0)

    plain = tiny_bert()
    fl.factorize_(plain, ACT_SVD, calibrate=calibrate_for(plain))
    assert not torch.equal(plain(input_ids=ids).logits, sequential(input_ids=ids).logits)


def test_failed_sequential_run_puts_the_original_modules_back():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def failing(names):
        seen.append(names)
        if len(seen) == 2:
            raise RuntimeError("calibration data ran out")
        return grams_of(model, names)

    with pytest.raises(RuntimeError, match="ran out"):
        fl.factorize_(model, fl.ActSVDConfig(param_ratio=0.5, sequential=True), calibrate=failing)
    assert not fl.factorized_modules(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sequential_needs_streaming_statistics():
    model = tiny_bert()
    with pytest.raises(fl.ConfigError, match="sequential"):
        fl.factorize_(model, fl.ActSVDConfig(sequential=True), calibration=grams_of(model))
    with pytest.raises(fl.ConfigError, match="sequential"):
        fl.factorize_(model, fl.FWSVDConfig(sequential=True), calibrate=lambda names: {})
    assert not fl.factorized_modules(model)


@pytest.mark.parametrize("allocation", ["global", "sensitivity"])
def test_sequential_under_a_budget_plans_on_the_dense_model_then_projects_block_by_block(
    allocation,
):
    probe = [{"input_ids": tokens()}] if allocation == "sensitivity" else None
    config = fl.ActSVDConfig(param_ratio=0.5, allocation=allocation)
    plain = tiny_bert()
    whole = fl.factorize_(plain, config, calibrate=calibrate_for(plain), probe=probe)
    sequential = tiny_bert()
    report = fl.factorize_(
        sequential,
        dataclasses.replace(config, sequential=True),
        calibrate=calibrate_for(sequential),
        probe=probe,
    )
    assert [m.rank for m in report.modules] == [m.rank for m in whole.modules]
    assert len({m.rank for m in report.modules}) > 1  # a real global plan, not uniform ranks
    assert report.calibration_peak_bytes == whole.calibration_peak_bytes  # dense, all targets
    first, second = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"
    # block 0 sees the dense inputs either way; block 1 sees the compressed block 0
    for name, same in ((first, True), (second, False)):
        a, b = plain.get_submodule(name), sequential.get_submodule(name)
        assert torch.equal(a.to_dense(), b.to_dense()) is same


@pytest.mark.parametrize(
    "flags", [["--method", "fwsvd"], ["--method", "act-svd", "--staged"]], ids=["fisher", "staged"]
)
def test_cli_refuses_sequential_where_it_cannot_apply_before_any_work(
    flags, tiny_model_dir, tiny_glue_dir, tmp_path, capsys
):
    from factorlab.cli import main

    out = tmp_path / "run"
    argv = ["compress", "--model", str(tiny_model_dir), "--task", "rte", "--data-dir"]
    argv += [str(tiny_glue_dir), *flags, "--sequential", "--output", str(out), "--no-progress"]
    assert main(argv) == 2
    assert "sequential" in capsys.readouterr().err
    assert not out.exists()
