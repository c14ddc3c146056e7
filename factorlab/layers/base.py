"""The base class of every factorized layer and the registry used to rebuild layers on load."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from factorlab.errors import CheckpointError

LAYER_TYPES: dict[str, type[FactorizedLinear]] = {}
SHARED_MODULE_TYPES: dict[str, type[nn.Module]] = {}


def register_layer(cls: type[FactorizedLinear]) -> type[FactorizedLinear]:
    """Class decorator: make ``cls`` loadable from a checkpoint spec under ``cls.kind``."""
    if cls.kind in LAYER_TYPES:
        raise RuntimeError(f"layer kind {cls.kind!r} registered twice")
    LAYER_TYPES[cls.kind] = cls
    return cls


def register_shared_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator for a module several layers may share (e.g. one decoder for a group).

    The class needs a ``kind`` string, ``spec() -> dict`` (JSON) and ``from_spec(spec)`` building an
    uninitialized module of the same shapes. A checkpoint stores every shared module's spec once,
    under ``"shared_modules"``, and its tensors once; loading rebuilds one instance per name and
    hands it to every layer that names it (see ``FactorizedLinear.shared_args``).
    """
    kind = cls.kind  # type: ignore[attr-defined]
    if kind in SHARED_MODULE_TYPES:
        raise RuntimeError(f"shared module kind {kind!r} registered twice")
    SHARED_MODULE_TYPES[kind] = cls
    return cls


def build_shared_module(spec: dict[str, Any]) -> nn.Module:
    """An uninitialized shared module from its spec (``{"kind": ..., **constructor args}``).

    Raises:
        CheckpointError: unknown kind, or a spec that does not fit it.
    """
    kind = spec.get("kind")
    if kind not in SHARED_MODULE_TYPES:
        raise CheckpointError(
            f"unknown shared module kind {kind!r}; this factorlab knows "
            f"{sorted(SHARED_MODULE_TYPES)}. The checkpoint was written by a newer factorlab."
        )
    try:
        return SHARED_MODULE_TYPES[kind].from_spec(spec)  # type: ignore[attr-defined]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"spec {spec} does not fit shared module {kind!r}: {exc}") from exc


class FactorizedWeight:
    """What modeling code may read of a factorized layer's ``weight`` without the dense matrix.

    Some Hugging Face modeling code reads ``module.weight.dtype`` or ``.device`` inside its forward
    (T5's feed-forward casts its input to ``wo.weight.dtype``; Switch and NLLB-MoE do the same).
    ``FactorizedLinear.weight`` answers with this object: ``shape`` ``(out_features,
    in_features)``, ``dtype`` and ``device`` of the layer's factors, never materializing ``W``.
    It is deliberately not a ``torch.Tensor`` (code that checks ``isinstance(w, torch.Tensor)``
    before using the values skips it); any other attribute raises an ``AttributeError`` that
    points to ``to_dense()``.
    """

    __slots__ = ("_layer",)

    def __init__(self, layer: FactorizedLinear):
        self._layer = layer

    def _first_tensor(self) -> torch.Tensor:
        tensor = next(self._layer.parameters(), None)
        if tensor is None:
            tensor = next(self._layer.buffers(), None)
        if tensor is None:
            raise AttributeError(f"{type(self._layer).__name__} holds no tensor yet")
        return tensor

    @property
    def dtype(self) -> torch.dtype:
        return self._first_tensor().dtype

    @property
    def device(self) -> torch.device:
        return self._first_tensor().device

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._layer.out_features, self._layer.in_features))

    @property
    def ndim(self) -> int:
        return 2

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"{type(self._layer).__name__}.weight is held in factored form and offers only "
            f"dtype, device, shape, ndim and size(), not {name!r}; call to_dense() for the "
            "dense (out_features, in_features) matrix"
        )

    def __repr__(self) -> str:
        return (
            f"FactorizedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"
        )


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
    shared_args: ClassVar[tuple[str, ...]] = ()
    """Constructor arguments that are shared modules. For each ``arg`` the constructor takes the
    module as ``arg`` and its name as ``arg + "_name"`` and keeps both as attributes; the spec
    holds the name under ``arg``, an entry of the checkpoint's ``"shared_modules"``."""

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

    @property
    def weight(self) -> FactorizedWeight:
        """``dtype``, ``device`` and ``shape`` of the weight this layer stands for, for modeling
        code that reads them (see ``FactorizedWeight``); ``to_dense()`` gives the values."""
        return FactorizedWeight(self)

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

    def shared_modules(self) -> dict[str, nn.Module]:
        """``{name: module}`` of the shared modules this layer uses (``shared_args``)."""
        return {getattr(self, f"{arg}_name"): getattr(self, arg) for arg in self.shared_args}

    @classmethod
    def from_spec(
        cls, spec: dict[str, Any], shared_modules: dict[str, nn.Module] | None = None
    ) -> FactorizedLinear:
        """Build an uninitialized layer (zero factors) of the kind and shapes in ``spec``.

        ``shared_modules`` maps the names in the spec's ``shared_args`` entries to module
        instances (one instance per name, so layers naming it share it).

        Raises:
            CheckpointError: the kind is unknown, the spec lacks a constructor argument, or names
                a shared module that is not given.
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
        for arg in layer_cls.shared_args:
            name = kwargs.get(arg)
            if name not in (shared_modules or {}):
                raise CheckpointError(
                    f"layer spec {spec} names shared module {name!r}, which the checkpoint's "
                    "shared_modules section lacks; the checkpoint is damaged"
                )
            kwargs[arg] = shared_modules[name]  # type: ignore[index]
            kwargs[f"{arg}_name"] = name
        try:
            return layer_cls(**kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:  # a missing or ill-typed argument
            raise CheckpointError(f"spec {spec} does not fit layer kind {kind!r}: {exc}") from exc

    def num_parameters(self) -> int:
        """Number of stored values (factors and bias) this layer owns."""
        return sum(p.numel() for p in self.parameters())

    def storage_bytes(self) -> int:
        """Bytes this layer stores: every parameter and buffer at its element size (layers with
        index buffers or shared modules may count differently)."""
        tensors = list(self.parameters()) + list(self.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_num_parameters(self) -> int:
        """Parameters of the dense layer it replaces: ``out * in`` plus the bias."""
        bias = self.out_features if self.bias is not None else 0
        return self.in_features * self.out_features + bias

    def macs_per_token(self) -> int:
        """Multiply-accumulates of one forward per input row (token), the bias add not counted.

        Default: the number of stored factor values (parameters without the bias), which is the
        cost of layers that use every factor value once per token in a chain of (batched)
        matmuls: low-rank ``r (m + n)``, Monarch and block low-rank (padding included). Layers
        that reuse, share or skip values (sparse, decoded or shared factors) override it. The
        dense layer it replaces costs ``in_features * out_features`` (``dense_macs_per_token``).
        """
        bias = self.bias.numel() if self.bias is not None else 0
        return self.num_parameters() - bias

    def dense_macs_per_token(self) -> int:
        """Multiply-accumulates per token of the dense layer it replaces: ``out * in``."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self._spec_extra().items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}" + (f", {extra}" if extra else "")
        )
