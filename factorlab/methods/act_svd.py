"""Activation-aware SVD [DRONE, SVD-LLM; METHODS.md §5]: truncate in the norm of the outputs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from factorlab.allocation import Spectrum, low_rank_spectrum
from factorlab.errors import ConfigError
from factorlab.layers.low_rank import LowRankLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.low_rank import plan_low_rank
from factorlab.methods.registry import Method, Projected, register_method
from factorlab.projections.activation_svd import (
    DEFAULT_EPS,
    activation_svd,
    compensated_weight,
    whitening_factor,
)
from factorlab.projections.svd import singular_values
from factorlab.projections.weighted_svd import plain_relative_error


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
        bias_correction: fit the affine map: whiten with the centred Gram
            ``X~^T X~ = G - N mu mu^T`` (``mu`` the mean input over the ``N`` calibration
            tokens) and move the mean output error into the bias, ``b' = b + W mu_dense -
            A B mu`` (``mu_dense = mu`` unless ``compensate``): the best rank-r affine
            approximation of the layer on the calibration data (bias correction as in Nagel et
            al. 2019, "Data-Free Quantization", here for the low-rank error). Needs layers with
            a bias.
    """

    method = "act-svd"

    eps: float = DEFAULT_EPS
    bias_correction: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.bias_correction, bool):
            raise ConfigError(
                f"bias_correction must be true or false, got {self.bias_correction!r}"
            )
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


@dataclass(frozen=True)
class _FitStatistics:
    """What one act-svd fit reads: the Gram it whitens with, the cross Gram of compensation,
    and the input means of bias correction (float64 where set; ``None`` where not used)."""

    gram: torch.Tensor
    cross: torch.Tensor | None = None
    mean: torch.Tensor | None = None  # of this model's inputs (X_c)
    reference_mean: torch.Tensor | None = None  # of the dense model's inputs (X)


def _fit_statistics(weight: torch.Tensor, stats: object, config: ActSVDConfig) -> _FitStatistics:
    gram = _gram(weight, stats)
    cross = getattr(stats, "cross", None) if config.compensate else None
    if config.compensate and cross is None:
        raise ConfigError(
            "compensate needs cross statistics of the dense and the compressed model "
            "(collect_statistics(..., reference=dense_model)); a factorlab run collects them "
            "with --sequential --compensate"
        )
    if not config.bias_correction:
        return _FitStatistics(gram, cross)
    total = getattr(stats, "input_sum", None)
    reference_total = getattr(stats, "reference_sum", None) if config.compensate else total
    if total is None or reference_total is None:
        raise ConfigError(
            "bias_correction needs the input sums of the calibration statistics "
            "(collect_statistics(..., gram=True) collects them)"
        )
    tokens = max(int(getattr(stats, "num_tokens", 0)), 1)
    mean = total.double().to(weight.device) / tokens
    reference_mean = reference_total.double().to(weight.device) / tokens
    gram = gram.double() - tokens * torch.outer(mean, mean)  # centred: X_c~^T X_c~
    if cross is not None:
        cross = cross.double().to(weight.device) - tokens * torch.outer(reference_mean, mean)
    return _FitStatistics(gram, cross, mean, reference_mean)


def spectrum_act_svd(weight: torch.Tensor, stats: object, config: ActSVDConfig) -> Spectrum:
    """Singular values of the whitened ``W C`` (``C C^T = G + damping I``, ``G`` centred under
    ``bias_correction``): the output error's spectrum, which act-svd truncates."""
    gram = _fit_statistics(weight, stats, dataclasses.replace(config, compensate=False)).gram
    C = whitening_factor(gram, config.eps, inverse=False)[0]
    return low_rank_spectrum(singular_values(weight.detach().double() @ C), *weight.shape)


def build_act_svd(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: ActSVDConfig,
    stats: object,
) -> Projected:
    if not (config.compensate or config.bias_correction):
        factors = activation_svd(weight, rank, _gram(weight, stats), eps=config.eps)
        return Projected(LowRankLinear.from_factors(factors.A, factors.B, bias), factors.rel_error)
    if config.bias_correction and bias is None:
        raise ConfigError(
            "bias_correction moves the mean of the output error into the layer's bias, but a "
            "targeted layer has none; drop bias_correction for this model"
        )
    fit = _fit_statistics(weight, stats, config)
    W = weight.detach().double()
    target = W if fit.cross is None else compensated_weight(W, fit.gram, fit.cross, config.eps)
    factors = activation_svd(target, rank, fit.gram, eps=config.eps)
    A, B = factors.A.double(), factors.B.double()
    if fit.mean is not None:
        # the mean output error, W mean(X) - A B mean(X_c), goes into the bias
        bias = (bias.detach().double() + W @ fit.reference_mean - A @ (B @ fit.mean)).to(bias)
    layer = LowRankLinear.from_factors(A.to(weight.dtype), B.to(weight.dtype), bias)
    return Projected(layer, plain_relative_error(W, A, B))


ACT_SVD = register_method(
    Method(
        "act-svd",
        ActSVDConfig,
        plan_low_rank,
        build_act_svd,
        needs_calibration=True,
        statistics=("gram",),
        spectrum=spectrum_act_svd,
        compensates=True,
    )
)
