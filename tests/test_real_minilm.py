"""The embedded all-MiniLM-L6-v2: behaviour that only shows on real pretrained weights."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModel, AutoTokenizer

import factorlab as fl
from factorlab.models import default_model_path
from factorlab.projections import truncated_svd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return AutoModel.from_pretrained(default_model_path()).eval()


@pytest.fixture(scope="module")
def batch():
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    return tokenizer(
        ["a small, fast model", "factorized weights keep most of the meaning"],
        padding=True,
        return_tensors="pt",
    )


def test_minilm_low_rank_half_round_trips_exactly(minilm, batch, tmp_path):
    model = AutoModel.from_pretrained(default_model_path()).eval()
    report = fl.factorize_(model, fl.LowRankConfig(param_ratio=0.5))
    # 6 blocks x (4 x 384x384 + 1536x384 + 384x1536) weights plus biases
    assert len(report.modules) == 36
    assert report.targeted_before == 6 * (
        4 * (384 * 384 + 384) + (1536 * 384 + 1536) + (384 * 1536 + 384)
    )
    ranks = {m.name.split(".", 3)[-1]: m.rank for m in report.modules if ".0." in m.name}
    assert ranks == {
        "attention.self.query": 96,
        "attention.self.key": 96,
        "attention.self.value": 96,
        "attention.output.dense": 96,
        "intermediate.dense": 153,
        "output.dense": 153,
    }
    assert fl.count_parameters(model) == fl.count_parameters(minilm) - (
        report.targeted_before - report.targeted_after
    )
    fl.save(model, tmp_path / "ck")
    loaded = fl.load(tmp_path / "ck")
    with torch.no_grad():
        assert_close(
            loaded(**batch).last_hidden_state, model(**batch).last_hidden_state, rtol=0, atol=0
        )


def test_pretrained_spectra_decay_faster_than_noise(minilm):
    """Real weights are closer to low rank than a Gaussian matrix of the same shape and norm."""
    query = minilm.encoder.layer[0].attention.self.query.weight.detach()
    noise = torch.randn(query.shape, generator=torch.Generator().manual_seed(0)) * query.std()
    assert truncated_svd(query, 96).rel_error < truncated_svd(noise, 96).rel_error


def test_factorized_minilm_stays_close_to_dense(minilm, batch):
    model = AutoModel.from_pretrained(default_model_path()).eval()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=0.5))
    with torch.no_grad():
        dense = minilm(**batch).last_hidden_state[:, 0]
        approx = model(**batch).last_hidden_state[:, 0]
    cosine = torch.nn.functional.cosine_similarity(dense, approx, dim=-1)
    assert (cosine > 0.7).all(), cosine  # measured 0.8 to 0.9 at p = 0.5
