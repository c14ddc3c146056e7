"""Measuring: result tables and reports (latency and memory benchmarks join here)."""

from factorlab.bench.report import collect_results, results_table

__all__ = ["collect_results", "results_table"]
