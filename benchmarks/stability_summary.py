"""One table and one figure for several stability studies (``factorlab stability`` outputs).

Reads ``OUT_DIR/<study>/stability.json`` for each study (as ``benchmarks/stability_study.sh``
writes them) and prints a markdown table: one row per study and schedule with the training data,
optimizer steps, failed runs, every seed's dev metric, mean ± std of the runs that did not fail,
and the mean training time per run (seconds). With ``--plot``, it also writes a PNG with one
panel per study: every seed's metric for both schedules (failed runs as red crosses) and the
failure threshold (constant predictor + margin, METHODS.md §4).

Usage (from the repository root):

    python benchmarks/stability_summary.py runs/stability rte-high rte-low mrpc-high mrpc-low \\
        --plot docs/img/stability.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any


def load_study(out: Path, study: str) -> dict[str, Any]:
    path = out / study / "stability.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run benchmarks/stability_study.sh {out} {study}")
    return json.loads(path.read_text())


def describe_data(summary: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    examples = runs[0]["train_examples"] if runs else "?"
    fraction = summary["training"].get("train_fraction")
    share = f"{fraction:.0%}" if fraction else "all"
    return f"{share} ({examples})"


def table(summaries: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| study | method | train examples | steps | schedule | failed "
        "| dev metric of each seed (%) | mean ± std of the others | train s per run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for study, summary in summaries.items():
        for name, s in summary["schedules"].items():
            runs = s["runs"]
            metrics = ", ".join(f"{100 * r['metric']:.2f}" for r in runs)
            ok = s["num_runs"] - s["num_failed"]
            spread = "-"
            if s["mean"] is not None:
                spread = f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} (n={ok})"
            seconds = statistics.mean(r["train_seconds"] for r in runs) if runs else math.nan
            steps = sorted({r["steps"] for r in runs})
            lines.append(
                f"| {study} | {summary['method']} | {describe_data(summary, runs)} "
                f"| {'/'.join(map(str, steps))} | {name} | {s['num_failed']}/{s['num_runs']} "
                f"| {metrics} | {spread} | {seconds:.0f} |"
            )
    return "\n".join(lines)


def plot(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(summaries))
    rows = math.ceil(len(summaries) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    for ax, (study, summary) in zip(axes.flat, summaries.items(), strict=False):
        names = list(summary["schedules"])
        values = []
        for x, name in enumerate(names):
            runs = summary["schedules"][name]["runs"]
            for i, r in enumerate(runs):
                marker, color = ("x", "tab:red") if r["failed"] else ("o", "black")
                offset = 0.08 * (i - (len(runs) - 1) / 2)  # seeds side by side: ties stay visible
                ax.plot(x + offset, 100 * r["metric"], marker=marker, color=color, ms=5)
                values.append(100 * r["metric"])
            s = summary["schedules"][name]
            ax.annotate(
                f"{s['num_failed']}/{s['num_runs']} failed",
                (x, 0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=8,
            )
        runs = [r for s in summary["schedules"].values() for r in s["runs"]]
        if runs:
            threshold = 100 * (runs[0]["baseline"] + summary["failure"]["margin"])
            ax.axhline(threshold, ls="--", color="tab:red", lw=1)
            values.append(threshold)
            ax.set_ylim(min(values) - 4, max(values) + 2)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(f"dev {summary['main_metric']} (%)", fontsize=8)
        ax.set_title(f"{study} ({summary['method']})", fontsize=9)
    for ax in axes.flat[len(summaries) :]:
        ax.axis("off")
    fig.suptitle("param_ratio 0.25; dashed: failure threshold", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder holding one subfolder per study")
    parser.add_argument("studies", nargs="+", help="study names, e.g. rte-high mrpc-low")
    parser.add_argument("--plot", type=Path, help="write a PNG with one panel per study here")
    args = parser.parse_args()
    summaries = {study: load_study(args.out, study) for study in args.studies}
    print(table(summaries))
    if args.plot:
        plot(summaries, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
