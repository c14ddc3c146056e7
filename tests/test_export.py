"""ONNX export: every layer type exports as its own ops, runs in onnxruntime with dynamic batch
and sequence axes, and matches PyTorch (checked by the command before it succeeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factorlab.checkpoint import load
from factorlab.cli import main
from factorlab.export import example_inputs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

METHODS = {
    "dense": None,
    "low-rank": ["--method", "low-rank"],
    "monarch": ["--method", "monarch", "--nblocks", "2"],
    "block-low-rank": ["--method", "block-low-rank", "--nblocks", "2"],
    "autoencoder": ["--method", "autoencoder", "--option", "epochs=1"],
}


@pytest.mark.parametrize("method", METHODS)
def test_export_runs_in_onnxruntime_like_pytorch(method, tmp_path, tiny_model_dir, tokenizer):
    import onnx
    import onnxruntime as ort

    source = tiny_model_dir
    if METHODS[method] is not None:
        source = tmp_path / "run"
        argv = ["compress", "--model", str(tiny_model_dir), *METHODS[method], "--no-progress"]
        assert main([*argv, "--output", str(source)]) == 0
    out = tmp_path / "model.onnx"
    assert main(["export", str(source), "--output", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")] == []
    assert not list(tmp_path.glob("*.data"))  # one self-contained file below 2 GB
    graph = onnx.load(str(out)).graph
    ops = {node.op_type for node in graph.node}
    assert "MatMul" in ops or "Gemm" in ops
    model = load(source) if METHODS[method] is not None else None
    if model is None:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(source)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 5), (4, 23)):  # dynamic axes
        inputs = example_inputs(model, tokenizer, batch, length, seed=7)
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state
        torch.testing.assert_close(
            torch.from_numpy(np.asarray(got)), expected, rtol=1e-4, atol=1e-4
        )


def test_export_bad_output(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["export", str(tiny_model_dir), "--output", str(tmp_path / "file" / "m.onnx")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
