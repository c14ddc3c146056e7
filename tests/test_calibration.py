"""Calibration statistics: Fisher and Gram against direct computations, data sources, checks."""

import pytest
import torch
from torch.testing import assert_close

from factorlab.calibration import (
    CalibrationConfig,
    calibration_loader,
    check_calibration_inputs,
    collect_statistics,
    resolve_calibration,
)
from factorlab.errors import ConfigError, DataError, TargetError
from tests.tiny import VOCAB, tiny_bert, tiny_gpt2

NAMES = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]


def padded_batches() -> list[dict[str, torch.Tensor]]:
    """Two labelled batches with padding (mask zeros) at the end of some rows."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for lengths in ([7, 4, 5], [3, 7]):
        ids = torch.randint(2, VOCAB, (len(lengths), 7), generator=g)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        ids = ids * mask  # pad id 0
        labels = torch.randint(0, 2, (len(lengths),), generator=g)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def test_fisher_and_gram_match_direct_computation():
    model = tiny_bert()
    model.train()  # collect_statistics must switch to eval and back
    batches = padded_batches()
    stats = collect_statistics(model, batches, NAMES, progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())

    reference = tiny_bert()  # same seed, same weights
    modules = dict(reference.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in NAMES}
    hooks = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: inputs[n].append(a[0].detach()))
        for n in NAMES
    ]
    fisher = {n: torch.zeros_like(modules[n].weight) for n in NAMES}
    masks = []
    for batch in batches:
        loss = reference(**batch).loss
        grads = torch.autograd.grad(loss, [modules[n].weight for n in NAMES])
        for n, g in zip(NAMES, grads, strict=True):
            fisher[n] += g.square()
        masks.append(batch["attention_mask"].bool())
    for h in hooks:
        h.remove()
    for n in NAMES:
        X = torch.cat([x[m] for x, m in zip(inputs[n], masks, strict=True)]).double()
        assert stats[n].num_tokens == X.shape[0] == sum(int(m.sum()) for m in masks)
        assert stats[n].num_batches == 2
        assert stats[n].gram.dtype == torch.float64
        assert_close(stats[n].gram, X.T @ X)
        assert_close(stats[n].fisher, fisher[n] / 2)
        assert stats[n].fisher.shape == modules[n].weight.shape


def test_gram_only_needs_no_labels_and_fisher_needs_them():
    model = tiny_bert()
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in padded_batches()]
    stats = collect_statistics(model, batches, NAMES[:1], fisher=False, progress=False)
    assert stats[NAMES[0]].fisher is None and stats[NAMES[0]].gram.shape == (32, 32)
    with pytest.raises(ConfigError, match="labelled"):
        collect_statistics(model, batches, NAMES[:1], progress=False)
    with pytest.raises(ConfigError, match="fisher, gram or both"):
        collect_statistics(model, batches, NAMES[:1], fisher=False, gram=False)
    with pytest.raises(TargetError):
        collect_statistics(model, batches, ["bert.encoder"], fisher=False)
    with pytest.raises(ConfigError, match="no batch"):
        collect_statistics(model, [], NAMES[:1], fisher=False, progress=False)


def test_default_targets_and_conv1d_fisher_is_out_by_in():
    model = tiny_gpt2()
    ids = torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    stats = collect_statistics(model, [batch], progress=False)
    assert len(stats) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 blocks
    fc = stats["transformer.h.0.mlp.c_fc"]
    assert fc.fisher.shape == (128, 32) and fc.gram.shape == (32, 32)  # (out, in), (in, in)
    assert fc.num_tokens == 12
    assert torch.isfinite(fc.fisher).all() and fc.fisher.sum() > 0


def test_loaders_from_task_and_text_file(tiny_model_dir, tiny_glue_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loader = calibration_loader(
        tokenizer, task="rte", data_dir=tiny_glue_dir, samples=10, batch_size=4
    )
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    text = tmp_path / "calib.txt"
    text.write_text("a film\n\nthe plot was fun\nboring\n")
    batches = list(calibration_loader(tokenizer, file=text, samples=None, batch_size=8))
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 3
    assert "labels" not in batches[0]
    first = next(iter(calibration_loader(tokenizer, file=text, samples=2)))
    assert len(first["input_ids"]) == 2
    with pytest.raises(ConfigError):
        calibration_loader(tokenizer, task="rte", file=text)


def test_checks_before_any_work(tiny_glue_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("some text\n")
    check_calibration_inputs("rte", None, tiny_glue_dir, ("fisher", "gram"))
    check_calibration_inputs(None, text, None, ("gram",))
    with pytest.raises(ConfigError, match="no labels"):
        check_calibration_inputs(None, text, None, ("fisher",))
    with pytest.raises(DataError):
        check_calibration_inputs(None, tmp_path / "missing.txt", None, ("gram",))
    with pytest.raises(DataError):
        check_calibration_inputs("mrpc", None, tiny_glue_dir, ("gram",))  # no MRPC folder
    with pytest.raises(ConfigError):
        check_calibration_inputs("no-such-task", None, tiny_glue_dir, ("gram",))
    with pytest.raises(ConfigError, match="not both"):
        check_calibration_inputs("rte", text, tiny_glue_dir, ("gram",))
    with pytest.raises(ConfigError):
        CalibrationConfig(task="rte", samples=0)


def test_resolve_calibration(tiny_glue_dir, tiny_model_dir, tmp_path):
    model = str(tiny_model_dir)
    assert resolve_calibration(None, "low-rank", "rte", tiny_glue_dir, model) is None
    with pytest.raises(ConfigError, match="takes no calibration"):
        resolve_calibration(CalibrationConfig(task="rte"), "low-rank", None, tiny_glue_dir, model)
    # the run's task is the default calibration data
    resolved = resolve_calibration(None, "fwsvd", "rte", tiny_glue_dir, model)
    assert resolved.task == "rte" and resolved.samples == 512
    with pytest.raises(ConfigError, match="needs calibration data"):
        resolve_calibration(None, "act-svd", None, None, model)
    # Fisher needs a head: a plain HF folder without --task is refused
    with pytest.raises(ConfigError, match="task head"):
        resolve_calibration(CalibrationConfig(task="rte"), "fwsvd", None, tiny_glue_dir, model)


def test_encoder_decoder_grams_follow_the_mask_of_the_tokens_each_module_reads():
    from tests.architectures import build_family

    family = build_family("bart")
    model, batch = family.model, dict(family.batch)
    batch["decoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    stats = collect_statistics(model, [batch], fisher=False, progress=False)
    encoder_tokens = int(batch["attention_mask"].sum())  # 8 + 6
    decoder_tokens = int(batch["decoder_attention_mask"].sum())  # 5 + 3
    layer = "model.decoder.layers.0."
    assert stats["model.encoder.layers.0.self_attn.q_proj"].num_tokens == encoder_tokens
    assert stats[layer + "self_attn.q_proj"].num_tokens == decoder_tokens
    assert stats[layer + "encoder_attn.q_proj"].num_tokens == decoder_tokens
    assert stats[layer + "encoder_attn.k_proj"].num_tokens == encoder_tokens
    assert stats[layer + "fc1"].num_tokens == decoder_tokens
