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


def _save_with_final_names(exported: Path, final: Path) -> None:
    """Re-save the exporter's file as ``final``: one self-contained file below protobuf's 2 GB
    limit, else the graph plus ``final.name + ".data"`` (the name it keeps after the rename)."""
    import onnx

    proto = onnx.load(str(exported), load_external_data=True)
    size = sum(t.ByteSize() for t in proto.graph.initializer)
    if size < 1_800_000_000:
        onnx.save_model(proto, str(final))
    else:
        onnx.save_model(
            proto, str(final), save_as_external_data=True, location=final.name + ".data"
        )


def export_onnx(
    model: nn.Module, tokenizer: Any, output: str | os.PathLike, opset: int = 18
) -> Path:
    """Write ``model`` (dense or factorized, float32) as ONNX to ``output``, verified.

    Args:
        model: a Hugging Face model (a sequence classifier exports ``logits``
            ``(batch, labels)``, a base model ``last_hidden_state`` ``(batch, seq, hidden)``).
        tokenizer: names the inputs (``input_ids``, ``attention_mask``, ``token_type_ids``).
        output: the ``.onnx`` file (with ``output.data`` beside it for models over 2 GB);
            written in a temporary folder beside it and renamed into place once verified.
        opset: ONNX opset version.

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
        _save_with_final_names(exported, final)
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
