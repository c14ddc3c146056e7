import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

import factorlab as fl
from factorlab.checkpoint import densify
from factorlab.projections import truncated_svd
from factorlab.targets import default_target_names, select_targets
from tests.tiny import (
    logits,
    tiny_bert,
    tiny_distilbert,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
    tokens,
)

# (factory, names expected per block, block prefix regex, modules never targeted)
CASES = {
    "bert": (tiny_bert, 6, r"bert\.encoder\.layer\.\d+\.", ["bert.pooler.dense", "classifier"]),
    "roberta": (
        tiny_roberta,
        6,
        r"roberta\.encoder\.layer\.\d+\.",
        ["classifier.dense", "classifier.out_proj"],
    ),
    "distilbert": (
        tiny_distilbert,
        6,
        r"distilbert\.transformer\.layer\.\d+\.",
        ["pre_classifier", "classifier"],
    ),
    "gpt2": (tiny_gpt2, 4, r"transformer\.h\.\d+\.", ["lm_head"]),
    "llama": (tiny_llama, 7, r"model\.layers\.\d+\.", ["lm_head"]),
}


@pytest.mark.parametrize("arch", CASES)
def test_default_targets_are_the_block_matrices(arch):
    factory, per_block, prefix, never = CASES[arch]
    model = factory()
    names = default_target_names(model)
    assert len(names) == 2 * per_block
    assert all(re.match(prefix, n) for n in names)
    assert not set(never) & set(names)
    assert not any("embed" in n or "wte" in n for n in names)


@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_factorize_replaces_targets_and_meets_budget(arch, ratio):
    model = CASES[arch][0]()
    ids = tokens()
    report = fl.factorize_(model, fl.LowRankConfig(param_ratio=ratio))
    layers = fl.factorized_modules(model)
    assert set(layers) == {m.name for m in report.modules if m.rank is not None}
    assert len(layers) > 0
    weights_before = sum(m.out_features * m.in_features for m in report.modules)
    weights_after = sum(
        m.rank * (m.out_features + m.in_features) if m.rank else m.out_features * m.in_features
        for m in report.modules
    )
    assert weights_after <= ratio * weights_before + 1e-9
    assert weights_after >= 0.8 * ratio * weights_before
    assert report.targeted_after == sum(layer.num_parameters() for layer in layers.values()) + sum(
        m.params_after for m in report.modules if m.rank is None
    )
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    # the factorized model computes exactly what its dense equivalent computes
    assert_close(logits(densify(model), ids), out, rtol=1e-4, atol=1e-5)


def test_conv1d_weights_are_transposed_to_out_in():
    model = tiny_gpt2()
    conv = model.transformer.h[0].mlp.c_fc
    assert isinstance(conv, Conv1D)
    weight = conv.weight.detach().t().clone()  # (out=128, in=32)
    fl.factorize_(
        model, fl.LowRankConfig(target_modules=["h.0.mlp.c_fc"], rank_pattern={"c_fc": 8})
    )
    layer = model.transformer.h[0].mlp.c_fc
    assert (layer.out_features, layer.in_features) == (128, 32) and layer.source == "conv1d"
    assert_close(layer.to_dense(), (lambda f: f.A @ f.B)(truncated_svd(weight, 8)))


def test_target_list_regex_exclude_and_rank_pattern():
    model = tiny_bert()
    config = fl.LowRankConfig(
        param_ratio=0.5,
        target_modules=r".*layer\.\d+\.(intermediate|output)\.dense",
        exclude_modules=["layer.1.output.dense"],
        rank_pattern={r"intermediate": 4, r"layer\.0\.output": 0.25},
    )
    report = fl.factorize_(model, config)
    by_name = {m.name: m for m in report.modules}
    assert set(by_name) == {
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.intermediate.dense",
    }
    assert by_name["bert.encoder.layer.0.intermediate.dense"].rank == 4
    assert by_name["bert.encoder.layer.0.output.dense"].rank == 32 * 64 // (4 * 96)  # p=0.25 -> 5
    assert isinstance(model.bert.encoder.layer[1].output.dense, nn.Linear)


def test_layer_left_dense_when_factors_would_not_be_smaller():
    model = tiny_bert()
    report = fl.factorize_(model, fl.LowRankConfig(rank_pattern={"query": 32}))
    queries = [m for m in report.modules if m.name.endswith("query")]
    assert queries and all(m.kind == "dense" and m.rank is None for m in queries)
    assert all(m.params_after == m.params_before for m in queries)


def test_unmatched_pattern_lists_linear_modules_and_leaves_model_untouched():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        fl.TargetError, match=r"match no module.*encoder\.layer\.N\.attention\.self\.query \(x2\)"
    ):
        fl.factorize_(model, fl.LowRankConfig(target_modules=["query", "nonexistent"]))
    assert not fl.factorized_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(fl.TargetError, match="match no module"):
        select_targets(model, r"nothing\.here")


def test_unsupported_module_type_is_rejected():
    with pytest.raises(fl.TargetError, match="only nn.Linear"):
        fl.factorize_(tiny_bert(), fl.LowRankConfig(target_modules=["attention.output.LayerNorm"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"param_ratio": 0.0}, r"param_ratio must be in \(0, 1\]"),
        ({"param_ratio": 1.5}, r"param_ratio must be in \(0, 1\]"),
        ({"param_ratio": "half"}, "param_ratio must be a number"),
        ({"target_modules": "("}, "not a valid regular expression"),
        ({"rank_pattern": {"q": 0}}, "a rank must be >= 1"),
        ({"rank_pattern": {"q": 2.0}}, r"a ratio must be in \(0, 1\]"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(fl.ConfigError, match=message):
        fl.LowRankConfig(**kwargs)


def test_make_config_rejects_unknown_method_and_option():
    with pytest.raises(fl.ConfigError, match="unknown method 'svd'; choose one of: .*low-rank"):
        fl.make_config("svd")
    with pytest.raises(fl.ConfigError, match="does not take option"):
        fl.make_config("low-rank", nblocks=4)


def test_report_table_and_dict():
    report = fl.factorize_(tiny_bert(), fl.LowRankConfig(param_ratio=0.5))
    table = report.format_table()
    assert "total (12 modules)" in table and "bert.encoder.layer.1.output.dense" in table
    d = report.to_dict()
    assert d["method"] == "low-rank" and d["config"]["param_ratio"] == 0.5
    assert d["targeted_before"] == report.targeted_before and len(d["modules"]) == 12
