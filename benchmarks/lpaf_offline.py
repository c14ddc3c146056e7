"""LPAF's projection choices without training: prune the dense fine-tuned model by magnitude
(one shot), factorize the pruned matrices with ``LPAFConfig``'s projection, evaluate.

For each sparsity, allocation (uniform / global / global normalized) and EM setting (sparsity-
aware SVD with EM, or the plain SVD of the pruned matrix) it reports the dev metric, the mean
masked relative error the EM minimizes, and the mean plain relative error
``||M * W - A B|| / ||M * W||`` (what the network sees: the factors' values at pruned entries
count). Direct low-rank of the unpruned model is the first row.

Usage: python benchmarks/lpaf_offline.py DENSE_RUN --task sst2 [--ratio 0.25]
    [--sparsities 0.5 0.75] [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from factorlab.methods import LowRankConfig, LPAFConfig, factorize_, factorized_modules
from factorlab.models import load_model, load_tokenizer
from factorlab.targets import select_targets
from factorlab.tasks import get_task, load_split
from factorlab.training import EncodedSplit, evaluate
from factorlab.training.pruning import top_k_mask

EM_VARIANTS = ((0, 0.0), (10, 0.0), (10, 0.5), (10, 0.9))
"""(EM iterations, weight of the pruned entries) of the sparsity-aware SVD tried per sparsity."""


def plain_error(model: torch.nn.Module, pruned: dict[str, torch.Tensor]) -> float:
    layers = factorized_modules(model)
    errors = [
        (
            torch.linalg.matrix_norm(layers[n].to_dense().detach() - w)
            / torch.linalg.matrix_norm(w)
        ).item()
        for n, w in pruned.items()
        if n in layers
    ]
    return sum(errors) / max(len(errors), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dense", help="a dense run folder fine-tuned on --task")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task)
    tokenizer = load_tokenizer(args.dense)
    dev = EncodedSplit(load_split(task, "dev", args.data_dir), tokenizer, 128)
    base = load_model(args.dense, num_labels=task.num_labels, regression=task.is_regression)
    rows = []

    def record(label: str, model: torch.nn.Module, report, pruned) -> None:
        metric = evaluate(model, dev, tokenizer, 128)[task.main_metric]
        masked = sum(m.rel_error for m in report.modules) / len(report.modules)
        row = {
            "variant": label,
            "metric": metric,
            "masked_rel_error": masked,
            "plain_rel_error": plain_error(model, pruned),
            "ranks": [m.rank for m in report.modules],
        }
        rows.append(row)
        print(
            f"{label:44} {100 * metric:6.2f}  masked err {masked:.3f}  plain err "
            f"{row['plain_rel_error']:.3f}  ranks {min(row['ranks'])}-{max(row['ranks'])}",
            flush=True,
        )

    model = copy.deepcopy(base)
    weights = {t.name: t.weight.detach().clone() for t in select_targets(model)}
    record("low-rank (no pruning)", model, factorize_(model, LowRankConfig(args.ratio)), weights)
    for sparsity in args.sparsities:
        variants = [("uniform", False, em, lam) for em, lam in EM_VARIANTS]
        variants += [("global", False, 0, 0.0), ("global", True, 0, 0.0)]
        for allocation, normalize, em, pruned_weight in variants:
            model = copy.deepcopy(base)
            masks, pruned = {}, {}
            with torch.no_grad():
                for t in select_targets(model):
                    w = t.module.weight
                    masks[t.name] = top_k_mask(w.abs(), 1 - sparsity).bool()
                    w.mul_(masks[t.name])
                    pruned[t.name] = w.detach().clone()
            config = LPAFConfig(
                param_ratio=args.ratio,
                allocation=allocation,
                allocation_normalize=normalize,
                em_iterations=em,
                em_pruned_weight=pruned_weight,
            )
            report = factorize_(model, config, masks)
            label = (
                f"magnitude {sparsity:g}, {allocation}{' normalized' if normalize else ''}, "
                f"EM {em}" + (f" lambda {pruned_weight:g}" if em else "")
            )
            record(label, model, report, pruned)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
