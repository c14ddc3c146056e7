"""Reports of run results: every ``results.json`` under a folder, grouped over seeds.

``results_table`` is the markdown table ``factorlab report`` prints; ``write_report`` writes a
sweep's full report (``report.md`` and PNG plots: metric vs param_ratio per task, latency ratio vs
param_ratio against the MAC-ratio ideal when ``bench.json`` files are present, and the SVD
reconstruction error of the first and last query matrix vs the number of singular values kept,
as in Gupta et al. 2024 [G24], Fig. 5). With ``readme``, it also rewrites the block of a
markdown file between the ``README_MARKERS`` with the report's comparison, so a README's
results table is the sweep's, never a hand copy.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from factorlab.errors import DataError

README_MARKERS = ("<!-- sweep-report:start -->", "<!-- sweep-report:end -->")


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


def task_baselines(results: list[dict[str, Any]], data_dir: str | os.PathLike) -> dict[str, float]:
    """Per task of ``results``, the dev score of the best constant predictor (fraction units;
    ``factorlab.stability.constant_baselines``: the better of the training and dev majority
    class, the training mean on STS-B), from the GLUE folder ``data_dir`` and the training split
    (``train_samples`` and seed) of the task's first run.

    Raises:
        DataError: ``data_dir`` lacks a task's train or dev file.
    """
    from factorlab.stability import constant_baselines as scores
    from factorlab.training import TrainingConfig

    baselines: dict[str, float] = {}
    for r in results:
        task = r.get("task")
        if not task or task in baselines:
            continue
        training = TrainingConfig(**((r.get("config") or {}).get("training") or {}))
        baselines[task] = scores(task, str(data_dir), training)["baseline"]
    return baselines


def is_failed_run(results: dict[str, Any], baselines: dict[str, float]) -> bool | None:
    """Whether a run failed: its main dev metric is no better than its task's constant
    predictor + 1 point (``factorlab.stability.is_failed``, METHODS.md §4); ``None`` where the
    task has no baseline in ``baselines``."""
    from factorlab.stability import is_failed

    baseline = baselines.get(results.get("task") or "")
    main = results.get("main_metric")
    if baseline is None or main not in (results.get("metrics") or {}):
        return None
    return is_failed(results["metrics"][main], baseline)


def _failed_cell(runs: list[dict[str, Any]], baselines: dict[str, float]) -> str:
    failed = [is_failed_run(r, baselines) for r in runs]
    return "-" if None in failed else f"{sum(failed)}/{len(failed)}"


def _bytes_kept(runs: list[dict[str, Any]], method: str) -> str:
    p = runs[0]["parameters"]
    if "targeted_bytes_before" in p:
        return f"{p['targeted_bytes_after'] / p['targeted_bytes_before']:.3f}"
    return "1.000" if method == "dense" else "-"


def method_label(results: dict[str, Any]) -> str:
    """The method of a run with the options that distinguish its variants: ``low-rank``,
    ``monarch nblocks=4``, ``low-rank staged``, ``low-rank kd`` (distilled; ``kd alpha=0.9 T=1``
    where alpha and T differ from 0.5 and 2), ``low-rank kd from dense`` (started from the model of
    a dense factorlab run found at its path or beside this run's folder, as in a sweep record,
    whatever its seed: runs over seeds, each from its own dense run, share a label) or ``... from
    NAME`` (from another factorlab run, by folder name);
    ``param_ratio`` is shown separately."""
    config = results.get("config") or {}
    options = {k: v for k, v in (config.get("method_options") or {}).items() if k != "param_ratio"}
    parts = [results["method"]]
    parts += [
        f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
        for k, v in sorted(options.items())
    ]
    if config.get("staged"):
        parts.append("staged")
    distillation = config.get("distillation")
    if distillation:
        parts.append("kd")
        alpha, temperature = distillation.get("alpha", 0.5), distillation.get("temperature", 2)
        hidden = distillation.get("hidden_weight") or 0
        parts += [f"alpha={alpha:g}"] if alpha != 0.5 else []
        parts += [f"T={temperature:g}"] if temperature != 2 else []
        parts += [f"hidden={hidden:g}"] if hidden else []
    model = config.get("model")
    sources = [Path(model) / "results.json"] if model else []
    if model and results.get("path"):  # a record or a moved sweep: the run beside this one
        sources.append(Path(results["path"]).parent / Path(model).name / "results.json")
    source = next((p for p in sources if p.is_file()), None)
    if source is not None:  # started from another factorlab run
        try:
            dense = json.loads(source.read_text()).get("method") == "dense"
        except (json.JSONDecodeError, AttributeError):
            dense = False
        parts.append("from dense" if dense else f"from {Path(model).name}")
    return " ".join(parts)


def _training(r: dict[str, Any]) -> dict[str, Any]:
    training = dict((r.get("config") or {}).get("training") or {})
    training.pop("seed", None)
    return training


def _group_keys(results: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(task, label, param_ratio) of each run: runs that differ only in their seed share a key.
    Where runs of the same task, method label and ratio were trained differently, the label
    gets the training fields that tell them apart (``act-svd kd learning_rate=5e-05``)."""
    keys = [(r["task"] or "-", method_label(r), r["param_ratio"]) for r in results]
    training = [_training(r) for r in results]
    same: dict[tuple[str, str, float], list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        same[key].append(i)
    for key, members in same.items():
        fields = sorted({f for i in members for f in training[i]})
        differ = [f for f in fields if len({json.dumps(training[i].get(f)) for i in members}) > 1]
        for i in members if differ else []:
            extra = " ".join(f"{f}={training[i].get(f)}" for f in differ)
            keys[i] = (key[0], f"{key[1]} {extra}", key[2])
    return keys


def _order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    task, method, ratio = key
    return (task, method != "dense", method, -ratio)


def results_table(
    results: list[dict[str, Any]],
    benches: dict[tuple[str, float], dict[str, Any]] | None = None,
    baselines: dict[str, float] | None = None,
) -> str:
    """A markdown table, one row per (task, method, param_ratio), metrics as mean ± std over seeds.

    Columns: task, method (with the options that tell variants apart), param_ratio, the task's
    main metric in percent (and every other metric), number of seeds, targeted and whole-model
    parameters after compression, fraction of the model's parameters kept, fraction of the
    targeted layers' bytes kept (``-`` for runs that did not record it), and training time in
    seconds (mean over seeds). With ``baselines`` (``task_baselines``) a column counts the
    failed runs (``is_failed_run``); with ``benches`` (``{(method label, param_ratio): bench
    result}``, see ``collect_benches``) a last column gives the latency ratio to dense per batch
    size.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for key, r in zip(_group_keys(results), results, strict=True):
        groups[key].append(r)
    columns = [
        "task",
        "method",
        "param_ratio",
        "metrics (%)",
        "seeds",
        *(["failed"] if baselines else []),
        "targeted params",
        "model params",
        "model kept",
        "bytes kept",
        "train s",
    ]
    if benches:
        columns.append("latency x dense")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]

    for key in sorted(groups, key=_order):
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
            *([_failed_cell(runs, baselines)] if baselines else []),
            f"{p['targeted_after']:,}",
            f"{p['model_after']:,}",
            f"{p['model_after'] / p['model_before']:.3f}",
            _bytes_kept(runs, method),
            f"{statistics.mean(train):.0f}" if train else "-",
        ]
        if benches:
            cells.append(_latency_cell(benches.get((method, ratio)), method))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(
    results: list[dict[str, Any]],
    benches: dict[tuple[str, float], dict[str, Any]] | None = None,
    baselines: dict[str, float] | None = None,
) -> str:
    """The compact view of a methods x tasks sweep (as Table 1 of Gupta et al. 2024): one row
    per (method, param_ratio), one column per task with its main metric in percent (mean ± std
    over every seed; ``-`` where that task was not run; with ``baselines``, `` (k/n failed)``
    where k of its n runs failed, ``is_failed_run``), the fraction of the model's parameters
    kept, and, with ``benches``, the latency ratio to dense at each benchmarked batch size.
    """
    failed: dict[tuple[str, float], dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    cells: dict[tuple[str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    kept: dict[tuple[str, float], float] = {}
    metric_of: dict[str, str] = {}
    for r in results:
        if not r.get("task") or not r.get("metrics"):
            continue
        key = (method_label(r), r["param_ratio"])
        main = r.get("main_metric") or next(iter(r["metrics"]))
        metric_of[r["task"]] = main
        cells[key][r["task"]].append(100 * r["metrics"][main])
        if baselines and (fail := is_failed_run(r, baselines)) is not None:
            failed[key][r["task"]].append(fail)
        p = r["parameters"]
        kept[key] = p["model_after"] / p["model_before"]
    tasks = sorted(metric_of)
    batch_sizes = sorted(
        {b["batch_size"] for bench in (benches or {}).values() for b in bench["batches"]}
    )
    columns = ["method", "param_ratio", "model kept"]
    columns += [f"{t} {metric_of[t]}" for t in tasks]
    columns += [f"latency x b{b}" for b in batch_sizes]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for key in sorted(cells, key=lambda k: (k[0] != "dense", -k[1], k[0])):
        method, ratio = key
        row = [method, f"{ratio:g}", f"{kept[key]:.3f}"]
        for t in tasks:
            cell = _mean_std(cells[key][t]) if cells[key][t] else "-"
            if any(failed[key][t]):
                cell += f" ({sum(failed[key][t])}/{len(failed[key][t])} failed)"
            row.append(cell)
        bench = (benches or {}).get(key)
        by_batch = {b["batch_size"]: b["latency_ratio"] for b in bench["batches"]} if bench else {}
        for b in batch_sizes:
            row.append(f"{by_batch[b]:.2f}" if b in by_batch else "1" if method == "dense" else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def runs_table(results: list[dict[str, Any]], baselines: dict[str, float] | None = None) -> str:
    """One row per run, to trace every number of the other tables to its run: task, method,
    param_ratio, seed, main metric in percent (``failed`` where ``is_failed_run``), the run's
    folder (a sweep's names end in the hash of the run's config) and the versions that ran it
    (factorlab / torch / transformers)."""
    columns = ["task", "method", "param_ratio", "seed", "main metric (%)", "run", "versions"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    keyed = list(zip(_group_keys(results), results, strict=True))
    for key, r in sorted(keyed, key=lambda kr: (_order(kr[0]), kr[1].get("seed") or 0)):
        main = r.get("main_metric")
        value = (r.get("metrics") or {}).get(main)
        metric = "-" if value is None else f"{main} {100 * value:.2f}"
        if baselines and is_failed_run(r, baselines):
            metric += " (failed)"
        v = r.get("versions") or {}
        version = " / ".join(v.get(k, "?") for k in ("factorlab", "torch", "transformers"))
        cells = [key[0], key[1], f"{key[2]:g}", str(r.get("seed", "-")), metric]
        lines.append("| " + " | ".join([*cells, Path(r["path"]).name, version]) + " |")
    return "\n".join(lines)


def _latency_cell(bench: dict[str, Any] | None, method: str) -> str:
    if bench is None:
        return "1 (dense)" if method == "dense" else "-"
    return ", ".join(f"b{b['batch_size']} {b['latency_ratio']:.2f}" for b in bench["batches"])


def collect_benches(
    root: str | os.PathLike, results: list[dict[str, Any]]
) -> dict[tuple[str, float], dict[str, Any]]:
    """Benchmark results (``factorlab bench --json``) that belong to the runs in ``results``.

    A run's own ``bench.json``, or any ``bench*.json`` directly in ``root`` whose ``model`` is a
    run's folder, counts for the run's (method label, param_ratio); one benchmark per pair is
    enough (latency does not depend on the task or seed). Unreadable files are skipped.

    Returns:
        ``{(method label, param_ratio): bench result}``.
    """
    by_path = {str(Path(r["path"]).resolve()): r for r in results}
    found: dict[tuple[str, float], dict[str, Any]] = {}
    candidates = [Path(r["path"]) / "bench.json" for r in results]
    candidates += sorted(Path(root).glob("bench*.json"))
    for path in candidates:
        if not path.is_file():
            continue
        try:
            bench = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        model = bench.get("model")
        run = by_path.get(str(Path(model).resolve())) if model else None
        if run is None and path.parent.resolve() != Path(root).resolve():
            run = by_path.get(str(path.parent.resolve()))
        if run is None or "batches" not in bench:
            continue
        found.setdefault((method_label(run), run["param_ratio"]), bench)
    return found


def latency_table(benches: dict[tuple[str, float], dict[str, Any]]) -> str:
    """Markdown table of the benchmarks: one row per (method, param_ratio, batch size) with
    latency ratio (median; p10-p90 of the model in ms), MAC ratio of the whole model and of the
    factorized layers (the ideal), parameter ratio, peak-memory ratio and throughput."""
    columns = [
        "method",
        "param_ratio",
        "batch",
        "latency x",
        "median ms (p10-p90)",
        "dense ms",
        "MAC x model",
        "MAC x layers",
        "params x",
        "memory x",
        "seq/s",
        "threads",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for (method, ratio), bench in sorted(benches.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        for b in bench["batches"]:
            m = b["model"]
            mem = b.get("memory_ratio")
            lines.append(
                "| "
                + " | ".join(
                    [
                        method,
                        f"{ratio:g}",
                        str(b["batch_size"]),
                        f"{b['latency_ratio']:.3f}",
                        f"{1e3 * m['median_s']:.1f} "
                        f"({1e3 * m['p10_s']:.1f}-{1e3 * m['p90_s']:.1f})",
                        f"{1e3 * b['dense']['median_s']:.1f}",
                        f"{bench['macs']['ratio']:.3f}",
                        f"{bench['macs']['factorized_ratio']:.3f}",
                        f"{bench['parameters']['ratio']:.3f}",
                        "-" if mem is None else f"{mem:.3f}",
                        f"{m['throughput_seq_per_s']:.1f}",
                        str(bench.get("threads", "-")),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def _main_metric_values(runs: list[dict[str, Any]]) -> tuple[str, list[float]] | None:
    name = runs[0].get("main_metric")
    if not name:
        return None
    values = [100 * r["metrics"][name] for r in runs if name in r.get("metrics", {})]
    return (name, values) if values else None


def _new_figure(width: float = 6.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_metric_vs_ratio(results: list[dict[str, Any]], path: str | os.PathLike) -> list[Path]:
    """One PNG per task: main metric (percent, mean ± std over seeds) vs param_ratio, one line
    per method, the dense baseline as a horizontal line. Files ``<path>/metric_<task>.png``;
    returns the paths written (tasks without metrics are skipped)."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    with_task = [r for r in results if r.get("task")]
    for key, r in zip(_group_keys(with_task), with_task, strict=True):
        groups[key].append(r)
    written = []
    for task in sorted({k[0] for k in groups}):
        fig = _new_figure()
        ax = fig.add_subplot()
        metric_name = None
        methods = sorted({k[1] for k in groups if k[0] == task})
        for method in methods:
            points = []
            for (t, m, ratio), runs in groups.items():
                got = _main_metric_values(runs) if (t, m) == (task, method) else None
                if got:
                    metric_name = got[0]
                    values = got[1]
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    points.append((ratio, statistics.mean(values), std))
            if not points:
                continue
            points.sort()
            if method == "dense":
                _, mean, std = points[0]
                ax.axhline(mean, color="black", linestyle="--", label=f"dense {mean:.1f}")
                if std:
                    ax.axhspan(mean - std, mean + std, color="black", alpha=0.1)
                continue
            xs, ys, es = zip(*points, strict=True)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
        if metric_name is None:
            continue
        ax.set_xlabel("param_ratio (fraction of targeted parameters kept)")
        ax.set_ylabel(f"{metric_name} (%)")
        ax.set_title(f"{task}: {metric_name} vs parameters kept")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = Path(path) / f"metric_{task}.png"
        fig.savefig(out)
        written.append(out)
    return written


def plot_latency_vs_ratio(
    benches: dict[tuple[str, float], dict[str, Any]], path: str | os.PathLike
) -> Path | None:
    """PNG ``latency.png``: latency ratio to dense vs param_ratio, one line per (method, batch
    size), with the MAC ratio of the whole model (dashed) and of the factorized layers (dotted):
    the ideal if latency followed MACs. Returns ``None`` without benchmarks."""
    if not benches:
        return None
    fig = _new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    by_method: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    for (method, ratio), bench in benches.items():
        if method != "dense":
            by_method[method].append((ratio, bench))
    for method, items in sorted(by_method.items()):
        items.sort(key=lambda x: x[0])
        xs = [r for r, _ in items]
        color = None
        for i, b in enumerate(items[0][1]["batches"]):
            ys = [bench["batches"][i]["latency_ratio"] for _, bench in items]
            line = ax.plot(xs, ys, marker="o", label=f"{method}, batch {b['batch_size']}")[0]
            color = color or line.get_color()
        ax.plot(xs, [b["macs"]["ratio"] for _, b in items], "--", color=color,
                label=f"{method}: MAC x model")  # fmt: skip
        ax.plot(
            xs,
            [b["macs"]["factorized_ratio"] for _, b in items],
            ":",
            color=color,
            label=f"{method}: MAC x factorized layers",
        )
    ax.axhline(1.0, color="gray", linewidth=0.8, label="dense")
    ax.set_xlabel("param_ratio (fraction of targeted parameters kept)")
    ax.set_ylabel("latency / dense latency")
    ax.set_title("latency vs dense (below 1: faster); dashed/dotted: MAC ratio")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path) / "latency.png"
    fig.savefig(out)
    return out


def query_matrices(model: Any) -> list[tuple[str, Any]]:
    """``[(name, weight (out, in))]`` of the attention query projections of ``model`` in module
    order (modules named ``query``, ``q_lin`` or ``q_proj``); factorized ones are skipped."""
    from torch import nn

    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("query", "q_lin", "q_proj") and isinstance(
            module, nn.Linear
        ):
            found.append((name, module.weight.detach()))
    return found


def reconstruction_error_curve(weight: Any) -> list[float]:
    """Relative Frobenius error ``||W - W_k|| / ||W||`` of the best rank-``k`` approximation for
    ``k = 0 .. min(m, n)``: ``sqrt(sum_{i > k} s_i^2 / sum_i s_i^2)`` (Eckart-Young), in float64."""
    import torch

    s = torch.linalg.svdvals(weight.double())
    energy = s.square()
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{i >= k} s_i^2
    total = energy.sum()
    errors = (tail / total).sqrt().tolist()
    return [*errors, 0.0]


def plot_reconstruction_error(
    model: Any, path: str | os.PathLike, param_ratios: list[float] | None = None
) -> Path | None:
    """PNG ``reconstruction_error.png``: relative reconstruction error vs number of singular
    values kept for the first and last query matrix of ``model`` (Gupta et al. 2024, Fig. 5),
    with the ranks of ``param_ratios`` marked. Returns ``None`` if the model has no query
    projection."""
    from factorlab.projections.svd import rank_for_param_ratio

    queries = query_matrices(model)
    if not queries:
        return None
    chosen = [queries[0]] if len(queries) == 1 else [queries[0], queries[-1]]
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, weight in chosen:
        errors = reconstruction_error_curve(weight)
        ax.plot(range(len(errors)), errors, label=name)
    m, n = chosen[0][1].shape
    for ratio in sorted(set(param_ratios or [])):
        if ratio < 1:
            rank = rank_for_param_ratio(m, n, ratio)
            ax.axvline(rank, color="gray", linestyle=":", linewidth=1)
            ax.text(rank, 0.98, f" p={ratio:g}", fontsize=7, va="top", color="gray")
    ax.set_xlabel("singular values kept (rank)")
    ax.set_ylabel("relative error ||W - W_k||_F / ||W||_F")
    ax.set_ylim(0, 1.0)
    ax.set_title("SVD reconstruction error of query matrices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path) / "reconstruction_error.png"
    fig.savefig(out)
    return out


def _pretrained_model(results: list[dict[str, Any]]) -> Any:
    from factorlab.checkpoint import is_checkpoint, load
    from factorlab.models import default_model_path, load_model

    name = (results[0].get("config") or {}).get("model") or ""
    path = default_model_path() if name.startswith("embedded:") or not name else name
    return load(path) if is_checkpoint(path) else load_model(path)


def _failure_rule(baselines: dict[str, float] | None) -> str:
    if not baselines:
        return "Failed runs are not counted: pass --data-dir (the GLUE folder) for them."
    shown = ", ".join(f"{t} {100 * b:.2f}" for t, b in sorted(baselines.items()))
    return (
        "A run fails when its main dev metric is not above the best constant predictor + 1 "
        f"point (METHODS.md §4; constant predictors: {shown})."
    )


def comparison_section(
    results: list[dict[str, Any]],
    benches: dict[tuple[str, float], dict[str, Any]] | None = None,
    baselines: dict[str, float] | None = None,
) -> str:
    """``comparison_table`` and the sentence that says how to read it: what ``write_report``
    puts under "## Comparison" and ``readme`` between the ``README_MARKERS``."""
    legend = (
        "Main dev metric per task in percent (mean ± std over every seed); model kept: "
        "fraction of the whole model's parameters; "
        + ("latency x: median latency over dense's. " if benches else "no latency measured. ")
    )
    table = comparison_table(results, benches, baselines)
    return f"{table}\n\n{legend}{_failure_rule(baselines)}"


def write_report(
    root: str | os.PathLike,
    output: str | os.PathLike | None = None,
    baselines: dict[str, float] | None = None,
    readme: str | os.PathLike | None = None,
) -> Path:
    """Write ``report.md`` and its PNG plots for every run under ``root``.

    ``report.md`` holds, for runs on several tasks, the compact ``comparison_table``; the results
    table (``results_table``, with latency ratios when benchmarks exist), the latency table
    (``latency_table``), the plots: ``metric_<task>.png`` per task, ``latency.png`` (with
    benchmarks) and ``reconstruction_error.png`` (from the pretrained model named in the runs'
    config; skipped with a note if it cannot be loaded), and ``runs_table``: every run with its
    folder and versions.

    Args:
        root: a sweep folder or any folder holding run folders.
        output: where to write; default ``root/report``.
        baselines: ``task_baselines(results, GLUE folder)``: with them the tables count
            failed runs (``is_failed_run``); without them they do not, and the report says so.
        readme: a markdown file (the README) whose block between the ``README_MARKERS``
            becomes ``comparison_section`` and the run count; checked before anything is
            written.

    Returns:
        The path of ``report.md`` (written through a temporary file, as is ``readme``).

    Raises:
        DataError: ``root`` holds no ``results.json``, or ``readme`` does not exist.
        ConfigError: ``readme`` lacks its markers (``factorlab.io.marked_block``).
    """
    from factorlab.errors import FactorlabError
    from factorlab.io import marked_block, write_marked_block, write_text_atomic

    results = collect_results(root)
    if readme is not None:
        if not Path(readme).is_file():
            raise DataError(f"--readme {readme} does not exist: give the markdown file to update")
        marked_block(Path(readme).read_text(), README_MARKERS, str(readme))
    out = Path(output) if output is not None else Path(root) / "report"
    out.mkdir(parents=True, exist_ok=True)
    benches = collect_benches(root, results)
    lines = [f"# factorlab report: {root}", "", f"{len(results)} runs.", ""]
    failure = _failure_rule(baselines)
    comparison = comparison_section(results, benches, baselines)
    if len({r["task"] for r in results if r.get("task")}) > 1:
        lines += ["## Comparison", "", comparison, ""]
    lines += ["## Results", "", results_table(results, benches, baselines), ""]
    lines += [
        "Metrics: mean ± std over seeds, in percent; bytes kept: of the targeted layers' "
        "weights. " + failure,
        "",
    ]
    if benches:
        lines += ["## Latency against dense", "", latency_table(benches), ""]
        first = next(iter(benches.values()))
        lines += [
            f"Latency: median of {first.get('runs', '?')} runs, float32, "
            f"{first.get('threads', '?')} threads, sequence length {first.get('seq_len', '?')}, "
            "interleaved with the dense model in the same process. MAC x model: MACs of the "
            "whole forward pass (linear layers and attention matmuls) over dense; MAC x layers: "
            "of the factorized layers alone, the ideal a latency ratio could reach if only "
            "those layers counted.",
            "",
        ]
    else:
        lines += [
            "No benchmark found: run `factorlab bench RUN_DIR --json RUN_DIR/bench.json` (or add "
            "`bench:` to the sweep file) for latency ratios.",
            "",
        ]
    lines += ["## Plots", ""]
    for png in plot_metric_vs_ratio(results, out):
        lines += [f"![{png.stem}]({png.name})", ""]
    latency_png = plot_latency_vs_ratio(benches, out)
    if latency_png is not None:
        lines += [f"![latency]({latency_png.name})", ""]
    ratios = sorted({r["param_ratio"] for r in results if r["param_ratio"] < 1})
    try:
        model = _pretrained_model(results)
    except (FactorlabError, OSError, ValueError) as exc:
        model = None
        lines += [f"(No reconstruction-error plot: the pretrained model did not load: {exc})", ""]
    if model is not None:
        png = plot_reconstruction_error(model, out, ratios)
        if png is not None:
            lines += [
                f"![reconstruction error]({png.name})",
                "",
                "Relative SVD reconstruction error of the first and last query matrix of the "
                "pretrained model vs the number of singular values kept (Gupta et al. 2024, "
                "Fig. 5); dotted lines: the ranks of the sweep's param_ratios.",
                "",
            ]
    lines += ["## Runs", "", runs_table(results, baselines), ""]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines))
    if readme is not None:
        write_marked_block(readme, README_MARKERS, readme_section(root, comparison, len(results)))
    return report


def readme_section(root: str | os.PathLike, comparison: str, runs: int) -> str:
    """What ``write_report`` puts between a README's ``README_MARKERS``: the
    ``comparison_section`` and where it came from."""
    return f"{comparison}\n\n(From `{root}`, {runs} runs.)"
