"""Sensitivity allocation (ASVD §3.3): ranks from the output change each matrix's truncation
causes, measured on probe batches, spent to one budget."""

from __future__ import annotations

import json
import math

import pytest
import torch

from factorlab.allocation import Spectrum, allocate_global
from factorlab.errors import ConfigError
from factorlab.methods import LowRankConfig, MonarchConfig, factorize_, make_config, plan_modules
from factorlab.sensitivity import OutputProbe, curve_spectrum, divergence
from factorlab.training import check_stageable
from tests.tiny import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def probe_batches(n: int = 2, batch: int = 8, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2 :] = 0  # one padded example
    return [
        {
            "input_ids": torch.randint(0, 100, (batch, seq), generator=generator),
            "attention_mask": mask,
        }
        for _ in range(n)
    ]


def sensitive_bert() -> torch.nn.Module:
    """The tiny BERT with every linear weight x5: at the default init (std 0.02) its logits
    hardly depend on the input, so every truncation would change them by ~1e-9."""
    model = tiny_bert()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(5.0)
    return model


def encoder_weights(model: torch.nn.Module) -> int:
    return sum(
        m.weight.numel() for m in model.bert.encoder.modules() if isinstance(m, torch.nn.Linear)
    )


def test_curve_spectrum_is_the_lower_convex_hull():
    base = Spectrum(torch.ones(10, dtype=torch.float64), cost=7, max_rank=10, dense_params=100)
    # (4, 5.0) lies above the chord from (2, 6) to (6, 2): the hull skips it
    spec = curve_spectrum([2, 4, 6, 10], [6.0, 5.0, 2.0, 1.0], base)
    inf = math.inf  # below the smallest measured rank: a floor
    expected = [inf, inf, 1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25, 0.25]
    torch.testing.assert_close(spec.gains, torch.tensor(expected, dtype=torch.float64))
    # so the greedy gives every matrix its smallest measured rank first
    ranks = allocate_global({"a": spec, "b": curve_spectrum([3, 10], [9.0, 0.0], base)}, 5 * 7)
    assert ranks == {"a": 2, "b": 3}
    assert (spec.cost, spec.max_rank, spec.dense_params) == (7, 10, 100)
    # a loss that rises with the rank (noise) gives no gain, never a negative one
    flat = curve_spectrum([2, 5, 10], [3.0, 3.5, 1.0], base)
    assert (flat.gains >= 0).all() and (flat.gains[1:] <= flat.gains[:-1]).all()
    torch.testing.assert_close(flat.gains[2:], torch.tensor([0.25] * 8, dtype=torch.float64))
    assert flat.gains[2:5].sum() == pytest.approx(0.25 * 3)


def test_spectrum_interpolation_follows_the_method_error_between_measured_ranks():
    """A loss curve that IS the method's tail error: spectrum interpolation gives back the
    method's own gains between the measured ranks, linear only their segment means; both spend
    exactly each segment's measured drop."""
    sigma2 = torch.tensor([64.0, 32.0, 16.0, 8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    base = Spectrum(sigma2, cost=5, max_rank=8, dense_params=100)
    ranks = [1, 4, 8]
    losses = [sigma2[r:].sum().item() for r in ranks]  # the squared truncation error at r
    spectrum = curve_spectrum(ranks, losses, base)
    linear = curve_spectrum(ranks, losses, base, interpolation="linear")
    torch.testing.assert_close(spectrum.gains[1:], sigma2[1:])
    assert spectrum.gains[0] == math.inf and linear.gains[0] == math.inf
    torch.testing.assert_close(linear.gains[1:4], torch.full((3,), 56.0 / 3, dtype=torch.float64))
    for gains in (spectrum.gains, linear.gains):
        assert gains[1:4].sum().item() == pytest.approx(losses[0] - losses[1])
        assert gains[4:8].sum().item() == pytest.approx(losses[1] - losses[2])
    # so a budget that ends inside a segment stops at its steepest units, not at a measured rank
    other = Spectrum(torch.ones(8, dtype=torch.float64), cost=5, max_rank=8, dense_params=100)
    flat = curve_spectrum([1, 8], [7.0 * 20.0, 0.0], other, interpolation="linear")  # 20 a unit
    budget = 5 * (1 + 1 + 2)  # the floors, then two more units: a's 32 beats b's 20, 18.7 not
    assert allocate_global({"a": spectrum, "b": flat}, budget) == {"a": 2, "b": 2}
    assert allocate_global({"a": linear, "b": flat}, budget) == {"a": 1, "b": 3}


def test_spectrum_interpolation_pools_where_the_pieces_meet():
    """A flat segment's spread can start above the previous segment's end: the isotonic fit
    makes the gains non-increasing and keeps the total drop."""
    base = Spectrum(torch.tensor([1.0, 1.0, 1.0, 100.0, 1.0, 1.0], dtype=torch.float64), 1, 6, 100)
    spec = curve_spectrum([1, 3, 6], [10.0, 6.0, 3.0], base)
    gains = spec.gains[1:]
    assert (gains[1:] <= gains[:-1]).all(), gains
    assert gains.sum().item() == pytest.approx(10.0 - 3.0)
    with pytest.raises(ConfigError, match="sensitivity_interpolation must be one of"):
        curve_spectrum([1, 3], [1.0, 0.0], base, interpolation="cubic")


def test_measured_curves_are_cached_across_budgets(monkeypatch):
    """With a curve cache, the second budget and the other interpolation measure nothing, and
    give the same ranks as measuring afresh."""
    from factorlab import sensitivity

    measured = []
    original = sensitivity.OutputProbe.__call__
    monkeypatch.setattr(
        sensitivity.OutputProbe,
        "__call__",
        lambda self, model: measured.append(1) or original(self, model),
    )
    curves: dict = {}
    first = plan_modules(
        sensitive_bert(),
        LowRankConfig(param_ratio=0.5, allocation="sensitivity"),
        probe=probe_batches(),
        sensitivity_curves=curves,
    )
    calls = len(measured)
    assert calls == 8 * len(first[0]) and set(curves) == {t.name for t in first[0]}
    for ratio, interpolation in ((0.3, "spectrum"), (0.3, "linear")):
        config = LowRankConfig(
            param_ratio=ratio, allocation="sensitivity", sensitivity_interpolation=interpolation
        )
        cached = plan_modules(
            sensitive_bert(), config, probe=probe_batches(), sensitivity_curves=curves
        )
        assert len(measured) == calls  # nothing measured again
        fresh = plan_modules(sensitive_bert(), config, probe=probe_batches())
        assert cached[2] == fresh[2]
        calls = len(measured)
    # other candidate ranks are measured, not taken from the cache
    config = LowRankConfig(param_ratio=0.3, allocation="sensitivity", sensitivity_fractions=[1.0])
    plan_modules(sensitive_bert(), config, probe=probe_batches(), sensitivity_curves=curves)
    assert len(measured) == calls + len(first[0])


def test_divergence_kinds():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    assert divergence(logits, logits, None) == pytest.approx(0.0, abs=1e-7)
    p, q = logits.softmax(-1), (logits + torch.tensor([[0.0, 1.0], [0.0, 0.0]])).softmax(-1)
    expected = (p * (p.log() - q.log())).sum().item()
    shifted = logits + torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert divergence(logits, shifted, None) == pytest.approx(expected, rel=1e-5)
    scores = torch.tensor([[1.0], [3.0]])
    assert divergence(scores, scores + 2, None) == pytest.approx(8.0)  # regression: squared error
    # per-token logits: padded positions do not count
    tokens = torch.randn(2, 3, 5)
    noisy = tokens.clone()
    noisy[1, 2] += 10.0
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert divergence(tokens, noisy, mask) == pytest.approx(0.0, abs=1e-6)


def test_probe_is_zero_for_the_dense_model_and_grows_with_truncation():
    model = sensitive_bert()
    probe = OutputProbe(model, probe_batches())
    assert probe(model) == pytest.approx(0.0, abs=1e-7)
    losses = []
    for ratio in (0.9, 0.5, 0.1):
        compressed = sensitive_bert()
        factorize_(compressed, LowRankConfig(param_ratio=ratio))
        losses.append(probe(compressed))
    assert 0 < losses[0] < losses[1] < losses[2], losses


def test_sensitivity_spends_the_budget_and_leaves_the_model_untouched_until_the_swap():
    for config in (
        LowRankConfig(param_ratio=0.4, allocation="sensitivity"),
        MonarchConfig(param_ratio=0.4, nblocks=2, allocation="sensitivity"),
    ):
        model = sensitive_bert()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        _, _, ranks = plan_modules(model, config, probe=probe_batches())
        after = model.state_dict()
        assert after.keys() == before.keys()
        for key, value in before.items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
        dense = encoder_weights(model)
        report = factorize_(model, config, probe=probe_batches())
        factors = sum(m.params_after - m.out_features for m in report.modules)  # minus biases
        budget = math.floor(config.param_ratio * dense)
        assert 0.95 * budget <= factors <= budget, (config.method, factors, budget)
        assert [m.rank for m in report.modules] == ranks
        assert len(set(ranks)) > 1, f"{config.method}: one rank for every matrix"


def test_sensitivity_starves_a_matrix_the_output_does_not_see():
    """Layer 0's value projection has the largest weights, but its attention output is scaled
    to ~0: truncation error (global allocation) spends on it, output sensitivity does not."""
    model = sensitive_bert()
    attention = model.bert.encoder.layer[0].attention
    with torch.no_grad():
        attention.self.value.weight.mul_(20.0)
        attention.output.dense.weight.mul_(1e-6)
    name = "bert.encoder.layer.0.attention.self.value"
    ranks = {}
    for allocation in ("global", "sensitivity"):
        copy = sensitive_bert()
        copy.load_state_dict(model.state_dict())
        report = factorize_(
            copy, LowRankConfig(param_ratio=0.4, allocation=allocation), probe=probe_batches()
        )
        ranks[allocation] = {m.name: m.rank for m in report.modules}[name]
    assert ranks["global"] >= 12
    assert ranks["sensitivity"] <= 3, ranks


def test_the_candidate_ranks_are_the_given_fractions(monkeypatch):
    """Each matrix is measured at exactly its candidates, and none gets less than the smallest."""
    from factorlab import sensitivity

    measured = []
    original = sensitivity.OutputProbe.__call__
    monkeypatch.setattr(
        sensitivity.OutputProbe,
        "__call__",
        lambda self, model: measured.append(1) or original(self, model),
    )
    config = LowRankConfig(
        param_ratio=0.7, allocation="sensitivity", sensitivity_fractions=[1.0, 0.5, 0.5]
    )
    assert config.sensitivity_fractions == [0.5, 1.0]  # sorted, repeats dropped
    report = factorize_(sensitive_bert(), config, probe=probe_batches())
    assert len(measured) == 2 * len(report.modules)  # two candidate ranks per matrix
    for module in report.modules:
        m, n = module.out_features, module.in_features
        largest = min(m, n, (m * n - 1) // (m + n))  # the low-rank spectrum's max_rank
        assert module.rank >= round(0.5 * largest), module  # the smallest candidate: a floor


def test_sensitivity_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="probe batches"):
        factorize_(tiny_bert(), LowRankConfig(allocation="sensitivity"))
    with pytest.raises(ConfigError, match="exclude each other"):
        LowRankConfig(allocation="sensitivity", rank_pattern={"query": 4})
    with pytest.raises(ConfigError, match="drop one of them"):
        LowRankConfig(allocation="sensitivity", allocation_normalize=True)
    with pytest.raises(ConfigError, match="sensitivity_samples"):
        LowRankConfig(allocation="sensitivity", sensitivity_samples=0)
    for fractions in ([], [0.0, 0.5], [1.5], "0.5", [True]):
        with pytest.raises(ConfigError, match="sensitivity_fractions must be"):
            LowRankConfig(allocation="sensitivity", sensitivity_fractions=fractions)
    with pytest.raises(ConfigError, match="candidate ranks of allocation='sensitivity'"):
        LowRankConfig(allocation="global", sensitivity_fractions=[0.5, 1.0])
    with pytest.raises(ConfigError, match="sensitivity_interpolation must be one of"):
        LowRankConfig(allocation="sensitivity", sensitivity_interpolation="cubic")
    with pytest.raises(ConfigError, match="measured curves of allocation='sensitivity'"):
        LowRankConfig(allocation="global", sensitivity_interpolation="linear")
    with pytest.raises(ConfigError, match="cannot be staged"):
        check_stageable(LowRankConfig(allocation="sensitivity"))
    with pytest.raises(ConfigError, match="pruned matrices"):
        make_config("lpaf", allocation="sensitivity")
    with pytest.raises(ConfigError, match="no spectrum"):
        factorize_(
            tiny_bert(),
            make_config("autoencoder", allocation="sensitivity", epochs=1),
            probe=probe_batches(),
        )


def test_cli_sensitivity_run(tmp_path, tiny_model_dir, tiny_glue_dir):
    """A low-rank run with --allocation sensitivity takes its probe from the task's training
    split (no statistics), records the option and gives unequal ranks."""
    from factorlab.cli import main

    out = tmp_path / "sens"
    argv = ["compress", "--model", str(tiny_model_dir), "--task", "rte"]
    argv += ["--data-dir", str(tiny_glue_dir), "--param-ratio", "0.4"]
    argv += ["--allocation", "sensitivity", "--sensitivity-samples", "16"]
    argv += [
        "--sensitivity-fractions",
        "1.0",
        "0.25",
        "0.5",
        "--sensitivity-interpolation",
        "linear",
    ]
    argv += ["--epochs", "1", "--batch-size", "8", "--max-seq-length", "32", "--no-progress"]
    assert main([*argv, "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    factorization = results["factorization"]
    assert factorization["config"]["allocation"] == "sensitivity"
    assert factorization["config"]["sensitivity_samples"] == 16
    assert factorization["config"]["sensitivity_fractions"] == [0.25, 0.5, 1.0]
    assert factorization["config"]["sensitivity_interpolation"] == "linear"
    assert results["calibration"]["task"] == "rte"
    assert len({m["rank"] for m in factorization["modules"]}) > 1


def test_cli_act_svd_sensitivity_sequential_run(tmp_path, tiny_model_dir, tiny_glue_dir):
    """act-svd plans its sensitivity ranks on the dense model, then calibrates each block on the
    compressed blocks before it: the run records both and unequal ranks."""
    from factorlab.cli import main

    out = tmp_path / "sens-seq"
    argv = ["compress", "--model", str(tiny_model_dir), "--task", "rte", "--method", "act-svd"]
    argv += ["--data-dir", str(tiny_glue_dir), "--param-ratio", "0.4", "--sequential"]
    argv += ["--allocation", "sensitivity", "--sensitivity-samples", "8", "--max-steps", "2"]
    argv += ["--calibration-samples", "16", "--batch-size", "8", "--max-seq-length", "32"]
    assert main([*argv, "--no-progress", "--output", str(out)]) == 0
    factorization = json.loads((out / "results.json").read_text())["factorization"]
    assert factorization["config"]["sequential"] is True
    assert factorization["config"]["allocation"] == "sensitivity"
    assert factorization["calibration_peak_bytes"] > 0
    assert len({m["rank"] for m in factorization["modules"]}) > 1


def test_cli_sensitivity_without_data_is_refused_before_any_work(tmp_path, tiny_model_dir, capsys):
    from factorlab.cli import main

    out = tmp_path / "none"
    argv = ["compress", "--model", str(tiny_model_dir), "--allocation", "sensitivity"]
    assert main([*argv, "--output", str(out)]) == 2
    assert "--allocation sensitivity needs calibration data" in capsys.readouterr().err
    assert not out.exists()
