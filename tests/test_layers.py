import pytest
import torch
from torch.testing import assert_close

from factorlab.errors import CheckpointError
from factorlab.layers import FactorizedLinear, LowRankLinear


def random_low_rank(m=12, n=7, r=3, bias=True) -> LowRankLinear:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(m, generator=g) if bias else None
    return LowRankLinear.from_factors(
        torch.randn(m, r, generator=g), torch.randn(r, n, generator=g), b
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 3, 4)])
def test_forward_equals_dense(bias, lead):
    layer = random_low_rank(bias=bias)
    x = torch.randn(*lead, 7)
    expected = x @ layer.to_dense().T + (layer.bias if bias else 0)
    assert_close(layer(x), expected)


def test_parameter_count_formula():
    layer = random_low_rank(12, 7, 3)
    assert layer.num_parameters() == 3 * (12 + 7) + 12
    assert layer.dense_num_parameters() == 12 * 7 + 12
    assert random_low_rank(12, 7, 3, bias=False).num_parameters() == 3 * 19


def test_rebuild_from_spec_then_load_strict():
    layer = random_low_rank()
    empty = FactorizedLinear.from_spec(layer.spec())
    assert isinstance(empty, LowRankLinear) and empty.rank == 3
    assert not torch.equal(empty.A, layer.A)
    empty.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(4, 7)
    assert_close(empty(x), layer(x))


def test_unknown_kind_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="unknown factorized layer kind"):
        FactorizedLinear.from_spec({"kind": "nope", "in_features": 2, "out_features": 2})
    with pytest.raises(CheckpointError, match="does not fit"):
        FactorizedLinear.from_spec(
            {"kind": "low_rank", "in_features": 2, "out_features": 2, "bias": True}
        )


def test_rejects_mismatched_factors():
    with pytest.raises(ValueError, match="A \\(m x r\\) and B \\(r x n\\)"):
        LowRankLinear.from_factors(torch.randn(4, 2), torch.randn(3, 5))
