"""The ``factorlab`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from factorlab.errors import FactorlabError

EXIT_USAGE = 2


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    from factorlab.training import TrainingConfig

    d = TrainingConfig()
    g = parser.add_argument_group("fine-tuning (with --task)")
    g.add_argument("--task", help="GLUE task to fine-tune and evaluate on (sst2, mrpc, rte, ...)")
    g.add_argument("--data-dir", help="GLUE folder (<dir>/SST-2/train.tsv ...); default: $GLUE_DIR")
    g.add_argument("--epochs", type=float, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--max-steps", type=int, help="optimizer steps, overrides --epochs")
    g.add_argument(
        "--learning-rate", type=float, default=d.learning_rate, help=f"default {d.learning_rate}"
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument(
        "--max-seq-length",
        type=int,
        default=d.max_seq_length,
        help=f"tokens, default {d.max_seq_length}",
    )
    g.add_argument(
        "--warmup-ratio", type=float, default=d.warmup_ratio, help=f"default {d.warmup_ratio}"
    )
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    g.add_argument(
        "--train-samples", type=int, help="train on a seeded random subset of this many examples"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _training_config(args: argparse.Namespace) -> Any:
    from factorlab.training import TrainingConfig

    return TrainingConfig(
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        max_seq_length=args.max_seq_length,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        seed=args.seed,
        train_samples=args.train_samples,
    )


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"param_ratio": args.param_ratio}
    if args.nblocks is not None:
        options["nblocks"] = args.nblocks
    if args.target_modules:
        options["target_modules"] = args.target_modules
    if args.target_regex:
        if args.target_modules:
            raise _usage("--target-modules and --target-regex exclude each other; give one")
        options["target_modules"] = args.target_regex
    if args.exclude_modules:
        options["exclude_modules"] = args.exclude_modules
    return options


def _usage(message: str) -> FactorlabError:
    from factorlab.errors import ConfigError

    return ConfigError(message)


def _print_summary(results: dict[str, Any], output: str) -> None:
    p = results["parameters"]
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in results["metrics"].items()) or "(no task)"
    rows = [
        ("method", results["method"]),
        ("param_ratio", f"{results['param_ratio']}"),
        ("task", results["task"] or "-"),
        ("metrics", metrics),
        ("targeted params", f"{p['targeted_before']:,} -> {p['targeted_after']:,}"),
        ("model params", f"{p['model_before']:,} -> {p['model_after']:,}"),
        ("timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items())),
        ("saved to", output),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))


def cmd_compress(args: argparse.Namespace, method: str | None) -> int:
    from factorlab.runs import RunConfig, execute, prepare_run

    config = RunConfig(
        output=args.output,
        model=args.model,
        task=args.task,
        data_dir=args.data_dir,
        method=method,
        method_options=_method_options(args) if method else {},
        training=_training_config(args),
    )
    run = prepare_run(config, overwrite=args.overwrite)
    results = execute(run, progress=not args.no_progress)
    _print_summary(results, args.output)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from factorlab.checkpoint import read_spec
    from factorlab.models import load_model, load_tokenizer
    from factorlab.tasks import check_task_available, get_task, load_split
    from factorlab.training import EncodedSplit, evaluate

    read_spec(args.checkpoint)
    task = get_task(args.task)
    check_task_available(task, args.data_dir, splits=task.eval_splits)
    model = load_model(args.checkpoint, num_labels=task.num_labels, regression=task.is_regression)
    tokenizer = load_tokenizer(args.checkpoint)
    metrics: dict[str, float] = {}
    for i, split in enumerate(task.eval_splits):
        data = EncodedSplit(load_split(task, split, args.data_dir), tokenizer, args.max_seq_length)
        scores = evaluate(model, data, tokenizer, args.eval_batch_size)
        metrics.update({(k if i == 0 else f"{split}/{k}"): v for k, v in scores.items()})
    print(
        json.dumps({"checkpoint": args.checkpoint, "task": task.name, "metrics": metrics}, indent=2)
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from factorlab.checkpoint import read_spec
    from factorlab.runs import RESULTS_FILE

    spec = read_spec(args.checkpoint)
    method = spec.get("method") or {"method": "dense"}
    print(f"checkpoint    {args.checkpoint}")
    print(f"architecture  {spec['architecture']} ({spec.get('model_type')})")
    print(f"method        {json.dumps(method)}")
    modules = spec["modules"]
    print(f"factorized    {len(modules)} modules")
    for name, layer in modules.items():
        extra = {
            k: v
            for k, v in layer.items()
            if k not in ("kind", "in_features", "out_features", "bias", "source")
        }
        print(f"  {name}  {layer['kind']}  {layer['out_features']}x{layer['in_features']}  {extra}")
    results_path = __import__("pathlib").Path(args.checkpoint) / RESULTS_FILE
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        p = results["parameters"]
        print(
            f"parameters    targeted {p['targeted_before']:,} -> {p['targeted_after']:,}; "
            f"model {p['model_before']:,} -> {p['model_after']:,}"
        )
        print(f"task          {results['task']}  metrics {results['metrics']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from factorlab.bench.report import collect_results, results_table

    print(results_table(collect_results(args.runs)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from factorlab.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="factorlab",
        description="Compress pretrained transformers by factorizing their weight matrices.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="factorize a model; with --task, fine-tune and evaluate it")
    p.add_argument("--model", help="HF folder or Hub id; default: the embedded all-MiniLM-L6-v2")
    p.add_argument(
        "--method",
        default="low-rank",
        help=f"one of {', '.join(sorted(METHODS))} (default low-rank)",
    )
    p.add_argument(
        "--param-ratio",
        type=float,
        default=0.5,
        help="fraction of targeted parameters KEPT, in (0, 1]",
    )
    p.add_argument(
        "--nblocks", type=int, help="blocks per side for block methods (monarch, block-low-rank)"
    )
    p.add_argument(
        "--target-modules", nargs="+", help="module names (or name suffixes) to factorize"
    )
    p.add_argument("--target-regex", help="regex (full match) of module names to factorize")
    p.add_argument("--exclude-modules", nargs="+", help="module names (or suffixes) to leave dense")
    p.add_argument("--output", required=True, help="run folder: checkpoint + results.json")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an output folder holding another run"
    )
    _add_training_args(p)
    p.set_defaults(func=lambda a: cmd_compress(a, a.method))

    p = sub.add_parser("finetune", help="fine-tune a dense model (the baseline)")
    p.add_argument("--model", help="HF folder or Hub id; default: the embedded all-MiniLM-L6-v2")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    _add_training_args(p)
    p.set_defaults(func=lambda a: cmd_compress(a, None))

    p = sub.add_parser("evaluate", help="evaluate a saved checkpoint on a GLUE dev set")
    p.add_argument("checkpoint")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="what a checkpoint holds")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("report", help="markdown table of every results.json under a folder")
    p.add_argument("runs", help="folder holding run folders")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``factorlab``; user errors print one paragraph and return exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (
        getattr(args, "task", None) is None
        and getattr(args, "data_dir", None)
        and args.command != "evaluate"
    ):
        parser.error("--data-dir needs --task")
    try:
        return args.func(args)
    except FactorlabError as exc:
        print(f"factorlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
