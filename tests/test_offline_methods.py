"""FWSVD and activation-aware SVD: projections, methods, checkpoints and the CLI."""

import json

import pytest
import torch
from torch.testing import assert_close

import factorlab as fl
from factorlab.calibration import ModuleStatistics, collect_statistics
from factorlab.checkpoint import load, save
from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.layers import LowRankLinear
from factorlab.methods import ActSVDConfig, FWSVDConfig, get_method
from factorlab.projections.activation_svd import activation_svd, whitening_factor
from factorlab.projections.svd import truncated_svd
from factorlab.projections.weighted_svd import fisher_weights, weighted_svd
from tests.tiny import VOCAB, logits, tiny_bert, tokens


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(tokens_: int, n: int, seed: int = 1) -> torch.Tensor:
    """Inputs with a strongly anisotropic covariance (a few dominant directions)."""
    mix = torch.randn(n, n, generator=gen(seed)) * torch.logspace(0, -3, n)[:, None]
    return torch.randn(tokens_, n, generator=gen(seed + 1)) @ mix


def test_fwsvd_with_uniform_weights_is_plain_svd():
    W = torch.randn(12, 9, generator=gen())
    plain = truncated_svd(W, 4)
    for kwargs in ({"row_weights": torch.full((12,), 3.0)}, {"col_weights": torch.ones(9)}):
        f = weighted_svd(W, 4, **kwargs)
        assert_close(f.A, plain.A)
        assert_close(f.B, plain.B)
        assert f.rel_error == pytest.approx(plain.rel_error)


def test_fwsvd_minimizes_the_weighted_error():
    W = torch.randn(16, 10, generator=gen()).double()
    w = torch.rand(16, generator=gen(1)).double() * 5 + 0.1
    f = weighted_svd(W, 3, row_weights=w)
    plain = truncated_svd(W, 3)
    D = w / w.mean()

    def weighted(A, B):
        return torch.linalg.matrix_norm(D[:, None] * (W - A @ B)).item()

    assert weighted(f.A, f.B) < weighted(plain.A, plain.B)
    # Eckart-Young on D W: the weighted error is the discarded singular mass of D W
    S = torch.linalg.svdvals(D[:, None] * W)
    assert weighted(f.A, f.B) == pytest.approx(S[3:].square().sum().sqrt().item(), rel=1e-9)
    # the reported error is the plain one
    assert f.rel_error == pytest.approx(
        (torch.linalg.matrix_norm(W - f.A @ f.B) / torch.linalg.matrix_norm(W)).item()
    )
    assert f.rel_error > plain.rel_error  # plain SVD is optimal in the plain norm


def test_fisher_weights_and_bad_inputs():
    fisher = torch.tensor([[1.0, 3.0], [0.0, 0.0], [4.0, 5.0]])
    assert_close(fisher_weights(fisher, "out"), torch.tensor([2.0, 0.0, 3.0]).double())
    assert_close(fisher_weights(fisher, "in"), torch.tensor([5.0**0.5, 8.0**0.5]).double())
    # a zero row weight is floored, the factors stay finite
    f = weighted_svd(torch.randn(3, 2, generator=gen()), 1, row_weights=fisher_weights(fisher))
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    with pytest.raises(ValueError):
        fisher_weights(-fisher)
    with pytest.raises(ValueError):
        fisher_weights(fisher, "rows")
    with pytest.raises(ValueError):
        weighted_svd(torch.randn(3, 2), 1, row_weights=torch.ones(2))


def test_act_svd_with_identity_gram_is_plain_svd():
    W = torch.randn(10, 8, generator=gen())
    plain = truncated_svd(W, 3)
    exact = activation_svd(W, 3, torch.eye(8), eps=0.0)
    assert_close(exact.A, plain.A)
    assert_close(exact.B, plain.B)
    damped = activation_svd(W, 3, torch.eye(8))  # default damping: the same product
    assert_close(damped.A @ damped.B, plain.A @ plain.B)
    assert damped.decomposition == "cholesky"


def test_act_svd_lowers_the_output_error():
    W = torch.randn(24, 16, generator=gen())
    X = correlated_inputs(200, 16)
    G = X.double().T @ X.double()
    plain = truncated_svd(W, 4)
    aware = activation_svd(W, 4, G)

    def output_error(A, B):
        return torch.linalg.matrix_norm(X @ W.T - X @ (A @ B).T).item()

    assert output_error(aware.A, aware.B) < 0.8 * output_error(plain.A, plain.B)
    assert aware.rel_error > plain.rel_error  # it pays in the plain weight norm
    assert 0 < aware.output_rel_error < 1


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-2])
def test_act_svd_survives_singular_and_ill_conditioned_grams(eps):
    n = 12
    W = torch.randn(9, n, generator=gen())
    low_rank_inputs = torch.randn(30, 3, generator=gen(1)) @ torch.randn(3, n, generator=gen(2))
    singular = low_rank_inputs.double().T @ low_rank_inputs.double()  # rank 3
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(3)).double())
    ill = Q @ torch.diag(torch.logspace(6, -12, n).double()) @ Q.T  # condition 1e18
    indefinite = Q @ torch.diag(torch.linspace(-1e-9, 1.0, n).double()) @ Q.T
    for G in (singular, ill, indefinite, torch.zeros(n, n)):
        f = activation_svd(W, 4, G, eps=eps)
        assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all(), (eps, f.decomposition)
        assert f.rel_error < 10
    # no damping and a singular Gram: Cholesky fails, the eigen-decomposition takes over
    C, C_inv, how, _ = whitening_factor(singular, eps=0.0)
    assert how == "eigh"
    assert_close(C @ C_inv, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    assert activation_svd(W, 4, torch.zeros(n, n)).decomposition == "identity"
    with pytest.raises(ValueError):
        activation_svd(W, 4, torch.full((n, n), float("nan")))


def calibration_batches() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(2, VOCAB, (6, 10), generator=gen(5))
    return [
        {"input_ids": ids[i : i + 3], "labels": torch.tensor([0, 1, 1])[: len(ids[i : i + 3])]}
        for i in (0, 3)
    ]


@pytest.mark.parametrize(
    "config", [FWSVDConfig(0.5), FWSVDConfig(0.5, fisher_axis="in"), ActSVDConfig(0.5)]
)
def test_methods_give_low_rank_layers_with_low_rank_ranks(config, tmp_path):
    model = tiny_bert()
    stats = collect_statistics(model, calibration_batches(), progress=False)
    report = fl.factorize_(model, config, stats)
    reference = fl.factorize_(tiny_bert(), fl.LowRankConfig(0.5))
    assert [m.rank for m in report.modules] == [m.rank for m in reference.modules]
    assert report.targeted_after == reference.targeted_after
    layers = fl.factorized_modules(model)
    assert layers and all(isinstance(layer, LowRankLinear) for layer in layers.values())
    for m in report.modules:  # the plain relative Frobenius error, as the layer computes
        W = dict(tiny_bert().named_modules())[m.name].weight
        A = layers[m.name].to_dense()
        expected = (torch.linalg.matrix_norm(W - A) / torch.linalg.matrix_norm(W)).item()
        assert m.rel_error == pytest.approx(expected, rel=1e-4)
    save(model, tmp_path / "ck", method=report.config)
    ids = tokens()
    assert_close(logits(load(tmp_path / "ck"), ids), logits(model, ids), rtol=0, atol=0)


def test_act_svd_model_output_closer_than_low_rank_on_calibration_inputs():
    batches = calibration_batches()
    model = tiny_bert()
    stats = collect_statistics(model, batches, fisher=False, progress=False)
    aware = tiny_bert()
    fl.factorize_(aware, ActSVDConfig(0.25), stats)
    plain = tiny_bert()
    fl.factorize_(plain, fl.LowRankConfig(0.25))
    ids = torch.cat([b["input_ids"] for b in batches])
    dense = logits(model, ids)
    err_aware = (logits(aware, ids) - dense).norm()
    err_plain = (logits(plain, ids) - dense).norm()
    assert err_aware < err_plain


def test_methods_need_statistics():
    assert get_method("fwsvd").needs_calibration and get_method("fwsvd").statistics == ("fisher",)
    assert get_method("act-svd").statistics == ("gram",)
    with pytest.raises(ConfigError, match="calibration"):
        fl.factorize_(tiny_bert(), FWSVDConfig(0.5))
    name = "bert.encoder.layer.0.attention.self.query"
    no_fisher = {
        name: ModuleStatistics(fisher=None, gram=torch.eye(32), num_batches=1, num_tokens=1)
    }
    with pytest.raises(ConfigError, match="Fisher"):
        fl.factorize_(tiny_bert(), FWSVDConfig(0.5, target_modules=[name]), no_fisher)
    with pytest.raises(ConfigError, match="fisher_axis"):
        FWSVDConfig(0.5, fisher_axis="rows")
    with pytest.raises(ConfigError, match="eps"):
        ActSVDConfig(0.5, eps=-1.0)


def test_cli_compress_with_calibration(tiny_model_dir, tiny_glue_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--param-ratio", "0.5", "--no-progress"]
    out = tmp_path / "fw"
    args = ["compress", "--method", "fwsvd", "--fisher-axis", "in", *common, "--task", "rte"]
    args += ["--data-dir", str(tiny_glue_dir), "--calibration-samples", "8", "--epochs", "1"]
    rc = main([*args, "--max-seq-length", "16", "--output", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert (
        results["method"] == "fwsvd" and results["factorization"]["config"]["fisher_axis"] == "in"
    )
    assert results["calibration"]["task"] == "rte" and results["calibration"]["samples"] == 8
    assert "calibration" in results["timings"] and "accuracy" in results["metrics"]

    text = tmp_path / "calib.txt"
    text.write_text("the movie was fun\na boring plot\n")
    out = tmp_path / "act"
    args = ["compress", "--method", "act-svd", *common, "--calibration-file", str(text)]
    rc = main([*args, "--output", str(out)])
    assert rc == 0
    assert json.loads((out / "results.json").read_text())["calibration"]["file"] == str(text)
    # refused before any work: Fisher from a text file, a calibration method without data
    for bad in (
        ["--method", "fwsvd", "--calibration-file", str(text)],
        ["--method", "act-svd"],
        ["--method", "low-rank", "--calibration-task", "rte", "--data-dir", str(tiny_glue_dir)],
    ):
        assert main(["compress", *bad, *common, "--output", str(tmp_path / "bad")]) == 2
        assert not (tmp_path / "bad").exists()


def test_unwhiten_by_triangular_solve_equals_the_explicit_inverse():
    from factorlab.projections.activation_svd import unwhiten

    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, 24, generator=g, dtype=torch.float64)
    C, C_inv, how, _ = whitening_factor(X.T @ X)
    C_lazy, none, _, _ = whitening_factor(X.T @ X, inverse=False)
    assert how == "cholesky" and none is None
    assert_close(C_lazy, C, rtol=0, atol=0)
    B_white = torch.randn(5, 24, generator=g, dtype=torch.float64)
    assert_close(unwhiten(B_white, C, None), B_white @ C_inv, rtol=1e-10, atol=1e-12)
