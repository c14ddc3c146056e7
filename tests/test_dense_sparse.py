"""DSFormer (METHODS.md §8, [C23]): the dense x sparse projection, the deployed and training-form
layers, the budget rule, checkpoints with int16 indices and the straight-through schedule."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch.testing import assert_close

from factorlab.checkpoint import densify, load, save
from factorlab.errors import CheckpointError, ConfigError
from factorlab.layers import DenseSparseLinear, DenseSparseSTFLinear, FactorizedLinear
from factorlab.methods import DSFormerConfig, factorize_, factorized_modules, make_config
from factorlab.methods.dsformer import dsformer_sizes, nnz_for_basis
from factorlab.projections.dense_sparse import dense_sparse_project
from factorlab.training import TrainingConfig
from factorlab.training.schedules import TrainingJob
from factorlab.training.stf import STFSchedule
from tests.tiny import logits, tiny_bert, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def identifiable(
    m: int, n: int, k: int, s: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, D)`` with ``s``-sparse rows whose product the SVD start identifies exactly.

    A generic exactly-sparse ``C D`` is a dictionary-learning problem without a guaranteed exact
    solution; here ``D`` has orthonormal rows and ``C`` orthogonal columns of distinct norms
    (rows in blocks of ``s`` sharing a support, each block an orthogonal ``s x s`` matrix times a
    random scale), so the top-k right singular vectors of ``C D`` are the rows of ``D`` (up to
    sign) and the coefficients are exactly ``s``-sparse in that basis.
    """
    gen = torch.Generator().manual_seed(seed)
    D = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q.T
    C = torch.zeros(m, k, dtype=torch.float64)
    for start in range(0, m, s):
        support = torch.randperm(k, generator=gen)[:s]
        Q = torch.linalg.qr(torch.randn(s, s, generator=gen, dtype=torch.float64)).Q
        scale = 0.5 + torch.rand((), generator=gen, dtype=torch.float64)
        C[start : start + s, support] = scale * Q[: m - start]
    return C, D


def test_exact_dense_sparse_matrix_is_recovered():
    m, n, k, s = 48, 20, 8, 3
    C, D = identifiable(m, n, k, s)
    W = (C @ D).float()
    for support in ("refit", "omp"):
        factors = dense_sparse_project(W, k, s, support=support)
        assert factors.rel_error < 1e-5
        assert (factors.sparse_coefficients() != 0).sum(1).le(s).all()
        assert_close(factors.to_dense(), W, atol=1e-5, rtol=1e-5)
    # groups: each group of rows has its own exact factorization
    parts = [identifiable(m // 2, n, k, s, seed) for seed in (1, 2)]
    W2 = torch.cat([c @ d for c, d in parts]).float()
    factors = dense_sparse_project(W2, k, s, groups=2)
    assert factors.basis.shape == (2, k, n) and factors.rel_error < 1e-5
    assert dense_sparse_project(W2, k, s, groups=1).rel_error > 1e-2  # one basis cannot


def test_alternating_rounds_never_increase_the_error():
    W = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    errors = [dense_sparse_project(W, 10, 3, iterations=i).rel_error for i in (0, 2, 8)]
    assert errors[0] >= errors[1] >= errors[2] and errors[2] < errors[0]
    with pytest.raises(ValueError, match="nnz_per_row"):
        dense_sparse_project(W, 4, 5)
    with pytest.raises(ValueError, match="groups"):
        dense_sparse_project(W, 4, 2, groups=3)


def random_deployed(n=12, m=16, k=6, s=3, g=2, bias=True, seed=0) -> DenseSparseLinear:
    gen = torch.Generator().manual_seed(seed)
    layer = DenseSparseLinear(n, m, k, s, g, bias=bias)
    with torch.no_grad():
        layer.basis.copy_(torch.randn(layer.basis.shape, generator=gen))
        layer.values.copy_(torch.randn(layer.values.shape, generator=gen))
        idx = torch.stack([torch.randperm(k, generator=gen)[:s] for _ in range(m)])
        layer.indices.copy_(idx.to(torch.int16))
        if bias:
            layer.bias.copy_(torch.randn(m, generator=gen))
    return layer


@pytest.mark.parametrize("tokens_", [1, 5, 40])
def test_deployed_forward_is_the_dense_product(tokens_):
    layer = random_deployed()
    x = torch.randn(2, tokens_, 12)
    assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    nobias = random_deployed(bias=False, g=1)
    assert_close(nobias(x), x @ nobias.to_dense().T)
    # the deployed form trains: gradients reach the basis and the values
    layer(x).square().sum().backward()
    assert layer.basis.grad.abs().sum() > 0 and layer.values.grad.abs().sum() > 0
    assert layer.indices.dtype == torch.int16
    # the coefficient matrix cached without gradients follows in-place changes (load_state_dict,
    # an optimizer step) and inference tensors
    other = random_deployed(seed=1)
    with torch.no_grad():
        assert_close(layer(x), x @ layer.to_dense().T + layer.bias)  # fills the cache
        layer.load_state_dict(other.state_dict())
        assert_close(layer(x), other(x))
        layer.values.mul_(2.0)
        assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
        layer.indices.copy_(other.indices.flip(1))
        assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    with torch.inference_mode():
        fresh = DenseSparseLinear.from_spec(other.spec())
        fresh.load_state_dict(other.state_dict())
        assert_close(fresh(x), other(x))


def test_counts_and_storage_bytes():
    m, n, k, s, g = 16, 12, 6, 3, 2
    layer = random_deployed(n, m, k, s, g)
    assert layer.num_parameters() == g * k * n + m * s + m
    assert layer.macs_per_token() == g * k * n + m * k  # the dense coefficient matmul
    assert layer.storage_bytes() == 4 * (g * k * n + m * s + m) + 2 * m * s
    half = layer.to(dtype=torch.float16)
    assert half.indices.dtype == torch.int16  # Module.to casts floating tensors only
    assert half.storage_bytes() == 2 * (g * k * n + m * s + m) + 2 * m * s
    assert FactorizedLinear.storage_bytes(half) == half.storage_bytes()  # the base default
    with pytest.raises(ValueError, match="int16"):
        DenseSparseLinear(40000, 40000, 32768, 1)
    assert DenseSparseLinear.from_spec(layer.spec()).spec() == layer.spec()


def stf_layer(seed=0) -> DenseSparseSTFLinear:
    W = torch.randn(16, 12, generator=torch.Generator().manual_seed(seed))
    return DenseSparseSTFLinear.from_factors(
        dense_sparse_project(W, 6, 2, groups=2, iterations=3), torch.randn(16)
    )


def test_training_form_masks_top_s_and_passes_gradients_straight_through():
    layer = stf_layer()
    mask = layer.mask()
    assert mask.sum(1).eq(2).all()
    assert torch.equal(layer.support, layer.top_support())  # starts at the fitted support
    x = torch.randn(2, 5, 12)
    # forward = the masked coefficients
    assert_close(layer(x), x @ layer.to_dense().T + layer.bias)
    layer(x).square().sum().backward()
    grad = layer.latents.grad
    off = mask == 0
    assert grad[off].abs().min() > 0  # every masked latent gets a gradient
    assert layer.basis.grad.abs().sum() > 0


def test_to_deployed_computes_the_training_function():
    layer = stf_layer(1)
    with torch.no_grad():
        layer.latents.add_(0.3 * torch.randn_like(layer.latents))  # top-s moves
    deployed = layer.to_deployed()
    x = torch.randn(2, 5, 12)
    assert isinstance(deployed, DenseSparseLinear) and deployed.indices.dtype == torch.int16
    assert_close(deployed(x), layer(x))
    assert_close(deployed.to_dense(), layer.to_dense())
    with pytest.raises(CheckpointError, match="deploy"):
        layer.spec()


@pytest.mark.parametrize(
    ("m", "n"), [(384, 384), (1536, 384), (384, 1536), (32, 64), (64, 32), (96, 40)]
)
@pytest.mark.parametrize("p", [0.5, 0.357, 0.28, 0.15])
def test_budget_rule_stays_within_the_budget(m, n, p):
    for groups in (1, 2):
        k, s = dsformer_sizes(m, n, p, groups)
        assert 1 <= s <= k <= min(m // groups, n)
        assert groups * k * n + m * s <= p * m * n
        # it spends the budget: one more basis row no longer fits (or the basis is full)
        bigger = groups * (k + 1) * n + m * nnz_for_basis(k + 1)
        assert k == min(m // groups, n) or bigger > p * m * n


def test_explicit_sizes_are_honoured_or_refused():
    assert dsformer_sizes(64, 32, 0.5, basis_size=8, nnz_per_row=4) == (8, 4)
    k, s = dsformer_sizes(64, 32, 0.5, nnz_per_row=6)
    assert s == 6 and k * 32 + 64 * 6 <= 0.5 * 64 * 32
    with pytest.raises(ConfigError, match="over the budget"):
        dsformer_sizes(64, 32, 0.5, basis_size=20, nnz_per_row=10)
    with pytest.raises(ConfigError, match="nnz_per_row"):
        dsformer_sizes(64, 32, 0.2, nnz_per_row=12)
    with pytest.raises(ConfigError, match="divide"):
        dsformer_sizes(64, 32, 0.5, groups=3)
    model = tiny_bert()
    with pytest.raises(ConfigError, match="over the budget"):
        factorize_(model, DSFormerConfig(param_ratio=0.3, basis_size=16, nnz_per_row=16))
    assert not factorized_modules(model)
    for bad in (
        {"nnz_per_row": 0},
        {"basis_size": 4, "nnz_per_row": 5},
        {"support": "lasso"},
        {"refresh_interval": 0},
        {"groups": 0},
        {"stf": "yes"},
    ):
        with pytest.raises(ConfigError):
            DSFormerConfig(**bad)


def test_factorize_reports_deployed_parameters():
    model = tiny_bert()
    x = tokens()
    report = factorize_(model, DSFormerConfig(param_ratio=0.5, stf=False, groups=2))
    layers = factorized_modules(model)
    assert len(layers) == 12 and all(isinstance(m, DenseSparseLinear) for m in layers.values())
    for row in report.modules:
        layer = layers[row.name]
        assert row.rank == layer.basis_size and row.params_after == layer.num_parameters()
        assert row.params_after - row.out_features <= 0.5 * row.out_features * row.in_features
    assert torch.isfinite(logits(model, x)).all()
    # stf=True builds the training form; the report counts its deployed parameters
    train_form = tiny_bert()
    report2 = factorize_(train_form, DSFormerConfig(param_ratio=0.5, groups=2))
    assert all(isinstance(m, DenseSparseSTFLinear) for m in factorized_modules(train_form).values())
    assert [r.params_after for r in report2.modules] == [r.params_after for r in report.modules]
    with pytest.raises(CheckpointError, match="training form"):
        save(train_form, "/nonexistent/never-written")


def test_int16_indices_survive_save_and_load(tmp_path):
    model = tiny_bert()
    report = factorize_(model, make_config("dsformer", param_ratio=0.4, stf=False))
    save(model, tmp_path / "ck", method=report.config)
    loaded = load(tmp_path / "ck")
    ids = tokens()
    assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    before, after = factorized_modules(model), factorized_modules(loaded)
    assert set(before) == set(after)
    for name, layer in after.items():
        assert isinstance(layer, DenseSparseLinear) and layer.indices.dtype == torch.int16
        assert torch.equal(layer.indices, before[name].indices)
    expected = logits(model, ids)
    densify(loaded)
    assert not factorized_modules(loaded)
    assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-4)


def test_stf_schedule_trains_and_deploys(tokenizer, rte_train):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    config = DSFormerConfig(param_ratio=0.5, refresh_interval=2)
    schedule = config.make_schedule()
    assert isinstance(schedule, STFSchedule) and schedule.name == "stf"
    schedule.check(config, has_task=False)  # no task: it only projects
    training = TrainingConfig(batch_size=8, max_seq_length=32, max_steps=4, learning_rate=1e-3)
    job = TrainingJob(rte_train, tokenizer, training, Accelerator(), progress=False)
    result = schedule.run(model, config, job)
    layers = factorized_modules(result.model)
    assert len(layers) == 12 and all(type(m) is DenseSparseLinear for m in layers.values())
    assert all(r.kind == "dense_sparse" for r in result.report.modules)
    assert all(math.isfinite(v) for v in result.train.losses)
    stf = result.train.state["stf"]
    assert stf["refresh_interval"] == 2 and stf["refreshes"] == 3  # steps 2, 4 and the end
    assert all(0.0 <= c <= 1.0 for c in stf["changed"])
    # without a job: project, then deploy
    plain = tiny_bert(vocab_size=tokenizer.vocab_size)
    result = STFSchedule().run(plain, config, None)
    assert all(type(m) is DenseSparseLinear for m in factorized_modules(plain).values())
    assert result.train is None
    assert DSFormerConfig(stf=False).make_schedule() is None
    assert "stf" in DSFormerConfig().staging_problem()
    assert DSFormerConfig(stf=False).staging_problem() is None


def test_gram_statistics_whiten_the_fit():
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(24, 16, generator=gen)
    X = torch.randn(200, 16, generator=gen) * torch.logspace(0, -2, 16)  # anisotropic inputs
    gram = (X.T @ X).double()
    plain = dense_sparse_project(W, 6, 2)
    whitened = dense_sparse_project(W, 6, 2, gram=gram)

    def output_error(f):
        return ((X @ (W - f.to_dense()).T).norm() / (X @ W.T).norm()).item()

    assert output_error(whitened) < output_error(plain)
    assert whitened.output_rel_error != whitened.rel_error
