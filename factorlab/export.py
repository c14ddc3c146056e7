"""Export to ONNX for deployment with ONNX Runtime, verified before it is kept.

Every factorized layer exports as the ops its forward runs (low-rank: two MatMuls; Monarch and
block-low-rank: batched MatMuls with their permutations; decoded rows: the decoder MLP), never as
a dense weight. Batch and sequence axes are dynamic. The exported graph is run in onnxruntime on
an input of another batch size and length than the one traced, and its outputs must match
PyTorch's (``torch.testing.assert_close``) before the file is written to its place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from factorlab.errors import ConfigError, ExportError
from factorlab.io import check_output_location, fix_mode

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 23
"""Default ONNX opset: from 23 the exporter writes PyTorch's scaled-dot-product attention as one
ONNX ``Attention`` op, which ONNX Runtime runs as one kernel; at opset 18 the decomposed
attention's masking (``Where``, ``IsNaN``) ran as separate nodes over every score (README: low-rank
p=0.25 at 0.47x dense-ORT at batch 32, against 0.53x in the deployment table at opset 18)."""
RTOL = ATOL = 1e-4
"""Tolerance of the check against PyTorch (float32 outputs of order 1)."""


class _FirstOutput(nn.Module):
    """The model with one tensor out (logits, or the last hidden state of a base model)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.model(**inputs, return_dict=False)[0]


def example_inputs(
    model: nn.Module, tokenizer: Any, batch_size: int, seq_len: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids ``(batch_size, seq_len)`` in the model's vocabulary, an all-ones
    attention mask and zero token types, for the inputs the tokenizer produces."""
    names = [n for n in INPUTS if n in getattr(tokenizer, "model_input_names", INPUTS)]
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch_size, seq_len), generator=generator)
    inputs = {"input_ids": ids}
    if "attention_mask" in names:
        inputs["attention_mask"] = torch.ones_like(ids)
    if "token_type_ids" in names:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


MODULES_KEY = "factorlab.modules"
"""Metadata of a node that ``fuse_shared_input_matmuls`` made: the module paths it computes for."""


def name_scopes(node: Any) -> tuple[str, ...]:
    """The module paths an ONNX ``node`` runs in, outermost first, as the PyTorch exporter
    recorded them (``pkg.torch.onnx.name_scopes``); empty if it did not."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return tuple(ast.literal_eval(prop.value)[:-1])  # the last one names the op
    return ()


def fuse_shared_input_matmuls(graph: Any) -> int:
    """Merge, in an ONNX ``graph`` (edited in place), the MatMuls that multiply the same
    activation by constant 2-D weights of the same input size into one MatMul on the weights
    concatenated along their outputs, followed by a ``Split`` into the original outputs: Q, K
    and V of dense attention, or their first low-rank factors. One GEMM of width ``sum(n_i)``
    instead of several of width ``n_i`` (``python benchmarks/bench_fused_matmuls.py``, ONNX
    Runtime, MiniLM, 2 threads: low-rank p=0.25 -2.5% at batch 1 and -4.7% at batch 32; dense
    within noise, -0.2% and +1.8%). The fused MatMul records the modules it computes for under
    ``MODULES_KEY``. Returns the number of groups merged."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    groups: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            groups.setdefault(node.input[0], []).append(i)
    replacements: dict[int, list[Any]] = {}
    for x, members in groups.items():
        tensors = [initializers[graph.node[i].input[1]] for i in members]
        if len(members) < 2 or len({(t.dims[0], t.data_type) for t in tensors}) != 1:
            continue
        weights = [numpy_helper.to_array(t) for t in tensors]
        first = graph.node[members[0]]
        fused = numpy_helper.from_array(np.concatenate(weights, axis=1), f"{first.name}_fused_w")
        sizes = np.array([w.shape[1] for w in weights], dtype=np.int64)
        split = numpy_helper.from_array(sizes, f"{first.name}_fused_split")
        graph.initializer.extend([fused, split])
        matmul = helper.make_node(
            "MatMul", [x, fused.name], [f"{first.name}_fused_out"], name=f"{first.name}_fused"
        )
        modules = [s for i in members for s in name_scopes(graph.node[i])[-1:]]
        helper.set_metadata_props(matmul, {MODULES_KEY: repr(tuple(modules))})
        outputs = [graph.node[i].output[0] for i in members]
        splitter = helper.make_node(
            "Split", [matmul.output[0], split.name], outputs, axis=-1, name=f"{first.name}_split"
        )
        replacements[members[0]] = [matmul, splitter]
        replacements.update({i: [] for i in members[1:]})
    if not replacements:
        return 0
    nodes = [n for i, node in enumerate(graph.node) for n in replacements.get(i, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    used |= {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return sum(1 for i in replacements if replacements[i])


def _save_with_final_names(exported: Path, final: Path, fuse: bool) -> None:
    """Re-save the exporter's file as ``final`` (after ``fuse_shared_input_matmuls`` if
    ``fuse``): one self-contained file below protobuf's 2 GB limit, else the graph plus
    ``final.name + ".data"`` (the name it keeps after the rename)."""
    import onnx

    proto = onnx.load(str(exported), load_external_data=True)
    if fuse:
        fuse_shared_input_matmuls(proto.graph)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    if size < 1_800_000_000:
        onnx.save_model(proto, str(final))
    else:
        onnx.save_model(
            proto, str(final), save_as_external_data=True, location=final.name + ".data"
        )


def export_onnx(
    model: nn.Module,
    tokenizer: Any,
    output: str | os.PathLike,
    opset: int = OPSET,
    fuse_matmuls: bool = True,
) -> Path:
    """Write ``model`` (dense or factorized, float32) as ONNX to ``output``, verified.

    Args:
        model: a Hugging Face model (a sequence classifier exports ``logits``
            ``(batch, labels)``, a base model ``last_hidden_state`` ``(batch, seq, hidden)``).
        tokenizer: names the inputs (``input_ids``, ``attention_mask``, ``token_type_ids``).
        output: the ``.onnx`` file (with ``output.data`` beside it for models over 2 GB);
            written in a temporary folder beside it and renamed into place once verified.
        opset: ONNX opset version (default ``OPSET``).
        fuse_matmuls: merge the MatMuls that share an input (``fuse_shared_input_matmuls``).

    Returns:
        The path written.

    Raises:
        OutputExistsError: ``output`` cannot be written (see ``check_output_location``).
        ExportError: the exporter failed, or onnxruntime's outputs differ from PyTorch's.
    """
    import onnxruntime as ort

    output = check_output_location(output, "--output")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name such as model.onnx")
    wrapped = _FirstOutput(model.float().eval())
    traced = example_inputs(model, tokenizer, batch_size=2, seq_len=16)
    names = list(traced)
    with torch.no_grad():
        output_name = "logits" if hasattr(model(**traced), "logits") else "last_hidden_state"
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        exported = work / "exported.onnx"  # the exporter may put the weights in a side file
        try:
            # the exporter prints its progress to stdout, which commands keep for their results
            with contextlib.redirect_stdout(sys.stderr):
                torch.onnx.export(
                    wrapped,
                    (),
                    str(exported),
                    kwargs=traced,
                    input_names=names,
                    output_names=[output_name],
                    dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names},
                    opset_version=opset,
                    dynamo=True,
                )
        except Exception as exc:  # the exporter's errors have no common base class
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {exc}") from exc
        final = work / output.name
        _save_with_final_names(exported, final, fuse_matmuls)
        check = example_inputs(model, tokenizer, batch_size=3, seq_len=11, seed=1)
        session = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in check.items()})[0]
        with torch.no_grad():
            expected = wrapped(**check)
        try:
            torch.testing.assert_close(
                torch.from_numpy(np.asarray(got)), expected, rtol=RTOL, atol=ATOL
            )
        except AssertionError as exc:
            raise ExportError(
                f"the exported model's outputs differ from PyTorch's on a (3, 11) input: {exc}"
            ) from exc
        data = final.with_name(final.name + ".data")
        if data.exists():
            fix_mode(data)
            os.replace(data, output.with_name(data.name))
        fix_mode(final)
        os.replace(final, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output
