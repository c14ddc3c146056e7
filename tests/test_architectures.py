"""The support matrix: every method on every architecture family (tiny random models), and the
targets every family gets (all stacks, shared layers once, never embeddings or heads)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch

from factorlab.layers.base import FactorizedWeight
from factorlab.targets import group_by_block, select_targets
from tests.architectures import (
    ENCODER_DECODERS,
    FAMILIES,
    METHODS,
    build_family,
    check,
    factorize,
    readme_table,
    render,
)

family = functools.cache(build_family)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FAMILIES)
def test_factorize_forward_backward_save_load_densify(name, method):
    check(family(name), method)


@pytest.mark.parametrize("name", ENCODER_DECODERS)
def test_encoder_decoder_models_get_both_stacks_and_cross_attention(name):
    names = [t.name for t in select_targets(family(name).model)]
    assert any(re.search(r"(^|\.)encoder\.", n) for n in names)
    decoder = [n for n in names if re.search(r"(^|\.)decoder\.", n)]
    assert decoder
    cross = ("encoder_attn", "EncDecAttention", "crossattention", "cross_attention", "cross_attn")
    assert any(any(c in n for c in cross) for n in decoder), decoder


@pytest.mark.parametrize("name", FAMILIES)
def test_targets_never_include_embeddings_or_heads(name):
    model = family(name).model
    targets = {t.name for t in select_targets(model)}
    head = model.get_output_embeddings()
    heads = {n for n, m in model.named_modules() if m is head}
    assert not targets & heads
    outside_blocks = r"(^|\.)(embed\w*|lm_head|classifier|pooler|score)(\.|$)"
    assert not any(re.search(outside_blocks, n) for n in targets)


def test_albert_shared_layer_is_factorized_once_and_used_by_every_layer():
    model, report = factorize(family("albert"), "low-rank")
    assert len(report.modules) == 6  # q, k, v, attention output, ffn, ffn output
    shared = model.albert.encoder.albert_layer_groups[0].albert_layers[0]
    assert type(shared.attention.query).__name__ == "LowRankLinear"
    calls = []
    shared.attention.query.register_forward_hook(lambda *a: calls.append(1))
    family("albert").outputs(model)
    assert len(calls) == model.config.num_hidden_layers == 2  # the one layer runs twice


def test_staged_groups_cover_every_stack_in_order():
    model = family("t5").model
    names = [t.name for t in select_targets(model)]
    groups = group_by_block(model, names)
    prefixes = [re.match(r"(\w+\.block\.\d+)\.", g[0]).group(1) for g in groups]
    assert prefixes == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    assert sorted(n for g in groups for n in g) == sorted(names)


def test_factorized_weight_answers_dtype_device_shape_without_the_dense_matrix():
    model, _ = factorize(family("t5"), "low-rank")
    layer = model.encoder.block[0].layer[1].DenseReluDense.wo
    weight = layer.weight
    assert isinstance(weight, FactorizedWeight) and not isinstance(weight, torch.Tensor)
    assert (weight.dtype, weight.device) == (torch.float32, torch.device("cpu"))
    assert weight.shape == (layer.out_features, layer.in_features) == weight.size()
    with pytest.raises(AttributeError, match="to_dense"):
        weight.sum()


def test_readme_support_matrix_is_the_generated_one():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    assert readme_table(text) == render({})
