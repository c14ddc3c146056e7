"""The rank study of LPAF (METHODS.md §7): are first-order (movement) pruned matrices of lower rank
than magnitude-pruned ones?

Reads the LPAF runs (``TASK-lpaf-*``) of ``benchmarks/lpaf_glue.sh``, whose ``results.json``
records every pruned matrix's ``rank_statistics`` at each probe sparsity reached while pruning
and after the final mask, and adds one-shot magnitude pruning of the dense fine-tuned model (no
training) at the same sparsities. For each task and pruning kind it reports, averaged over the
36 matrices, the numerical rank (singular values above 1e-3 s_max) and the rank holding 90% of
the energy, as fractions of the full rank, and plots them against sparsity.

Usage: python benchmarks/lpaf_rank_study.py OUT_DIR [--tasks sst2 mrpc]
Writes OUT_DIR/lpaf_rank_study.json and OUT_DIR/lpaf_rank_study.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from factorlab.checkpoint import is_checkpoint, load
from factorlab.models import load_model
from factorlab.targets import select_targets
from factorlab.training.pruning import rank_statistics, top_k_mask

SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)


def summarize(modules: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean numerical and 90%-energy rank over matrices, as fractions of each full rank."""
    n = max(len(modules), 1)
    return {
        "numerical_rank": sum(s["numerical_rank"] / s["full_rank"] for s in modules.values()) / n,
        "energy_rank": sum(s["energy_rank"] / s["full_rank"] for s in modules.values()) / n,
        "matrices": len(modules),
    }


def one_shot_magnitude(dense_dir: Path, sparsities: tuple[float, ...]) -> dict[float, dict]:
    model = load(dense_dir) if is_checkpoint(dense_dir) else load_model(str(dense_dir))
    out = {}
    for sparsity in sparsities:
        stats = {}
        for target in select_targets(model):
            weight = target.weight.detach()
            mask = top_k_mask(weight.abs(), 1.0 - sparsity)
            stats[target.name] = rank_statistics(weight * mask)
        out[sparsity] = summarize(stats)
    return out


def from_run(run_dir: Path) -> dict[float, dict]:
    results = json.loads((run_dir / "results.json").read_text())
    pruning = results["train"]["state"]["pruning"]
    points = {round(p["sparsity"], 4): summarize(p["modules"]) for p in pruning["rank_probes"]}
    points[round(pruning["sparsity"], 4)] = summarize(pruning["final_ranks"])
    return dict(sorted(points.items()))


def pruning_label(run_dir: Path) -> str:
    """``movement (scores from |W|), from fine-tuned`` and the like, from the run's
    config: the pruning kind, the scores' start, and whether pruning ran during the task's
    fine-tuning from the pretrained model (``--model`` left at its default) or after it."""
    results = json.loads((run_dir / "results.json").read_text())
    config = results["factorization"]["config"]
    kind = config["pruning"]
    if kind != "magnitude":
        kind += " (scores from |W|)" if config.get("score_init") == "magnitude" else " (scores 0)"
    start = "from pretrained" if results["model"].startswith("embedded:") else "from fine-tuned"
    return f"{kind}, {start}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    study: dict[str, dict[str, dict]] = {}
    for task in args.tasks:
        dense = args.out / f"{task}-dense"
        if not dense.is_dir():
            continue
        lines = {"magnitude, one-shot (no training)": one_shot_magnitude(dense, SPARSITIES)}
        for run in sorted(args.out.glob(f"{task}-lpaf-*/results.json")):
            lines.setdefault(pruning_label(run.parent), {}).update(from_run(run.parent))
        study[task] = {k: dict(sorted(v.items())) for k, v in lines.items()}

    (args.out / "lpaf_rank_study.json").write_text(
        json.dumps(
            {
                t: {k: {str(s): v for s, v in line.items()} for k, line in lines.items()}
                for t, lines in study.items()
            },
            indent=2,
        )
    )
    print(f"{'task':6} {'pruning':44} {'sparsity':>8} {'num. rank':>9} {'90% rank':>8}")
    for task, lines in study.items():
        for kind, line in lines.items():
            for sparsity, s in line.items():
                print(
                    f"{task:6} {kind:44} {sparsity:8.3f} {s['numerical_rank']:9.3f} "
                    f"{s['energy_rank']:8.3f}"
                )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(
        axes,
        ("numerical_rank", "energy_rank"),
        ("numerical rank (s > 1e-3 s_max)", "rank holding 90% of the energy"),
        strict=True,
    ):
        for task, lines in study.items():
            for kind, line in lines.items():
                xs = list(line)
                ax.plot(xs, [line[x][key] for x in xs], marker="o", label=f"{task}: {kind}")
        ax.set_title(title)
        ax.set_xlabel("sparsity (fraction of weights removed)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rank / full rank (mean over 36 matrices)")
    axes[1].legend(fontsize=7)
    fig.suptitle("MiniLM fine-tuned on GLUE: rank of pruned matrices")
    fig.tight_layout()
    fig.savefig(args.out / "lpaf_rank_study.png", dpi=120)
    print(f"wrote {args.out}/lpaf_rank_study.json and .png")


if __name__ == "__main__":
    main()
