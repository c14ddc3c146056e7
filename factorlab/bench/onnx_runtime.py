"""Models exported to ONNX and run in ONNX Runtime, for ``factorlab bench --runtime onnxruntime``
and for evaluating deployed models, optionally with dynamic int8 quantization.

``OrtModel`` wraps an ``onnxruntime.InferenceSession`` so the benchmark loop calls it as it calls a
PyTorch model (``model(input_ids=...)``). int8 is ONNX Runtime's dynamic quantization
(``onnxruntime.quantization.quantize_dynamic``, QInt8 weights, activations quantized per batch at
run time): every MatMul with a constant weight is quantized, so a low-rank layer's two MatMuls
are quantized like a dense layer's one; factorization and int8 compose.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from factorlab.errors import ConfigError, ExportError

RUNTIMES = ("torch", "onnxruntime")


class OrtModel:
    """An ONNX file run by ONNX Runtime on CPU, called like a Hugging Face model.

    Attributes:
        path: the ``.onnx`` file.
        config: the Hugging Face config of the model it was exported from (vocabulary size for
            random inputs).
        session: the ``onnxruntime.InferenceSession`` (``intra_op_num_threads=threads``, all
            graph optimizations, sequential execution).
    """

    def __init__(self, path: str | os.PathLike, config: Any, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            options.intra_op_num_threads = threads
        self.path = Path(path)
        self.config = config
        self.threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def feeds(self, input_ids: torch.Tensor, **inputs: torch.Tensor) -> dict[str, np.ndarray]:
        """The session's inputs for ``input_ids`` ``(batch, seq)`` and the other tokenizer
        outputs given (``attention_mask``, ``token_type_ids``); those the graph takes but that
        are not given are all ones (attention mask) or zeros (token types)."""
        ids = input_ids.cpu().numpy().astype(np.int64)
        given = {k: v.cpu().numpy().astype(np.int64) for k, v in inputs.items() if v is not None}
        defaults = {"attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        values = {"input_ids": ids, **defaults, **given}
        return {name: values[name] for name in self.input_names}

    def __call__(self, input_ids: torch.Tensor, **inputs: torch.Tensor) -> np.ndarray:
        """The graph's first output (logits, or the last hidden state) as a numpy array."""
        return self.session.run(None, self.feeds(input_ids, **inputs))[0]

    def file_bytes(self) -> int:
        """Bytes on disk of the model (the ``.onnx`` file and its external data, if any)."""
        data = self.path.with_name(self.path.name + ".data")
        return self.path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def predict_onnx(
    model: OrtModel, dataset: Any, tokenizer: Any, batch_size: int = 128
) -> np.ndarray:
    """Predictions of an exported sequence classifier on an ``EncodedSplit``, in order: class
    ids, or scores for regression tasks (the protocol of ``factorlab.training.predict``)."""
    from factorlab.training.data import make_loader

    outputs = []
    for batch in make_loader(dataset, tokenizer, batch_size, shuffle=False):
        batch.pop("labels")
        logits = model(**batch)
        outputs.append(logits[:, 0] if dataset.task.is_regression else logits.argmax(-1))
    return np.concatenate(outputs)


def quantize_int8(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Dynamic int8 quantization of an ONNX model (``quantize_dynamic``, QInt8 weights, per
    tensor) written to ``output``.

    Raises:
        ExportError: the quantizer failed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(source), str(output), weight_type=QuantType.QInt8)
    except Exception as exc:  # the quantizer's errors have no common base class
        raise ExportError(f"int8 quantization of {source} failed: {exc}") from exc
    return Path(output)


def export_for_runtime(
    model: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike,
    name: str,
    int8: bool = False,
    threads: int | None = None,
) -> OrtModel:
    """Export ``model`` to ``folder/name.onnx`` (``factorlab.export.export_onnx``: verified
    against PyTorch), quantize it to int8 when asked (``name.int8.onnx``), and open it.

    Raises:
        ExportError: export, verification or quantization failed.
    """
    from factorlab.export import export_onnx

    folder = Path(folder)
    path = export_onnx(model, tokenizer, folder / f"{name}.onnx")
    if int8:
        path = quantize_int8(path, folder / f"{name}.int8.onnx")
    return OrtModel(path, model.config, threads)


@contextlib.contextmanager
def deployed(
    models: Sequence[nn.Module | None],
    tokenizer: Any,
    int8: bool = False,
    threads: int | None = None,
) -> Iterator[list[OrtModel | None]]:
    """The ``models`` exported (``export_for_runtime``) to one temporary folder, opened in ONNX
    Runtime, in order (``None`` stays ``None``); the folder is removed afterwards. ``tokenizer``
    names the exported inputs; ``None``: ``input_ids``, ``attention_mask``, ``token_type_ids``.

    Raises:
        ExportError: export, verification or quantization failed.
    """
    from factorlab.export import INPUTS

    names = tokenizer if tokenizer is not None else _InputNames(INPUTS)
    with tempfile.TemporaryDirectory(prefix="factorlab-ort-") as folder:
        yield [
            None if m is None else export_for_runtime(m, names, folder, f"model{i}", int8, threads)
            for i, m in enumerate(models)
        ]


@dataclass
class _InputNames:
    """Stands in for a tokenizer where only its input names are needed."""

    model_input_names: tuple[str, ...]


def check_runtime(runtime: str, int8: bool) -> None:
    """Refuse an unknown runtime, or int8 outside ONNX Runtime.

    Raises:
        ConfigError: see above.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
    if int8 and runtime != "onnxruntime":
        raise ConfigError(
            "--int8 quantizes the exported ONNX graph (ONNX Runtime dynamic quantization): use it "
            "with --runtime onnxruntime"
        )
