"""Monarch: projection, layer, method [D22, METHODS.md §2]."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from transformers import BertConfig, BertModel

import factorlab as fl
from factorlab.errors import ConfigError
from factorlab.layers import FactorizedLinear, MonarchLinear
from factorlab.projections import (
    MonarchFactors,
    monarch_num_parameters,
    monarch_project,
    rank_for_param_ratio,
)

# (out m, in n, input blocks k, output blocks j, block rank r): square, rectangular both ways,
# k != j, and shapes that no block count divides (padded).
SHAPES = [
    (16, 16, 4, 4, 2),
    (24, 12, 4, 4, 3),
    (12, 20, 2, 2, 3),
    (24, 12, 3, 4, 2),
    (10, 7, 4, 4, 1),
    (13, 9, 3, 2, 2),
]
IDS = [f"{m}x{n}-k{k}j{j}r{r}" for m, n, k, j, r in SHAPES]


def random_monarch(
    m: int, n: int, k: int, j: int, r: int, seed: int = 0, bias: bool = True
) -> MonarchLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = MonarchLinear(n, m, k, r, bias=bias, nblocks_out=j)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES, ids=IDS)
def test_random_monarch_matrix_is_recovered_exactly(m, n, k, j, r):
    dense = random_monarch(m, n, k, j, r).to_dense()  # float32
    factors = monarch_project(dense, k, j, r)
    assert isinstance(factors, MonarchFactors)
    assert factors.L.dtype == torch.float32 and factors.R.dtype == torch.float32
    assert (factors.nblocks_in, factors.nblocks_out, factors.rank) == (k, j, r)
    rebuilt = MonarchLinear.from_factors(factors.L, factors.R, n, m).to_dense()
    assert rebuilt.shape == (m, n)
    assert rel_err(rebuilt, dense) < 1e-5
    assert factors.rel_error < 1e-5


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES, ids=IDS)
def test_squared_error_is_the_discarded_singular_mass(m, n, k, j, r):
    r = 1  # below every block's smaller side, so something is discarded
    weight = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    factors = monarch_project(weight, k, j, r)
    approx = MonarchLinear.from_factors(factors.L, factors.R, n, m).to_dense()
    dense_sq_error = (weight - approx).square().sum()
    s = factors.singular_values
    assert s.shape[:2] == (j, k)
    discarded = s[..., r:].square().sum()
    assert discarded > 0
    assert_close(dense_sq_error, discarded)
    assert math.isclose(
        factors.rel_error, math.sqrt(discarded / weight.square().sum()), rel_tol=1e-9
    )
    # the Frobenius norm is preserved by the block split: all singular values carry all of it
    assert_close(s.square().sum(), weight.square().sum())


def test_each_stride_submatrix_has_the_block_rank():
    """Independent of the factor layout: ``M[lam j + jj, kk i + ii]`` has rank <= r (METHODS §2)."""
    m, n, k, j, r = 24, 12, 3, 4, 2
    dense = random_monarch(m, n, k, j, r).double().to_dense().detach()
    for jj in range(j):
        for kk in range(k):
            sub = dense[jj::j, kk * (n // k) : (kk + 1) * (n // k)]
            assert torch.linalg.matrix_rank(sub).item() == r
    # a contiguous block is NOT low-rank in general: the stride is what the structure means
    assert torch.linalg.matrix_rank(dense[: m // j, : n // k]).item() > r


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES, ids=IDS)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_equals_dense_matmul(m, n, k, j, r, lead, bias):
    layer = random_monarch(m, n, k, j, r, bias=bias)
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(2))
    expected = x @ layer.to_dense().T + (layer.bias if bias else 0)
    with torch.no_grad():  # fused inference path
        out = layer(x)
    assert out.shape == (*lead, m) and out.is_contiguous()
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out_grad = layer(x)  # autograd path
    assert out_grad.requires_grad
    assert_close(out_grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 400, 10**9])
@pytest.mark.parametrize(
    "shape",
    [(13, 9, 3, 2, 2), (12, 8, 1, 2, 2), (8, 8, 2, 2, 4)],
    ids=["padded", "k1-aliased", "buffer-reused"],
)
def test_chunked_inference_path_equals_dense(monkeypatch, chunk_bytes, shape):
    """The inference path permutes the output in token chunks through one buffer (the dead
    stage-one output when large enough; never when the reshaped intermediate is a view of it)."""
    import factorlab.layers.block_low_rank as blr_module

    monkeypatch.setattr(blr_module, "_CHUNK_BYTES", chunk_bytes)
    m, n, k, j, r = shape
    layer = random_monarch(m, n, k, j, r)
    x = torch.randn(7, n)
    with torch.inference_mode():
        out = layer(x)
    assert_close(out, x @ layer.to_dense().T + layer.bias, rtol=1e-5, atol=1e-5)


def test_forward_on_empty_and_non_contiguous_input():
    layer = random_monarch(24, 12, 4, 4, 2)
    with torch.inference_mode():
        assert layer(torch.randn(0, 12)).shape == (0, 24)
        x = torch.randn(12, 6).T  # (6, 12), not contiguous
        assert_close(layer(x), x @ layer.to_dense().T + layer.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), [SHAPES[1], SHAPES[5]], ids=[IDS[1], IDS[5]])
def test_gradients_equal_those_of_the_dense_form(m, n, k, j, r):
    layer = random_monarch(m, n, k, j, r).double()
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, m, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    grads = [x.grad, layer.L.grad, layer.R.grad, layer.bias.grad]
    x.grad = None
    layer.zero_grad()
    (torch.nn.functional.linear(x, layer.to_dense(), layer.bias) * g).sum().backward()
    for got, want in zip(grads, [x.grad, layer.L.grad, layer.R.grad, layer.bias.grad], strict=True):
        assert_close(got, want)


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES, ids=IDS)
def test_parameter_count_matches_the_formula(m, n, k, j, r):
    layer = random_monarch(m, n, k, j, r)
    m_pad, n_pad = math.ceil(m / j) * j, math.ceil(n / k) * k
    assert monarch_num_parameters(m, n, k, r, nblocks_out=j) == r * (k * m_pad + j * n_pad)
    assert layer.num_parameters() == monarch_num_parameters(m, n, k, r, nblocks_out=j) + m


def test_parameter_count_examples():
    # METHODS.md §2: r (k m + j n); with k = j = b: b r (m + n)
    assert monarch_num_parameters(3072, 768, 4, 76) == 4 * 76 * (3072 + 768) == 1_167_360
    assert monarch_num_parameters(768, 768, 2, 5, nblocks_out=3) == 5 * (2 * 768 + 3 * 768)
    # fly's MonarchLinear(nblocks=4) on 768x768 (r = 768 / 16 = 48) keeps half
    assert monarch_num_parameters(768, 768, 4, 48) / 768**2 == 0.5
    # padded: 10x7 with b = 4 counts as 12x8
    assert monarch_num_parameters(10, 7, 4, 1) == 4 * (12 + 8)


def test_invalid_arguments_raise_clear_errors():
    weight = torch.randn(16, 16)
    with pytest.raises(ValueError, match=r"block rank must be an int in \[1, 4\].*4x4"):
        monarch_project(weight, 4, 4, 5)
    with pytest.raises(ValueError, match="2-D"):
        monarch_project(torch.randn(2, 16, 16), 4, 4, 1)
    with pytest.raises(ValueError, match="nblocks_in"):
        monarch_project(weight, 0, 4, 1)
    with pytest.raises(ValueError, match="exceeds"):
        monarch_project(torch.randn(16, 3), 4, 4, 1)
    with pytest.raises(ValueError, match="rank"):
        MonarchLinear(16, 16, 4, 5)
    with pytest.raises(ValueError, match="inconsistent"):
        MonarchLinear.from_factors(torch.zeros(4, 4, 8), torch.zeros(4, 12, 4))


def test_spec_round_trip_gives_identical_outputs():
    layer = random_monarch(13, 9, 3, 2, 2)
    spec = layer.spec()
    assert spec["kind"] == "monarch"
    assert (spec["nblocks"], spec["nblocks_out"], spec["rank"]) == (3, 2, 2)
    rebuilt = FactorizedLinear.from_spec(spec)
    assert isinstance(rebuilt, MonarchLinear)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    # factors keep the "NN" storage (transposes of contiguous arrays) the forward is tuned for
    assert rebuilt.L.stride(1) == 1 and rebuilt.R.stride(1) == 1
    x = torch.randn(3, 9)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), layer(x))


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
    )
    return BertModel(config).eval()


def hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize(
    "config",
    [fl.MonarchConfig(param_ratio=0.5), fl.MonarchConfig(param_ratio=0.25, nblocks=2)],
    ids=["p0.5-b4", "p0.25-b2"],
)
def test_factorize_tiny_bert_and_reload(config, tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    dense_out = hidden(model, ids)
    report = fl.factorize_(model, config)

    assert len(report.modules) == 12
    assert all(mod.kind == "monarch" for mod in report.modules)
    weights_before = sum(mod.params_before - mod.out_features for mod in report.modules)
    weights_after = sum(mod.params_after - mod.out_features for mod in report.modules)
    assert weights_after <= config.param_ratio * weights_before
    assert report.kept_ratio <= config.param_ratio + 0.02  # the biases are kept whole
    assert all(0.0 < mod.rel_error < 1.0 for mod in report.modules)
    layers = fl.factorized_modules(model)
    assert len(layers) == 12 and all(isinstance(v, MonarchLinear) for v in layers.values())
    out = hidden(model, ids)
    assert out.shape == dense_out.shape and torch.isfinite(out).all()

    # rebuild every layer from its spec alone, load strictly: identical outputs
    fresh = tiny_bert()
    for name, layer in layers.items():
        fresh.set_submodule(name, FactorizedLinear.from_spec(layer.spec()))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(hidden(fresh.eval(), ids), out)

    # and through the checkpoint format
    fl.save(model, tmp_path / "ckpt", method=config.to_dict())
    loaded = fl.load(tmp_path / "ckpt")
    assert isinstance(loaded.get_submodule("encoder.layer.0.intermediate.dense"), MonarchLinear)
    assert torch.equal(hidden(loaded, ids), out)
    # densify exports the same function as plain nn.Linear layers
    assert_close(hidden(fl.densify(loaded), ids), out, rtol=1e-4, atol=1e-4)


def test_budget_matches_low_rank_at_equal_parameters():
    """The benchmark's premise: at each p the Monarch and low-rank layers keep about as much."""
    for m, n in ((768, 768), (3072, 768)):
        for p in (0.5, 0.25):
            lr = rank_for_param_ratio(m, n, p) * (m + n)
            rank = fl.projections.block_rank_for_param_ratio(m, n, 4, p)
            mon = monarch_num_parameters(m, n, 4, rank)
            assert mon <= p * m * n and abs(mon - lr) / lr < 0.02


def test_config_validation_and_infeasible_budget():
    assert fl.make_config("monarch", nblocks=2).nblocks == 2
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="nblocks"):
            fl.MonarchConfig(nblocks=bad)
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 64x64, b = 4: rank 1 keeps 4 (64 + 64) / 64^2 = 0.125 of the weights
    with pytest.raises(ConfigError, match=r"smallest feasible param_ratio is 0\.125"):
        fl.factorize_(model, fl.MonarchConfig(param_ratio=0.1))
    assert not fl.factorized_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rank_pattern_sets_the_block_rank_and_full_budget_stays_dense():
    model = tiny_bert()
    config = fl.MonarchConfig(param_ratio=0.5, rank_pattern={r"intermediate": 3})
    report = fl.factorize_(model, config)
    ranks = {mod.name: mod.rank for mod in report.modules}
    assert ranks["encoder.layer.0.intermediate.dense"] == 3
    assert ranks["encoder.layer.0.output.dense"] == 5  # floor(0.5 * 128 * 64 / (4 * 192))
    # b = 1 and a rank capped at min(m, n): r (m + n) >= m n, not smaller than dense -> left dense
    model = tiny_bert()
    config = fl.MonarchConfig(nblocks=1, rank_pattern={".": 1000})
    report = fl.factorize_(model, config)
    assert all(mod.kind == "dense" and mod.rank is None for mod in report.modules)
