"""ONNX export: every layer type exports as its own ops, runs in onnxruntime with dynamic batch
and sequence axes, and matches PyTorch (checked by the command before it succeeds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factorlab.bench.latency import load_for_bench
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


@pytest.mark.parametrize("int8", [False, True])
def test_bench_in_onnxruntime_times_the_model_and_its_dense_reference(
    int8, tmp_path, tiny_model_dir, capsys
):
    run = tmp_path / "run"
    argv = ["compress", "--model", str(tiny_model_dir), "--param-ratio", "0.25", "--no-progress"]
    assert main([*argv, "--output", str(run)]) == 0
    out = tmp_path / "bench.json"
    argv = ["bench", str(run), "--runtime", "onnxruntime", "--batch-sizes", "1,2"]
    argv += ["--seq-len", "16", "--threads", "1", "--runs", "5", "--json", str(out), "--profile"]
    assert main([*argv, *(["--int8"] if int8 else [])]) == 0
    result = json.loads(out.read_text())
    # where the time goes, by op type, for the model beside its dense reference
    header, *ops = result["profile"].splitlines()
    assert header.split() == ["op", "model", "ms", "dense", "ms"]
    assert ops[-1].split()[:2] == ["(whole", "run)"] and len(ops) > 3
    assert result["runtime"] == "onnxruntime" and result["int8"] is int8
    assert result["factorized"] and [b["batch_size"] for b in result["batches"]] == [1, 2]
    for b in result["batches"]:
        assert b["model"]["runs"] == b["dense"]["runs"] == 5 and b["latency_ratio"] > 0
        # bytes are the ONNX files': the factorized model's is smaller than the dense one's
        assert 0 < b["model"]["param_bytes"] < b["dense"]["param_bytes"]
        assert b["model"]["peak_memory_bytes"] is None  # not measured in ONNX Runtime
        # the achievable limit, profiled by ONNX Runtime on the exported dense reference
        limit = b["limit"]
        assert 0 < limit["linear_s"] < limit["dense_s"] and limit["other_s"] > 0
        assert limit["linear_mac_ratio"] < limit["ideal_ratio"] < 1
        assert b["ratio_to_ideal"] == pytest.approx(b["latency_ratio"] / limit["ideal_ratio"])
    assert "onnxruntime" in capsys.readouterr().out


def test_int8_quantizes_every_matmul_and_shrinks_the_file(tmp_path, tiny_model_dir, tokenizer):
    import onnx

    from factorlab.bench.onnx_runtime import export_for_runtime

    model = load_for_bench(str(tiny_model_dir))
    fp32 = export_for_runtime(model, tokenizer, tmp_path, "m")
    int8 = export_for_runtime(model, tokenizer, tmp_path, "m", int8=True)
    before = [n.op_type for n in onnx.load(str(fp32.path)).graph.node]
    after = [n.op_type for n in onnx.load(str(int8.path)).graph.node]
    # every weight MatMul (4 per block: Q, K and V fused, then output and feed-forward) is
    # quantized; attention (one float op per block) is not
    layers = model.config.num_hidden_layers
    assert before.count("MatMul") == after.count("MatMulInteger") == 4 * layers
    assert after.count("MatMul") == 0
    assert after.count("Attention") == before.count("Attention") == layers
    assert int8.file_bytes() < 0.5 * fp32.file_bytes()
    ids = torch.randint(1, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(fp32(ids)), expected, rtol=1e-4, atol=1e-4)
    # int8 is an approximation: close, not equal
    error = (torch.from_numpy(int8(ids)) - expected).norm() / expected.norm()
    assert 0 < error < 0.1


def test_int8_needs_onnxruntime(tiny_model_dir, capsys):
    assert main(["bench", str(tiny_model_dir), "--int8"]) == 2
    assert "--runtime onnxruntime" in capsys.readouterr().err


def test_evaluate_in_onnxruntime_matches_pytorch(tmp_path, tiny_model_dir, tiny_glue_dir, capsys):
    run = tmp_path / "run"
    argv = ["compress", "--model", str(tiny_model_dir), "--task", "rte", "--data-dir"]
    argv += [str(tiny_glue_dir), "--batch-size", "8", "--max-steps", "2", "--no-progress"]
    assert main([*argv, "--max-seq-length", "32", "--output", str(run)]) == 0
    capsys.readouterr()
    evaluate = ["evaluate", str(run), "--task", "rte", "--data-dir", str(tiny_glue_dir)]
    scores = {}
    for runtime in (["--runtime", "torch"], ["--runtime", "onnxruntime"]):
        assert main([*evaluate, *runtime]) == 0
        scores[runtime[1]] = json.loads(capsys.readouterr().out)["metrics"]
    assert scores["onnxruntime"] == scores["torch"]  # the same predictions, example by example


@pytest.mark.parametrize("int8", [False, True])
def test_the_onnx_runtime_profile_finds_every_factorized_module(int8, tmp_path, tokenizer):
    import factorlab as fl
    from factorlab.bench.latency import dense_reference
    from factorlab.bench.onnx_runtime import export_for_runtime, node_modules, scopes_of
    from tests.tiny import tiny_bert

    model = tiny_bert()
    fl.factorize_(model, fl.LowRankConfig(param_ratio=0.25))
    reference = export_for_runtime(dense_reference(model), tokenizer, tmp_path, "d", int8=int8)
    modules = node_modules(reference.source)
    profile = reference.profile(torch.randint(0, 100, (2, 8)), runs=2, warmup=1)
    assert len(profile.call_s) == len(profile.node_s) == 2
    nodes = profile.node_s[0]
    assert sum(nodes.values()) <= profile.call_s[0]  # kernels run inside the call
    by_op = profile.seconds_by_op()
    # ONNX Runtime fuses MatMulInteger with the quantization of its input
    int8_ops = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}
    assert bool(int8_ops & set(by_op)) is int8 and ("MatMul" in by_op) is not int8
    seen = {m for n in nodes for m in scopes_of(modules, n)}
    assert set(fl.factorized_modules(model)) <= seen
    assert all(s >= 0 for s in nodes.values()) and len(nodes) > 10


def test_the_cli_exports_at_the_library_default_opset():
    from factorlab.cli import build_parser
    from factorlab.export import OPSET

    assert build_parser().parse_args(["export", "run"]).opset == OPSET


@pytest.mark.parametrize("factorized", [False, True])
def test_q_k_v_sharing_an_input_export_as_one_matmul(factorized, tmp_path, tokenizer):
    import onnx

    import factorlab as fl
    from factorlab.bench.onnx_runtime import node_modules
    from factorlab.export import export_onnx
    from tests.tiny import tiny_bert

    model = tiny_bert()
    if factorized:  # their first low-rank factors share the input
        fl.factorize_(model, fl.LowRankConfig(param_ratio=0.25))
    path = export_onnx(model, tokenizer, tmp_path / "m.onnx")  # verified against PyTorch
    graph = onnx.load(str(path)).graph
    fused = [n for n in graph.node if n.name.endswith("_fused")]
    assert len(fused) == model.config.num_hidden_layers
    modules = node_modules(path)
    for i, node in enumerate(fused):
        attention = f"bert.encoder.layer.{i}.attention.self"
        assert modules[node.name] == tuple(f"{attention}.{m}" for m in ("query", "key", "value"))
    matmuls = sum(n.op_type == "MatMul" for n in graph.node)
    # per block 6 linears, 12 factors when factorized; three of them become one
    assert matmuls == model.config.num_hidden_layers * (10 if factorized else 4)


def test_a_dsformer_layer_runs_as_two_matmuls_in_onnx_runtime(tmp_path, tokenizer):
    """The exported coefficient matrix (a ScatterElements of the stored values) is folded into a
    constant by ONNX Runtime, and the session computes what PyTorch does."""
    import onnx
    import onnxruntime as ort

    import factorlab as fl
    from factorlab.export import export_onnx
    from tests.tiny import tiny_bert

    model = tiny_bert()
    fl.factorize_(model, fl.make_config("dsformer", param_ratio=0.5))
    path = export_onnx(model, tokenizer, tmp_path / "m.onnx")  # verified against PyTorch
    exported = [n.op_type for n in onnx.load(str(path)).graph.node]
    layers = len(fl.factorized_modules(model))
    assert exported.count("ScatterElements") == layers
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "ScatterElements" not in optimized
    # two per layer, the bases of Q, K and V (one shared input) exported as one
    assert optimized.count("MatMul") == 2 * layers - 2 * model.config.num_hidden_layers
    inputs = example_inputs(model, tokenizer, 3, 11, seed=7)
    with torch.no_grad():
        expected = model(**inputs).logits
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)), expected, rtol=1e-4, atol=1e-4)
