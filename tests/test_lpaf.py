"""LPAF: movement/magnitude pruning callbacks, the sparsity schedule, sparsity-aware SVD (EM),
mixed-rank fine-tuning, the three-phase schedule and its run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torch import nn

from factorlab.checkpoint import load, read_spec
from factorlab.cli import main
from factorlab.errors import ConfigError
from factorlab.layers import LowRankLinear
from factorlab.methods import LPAFConfig, factorize_
from factorlab.projections.masked_svd import masked_svd
from factorlab.projections.svd import truncated_svd
from factorlab.training import Callback, TrainingConfig, train
from factorlab.training.mixed_rank import (
    MixedRank,
    MixedRankLinear,
    attach_mixed_rank,
    detach_mixed_rank,
    sparse_path_probability,
)
from factorlab.training.pruning import (
    MovementPruning,
    PruningConfig,
    PruningMask,
    kept_fraction,
    rank_statistics,
)
from tests.tiny import tiny_bert

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_cubic_schedule_endpoints_and_shape():
    total, warmup, cooldown = 100, 10, 20
    values = [kept_fraction(t, total, 0.2, warmup, cooldown) for t in range(total + 1)]
    assert values[: warmup + 1] == [1.0] * (warmup + 1)
    assert values[total - cooldown :] == [0.2] * (cooldown + 1)
    assert all(a >= b for a, b in pairwise(values))
    # halfway through the ramp: 0.2 + 0.8 * 0.5^3
    assert kept_fraction(45, total, 0.2, warmup, cooldown) == pytest.approx(0.2 + 0.8 / 8)
    with pytest.raises(ValueError, match="exceed"):
        kept_fraction(0, 10, 0.5, 6, 5)


class CountKept(Callback):
    """Counts each pruned matrix's kept weights in the forward of every step."""

    def __init__(self, modules):
        self.modules = modules
        self.kept: list[dict[str, int]] = []

    def on_before_optimizer_step(self, ctx):
        self.kept.append({name: int((m.weight != 0).sum()) for name, m in self.modules.items()})


def _bert_targets(model):
    from factorlab.targets import select_targets

    return {t.name: t.module for t in select_targets(model)}


def test_sparsity_follows_the_schedule_exactly(tokenizer, rte_train):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    modules = _bert_targets(model)
    steps = 8
    config = PruningConfig(kind="movement", sparsity=0.75, warmup=0.25, cooldown=0.25)
    pruning = MovementPruning(modules, config, start_step=0, num_steps=steps)
    pruning.attach()
    counter = CountKept(modules)
    result = train(
        model,
        rte_train,
        tokenizer,
        TrainingConfig(batch_size=8, max_steps=steps, warmup_ratio=0.0),
        progress=False,
        callbacks=[pruning, counter],
    )
    for step, kept in enumerate(counter.kept):
        fraction = kept_fraction(step, steps, 0.25, 2, 2)
        for name, module in modules.items():
            assert kept[name] == round(fraction * module.weight.numel()), (step, name)
    groups = {g["name"]: g for g in result.optimizer}
    assert groups["pruning_scores"]["lr"] == 1e-2
    assert groups["pruning_scores"]["tensors"] == len(modules)
    assert result.state["pruning"]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    masks = pruning.finalize()
    for name, module in modules.items():
        assert type(module) is nn.Linear  # the parametrization is gone
        assert torch.equal(module.weight != 0, masks[name])
        assert masks[name].float().mean().item() == pytest.approx(0.25, abs=1e-3)


def test_straight_through_gradient_reaches_every_score():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    mask = PruningMask(layer.weight.shape, "movement")
    with torch.no_grad():
        mask.scores.normal_()
    mask.keep = 0.5
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", mask)
    x = torch.randn(3, 6)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    weight = layer.parametrizations.weight.original.detach()
    # dL/dW' = grad_out^T x; straight through: dL/dS = dL/dW' * W, on masked entries too
    expected = (grad_out.t() @ x) * weight
    torch.testing.assert_close(mask.scores.grad, expected)
    hard = mask.mask(weight).detach()
    assert int(hard.sum()) == 12 and bool((mask.scores.grad[hard == 0] != 0).all())


def test_magnitude_and_soft_movement_masks():
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    magnitude = PruningMask(weight.shape, "magnitude")
    magnitude.keep = 0.25
    kept = magnitude.mask(weight).bool()
    assert magnitude.scores is None and int(kept.sum()) == 16
    assert weight.abs()[kept].min() >= weight.abs()[~kept].max()
    soft = PruningMask(weight.shape, "soft-movement")
    with torch.no_grad():
        soft.scores.copy_(torch.linspace(-3, 3, 64).view(8, 8))
    soft.threshold = 0.5
    torch.testing.assert_close(soft.mask(weight), (soft.scores > 0).float())


def test_soft_movement_adds_the_l1_term_on_its_schedule(tokenizer, rte_train):
    model = tiny_bert(vocab_size=tokenizer.vocab_size)
    modules = _bert_targets(model)
    config = PruningConfig(kind="soft-movement", warmup=0.0, cooldown=0.0, soft_lambda=10.0)
    pruning = MovementPruning(modules, config, start_step=0, num_steps=4)
    pruning.attach()

    class Context:
        step = 2

    # threshold at step 2 of 4: 0.1 * (1 - 0.5^3); weight = lambda * threshold / final
    term = pruning.loss_terms(Context())
    torch.testing.assert_close(term, torch.tensor(10.0 * (1 - 0.125) * 0.5))
    train(
        model,
        rte_train,
        tokenizer,
        TrainingConfig(batch_size=8, max_steps=4, warmup_ratio=0.0),
        progress=False,
        callbacks=[pruning],
    )
    scores = torch.cat([m.scores.detach().flatten() for m in pruning.masks.values()])
    assert scores.mean() < 0  # the L1 term pushes the scores down


def test_em_objective_never_increases_and_recovers_a_low_rank_matrix():
    torch.manual_seed(0)
    truth = torch.randn(40, 4, dtype=torch.float64) @ torch.randn(4, 30, dtype=torch.float64)
    mask = torch.rand(40, 30) < 0.5
    fit = masked_svd(truth, mask, rank=4, iterations=500, tol=1e-12)
    assert all(b <= a + 1e-12 for a, b in pairwise(fit.objectives))
    assert fit.objectives[0] > 0.3  # the SVD of the zero-filled matrix is far off
    assert fit.rel_error < 1e-6
    # the pruned entries are recovered too: the factors are the matrix itself
    torch.testing.assert_close(fit.A @ fit.B, truth, atol=1e-4, rtol=1e-4)


def test_em_with_a_full_mask_is_the_truncated_svd():
    torch.manual_seed(1)
    weight = torch.randn(12, 9)
    fit = masked_svd(weight, torch.ones(12, 9, dtype=torch.bool), rank=3, iterations=5)
    plain = truncated_svd(weight, 3)
    torch.testing.assert_close(fit.A @ fit.B, plain.A @ plain.B)
    assert fit.rel_error == pytest.approx(plain.rel_error, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        masked_svd(weight, torch.ones(9, 12), rank=3)


def test_rank_statistics():
    low = torch.randn(20, 3) @ torch.randn(3, 16)
    stats = rank_statistics(low)
    assert stats == {"numerical_rank": 3, "energy_rank": stats["energy_rank"], "full_rank": 16}
    assert 1 <= stats["energy_rank"] <= 3
    assert rank_statistics(torch.eye(10))["energy_rank"] == 9  # 90% of 10 equal values


def test_mixed_rank_draws_are_seeded_and_annealed():
    layers = {f"l{i}": None for i in range(6)}
    a = MixedRank(layers, q0=0.5, anneal=0.5, seed=7, start_step=10, num_steps=40)
    b = MixedRank(layers, q0=0.5, anneal=0.5, seed=7, start_step=10, num_steps=40)
    c = MixedRank(layers, q0=0.5, anneal=0.5, seed=8, start_step=10, num_steps=40)
    draws = [a.draw(s) for s in range(10, 50)]
    assert draws == [b.draw(s) for s in range(10, 50)]
    assert draws != [c.draw(s) for s in range(10, 50)]
    assert any(any(d) for d in draws[:10])
    assert not any(any(d) for d in draws[20:])  # q reached 0 at half the phase
    assert sparse_path_probability(0, 40, 0.5, 0.5) == 0.5
    assert sparse_path_probability(10, 40, 0.5, 0.5) == 0.25
    # the same draws in another process: the generator depends on (seed, step) only
    code = (
        "from factorlab.training.mixed_rank import MixedRank;"
        "m = MixedRank({f'l{i}': None for i in range(6)}, 0.5, 0.5, 7, 10, 40);"
        "print([m.draw(s) for s in range(10, 50)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == str(draws)


def test_mixed_rank_layer_paths_and_detach():
    torch.manual_seed(0)
    low = LowRankLinear.from_factors(torch.randn(5, 2), torch.randn(2, 4), torch.randn(5))
    sparse = torch.randn(5, 4)
    model = nn.Sequential(low)
    wrapped = attach_mixed_rank(model, {"0": sparse})
    x = torch.randn(3, 4)
    layer = wrapped["0"]
    assert isinstance(model[0], MixedRankLinear)
    torch.testing.assert_close(model(x), low(x))
    layer.use_sparse = True
    torch.testing.assert_close(model(x), x @ sparse.t() + low.bias)
    model(x).sum().backward()
    assert low.A.grad is not None and bool((low.A.grad == 0).all())  # in the graph, weight 0
    model.eval()
    torch.testing.assert_close(model(x), low(x))  # evaluation always uses the factors
    assert detach_mixed_rank(model) == 1 and model[0] is low
    with pytest.raises(ConfigError, match="LowRankLinear"):
        attach_mixed_rank(nn.Sequential(nn.Linear(4, 5)), {"0": sparse})


def test_lpaf_config_checks():
    assert LPAFConfig(param_ratio=0.25).target_sparsity == 0.5
    assert LPAFConfig(param_ratio=0.25, sparsity=None).target_sparsity == 0.75  # 1 - p
    config = LPAFConfig()
    assert config.allocation == "global" and config.allocation_normalize
    assert config.em_iterations == 0 and config.score_init == "magnitude"
    for bad, match in (
        ({"prune_fraction": 1.0}, "prune_fraction"),
        ({"pruning": "random"}, "pruning kind"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"mixed_rank_q": 2.0}, "mixed_rank_q"),
        ({"em_iterations": -1}, "em_iterations"),
    ):
        with pytest.raises(ConfigError, match=match):
            LPAFConfig(**bad)


def test_lpaf_projection_uses_the_mask_and_reports_em():
    torch.manual_seed(0)
    model = tiny_bert()
    targets = _bert_targets(model)
    masks = {}
    with torch.no_grad():
        for name, module in targets.items():
            masks[name] = torch.rand_like(module.weight) < 0.3
            module.weight.mul_(masks[name])
    config = LPAFConfig(param_ratio=0.5, em_iterations=3, allocation_normalize=False)
    report = factorize_(model, config, masks)
    first = report.modules[0]
    objectives = first.details["em_objectives"]
    assert len(objectives) >= 2 and objectives[-1] <= objectives[0]
    assert first.rel_error == pytest.approx(objectives[-1], abs=1e-6)
    budget = 0.5 * sum(m.out_features * m.in_features for m in report.modules)
    weights = sum(m.rank * (m.out_features + m.in_features) for m in report.modules if m.rank)
    assert weights <= budget


def _compress(tmp_path, tiny_model_dir, tiny_glue_dir, *extra, name="lpaf"):
    out = tmp_path / name
    args = [
        "compress",
        "--model",
        str(tiny_model_dir),
        "--method",
        "lpaf",
        "--param-ratio",
        "0.5",
        "--task",
        "rte",
        "--data-dir",
        str(tiny_glue_dir),
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--max-seq-length",
        "32",
        "--no-progress",
        "--output",
        str(out),
        *extra,
    ]
    return out, args


def test_lpaf_run_end_to_end_saves_plain_low_rank_and_loads_exactly(
    tmp_path, tiny_model_dir, tiny_glue_dir
):
    out, args = _compress(tmp_path, tiny_model_dir, tiny_glue_dir, "--sparsity", "0.6")
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    train_info = results["train"]
    assert results["schedule"] == "lpaf" and train_info["steps"] == 8
    assert [p["phase"] for p in train_info["phases"]] == ["prune", "recover"]
    assert [p["steps"] for p in train_info["phases"]] == [4, 4]
    assert train_info["state"]["pruning"]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert train_info["state"]["mixed_rank"]["q0"] == 0.5
    assert results["parameters"]["targeted_after"] <= 0.5 * results["parameters"][
        "targeted_before"
    ] + 2 * sum(m["out_features"] for m in results["factorization"]["modules"])
    sizes = results["parameters"]
    assert sizes["targeted_bytes_after"] == 4 * sizes["targeted_after"]  # float32 factors
    assert sizes["targeted_bytes_before"] == 4 * sizes["targeted_before"]
    spec = read_spec(out)
    assert {s["kind"] for s in spec["modules"].values()} == {"low_rank"}
    model = load(out)
    assert all(not isinstance(m, (MixedRankLinear, PruningMask)) for m in model.modules()), (
        "training-only modules were saved"
    )
    ids = torch.randint(0, 100, (2, 12))
    again = load(out)
    torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_lpaf_needs_a_task_and_refuses_staging(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    out = tmp_path / "x"
    argv = ["compress", "--model", str(tiny_model_dir), "--method", "lpaf", "--output", str(out)]
    assert main(argv) == 2
    assert "give --task" in capsys.readouterr().err
    _, args = _compress(tmp_path, tiny_model_dir, tiny_glue_dir, "--staged")
    assert main(args) == 2
    assert "own schedule" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "lpaf").exists()


def test_lpaf_on_two_processes(tmp_path, tiny_model_dir, tiny_glue_dir):
    """DDP needs every process's backward to reach the same parameters: mixed-rank draws agree
    (checked by a gathered checksum in the run) and the run completes on 2 CPU processes."""
    out, args = _compress(tmp_path, tiny_model_dir, tiny_glue_dir, "--mixed-rank-q", "1.0")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", "-m", "factorlab", *args]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["num_processes"] == 2
    assert results["train"]["state"]["mixed_rank"]["processes_agreed"] == 2
    assert results["train"]["state"]["mixed_rank"]["sparse_fraction"] > 0


def test_em_pruned_weight_interpolates_between_masked_and_plain_svd():
    torch.manual_seed(2)
    weight = torch.randn(16, 12, dtype=torch.float64)
    mask = torch.rand(16, 12) < 0.4
    pruned = weight * mask
    plain = truncated_svd(pruned, 3)
    full = masked_svd(weight, mask, rank=3, iterations=20, pruned_weight=1.0)
    torch.testing.assert_close(full.A @ full.B, plain.A @ plain.B)  # weight 1: plain SVD
    half = masked_svd(weight, mask, rank=3, iterations=50, tol=0.0, pruned_weight=0.5)
    assert all(b <= a + 1e-12 for a, b in pairwise(half.objectives))
    free = masked_svd(weight, mask, rank=3, iterations=50, tol=0.0)
    # the factors' values at pruned entries: free > half-weighted > plain SVD's
    off = [(f.A @ f.B)[~mask].norm().item() for f in (free, half)]
    assert off[0] > off[1] > (plain.A @ plain.B)[~mask].norm().item() * 0.5
    with pytest.raises(ValueError, match="pruned_weight"):
        masked_svd(weight, mask, rank=3, pruned_weight=2.0)
