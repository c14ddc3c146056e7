"""Block-wise low-rank: projection, layer, method, and its relation to Monarch [G24, METHODS §3]."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.testing import assert_close
from transformers import BertConfig, BertModel

import factorlab as fl
from factorlab.errors import ConfigError
from factorlab.layers import BlockLowRankLinear, FactorizedLinear, MonarchLinear
from factorlab.projections import (
    BlockLowRankFactors,
    block_low_rank_num_parameters,
    block_low_rank_project,
    block_rank_for_param_ratio,
    monarch_num_parameters,
    monarch_project,
    stride_permutation,
)

# (out m, in n, input blocks k, output blocks j, block rank r); the last two are padded.
SHAPES = [
    (16, 16, 4, 4, 2),
    (24, 12, 4, 4, 3),
    (12, 20, 2, 2, 3),
    (24, 12, 3, 4, 2),
    (10, 7, 4, 4, 1),
    (13, 9, 3, 2, 2),
]
IDS = [f"{m}x{n}-k{k}j{j}r{r}" for m, n, k, j, r in SHAPES]


def random_blr(
    m: int, n: int, k: int, j: int, r: int, seed: int = 0, bias: bool = True
) -> BlockLowRankLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = BlockLowRankLinear(n, m, k, r, bias=bias, nblocks_out=j)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return layer


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES, ids=IDS)
def test_random_blr_matrix_is_recovered_exactly(m, n, k, j, r):
    dense = random_blr(m, n, k, j, r).to_dense()  # float32
    factors = block_low_rank_project(dense, k, j, r)
    assert isinstance(factors, BlockLowRankFactors)
    assert factors.U.dtype == torch.float32 and factors.V.dtype == torch.float32
    assert (factors.nblocks_in, factors.nblocks_out, factors.rank) == (k, j, r)
    rebuilt = BlockLowRankLinear.from_factors(factors.U, factors.V, n, m).to_dense()
    assert rebuilt.shape == (m, n)
    assert rel_err(rebuilt, dense) < 1e-5
    assert factors.rel_error < 1e-5


def test_each_contiguous_block_has_the_block_rank():
    m, n, k, j, r = 24, 12, 3, 4, 2
    dense = random_blr(m, n, k, j, r).double().to_dense().detach()
    bo, bi = m // j, n // k
    for jj in range(j):
        for kk in range(k):
            block = dense[jj * bo : (jj + 1) * bo, kk * bi : (kk + 1) * bi]
            assert torch.linalg.matrix_rank(block).item() == r


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES, ids=IDS)
def test_squared_error_is_the_discarded_singular_mass(m, n, k, j, r):
    r = 1  # below every block's smaller side, so something is discarded
    weight = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    factors = block_low_rank_project(weight, k, j, r)
    approx = BlockLowRankLinear.from_factors(factors.U, factors.V, n, m).to_dense()
    discarded = factors.singular_values[..., r:].square().sum()
    assert discarded > 0
    assert_close((weight - approx).square().sum(), discarded)
    expected = math.sqrt(discarded / weight.square().sum())
    assert math.isclose(factors.rel_error, expected, rel_tol=1e-9)
    # per block too: block (jj, kk)'s error is its own discarded mass
    bo, bi = math.ceil(m / j), math.ceil(n / k)
    pad = torch.nn.functional.pad
    diff = pad(weight - approx, (0, bi * k - n, 0, bo * j - m))
    per_block = diff.view(j, bo, k, bi).square().sum(dim=(1, 3))
    assert_close(per_block, factors.singular_values[..., r:].square().sum(-1))


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES, ids=IDS)
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_equals_dense_matmul(m, n, k, j, r, lead, bias):
    layer = random_blr(m, n, k, j, r, bias=bias)
    x = torch.randn(*lead, n, generator=torch.Generator().manual_seed(2))
    expected = x @ layer.to_dense().T + (layer.bias if bias else 0)
    with torch.inference_mode():  # fused path: the second bmm writes into the output
        out = layer(x)
    assert out.shape == (*lead, m) and out.is_contiguous()
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)  # autograd path


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), [SHAPES[3], SHAPES[5]], ids=[IDS[3], IDS[5]])
def test_gradients_equal_those_of_the_dense_form(m, n, k, j, r):
    layer = random_blr(m, n, k, j, r).double()
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, m, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    grads = [x.grad, layer.U.grad, layer.V.grad, layer.bias.grad]
    x.grad = None
    layer.zero_grad()
    (torch.nn.functional.linear(x, layer.to_dense(), layer.bias) * g).sum().backward()
    for got, want in zip(grads, [x.grad, layer.U.grad, layer.V.grad, layer.bias.grad], strict=True):
        assert_close(got, want)


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES[:4], ids=IDS[:4])
def test_monarch_is_blr_of_the_stride_permuted_weight(m, n, k, j, r):
    """METHODS.md §3: Monarch(W) = P^T BLR(P W) for the stride row permutation P."""
    r = 1
    weight = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    perm = stride_permutation(m, j)
    P = torch.eye(m, dtype=torch.float64)[perm]  # (P W)[jj * m/j + lam] = W[lam * j + jj]
    assert torch.equal(P @ weight, weight[perm])
    assert torch.equal(perm[: m // j], torch.arange(0, m, j))

    mon = monarch_project(weight, k, j, r)
    blr = block_low_rank_project(P @ weight, k, j, r)
    monarch_dense = MonarchLinear.from_factors(mon.L, mon.R, n, m).to_dense()
    blr_dense = BlockLowRankLinear.from_factors(blr.U, blr.V, n, m).to_dense()
    assert_close(monarch_dense, P.T @ blr_dense)
    assert_close(mon.singular_values, blr.singular_values)
    assert math.isclose(mon.rel_error, blr.rel_error, rel_tol=1e-12)
    # the same factors run through either layer differ only by the output permutation
    same = BlockLowRankLinear.from_factors(mon.L, mon.R, n, m).to_dense()
    assert_close(same, P @ monarch_dense)
    assert monarch_num_parameters(m, n, k, r, j) == block_low_rank_num_parameters(m, n, k, r, j)


@pytest.mark.parametrize(("m", "n", "k", "j", "r"), SHAPES, ids=IDS)
def test_parameter_count_matches_the_formula(m, n, k, j, r):
    layer = random_blr(m, n, k, j, r)
    m_pad, n_pad = math.ceil(m / j) * j, math.ceil(n / k) * k
    count = block_low_rank_num_parameters(m, n, k, r, nblocks_out=j)
    assert count == r * (k * m_pad + j * n_pad)
    assert layer.num_parameters() == count + m
    if (m_pad, n_pad) == (m, n) and k == j:
        assert count == k * r * (m + n)  # METHODS.md: b r (m + n)


def test_block_rank_for_param_ratio_examples_and_budget():
    # METHODS.md §2 formula r = floor(p m n / (b (m + n))) on BERT-base shapes, b = 4
    assert block_rank_for_param_ratio(768, 768, 4, 0.5) == 48
    assert block_rank_for_param_ratio(768, 768, 4, 0.25) == 24
    assert block_rank_for_param_ratio(3072, 768, 4, 0.5) == 76
    assert block_rank_for_param_ratio(768, 3072, 4, 0.25) == 38
    for m, n in ((768, 768), (3072, 768), (100, 37), (64, 64), (50, 130)):
        for b in (1, 2, 3, 4, 8):
            for p in (1.0, 0.5, 0.3, 0.25, 0.2):
                try:
                    r = block_rank_for_param_ratio(m, n, b, p)
                except ConfigError:
                    assert block_low_rank_num_parameters(m, n, b, 1) > p * m * n
                    continue
                kept = block_low_rank_num_parameters(m, n, b, r) / (m * n)
                assert kept <= p
                bo, bi = math.ceil(m / b), math.ceil(n / b)
                assert 1 <= r <= min(bo, bi)
                # maximal: one more rank would exceed the budget (or the block)
                over = block_low_rank_num_parameters(m, n, b, r + 1) / (m * n) > p
                assert over or r == min(bo, bi)


def test_infeasible_ratio_names_the_smallest_feasible_one():
    with pytest.raises(ConfigError, match=r"smallest feasible param_ratio is 0\.125") as info:
        block_rank_for_param_ratio(64, 64, 4, 0.1)
    assert "nblocks=4" in str(info.value) and "64x64" in str(info.value)
    assert block_rank_for_param_ratio(64, 64, 4, 0.125) == 1
    # padded 10x7, b = 4: rank 1 keeps 4 (12 + 8) = 80 of 70 -> no ratio <= 1 is feasible
    with pytest.raises(ConfigError) as info:
        block_rank_for_param_ratio(10, 7, 4, 1.0)
    smallest = float(re.search(r"smallest feasible param_ratio is ([0-9.]+)", str(info.value))[1])
    assert smallest >= 80 / 70 and math.isclose(smallest, 80 / 70, rel_tol=1e-3)
    # the printed ratio works where it is <= 1
    with pytest.raises(ConfigError) as info:
        block_rank_for_param_ratio(100, 37, 3, 0.05)
    smallest = float(re.search(r"smallest feasible param_ratio is ([0-9.]+)", str(info.value))[1])
    assert block_rank_for_param_ratio(100, 37, 3, smallest) == 1
    with pytest.raises(ValueError, match="param_ratio"):
        block_rank_for_param_ratio(64, 64, 4, 0.0)


def test_invalid_arguments_raise_clear_errors():
    weight = torch.randn(12, 20)
    with pytest.raises(ValueError, match=r"block rank must be an int in \[1, 6\].*6x10"):
        block_low_rank_project(weight, 2, 2, 7)
    with pytest.raises(ValueError, match="nblocks_out"):
        block_low_rank_project(weight, 2, 13, 1)
    with pytest.raises(ValueError, match="do not pad"):
        BlockLowRankLinear.from_factors(torch.zeros(2, 6, 4), torch.zeros(2, 4, 10), in_features=17)


def test_spec_round_trip_gives_identical_outputs():
    layer = random_blr(10, 7, 4, 4, 1, bias=False)
    spec = layer.spec()
    assert spec["kind"] == "block_low_rank" and spec["bias"] is False
    rebuilt = FactorizedLinear.from_spec(spec)
    assert isinstance(rebuilt, BlockLowRankLinear)
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(2, 5, 7)
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
    [fl.BlockLowRankConfig(param_ratio=0.5), fl.BlockLowRankConfig(param_ratio=0.25, nblocks=2)],
    ids=["p0.5-b4", "p0.25-b2"],
)
def test_factorize_tiny_bert_and_reload(config, tmp_path):
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    report = fl.factorize_(model, config)

    assert len(report.modules) == 12
    assert all(mod.kind == "block_low_rank" for mod in report.modules)
    weights_before = sum(mod.params_before - mod.out_features for mod in report.modules)
    weights_after = sum(mod.params_after - mod.out_features for mod in report.modules)
    assert weights_after <= config.param_ratio * weights_before
    assert report.kept_ratio <= config.param_ratio + 0.02  # the biases are kept whole
    assert all(0.0 < mod.rel_error < 1.0 for mod in report.modules)
    out = hidden(model, ids)
    assert torch.isfinite(out).all()

    layers = fl.factorized_modules(model)
    fresh = tiny_bert()
    for name, layer in layers.items():
        fresh.set_submodule(name, FactorizedLinear.from_spec(layer.spec()))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(hidden(fresh.eval(), ids), out)

    fl.save(model, tmp_path / "ckpt", method=config.to_dict())
    loaded = fl.load(tmp_path / "ckpt")
    assert isinstance(loaded.get_submodule("encoder.layer.1.output.dense"), BlockLowRankLinear)
    assert torch.equal(hidden(loaded, ids), out)


def test_config_validation():
    assert fl.make_config("block-low-rank", nblocks=3).nblocks == 3
    assert fl.BlockLowRankConfig().to_dict()["method"] == "block-low-rank"
    for bad in (0, 1.5, None):
        with pytest.raises(ConfigError, match="nblocks"):
            fl.BlockLowRankConfig(nblocks=bad)
    with pytest.raises(ConfigError, match="param_ratio"):
        fl.BlockLowRankConfig(param_ratio=2.0)
