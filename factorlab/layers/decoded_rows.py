"""A linear layer whose weight rows are decoded from latent codes by a (shared) decoder [K23].

``DecodedLinear`` holds its rows' latent codes ``Z`` (out x d) and original row norms (out,), and a
reference to a ``RowDecoder`` that several layers may share (one decoder for, say, the query
matrices of all blocks). Its weight is ``W = rescale(dec(Z), norms)`` (out x in) and it computes
``y = x W^T + b`` (METHODS.md §6).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from factorlab.layers.base import FactorizedLinear, register_layer, register_shared_module
from factorlab.projections.autoencoder import decode_rows, decoder_sizes


@register_shared_module
class RowDecoder(nn.Module):
    """Maps latent codes ``(..., latent_size)`` to rows ``(..., out_features)``.

    Non-linear: ``Linear(d, h1) - LeakyReLU - ... - Linear(h_k, n) - Tanh`` with widths
    ``hidden`` (``[2d, 4d]`` in [K23]); linear: one ``Linear(d, n)``. ``kind``/``spec``/
    ``from_spec`` let a checkpoint store it once and rebuild it (``register_shared_module``).
    """

    kind = "row_decoder"

    def __init__(
        self,
        latent_size: int,
        out_features: int,
        hidden: Sequence[int] | None = None,
        linear: bool = False,
    ):
        super().__init__()
        hidden = list(hidden) if hidden is not None else []
        if linear and hidden:
            raise ValueError("a linear decoder has no hidden layers")
        if latent_size < 1 or out_features < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"sizes must be >= 1, got {latent_size}, {hidden}, {out_features}")
        self.latent_size = latent_size
        self.out_features = out_features
        self.hidden = hidden
        self.linear = linear
        sizes = [latent_size, *hidden, out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))

    @classmethod
    def standard(cls, latent_size: int, out_features: int, linear: bool = False) -> RowDecoder:
        """[K23]'s architecture for latent size ``d``: hidden ``[2d, 4d]``, or linear."""
        sizes = decoder_sizes(latent_size, out_features, linear)
        return cls(latent_size, out_features, sizes[1:-1], linear)

    @classmethod
    def from_tensors(
        cls, layers: Sequence[tuple[torch.Tensor, torch.Tensor]], linear: bool
    ) -> RowDecoder:
        """A decoder holding copies of ``[(weight (out, in), bias (out,)), ...]``."""
        sizes = [layers[0][0].shape[1], *(w.shape[0] for w, _ in layers)]
        decoder = cls(sizes[0], sizes[-1], sizes[1:-1], linear)
        with torch.no_grad():
            for module, (w, b) in zip(decoder.layers, layers, strict=True):
                module.weight.copy_(w)
                module.bias.copy_(b)
        return decoder

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "latent_size": self.latent_size,
            "out_features": self.out_features,
            "hidden": list(self.hidden),
            "linear": self.linear,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> RowDecoder:
        return cls(**{k: v for k, v in spec.items() if k != "kind"})

    def forward(self, latents: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded rows; with ``norms`` each row is rescaled to its norm."""
        layers = [(m.weight, m.bias) for m in self.layers]
        return decode_rows(latents, layers, self.linear, norms)

    def extra_repr(self) -> str:
        return f"linear={self.linear}"


@register_layer
class DecodedLinear(FactorizedLinear):
    """``y = x W^T + b`` with ``W = dec(Z)``, each row rescaled to its stored norm [K23].

    Parameters: ``latents`` ``(out_features, latent_size)`` and the decoder (both trainable, as in
    [K23]'s GLUE fine-tuning), ``norms`` ``(out_features,)`` (stored, frozen: ``requires_grad``
    False) and the dense bias. ``decoder`` may be one ``RowDecoder`` object shared by several
    layers (``decoder_name`` names it in the checkpoint, where it is stored once).

    In eval mode, when no gradient is needed, the decoded weight is cached; the cache is dropped
    when the layer switches mode and is recomputed whenever a parameter it depends on changed
    (in-place updates are seen through tensor version counters, replaced tensors through their
    storage).
    """

    kind = "decoded_rows"
    shared_args = ("decoder",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        latent_size: int,
        decoder: RowDecoder,
        bias: bool = True,
        source: str = "linear",
        decoder_name: str = "decoder",
    ):
        super().__init__(in_features, out_features, bias, source)
        if not isinstance(decoder, RowDecoder):
            raise TypeError(f"decoder must be a RowDecoder, got {type(decoder).__name__}")
        if decoder.latent_size != latent_size or decoder.out_features != in_features:
            raise ValueError(
                f"decoder maps {decoder.latent_size} -> {decoder.out_features}; this layer needs "
                f"{latent_size} -> {in_features}"
            )
        self.latent_size = latent_size
        self.decoder = decoder
        self.decoder_name = decoder_name
        self.latents = nn.Parameter(torch.zeros(out_features, latent_size))
        self.norms = nn.Parameter(torch.zeros(out_features), requires_grad=False)
        self._cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_parts(
        cls,
        decoder: RowDecoder,
        latents: torch.Tensor,
        norms: torch.Tensor,
        bias: torch.Tensor | None = None,
        source: str = "linear",
        decoder_name: str = "decoder",
    ) -> DecodedLinear:
        """A layer using ``decoder`` (not copied: pass the same object to share it) with copies
        of ``latents`` (out x d), ``norms`` (out,) and ``bias`` (out,); ``decoder_name`` is the
        decoder's name in the checkpoint (layers sharing a decoder must give the same name)."""
        out, d = latents.shape
        layer = cls(
            decoder.out_features,
            out,
            d,
            decoder,
            bias=bias is not None,
            source=source,
            decoder_name=decoder_name,
        )
        with torch.no_grad():
            layer.latents.copy_(latents)
            layer.norms.copy_(norms)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def _decode(self) -> torch.Tensor:
        return self.decoder(self.latents, self.norms)

    def _cache_key(self) -> tuple[Any, ...]:
        tensors = (self.latents, self.norms, *self.decoder.parameters())
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    def decoded_weight(self) -> torch.Tensor:
        """``W`` (out x in): from the cache in eval mode without autograd, else freshly decoded."""
        needs_graph = torch.is_grad_enabled() and any(
            p.requires_grad for p in (self.latents, *self.decoder.parameters())
        )
        if self.training or needs_graph:
            self._cache = None
            return self._decode()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._decode())
        return self._cache[1]

    def train(self, mode: bool = True) -> DecodedLinear:
        self._cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.decoded_weight(), self.bias)

    def to_dense(self) -> torch.Tensor:
        return self._decode()

    def num_parameters(self) -> int:
        """Latents, norms, bias and the whole decoder (a shared decoder is counted in full here;
        ``factorize_``'s report divides it over the layers sharing it)."""
        return super().num_parameters()

    def macs_per_token(self) -> int:
        """``in * out``: the forward is a dense matmul with the decoded weight (decoding it costs
        nothing per token: it is cached in eval mode, once per step in training)."""
        return self.in_features * self.out_features

    def _spec_extra(self) -> dict[str, Any]:
        return {"latent_size": self.latent_size, "decoder": self.decoder_name}
