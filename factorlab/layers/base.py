"""The base class of every factorized layer and the registry used to rebuild layers on load."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from factorlab.errors import CheckpointError

LAYER_TYPES: dict[str, type[FactorizedLinear]] = {}


def register_layer(cls: type[FactorizedLinear]) -> type[FactorizedLinear]:
    """Class decorator: make ``cls`` loadable from a checkpoint spec under ``cls.kind``."""
    if cls.kind in LAYER_TYPES:
        raise RuntimeError(f"layer kind {cls.kind!r} registered twice")
    LAYER_TYPES[cls.kind] = cls
    return cls


class FactorizedLinear(nn.Module):
    """A drop-in replacement for ``nn.Linear`` whose weight is held in factored form.

    Computes ``y = x W^T + b`` for ``x`` of shape ``(..., in_features)`` and ``y`` of shape
    ``(..., out_features)``, where ``W`` (``out_features x in_features``) is never stored. The bias
    is kept dense and unchanged. Subclasses hold their factors as parameters, implement
    ``forward``, ``to_dense`` and ``_spec_extra`` / ``__init__`` so that ``from_spec`` can build an
    empty layer of the right shapes (for loading a checkpoint without re-running a projection).

    ``source`` records the module type that was replaced (``"linear"`` or ``"conv1d"`` for GPT-2's
    ``Conv1D``), so ``densify`` can restore the original type and its weight layout.
    """

    kind: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, source: str = "linear"):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.source = source
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``W`` this layer computes, shape ``(out_features, in_features)``."""
        raise NotImplementedError

    def _spec_extra(self) -> dict[str, Any]:
        """Constructor arguments beyond the shapes, bias flag and source (e.g. ``rank``)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """A JSON-serializable description from which ``from_spec`` rebuilds this layer's shapes."""
        return {
            "kind": self.kind,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "source": self.source,
            **self._spec_extra(),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FactorizedLinear:
        """Build an uninitialized layer (zero factors) of the kind and shapes in ``spec``.

        Raises:
            CheckpointError: the kind is unknown or the spec lacks a constructor argument.
        """
        kind = spec.get("kind")
        if kind not in LAYER_TYPES:
            raise CheckpointError(
                f"unknown factorized layer kind {kind!r}; this factorlab knows "
                f"{sorted(LAYER_TYPES)}. "
                "The checkpoint was written by a newer or different factorlab."
            )
        layer_cls = LAYER_TYPES[kind]
        kwargs = {k: v for k, v in spec.items() if k != "kind"}
        try:
            return layer_cls(**kwargs)
        except TypeError as exc:
            raise CheckpointError(f"spec {spec} does not fit layer kind {kind!r}: {exc}") from exc

    def num_parameters(self) -> int:
        """Number of stored values (factors and bias) this layer owns."""
        return sum(p.numel() for p in self.parameters())

    def dense_num_parameters(self) -> int:
        """Parameters of the dense layer it replaces: ``out * in`` plus the bias."""
        bias = self.out_features if self.bias is not None else 0
        return self.in_features * self.out_features + bias

    def extra_repr(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._spec_extra().items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}" + (f", {extra}" if extra else "")
        )
