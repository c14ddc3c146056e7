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


def _tracing() -> bool:
    """Whether the forward is being traced or compiled (``torch.export``, ONNX, ``jit.trace``):
    no data pointers, no shape-dependent kernel choice then."""
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing())


def _coefficient_product(
    h: torch.Tensor, C: torch.Tensor, groups: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``y = h_j C_j^T + b`` per row group: ``h`` ``(..., g k)``, ``C`` ``(m, k)`` with rows of
    group ``j`` contiguous; returns ``(..., m)``."""
    if groups == 1:
        return F.linear(h, C, bias)
    k = C.shape[1]
    lead = h.shape[:-1]
    hg = h.reshape(-1, groups, k)
    Cg = C.reshape(groups, -1, k)
    y = torch.einsum("tgk,grk->tgr", hg, Cg).reshape(*lead, C.shape[0])
    return y if bias is None else y + bias


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
    ``y_i = sum_t values[i, t] * h[j, indices[i, t]] + b_i`` with ``h_j = x D_j^T``: the forward
    never forms an ``m x n`` product. Repeated indices in a row (only in an uninitialized layer)
    add up, here and in ``to_dense``.

    Kernel (our choice, measured with ``benchmarks/bench_dense_sparse_forward.py``): the stored
    coefficients are scattered into the dense ``(m, k)`` matrix ``C`` (zeros off the support)
    and ``y = h C^T`` is one dense matmul, ``g k n + m k`` MACs per token (the zeros of ``C``
    are multiplied too: ``k / s = 8 / 3`` times the ``m s`` of a sparse kernel under the default
    rule). On CPU fp32 at MiniLM shapes and ``param_ratio`` 0.28 (1 thread, median ms, a
    shared 2-core machine with load ~4, so +-30%) it took 0.19 / 1.12 / 0.81 ms at 128 tokens
    for 384x384 / 1536x384 / 384x1536, against 0.55 / 1.63 / 1.24 for the fused gather +
    weighted sum of ``F.embedding_bag``, 0.38 / 1.94 / 1.14 for a CSR matmul
    (``torch.sparse_csr``), 18-250 for the plain gather ``h[:, idx] * values`` summed (it
    materializes tokens x m x s) and 0.43 / 1.92 / 1.86 for the dense ``nn.Linear``; at 1 token
    0.015 / 0.17 / 0.06 ms against 0.05-0.43 (CSR), 0.10-1.0 (``embedding_bag``) and 0.02 / 0.28 /
    0.20 (dense); at 4,096 tokens 10 / 63 / 38 ms against 15 / 130 / 46 (``embedding_bag``), 22 /
    204 / 33 (CSR) and 18 / 67 / 93 (dense). ``C`` is rebuilt at every call while gradients are
    recorded (it is differentiable in ``values``: the deployed form can be fine-tuned) and
    cached otherwise, until ``values`` or ``indices`` change (in place, as ``load_state_dict``
    does, or by ``.to``); the cache holds ``m k`` floats. Traced or compiled (ONNX export), ``C``
    is a ``ScatterElements`` of the stored values, constant-folded by ONNX Runtime into one
    initializer, so the exported layer runs as two MatMuls.
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
        self._coefficient_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

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

    def coefficient_matrix(self) -> torch.Tensor:
        """``C`` as the dense ``(m, k)`` matrix the forward multiplies: rebuilt while gradients
        are recorded, while tracing or compiling, and for inference tensors (no version
        counter); otherwise cached until ``values`` or ``indices`` change."""
        values, idx = self.values, self.indices
        if (torch.is_grad_enabled() and values.requires_grad) or _tracing():
            return self.sparse_coefficients()
        try:
            key = (values._version, idx._version, values.data_ptr(), idx.data_ptr())
        except RuntimeError:  # inference tensors have no version counter
            return self.sparse_coefficients()
        cache = self._coefficient_cache
        if cache is None or cache[0] != key:
            cache = self._coefficient_cache = (key, self.sparse_coefficients())
        return cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.basis.reshape(-1, self.in_features))  # (..., g k)
        return _coefficient_product(h, self.coefficient_matrix(), self.groups, self.bias)

    def sparse_coefficients(self) -> torch.Tensor:
        """``C`` as a dense ``(m, k)`` matrix (for checks and ``to_dense``)."""
        dense = torch.zeros(
            self.out_features, self.basis_size, dtype=self.values.dtype, device=self.values.device
        )
        return dense.scatter_add(1, self.indices.long(), self.values)

    def to_dense(self) -> torch.Tensor:
        return dense_sparse_product(self.basis, self.sparse_coefficients())

    def macs_per_token(self) -> int:
        """``g k n + m k``: the basis matmul and the dense coefficient matmul of the forward
        (zeros included; a sparse kernel would need ``m s``)."""
        return self.groups * self.basis_size * self.in_features + self.out_features * (
            self.basis_size
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
        h = F.linear(x, self.basis.reshape(-1, self.in_features))  # (..., g k)
        return _coefficient_product(h, self.coefficients(), self.groups, self.bias)

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
