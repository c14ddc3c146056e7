"""Block-wise low-rank (BLR) projection: every block of a grid gets its own truncated SVD.

Source: Gupta et al. 2024, arXiv 2406.11307 [G24]; METHODS.md §3. The grid is ``b_out x b_in``
contiguous blocks; each block ``W_jk`` (``m/b_out x n/b_in``) becomes ``U_jk V_jk`` of rank ``r``.
``r (b_in m + b_out n)`` parameters. The same batched SVD also serves the Monarch projection
(``factorlab.projections.monarch``), which differs only by a stride permutation of the rows.

Factor layout (chosen for the layer's forward pass, two ``torch.bmm``):

- ``V``: ``(b_in, b_out * r, n_pad / b_in)``; ``V[k, j*r:(j+1)*r]`` is ``V_jk``. Stage one
  multiplies input block ``k`` by all its ``b_out`` right factors in one batched matmul.
- ``U``: ``(b_out, m_pad / b_out, b_in * r)``; ``U[j, :, k*r:(k+1)*r]`` is ``U_jk``. Stage two sums
  ``U_jk h_jk`` over ``k`` as one matmul per output block.

Dimensions that are not multiples of the block counts are zero-padded up to the next multiple
(``m_pad``, ``n_pad``); the layer pads its input and drops the padded outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from factorlab.errors import ConfigError
from factorlab.projections.svd import relative_error_from_spectrum


@dataclass(frozen=True)
class BlockLowRankFactors:
    """``W ~ blockwise U_jk V_jk`` in the dtype of the input weight [G24, METHODS.md §3].

    Attributes:
        U: left factors, ``(nblocks_out, m_pad / nblocks_out, nblocks_in * rank)``.
        V: right factors, ``(nblocks_in, nblocks_out * rank, n_pad / nblocks_in)``.
        singular_values: float64, ``(nblocks_out, nblocks_in, q)`` with ``q`` the smaller block
            dimension: the full spectrum of every block ``(j, k)`` of the padded weight, descending.
        rel_error: ``||W - W_hat||_F / ||W||_F`` (a fraction, 0 when ``W = 0``), computed from the
            discarded singular values of all blocks (exact: the blocks are disjoint).
        out_features, in_features: the shape ``(m, n)`` of the weight before padding.
    """

    U: torch.Tensor
    V: torch.Tensor
    singular_values: torch.Tensor
    rel_error: float
    out_features: int
    in_features: int

    @property
    def nblocks_out(self) -> int:
        return self.U.shape[0]

    @property
    def nblocks_in(self) -> int:
        return self.V.shape[0]

    @property
    def rank(self) -> int:
        return self.V.shape[1] // self.nblocks_out


def padded_size(size: int, nblocks: int) -> int:
    """``size`` rounded up to a multiple of ``nblocks``: ``ceil(size / nblocks) * nblocks``."""
    return -(-size // nblocks) * nblocks


def check_block_args(
    out_features: int, in_features: int, nblocks_in: int, nblocks_out: int, rank: int
) -> None:
    """Validate a block factorization's shape arguments.

    Raises:
        ValueError: a dimension or block count below 1, more blocks than rows or columns, or
            ``rank`` outside ``[1, q]`` with ``q`` the smaller dimension of one (padded) block.
    """
    m, n, k, j = out_features, in_features, nblocks_in, nblocks_out
    if m < 1 or n < 1:
        raise ValueError(f"weight dimensions must be >= 1, got {m} x {n}")
    for name, value, dim, what in (("nblocks_in", k, n, "in"), ("nblocks_out", j, m, "out")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if value > dim:
            raise ValueError(f"{name}={value} exceeds {what}_features={dim}: blocks would be empty")
    block_rows, block_cols = padded_size(m, j) // j, padded_size(n, k) // k
    if (
        isinstance(rank, bool)
        or not isinstance(rank, int)
        or not 1 <= rank <= min(block_rows, block_cols)
    ):
        raise ValueError(
            f"block rank must be an int in [1, {min(block_rows, block_cols)}], got {rank!r}: a "
            f"{m}x{n} weight with nblocks_out={j}, nblocks_in={k} has blocks of "
            f"{block_rows}x{block_cols}, and a block's rank cannot exceed its smaller dimension"
        )


def block_low_rank_num_parameters(
    out_features: int, in_features: int, nblocks: int, rank: int, nblocks_out: int | None = None
) -> int:
    """Stored values of the factors (no bias): ``r (k m_pad + j n_pad)``.

    ``k = nblocks`` input blocks, ``j = nblocks_out`` (default ``nblocks``) output blocks,
    ``m_pad``/``n_pad`` the dimensions rounded up to multiples of ``j``/``k``. With
    ``k = j = b`` and divisible shapes this is METHODS.md's ``b r (m + n)``. Monarch has the same
    count (``monarch_num_parameters``).
    """
    j = nblocks if nblocks_out is None else nblocks_out
    m_pad, n_pad = padded_size(out_features, j), padded_size(in_features, nblocks)
    return rank * (nblocks * m_pad + j * n_pad)


def block_rank_for_param_ratio(
    out_features: int, in_features: int, nblocks: int, param_ratio: float
) -> int:
    """Largest block rank keeping at most ``param_ratio`` of ``m n``, for ``b = nblocks`` blocks.

    ``r = floor(p m n / (b (m_pad + n_pad)))`` (METHODS.md §2/§3, with the padded count so the kept
    fraction never exceeds ``p``), capped at the smaller dimension of one block. The same rank
    serves Monarch and block-wise low-rank (their counts agree). Example (b = 4): 768 x 768 gives
    48 at p = 0.5 and 24 at 0.25; 3072 x 768 gives 76 and 38.

    Raises:
        ValueError: ``param_ratio`` outside (0, 1], a dimension below 1 or ``nblocks`` out of range.
        ConfigError: even block rank 1 keeps more than ``param_ratio``; the message names the
            smallest feasible ``param_ratio`` for this shape and ``nblocks``.
    """
    if isinstance(param_ratio, bool) or not 0.0 < param_ratio <= 1.0:
        raise ValueError(f"param_ratio must be in (0, 1], got {param_ratio!r}")
    m, n, b = out_features, in_features, nblocks
    check_block_args(m, n, b, b, 1)
    per_rank = block_low_rank_num_parameters(m, n, b, 1)
    budget = param_ratio * m * n
    rank = math.floor(budget / per_rank + 1e-9)
    if rank * per_rank > budget * (1 + 1e-12):  # the epsilon above must never overshoot
        rank -= 1
    if rank < 1:
        smallest = math.ceil(per_rank / (m * n) * 1e4) / 1e4
        raise ConfigError(
            f"param_ratio={param_ratio} is infeasible for a {m}x{n} weight with nblocks={b}: even "
            f"block rank 1 keeps {per_rank} of {m * n} parameters. The smallest feasible "
            f"param_ratio is {smallest:g}; or use fewer blocks."
        )
    block_min = min(padded_size(m, b) // b, padded_size(n, b) // b)
    return min(rank, block_min)


def blockwise_truncated_svd(
    blocks: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Batched truncated SVD of a grid of blocks, in float64.

    Args:
        blocks: ``(j, k, l, i)``: block ``(j, k)`` of the grid is ``blocks[j, k]`` (``l x i``).
        rank: kept rank of every block, ``1 <= rank <= min(l, i)`` (not checked here).

    Returns:
        ``(left (j, l, k r), right (k, j r, i), singular_values (j, k, min(l, i)), rel_error)`` in
        float64, with ``S^{1/2}`` folded into both factors (``split_singular_values``), so that
        ``blocks[j, k] ~ left[j][:, k r:(k+1) r] @ right[k][j r:(j+1) r]``. ``rel_error`` is the
        relative Frobenius error of the whole grid from the discarded singular mass.
    """
    j, k, lb, i = blocks.shape
    U, S, Vh = torch.linalg.svd(blocks.double(), full_matrices=False)
    # split_singular_values, batched: S^{1/2} folded into both sides of every block.
    root = S[..., :rank].sqrt()
    U_r = U[..., :rank] * root[..., None, :]  # (j, k, l, r)
    Vh_r = root[..., :, None] * Vh[..., :rank, :]  # (j, k, r, i)
    left = U_r.permute(0, 2, 1, 3).reshape(j, lb, k * rank)
    right = Vh_r.permute(1, 0, 2, 3).reshape(k, j * rank, i)
    kept, discarded = S[..., :rank].flatten(), S[..., rank:].flatten()
    rel_error = relative_error_from_spectrum(torch.cat([kept, discarded]), kept.numel())
    return left, right, S, rel_error


def pad_weight(weight: torch.Tensor, nblocks_in: int, nblocks_out: int) -> torch.Tensor:
    """``weight`` (m, n) as float64, zero-padded to ``(m_pad, n_pad)`` (multiples of the blocks)."""
    m, n = weight.shape
    m_pad, n_pad = padded_size(m, nblocks_out), padded_size(n, nblocks_in)
    w = weight.detach().double()
    if (m_pad, n_pad) != (m, n):
        w = torch.nn.functional.pad(w, (0, n_pad - n, 0, m_pad - m))
    return w


def block_low_rank_project(
    weight: torch.Tensor, nblocks_in: int, nblocks_out: int, rank: int
) -> BlockLowRankFactors:
    """Project ``weight`` (m x n) onto block-wise rank-``rank`` matrices [G24, METHODS.md §3].

    The (zero-padded) weight is split into a ``nblocks_out x nblocks_in`` grid of contiguous blocks
    of ``(m_pad / nblocks_out) x (n_pad / nblocks_in)``; each gets its own truncated SVD (one
    batched ``torch.linalg.svd`` in float64, ``full_matrices=False``) with ``S^{1/2}`` folded into
    both factors. This is the Frobenius-optimal approximation in the class (Eckart-Young per
    block); the squared error equals the discarded singular mass. Factors are returned in
    ``weight.dtype`` on its device, in the layout ``BlockLowRankLinear`` uses (module docstring).

    Raises:
        ValueError: ``weight`` not 2-D, a block count out of range, or ``rank`` above the smaller
            block dimension (see ``check_block_args``).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    m, n = weight.shape
    check_block_args(m, n, nblocks_in, nblocks_out, rank)
    w = pad_weight(weight, nblocks_in, nblocks_out)
    j, k = nblocks_out, nblocks_in
    blocks = w.view(j, w.shape[0] // j, k, w.shape[1] // k).permute(0, 2, 1, 3)  # (j, k, l, i)
    U, V, S, rel_error = blockwise_truncated_svd(blocks, rank)
    return BlockLowRankFactors(
        U=U.to(weight.dtype),
        V=V.to(weight.dtype),
        singular_values=S,
        rel_error=rel_error,
        out_features=m,
        in_features=n,
    )
