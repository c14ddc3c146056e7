"""The stability study: staged vs simultaneous factorization over several seeds (METHODS.md §4).

Source: Gupta, Mahdipour Saravani, Sadayappan, Srikumar, "An Empirical Investigation of Matrix
Factorization Methods for Pre-trained Transformers", arXiv 2406.11307, 2024 [G24], Fig. 3 and 4:
projecting every layer at once and then fine-tuning fails for some seeds; staged factorization
is meant to fix that. For one (method, param_ratio, task, amount of training data) the study runs
both schedules for every seed, counts the failed runs and summarizes the others.

A run **fails** when its dev main metric (fraction units) is no better than the constant
prediction baseline plus 1 point: ``metric <= baseline + 0.01`` (``is_failed``). The baseline is
the better of the two constant predictors the metric allows us to name without training: the
majority class of the run's training examples (``baseline_score`` on them, METHODS.md's
"majority-class baseline") and the majority class of the dev set (the best constant predictor for
accuracy). Taking the better one means a run that collapsed to a constant prediction counts as
failed whichever class it chose (RTE's train and dev majorities can differ on a small subset).

Every run is an ordinary run folder (checkpoint + ``results.json``) under ``<output>/runs/``,
named by its schedule, seed and a hash of ``RunConfig.to_dict()``; a run whose folder already
holds a ``results.json`` with the same config is not run again, so an interrupted study resumes
where it stopped. The study writes ``stability.json`` and ``stability.png`` to ``<output>``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factorlab.errors import ConfigError
from factorlab.io import write_json_atomic
from factorlab.runs import (
    RESULTS_FILE,
    PreparedRun,
    RunConfig,
    execute,
    prepare_run,
    training_split,
    versions,
)
from factorlab.tasks import baseline_score, get_task, load_split
from factorlab.training import StagedSchedule, TrainingConfig

SCHEDULES = ("simultaneous", "staged")
STUDY_FILE = "stability.json"
PLOT_FILE = "stability.png"
FAILURE_MARGIN = 0.01
"""One point of the dev metric, in fraction units (METHODS.md §4)."""


def is_failed(metric: float, baseline: float, margin: float = FAILURE_MARGIN) -> bool:
    """Whether a run failed: its metric is no better than ``baseline + margin``.

    Args:
        metric: the run's dev main metric, fraction units (0.53, not 53).
        baseline: the constant-prediction baseline's score on the same split, fraction units.
        margin: how much better than the baseline a run must be (default 0.01 = one point).

    Returns:
        ``True`` when ``metric <= baseline + margin``, or when ``metric`` is not finite (NaN: a
        diverged run).
    """
    return not (math.isfinite(metric) and metric > baseline + margin)


def config_hash(config: RunConfig) -> str:
    """12 hex digits of the SHA-256 of ``config.to_dict()`` (sorted-key JSON)."""
    text = json.dumps(config.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class StabilityStudy:
    """One study: both schedules x ``seeds`` for one method, ratio, task and data amount.

    Attributes:
        output: the study folder (``runs/``, ``stability.json``, ``stability.png``).
        task: GLUE task name.
        method: registered method name (``"low-rank"``, ``"monarch"``...).
        method_options: its config options (``{"param_ratio": 0.25}``).
        seeds: the training seeds; each seeds head initialization, data order, dropout and the
            training subset (``train_fraction`` / ``train_samples``), the same for both schedules.
        training: the recipe; its ``seed`` is replaced by each seed.
        schedule: the staged schedule (the simultaneous runs ignore it).
        model / data_dir: as in ``RunConfig``.
        margin: failure margin over the baseline, fraction units.
    """

    output: str
    task: str
    method: str = "low-rank"
    method_options: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: list(range(5)))
    training: TrainingConfig = field(default_factory=TrainingConfig)
    schedule: StagedSchedule = field(default_factory=StagedSchedule)
    model: str | None = None
    data_dir: str | None = None
    margin: float = FAILURE_MARGIN

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"margin must be in [0, 1) (fraction units), got {self.margin}")

    def run_configs(self) -> list[tuple[str, int, RunConfig]]:
        """``(schedule, seed, RunConfig)`` for every run, simultaneous first, seeds in order."""
        runs = []
        for schedule in SCHEDULES:
            for seed in self.seeds:
                config = RunConfig(
                    output="",
                    model=self.model,
                    task=self.task,
                    data_dir=self.data_dir,
                    method=self.method,
                    method_options=dict(self.method_options),
                    training=dataclasses.replace(self.training, seed=seed),
                    staged=self.schedule if schedule == "staged" else None,
                )
                config.output = str(
                    Path(self.output) / "runs" / f"{schedule}-seed{seed}-{config_hash(config)}"
                )
                runs.append((schedule, seed, config))
        return runs


def cached_results(config: RunConfig) -> dict[str, Any] | None:
    """The ``results.json`` of ``config.output`` if it holds this very run, else ``None``."""
    path = Path(config.output) / RESULTS_FILE
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    expected = json.loads(json.dumps(config.to_dict()))  # as stored: tuples become lists
    return results if results.get("config") == expected else None


def _remove_partials(config: RunConfig) -> None:
    """Remove temporaries that a killed ``execute`` of this run left beside its folder."""
    out = Path(config.output)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def constant_baselines(
    task: str, data_dir: str | None, training: TrainingConfig
) -> dict[str, float]:
    """Scores of the constant predictors on the first dev split (fraction units).

    Returns:
        ``{"train_majority": ..., "dev_majority": ..., "baseline": max of the two}``; the training
        labels are those of the run's training examples (``runs.training_split``).
    """
    spec = get_task(task)
    train_labels = training_split(spec, data_dir, training).labels
    dev_labels = load_split(spec, spec.eval_splits[0], data_dir).labels
    scores = {
        "train_majority": baseline_score(spec, train_labels, dev_labels),
        "dev_majority": baseline_score(spec, dev_labels, dev_labels),
    }
    return scores | {"baseline": max(scores.values())}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Failed fraction and mean / sample standard deviation of the non-failed runs' metric.

    ``std`` is 0.0 for a single non-failed run; ``mean`` and ``std`` are ``None`` when all failed.
    """
    ok = [r["metric"] for r in runs if not r["failed"]]
    return {
        "num_runs": len(runs),
        "num_failed": len(runs) - len(ok),
        "failed_fraction": (len(runs) - len(ok)) / len(runs) if runs else None,
        "mean": statistics.mean(ok) if ok else None,
        "std": (statistics.stdev(ok) if len(ok) > 1 else 0.0) if ok else None,
        "runs": list(runs),
    }


def run_study(
    study: StabilityStudy,
    progress: bool = False,
    log: Callable[[str], None] = print,
    run_fn: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``study`` and write ``stability.json`` and ``stability.png``.

    Every run is checked (``prepare_run``) before the first one starts. Runs whose folder already
    holds their results are read back, not repeated.

    Args:
        study: what to run.
        progress: progress bars during training.
        log: receives one line per run.
        run_fn: executes one prepared run (default ``runs.execute``; tests count calls with it).

    Returns:
        The content of ``stability.json``: the study's settings, ``"schedules"``: per schedule
        ``{num_runs, num_failed, failed_fraction, mean, std, runs: [{seed, metric, baseline,
        failed, path, seconds}]}`` (metrics in fraction units, seconds of wall clock per run),
        ``"executed"``: how many runs this call ran (the others came from the cache).

    Raises:
        ConfigError, DataError, OutputExistsError: bad settings, missing data, or a run folder
            holding something else; raised before any run starts.
    """
    run_fn = run_fn or execute
    planned = study.run_configs()
    prepared: list[tuple[str, int, PreparedRun]] = []
    for schedule, seed, config in planned:
        prepared.append((schedule, seed, prepare_run(config)))
    spec = get_task(study.task)
    baselines = {
        seed: constant_baselines(
            spec.name, study.data_dir, dataclasses.replace(study.training, seed=seed)
        )
        for seed in study.seeds
    }

    per_schedule: dict[str, list[dict[str, Any]]] = {s: [] for s in SCHEDULES}
    executed = 0
    for i, (schedule, seed, run) in enumerate(prepared, start=1):
        results = cached_results(run.config)
        where = "cached"
        if results is None:
            _remove_partials(run.config)
            start = time.perf_counter()
            results = run_fn(run, progress=progress, log=log)
            executed += 1
            where = f"ran in {time.perf_counter() - start:.0f}s"
        metric = float(results["metrics"][results["main_metric"]])
        base = baselines[seed]
        failed = is_failed(metric, base["baseline"], study.margin)
        per_schedule[schedule].append(
            {
                "seed": seed,
                "metric": metric,
                "baseline": base["baseline"],
                "failed": failed,
                "path": run.config.output,
                "seconds": sum(results["timings"].values()),
                "train_seconds": results["timings"].get("train"),
                "train_examples": results["train"].get("examples"),
                "steps": results["train"].get("steps"),
            }
        )
        log(
            f"[{i}/{len(prepared)}] {schedule} seed {seed}: {spec.main_metric} {metric:.4f} "
            f"(baseline {base['baseline']:.4f}){' FAILED' if failed else ''} ({where})"
        )

    summary = {
        "task": spec.name,
        "main_metric": spec.main_metric,
        "method": study.method,
        "method_options": study.method_options,
        "model": study.model or "embedded:all-MiniLM-L6-v2",
        "seeds": study.seeds,
        "training": {k: v for k, v in dataclasses.asdict(study.training).items() if k != "seed"},
        "staged": study.schedule.to_dict(),
        "failure": {
            "rule": "failed when metric <= baseline + margin (METHODS.md §4)",
            "margin": study.margin,
            "baseline": "max(train-majority, dev-majority constant predictor)",
            "baselines_per_seed": {str(s): b for s, b in baselines.items()},
        },
        "schedules": {s: summarize(r) for s, r in per_schedule.items()},
        "executed": executed,
        "versions": versions(),
    }
    out = Path(study.output)
    write_json_atomic(out / STUDY_FILE, summary)
    plot_study(summary, out / PLOT_FILE)
    return summary


def plot_study(summary: dict[str, Any], path: str | Path) -> Path:
    """Bar plot of a study: failed fraction per schedule, and mean ± std (percent) of the
    non-failed runs with every run's metric as a dot (failed runs as red crosses).

    The dashed line on the right panel is the failure threshold (baseline + margin) of the first
    seed. Writes a PNG to ``path`` (atomically) and returns it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["schedules"])
    stats = [summary["schedules"][n] for n in names]
    fig, (ax_fail, ax_metric) = plt.subplots(1, 2, figsize=(8, 3.6))
    fractions = [s["failed_fraction"] or 0.0 for s in stats]
    bars = ax_fail.bar(names, fractions, color=["tab:gray", "tab:blue"][: len(names)])
    for bar, s in zip(bars, stats, strict=True):
        ax_fail.annotate(
            f"{s['num_failed']}/{s['num_runs']}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    ax_fail.set_ylim(0, 1.1)
    ax_fail.set_ylabel("failed fraction")
    ax_fail.set_title("failed runs")

    means = [100 * s["mean"] if s["mean"] is not None else 0.0 for s in stats]
    stds = [100 * s["std"] if s["std"] is not None else 0.0 for s in stats]
    ax_metric.bar(names, means, yerr=stds, capsize=6, color=["tab:gray", "tab:blue"][: len(names)])
    for x, s in enumerate(stats):
        if s["mean"] is None and s["runs"]:
            ax_metric.annotate(
                "all failed",
                (x, 0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                xytext=(0, 4),
                textcoords="offset points",
                color="tab:red",
            )
        for r in s["runs"]:
            style = ("x", "tab:red") if r["failed"] else ("o", "black")
            ax_metric.plot(x, 100 * r["metric"], marker=style[0], color=style[1], ms=4)
    runs = [r for s in stats for r in s["runs"]]
    if runs:
        threshold = 100 * (runs[0]["baseline"] + summary["failure"]["margin"])
        ax_metric.axhline(threshold, ls="--", color="tab:red", lw=1, label="failure threshold")
        ax_metric.legend(loc="upper right", fontsize=7)
        values = [100 * r["metric"] for r in runs if math.isfinite(r["metric"])]
        values += [threshold] + [m + d for m, d in zip(means, stds, strict=True) if m]
        ax_metric.set_ylim(max(0.0, min(values) - 5), min(105.0, max(values) + 5))
    ax_metric.set_ylabel(f"dev {summary['main_metric']} (%)")
    ax_metric.set_title("non-failed runs: mean ± std (dots: runs)")

    training = summary["training"]
    data = (
        f"{training['train_fraction']:.0%} of train"
        if training.get("train_fraction")
        else f"{training['train_samples']} train examples"
        if training.get("train_samples")
        else "full train"
    )
    ratio = summary["method_options"].get("param_ratio")
    fig.suptitle(
        f"{summary['task']}: {summary['method']} param_ratio {ratio}, {data}, "
        f"{len(summary['seeds'])} seeds",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table: schedule, failed runs, mean ± std (percent) of the others."""
    rows = [("schedule", "failed", f"{summary['main_metric']} (%) of non-failed")]
    for name, s in summary["schedules"].items():
        ok = s["num_runs"] - s["num_failed"]
        value = (
            "-" if s["mean"] is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} (n={ok})"
        )
        rows.append((name, f"{s['num_failed']}/{s['num_runs']}", value))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
