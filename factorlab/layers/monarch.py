"""Monarch layer: ``W = P_out L P R`` with block-diagonal ``L`` and ``R`` [D22, METHODS.md §2]."""

from __future__ import annotations

import torch

from factorlab.layers.base import register_layer
from factorlab.layers.block_low_rank import BlockFactorLinear


@register_layer
class MonarchLinear(BlockFactorLinear):
    """Monarch linear layer (Dao et al. 2022 ICML; [G24]; METHODS.md §2): ``y = x M^T + b``.

    ``M = P_out L P R``: ``R`` is block-diagonal with ``nblocks = k`` blocks on the input,
    ``L`` block-diagonal with ``nblocks_out = j`` (default ``k``) blocks, ``P`` the
    ``(k, j) -> (j, k)`` transpose of the intermediate and ``P_out`` the stride permutation of the
    output: output block ``jj`` holds rows ``lam * j + jj``. Equivalently, sub-matrix
    ``M[lam j + jj, kk i + ii]`` has rank ``rank``. Parameters (dimensions zero-padded to
    ``n_pad``, ``m_pad``, multiples of ``k`` and ``j``; ``i = n_pad / k``, ``l = m_pad / j``):

    - ``R``: ``(k, j * rank, i)``, ``R[kk, jj r:(jj+1) r]`` the right factor of block
      ``(jj, kk)``;
    - ``L``: ``(j, l, k * rank)``, ``L[jj, :, kk r:(kk+1) r]`` its left factor;

    ``rank * (k * m_pad + j * n_pad)`` values plus the bias (with ``k = j = b``: ``b r (m + n)``).
    Forward: two ``torch.bmm`` and reshapes (see ``BlockFactorLinear``), one permuting pass that
    also adds the bias; the dense weight is never formed. fly's ``MonarchLinear(nblocks=b)`` is
    the case ``rank = min(m, n) / b^2``.

    Raises (constructor):
        ValueError: a block count outside ``[1, dimension]`` or ``rank`` outside ``[1, min(l, i)]``.
    """

    kind = "monarch"
    strided_rows = True
    factor_names = ("L", "R")

    @classmethod
    def from_factors(
        cls,
        L: torch.Tensor,
        R: torch.Tensor,
        in_features: int | None = None,
        out_features: int | None = None,
        bias: torch.Tensor | None = None,
        source: str = "linear",
    ) -> MonarchLinear:
        """A layer holding copies of ``L`` (j, l, k r), ``R`` (k, j r, i) and ``bias`` (m,).

        ``in_features`` / ``out_features`` default to the padded sizes ``k i`` / ``j l``; pass the
        original sizes for factors of a padded weight (``MonarchFactors`` carries them). The layer
        takes the factors' dtype and device.

        Raises:
            ValueError: the shapes are inconsistent with each other or with the sizes.
        """
        return cls._from_block_factors(L, R, in_features, out_features, bias, source)
