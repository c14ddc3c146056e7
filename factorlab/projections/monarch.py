"""Monarch projection: the closed-form optimal Monarch approximation of a dense weight.

Source: Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
ICML 2022 [D22] (reference code: HazyResearch/fly, ``blockdiag_butterfly_project_einsum_rank``);
used as a baseline by Gupta et al. 2024, arXiv 2406.11307 [G24]; METHODS.md §2.

A Monarch matrix is ``M = P_out L P R`` with ``R`` (``k`` blocks) and ``L`` (``j`` blocks)
block-diagonal. Viewing ``W[(lam j + jj), (kk i + ii)]`` as the ``k j`` sub-matrices
``W_{jj,kk}`` of shape ``(m/j) x (n/k)`` (rows with stride ``j``: row ``lam * j + jj`` belongs to
output block ``jj``; contiguous column blocks), ``M`` restricted to each sub-matrix has rank at most
``r``, and the sub-matrices are disjoint, so the batched truncated SVD of all of them is the
Frobenius-optimal projection. It equals block-wise low-rank on the row-permuted weight:
``Monarch(W) = P^T BLR(P W)`` with ``(P W)[jj (m/j) + lam] = W[lam j + jj]``.

Factor layout (the one ``MonarchLinear`` runs):

- ``R``: ``(k, j r, n_pad / k)``; ``R[kk, jj r:(jj+1) r]`` is the right factor of ``W_{jj,kk}``.
- ``L``: ``(j, m_pad / j, k r)``; ``L[jj, :, kk r:(kk+1) r]`` is its left factor.

``r (k m_pad + j n_pad)`` parameters; with ``k = j = b`` and divisible shapes, ``b r (m + n)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from factorlab.projections.block_low_rank import (
    block_low_rank_num_parameters,
    blockwise_truncated_svd,
    check_block_args,
    pad_weight,
)


@dataclass(frozen=True)
class MonarchFactors:
    """``W ~ P_out L P R`` in the dtype of the input weight [D22, METHODS.md §2].

    Attributes:
        L: left block-diagonal factor, ``(nblocks_out, m_pad / nblocks_out, nblocks_in * rank)``.
        R: right block-diagonal factor, ``(nblocks_in, nblocks_out * rank, n_pad / nblocks_in)``.
        singular_values: float64, ``(nblocks_out, nblocks_in, q)``: the full spectrum of every
            sub-matrix ``W_{jj,kk}`` of the padded weight (``q`` its smaller dimension), descending.
        rel_error: ``||W - M||_F / ||W||_F`` (a fraction, 0 when ``W = 0``), computed from the
            discarded singular values of all sub-matrices (exact: they partition ``W``).
        out_features, in_features: the shape ``(m, n)`` of the weight before padding.
    """

    L: torch.Tensor
    R: torch.Tensor
    singular_values: torch.Tensor
    rel_error: float
    out_features: int
    in_features: int

    @property
    def nblocks_out(self) -> int:
        return self.L.shape[0]

    @property
    def nblocks_in(self) -> int:
        return self.R.shape[0]

    @property
    def rank(self) -> int:
        return self.R.shape[1] // self.nblocks_out


def monarch_num_parameters(
    out_features: int, in_features: int, nblocks: int, rank: int, nblocks_out: int | None = None
) -> int:
    """Stored values of a Monarch factorization (no bias): ``r (k m_pad + j n_pad)``.

    ``k = nblocks`` input blocks, ``j = nblocks_out`` (default ``nblocks``) output blocks;
    ``m_pad``, ``n_pad`` are the dimensions rounded up to multiples of ``j`` and ``k``. METHODS.md
    §2: ``r (k m + j n)``, with ``k = j = b``: ``b r (m + n)``. 3072 x 768, b = 4, r = 76:
    1,167,360 (0.495 of the dense 2,359,296).
    """
    return block_low_rank_num_parameters(out_features, in_features, nblocks, rank, nblocks_out)


def stride_permutation(out_features: int, nblocks_out: int) -> torch.Tensor:
    """Row order ``perm`` (int64, length ``m_pad``) that makes Monarch's output blocks contiguous.

    ``perm[jj * (m_pad / j) + lam] = lam * j + jj``, so ``W_pad[perm]`` is ``P W``: block-wise
    low-rank of ``P W`` is Monarch of ``W`` (METHODS.md §3). ``m_pad`` is ``out_features``
    rounded up to a multiple of ``nblocks_out``.
    """
    j = nblocks_out
    rows = -(-out_features // j)
    return torch.arange(rows * j).view(rows, j).t().reshape(-1)


def monarch_project(
    weight: torch.Tensor, nblocks_in: int, nblocks_out: int, rank: int
) -> MonarchFactors:
    """The closed-form optimal Monarch approximation of ``weight`` (m x n) [D22, METHODS.md §2].

    Zero-pads ``weight`` to ``(m_pad, n_pad)`` (multiples of ``nblocks_out`` and ``nblocks_in``),
    takes the ``nblocks_in * nblocks_out`` sub-matrices ``W[lam j + jj, kk i + ii]`` (rows with
    stride ``j = nblocks_out``, contiguous columns) of shape ``(m_pad / j) x (n_pad / k)``, and
    truncates each to rank ``rank`` with one batched ``torch.linalg.svd`` (float64,
    ``full_matrices=False``), ``S^{1/2}`` folded into both factors. The squared Frobenius error
    equals the discarded singular mass of all sub-matrices, the minimum over Monarch matrices of
    that block rank. Factors are returned in ``weight.dtype`` on its device.

    Raises:
        ValueError: ``weight`` not 2-D, a block count below 1 or above its dimension, or ``rank``
            above the smaller sub-matrix dimension (``check_block_args``).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    m, n = weight.shape
    check_block_args(m, n, nblocks_in, nblocks_out, rank)
    w = pad_weight(weight, nblocks_in, nblocks_out)
    j, k = nblocks_out, nblocks_in
    m_pad, n_pad = w.shape
    # W[(lam j + jj), (kk i + ii)] -> blocks[jj, kk, lam, ii]
    blocks = w.view(m_pad // j, j, k, n_pad // k).permute(1, 2, 0, 3)
    L, R, S, rel_error = blockwise_truncated_svd(blocks, rank)
    return MonarchFactors(
        L=L.to(weight.dtype),
        R=R.to(weight.dtype),
        singular_values=S,
        rel_error=rel_error,
        out_features=m,
        in_features=n,
    )
