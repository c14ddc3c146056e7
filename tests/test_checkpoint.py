import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

import factorlab as fl
from factorlab import checkpoint
from factorlab.checkpoint import densify, load, read_spec, save
from tests.tiny import logits, tiny_bert, tiny_gpt2, tokens


def factorized_bert(ratio=0.5):
    model = tiny_bert()
    report = fl.factorize_(model, fl.LowRankConfig(param_ratio=ratio))
    return model, report


def test_round_trip_is_exact(tmp_path):
    model, report = factorized_bert()
    save(model, tmp_path / "ck", method=report.config)
    loaded = load(tmp_path / "ck")
    ids = tokens()
    assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    assert fl.count_parameters(loaded) == fl.count_parameters(model)
    assert {n: m.spec() for n, m in fl.factorized_modules(loaded).items()} == {
        n: m.spec() for n, m in fl.factorized_modules(model).items()
    }
    spec = read_spec(tmp_path / "ck")
    assert (
        spec["schema_version"] == checkpoint.SCHEMA_VERSION
        and spec["method"]["method"] == "low-rank"
    )
    # a factorized checkpoint is never mistaken for a plain Hugging Face one
    assert (tmp_path / "ck" / "factorized.safetensors").is_file()
    assert not (tmp_path / "ck" / "model.safetensors").exists()
    assert not loaded.training


def test_load_never_runs_a_projection(tmp_path, monkeypatch):
    model, _ = factorized_bert()
    save(model, tmp_path / "ck")
    import factorlab.projections.svd as svd

    monkeypatch.setattr(svd.torch.linalg, "svd", lambda *a, **k: pytest.fail("SVD ran on load"))
    load(tmp_path / "ck")


def test_dense_checkpoint_is_plain_hugging_face(tmp_path):
    model = tiny_bert()
    save(model, tmp_path / "dense")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense").eval()
    ids = tokens()
    assert_close(logits(hf, ids), logits(model, ids))
    assert_close(logits(load(tmp_path / "dense"), ids), logits(model, ids))


def test_gpt2_round_trip_and_densify_restores_conv1d(tmp_path):
    model = tiny_gpt2()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=0.5))
    ids = tokens()
    expected = logits(model, ids)
    save(model, tmp_path / "ck")
    assert_close(logits(load(tmp_path / "ck"), ids), expected)
    densify(model)
    assert not fl.factorized_modules(model)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)
    model.save_pretrained(tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert_close(logits(exported, ids), expected, rtol=1e-4, atol=1e-5)


def test_densify_bert_gives_linear_layers():
    model, _ = factorized_bert()
    ids = tokens()
    expected = logits(model, ids)
    densify(model)
    assert type(model.bert.encoder.layer[0].attention.self.query) is nn.Linear
    assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-5)


def _edit_spec(path, edit):
    spec_path = path / checkpoint.SPEC_FILE
    spec = json.loads(spec_path.read_text())
    edit(spec)
    spec_path.write_text(json.dumps(spec))


def test_spec_that_does_not_match_tensors_is_rejected(tmp_path):
    model, _ = factorized_bert()
    save(model, tmp_path / "ck")
    name = next(iter(fl.factorized_modules(model)))
    _edit_spec(tmp_path / "ck", lambda s: s["modules"][name].update(rank=3))
    with pytest.raises(fl.CheckpointError, match="does not match its spec"):
        load(tmp_path / "ck")


def test_spec_missing_a_module_is_rejected(tmp_path):
    model, _ = factorized_bert()
    save(model, tmp_path / "ck")
    name = next(iter(fl.factorized_modules(model)))
    _edit_spec(tmp_path / "ck", lambda s: s["modules"].pop(name))
    with pytest.raises(fl.CheckpointError, match="does not match its spec"):
        load(tmp_path / "ck")


def test_spec_naming_an_absent_module_is_rejected(tmp_path):
    model, _ = factorized_bert()
    save(model, tmp_path / "ck")
    _edit_spec(
        tmp_path / "ck",
        lambda s: s["modules"].update({"bert.nothing": next(iter(s["modules"].values()))}),
    )
    with pytest.raises(fl.CheckpointError, match="has no module"):
        load(tmp_path / "ck")


def test_schema_version_and_missing_files(tmp_path):
    model, _ = factorized_bert()
    save(model, tmp_path / "ck")
    _edit_spec(tmp_path / "ck", lambda s: s.update(schema_version=99))
    with pytest.raises(fl.CheckpointError, match="schema_version 99"):
        load(tmp_path / "ck")
    with pytest.raises(fl.DataError, match="not a factorlab checkpoint"):
        load(tmp_path / "nowhere")
    save(model, tmp_path / "ck2")
    (tmp_path / "ck2" / "factorized.safetensors").unlink()
    with pytest.raises(fl.DataError, match="missing"):
        load(tmp_path / "ck2")


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, _ = factorized_bert()
    save(model, tmp_path / "ck")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    spec_before = (tmp_path / "ck" / checkpoint.SPEC_FILE).read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        save(tiny_bert(), tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    assert (tmp_path / "ck" / checkpoint.SPEC_FILE).read_text() == spec_before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left behind
    assert isinstance(
        load(tmp_path / "ck").bert.encoder.layer[0].attention.self.query, fl.LowRankLinear
    )


def test_load_to_device_dtype_default_cpu(tmp_path):
    model, _ = factorized_bert()
    save(model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_loads_in_its_dtype_exactly(tmp_path, dtype):
    model, _ = factorized_bert()
    model.to(dtype)
    save(model, tmp_path / "ck")
    assert read_spec(tmp_path / "ck")["dtype"] == str(dtype).removeprefix("torch.")
    loaded = load(tmp_path / "ck")
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    ids = tokens()
    assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_load_builds_on_the_meta_device_without_random_init(tmp_path, monkeypatch):
    model, _ = factorized_bert()
    save(model, tmp_path / "ck")
    initialized = []
    original = torch.nn.init.normal_

    def recording_normal_(tensor, *args, **kwargs):
        if not tensor.is_meta:
            initialized.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recording_normal_)
    tiny_bert()
    assert initialized, "the probe must see a normal model's random init"
    initialized.clear()
    loaded = load(tmp_path / "ck")
    assert initialized == []
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_tied_lm_head_stays_tied_after_load(tmp_path):
    model = tiny_gpt2()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=0.5))
    save(model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert_close(logits(loaded, tokens()), logits(model, tokens()), rtol=0, atol=0)
