"""The ``factorlab`` command: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from factorlab.errors import FactorlabError

EXIT_USAGE = 2


TRAINING_FLAGS = {  # TrainingConfig field -> help (its default is appended)
    "epochs": "passes over the training set",
    "learning_rate": "peak AdamW learning rate",
    "batch_size": "examples per optimizer step over all processes",
    "gradient_accumulation_steps": "micro-batches per optimizer step on each process (the batch "
    "size stays the examples per step)",
    "eval_batch_size": "examples per evaluation batch",
    "max_seq_length": "tokens per example",
    "warmup_ratio": "fraction of the steps warming the learning rate up",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
}


def _add_training_args(
    parser: argparse.ArgumentParser, seed: bool = True, distill: bool = True
) -> None:
    from factorlab.training.config import TrainingConfig

    d = TrainingConfig()
    g = parser.add_argument_group("fine-tuning (with --task)")
    g.add_argument("--task", help="GLUE task to fine-tune and evaluate on (sst2, mrpc, rte, ...)")
    g.add_argument("--data-dir", help="GLUE folder (<dir>/SST-2/train.tsv ...); default: $GLUE_DIR")
    g.add_argument("--max-steps", type=int, help="optimizer steps, overrides --epochs")
    for name, text in (
        TRAINING_FLAGS | ({"seed": "seeds head, data order, dropout"} if seed else {})
    ).items():
        value = getattr(d, name)
        g.add_argument(
            "--" + name.replace("_", "-"),
            type=type(value),
            default=value,
            help=f"{text}, default {value}",
        )
    g.add_argument(
        "--factor-weight-decay",
        type=float,
        help="weight decay of factor matrices (a nuclear-norm-like penalty on their product), "
        "default: --weight-decay",
    )
    g.add_argument(
        "--train-samples", type=int, help="train on a seeded random subset of this many examples"
    )
    g.add_argument(
        "--train-fraction",
        type=float,
        help="train on a seeded random subset of this fraction of the examples, in (0, 1]",
    )
    g.add_argument(
        "--group-by-length",
        action="store_true",
        help="batches of examples of similar length: less padding, another data order",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if not distill:
        return
    g = parser.add_argument_group("distillation from a teacher (METHODS.md §10)")
    g.add_argument(
        "--teacher",
        help="folder of a model fine-tuned on the task (e.g. a `factorlab finetune` output)",
    )
    g.add_argument(
        "--distill-alpha",
        type=float,
        help="weight of the distillation loss; the task loss gets 1 - alpha; default 0.5",
    )
    g.add_argument(
        "--distill-temperature", type=float, help="softmax temperature of the KL term, default 2"
    )
    g.add_argument(
        "--distill-hidden",
        type=float,
        help="weight of the per-block hidden-state MSE (same depth and width), default 0 (off)",
    )


def _distillation(args: argparse.Namespace) -> Any:
    from factorlab.training.config import DistillationConfig

    options = {
        key: value
        for key, value in (
            ("alpha", args.distill_alpha),
            ("temperature", args.distill_temperature),
            ("hidden_weight", args.distill_hidden),
        )
        if value is not None
    }
    if args.teacher is None:
        if options:
            raise _usage(
                "--distill-alpha, --distill-temperature and --distill-hidden need --teacher"
            )
        return None
    return DistillationConfig(teacher=args.teacher, **options)


def _training_config(args: argparse.Namespace) -> Any:
    from factorlab.training.config import TrainingConfig

    fields = [*TRAINING_FLAGS, "seed", "max_steps", "factor_weight_decay"]
    fields += ["train_samples", "train_fraction", "group_by_length"]
    return TrainingConfig(**{name: getattr(args, name) for name in fields})


def _add_staged_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("staged factorization (METHODS.md §4)")
    g.add_argument("--stage-order", choices=["top-down", "bottom-up"], help="default top-down")
    g.add_argument("--blocks-per-stage", type=int, help="transformer blocks per stage, default 1")


def _staged_schedule(args: argparse.Namespace, staged: bool) -> Any:
    from factorlab.training import StagedSchedule

    options = {
        k: v
        for k, v in (("order", args.stage_order), ("blocks_per_stage", args.blocks_per_stage))
        if v is not None
    }
    if not staged:
        if options:
            raise _usage("--stage-order and --blocks-per-stage need --staged")
        return None
    return StagedSchedule(**options)


def _add_calibration_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("calibration (fwsvd, act-svd; METHODS.md §5)")
    g.add_argument(
        "--calibration-task",
        help="GLUE task whose training split calibrates (labelled; default: --task)",
    )
    g.add_argument(
        "--calibration-file",
        help="text file, one example per line (no labels: act-svd's Gram statistics only)",
    )
    g.add_argument(
        "--calibration-samples", type=int, help="seeded random subset of examples, default 512"
    )
    g.add_argument(
        "--fisher-axis",
        choices=["out", "in"],
        help="fwsvd: weigh output rows (default) or input columns",
    )


def _add_runtime_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--runtime",
        choices=["torch", "onnxruntime"],
        default="torch",
        help=f"torch (eager, default) or onnxruntime: exported to ONNX, verified against "
        f"PyTorch, then {what} in ONNX Runtime",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="with --runtime onnxruntime: dynamic int8 quantization of the weight MatMuls",
    )


def _add_option_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="any other option of the method's config, repeatable (e.g. --option epochs=10 "
        "--option sharing=per-matrix for autoencoder, --option eps=0.01 for act-svd)",
    )


def _calibration(args: argparse.Namespace) -> Any:
    from factorlab.calibration import CalibrationConfig

    task, file, samples = args.calibration_task, args.calibration_file, args.calibration_samples
    if task is None and file is None and samples is None:
        return None
    return CalibrationConfig(task=task, file=file, samples=512 if samples is None else samples)


METHOD_FLAGS = ("sparsity", "pruning", "mixed_rank_q", "basis_size", "nnz_per_row", "groups")
"""Compress flags of one method (LPAF, DSFormer) that set its config field of the same name."""


def _add_lpaf_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LPAF (--method lpaf: prune, factorize, fine-tune with mixed ranks)")
    g.add_argument(
        "--sparsity",
        type=float,
        help="fraction of each targeted weight REMOVED by pruning, default 0.5",
    )
    g.add_argument(
        "--pruning",
        choices=["movement", "soft-movement", "magnitude"],
        help="pruning while fine-tuning, default movement",
    )
    g.add_argument(
        "--mixed-rank-q",
        type=float,
        help="initial probability of a layer's sparse full-rank path, annealed to 0 over the "
        "first half of fine-tuning; 0 turns mixed-rank training off (default 0.5)",
    )


def _add_dsformer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DSFormer (--method dsformer: dense basis x s-sparse coefficients)")
    g.add_argument(
        "--basis-size", type=int, metavar="K", help="rows of each dense basis, default: budget"
    )
    g.add_argument(
        "--nnz-per-row", type=int, metavar="S", help="non-zeros per row of C, default: budget"
    )
    g.add_argument(
        "--groups", type=int, metavar="G", help="row groups with their own basis, default 1"
    )


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"param_ratio": args.param_ratio}
    if args.nblocks is not None:
        options["nblocks"] = args.nblocks
    if getattr(args, "fisher_axis", None) is not None:
        options["fisher_axis"] = args.fisher_axis
    if args.target_modules:
        options["target_modules"] = args.target_modules
    if args.target_regex:
        if args.target_modules:
            raise _usage("--target-modules and --target-regex exclude each other; give one")
        options["target_modules"] = args.target_regex
    if args.exclude_modules:
        options["exclude_modules"] = args.exclude_modules
    if getattr(args, "allocation", None) is not None:
        options["allocation"] = args.allocation
    if getattr(args, "sensitivity_samples", None) is not None:
        options["sensitivity_samples"] = args.sensitivity_samples
    if getattr(args, "sensitivity_fractions", None) is not None:
        options["sensitivity_fractions"] = args.sensitivity_fractions
    if getattr(args, "sensitivity_interpolation", None) is not None:
        options["sensitivity_interpolation"] = args.sensitivity_interpolation
    if getattr(args, "sequential", False):
        options["sequential"] = True
    if getattr(args, "compensate", False):
        options["compensate"] = True
    for flag in METHOD_FLAGS:
        if getattr(args, flag, None) is not None:
            options[flag] = getattr(args, flag)
    for item in getattr(args, "option", None) or []:
        key, value = _parse_option(item)
        if key in options:
            raise _usage(f"--option {item}: {key} is already set (by its own flag or twice)")
        options[key] = value
    return options


def _parse_option(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value); the value is read as JSON (``10``, ``1e-2``, ``true``,
    ``[1, 2]``) when it parses, else kept as text (``per-matrix``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise _usage(f"--option takes KEY=VALUE (e.g. --option epochs=10), got {item!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return key.strip().replace("-", "_"), value


def _usage(message: str) -> FactorlabError:
    from factorlab.errors import ConfigError

    return ConfigError(message)


def _print_summary(results: dict[str, Any], output: str) -> None:
    p = results["parameters"]
    metrics = ", ".join(f"{k}={v:.4f}" for k, v in results["metrics"].items()) or "(no task)"
    rows = [
        ("method", results["method"]),
        ("param_ratio", f"{results['param_ratio']}"),
        ("schedule", results.get("schedule") or "-"),
        ("distillation", _describe_distillation(results["train"].get("distillation"))),
        ("processes", str(results["train"].get("num_processes", "-"))),
        ("task", results["task"] or "-"),
        ("metrics", metrics),
        ("targeted params", f"{p['targeted_before']:,} -> {p['targeted_after']:,}"),
        *(
            [("targeted bytes", f"{p['targeted_bytes_before']:,} -> {p['targeted_bytes_after']:,}")]
            if "targeted_bytes_after" in p
            else []
        ),
        ("model params", f"{p['model_before']:,} -> {p['model_after']:,}"),
        ("timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items())),
        ("saved to", output),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    task = f" --task {results['task']}" if results["task"] else " --task TASK"
    commands = [
        (f"factorlab evaluate {output}{task}", "dev metrics again, from the checkpoint"),
        (f"factorlab bench {output}", "latency and memory against dense"),
        (f"factorlab info {output}", "method, per-module ranks, parameters"),
    ]
    width = max(len(c) for c, _ in commands)
    print("next:\n" + "\n".join(f"  {c.ljust(width)}  # {why}" for c, why in commands))


def _describe_distillation(distillation: dict[str, Any] | None) -> str:
    if not distillation:
        return "-"
    return (
        f"from {distillation['teacher']} (alpha {distillation['alpha']}, "
        f"T {distillation['temperature']}, hidden {distillation['hidden_weight']})"
    )


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
        staged=_staged_schedule(args, args.staged) if method else None,
        calibration=_calibration(args) if method else None,
        distillation=_distillation(args),
    )
    run = prepare_run(config, overwrite=args.overwrite)
    results = execute(run, progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:
        _print_summary(results, args.output)
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from factorlab.stability import StabilityStudy, format_summary, run_study

    if args.task is None:
        raise _usage("stability needs --task")
    if args.seeds < 1:
        raise _usage(f"--seeds must be >= 1, got {args.seeds}")
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    args.seed = seeds[0]
    options = _method_options(args)
    ratio = f"{args.param_ratio:g}"
    data = f"-frac{args.train_fraction:g}" if args.train_fraction else ""
    output = args.output or f"runs/stability/{args.task}-{args.method}-{ratio}{data}"
    study = StabilityStudy(
        output=output,
        task=args.task,
        method=args.method,
        method_options=options,
        seeds=seeds,
        training=_training_config(args),
        schedule=_staged_schedule(args, True),
        model=args.model,
        data_dir=args.data_dir,
    )
    summary = run_study(study, progress=not args.no_progress)
    print(format_summary(summary))
    print(f"wrote {output}/stability.json and {output}/stability.png")
    return 0


def _evaluate_perplexity(args: argparse.Namespace) -> int:
    from factorlab.checkpoint import check_weights, is_checkpoint, read_spec
    from factorlab.models import (
        check_causal_lm,
        load_causal_lm,
        load_tokenizer,
        max_tokens,
        resolve_model,
    )
    from factorlab.tasks.perplexity import check_windows, read_text, sliding_window_perplexity

    if args.text_file is None:
        raise _usage("--task perplexity needs --text-file F (a UTF-8 text to score)")
    if args.runtime != "torch":
        raise _usage("--task perplexity runs in PyTorch only; drop --runtime / --int8")
    path = resolve_model(args.checkpoint)
    if is_checkpoint(path):
        check_weights(path, read_spec(path))
    check_causal_lm(path)
    check_windows(args.seq_len, args.stride, max_tokens(path))
    text = read_text(args.text_file)
    model = load_causal_lm(path)
    tokenizer = load_tokenizer(path)
    tokenizer.model_max_length = 10**9  # one long sequence, scored in windows: no length warning
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    result = sliding_window_perplexity(
        model, ids, args.seq_len, args.stride, progress=not args.no_progress
    )
    record = {"checkpoint": args.checkpoint, "task": "perplexity", "text_file": args.text_file}
    print(json.dumps(record | {"metrics": result.to_dict()}, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.task == "perplexity":
        return _evaluate_perplexity(args)
    from factorlab.checkpoint import check_weights, is_checkpoint, read_spec
    from factorlab.models import (
        is_sequence_classifier,
        load_model,
        load_tokenizer,
        max_tokens,
        resolve_model,
    )
    from factorlab.tasks import check_task_available, get_task, load_split
    from factorlab.training import EncodedSplit, evaluate

    path = resolve_model(args.checkpoint)
    if is_checkpoint(path):
        check_weights(path, read_spec(path))
    elif not is_sequence_classifier(path):
        raise _usage(
            f"{args.checkpoint} is neither a factorlab checkpoint nor a Hugging Face sequence "
            "classifier, so it has no task head to evaluate. Fine-tune it first: factorlab "
            f"finetune --model {args.checkpoint} --task {args.task} --output DIR"
        )
    task = get_task(args.task)
    check_task_available(task, args.data_dir, splits=task.eval_splits)
    limit = max_tokens(path)
    if args.max_seq_length < 8 or (limit is not None and args.max_seq_length > limit):
        raise _usage(f"--max-seq-length must be in [8, {limit}], got {args.max_seq_length}")
    if args.eval_batch_size < 1:
        raise _usage(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    from factorlab.bench.onnx_runtime import check_runtime

    check_runtime(args.runtime, args.int8)
    model = load_model(args.checkpoint, num_labels=task.num_labels, regression=task.is_regression)
    tokenizer = load_tokenizer(args.checkpoint)
    exported = contextlib.nullcontext([None])
    if args.runtime == "onnxruntime":
        from factorlab.bench.onnx_runtime import deployed as deploy

        exported = deploy([model], tokenizer, args.int8)
    with exported as (deployed,):
        metrics: dict[str, float] = {}
        for i, split in enumerate(task.eval_splits):
            split_data = load_split(task, split, args.data_dir)
            data = EncodedSplit(split_data, tokenizer, args.max_seq_length)
            if deployed is None:
                scores = evaluate(model, data, tokenizer, args.eval_batch_size)
            else:
                from factorlab.bench.onnx_runtime import predict_onnx
                from factorlab.tasks import compute_metrics

                predictions = predict_onnx(deployed, data, tokenizer, args.eval_batch_size)
                scores = compute_metrics(task, predictions, data.labels)
            metrics.update({(k if i == 0 else f"{split}/{k}"): v for k, v in scores.items()})
    record = {"checkpoint": args.checkpoint, "task": task.name, "metrics": metrics}
    if args.runtime != "torch":
        record |= {"runtime": args.runtime, "int8": args.int8}
    print(json.dumps(record, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from factorlab.checkpoint import check_weights, read_spec
    from factorlab.runs import RESULTS_FILE

    spec = read_spec(args.checkpoint)
    check_weights(args.checkpoint, spec)
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
    results_path = Path(args.checkpoint) / RESULTS_FILE
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
    from factorlab.bench.report import (
        collect_benches,
        collect_results,
        results_table,
        task_baselines,
        write_report,
    )

    results = collect_results(args.runs)
    data_dir = args.data_dir or os.environ.get("GLUE_DIR")
    baselines = task_baselines(results, data_dir) if data_dir else None
    print(results_table(results, collect_benches(args.runs, results), baselines))
    written = write_report(args.runs, args.output, baselines, args.readme)
    print(f"wrote {written} (and its PNG plots)" + (f" and {args.readme}" if args.readme else ""))
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _usage(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise _usage(f"{what} must be positive integers, got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    from factorlab.bench.latency import bench, format_bench, load_for_bench, write_json
    from factorlab.models import max_tokens, resolve_model

    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    limit = max_tokens(resolve_model(args.model))
    if args.seq_len < 1 or (limit is not None and args.seq_len > limit):
        raise _usage(
            f"--seq-len must be between 1 and the model's {limit} positions, got {args.seq_len}"
        )
    for flag, value, low in (("--runs", args.runs, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise _usage(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise _usage(f"--threads must be >= 1, got {args.threads}")
    from factorlab.bench.onnx_runtime import check_runtime

    check_runtime(args.runtime, args.int8)
    model = load_for_bench(args.model)
    tokenizer = None
    if args.runtime == "onnxruntime":
        from factorlab.models import load_tokenizer

        tokenizer = load_tokenizer(resolve_model(args.model))
    result = bench(
        model,
        batch_sizes,
        seq_len=args.seq_len,
        threads=args.threads,
        runs=args.runs,
        warmup=args.warmup,
        memory=not args.no_memory,
        name=args.model or "embedded:all-MiniLM-L6-v2",
        runtime=args.runtime,
        int8=args.int8,
        tokenizer=tokenizer,
        profile=args.profile,
    )
    print(format_bench(result))
    if args.profile:
        print(f"\ntop operators, batch {max(batch_sizes)}:")
        print(result["profile"])
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from factorlab.bench.latency import load_for_bench
    from factorlab.export import export_onnx
    from factorlab.io import check_output_location
    from factorlab.models import load_tokenizer, resolve_model

    path = resolve_model(args.model)
    output = args.output or str(Path(path) / "model.onnx")
    check_output_location(output)
    model = load_for_bench(path)
    written = export_onnx(model, load_tokenizer(path), output, opset=args.opset)
    size = written.stat().st_size
    print(f"wrote {written} ({size / 2**20:.1f} MiB), checked against PyTorch in onnxruntime")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from factorlab.bench.sweep import parse_lane, run_sweep

    output = args.output or str(Path("runs") / Path(args.config).stem)
    lane = parse_lane(args.lane) if args.lane else None
    summary = run_sweep(
        args.config,
        output,
        progress=args.progress,
        lane=lane,
        methods=args.methods,
        record=args.record,
        tasks=args.tasks,
        param_ratios=args.param_ratios,
        seeds=args.seeds,
        bench_only=args.bench_only,
    )
    if args.bench_only:
        print(f"sweep {output}: {len(summary.benched)} benchmarked")
        return 0
    print(
        f"sweep {output}: {len(summary.executed)} runs done, {len(summary.skipped)} skipped "
        "(cached or recorded); "
        f"`factorlab report {args.record or output}` for tables and plots"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from factorlab.methods.names import METHOD_NAMES

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
        help=f"one of {', '.join(METHOD_NAMES)} (default low-rank)",
    )
    p.add_argument(
        "--param-ratio",
        type=float,
        default=0.5,
        help="fraction of targeted parameters KEPT, in (0, 1], default 0.5",
    )
    p.add_argument(
        "--nblocks",
        type=int,
        help="blocks per side for block methods (monarch, block-low-rank), default 4",
    )
    p.add_argument(
        "--target-modules", nargs="+", help="module names (or name suffixes) to factorize"
    )
    p.add_argument("--target-regex", help="regex (full match) of module names to factorize")
    p.add_argument("--exclude-modules", nargs="+", help="module names (or suffixes) to leave dense")
    p.add_argument(
        "--allocation",
        choices=["uniform", "global", "sensitivity"],
        help="uniform: every matrix keeps --param-ratio (default); global: one budget over all "
        "matrices, ranks where the method's truncation error drops most per parameter; "
        "sensitivity: the same budget, ranks where the model's output (measured on calibration "
        "examples) changes least",
    )
    p.add_argument(
        "--sensitivity-samples",
        type=int,
        help="--allocation sensitivity: calibration examples the output is measured on, default 64",
    )
    p.add_argument(
        "--sensitivity-fractions",
        type=float,
        nargs="+",
        metavar="F",
        help="--allocation sensitivity: candidate ranks measured per matrix, as fractions in "
        "(0, 1] of its largest useful rank, default 0.1 0.2 0.3 0.4 0.5 0.6 0.8 1.0 "
        "(factorlab.sensitivity.DEFAULT_FRACTIONS)",
    )
    p.add_argument(
        "--sensitivity-interpolation",
        choices=["spectrum", "linear"],
        help="--allocation sensitivity: spread each measured loss curve between its candidate "
        "ranks in proportion to the method's own truncation-error drops (spectrum, default) or "
        "evenly (linear)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="act-svd (Gram statistics): calibrate each block on the outputs of the "
        "already-compressed blocks before it (with --allocation global or sensitivity, ranks "
        "are planned on the dense model first)",
    )
    p.add_argument(
        "--compensate",
        action="store_true",
        help="with --sequential (act-svd): fit each layer to the dense model's outputs, "
        "correcting the error the compressed blocks before it pass on (holds a dense copy of "
        "the model for the run)",
    )
    _add_lpaf_args(p)
    _add_dsformer_args(p)
    _add_option_arg(p)
    p.add_argument("--output", required=True, help="run folder: checkpoint + results.json")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an output folder holding another run"
    )
    p.add_argument(
        "--staged",
        action="store_true",
        help="factorize block by block, fine-tuning in between (needs --task)",
    )
    _add_staged_args(p)
    _add_calibration_args(p)
    _add_training_args(p)
    p.set_defaults(func=lambda a: cmd_compress(a, a.method))

    p = sub.add_parser(
        "stability",
        help="staged vs simultaneous factorization over several seeds: failed runs, mean, std",
    )
    p.add_argument("--model", help="HF folder or Hub id; default: the embedded all-MiniLM-L6-v2")
    p.add_argument("--method", default="low-rank", help="default low-rank")
    p.add_argument("--param-ratio", type=float, default=0.5, help="fraction KEPT, default 0.5")
    p.add_argument("--nblocks", type=int, help="blocks per side for block methods")
    _add_option_arg(p)
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, default=5, help="run seeds 0..N-1 (default 5)")
    seeds.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds instead")
    p.add_argument(
        "--output", help="study folder (default runs/stability/<task>-<method>-<ratio>[-frac<f>])"
    )
    _add_staged_args(p)
    _add_training_args(p, seed=False, distill=False)
    p.set_defaults(func=cmd_stability, target_modules=None, target_regex=None, exclude_modules=None)

    p = sub.add_parser("finetune", help="fine-tune a dense model (the baseline)")
    p.add_argument("--model", help="HF folder or Hub id; default: the embedded all-MiniLM-L6-v2")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true")
    _add_training_args(p)
    p.set_defaults(func=lambda a: cmd_compress(a, None))

    p = sub.add_parser(
        "evaluate",
        help="evaluate a saved checkpoint on a GLUE dev set, or a causal LM's perplexity on a text",
    )
    p.add_argument(
        "checkpoint",
        help="a factorlab run folder or checkpoint, a Hugging Face sequence classifier, or (with "
        "--task perplexity) a causal LM folder or Hub id",
    )
    p.add_argument(
        "--task",
        required=True,
        help="GLUE task the model was fine-tuned on, or 'perplexity' (causal LMs, --text-file)",
    )
    g = p.add_argument_group("perplexity (causal LMs; the SVD-LLM / ASVD protocol)")
    g.add_argument("--text-file", help="UTF-8 text to score (e.g. WikiText-2's test split)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window, default 512")
    g.add_argument(
        "--stride", type=int, default=256, help="tokens between window starts, default 256"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--data-dir", help="GLUE folder (<dir>/SST-2/dev.tsv ...); default: $GLUE_DIR")
    p.add_argument(
        "--max-seq-length", type=int, default=128, help="tokens per example, default 128"
    )
    p.add_argument(
        "--eval-batch-size", type=int, default=128, help="examples per batch, default 128"
    )
    _add_runtime_args(p, "evaluated")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("info", help="what a checkpoint holds")
    p.add_argument("checkpoint", help="a factorlab run folder or checkpoint (with factorlab.json)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "report", help="markdown table of every results.json under a folder, plus plots"
    )
    p.add_argument("runs", help="folder holding run folders (e.g. a sweep's output)")
    p.add_argument("--output", help="where report.md and the PNGs go (default RUNS/report)")
    p.add_argument(
        "--data-dir",
        help="GLUE folder (default $GLUE_DIR): with it the tables count the runs that failed "
        "(not above the constant predictor + 1 point)",
    )
    p.add_argument(
        "--readme",
        help="markdown file (e.g. README.md) whose block between '<!-- sweep-report:start -->' "
        "and '<!-- sweep-report:end -->' becomes the report's comparison table",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "bench", help="latency, throughput, memory, parameters and MACs against the dense model"
    )
    p.add_argument(
        "model", nargs="?", help="checkpoint or HF model folder; default: the embedded MiniLM"
    )
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated, default 1,32")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, default 128")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's current)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model, default 20")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first, default 3")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    _add_runtime_args(p, "timed (the model and its dense reference)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print where the time goes too (PyTorch: torch.profiler's top operators; ONNX "
        "Runtime: ms per op type, the model beside its dense reference)",
    )
    p.add_argument("--json", help="write the full result (all timings) to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX (verified in onnxruntime against PyTorch)"
    )
    p.add_argument(
        "model", nargs="?", help="checkpoint or HF model folder; default: the embedded MiniLM"
    )
    p.add_argument("--format", choices=["onnx"], default="onnx", help="default onnx")
    p.add_argument("--output", help="the .onnx file (default MODEL/model.onnx)")
    p.add_argument(
        "--opset",
        type=int,
        default=23,
        help="ONNX opset version, default 23 (attention as one ONNX Attention op)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="methods x param_ratios x tasks x seeds from a YAML file")
    p.add_argument("config", help="sweep YAML (see factorlab.bench.sweep for the schema)")
    p.add_argument("--output", help="sweep folder (default runs/<config file stem>)")
    p.add_argument("--progress", action="store_true", help="show training progress bars")
    p.add_argument(
        "--lane",
        metavar="I/N",
        help="run only lane I of N (every N-th task-and-seed group): N processes, one per lane, "
        "run the sweep in parallel",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="run only these methods of the sweep (e.g. dense: the baselines, to check recipes)",
    )
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="run only these tasks of the sweep")
    p.add_argument(
        "--param-ratios",
        nargs="+",
        type=float,
        metavar="P",
        help="run only these param_ratios of the sweep (and the dense runs they need)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, metavar="SEED", help="run only these seeds of the sweep"
    )
    p.add_argument(
        "--record",
        metavar="DIR",
        help="keep every finished run's results.json and bench.json (no checkpoint) in DIR, "
        "a folder to commit: runs recorded there are not run again even where their folders "
        "are gone, and `factorlab report DIR` reads it",
    )
    p.add_argument(
        "--bench-only",
        action="store_true",
        help="train nothing: benchmark the selected runs that have a checkpoint in the sweep "
        "folder (one per method variant and param_ratio; run it on an idle machine)",
    )
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``factorlab``; user errors print one paragraph and return exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("factorlab").setLevel(logging.INFO)
    if (
        getattr(args, "task", None) is None
        and getattr(args, "calibration_task", None) is None
        and getattr(args, "data_dir", None)
        and args.command not in ("evaluate", "report")
    ):
        parser.error("--data-dir needs --task")
    try:
        return args.func(args)
    except FactorlabError as exc:
        print(f"factorlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
