"""Activation-aware SVD [DRONE, SVD-LLM; METHODS.md §5]: truncate in the norm of the outputs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from factorlab.allocation import Spectrum, low_rank_spectrum
from factorlab.errors import ConfigError
from factorlab.layers.low_rank import LowRankLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.low_rank import plan_low_rank
from factorlab.methods.registry import Method, Projected, register_method
from factorlab.projections.activation_svd import DEFAULT_EPS, activation_svd, whitening_factor
from factorlab.projections.svd import singular_values


@dataclass
class ActSVDConfig(FactorizationConfig):
    """Activation-aware SVD: ``min ||X (W - A B)^T||_F`` over the calibration inputs ``X``.

    Needs calibration: the Gram matrix ``X^T X`` of every targeted module's inputs
    (``collect_statistics`` with ``gram=True``; any text works, no labels or head needed). Same
    rank as low-rank and the same ``LowRankLinear`` layer. The report's ``rel_error`` is the plain
    ``||W - A B||_F / ||W||_F``, not the output error the method minimizes.

    Attributes:
        eps: damping relative to the mean diagonal of the Gram matrix: ``G + eps * mean(diag G) I``
            is factored. Default 1e-2 (also GPTQ's ``percdamp`` default). Why: in float64 any eps
            down to about 1e-10 is numerically safe (the damped condition number is at most about
            ``1 + n / eps``), so eps is a statistical choice: it blends the calibration inputs'
            covariance with the identity (plain SVD), which guards directions the calibration
            data under-represents (most useful when the calibration set has fewer tokens than
            the layer has inputs).
    """

    method = "act-svd"

    eps: float = DEFAULT_EPS

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)):
            raise ConfigError(f"eps must be a number >= 0, got {self.eps!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"eps must be finite and >= 0, got {self.eps}")


def _gram(weight: torch.Tensor, stats: object) -> torch.Tensor:
    gram = getattr(stats, "gram", None)
    if gram is None:
        raise ConfigError("act-svd needs Gram statistics (collect_statistics(..., gram=True))")
    n = weight.shape[1]
    if tuple(gram.shape) != (n, n):
        raise ConfigError(
            f"Gram statistics of shape {tuple(gram.shape)} do not fit the weight "
            f"{tuple(weight.shape)}; were they collected on another model?"
        )
    return gram.to(weight.device)


def spectrum_act_svd(weight: torch.Tensor, stats: object, config: ActSVDConfig) -> Spectrum:
    """Singular values of the whitened ``W C`` (``C C^T = G + damping I``): the output error's
    spectrum, which act-svd truncates."""
    C = whitening_factor(_gram(weight, stats), config.eps, inverse=False)[0]
    return low_rank_spectrum(singular_values(weight.detach().double() @ C), *weight.shape)


def build_act_svd(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: ActSVDConfig,
    stats: object,
) -> Projected:
    factors = activation_svd(weight, rank, _gram(weight, stats), eps=config.eps)
    return Projected(LowRankLinear.from_factors(factors.A, factors.B, bias), factors.rel_error)


ACT_SVD = register_method(
    Method(
        "act-svd",
        ActSVDConfig,
        plan_low_rank,
        build_act_svd,
        needs_calibration=True,
        statistics=("gram",),
        spectrum=spectrum_act_svd,
    )
)
