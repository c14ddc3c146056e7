"""Block-by-block calibration: shared Grams, early-stopped passes, bounded memory, sequential."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.testing import assert_close

import factorlab as fl
from factorlab.calibration import ModuleStatistics, collect_statistics, statistics_bytes
from factorlab.methods.act_svd import build_act_svd
from factorlab.projections.activation_svd import activation_svd, compensated_weight
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
    assert all(
        stats[layer + m].input_sum is stats[layer + "query"].input_sum for m in ("key", "value")
    )
    gram_and_sum = sum((g.numel() + g.shape[0]) * 8 for g in distinct.values())
    assert statistics_bytes(stats) == gram_and_sum
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


def dense_reference_for(model):
    """A calibrate function that also records each block's inputs in a dense copy of ``model``."""
    reference = copy.deepcopy(model)
    return lambda names: collect_statistics(
        model, padded_batches(), names, fisher=False, progress=False, reference=reference
    )


def test_cross_statistics_of_an_identical_reference_equal_the_gram():
    model = tiny_bert()
    stats = collect_statistics(
        model, padded_batches(), fisher=False, progress=False, reference=copy.deepcopy(model)
    )
    for name, s in stats.items():
        assert_close(s.cross, s.gram, rtol=1e-12, atol=1e-12, msg=name)
    assert statistics_bytes(stats) == 2 * statistics_bytes(grams_of(model))


def test_cross_statistics_pair_the_reference_inputs_with_the_model_inputs():
    model, reference = tiny_bert(), tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight.mul_(0.5)  # block 1 sees other inputs
    name = "bert.encoder.layer.1.attention.self.query"
    inputs = {}
    for key, m in (("model", model), ("reference", reference)):
        m.get_submodule(name).register_forward_pre_hook(
            lambda module, args, key=key: inputs.setdefault(key, []).append(args[0])
        )
    stats = collect_statistics(
        model, padded_batches(), [name], fisher=False, progress=False, reference=reference
    )
    expected = sum(
        (r[mask.bool()].double().T @ x[mask.bool()].double())
        for r, x, mask in zip(
            inputs["reference"],
            inputs["model"],
            [b["attention_mask"] for b in padded_batches()],
            strict=True,
        )
    )
    assert_close(stats[name].cross, expected)
    assert not torch.allclose(stats[name].cross, stats[name].gram)


def test_compensated_weight_solves_the_ridge_problem_and_keeps_w_without_error():
    torch.manual_seed(0)
    m, n, tokens_ = 6, 5, 40
    W = torch.randn(m, n, dtype=torch.float64)
    X = torch.randn(tokens_, n, dtype=torch.float64)
    Xc = X + 0.3 * torch.randn(tokens_, n, dtype=torch.float64)
    gram, cross = Xc.T @ Xc, X.T @ Xc
    assert_close(compensated_weight(W, X.T @ X, X.T @ X), W)  # no error reached the layer
    eps = 1e-2
    M = compensated_weight(W, gram, cross, eps=eps)
    d = eps * gram.diagonal().mean()
    # normal equations of min ||X W^T - Xc M^T||^2 + d ||M - W||^2
    assert_close(M @ (gram + d * torch.eye(n, dtype=W.dtype)), W @ cross + d * W)

    def objective(A, B):
        return ((X @ W.T - Xc @ (A @ B).T).square().sum() + d * (W - A @ B).square().sum()).item()

    def truncated(Z, rank):
        U, S, Vh = torch.linalg.svd(Z)
        return U[:, :rank] * S[:rank], Vh[:rank]

    rank = 2
    factors = activation_svd(M, rank, gram, eps=eps)
    compensated = objective(factors.A, factors.B)
    plain = activation_svd(W, rank, gram, eps=eps)
    assert compensated < objective(plain.A, plain.B)
    # and below other rank-2 candidates: plain truncations of M and of W
    assert compensated <= min(objective(*truncated(Z, rank)) for Z in (M, W)) + 1e-9


def test_compensated_sequential_run_fits_later_blocks_to_the_dense_outputs():
    plain, compensated = tiny_bert(), tiny_bert()
    config = fl.ActSVDConfig(param_ratio=0.5, sequential=True)
    fl.factorize_(plain, config, calibrate=calibrate_for(plain))
    report = fl.factorize_(
        compensated,
        dataclasses.replace(config, compensate=True),
        calibrate=dense_reference_for(compensated),
    )
    assert report.config["compensate"] is True
    first, later = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"
    for name, same in ((first, True), (later, False)):  # block 0: no error to compensate
        a, b = plain.get_submodule(name).to_dense(), compensated.get_submodule(name).to_dense()
        if same:
            assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert not torch.allclose(a, b, rtol=1e-3, atol=1e-4)


def test_compensate_is_refused_without_sequential_or_for_a_method_that_cannot(monkeypatch):
    from factorlab.methods.registry import METHODS

    with pytest.raises(fl.ConfigError, match="--sequential"):
        fl.ActSVDConfig(compensate=True)
    model = tiny_bert()
    config = fl.ActSVDConfig(sequential=True, compensate=True)
    # a Gram-only method whose build does not read the cross statistics
    monkeypatch.setitem(
        METHODS, "act-svd", dataclasses.replace(METHODS["act-svd"], compensates=False)
    )
    with pytest.raises(fl.ConfigError, match="cannot compensate"):
        fl.factorize_(model, config, calibrate=dense_reference_for(model))
    monkeypatch.undo()
    with pytest.raises(fl.ConfigError, match="cross statistics"):
        fl.factorize_(
            model,
            fl.ActSVDConfig(sequential=True, compensate=True),
            calibrate=calibrate_for(model),  # no reference model: no cross statistics
        )
    assert not fl.factorized_modules(model)


def test_cli_compensate_records_the_option_and_refuses_it_without_sequential(
    tiny_model_dir, tiny_glue_dir, tmp_path, capsys
):
    import json

    from factorlab.cli import main

    argv = ["compress", "--model", str(tiny_model_dir), "--data-dir", str(tiny_glue_dir)]
    argv += ["--calibration-task", "rte", "--method", "act-svd", "--no-progress"]
    refused = tmp_path / "refused"
    assert main([*argv, "--compensate", "--output", str(refused)]) == 2
    assert "--sequential" in capsys.readouterr().err
    assert not refused.exists()
    out = tmp_path / "run"
    assert main([*argv, "--sequential", "--compensate", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["factorization"]["config"]["compensate"] is True


@pytest.mark.parametrize(
    "allocation, options",
    [("uniform", []), ("sensitivity", []), ("uniform", ["--option", "bias_correction=true"])],
)
def test_a_compensated_run_skips_the_reference_until_a_block_is_compressed(
    tiny_model_dir, tiny_glue_dir, tmp_path, monkeypatch, allocation, options
):
    import factorlab.runs
    from factorlab.checkpoint import load
    from factorlab.cli import main

    argv = ["compress", "--model", str(tiny_model_dir), "--data-dir", str(tiny_glue_dir)]
    argv += ["--calibration-task", "rte", "--method", "act-svd", "--no-progress"]
    argv += ["--sequential", "--compensate", "--allocation", allocation, *options]
    collect = factorlab.runs.run_calibration
    passes: list[bool] = []

    def recorded(*args, **kwargs):
        passes.append(kwargs["reference"] is not None)
        return collect(*args, **kwargs)

    monkeypatch.setattr(factorlab.runs, "run_calibration", recorded)
    assert main([*argv, "--output", str(tmp_path / "skipping")]) == 0
    # the planning pass (global ranks) and block 1 see the dense model: no reference pass
    planning = [False] if allocation != "uniform" else []
    assert passes == [*planning, False, True]
    # the same factors as a run whose every pass also runs the reference
    monkeypatch.setattr(factorlab.runs, "factorized_modules", lambda model: {"any": None})
    assert main([*argv, "--output", str(tmp_path / "always")]) == 0
    assert passes[len(planning) + 2 :] == [True] * (len(planning) + 2)
    skipping = load(tmp_path / "skipping").state_dict()
    always = load(tmp_path / "always").state_dict()
    assert skipping.keys() == always.keys()
    for name, value in skipping.items():
        assert_close(value, always[name], msg=name)


def test_a_reference_of_another_architecture_is_refused_and_leaves_no_hooks():
    model = tiny_bert(num_layers=4)
    with pytest.raises(fl.ConfigError, match="reference model has no module"):
        collect_statistics(
            model, padded_batches(), fisher=False, progress=False, reference=tiny_bert()
        )
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def _affine_case(seed=0, m=6, n=5, tokens_=50):
    torch.manual_seed(seed)
    W = torch.randn(m, n, dtype=torch.float64)
    b = torch.randn(m, dtype=torch.float64)
    X = torch.randn(tokens_, n, dtype=torch.float64) + 3.0  # inputs far from zero mean
    stats = ModuleStatistics(None, X.T @ X, 1, tokens_, input_sum=X.sum(0))
    return W, b, X, stats


def test_bias_correction_moves_the_mean_output_error_into_the_bias():
    W, b, X, stats = _affine_case()
    corrected = build_act_svd(W, b, 2, fl.ActSVDConfig(bias_correction=True), stats).layer
    plain = build_act_svd(W, b, 2, fl.ActSVDConfig(), stats).layer
    dense = X @ W.T + b
    with torch.no_grad():
        error, plain_error = dense - corrected(X), dense - plain(X)
    assert_close(error.mean(0), torch.zeros_like(b), atol=1e-10, rtol=0)
    assert error.square().sum() < plain_error.square().sum()
    with pytest.raises(fl.ConfigError, match="has none"):
        build_act_svd(W, None, 2, fl.ActSVDConfig(bias_correction=True), stats)


def test_bias_correction_with_compensation_matches_the_dense_outputs_mean():
    W, b, X, _ = _affine_case(seed=1)
    Xc = X + 0.2 * torch.randn_like(X) + 0.5  # the compressed model's inputs, shifted
    stats = ModuleStatistics(
        None, Xc.T @ Xc, 1, X.shape[0], cross=X.T @ Xc, input_sum=Xc.sum(0), reference_sum=X.sum(0)
    )
    config = fl.ActSVDConfig(sequential=True, compensate=True, bias_correction=True)
    layer = build_act_svd(W, b, 2, config, stats).layer
    with torch.no_grad():
        error = (X @ W.T + b) - layer(Xc)
    assert_close(error.mean(0), torch.zeros_like(b), atol=1e-10, rtol=0)
