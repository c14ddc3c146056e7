"""Measuring: latency, memory, parameter and MAC counts; sweeps; result tables and reports."""

from factorlab.bench.latency import (
    Comparison,
    LatencyResult,
    bench,
    benchmark_model,
    benchmark_models,
    compare_to_dense,
    format_bench,
)
from factorlab.bench.macs import MacCount, count_macs
from factorlab.bench.report import collect_results, results_table, write_report
from factorlab.bench.sweep import load_sweep, run_sweep

__all__ = [
    "Comparison",
    "LatencyResult",
    "MacCount",
    "bench",
    "benchmark_model",
    "benchmark_models",
    "collect_results",
    "compare_to_dense",
    "count_macs",
    "format_bench",
    "load_sweep",
    "results_table",
    "run_sweep",
    "write_report",
]
