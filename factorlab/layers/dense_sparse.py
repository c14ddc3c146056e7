"""Dense x semi-structured-sparse layers ``W = C D`` [C23, METHODS.md §8].

Source: Chand, Prabhu, Kumar, "DSFormer: Effective Compression of Text-Transformers by Dense-Sparse
Weight Factorization", arXiv 2312.13211, 2023 [C23]. Two forms of the same factorization:

* ``DenseSparseLinear``, the deployed form (saved, loaded, benchmarked): a dense basis ``D`` per row
  group and exactly ``s`` stored coefficients per output row, with int16 column indices.
* ``DenseSparseSTFLinear``, the training form of the Straight-Through Factorizer: dense latent
  coefficients whose top-s per row (by magnitude) are used in the forward pass while the gradient
  reaches every latent; ``to_deployed()`` projects it onto the deployed form.

Our choices (METHODS.md §8 leaves them open): the kernel of the deployed forward (measured, see
``DenseSparseLinear``), the refresh of the training form's support (explicit, driven by
``factorlab.training.stf``), and the initialization of the latents off the support (see
``DenseSparseSTFLinear.from_factors``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from factorlab.errors import CheckpointError
from factorlab.layers.base import FactorizedLinear, register_layer
from factorlab.projections.dense_sparse import (
    DenseSparseFactors,
    check_sizes,
    dense_sparse_product,
)

INT16_MAX = 32767
GATHER_MAX_TOKENS = 2
"""Up to this many input rows the deployed forward gathers ``h`` directly (``index_select``);
above it, the fused gather + weighted sum of ``F.embedding_bag`` (see ``DenseSparseLinear``)."""


def _tracing() -> bool:
    """Whether the forward is being traced or compiled (``torch.export``, ONNX, ``jit.trace``):
    no data pointers, no shape-dependent kernel choice then."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


def _check(in_features: int, out_features: int, k: int, s: int, groups: int) -> None:
    check_sizes(out_features, in_features, k, s, groups)
    if k > INT16_MAX:
        raise ValueError(f"basis_size {k} does not fit the int16 indices (at most {INT16_MAX})")


@register_layer
class DenseSparseLinear(FactorizedLinear):
    """``y = x (C D)^T + b`` with a dense basis and ``s`` coefficients per row [C23, METHODS.md §8].

    Tensors (``m = out_features``, ``n = in_features``, ``g`` groups of ``m / g`` rows, ``k`` basis
    rows per group, ``s`` non-zeros per row):

    * ``basis``: parameter ``(g, k, n)``, group ``j``'s ``D_j``;
    * ``values``: parameter ``(m, s)``, the non-zeros of ``C``;
    * ``indices``: persistent int16 buffer ``(m, s)``, the column of ``C`` (row of the group's
      basis, in ``[0, k)``) of each value; so ``k <= 32767``;
    * ``bias``: ``(m,)`` or ``None``.

    ``g k n + m s`` parameters plus the bias; the ``m s`` indices are counted in bytes
    (``storage_bytes``), not as parameters. Output row ``i`` of group ``j`` is
    ``y_i = sum_t values[i, t] * h[j, indices[i, t]] + b_i`` with ``h_j = x D_j^T``, so the forward
    costs ``g k n + m s`` MACs per token and never forms an ``m x n`` product. Repeated indices in a
    row (only in an uninitialized layer) add up, here and in ``to_dense``.

    Kernel (measured with ``benchmarks/bench_dense_sparse_forward.py``, CPU fp32, MiniLM shapes at
    ``param_ratio`` 0.5 with the default rule, median ms, 1 thread, on a shared 2-core machine
    with load ~3, so +-30%): at 128 tokens the fused gather + weighted sum
    ``F.embedding_bag(indices, h^T, per_sample_weights=values)`` (this layer) took 0.52 / 1.66 /
    1.31 ms for 384x384 / 1536x384 / 384x1536, a CSR matmul (``torch.sparse_csr``, built from
    indices and values per call) 0.71 / 2.69 / 1.45 ms, the dense ``nn.Linear`` 0.48 / 1.83 /
    1.69 ms, while the plain gather ``h[:, indices] * values`` summed took 10-150 ms (it
    materializes tokens x m x s). At 1 token ``embedding_bag`` costs 0.11 / 0.84 / 0.21 ms
    (per-bag overhead); the plain gather (``index_select``, this layer) 0.06 / 0.32 / 0.13 ms is
    within 10-20% of CSR (0.05 / 0.29 / 0.11 ms); dense took 0.02 / 0.25 / 0.12 ms. So the layer
    uses the plain gather up to ``GATHER_MAX_TOKENS`` input rows and ``embedding_bag`` above;
    both are differentiable (the deployed form can be fine-tuned). 2 threads gave the same
    ranking at 1-16 tokens (at 128 tokens the load made them meaningless). While traced or compiled
    (ONNX export) it always uses the plain gather, which exports as Gather, Mul and ReduceSum.
    """

    kind = "dense_sparse"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        basis_size: int,
        nnz_per_row: int,
        groups: int = 1,
        bias: bool = True,
        source: str = "linear",
    ):
        super().__init__(in_features, out_features, bias, source)
        _check(in_features, out_features, basis_size, nnz_per_row, groups)
        self.basis_size = basis_size
        self.nnz_per_row = nnz_per_row
        self.groups = groups
        self.basis = nn.Parameter(torch.zeros(groups, basis_size, in_features))
        self.values = nn.Parameter(torch.zeros(out_features, nnz_per_row))
        self.register_buffer("indices", torch.zeros(out_features, nnz_per_row, dtype=torch.int16))
        self._flat_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    @classmethod
    def from_factors(
        cls,
        factors: DenseSparseFactors,
        bias: torch.Tensor | None = None,
        source: str = "linear",
    ) -> DenseSparseLinear:
        """A layer holding copies of ``factors`` (``basis`` (g, k, n), ``values`` and ``indices``
        (m, s)) and ``bias`` (m,).

        Raises:
            ValueError: sizes out of range, or ``k > 32767`` (int16 indices).
        """
        g, k, n = factors.basis.shape
        m, s = factors.values.shape
        layer = cls(n, m, k, s, g, bias=bias is not None, source=source)
        with torch.no_grad():
            layer.basis.copy_(factors.basis)
            layer.values.copy_(factors.values)
            layer.indices.copy_(factors.indices.to(torch.int16))
            if bias is not None:
                layer.bias.copy_(bias)
        return layer.to(factors.basis.device)

    def flat_indices(self) -> torch.Tensor:
        """``(m, s)`` int64 column of each value in ``h`` of all groups, ``(g k)`` wide: the
        int16 ``indices`` plus ``k`` times the row's group. Cached until ``indices`` changes
        (in place, as ``load_state_dict`` does, or by ``.to``); recomputed every call while
        tracing or compiling (export) and for inference tensors (no version counter)."""
        idx = self.indices
        if _tracing() or idx.is_inference():
            return idx.long() + self._offsets()
        key = (idx.data_ptr(), idx._version, idx.device)
        if self._flat_cache is None or self._flat_cache[0] != key:
            self._flat_cache = (key, idx.long() + self._offsets())
        return self._flat_cache[1]

    def _offsets(self) -> torch.Tensor:
        rows = self.out_features // self.groups
        offset = torch.arange(self.out_features, device=self.indices.device) // rows
        return (offset * self.basis_size)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        h = F.linear(x2, self.basis.reshape(-1, self.in_features))  # (T, g k)
        flat = self.flat_indices()
        tokens = h.shape[0]
        if tokens <= GATHER_MAX_TOKENS or _tracing():  # export: Gather, Mul, ReduceSum
            gathered = h.index_select(1, flat.reshape(-1))
            y = (gathered.view(tokens, self.out_features, self.nnz_per_row) * self.values).sum(-1)
        else:
            y = F.embedding_bag(
                flat, h.t().contiguous(), per_sample_weights=self.values, mode="sum"
            ).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def sparse_coefficients(self) -> torch.Tensor:
        """``C`` as a dense ``(m, k)`` matrix (for checks and ``to_dense``)."""
        dense = torch.zeros(
            self.out_features, self.basis_size, dtype=self.values.dtype, device=self.values.device
        )
        return dense.scatter_add(1, self.indices.long(), self.values)

    def to_dense(self) -> torch.Tensor:
        return dense_sparse_product(self.basis, self.sparse_coefficients())

    def macs_per_token(self) -> int:
        """``g k n + m s``: the basis matmul and one multiply-add per stored value."""
        return (
            self.groups * self.basis_size * self.in_features + self.out_features * self.nnz_per_row
        )

    def storage_bytes(self) -> int:
        """Bytes stored: ``basis``, ``values`` and ``bias`` at their element size, plus 2 per
        index (int16)."""
        tensors = [self.basis, self.values] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors) + 2 * self.indices.numel()

    def _spec_extra(self) -> dict[str, Any]:
        return {
            "basis_size": self.basis_size,
            "nnz_per_row": self.nnz_per_row,
            "groups": self.groups,
        }


class DenseSparseSTFLinear(FactorizedLinear):
    """Training form of ``DenseSparseLinear`` for the Straight-Through Factorizer [C23].

    Tensors: ``basis`` parameter ``(g, k, n)``; ``latents`` parameter ``(m, k)``, the dense latent
    coefficients (row ``i`` belongs to group ``i // (m / g)``); ``support`` non-persistent int64
    buffer ``(m, s)``, the columns used in the forward pass, ascending per row.

    Forward: ``C = latents * mask`` with ``mask`` the 0/1 indicator of ``support``, but the
    backward pass treats the mask as the identity (straight-through: ``latents + (latents * mask
    - latents).detach()``), so every latent, used or not, gets the gradient
    ``dL/dC``; then ``y = (x D_j^T) C_j^T + b`` per group (a dense ``(m, k)`` coefficient
    product: cheaper than the sparse kernel in training, and needed anyway for the dense
    gradient; never an ``m x n`` product). ``refresh_support()`` recomputes the support as the
    top-s of ``|latents|`` per row (the STF callback calls it every ``refresh_interval`` steps);
    ``to_deployed()`` refreshes it and returns the deployed layer.

    Not savable: ``spec()`` raises ``CheckpointError`` (swap it for ``to_deployed()`` first; the
    STF schedule does). ``num_parameters`` counts the latents (``g k n + m k``); the factorization
    it deploys to has ``g k n + m s``.
    """

    kind = "dense_sparse_stf"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        basis_size: int,
        nnz_per_row: int,
        groups: int = 1,
        bias: bool = True,
        source: str = "linear",
    ):
        super().__init__(in_features, out_features, bias, source)
        _check(in_features, out_features, basis_size, nnz_per_row, groups)
        self.basis_size = basis_size
        self.nnz_per_row = nnz_per_row
        self.groups = groups
        self.basis = nn.Parameter(torch.zeros(groups, basis_size, in_features))
        self.latents = nn.Parameter(torch.zeros(out_features, basis_size))
        support = torch.arange(nnz_per_row).expand(out_features, nnz_per_row).clone()
        self.register_buffer("support", support, persistent=False)

    @classmethod
    def from_factors(
        cls,
        factors: DenseSparseFactors,
        bias: torch.Tensor | None = None,
        source: str = "linear",
    ) -> DenseSparseSTFLinear:
        """A training-form layer that starts at ``factors``: support = ``factors.indices``,
        latents = ``factors.coefficients`` (the fitted values on the support, least-squares
        coefficients elsewhere), with the off-support latents of each row clamped in magnitude
        to just below (``1 - 1e-3`` times) the row's smallest on-support magnitude (our choice),
        so that the first refresh keeps the fitted support and training starts exactly from the
        projection."""
        g, k, n = factors.basis.shape
        m, s = factors.values.shape
        layer = cls(n, m, k, s, g, bias=bias is not None, source=source)
        support = factors.indices.long()
        on = torch.zeros(m, k, dtype=torch.bool, device=support.device)
        on.scatter_(1, support, True)
        limit = factors.values.abs().amin(1, keepdim=True) * (1 - 1e-3)
        latents = torch.where(on, factors.coefficients, factors.coefficients.clamp(-limit, limit))
        with torch.no_grad():
            layer.basis.copy_(factors.basis)
            layer.latents.copy_(latents)
            layer.support.copy_(support)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer.to(factors.basis.device)

    def mask(self) -> torch.Tensor:
        """``(m, k)`` 0/1 float indicator of ``support``."""
        return torch.zeros_like(self.latents).scatter_(1, self.support, 1.0)

    def coefficients(self) -> torch.Tensor:
        """``(m, k)``: the latents on the support, 0 elsewhere, with a straight-through gradient
        to every latent."""
        masked = self.latents * self.mask()
        return self.latents + (masked - self.latents).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.coefficients()
        h = F.linear(x, self.basis.reshape(-1, self.in_features))  # (..., g k)
        if self.groups == 1:
            return F.linear(h, C, self.bias)
        lead = h.shape[:-1]
        hg = h.reshape(-1, self.groups, self.basis_size)
        Cg = C.reshape(self.groups, -1, self.basis_size)
        y = torch.einsum("tgk,grk->tgr", hg, Cg).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def top_support(self) -> torch.Tensor:
        """``(m, s)`` int64: the top-s columns of ``|latents|`` per row, ascending."""
        top = self.latents.abs().topk(self.nnz_per_row, dim=1).indices
        return top.sort(dim=1).values

    @torch.no_grad()
    def refresh_support(self) -> int:
        """Set ``support`` to the current top-s; returns how many of the ``m s`` support
        entries changed."""
        new = self.top_support()
        old = self.mask().bool()
        kept = old.gather(1, new).sum().item()
        self.support.copy_(new)
        return self.support.numel() - int(kept)

    @torch.no_grad()
    def to_deployed(self) -> DenseSparseLinear:
        """The deployed layer (same device and dtype): the support is refreshed to the top-s,
        ``values`` = the latents there, ``basis`` and ``bias`` copied. After the call this layer
        and the result compute the same function."""
        self.refresh_support()
        layer = DenseSparseLinear(
            self.in_features,
            self.out_features,
            self.basis_size,
            self.nnz_per_row,
            self.groups,
            bias=self.bias is not None,
            source=self.source,
        ).to(device=self.latents.device, dtype=self.latents.dtype)
        layer.basis.copy_(self.basis)
        layer.values.copy_(self.latents.gather(1, self.support))
        layer.indices.copy_(self.support.to(torch.int16))
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        layer.train(self.training)
        return layer

    def to_dense(self) -> torch.Tensor:
        return dense_sparse_product(self.basis, self.latents * self.mask())

    def deployed_num_parameters(self) -> int:
        """Parameters of the deployed form: ``g k n + m s`` plus the bias."""
        bias = self.out_features if self.bias is not None else 0
        return (
            self.groups * self.basis_size * self.in_features
            + self.out_features * (self.nnz_per_row)
            + bias
        )

    def macs_per_token(self) -> int:
        """``g k n + m k``: the training forward multiplies the dense latents."""
        return self.groups * self.basis_size * self.in_features + self.out_features * (
            self.basis_size
        )

    def spec(self) -> dict[str, Any]:
        """Refused: the training form is not a checkpoint format.

        Raises:
            CheckpointError: always; deploy first (``to_deployed``, or
                ``factorlab.training.stf.deploy_``).
        """
        raise CheckpointError(
            "a DSFormer layer is still in its straight-through training form "
            "(DenseSparseSTFLinear), which is not saved; deploy it first with "
            "factorlab.training.stf.deploy_(model) (the STF schedule does this after training)"
        )

    def _spec_extra(self) -> dict[str, Any]:
        return {
            "basis_size": self.basis_size,
            "nnz_per_row": self.nnz_per_row,
            "groups": self.groups,
        }
