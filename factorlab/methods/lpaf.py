"""LPAF: prune first, then factorize [R23, METHODS.md §7].

Ren & Zhu, "Low-Rank Prune-And-Factorize for Language Model Compression", 2023 [R23]: fine-tuned
weights are full rank, so truncating them loses much; first-order (movement) pruning leaves sparse
matrices whose spectra decay fast, so LPAF fine-tunes with movement pruning, factorizes the
pruned matrices with a sparsity-aware SVD (``factorlab.projections.masked_svd``) at ranks chosen
from the pruned spectra to one global budget, then fine-tunes with mixed-rank training. The
schedule is ``factorlab.training.lpaf.LPAFSchedule``; this module holds the config and the
projection step. The paper's text was not available: every choice below is an option (the
defaults are ours, METHODS.md §7).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from factorlab.allocation import Spectrum, low_rank_spectrum
from factorlab.errors import ConfigError
from factorlab.layers.low_rank import LowRankLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.low_rank import plan_low_rank
from factorlab.methods.registry import Method, Projected, register_method
from factorlab.projections.masked_svd import masked_svd
from factorlab.projections.svd import truncated_svd


@dataclass
class LPAFConfig(FactorizationConfig):
    """Prune while fine-tuning, factorize the pruned weights, fine-tune with mixed ranks.

    Shared fields as in ``FactorizationConfig``; ``allocation`` defaults to ``"global"`` with
    ``allocation_normalize=True`` here (ranks from the pruned spectra to one budget of
    ``param_ratio`` of the targeted weights, each matrix's relative error counting equally:
    without the normalization the large-norm query/key matrices took the budget and left value
    and output matrices at ranks 8-20, measured in ``benchmarks/lpaf_offline.py``).
    The defaults are our choices, set by measurement on MiniLM + SST-2 (README, LPAF card).
    The training steps of a run (``TrainingConfig.num_steps``) are split: ``prune_fraction`` of
    them fine-tune with pruning, the rest fine-tune the factorized model, so LPAF takes as many
    steps as direct factorization + fine-tuning.

    Attributes:
        sparsity: fraction of each targeted weight REMOVED by pruning, in [0, 1); ``None``:
            ``1 - param_ratio`` (the pruned matrix keeps as many values as its factors will).
            Default 0.5: measured better than ``1 - param_ratio`` at 0.25 (below).
        pruning: ``"movement"`` (hard top-k on learned scores), ``"soft-movement"`` (learned
            threshold, L1 on the scores; the sparsity is learned) or ``"magnitude"``.
        pruning_scope: ``"per-matrix"`` or ``"global"`` top-k.
        prune_fraction: fraction of the run's steps spent pruning, in (0, 1).
        pruning_warmup / pruning_cooldown: fractions of the pruning steps before the sparsity
            ramp and at the final sparsity.
        score_learning_rate: peak learning rate of the movement scores.
        score_init: ``"magnitude"`` (default: scores start at ``|W| / std(W)``, pruning starts
            from magnitude order and movement re-ranks; see ``PruningConfig``) or ``"zeros"``
            ([S20]; with our 313-step pruning phase it collapsed SST-2 to chance).
        soft_threshold / soft_lambda: soft movement's final threshold and L1 weight.
        em_iterations: EM steps of the sparsity-aware SVD. Default 0: the plain SVD of the
            pruned matrix, because fitting only the kept entries measured worse on MiniLM (the
            factors' values at pruned entries are left free and the layer's function drifts:
            ``benchmarks/lpaf_offline.py``); 10 runs the method as METHODS.md §7 states it.
        em_tol: stop EM when an iteration lowers the masked error by less than this fraction.
        em_pruned_weight: weight in [0, 1] of the pruned entries (target 0) in the EM objective
            (``masked_svd``'s ``pruned_weight``; 0: only the kept entries count).
        mixed_rank_q: the initial probability that a factorized layer runs its sparse weight in
            a training step, in [0, 1] (0: plain fine-tuning, the "no mixed-rank" ablation).
        mixed_rank_anneal: fraction of the fine-tuning steps over which that probability falls
            linearly to 0, in (0, 1].
    """

    method = "lpaf"

    allocation: str = "global"
    allocation_normalize: bool = True
    sparsity: float | None = 0.5
    pruning: str = "movement"
    pruning_scope: str = "per-matrix"
    prune_fraction: float = 0.5
    pruning_warmup: float = 0.1
    pruning_cooldown: float = 0.2
    score_learning_rate: float = 1e-2
    score_init: str = "magnitude"
    soft_threshold: float = 0.1
    soft_lambda: float = 100.0
    em_iterations: int = 0
    em_tol: float = 1e-4
    em_pruned_weight: float = 0.0
    mixed_rank_q: float = 0.5
    mixed_rank_anneal: float = 0.5

    def __post_init__(self) -> None:
        if self.allocation == "sensitivity":
            raise ConfigError(
                "lpaf takes its ranks from the pruned matrices (allocation 'global' or "
                "'uniform'); sensitivity allocation measures the dense model before pruning"
            )
        super().__post_init__()
        if not 0 < self.prune_fraction < 1:
            raise ConfigError(
                f"prune_fraction must be in (0, 1) (the share of the steps spent pruning), got "
                f"{self.prune_fraction}"
            )
        if isinstance(self.em_iterations, bool) or not isinstance(self.em_iterations, int):
            raise ConfigError(f"em_iterations must be an int >= 0, got {self.em_iterations!r}")
        if self.em_iterations < 0 or not (math.isfinite(self.em_tol) and self.em_tol >= 0):
            raise ConfigError("em_iterations must be >= 0 and em_tol finite and >= 0")
        if not 0 <= self.em_pruned_weight <= 1:
            raise ConfigError(f"em_pruned_weight must be in [0, 1], got {self.em_pruned_weight}")
        if not 0 <= self.mixed_rank_q <= 1 or not 0 < self.mixed_rank_anneal <= 1:
            raise ConfigError(
                f"mixed_rank_q must be in [0, 1] and mixed_rank_anneal in (0, 1], got "
                f"{self.mixed_rank_q} and {self.mixed_rank_anneal}"
            )
        self.pruning_config()  # validates the pruning fields

    @property
    def target_sparsity(self) -> float:
        return 1.0 - self.param_ratio if self.sparsity is None else self.sparsity

    def pruning_config(self, probes: tuple[float, ...] = ()) -> Any:
        """The ``factorlab.training.pruning.PruningConfig`` of the pruning phase.

        Raises:
            ConfigError: a pruning field out of range.
        """
        from factorlab.training.pruning import PruningConfig

        return PruningConfig(
            kind=self.pruning,
            sparsity=self.target_sparsity,
            scope=self.pruning_scope,
            warmup=self.pruning_warmup,
            cooldown=self.pruning_cooldown,
            score_learning_rate=self.score_learning_rate,
            score_init=self.score_init,
            soft_threshold=self.soft_threshold,
            soft_lambda=self.soft_lambda,
            probes=probes,
        )

    def staging_problem(self) -> str | None:
        return "LPAF runs its own schedule (prune, factorize, fine-tune); drop --staged"

    def make_schedule(self) -> Any:
        from factorlab.training.lpaf import LPAFSchedule

        return LPAFSchedule()


def build_lpaf(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: LPAFConfig,
    mask: torch.Tensor | None,
) -> Projected:
    """Sparsity-aware SVD of the pruned ``weight`` on its kept entries ``mask`` (``(out, in)``,
    bool); without a mask, the plain truncated SVD. ``rel_error``: the masked relative error."""
    if mask is None:
        factors = truncated_svd(weight, rank)
        return Projected(LowRankLinear.from_factors(factors.A, factors.B, bias), factors.rel_error)
    if tuple(mask.shape) != tuple(weight.shape):
        raise ConfigError(
            f"pruning mask of shape {tuple(mask.shape)} does not fit weight {tuple(weight.shape)}"
        )
    fit = masked_svd(
        weight, mask, rank, config.em_iterations, config.em_tol, config.em_pruned_weight
    )
    details = {
        "em_objectives": [round(v, 6) for v in fit.objectives],
        "em_iterations": fit.iterations,
        "kept_entries": float(mask.float().mean()),
    }
    return Projected(LowRankLinear.from_factors(fit.A, fit.B, bias), fit.rel_error, details=details)


def spectrum_lpaf(weight: torch.Tensor, mask: object, config: FactorizationConfig) -> Spectrum:
    """Singular values of the pruned weight (the weight after pruning: zeros where pruned)."""
    if isinstance(mask, torch.Tensor):
        weight = torch.where(mask.to(weight.device, torch.bool), weight, 0.0)
    return low_rank_spectrum(torch.linalg.svdvals(weight.detach().double()), *weight.shape)


LPAF = register_method(
    Method("lpaf", LPAFConfig, plan_low_rank, build_lpaf, spectrum=spectrum_lpaf)
)
