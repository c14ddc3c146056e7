"""Autoencoder compression [K23]: sizes, parameter accounting, the layer, shared decoders."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.testing import assert_close

import factorlab as fl
from factorlab.checkpoint import build_spec, load, save
from factorlab.errors import CheckpointError, ConfigError
from factorlab.layers import DecodedLinear, RowDecoder
from factorlab.methods import AutoencoderConfig
from factorlab.projections.autoencoder import (
    decoder_sizes,
    fit_autoencoder,
    latent_size,
    reconstruction_loss,
    stored_parameters,
)
from tests.tiny import logits, tiny_bert, tokens

QUERY = "bert.encoder.layer.{}.attention.self.query"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def quadratic(x: float, rows: int, n: int, cr: float) -> float:
    """METHODS.md §6: 10 x^2 + (rows + 11 + 4 n) x + (n + rows - rows n / cr)."""
    return 10 * x * x + (rows + 11 + 4 * n) * x + (n + rows - rows * n / cr)


@pytest.mark.parametrize(
    ("rows", "n", "cr", "expected"),
    [(2304, 384, 4, 50), (384, 384, 4, 17), (9216, 384, 2, 144), (2304, 1536, 2, 173)],
)
def test_latent_size_is_the_root_of_the_quadratic(rows, n, cr, expected):
    d = latent_size(rows, n, cr)
    assert d == expected  # MiniLM's stacked query / one query / intermediate / output groups
    assert quadratic(d, rows, n, cr) <= 0 < quadratic(d + 1, rows, n, cr)
    # the exact stored count never exceeds the budget
    assert stored_parameters(rows, n, d) <= rows * n / cr


def test_stored_parameters_formula_and_linear_variant():
    rows, n, d = 100, 24, 5
    decoder = RowDecoder.standard(d, n)
    assert decoder.hidden == [10, 20]
    assert sum(p.numel() for p in decoder.parameters()) + rows * d + rows == stored_parameters(
        rows, n, d
    )
    assert stored_parameters(rows, n, d) == 10 * d * d + (rows + 6 + 4 * n) * d + n + rows
    assert stored_parameters(rows, n, d, linear=True) == d * (rows + n) + n + rows
    dl = latent_size(rows, n, 4, linear=True)
    assert dl == math.floor((rows * n / 4 - n - rows) / (rows + n))
    assert (
        stored_parameters(rows, n, dl, True)
        <= rows * n / 4
        < stored_parameters(rows, n, dl + 1, True)
    )
    assert latent_size(4, 4, 100) == 0  # nothing fits
    assert decoder_sizes(3, 7, linear=True) == [3, 7]


def test_decoded_linear_forward_is_x_times_decoded_weight():
    torch.manual_seed(0)
    decoder = RowDecoder.standard(3, 8)
    latents = torch.randn(5, 3, generator=gen(1))
    norms = torch.rand(5, generator=gen(2)) + 0.5
    bias = torch.randn(5, generator=gen(3))
    layer = DecodedLinear.from_parts(decoder, latents, norms, bias)
    h = latents
    for i, lin in enumerate(decoder.layers):
        h = F.linear(h, lin.weight, lin.bias)
        h = F.leaky_relu(h) if i < 2 else torch.tanh(h)
    W = h * (norms / h.norm(dim=1))[:, None]
    x = torch.randn(2, 4, 8, generator=gen(4))
    assert_close(layer.to_dense(), W)
    assert_close(layer.to_dense().norm(dim=1), norms)
    assert_close(layer(x), x @ W.T + bias)
    layer.eval()
    with torch.no_grad():
        assert_close(layer(x), x @ W.T + bias)
    assert not layer.norms.requires_grad and layer.latents.requires_grad


def test_eval_cache_is_invalidated_after_a_training_step():
    layer = DecodedLinear.from_parts(
        RowDecoder.standard(2, 6), torch.randn(4, 2, generator=gen()), torch.ones(4)
    )
    x = torch.randn(3, 6, generator=gen(1))
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        cached = layer.decoded_weight()
        assert layer.decoded_weight() is cached  # cached while nothing changes
    layer.train()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        after = layer(x)
        assert_close(after, x @ layer.to_dense().T)
        assert not torch.allclose(after, before)
        # an in-place change in eval mode (e.g. load_state_dict) is seen too
        layer.decoder.layers[0].bias.add_(1.0)
        assert_close(layer(x), x @ layer.to_dense().T)
    # in eval mode with autograd on, gradients still reach latents and decoder
    layer.zero_grad()
    layer(x).sum().backward()
    assert layer.latents.grad is not None and layer.decoder.layers[0].weight.grad is not None


def test_fit_learns_and_is_deterministic():
    basis = torch.randn(3, 16, generator=gen())
    W = torch.randn(64, 3, generator=gen(1)) @ basis  # rows in a 3-dim subspace
    options = {"linear": True, "epochs": 20, "batch_size": 8, "learning_rate": 1e-2}
    options["holdout_fraction"] = 0.1
    fit = fit_autoencoder([W[:40], W[40:]], 4, **options)
    again = fit_autoencoder([W[:40], W[40:]], 4, **options)
    assert_close(fit.latents[0], again.latents[0], rtol=0, atol=0)
    assert [z.shape for z in fit.latents] == [(40, 4), (24, 4)]
    assert_close(fit.norms[1], W[40:].norm(dim=1))
    assert max(fit.rel_errors) < 0.1  # held-out rows included
    assert fit.scores[fit.best_epoch - 1] == min(fit.scores) and len(fit.scores) == 20
    assert fit.selection == "held-out rows"
    assert fit_autoencoder([W], 2, epochs=1).selection == "all rows"
    w = torch.randn(5, 7, generator=gen(2))
    assert reconstruction_loss(w, w).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        fit_autoencoder([W, torch.randn(3, 5)], 2)


def compressed(sharing="stacked", linear=False, ratio=0.5):
    model = tiny_bert()
    config = AutoencoderConfig(ratio, sharing=sharing, linear=linear, epochs=2)
    return model, fl.factorize_(model, config)


@pytest.mark.parametrize(("sharing", "linear"), [("stacked", False), ("per-matrix", True)])
def test_parameter_accounting_is_exact(sharing, linear):
    model, report = compressed(sharing, linear)
    dense = tiny_bert()
    untargeted = fl.count_parameters(dense) - report.targeted_before
    assert report.targeted_after + untargeted == fl.count_parameters(model)
    layers = fl.factorized_modules(model)
    assert len(layers) == 12
    decoders = {id(layer.decoder) for layer in layers.values()}
    assert len(decoders) == (6 if sharing == "stacked" else 12)
    # each group stays within its budget (weights only; biases are kept dense)
    groups: dict[int, list[str]] = {}
    for name, layer in layers.items():
        groups.setdefault(id(layer.decoder), []).append(name)
    for names in groups.values():
        rows = sum(layers[n].out_features for n in names)
        n_in = layers[names[0]].in_features
        d = layers[names[0]].latent_size
        budget = 0.5 * rows * n_in
        assert stored_parameters(rows, n_in, d, linear) <= budget
        assert d == latent_size(rows, n_in, rows * n_in / budget, linear)
        reported = sum(m.params_after for m in report.modules if m.name in names)
        assert reported == stored_parameters(rows, n_in, d, linear) + sum(
            layers[n].out_features for n in names
        )  # + biases
        assert all(m.rank == d for m in report.modules if m.name in names)


def test_shared_decoder_is_saved_once_and_shared_after_load(tmp_path):
    model, report = compressed()
    save(model, tmp_path / "ck", method=report.config)
    spec = json.loads((tmp_path / "ck" / "factorlab.json").read_text())
    group = "bert.encoder.layer.N.attention.self.query[0,1]"
    assert spec["modules"][QUERY.format(0)]["decoder"] == group
    assert spec["shared_modules"][group] == {
        "kind": "row_decoder",
        "latent_size": report.modules[0].rank,
        "out_features": 32,
        "hidden": [2 * report.modules[0].rank, 4 * report.modules[0].rank],
        "linear": False,
    }
    with safe_open(str(tmp_path / "ck" / "factorized.safetensors"), "pt") as f:
        keys = list(f.keys())
    decoder_keys = [k for k in keys if ".decoder." in k]
    assert len(decoder_keys) == 6 * 6  # 6 groups x (3 weights + 3 biases), once each
    assert len([k for k in decoder_keys if ".attention.self.query." in k]) == 6
    loaded = load(tmp_path / "ck")
    ids = tokens()
    assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    q0 = loaded.get_submodule(QUERY.format(0))
    q1 = loaded.get_submodule(QUERY.format(1))
    assert isinstance(q0, DecodedLinear) and q0.decoder is q1.decoder
    assert fl.count_parameters(loaded) == fl.count_parameters(model)
    # fine-tuning keeps sharing: one step moves the decoder of both layers
    loaded.train()
    logits(loaded, ids)  # no_grad forward in train mode leaves the cache empty
    with torch.no_grad():
        q0.decoder.layers[0].bias.add_(0.1)
    assert_close(q1.to_dense(), q1.decoder(q1.latents, q1.norms))


def test_two_decoders_under_one_name_are_refused():
    model, _ = compressed()
    layer = model.get_submodule(QUERY.format(1))
    layer.decoder = RowDecoder.standard(layer.latent_size, layer.in_features)
    with pytest.raises(CheckpointError, match="distinct names"):
        build_spec(model)


def test_decoders_fitted_separately_get_distinct_names(tmp_path):
    model = tiny_bert()
    for block in (0, 1):  # as staged factorization does: one block at a time
        pattern = rf"bert\.encoder\.layer\.{block}\.attention\.self\.(query|key)"
        fl.factorize_(model, AutoencoderConfig(0.5, epochs=1, target_modules=pattern))
    names = {layer.decoder_name for layer in fl.factorized_modules(model).values()}
    assert len(names) == 4 and QUERY.format(1) in names
    save(model, tmp_path / "ck")
    assert_close(logits(load(tmp_path / "ck"), tokens()), logits(model, tokens()))


def test_config_checks_and_explicit_latent_sizes():
    with pytest.raises(ConfigError):
        AutoencoderConfig(0.5, sharing="all")
    with pytest.raises(ConfigError):
        AutoencoderConfig(0.5, epochs=0)
    model = tiny_bert()
    report = fl.factorize_(
        model,
        AutoencoderConfig(0.5, epochs=1, rank_pattern={"query": 2}, target_modules=["query"]),
    )
    assert [m.rank for m in report.modules] == [2, 2]
    with pytest.raises(ConfigError, match="latent sizes"):
        fl.factorize_(
            tiny_bert(),
            AutoencoderConfig(
                0.5, epochs=1, rank_pattern={r"layer\.0": 2}, target_modules=["query"]
            ),
        )


def test_cli_compress_and_load(tiny_model_dir, tmp_path, capsys):
    from factorlab.cli import main

    out = tmp_path / "ae"
    common = ["--model", str(tiny_model_dir), "--no-progress", "--output", str(out)]
    args = ["compress", "--method", "autoencoder", "--target-modules", "query", *common]
    assert main(args) == 0  # one group: 30 epochs (the default) of 4 steps
    results = json.loads((out / "results.json").read_text())
    assert results["parameters"]["model_after"] == fl.count_parameters(load(out))
    assert results["factorization"]["config"]["sharing"] == "stacked"
    assert main(["info", str(out)]) == 0
    assert "decoded_rows" in capsys.readouterr().out
