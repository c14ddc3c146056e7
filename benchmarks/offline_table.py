"""Offline compression without fine-tuning: how much of the dense dev score each method keeps.

Starting from dense MiniLM checkpoints fine-tuned on each task (``factorlab finetune ...
--output RUNS/<task>-dense``, as ``benchmarks/core_glue.sh`` makes them), every method compresses
the fine-tuned weights at each ``param_ratio`` with NO further fine-tuning, and the result is
evaluated on the task's dev set (METHODS.md §5, §6, §9). Calibration statistics (Fisher and Gram)
are collected once per task on a seeded subset of its training split, with the dense model and
its task head, and shared by fwsvd and act-svd.

Usage (from the repository root; GLUE_DIR defaults to ../shared/data/glue):

    python benchmarks/offline_table.py --tasks rte mrpc sst2 --ratios 0.5 0.25
    python benchmarks/offline_table.py --tasks cola stsb --make-dense       # fine-tunes them first
    python benchmarks/offline_table.py --tasks rte --dense rte=/tmp/rte-dense-small --ratios 0.5
    python benchmarks/offline_table.py --tasks rte mrpc --methods act-svd --print  # no work

It prints a markdown table, one row per task, ratio and method (dev score, the fraction of the
dense score kept, parameters kept, mean relative weight error, seconds to compress), plus
"constant": the score of always predicting the training set's majority class (STS-B: its mean
score), the floor a model that learned nothing reaches. It writes the same as JSON (``--json``,
default ``RUNS/offline_table.json``). Rows already in that JSON (same task, ratio, method,
options and dense checkpoint) are not recomputed: the table grows over several invocations, and
an interrupted one resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from filelock import FileLock

from factorlab.calibration import (
    CalibrationConfig,
    calibration_loader,
    collect_statistics,
    probe_batches,
)
from factorlab.checkpoint import load
from factorlab.io import write_json_atomic
from factorlab.methods import count_parameters, factorize_, make_config
from factorlab.models import load_tokenizer
from factorlab.tasks import baseline_score, get_task, load_split
from factorlab.training import EncodedSplit, evaluate

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "low-rank": ("low-rank", {}),
    "fwsvd-out": ("fwsvd", {"fisher_axis": "out"}),
    "fwsvd-in": ("fwsvd", {"fisher_axis": "in"}),
    "act-svd": ("act-svd", {}),
    "autoencoder": ("autoencoder", {}),
    "low-rank-global": ("low-rank", {"allocation": "global"}),
    "fwsvd-out-global": ("fwsvd", {"fisher_axis": "out", "allocation": "global"}),
    "act-svd-global": ("act-svd", {"allocation": "global"}),
    "act-svd-seq": ("act-svd", {"sequential": True}),
    "low-rank-sens": ("low-rank", {"allocation": "sensitivity"}),
    "fwsvd-out-sens": ("fwsvd", {"fisher_axis": "out", "allocation": "sensitivity"}),
    "act-svd-sens": ("act-svd", {"allocation": "sensitivity"}),
    "act-svd-sens128": ("act-svd", {"allocation": "sensitivity", "sensitivity_samples": 128}),
    "act-svd-sens256": ("act-svd", {"allocation": "sensitivity", "sensitivity_samples": 256}),
    "act-svd-seq-global": ("act-svd", {"allocation": "global", "sequential": True}),
    "act-svd-seq-sens128": (
        "act-svd",
        {"allocation": "sensitivity", "sensitivity_samples": 128, "sequential": True},
    ),
    # sequential with error compensation: each layer fitted to the dense model's outputs
    "act-svd-seq-comp": ("act-svd", {"sequential": True, "compensate": True}),
    "act-svd-seq-sens128-comp": (
        "act-svd",
        {
            "allocation": "sensitivity",
            "sensitivity_samples": 128,
            "sequential": True,
            "compensate": True,
        },
    ),
    # the affine fit: centred whitening, the mean output error moved into the bias
    "act-svd-bias": ("act-svd", {"bias_correction": True}),
    "act-svd-seq-comp-bias": (
        "act-svd",
        {"sequential": True, "compensate": True, "bias_correction": True},
    ),
    "act-svd-seq-sens128-comp-bias": (
        "act-svd",
        {
            "allocation": "sensitivity",
            "sensitivity_samples": 128,
            "sequential": True,
            "compensate": True,
            "bias_correction": True,
        },
    ),
    "act-svd-seq-sens128-bias": (
        "act-svd",
        {
            "allocation": "sensitivity",
            "sensitivity_samples": 128,
            "sequential": True,
            "bias_correction": True,
        },
    ),
    # 16 candidate ranks instead of 8: every 0.05 of the largest useful rank up to 0.6, then
    # every 0.1
    "act-svd-seq-sens128-fine": (
        "act-svd",
        {
            "allocation": "sensitivity",
            "sensitivity_samples": 128,
            "sensitivity_fractions": [
                *(round(0.05 * i, 2) for i in range(1, 13)),
                0.7,
                0.8,
                0.9,
                1.0,
            ],
            "sequential": True,
        },
    ),
}
# The sensitivity rows above interpolate each measured curve linearly between its candidate ranks
# (the default before "spectrum"); they keep that so their numbers stay reproducible.
for _, _options in VARIANTS.values():
    if _options.get("allocation") == "sensitivity":
        _options["sensitivity_interpolation"] = "linear"
SPECTRUM = {"allocation": "sensitivity", "sensitivity_samples": 128, "sequential": True}
VARIANTS |= {
    # the default interpolation: in proportion to the whitened spectrum between candidate ranks
    "act-svd-seq-sens128-spec": ("act-svd", SPECTRUM),
    "act-svd-seq-sens128-comp-spec": ("act-svd", {**SPECTRUM, "compensate": True}),
}
"""Table row name -> (registered method, options beyond param_ratio)."""


CURVE_FREE = ("param_ratio", "sensitivity_interpolation")
"""Options that do not change a sensitivity curve: rows differing only in these share one."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/core", help="folder of <task>-dense checkpoints")
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "rte"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25])
    p.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--dense", nargs="*", default=[], help="TASK=PATH: use this dense checkpoint")
    p.add_argument(
        "--make-dense",
        action="store_true",
        help="fine-tune missing dense checkpoints (core_glue.sh's recipe: 3 epochs, seed 42)",
    )
    p.add_argument("--data-dir", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--ae-epochs", type=int, help="autoencoder epochs (default: the config's)")
    p.add_argument("--act-eps", type=float, help="act-svd damping (default: the config's)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="write the rows here (default RUNS/offline_table.json)")
    p.add_argument(
        "--print",
        action="store_true",
        help="compute nothing: print the table of the rows already measured for --tasks, "
        "--ratios and --methods (one column per task)",
    )
    return p.parse_args(argv)


def dense_path(task: str, args: argparse.Namespace) -> Path | None:
    overrides = dict(item.split("=", 1) for item in args.dense)
    path = Path(overrides.get(task, Path(args.runs) / f"{task}-dense"))
    if (path / "factorlab.json").is_file():
        return path
    if not args.make_dense or task in overrides:
        print(f"[{task}] no dense checkpoint at {path}; skipped (--make-dense fine-tunes one)")
        return None
    recipe = ["--task", task, "--data-dir", args.data_dir, "--seed", "42", "--epochs", "3"]
    if task == "sst2":  # as core_glue.sh: a seeded 10k subset, 2 epochs
        recipe += ["--train-samples", "10000", "--epochs", "2"]
    command = ["factorlab", "finetune", *recipe, "--no-progress", "--output", str(path)]
    print(f"[{task}] fine-tuning the dense model: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    return path


def _options(variant: str, ratio: float, args: argparse.Namespace) -> dict[str, Any]:
    method, options = VARIANTS[variant]
    options = {"param_ratio": ratio, **options}
    if method == "autoencoder" and args.ae_epochs:
        options["epochs"] = args.ae_epochs
    if method == "act-svd" and args.act_eps is not None:
        options["eps"] = args.act_eps
    return options


def _key(task: str, ratio: float, method: str, dense: Path | str, options: dict) -> tuple:
    """What a row measured: rows with the same key are not recomputed."""
    return (task, ratio, method, str(dense), json.dumps(options))


def _row_key(row: dict[str, Any]) -> tuple:
    return _key(row["task"], row["ratio"], row["method"], row["dense"], row["options"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.json or Path(args.runs) / "offline_table.json")
    # Rows already in the JSON file are kept and not recomputed, so the table grows over several
    # invocations (other tasks, ratios or methods) and an interrupted one resumes.
    rows: list[dict[str, Any]] = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {_row_key(r) for r in rows if "options" in r}
    if args.print:
        chosen = [
            r
            for r in rows
            if r["task"] in args.tasks
            and (r["method"] in ("dense", "constant") or r["method"] in args.methods)
            and (r["ratio"] == 1.0 or r["ratio"] in args.ratios)
        ]
        print(format_pivot(chosen))
        return 0

    def add(row: dict[str, Any]) -> None:
        # several single-thread invocations may share one JSON file (other tasks or rows): each
        # write rereads it under a lock and adds its row, so none overwrites another's rows
        with FileLock(f"{out}.lock"):
            if out.is_file():
                rows[:] = json.loads(out.read_text())["rows"]
                done.update(_row_key(r) for r in rows if "options" in r)
            if _row_key(row) not in done:
                rows.append(row)
                done.add(_row_key(row))
            write_json_atomic(out, {"rows": rows})

    for task_name in args.tasks:
        task = get_task(task_name)
        path = dense_path(task.name, args)
        if path is None:
            continue
        todo = [
            (ratio, variant)
            for ratio in args.ratios
            for variant in args.methods
            if _key(task.name, ratio, variant, path, _options(variant, ratio, args)) not in done
        ]
        dense_key = _key(task.name, 1.0, "dense", path, {})
        constant_key = _key(task.name, 1.0, "constant", path, {})
        if not todo and dense_key in done and constant_key in done:
            print(f"[{task.name}] all rows measured already ({out})")
            continue
        tokenizer = load_tokenizer(str(path))
        dev = EncodedSplit(
            load_split(task, task.eval_splits[0], args.data_dir), tokenizer, args.max_seq_length
        )
        model = load(path)
        dense_score = evaluate(model, dev, tokenizer)[task.main_metric]
        print(f"[{task.name}] dense {task.main_metric} {dense_score:.4f} ({path})", flush=True)
        base = {"task": task.name, "metric": task.main_metric, "dense": str(path)}
        if dense_key not in done:
            add(
                {
                    **base,
                    "ratio": 1.0,
                    "method": "dense",
                    "options": {},
                    "score": dense_score,
                    "kept_score": 1.0,
                    "kept_params": 1.0,
                    "model_params": count_parameters(model),
                    "rel_error": 0.0,
                    "seconds": 0.0,
                }
            )
        if constant_key not in done:
            train_labels = load_split(task, "train", args.data_dir).labels
            constant = baseline_score(task, train_labels, dev.labels)
            add(
                {
                    **base,
                    "ratio": 1.0,
                    "method": "constant",
                    "options": {},
                    "score": constant,
                    "kept_score": constant / dense_score if dense_score else float("nan"),
                    "kept_params": 0.0,
                    "model_params": 0,
                    "rel_error": 1.0,
                    "seconds": 0.0,
                }
            )
        stats, loader = None, None
        if any(VARIANTS[variant][0] in ("fwsvd", "act-svd") for _, variant in todo):
            start = time.perf_counter()
            loader = calibration_loader(
                tokenizer,
                task=task.name,
                data_dir=args.data_dir,
                samples=args.calibration_samples,
                max_seq_length=args.max_seq_length,
            )
            stats = collect_statistics(model, loader, progress=False)
            print(f"[{task.name}] calibration: {time.perf_counter() - start:.0f}s", flush=True)
        del model
        probes: dict[int, Any] = {}  # sensitivity probe batches by sample count, per task
        # measured sensitivity curves, per task, shared by the rows whose projection and probe
        # are the same (they do not depend on the budget or the interpolation)
        curves: dict[str, Any] = {}
        for ratio, variant in todo:
            options = _options(variant, ratio, args)
            model = load(path)
            start = time.perf_counter()
            config = make_config(VARIANTS[variant][0], **options)
            probe = None
            if config.allocation == "sensitivity":  # the output on calibration examples
                samples = config.sensitivity_samples
                if samples not in probes:
                    calibration = CalibrationConfig(task=task.name)
                    probes[samples] = probe_batches(
                        tokenizer, calibration, args.data_dir, args.max_seq_length, samples
                    )
                probe = probes[samples]
            shared = {k: v for k, v in options.items() if k not in CURVE_FREE}
            cache = curves.setdefault(json.dumps([VARIANTS[variant][0], shared]), {})
            if options.get("sequential"):  # block l calibrated on the compressed blocks < l
                reference = copy.deepcopy(model) if options.get("compensate") else None

                def calibrate(
                    names: list[str], model: Any = model, data: Any = loader, dense: Any = reference
                ) -> Any:
                    return collect_statistics(
                        model, data, names, fisher=False, progress=False, reference=dense
                    )

                report = factorize_(
                    model, config, calibrate=calibrate, probe=probe, sensitivity_curves=cache
                )
            else:
                report = factorize_(model, config, stats, probe=probe, sensitivity_curves=cache)
            seconds = time.perf_counter() - start
            score = evaluate(model, dev, tokenizer)[task.main_metric]
            row = {
                **base,
                "ratio": ratio,
                "method": variant,
                "options": options,
                "score": score,
                "kept_score": score / dense_score if dense_score else float("nan"),
                "kept_params": report.kept_ratio,
                "model_params": count_parameters(model),
                "rel_error": statistics.mean(m.rel_error for m in report.modules),
                "seconds": seconds,
            }
            add(row)
            print(
                f"[{task.name}] {variant} p={ratio}: {task.main_metric} {score:.4f} "
                f"({row['kept_score']:.1%} of dense) in {seconds:.0f}s",
                flush=True,
            )
            del model
    print(format_table(rows))
    print()
    print(format_pivot(rows))
    print(f"rows in {out}")
    return 0


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: task, param_ratio, method, dev score, % of dense kept, params kept, error, s;
    ordered by task, then ratio (dense first), then the order of ``VARIANTS``."""
    order = ["dense", "constant", *VARIANTS]
    rows = sorted(rows, key=lambda r: (r["task"], -r["ratio"], order.index(r["method"])))
    lines = [
        "| task | param_ratio | method | dev score | % of dense | targeted params kept "
        "| mean rel. error | compress (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['ratio']:g} | {r['method']} | {r['metric']} {r['score']:.4f} "
            f"| {100 * r['kept_score']:.1f} | {r['kept_params']:.3f} | {r['rel_error']:.3f} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def format_pivot(rows: list[dict[str, Any]]) -> str:
    """Markdown, one row per (param_ratio, method) and one column per task: the dev score in
    percent and, in parentheses, the percent of the dense score it keeps."""
    order = ["dense", "constant", *VARIANTS]
    tasks = sorted({r["task"] for r in rows})
    metric = {r["task"]: r["metric"] for r in rows}
    cells = {(r["ratio"], r["method"], r["task"]): r for r in rows}
    keys = sorted(
        {(r["ratio"], r["method"]) for r in rows}, key=lambda k: (-k[0], order.index(k[1]))
    )
    lines = [
        "| param_ratio | method | " + " | ".join(f"{t} {metric[t]}" for t in tasks) + " |",
        "|---|---|" + "---|" * len(tasks),
    ]
    for ratio, method in keys:
        row = []
        for t in tasks:
            r = cells.get((ratio, method, t))
            kept = "" if r is None or method == "dense" else f" ({100 * r['kept_score']:.1f}%)"
            row.append("-" if r is None else f"{100 * r['score']:.1f}{kept}")
        label = "1" if method in ("dense", "constant") else f"{ratio:g}"
        lines.append(f"| {label} | {method} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
