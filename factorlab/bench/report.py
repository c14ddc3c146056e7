"""Tables of run results: every ``results.json`` under a folder, grouped over seeds."""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from factorlab.errors import DataError


def collect_results(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``root`` (sorted by path), each with its ``"path"`` added.

    Raises:
        DataError: ``root`` does not exist or holds no ``results.json``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder of runs")
    found = []
    for path in sorted(root.rglob("results.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # temporaries of runs in progress
        results = json.loads(path.read_text())
        results["path"] = str(path.parent)
        found.append(results)
    if not found:
        raise DataError(
            f"no results.json under {root}; run `factorlab compress ... --output {root}/NAME` first"
        )
    return found


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def results_table(results: list[dict[str, Any]]) -> str:
    """A markdown table, one row per (task, method, param_ratio), metrics as mean ± std over seeds.

    Columns: task, method, param_ratio, the task's main metric in percent (and every other
    metric), number of seeds, targeted and whole-model parameters after compression, fraction of
    the model's parameters kept, and training time in seconds (mean over seeds).
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[(r["task"] or "-", r["method"], r["param_ratio"])].append(r)
    columns = [
        "task",
        "method",
        "param_ratio",
        "metrics (%)",
        "seeds",
        "targeted params",
        "model params",
        "model kept",
        "train s",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        task, method, ratio = key
        return (task, method != "dense", method, -ratio)

    for key in sorted(groups, key=order):
        task, method, ratio = key
        runs = groups[key]
        main = runs[0].get("main_metric")
        names = sorted(runs[0]["metrics"], key=lambda n: n != main)
        metrics = ", ".join(
            f"{n} {_mean_std([100 * r['metrics'][n] for r in runs])}" for n in names
        )
        p = runs[0]["parameters"]
        train = [r["timings"]["train"] for r in runs if "train" in r["timings"]]
        cells = [
            task,
            method,
            f"{ratio:g}",
            metrics or "-",
            str(len(runs)),
            f"{p['targeted_after']:,}",
            f"{p['model_after']:,}",
            f"{p['model_after'] / p['model_before']:.3f}",
            f"{statistics.mean(train):.0f}" if train else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
