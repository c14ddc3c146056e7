"""Global rank allocation (METHODS.md §11): the budget is spent, never exceeded, where the
method's truncation error drops most; brute force agrees; every method with a spectrum works."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from factorlab.allocation import Spectrum, allocate_global, low_rank_spectrum
from factorlab.errors import ConfigError
from factorlab.methods import (
    BlockLowRankConfig,
    LowRankConfig,
    MonarchConfig,
    factorize_,
    factorized_modules,
    make_config,
)
from factorlab.training import check_stageable
from tests.tiny import tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def spectrum(values, cost, max_rank=None) -> Spectrum:
    gains = torch.tensor(values, dtype=torch.float64)
    return Spectrum(gains, cost, len(values) if max_rank is None else max_rank, 10**6)


def brute_force(spectra: dict[str, Spectrum], budget: int, min_rank: int = 1) -> dict[str, int]:
    names = sorted(spectra)
    best, best_split = -1.0, None
    ranges = [range(min_rank, spectra[n].max_rank + 1) for n in names]
    for ranks in itertools.product(*ranges):
        cost = sum(r * spectra[n].cost for r, n in zip(ranks, names, strict=True))
        if cost > budget:
            continue
        gain = sum(spectra[n].gains[:r].sum().item() for r, n in zip(ranks, names, strict=True))
        if gain > best + 1e-12:
            best, best_split = gain, dict(zip(names, ranks, strict=True))
    return best_split


@pytest.mark.parametrize(
    "case",
    [
        # equal costs: the best split is the top-k of all gains
        ({"a": ([9, 4, 1, 0.5], 10), "b": ([8, 7, 6, 5], 10), "c": ([3, 2, 1, 1], 10)}, 70),
        # unequal costs, gains per parameter decreasing: greedy by gain / cost is optimal
        ({"a": ([40, 20, 10, 5], 20), "b": ([9, 8, 7, 1], 10), "c": ([12, 3, 1, 1], 30)}, 130),
        ({"a": ([5, 4, 3, 2, 1], 7), "b": ([50, 1], 70), "c": ([2, 2, 2, 2], 7)}, 140),
    ],
)
def test_greedy_matches_brute_force(case):
    data, budget = case
    spectra = {name: spectrum(values, cost) for name, (values, cost) in data.items()}
    assert allocate_global(spectra, budget) == brute_force(spectra, budget)


def test_budget_is_spent_and_never_exceeded():
    generator = torch.Generator().manual_seed(0)
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    spectra = {}
    for layer in range(6):
        for i, (m, n) in enumerate(shapes):
            values = torch.rand(min(m, n), generator=generator, dtype=torch.float64)
            values = values.sort(descending=True).values * (1 + layer)
            spectra[f"l{layer}.m{i}"] = low_rank_spectrum(values, m, n)
    total = sum(s.dense_params for s in spectra.values())
    for ratio in (0.5, 0.25, 0.1):
        budget = math.floor(ratio * total)
        ranks = allocate_global(spectra, budget)
        spent = sum(ranks[name] * s.cost for name, s in spectra.items())
        assert 0.99 * budget <= spent <= budget, (ratio, spent, budget)
        assert all(1 <= r <= spectra[name].max_rank for name, r in ranks.items())


def test_floor_and_ceiling():
    spectra = {"big": spectrum([100, 90, 80, 70, 60], 10), "small": spectrum([1, 0.5, 0.2], 10)}
    assert allocate_global(spectra, 60) == {"big": 5, "small": 1}
    assert allocate_global(spectra, 60, min_rank=2) == {"big": 4, "small": 2}
    capped = {k: Spectrum(s.gains, s.cost, s.max_rank, 100) for k, s in spectra.items()}
    assert allocate_global(capped, 60, max_param_ratio=0.3)["big"] == 3  # 3 x 10 <= 0.3 x 100
    with pytest.raises(ConfigError, match="cannot give every matrix rank 4"):
        allocate_global(spectra, 60, min_rank=4)


def test_global_allocation_on_a_model_spends_the_budget():
    for config in (
        LowRankConfig(param_ratio=0.4, allocation="global"),
        MonarchConfig(param_ratio=0.4, nblocks=2, allocation="global"),
        BlockLowRankConfig(param_ratio=0.4, nblocks=2, allocation="global"),
    ):
        model = tiny_bert()
        torch.manual_seed(1)
        with torch.no_grad():  # give the matrices different spectra
            for i, (_, layer) in enumerate(model.bert.encoder.named_modules()):
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.mul_(1 + (i % 5))
        dense = sum(
            m.weight.numel() for m in model.bert.encoder.modules() if isinstance(m, torch.nn.Linear)
        )
        report = factorize_(model, config)
        layers = factorized_modules(model)
        factors = sum(layer.num_parameters() - layer.bias.numel() for layer in layers.values())
        budget = math.floor(config.param_ratio * dense)
        assert 0.95 * budget <= factors <= budget, (config.method, factors, budget)
        ranks = {m.rank for m in report.modules}
        assert len(ranks) > 1, f"{config.method}: global allocation gave every matrix one rank"


def test_global_allocation_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="exclude each other"):
        LowRankConfig(allocation="global", rank_pattern={"query": 4})
    with pytest.raises(ConfigError, match="allocation must be one of"):
        LowRankConfig(allocation="greedy")
    with pytest.raises(ConfigError, match="cannot be staged"):
        check_stageable(LowRankConfig(allocation="global"))
    with pytest.raises(ConfigError, match="no spectrum"):
        factorize_(tiny_bert(), make_config("autoencoder", allocation="global", epochs=1))


def test_act_svd_allocates_on_the_whitened_spectrum():
    """act-svd's gains are the squared singular values of W C (C C^T = G + damping I)."""
    from factorlab.calibration import ModuleStatistics
    from factorlab.methods import get_method
    from factorlab.projections.activation_svd import whitening_factor

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 8, generator=generator)
    x = torch.randn(50, 8, generator=generator) * torch.linspace(0.1, 3, 8)
    stats = ModuleStatistics(fisher=None, gram=(x.T @ x).double(), num_batches=1, num_tokens=50)
    config = make_config("act-svd", param_ratio=0.5)
    spec = get_method(config).spectrum(weight, stats, config)
    C = whitening_factor(stats.gram, config.eps)[0]
    expected = torch.linalg.svdvals(weight.double() @ C).square()
    torch.testing.assert_close(spec.gains, expected)
    assert spec.cost == 20 and spec.max_rank == (96 - 1) // 20
