"""The configuration every factorization method shares; each method subclasses it."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from factorlab.errors import ConfigError


@dataclass
class FactorizationConfig:
    """What to factorize and how much to keep. Subclass per method and register it.

    Attributes:
        param_ratio: fraction of each targeted weight matrix's parameters KEPT, in (0, 1].
            0.25 keeps a quarter. Biases stay dense and are not part of the budget.
        target_modules: which modules to factorize. A list of names (a module matches when its
            full name equals an entry or ends with ``"." + entry``) or one regular expression
            (full match against the module name). ``None`` uses the architecture's preset (the
            attention and feed-forward matrices of the transformer blocks) or, for an unknown
            architecture, every linear layer inside the repeated blocks.
        exclude_modules: modules never factorized, same forms as ``target_modules``.
        rank_pattern: per-module overrides, ``{regex: value}``. The first regex found
            (``re.search``) in a module's name wins; an ``int`` value is the rank (block rank for
            block methods), a ``float`` in (0, 1] is that module's ``param_ratio``.
        allocation: ``"uniform"`` (every matrix keeps ``param_ratio``) or ``"global"`` (one
            budget of ``param_ratio`` times all targeted weights, spent greedily where the
            method's truncation error drops most per parameter: ``factorlab.allocation``) or
            ``"sensitivity"`` (the same budget, spent where the model's OUTPUT changes least,
            measured per matrix and candidate rank on probe batches: ``factorlab.sensitivity``).
        min_rank: with global or sensitivity allocation, the smallest rank (block rank) of any
            matrix, >= 1.
        max_param_ratio: with global or sensitivity allocation, the largest fraction of its
            dense parameters any one matrix may keep, in (0, 1].
        allocation_normalize: with global allocation, minimize the sum of relative squared
            errors (each matrix's spectrum divided by its energy) instead of the sum of absolute
            ones (default: the objective the method itself minimizes, summed).
        sensitivity_samples: with sensitivity allocation, how many calibration examples the
            output is measured on (a run draws a seeded subset of its calibration data), >= 1.
        sensitivity_fractions: with sensitivity allocation, the candidate ranks measured per
            matrix, as fractions in (0, 1] of its largest useful rank (``None``:
            ``factorlab.sensitivity.DEFAULT_FRACTIONS``, 8 candidates). More candidates follow
            each loss curve more closely, at one projection and probe pass each.
        sensitivity_interpolation: with sensitivity allocation, how each measured loss curve is
            spread over the ranks between its points: ``"spectrum"`` (default: in proportion to
            the method's own truncation-error drops) or ``"linear"`` (evenly, the convex hull's
            slope); ``factorlab.sensitivity``.
        sequential: data-aware methods that read Gram statistics only (act-svd; see
            ``factorize_``): calibrate block ``l`` on the outputs of the already-compressed
            blocks ``1 .. l-1`` (SVD-LLM v2, GPTQ-style pipelines). Under global or sensitivity
            allocation the ranks are planned on the dense model first.
        compensate: with ``sequential`` (act-svd): fit each layer to the DENSE model's outputs
            on the same examples, ``min ||X W^T - X_c (A B)^T||_F`` with ``X`` the layer's inputs
            in the dense model and ``X_c`` in the model compressed so far, instead of to its own
            weight on the compressed inputs (``X_c W^T``). Closed form: the ridge solution
            ``M = W (K + d I)(G + d I)^{-1}`` (``K = X^T X_c``, ``G = X_c^T X_c``, ``d`` the
            act-svd damping), then act-svd of ``M`` in the ``G + d I`` norm; ``M = W`` when no
            error has reached the layer. The error correction of GPTQ-style pipelines (Frantar
            et al. 2023) applied to the low-rank fit. The caller keeps a dense copy of the model
            for the cross statistics (a factorlab run holds it until the run ends).
    """

    method: ClassVar[str] = ""

    param_ratio: float = 0.5
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int | float] = field(default_factory=dict)
    allocation: str = "uniform"
    min_rank: int = 1
    max_param_ratio: float = 1.0
    allocation_normalize: bool = False
    sensitivity_samples: int = 64
    sensitivity_fractions: list[float] | None = None
    sensitivity_interpolation: str = "spectrum"
    sequential: bool = False
    compensate: bool = False

    def __post_init__(self) -> None:
        from factorlab.allocation import BUDGET_ALLOCATIONS, check_allocation

        check_allocation(self.allocation, self.min_rank, self.max_param_ratio)
        if self.allocation in BUDGET_ALLOCATIONS and self.rank_pattern:
            raise ConfigError(
                f"rank_pattern and allocation={self.allocation!r} exclude each other: the "
                "allocator chooses every rank; give one of them"
            )
        if self.allocation == "sensitivity" and self.allocation_normalize:
            raise ConfigError(
                "allocation_normalize rescales truncation-error spectra (global allocation); "
                "sensitivity allocation measures the output itself: drop one of them"
            )
        if self.compensate and not self.sequential:
            raise ConfigError(
                "compensate fits each block to the dense model's outputs while the blocks before "
                "it are already compressed, so it needs sequential calibration: add --sequential"
            )
        samples = self.sensitivity_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"sensitivity_samples must be an int >= 1, got {samples!r}")
        fractions = self.sensitivity_fractions
        if fractions is not None:
            if not (
                isinstance(fractions, (list, tuple))
                and fractions
                and all(_is_fraction(f) for f in fractions)
            ):
                raise ConfigError(
                    "sensitivity_fractions must be a non-empty list of fractions in (0, 1] of "
                    "each matrix's largest useful rank, e.g. [0.1, 0.2, 0.4, 0.8, 1.0]; got "
                    f"{fractions!r}"
                )
            if self.allocation != "sensitivity":
                raise ConfigError(
                    "sensitivity_fractions are the candidate ranks of allocation='sensitivity', "
                    f"not of allocation={self.allocation!r}: drop them or use "
                    "--allocation sensitivity"
                )
            self.sensitivity_fractions = sorted({float(f) for f in fractions})
        from factorlab.sensitivity import INTERPOLATIONS

        if self.sensitivity_interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"sensitivity_interpolation must be one of {INTERPOLATIONS}, got "
                f"{self.sensitivity_interpolation!r}"
            )
        if self.sensitivity_interpolation != "spectrum" and self.allocation != "sensitivity":
            raise ConfigError(
                "sensitivity_interpolation shapes the measured curves of "
                f"allocation='sensitivity', not of allocation={self.allocation!r}: drop it or "
                "use --allocation sensitivity"
            )
        if isinstance(self.param_ratio, bool) or not isinstance(self.param_ratio, (int, float)):
            raise ConfigError(f"param_ratio must be a number in (0, 1], got {self.param_ratio!r}")
        if not 0.0 < self.param_ratio <= 1.0:
            raise ConfigError(
                f"param_ratio must be in (0, 1] (the fraction of parameters kept), got "
                f"{self.param_ratio}. For 4x fewer parameters use 0.25."
            )
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, str):
                _compile(value, key)
            elif value is not None and not (
                isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            ):
                raise ConfigError(
                    f"{key} must be a list of module names or one regex, got {value!r}"
                )
        for pattern, value in self.rank_pattern.items():
            _compile(pattern, "rank_pattern")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"rank_pattern[{pattern!r}] must be an int rank or a float ratio")
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"rank_pattern[{pattern!r}] = {value}: a rank must be >= 1")
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise ConfigError(f"rank_pattern[{pattern!r}] = {value}: a ratio must be in (0, 1]")

    def staging_problem(self) -> str | None:
        """Why a staged schedule (METHODS.md §4: a few blocks projected per stage) would change
        what this config computes, or ``None`` when it can be staged."""
        if self.allocation != "uniform":
            return (
                f"allocation={self.allocation!r} spends one budget over all matrices at once, "
                "but a stage sees only its own blocks; use allocation='uniform' or drop --staged"
            )
        if self.sequential:
            return (
                "--sequential is for simultaneous factorization; a staged run already "
                "calibrates each stage on the model compressed so far: drop one of them"
            )
        return None

    def make_schedule(self) -> Any:
        """The training schedule this method runs under when a run does not ask for one
        (``factorlab.training.schedules``: an object with ``name``, ``check`` and ``run``), or
        ``None`` for ``Simultaneous`` (project everything, then fine-tune). Methods that train
        while they compress (LPAF's pruning phase, DSFormer's straight-through factorizer)
        return their own."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form, with the method name under ``"method"``."""
        return {"method": self.method, **dataclasses.asdict(self)}


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what}: {pattern!r} is not a valid regular expression ({exc})") from exc


def _is_fraction(value: Any) -> bool:
    """A real number in (0, 1] (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0
