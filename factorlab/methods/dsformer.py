"""DSFormer: dense x semi-structured-sparse factorization, learned by a Straight-Through
Factorizer [C23, METHODS.md §8].

Source: Chand, Prabhu, Kumar, "DSFormer: Effective Compression of Text-Transformers by Dense-Sparse
Weight Factorization", arXiv 2312.13211, 2023 [C23]. ``W ~ C D`` with a dense basis ``D`` (k x n)
per row group and ``C`` (m x k) holding exactly ``s`` non-zeros per row; the projection is
``factorlab.projections.dense_sparse``, the layers ``factorlab.layers.dense_sparse``, the
straight-through schedule ``factorlab.training.stf``.

Our choices: the budget rule (``DEFAULT_DENSITY``, measured), the alternating least-squares
rounds of the projection (``iterations``), and that an STF run without a task only projects.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from factorlab.errors import ConfigError
from factorlab.layers.dense_sparse import INT16_MAX, DenseSparseLinear, DenseSparseSTFLinear
from factorlab.methods.config import FactorizationConfig
from factorlab.methods.registry import Method, ModuleBudget, Projected, register_method
from factorlab.projections.dense_sparse import (
    DEFAULT_ITERATIONS,
    SUPPORTS,
    dense_sparse_num_parameters,
    dense_sparse_project,
)

DEFAULT_DENSITY = 0.375
"""Default budget rule: ``s = floor(density * k)`` non-zeros per row (3/8 of the basis), with
``k`` the largest basis that fits the budget. Chosen by measurement on the 36 MiniLM matrices
(``benchmarks/dsformer_projection.py``, no calibration): mean relative error at ``param_ratio``
0.5 / 0.357 / 0.28 with 3 alternating rounds::

    density 1/8   0.504 0.586 0.653     basis takes 1/4 of the budget  0.488 0.595 0.659
    density 1/4   0.414 0.531 0.605     basis takes 1/2                0.470 0.576 0.642
    density 3/8   0.399 0.521 0.596     basis takes 3/4                0.464 0.562 0.614
    density 1/2   0.410 0.532 0.606     truncated SVD, equal params    0.501 0.606 0.668
    density 3/4   0.454 0.568 0.635

Density 3/8 was best at all three ratios. With the default 10 rounds it reaches 0.383 / 0.510 /
0.588 (0.471 / 0.569 / 0.632 without rounds); truncated SVD given the same bytes (fp32 values
plus int16 indices) reaches 0.453 / 0.567 / 0.635, and this rule held to SVD's bytes 0.438 /
0.558 / 0.628. The "basis fraction" rules fall back to low rank (``s = k``) on square and wide
matrices, which is why they lose."""


def nnz_for_basis(k: int, density: float = DEFAULT_DENSITY) -> int:
    """``s`` for a basis of ``k`` rows under the density rule: ``max(1, floor(density k))``,
    at most ``k``."""
    return max(1, min(k, math.floor(density * k + 1e-9)))


def largest_basis(
    m: int, n: int, param_ratio: float, groups: int, nnz_of: Callable[[int], int]
) -> tuple[int, int] | None:
    """The largest ``k <= min(m / g, n)`` with ``nnz_of(k) <= k`` and ``g k n + m nnz_of(k) <=
    p m n``, with its ``s``, or ``None`` when none fits (``nnz_of`` non-decreasing)."""
    budget = param_ratio * m * n + 1e-9
    best = None
    for k in range(1, min(m // groups, n) + 1):
        s = nnz_of(k)
        if dense_sparse_num_parameters(m, n, k, s, groups) > budget:
            break
        if s <= k:
            best = (k, s)
    return best


def dsformer_sizes(
    m: int,
    n: int,
    param_ratio: float,
    groups: int = 1,
    basis_size: int | None = None,
    nnz_per_row: int | None = None,
    density: float = DEFAULT_DENSITY,
) -> tuple[int, int]:
    """``(k, s)`` for an ``m x n`` weight (out x in) keeping ``param_ratio`` of its parameters.

    Rule: ``g k n + m s <= p m n`` (biases not counted) with ``1 <= s <= k <= min(m / g, n)``.
    With neither size given, ``s = floor(density k)`` and ``k`` as large as fits. With only
    ``nnz_per_row``: the largest ``k >= s`` that fits. With only ``basis_size``: ``s`` by the
    density rule. With both: both as given. Given sizes must fit the budget.

    Raises:
        ConfigError: ``g`` does not divide ``m``, a given size out of range, given sizes over the
            budget, or a budget too small for even ``k = s = 1``.
    """
    if m % groups:
        raise ConfigError(
            f"dsformer groups={groups} does not divide the {m} rows of a {m} x {n} weight; "
            "choose a divisor of every targeted matrix's out_features"
        )
    kmax = min(m // groups, n)
    budget = param_ratio * m * n
    if basis_size is not None and not 1 <= basis_size <= min(kmax, INT16_MAX):
        raise ConfigError(
            f"basis_size {basis_size} is out of range for a {m} x {n} weight in {groups} "
            f"group(s): it must be in [1, {min(kmax, INT16_MAX)}]"
        )
    if basis_size is not None:
        k = basis_size
        s = nnz_per_row if nnz_per_row is not None else nnz_for_basis(k, density)
    elif nnz_per_row is not None:
        fit = largest_basis(m, n, param_ratio, groups, lambda k: nnz_per_row)
        if fit is None or fit[0] < nnz_per_row:
            raise ConfigError(
                f"nnz_per_row {nnz_per_row} needs a basis of at least {nnz_per_row} rows; "
                f"{groups} x {nnz_per_row} x {n} + {m} x {nnz_per_row} parameters exceed the "
                f"budget of {param_ratio} x {m} x {n} = {budget:.0f} (or the {kmax} rows "
                "available); lower nnz_per_row or raise param_ratio"
            )
        k, s = fit
    else:
        fit = largest_basis(m, n, param_ratio, groups, lambda k: nnz_for_basis(k, density))
        if fit is None:
            raise ConfigError(
                f"param_ratio {param_ratio} is too small for dsformer on a {m} x {n} weight: "
                f"even k = s = 1 needs {groups * n + m} parameters, the budget is {budget:.0f}"
            )
        return fit
    if not 1 <= s <= k:
        raise ConfigError(f"nnz_per_row {s} must be in [1, basis_size={k}]")
    params = dense_sparse_num_parameters(m, n, k, s, groups)
    if params > budget + 1e-9:
        raise ConfigError(
            f"basis_size {k} with nnz_per_row {s} in {groups} group(s) stores {params:,} "
            f"parameters for a {m} x {n} weight (g k n + m s), over the budget of {param_ratio} "
            f"x {m} x {n} = {budget:,.0f}; lower them or raise param_ratio"
        )
    return k, s


@dataclass
class DSFormerConfig(FactorizationConfig):
    """DSFormer [C23]: ``W ~ C D``, a dense basis per row group times ``s``-sparse rows.

    Parameters per matrix: ``g k n + m s`` (the ``m s`` int16 indices are counted in bytes, not as
    parameters; biases stay dense and outside the budget, as for every method). See
    ``dsformer_sizes`` for how ``(k, s)`` follow from ``param_ratio`` and the fields below; the
    report's "rank" is ``k``. An ``int`` in ``rank_pattern`` sets that module's ``k``.

    Attributes:
        basis_size: ``k``, rows of each group's basis (``None``: from the budget).
        nnz_per_row: ``s``, non-zeros per row of ``C`` (``None``: from the budget).
        groups: ``g``, contiguous row groups with their own basis; must divide every targeted
            matrix's ``out_features``.
        support: how the projection picks each row's support: ``"refit"`` (top-s of the
            least-squares row, then a least-squares refit on it) or ``"omp"`` (orthogonal
            matching pursuit, slower).
        stf: train with the Straight-Through Factorizer (``factorlab.training.stf``): latents and
            bases learned jointly on the task loss, then deployed. ``False``: project, then plain
            fine-tuning of the deployed form. Without a task both only project.
        refresh_interval: with ``stf``, recompute the top-s supports every this many optimizer
            steps (1: every step).
        iterations: alternating least-squares rounds of the projection after the SVD start (our
            addition; 0: the SVD basis only). Default 10.

    Calibration is optional: with Gram statistics (``--calibration`` collecting ``gram``) the
    basis starts from the activation-whitened weight and the fit minimizes the output error.
    """

    method = "dsformer"

    basis_size: int | None = None
    nnz_per_row: int | None = None
    groups: int = 1
    support: str = "refit"
    stf: bool = True
    refresh_interval: int = 1
    iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("basis_size", "nnz_per_row"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"{key} must be an int >= 1 or None, got {value!r}")
        if self.basis_size is not None and self.basis_size > INT16_MAX:
            raise ConfigError(
                f"basis_size {self.basis_size} does not fit int16 indices (at most {INT16_MAX})"
            )
        if (
            self.basis_size is not None
            and self.nnz_per_row is not None
            and self.nnz_per_row > self.basis_size
        ):
            raise ConfigError(
                f"nnz_per_row {self.nnz_per_row} exceeds basis_size {self.basis_size}: each row "
                "picks its non-zeros among the basis rows"
            )
        if not _is_int(self.groups) or self.groups < 1:
            raise ConfigError(f"groups must be an int >= 1, got {self.groups!r}")
        if self.support not in SUPPORTS:
            raise ConfigError(f"support must be one of {SUPPORTS}, got {self.support!r}")
        if not isinstance(self.stf, bool):
            raise ConfigError(f"stf must be true or false, got {self.stf!r}")
        if not _is_int(self.refresh_interval) or self.refresh_interval < 1:
            raise ConfigError(
                f"refresh_interval must be an int >= 1 (optimizer steps), got "
                f"{self.refresh_interval!r}"
            )
        if not _is_int(self.iterations) or self.iterations < 0:
            raise ConfigError(f"iterations must be an int >= 0, got {self.iterations!r}")

    def staging_problem(self) -> str | None:
        if self.stf:
            return (
                "dsformer with stf=True trains all factorizations jointly with its own "
                "straight-through schedule; use --option stf=false with --staged"
            )
        return super().staging_problem()

    def make_schedule(self) -> Any:
        """``STFSchedule()`` when ``stf`` (it also deploys the layers when there is no task),
        else ``None`` (project, then plain fine-tuning of the deployed form)."""
        if not self.stf:
            return None
        from factorlab.training.stf import STFSchedule

        return STFSchedule()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def plan_dsformer(m: int, n: int, budget: ModuleBudget, config: DSFormerConfig) -> int | None:
    """``k`` (the reported rank) for an ``m x n`` weight; ``None`` (stay dense) when the
    factorized form would not be smaller (``g k n + m s >= m n``).

    Raises:
        ConfigError: see ``dsformer_sizes``.
    """
    if budget.rank is not None:
        k = budget.rank
        kmax = min(m // config.groups, n) if m % config.groups == 0 else 0
        if not 1 <= k <= min(kmax, INT16_MAX):
            raise ConfigError(
                f"rank_pattern basis size {k} is out of range for a {m} x {n} weight in "
                f"{config.groups} group(s): it must be in [1, {min(kmax, INT16_MAX)}]"
            )
        s = _nnz(k, config)
        if s > k:
            raise ConfigError(f"nnz_per_row {s} exceeds the rank_pattern basis size {k}")
    else:
        k, s = dsformer_sizes(
            m, n, budget.param_ratio, config.groups, config.basis_size, config.nnz_per_row
        )
    if dense_sparse_num_parameters(m, n, k, s, config.groups) >= m * n:
        return None
    return k


def _nnz(k: int, config: DSFormerConfig) -> int:
    return config.nnz_per_row if config.nnz_per_row is not None else nnz_for_basis(k)


def build_dsformer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    config: DSFormerConfig,
    stats: object,
) -> Projected:
    """Project ``weight`` (out, in) with basis size ``rank``; the training form when
    ``config.stf``, else the deployed form. Gram statistics, when present, whiten the fit."""
    m, n = weight.shape
    s = _nnz(rank, config)
    gram = getattr(stats, "gram", None)
    if gram is not None and tuple(gram.shape) != (n, n):
        raise ConfigError(
            f"Gram statistics of shape {tuple(gram.shape)} do not fit the weight "
            f"{tuple(weight.shape)}; were they collected on another model?"
        )
    factors = dense_sparse_project(
        weight,
        rank,
        s,
        groups=config.groups,
        support=config.support,
        iterations=config.iterations,
        gram=gram,
    )
    cls = DenseSparseSTFLinear if config.stf else DenseSparseLinear
    layer = cls.from_factors(factors, bias)
    params = dense_sparse_num_parameters(m, n, rank, s, config.groups)
    params += bias.numel() if bias is not None else 0
    return Projected(layer, factors.rel_error, rank=rank, params=params)


DSFORMER = register_method(
    Method("dsformer", DSFormerConfig, plan_dsformer, build_dsformer, statistics=("gram",))
)
