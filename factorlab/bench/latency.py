"""Latency, throughput and memory of a model's forward pass on CPU, as ratios against dense.

The protocol (METHODS.md §9): float32, a fixed thread count (``torch.set_num_threads``), random
token ids of a fixed length, ``torch.inference_mode()``, the model in eval mode, warm-up runs, then
at least 20 timed runs; the median is the latency and the 10th/90th percentiles and the
interquartile range say how noisy it was. A factorized model is always compared with the dense
model it came from (``densify`` of a copy), measured in the same process with the runs
interleaved (dense, factorized, factorized, dense, ...) so that drift from other load on the
machine affects both alike.

Peak memory (bytes) = parameter and buffer bytes + the peak of bytes allocated and still live
during one forward pass, read from ``torch.profiler`` allocation events (``profile_memory=True``;
every allocation through PyTorch's CPU allocator, with its time and size; inputs and the output
included). It is not the process's resident set: Python, the libraries and buffers BLAS allocates
internally are not counted, and ``/proc/self/status`` VmHWM would mix all of those in.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factorlab.bench.macs import count_macs, random_input_ids
from factorlab.checkpoint import densify
from factorlab.errors import ConfigError
from factorlab.methods.apply import count_parameters, factorized_modules

MEMORY_METHOD = (
    "parameter+buffer bytes + peak live bytes allocated during one forward pass "
    "(torch.profiler profile_memory allocation events); excludes Python, library and BLAS "
    "workspace memory"
)
MIN_RUNS = 20


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of ``values`` at ``q`` in [0, 1]."""
    data = sorted(values)
    pos = q * (len(data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class LatencyResult:
    """Timings of one model at one batch size.

    Attributes:
        batch_size: sequences per forward pass.
        seq_len: tokens per sequence.
        threads: ``torch.get_num_threads()`` during the runs.
        warmup: untimed runs before the timed ones.
        times_s: wall-clock seconds of each timed forward pass, in run order.
        param_bytes: bytes of the model's parameters and buffers.
        activation_peak_bytes: peak bytes allocated and live during one forward pass (``None``
            when memory was not measured).
    """

    batch_size: int
    seq_len: int
    threads: int
    warmup: int
    times_s: list[float] = field(default_factory=list)
    param_bytes: int = 0
    activation_peak_bytes: int | None = None

    @property
    def runs(self) -> int:
        """Number of timed runs."""
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        """Median seconds per forward pass: the latency."""
        return statistics.median(self.times_s)

    @property
    def p10_s(self) -> float:
        """10th percentile of the seconds per forward pass."""
        return _quantile(self.times_s, 0.10)

    @property
    def p90_s(self) -> float:
        """90th percentile of the seconds per forward pass."""
        return _quantile(self.times_s, 0.90)

    @property
    def iqr_s(self) -> float:
        """Interquartile range (75th - 25th percentile) of the seconds per forward pass."""
        return _quantile(self.times_s, 0.75) - _quantile(self.times_s, 0.25)

    @property
    def min_s(self) -> float:
        """Fastest run in seconds (the least disturbed by other load)."""
        return min(self.times_s)

    @property
    def throughput(self) -> float:
        """Sequences per second at the median latency."""
        return self.batch_size / self.median_s

    @property
    def peak_memory_bytes(self) -> int | None:
        """``param_bytes + activation_peak_bytes`` (``None`` when memory was not measured)."""
        if self.activation_peak_bytes is None:
            return None
        return self.param_bytes + self.activation_peak_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON form: the fields plus the derived statistics (seconds, sequences/s, bytes)."""
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "threads": self.threads,
            "warmup": self.warmup,
            "runs": self.runs,
            "median_s": self.median_s,
            "p10_s": self.p10_s,
            "p90_s": self.p90_s,
            "iqr_s": self.iqr_s,
            "min_s": self.min_s,
            "throughput_seq_per_s": self.throughput,
            "param_bytes": self.param_bytes,
            "activation_peak_bytes": self.activation_peak_bytes,
            "peak_memory_bytes": self.peak_memory_bytes,
            "times_s": self.times_s,
        }


@dataclass
class Comparison:
    """A model and its dense reference at one batch size, measured interleaved.

    ``latency_ratio`` is model median / dense median (below 1: faster than dense);
    ``throughput_ratio`` its inverse; ``memory_ratio`` model peak / dense peak.
    """

    model: LatencyResult
    dense: LatencyResult

    @property
    def latency_ratio(self) -> float:
        """Median latency of the model over that of the dense reference."""
        return self.model.median_s / self.dense.median_s

    @property
    def min_latency_ratio(self) -> float:
        """Fastest run of the model over fastest run of the dense reference."""
        return self.model.min_s / self.dense.min_s

    @property
    def throughput_ratio(self) -> float:
        """Sequences/s of the model over those of the dense reference."""
        return self.model.throughput / self.dense.throughput

    @property
    def memory_ratio(self) -> float | None:
        """Peak memory of the model over that of the dense reference (``None``: not measured)."""
        a, b = self.model.peak_memory_bytes, self.dense.peak_memory_bytes
        return None if a is None or b is None else a / b

    def to_dict(self) -> dict[str, Any]:
        """JSON form: both results and the ratios."""
        return {
            "batch_size": self.model.batch_size,
            "latency_ratio": self.latency_ratio,
            "min_latency_ratio": self.min_latency_ratio,
            "throughput_ratio": self.throughput_ratio,
            "memory_ratio": self.memory_ratio,
            "model": self.model.to_dict(),
            "dense": self.dense.to_dict(),
        }


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the body with ``torch.set_num_threads(threads)`` (``None``: leave it), then restore.

    Yields the thread count in effect. Raises ``ConfigError`` for ``threads < 1``.
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def param_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (shared tensors counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def activation_peak_bytes(model: nn.Module, input_ids: torch.Tensor) -> int | None:
    """Peak bytes allocated and still live during one forward pass (output included).

    Uses ``torch.profiler.profile(profile_memory=True)``: the allocation events of PyTorch's
    allocator are replayed in time order (``+size`` on allocation, ``-size`` on free) and the
    maximum of the running sum is returned. Returns ``None`` if this torch version does not
    expose the allocation events.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - other torch versions
        return None
    with (
        torch.inference_mode(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p,
    ):
        model(input_ids=input_ids)
    try:
        roots = p.profiler.kineto_results.experimental_event_tree()
    except AttributeError:  # pragma: no cover
        return None
    allocations = []
    stack = list(roots)
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak


def _forward_seconds(model: nn.Module, input_ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=input_ids)
    return time.perf_counter() - start


def _check_protocol(batch_size: int, seq_len: int, runs: int, warmup: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if runs < 1 or warmup < 0:
        raise ConfigError(f"runs must be >= 1 and warmup >= 0, got {runs}, {warmup}")


def _prepare(model: Any) -> Any:
    if not isinstance(model, nn.Module):  # an OrtModel: nothing to set
        return model
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        raise ConfigError("benchmarks run in float32; convert the model with model.float() first")
    return model.eval()


def benchmark_models(
    models: Sequence[nn.Module],
    batch_size: int,
    seq_len: int = 128,
    runs: int = MIN_RUNS,
    warmup: int = 3,
    threads: int | None = None,
    memory: bool = True,
    seed: int = 0,
) -> list[LatencyResult]:
    """Time several models on the same random input, their runs interleaved.

    Run ``i`` times the models in order, run ``i + 1`` in reverse order, so slow drift and
    order effects hit all models alike. Everything runs in ``torch.inference_mode()`` with the
    garbage collector paused; models are put in eval mode.

    Args:
        models: float32 models accepting ``input_ids`` (Hugging Face models) or ONNX Runtime
            models (``factorlab.bench.onnx_runtime.OrtModel``: their ``param_bytes`` is the file
            size, memory is not measured); same vocabulary.
        batch_size: sequences per forward pass.
        seq_len: tokens per sequence.
        runs: timed runs per model (the protocol asks for >= 20).
        warmup: untimed runs per model first.
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards); ``None``
            keeps the current setting.
        memory: also measure peak memory with ``activation_peak_bytes`` (one extra, untimed
            forward pass per model under the profiler).
        seed: seed of the random token ids.

    Returns:
        One ``LatencyResult`` per model, in order.

    Raises:
        ConfigError: non-positive sizes, fewer than one run, a non-float32 model, threads < 1.
    """
    _check_protocol(batch_size, seq_len, runs, warmup)
    models = [_prepare(m) for m in models]
    first = models[0]
    device = next(first.parameters()).device if isinstance(first, nn.Module) else "cpu"
    ids = random_input_ids(first.config, batch_size, seq_len, seed=seed, device=device)
    with num_threads(threads) as used:
        results = [LatencyResult(batch_size, seq_len, used, warmup) for _ in models]
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            with torch.inference_mode():
                order = list(range(len(models)))
                for i in range(warmup + runs):
                    for k in order if i % 2 == 0 else order[::-1]:
                        seconds = _forward_seconds(models[k], ids)
                        if i >= warmup:
                            results[k].times_s.append(seconds)
        finally:
            if gc_was_enabled:
                gc.enable()
        for model, result in zip(models, results, strict=True):
            if not isinstance(model, nn.Module):  # ONNX Runtime: the file's bytes, no profile
                result.param_bytes = model.file_bytes()
                continue
            result.param_bytes = param_bytes(model)
            if memory:
                result.activation_peak_bytes = activation_peak_bytes(model, ids)
    return results


def benchmark_model(
    model: nn.Module,
    batch_size: int,
    seq_len: int = 128,
    runs: int = MIN_RUNS,
    warmup: int = 3,
    threads: int | None = None,
    memory: bool = True,
) -> LatencyResult:
    """Latency of one model (see ``benchmark_models`` for the protocol and errors)."""
    return benchmark_models([model], batch_size, seq_len, runs, warmup, threads, memory)[0]


def dense_reference(model: nn.Module) -> nn.Module | None:
    """The dense model ``model`` stands for (``densify`` of a deep copy), or ``None`` when
    ``model`` has no factorized layer (it is its own reference)."""
    if not factorized_modules(model):
        return None
    return densify(copy.deepcopy(model)).eval()


def compare_to_dense(
    model: nn.Module,
    batch_size: int,
    seq_len: int = 128,
    runs: int = MIN_RUNS,
    warmup: int = 3,
    threads: int | None = None,
    memory: bool = True,
    dense: nn.Module | None = None,
) -> Comparison:
    """Time ``model`` against its dense reference, interleaved, in this process.

    ``dense`` defaults to ``dense_reference(model)``; for a model without factorized layers the
    model is measured once and is its own reference (every ratio is exactly 1). See
    ``benchmark_models`` for the arguments and errors.
    """
    if dense is None:
        dense = dense_reference(model)
    if dense is None:
        result = benchmark_model(model, batch_size, seq_len, runs, warmup, threads, memory)
        return Comparison(result, result)
    ours, ref = benchmark_models([model, dense], batch_size, seq_len, runs, warmup, threads, memory)
    return Comparison(ours, ref)


def profile_table(
    model: nn.Module, batch_size: int, seq_len: int = 128, threads: int | None = None, top: int = 15
) -> str:
    """``torch.profiler`` table of the ``top`` operators by self CPU time for one forward pass
    (after one warm-up pass): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    model = _prepare(model)
    device = next(model.parameters()).device
    ids = random_input_ids(model.config, batch_size, seq_len, device=device)
    with num_threads(threads), torch.inference_mode():
        model(input_ids=ids)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            model(input_ids=ids)
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def _environment() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_1m": load[0] if load else None,
    }


def load_for_bench(name_or_path: str | None) -> nn.Module:
    """Load what ``factorlab bench`` measures: a factorlab checkpoint (dense or factorized, its
    saved architecture) or a Hugging Face model (``AutoModel``, no task head); float32, eval.

    Raises:
        DataError: the model cannot be found or loaded.
    """
    from factorlab.checkpoint import is_checkpoint, load
    from factorlab.models import load_model, resolve_model

    path = resolve_model(name_or_path)
    model = load(path) if is_checkpoint(path) else load_model(path)
    return model.float().eval()


def bench(
    model: nn.Module,
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 128,
    threads: int | None = None,
    runs: int = MIN_RUNS,
    warmup: int = 3,
    memory: bool = True,
    name: str | None = None,
    runtime: str = "torch",
    int8: bool = False,
    tokenizer: Any = None,
    profile: bool = False,
) -> dict[str, Any]:
    """Everything ``factorlab bench`` reports for ``model``, against its dense reference.

    ``runtime="onnxruntime"`` exports the model and its dense reference to ONNX (verified
    against PyTorch, in a temporary folder), optionally quantized to int8 (``int8``, both of
    them), and times them in ONNX Runtime with the same interleaved protocol; ``tokenizer``
    names the exported inputs (default: ``input_ids``, ``attention_mask``, ``token_type_ids``).
    There ``param_bytes`` is the ONNX file size and memory is not measured.

    Returns a JSON-serializable dict: ``model`` (name), ``factorized`` (bool), ``seq_len``,
    ``threads``, ``dtype``, ``parameters`` {model, dense, ratio}, ``macs`` (per forward pass of
    one sequence: ``MacCount.to_dict()`` with ``total``, ``dense_total``, ``ratio``,
    ``factorized_ratio``, for the model; the dense numbers follow from it), ``batches`` (one
    ``Comparison.to_dict()`` per batch size, with ``macs_per_batch``, and for factorized models
    ``limit`` (``factorlab.bench.limit.AchievableLimit``, profiled in the runtime timed: the
    dense time outside the factorized modules, the ideal ratio) and ``ratio_to_ideal`` (latency
    ratio / ideal ratio);
    for a causal LM these rows are the prefill of ``seq_len`` tokens), ``decode`` (causal LMs
    in PyTorch: seconds per new token at batch 1 after ``seq_len`` cached tokens,
    ``factorlab.bench.decode``; else ``None``),
    ``memory_method``, ``profile`` (with ``profile``, at the largest batch size: the text of
    ``profile_table`` in PyTorch, of ``onnx_runtime.profile_table`` for the model beside its
    dense reference in ONNX Runtime; else ``None``) and
    ``environment`` (torch version, CPU count, 1-minute load average before and after: a loaded
    machine makes timings noisy).

    Raises:
        ConfigError: see ``benchmark_models``; an empty ``batch_sizes``.
    """
    from factorlab.bench.onnx_runtime import check_runtime

    if not batch_sizes:
        raise ConfigError("give at least one batch size")
    check_runtime(runtime, int8)
    dense = dense_reference(model)
    env = _environment()
    macs = count_macs(model, 1, seq_len)
    batches = []
    with _runtime_models(model, dense, runtime, int8, tokenizer, threads) as (timed, reference):
        for batch_size in batch_sizes:
            if reference is None:  # a dense model is its own reference: ratios are 1
                result = benchmark_models(
                    [timed], batch_size, seq_len, runs, warmup, threads, memory
                )
                comparison = Comparison(result[0], result[0])
            else:
                ours, ref = benchmark_models(
                    [timed, reference], batch_size, seq_len, runs, warmup, threads, memory
                )
                comparison = Comparison(ours, ref)
            entry = comparison.to_dict()
            entry["macs_per_batch"] = macs.total * batch_size
            entry["limit"] = entry["ratio_to_ideal"] = None
            if reference is not None:
                from factorlab.bench.limit import achievable_limit, onnx_runtime_limit

                if runtime == "torch":
                    limit = achievable_limit(
                        model, dense, batch_size, seq_len, runs, warmup, threads
                    )
                else:
                    limit = onnx_runtime_limit(model, reference, batch_size, seq_len, runs, warmup)
                entry["limit"] = limit.to_dict()
                entry["ratio_to_ideal"] = comparison.latency_ratio / limit.ideal_ratio
            batches.append(entry)
        table = None
        if profile and runtime == "torch":
            table = profile_table(model, max(batch_sizes), seq_len, threads)
        elif profile:
            from factorlab.bench.onnx_runtime import profile_table as ort_profile_table

            pair = {"model": timed} | ({"dense": reference} if reference is not None else {})
            table = ort_profile_table(pair, max(batch_sizes), seq_len)
    decode = None
    if runtime == "torch":
        from factorlab.bench.decode import benchmark_decode, is_causal_lm

        if is_causal_lm(model):
            pair = [model] if dense is None else [model, dense]
            timed_decode = benchmark_decode(pair, seq_len, runs, warmup, threads)
            decode = Comparison(timed_decode[0], timed_decode[-1]).to_dict() | {"context": seq_len}
    dense_params = count_parameters(dense) if dense is not None else count_parameters(model)
    params = count_parameters(model)
    env["loadavg_1m_after"] = _environment()["loadavg_1m"]
    return {
        "model": name,
        "runtime": runtime,
        "int8": int8,
        "factorized": dense is not None,
        "seq_len": seq_len,
        "threads": batches[0]["model"]["threads"],
        "dtype": "int8 weights (dynamic quantization)" if int8 else "float32",
        "runs": runs,
        "warmup": warmup,
        "parameters": {"model": params, "dense": dense_params, "ratio": params / dense_params},
        "macs": macs.to_dict(),
        "batches": batches,
        "decode": decode,
        "memory_method": MEMORY_METHOD,
        "profile": table,
        "environment": env,
    }


@contextlib.contextmanager
def _runtime_models(
    model: nn.Module,
    dense: nn.Module | None,
    runtime: str,
    int8: bool,
    tokenizer: Any,
    threads: int | None,
) -> Iterator[tuple[Any, Any]]:
    """``(model, dense reference or None)`` as the runtime runs them: the PyTorch modules, or
    both exported (and quantized) to ONNX Runtime (``onnx_runtime.deployed``)."""
    if runtime == "torch":
        yield model, dense
        return
    from factorlab.bench.onnx_runtime import deployed

    with deployed([model, dense], tokenizer, int8, threads) as (timed, reference):
        yield timed, reference


def _fmt_load(load: float | None) -> str:
    return "?" if load is None else f"{load:.2f}"


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a plain-text table: each column right-aligned to its widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]


def format_bench(result: dict[str, Any]) -> str:
    """A plain-text table of a ``bench`` result: one row per batch size with the model's median
    latency (ms, with p10-p90), throughput (sequences/s), peak memory, each ratio to dense, the
    ideal ratio (``factorlab.bench.limit``) and the latency ratio over it; then parameter and
    MAC counts with their ratios."""
    rows = [
        (
            "batch",
            "median ms",
            "p10-p90 ms",
            "dense ms",
            "latency x",
            "seq/s",
            "throughput x",
            "peak mem",
            "mem x",
            "ideal x",
            "vs ideal",
        )
    ]
    for b in result["batches"]:
        m, d = b["model"], b["dense"]
        mem = b["memory_ratio"]
        rows.append(
            (
                str(b["batch_size"]),
                f"{1e3 * m['median_s']:.2f}",
                f"{1e3 * m['p10_s']:.2f}-{1e3 * m['p90_s']:.2f}",
                f"{1e3 * d['median_s']:.2f}",
                f"{b['latency_ratio']:.3f}",
                f"{m['throughput_seq_per_s']:.1f}",
                f"{b['throughput_ratio']:.3f}",
                _fmt_bytes(m["peak_memory_bytes"]),
                "-" if mem is None else f"{mem:.3f}",
                "-" if not b.get("limit") else f"{b['limit']['ideal_ratio']:.3f}",
                "-" if not b.get("ratio_to_ideal") else f"{b['ratio_to_ideal']:.3f}",
            )
        )
    lines = aligned(rows)
    p, macs = result["parameters"], result["macs"]
    env = result["environment"]
    kind = "factorized" if result["factorized"] else "dense"
    runtime = result.get("runtime", "torch") + (", int8" if result.get("int8") else ", float32")
    decode = result.get("decode")
    if decode is not None:
        lines += [
            "",
            f"decode      {1e3 * decode['model']['median_s']:.2f} ms/token at batch 1 after "
            f"{decode['context']} cached tokens (dense {1e3 * decode['dense']['median_s']:.2f}, "
            f"latency x {decode['latency_ratio']:.3f}); the rows above are prefill",
        ]
    lines += [
        "",
        f"model       {result['model'] or '-'} ({kind})",
        f"parameters  {p['model']:,} (dense {p['dense']:,}, ratio {p['ratio']:.3f})",
        f"MACs/seq    {macs['total']:,} (dense {macs['dense_total']:,}, ratio {macs['ratio']:.3f}; "
        f"factorized layers {macs['factorized_ratio']:.3f} of their dense MACs; attention "
        f"{macs['attention']:,})",
        f"setup       {runtime}, {result['threads']} threads, seq_len {result['seq_len']}, "
        f"{result['runs']} runs after {result['warmup']} warm-up, interleaved with dense; "
        f"load average {_fmt_load(env.get('loadavg_1m'))} -> "
        f"{_fmt_load(env.get('loadavg_1m_after'))} on {env['cpu_count']} CPUs",
    ]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a ``bench`` result as JSON, atomically; returns the path."""
    from factorlab.io import write_json_atomic

    write_json_atomic(path, result)
    return Path(path)
