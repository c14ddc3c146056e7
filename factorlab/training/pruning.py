"""Unstructured pruning while fine-tuning: movement, soft movement and magnitude [S20, R23].

Movement pruning (Sanh, Wolf, Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning",
NeurIPS 2020 [S20]) learns an importance score ``S`` per weight next to the weights: the layer
computes with ``W * Mask(S)`` and the gradient goes straight through the mask to the scores, so
``dL/dS = dL/dW' * W`` (W' the masked weight) and scores grow for weights moving away from zero.
Following the reference code (huggingface/transformers ``examples/research_projects/
movement-pruning/emmental``: ``binarizer.py``, ``masked_nn.py``, ``masked_run_glue.py``), scores
start at 0 and train with AdamW at their own learning rate (1e-2), no weight decay, under the run's
warm-up/decay schedule. Kinds:

* ``movement`` (hard): keep the top ``tau(t)`` fraction of each matrix's scores (or of all
  matrices' scores together with ``scope="global"``); the mask is exact top-k.
* ``soft-movement``: keep the weights whose ``sigmoid(S)`` exceeds a threshold that follows the
  cubic schedule from 0 to ``soft_threshold``, with an L1 penalty
  ``lambda_t * mean(sigmoid(S))``, ``lambda_t = soft_lambda * threshold_t / soft_threshold``;
  the sparsity is learned, not set (emmental's ``sigmoied_threshold``).
* ``magnitude``: keep the top ``tau(t)`` fraction by ``|W|`` (no scores), the same schedule.

The kept fraction follows the cubic schedule of [S20] / emmental (``kept_fraction``). Masks are
``torch.nn.utils.parametrize`` parametrizations of each targeted ``nn.Linear.weight``, so the
model's code and module types are unchanged while pruning; ``MovementPruning.finalize`` bakes the
masks into the weights and removes the parametrizations.

Rank statistics (``rank_statistics``) are what LPAF's argument rests on [R23, METHODS.md §7]:
first-order pruning should leave matrices of low numerical rank, magnitude pruning not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from factorlab.errors import ConfigError
from factorlab.training.callbacks import Callback, TrainContext

PRUNING_KINDS = ("movement", "soft-movement", "magnitude")
PRUNING_SCOPES = ("per-matrix", "global")
SCORE_INITS = ("zeros", "magnitude")


def kept_fraction(
    step: int, total: int, final: float, warmup: int, cooldown: int, initial: float = 1.0
) -> float:
    """The cubic sparsity schedule of [S20]: the fraction of weights kept after ``step`` steps.

    ``initial`` for the first ``warmup`` steps, ``final`` for the last ``cooldown`` steps, and in
    between ``final + (initial - final) (1 - (step - warmup) / (total - warmup - cooldown))^3``.

    Raises:
        ValueError: ``warmup + cooldown > total``.
    """
    if warmup + cooldown > total:
        raise ValueError(f"warm-up {warmup} + cool-down {cooldown} steps exceed {total} steps")
    if step <= warmup:
        return initial
    ramp = total - warmup - cooldown
    if ramp <= 0 or step >= total - cooldown:
        return final
    return final + (initial - final) * (1.0 - (step - warmup) / ramp) ** 3


class _StraightThrough(torch.autograd.Function):
    """Forward a 0/1 mask, pass the gradient to the scores unchanged (the straight-through
    estimator of [S20] §3)."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def top_k_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """0/1 mask (``scores.dtype``) keeping exactly ``round(keep * numel)`` entries of largest
    score (ties broken by ``torch.topk``)."""
    k = round(keep * scores.numel())
    if k >= scores.numel():
        return torch.ones_like(scores)
    mask = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
    if k > 0:
        mask[scores.detach().flatten().topk(k, sorted=False).indices] = 1
    return mask.view_as(scores)


class PruningMask(nn.Module):
    """The parametrization ``W -> W * mask`` of one weight ``(out, in)``.

    Holds the scores (``(out, in)``, a parameter) for the movement kinds; the callback sets
    ``keep`` (fraction kept, hard kinds), ``threshold`` (a score threshold: ``scope="global"``
    or soft movement) before each step.
    """

    def __init__(
        self, shape: torch.Size, kind: str, device: torch.device | None = None, init: Any = None
    ):
        super().__init__()
        self.kind = kind
        self.keep = 1.0
        self.threshold: float | None = None
        self.scores = None
        if kind != "magnitude":
            scores = torch.zeros(shape, device=device) if init is None else init.detach().clone()
            self.scores = nn.Parameter(scores)

    def importance(self, weight: torch.Tensor) -> torch.Tensor:
        """The values ranked to choose the kept weights: scores, sigmoid(scores) or ``|W|``."""
        if self.kind == "magnitude":
            return weight.detach().abs()
        return torch.sigmoid(self.scores) if self.kind == "soft-movement" else self.scores

    def mask(self, weight: torch.Tensor) -> torch.Tensor:
        """The current 0/1 mask, ``weight.dtype``; straight-through to the scores."""
        importance = self.importance(weight)
        if self.threshold is not None:
            hard = (importance.detach() > self.threshold).to(weight.dtype)
        else:
            hard = top_k_mask(importance, self.keep).to(weight.dtype)
        if self.scores is None:
            return hard
        return _StraightThrough.apply(self.scores, hard)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask(weight)


def rank_statistics(weight: torch.Tensor, energy: float = 0.9, tol: float = 1e-3) -> dict[str, int]:
    """``numerical_rank``: singular values above ``tol * s_max``; ``energy_rank``: the smallest
    rank holding ``energy`` of ``sum s^2`` (float64 SVD of ``weight`` ``(m, n)``)."""
    s = torch.linalg.svdvals(weight.detach().double())
    if s.numel() == 0 or s[0] == 0:
        return {"numerical_rank": 0, "energy_rank": 0, "full_rank": min(weight.shape)}
    cumulative = s.square().cumsum(0) / s.square().sum()
    return {
        "numerical_rank": int((s > tol * s[0]).sum()),
        "energy_rank": int((cumulative < energy - 1e-12).sum()) + 1,
        "full_rank": min(weight.shape),
    }


@dataclass(frozen=True)
class PruningConfig:
    """How to prune (see the module docstring).

    Attributes:
        kind: ``"movement"``, ``"soft-movement"`` or ``"magnitude"``.
        sparsity: fraction of each targeted weight REMOVED at the end, in [0, 1) (hard kinds).
        scope: ``"per-matrix"`` (every matrix reaches ``sparsity``) or ``"global"`` (one top-k
            over all targeted matrices' scores: matrices end at different sparsities).
        warmup: fraction of the phase's steps before pruning starts, in [0, 1).
        cooldown: fraction of the phase's steps at the final sparsity, in [0, 1).
        score_learning_rate: peak AdamW learning rate of the scores (no weight decay).
        soft_threshold: soft movement's final sigmoid threshold, in (0, 1).
        soft_lambda: soft movement's final L1 weight, >= 0.
        probes: sparsities at which to record every matrix's ``rank_statistics`` while pruning.
        score_init: ``"zeros"`` (the movement scores start at 0, as in [S20]) or
            ``"magnitude"`` (they start at ``|W| / std(W)`` of their matrix, so pruning begins
            as magnitude pruning and the learned movement re-ranks the weights from there; our
            option for short budgets, where zero-initialized scores see few batches before the
            first weights must go).
    """

    kind: str = "movement"
    sparsity: float = 0.5
    scope: str = "per-matrix"
    warmup: float = 0.1
    cooldown: float = 0.2
    score_learning_rate: float = 1e-2
    soft_threshold: float = 0.1
    soft_lambda: float = 100.0
    probes: tuple[float, ...] = ()
    score_init: str = "zeros"

    def __post_init__(self) -> None:
        problems = [
            (self.score_init in SCORE_INITS, f"score init must be one of {SCORE_INITS}"),
            (self.kind in PRUNING_KINDS, f"pruning kind must be one of {PRUNING_KINDS}"),
            (0 <= self.sparsity < 1, "sparsity (fraction removed) must be in [0, 1)"),
            (self.scope in PRUNING_SCOPES, f"pruning scope must be one of {PRUNING_SCOPES}"),
            (
                0 <= self.warmup < 1 and 0 <= self.cooldown < 1 and self.warmup + self.cooldown < 1,
                "pruning warmup and cooldown are fractions of the pruning steps, each in [0, 1), "
                "together below 1",
            ),
            (self.score_learning_rate > 0, "score learning rate must be > 0"),
            (0 < self.soft_threshold < 1, "soft threshold must be in (0, 1)"),
            (self.soft_lambda >= 0, "soft lambda must be >= 0"),
            (all(0 < p < 1 for p in self.probes), "rank probes are sparsities in (0, 1)"),
        ]
        for ok, message in problems:
            if not ok:
                raise ConfigError(f"{message} (got {self})")


class MovementPruning(Callback):
    """Prune the given linear layers while the model trains (a ``Callback``; module docstring).

    ``attach`` parametrizes every layer's weight; the callback then sets each step's masks
    (``on_step_begin``), adds soft movement's L1 term (``loss_terms``), contributes the scores as
    the parameter group ``pruning_scores``, records the sparsity (and rank probes) in
    ``state["pruning"]``. ``finalize`` bakes the final masks into the weights.

    Args:
        modules: ``{name: nn.Linear}`` to prune.
        config: the pruning recipe.
        start_step / num_steps: the run step at which this phase starts and its length; the
            schedule runs over these steps.
    """

    def __init__(
        self,
        modules: dict[str, nn.Linear],
        config: PruningConfig,
        start_step: int,
        num_steps: int,
    ):
        if not modules:
            raise ConfigError("nothing to prune: no targeted linear layers")
        for name, module in modules.items():
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"{name} is a {type(module).__name__}; pruning takes nn.Linear layers only"
                )
        self.modules = modules
        self.config = config
        self.start_step = start_step
        self.num_steps = num_steps
        self.warmup = math.floor(config.warmup * num_steps)
        self.cooldown = math.floor(config.cooldown * num_steps)
        self.masks: dict[str, PruningMask] = {}
        self._probed: set[float] = set()
        self.probes: list[dict[str, Any]] = []

    def attach(self) -> None:
        """Parametrize every module's weight with a ``PruningMask`` (all kept at first)."""
        for name, module in self.modules.items():
            init = None
            if self.config.score_init == "magnitude" and self.config.kind != "magnitude":
                weight = module.weight.detach().float()
                init = weight.abs() / weight.std().clamp_min(1e-12)
            mask = PruningMask(module.weight.shape, self.config.kind, module.weight.device, init)
            parametrize.register_parametrization(module, "weight", mask)
            self.masks[name] = mask

    def schedule_value(self, local_step: int) -> float:
        """The kept fraction (hard kinds) or the sigmoid threshold (soft movement) at
        ``local_step`` steps into the phase."""
        if self.config.kind == "soft-movement":
            return 1.0 - kept_fraction(
                local_step,
                self.num_steps,
                1.0 - self.config.soft_threshold,
                self.warmup,
                self.cooldown,
            )
        return kept_fraction(
            local_step, self.num_steps, 1.0 - self.config.sparsity, self.warmup, self.cooldown
        )

    def _set_masks(self, local_step: int) -> None:
        value = self.schedule_value(local_step)
        if self.config.kind == "soft-movement":
            for mask in self.masks.values():
                mask.threshold = value
            return
        if self.config.scope == "per-matrix":
            for mask in self.masks.values():
                mask.keep, mask.threshold = value, None
            return
        # one top-k over all matrices: the score of the k-th largest is every matrix's threshold
        importance = torch.cat(
            [
                mask.importance(parametrize_original(module)).detach().flatten()
                for mask, module in zip(self.masks.values(), self.modules.values(), strict=True)
            ]
        )
        k = round(value * importance.numel())
        threshold = None
        if k < importance.numel():
            threshold = importance.kthvalue(importance.numel() - k).values.item()
        for mask in self.masks.values():
            mask.keep, mask.threshold = 1.0, threshold

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        scores = [m.scores for m in self.masks.values() if m.scores is not None]
        if not scores:
            return []
        return [
            {
                "name": "pruning_scores",
                "params": scores,
                "lr": self.config.score_learning_rate,
                "weight_decay": 0.0,
            }
        ]

    def on_step_begin(self, ctx: TrainContext) -> None:
        self._set_masks(ctx.step - self.start_step)

    def loss_terms(self, ctx: TrainContext) -> torch.Tensor | None:
        if self.config.kind != "soft-movement":
            return None
        threshold = self.schedule_value(ctx.step - self.start_step)
        weight = self.config.soft_lambda * threshold / self.config.soft_threshold
        if weight == 0:
            return None
        total = sum(m.scores.numel() for m in self.masks.values())
        l1 = sum(torch.sigmoid(m.scores).sum() for m in self.masks.values())
        return weight * l1 / total

    def on_step_end(self, ctx: TrainContext) -> None:
        if len(self._probed) == len(self.config.probes):
            return
        sparsity = self.sparsity()
        for probe in self.config.probes:
            if probe not in self._probed and sparsity >= probe - 1e-6:
                self._probed.add(probe)
                self.probes.append(
                    {
                        "target_sparsity": probe,
                        "step": ctx.step,
                        "sparsity": sparsity,
                        "modules": {
                            name: rank_statistics(module.weight)
                            for name, module in self.modules.items()
                        },
                    }
                )

    def on_train_end(self, ctx: TrainContext) -> None:
        self._set_masks(self.num_steps)
        ctx.state["pruning"] = {
            "kind": self.config.kind,
            "scope": self.config.scope,
            "target_sparsity": self.config.sparsity,
            "sparsity": self.sparsity(),
            "steps": self.num_steps,
            "warmup_steps": self.warmup,
            "cooldown_steps": self.cooldown,
        }

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of the targeted weights the current masks remove."""
        removed = total = 0
        for mask, module in zip(self.masks.values(), self.modules.values(), strict=True):
            m = mask.mask(parametrize_original(module))
            removed += int((m == 0).sum())
            total += m.numel()
        return removed / max(total, 1)

    @torch.no_grad()
    def finalize(self) -> dict[str, torch.Tensor]:
        """Bake the final masks into the weights (``W <- W * M``), remove the parametrizations,
        and return ``{name: M}`` (bool, ``(out, in)``, True where kept)."""
        self._set_masks(self.num_steps)
        masks = {}
        for name, module in self.modules.items():
            masks[name] = self.masks[name].mask(parametrize_original(module)) != 0
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.masks.clear()
        return masks


def parametrize_original(module: nn.Module) -> torch.Tensor:
    """The unmasked weight of a parametrized module: ``parametrizations.weight.original``."""
    return module.parametrizations.weight.original
