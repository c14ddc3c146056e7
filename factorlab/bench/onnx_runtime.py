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
import statistics
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


@dataclass
class OrtProfile:
    """What ONNX Runtime's profiler saw: per call, ``call_s`` the seconds of the whole run and
    ``node_s`` the kernel seconds of each node that ran, by node name (the graph after ONNX
    Runtime's fusions: a fused node has a name of its own); ``ops`` each node's op type."""

    call_s: list[float]
    node_s: list[dict[str, float]]
    ops: dict[str, str]

    def seconds_by_op(self) -> dict[str, float]:
        """Median seconds per call spent in each op type, largest first."""
        per_call = []
        for nodes in self.node_s:
            by_op = dict.fromkeys(self.ops.values(), 0.0)
            for name, seconds in nodes.items():
                by_op[self.ops[name]] += seconds
            per_call.append(by_op)
        medians = {op: statistics.median(c[op] for c in per_call) for op in set(self.ops.values())}
        return dict(sorted(medians.items(), key=lambda kv: -kv[1]))


def profile_table(models: dict[str, OrtModel], batch_size: int, seq_len: int, runs: int = 5) -> str:
    """Where the time goes in ONNX Runtime: median ms per call by op type, one column per model
    (e.g. the factorized model and its dense reference), on random ``(batch_size, seq_len)``
    token ids."""
    from factorlab.bench.latency import aligned
    from factorlab.bench.macs import random_input_ids

    columns = {}
    for name, model in models.items():
        ids = random_input_ids(model.config, batch_size, seq_len)
        profile = model.profile(ids, runs)
        columns[name] = profile.seconds_by_op() | {"(whole run)": statistics.median(profile.call_s)}
    ops = list(dict.fromkeys(op for col in columns.values() for op in col))
    rows = [["op", *(f"{name} ms" for name in columns)]]
    rows += [[op, *(f"{1e3 * col.get(op, 0.0):.1f}" for col in columns.values())] for op in ops]
    return "\n".join(aligned(rows))


class OrtModel:
    """An ONNX file run by ONNX Runtime on CPU, called like a Hugging Face model.

    Attributes:
        path: the ``.onnx`` file.
        source: the file as exported from PyTorch (``path`` itself, or the float32 file that
            ``path`` quantizes); its nodes name the modules they came from.
        config: the Hugging Face config of the model it was exported from (vocabulary size for
            random inputs).
        session: the ``onnxruntime.InferenceSession`` (``intra_op_num_threads=threads``, all
            graph optimizations, sequential execution, threads that sleep when idle).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: Any,
        threads: int | None = None,
        source: str | os.PathLike | None = None,
    ):
        self.path = Path(path)
        self.source = Path(source) if source is not None else self.path
        self.config = config
        self.threads = threads
        self.session = self._session()
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _session(self, profile_prefix: str | None = None) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        # the bench interleaves two sessions on the same cores: an idle pool that spins takes
        # them from the timed one (most visible at batch 1, where runs are short)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if profile_prefix is not None:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        return ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

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

    def profile(self, input_ids: torch.Tensor, runs: int, warmup: int = 2) -> OrtProfile:
        """ONNX Runtime's profile of ``runs`` calls on ``input_ids`` ``(batch, seq)`` (after
        ``warmup``), in a session of its own (see ``OrtProfile``)."""
        import json

        feeds = self.feeds(input_ids)
        with tempfile.TemporaryDirectory(prefix="factorlab-ort-profile-") as folder:
            session = self._session(profile_prefix=str(Path(folder) / "profile"))
            for _ in range(warmup + runs):
                session.run(None, feeds)
            with open(session.end_profiling()) as f:
                events = json.load(f)
        calls = sorted(
            (e["ts"], e["ts"] + e["dur"])
            for e in events
            if e.get("cat") == "Session" and e.get("name") == "model_run"
        )[warmup:]
        nodes: list[dict[str, float]] = [{} for _ in calls]
        ops: dict[str, str] = {}
        suffix = "_kernel_time"
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith(suffix):
                continue
            name = e["name"][: -len(suffix)]
            ops[name] = e["args"]["op_name"]
            for i, (start, end) in enumerate(calls):
                if start <= e["ts"] <= end:
                    nodes[i][name] = nodes[i].get(name, 0.0) + e["dur"] * 1e-6
                    break
        return OrtProfile([(end - start) * 1e-6 for start, end in calls], nodes, ops)

    def file_bytes(self) -> int:
        """Bytes on disk of the model (the ``.onnx`` file and its external data, if any)."""
        data = self.path.with_name(self.path.name + ".data")
        return self.path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def node_modules(path: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """For each node of an ONNX file exported by ``factorlab.export``, the module paths it runs
    in, outermost first, as the exporter recorded them (``pkg.torch.onnx.name_scopes``; paths
    relative to the exported model, e.g. ``bert.encoder.layer.0.attention.self.query``); for a
    MatMul that ``fuse_shared_input_matmuls`` merged, the modules it computes for."""
    import ast

    import onnx

    from factorlab.export import MODULES_KEY, name_scopes

    graph = onnx.load(str(path), load_external_data=False).graph
    modules = {}
    for node in graph.node:
        fused = [p.value for p in node.metadata_props if p.key == MODULES_KEY]
        scopes = ast.literal_eval(fused[0]) if fused else name_scopes(node)
        modules[node.name] = tuple(s.removeprefix("model.") for s in scopes if s)
    return modules


def scopes_of(modules: dict[str, tuple[str, ...]], node: str) -> tuple[str, ...]:
    """The module paths of a profiled ``node`` (``modules``: ``node_modules`` of the file it
    was made from). int8 renames a quantized MatMul ``<name>_quant`` and adds
    ``<name>_quant_...`` scale nodes: those map to ``<name>``."""
    return modules.get(node) or modules.get(node.split("_quant")[0], ())


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


INT8_OPS = ("MatMul", "Gather")
"""The ops int8 quantizes: MatMuls with a constant weight (every linear and factor) and the
embedding lookups. Not ``Attention``: the quantizer would rewrite the ONNX ``Attention`` op as
the contrib ``QAttention``, which takes other inputs and fails to load."""


def quantize_int8(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Dynamic int8 quantization of an ONNX model (``quantize_dynamic``, QInt8 weights, per
    tensor, the ops of ``INT8_OPS``) written to ``output``.

    Raises:
        ExportError: the quantizer failed.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            str(source),
            str(output),
            op_types_to_quantize=list(INT8_OPS),
            weight_type=QuantType.QInt8,
        )
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
    source = path = export_onnx(model, tokenizer, folder / f"{name}.onnx")
    if int8:
        path = quantize_int8(path, folder / f"{name}.int8.onnx")
    return OrtModel(path, model.config, threads, source=source)


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
