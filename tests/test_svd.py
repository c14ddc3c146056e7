import pytest
import torch
from torch.testing import assert_close

from factorlab.projections import rank_for_param_ratio, truncated_svd


@pytest.mark.parametrize(
    ("m", "n", "p", "rank"),
    [
        (768, 768, 0.5, 192),
        (768, 768, 0.25, 96),
        (3072, 768, 0.5, 307),
        (3072, 768, 0.25, 153),
        (384, 384, 0.5, 96),
        (1536, 384, 0.5, 153),
        (10, 10, 0.01, 1),
    ],
)
def test_rank_formula(m, n, p, rank):
    assert rank_for_param_ratio(m, n, p) == rank
    if rank > 1:
        assert rank * (m + n) <= p * m * n < (rank + 1) * (m + n)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_rank_formula_rejects_bad_ratio(p):
    with pytest.raises(ValueError, match="param_ratio"):
        rank_for_param_ratio(8, 8, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(12, 12), (20, 7), (7, 20)])
def test_full_rank_reconstructs_exactly(shape, dtype):
    W = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    f = truncated_svd(W, min(shape))
    assert (
        f.A.dtype == dtype
        and f.A.shape == (shape[0], min(shape))
        and f.B.shape == (min(shape), shape[1])
    )
    assert_close(f.A @ f.B, W)
    assert f.rel_error < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_eckart_young_error(rank):
    W = torch.randn(16, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f = truncated_svd(W, rank)
    s = torch.linalg.svdvals(W)
    err2 = (W - f.A @ f.B).square().sum()
    assert_close(err2, s[rank:].square().sum())
    assert f.rel_error == pytest.approx((err2 / W.square().sum()).sqrt().item(), rel=1e-9)
    # no rank-r matrix does better: a random perturbation of the factors is worse
    worse = (f.A + 0.01 * torch.randn_like(f.A)) @ f.B
    assert (W - worse).square().sum() > err2


def test_factors_are_balanced():
    W = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f = truncated_svd(W, 4)
    assert_close(f.A.norm(dim=0), f.B.norm(dim=1))


@pytest.mark.parametrize("rank", [0, 11])
def test_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be in"):
        truncated_svd(torch.randn(10, 12), rank)


def test_zero_matrix_has_zero_error():
    assert truncated_svd(torch.zeros(5, 5), 2).rel_error == 0.0


@pytest.mark.parametrize("shape", [(96, 24), (24, 96), (40, 40)])
def test_top_singular_from_the_gram_matches_full_svd(shape):
    from factorlab.projections.svd import singular_values, top_singular

    g = torch.Generator().manual_seed(0)
    decay = torch.logspace(0, -4, min(shape), dtype=torch.float64)
    U0, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g, dtype=torch.float64))
    W = (U0 * decay) @ V0.T
    rank = min(shape) // 3
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    u, s, vh = top_singular(W, rank)
    assert_close((u * s[:rank]) @ vh, (U[:, :rank] * S[:rank]) @ Vh[:rank], rtol=0, atol=1e-13)
    assert_close(s, S, rtol=0, atol=1e-12)
    assert_close(u.T @ u, torch.eye(rank, dtype=torch.float64), rtol=0, atol=1e-10)
    assert_close(singular_values(W), torch.linalg.svdvals(W), rtol=0, atol=1e-12)


def test_top_singular_of_rank_deficient_and_zero_matrices():
    from factorlab.projections.svd import top_singular

    g = torch.Generator().manual_seed(1)
    W = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 20, generator=g, dtype=torch.float64
    )
    u, s, vh = top_singular(W, 8)  # 5 of the 8 singular values are zero
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert_close((u * s[:8]) @ vh, W, rtol=0, atol=1e-12)
    u, s, vh = top_singular(torch.zeros(6, 4, dtype=torch.float64), 2)
    assert (u == 0).all() and (s == 0).all()
