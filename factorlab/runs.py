"""One run end to end: load, factorize, fine-tune, evaluate, save, write ``results.json``.

Everything a run can fail on for bad input is checked in ``prepare_run`` before any work is done
or any file is touched; the checkpoint and its ``results.json`` land together in one atomic rename.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import Accelerator
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from factorlab.calibration import (
    CalibrationConfig,
    as_own_reference,
    probe_batches,
    resolve_calibration,
    run_calibration,
)
from factorlab.checkpoint import is_checkpoint, save
from factorlab.errors import ConfigError, DataError, OutputExistsError
from factorlab.io import OutputLock, check_output_location
from factorlab.methods import (
    FactorizationConfig,
    count_parameters,
    factorized_modules,
    make_config,
    plan_modules,
    targeted_bytes,
)
from factorlab.models import (
    default_model_path,
    load_model,
    load_tokenizer,
    max_tokens,
    resolve_model,
    saved_architectures,
)
from factorlab.targets import select_targets
from factorlab.tasks import GlueSplit, GlueTask, check_task_available, get_task, load_split
from factorlab.training import (
    DistillationConfig,
    EncodedSplit,
    Objective,
    Simultaneous,
    StagedSchedule,
    StagedTrainResult,
    TrainingConfig,
    TrainingJob,
    check_teacher,
    evaluate,
    micro_batch_size,
    seed_everything,
)

RESULTS_FILE = "results.json"
LATER_TRAINING_DEFAULTS = {
    "train_fraction": None,
    "gradient_accumulation_steps": 1,
    "factor_weight_decay": None,
    "group_by_length": False,
}
"""``TrainingConfig`` fields added after runs were first cached, with the default that earlier
runs implicitly used; left out of ``RunConfig.to_dict`` at that default."""


@dataclass
class RunConfig:
    """What one run does. ``method=None`` is the dense baseline (fine-tuning only).

    Attributes:
        model: Hugging Face folder or Hub id, or a factorlab checkpoint; ``None``: embedded MiniLM.
        task: GLUE task to fine-tune and evaluate on; ``None``: factorize and save only.
        data_dir: GLUE folder (else ``GLUE_DIR``, else the Hub).
        method: registered method name (``"low-rank"``) or ``None`` for dense.
        method_options: keyword options of the method's config (``param_ratio``, ``nblocks``...).
        training: the fine-tuning recipe (also used for its seed when there is no task).
        output: the run's directory (checkpoint + ``results.json``).
        staged: factorize in stages with fine-tuning in between (METHODS.md §4; needs a task and
            a method); ``None``: project everything at once, then fine-tune ("simultaneous").
        calibration: data for methods that need statistics (fwsvd, act-svd), collected after
            loading and before factorizing; ``None``: the run's task, if the method needs any.
        distillation: fine-tune with distillation from a teacher (METHODS.md §10; needs a
            task); ``None``: the task loss alone.
    """

    output: str
    model: str | None = None
    task: str | None = None
    data_dir: str | None = None
    method: str | None = "low-rank"
    method_options: dict[str, Any] = field(default_factory=dict)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    staged: StagedSchedule | None = None
    calibration: CalibrationConfig | None = None
    distillation: DistillationConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """What the run computes (not where it is written). Options added later (``staged``,
        ``distillation``, training fields such as ``train_fraction``) appear only when they differ
        from their default, so earlier runs' configs (and sweep hashes) still match."""
        training = asdict(self.training)
        for key, default in LATER_TRAINING_DEFAULTS.items():
            if training.get(key) == default:
                training.pop(key, None)
        out = {
            "model": self.model or "embedded:all-MiniLM-L6-v2",
            "task": self.task,
            "method": self.method or "dense",
            "method_options": self.method_options,
            "training": training,
        }
        if self.staged is not None:
            out["staged"] = self.staged.to_dict()
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.distillation is not None:
            out["distillation"] = self.distillation.to_dict()
        return out


@dataclass
class PreparedRun:
    """A validated ``RunConfig``: resolved model path, task, factorization config, schedule."""

    config: RunConfig
    model_path: str
    task: GlueTask | None
    factorization: FactorizationConfig | None
    calibration: CalibrationConfig | None = None
    schedule: Simultaneous | StagedSchedule = field(default_factory=Simultaneous)
    lock: OutputLock | None = None
    """Held on the output folder from ``prepare_run`` until ``execute`` has written it (main
    process only)."""


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` is a folder factorlab wrote (a run's ``results.json`` or a checkpoint's
    spec): the only kind of existing folder ``--overwrite`` may replace."""
    return path.is_dir() and ((path / RESULTS_FILE).is_file() or is_checkpoint(path))


def check_output(output: str | Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse an output that this run must not write; writes nothing.

    Allowed: a new path, an empty folder, a folder holding this same run (its ``results.json``
    has this config), and, with ``overwrite``, a folder holding another factorlab run or
    checkpoint. A plain file or a folder of other files is never replaced.

    Raises:
        OutputExistsError: see above, and ``check_output_location``.
    """
    path = check_output_location(output)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not is_run_folder(path):
        kind = "a file" if not path.is_dir() else "a folder that is not a factorlab run"
        raise OutputExistsError(
            f"{path} exists and is {kind}; factorlab replaces only its own run folders, even "
            "with --overwrite. Choose another --output."
        )
    if overwrite:
        return
    previous = None
    results = path / RESULTS_FILE
    if results.is_file():
        try:
            previous = json.loads(results.read_text()).get("config")
        except (json.JSONDecodeError, AttributeError):
            previous = None
    if previous != config:
        raise OutputExistsError(
            f"{path} already holds a different run (its {RESULTS_FILE} has another config). "
            "Choose another --output, or pass --overwrite to replace it."
        )


def prepare_run(config: RunConfig, overwrite: bool = False) -> PreparedRun:
    """Check every input of ``config`` without loading weights, then lock the output folder.

    The lock (``OutputLock``: a ``.NAME.lock`` file beside the output, which also clears
    leftovers of killed runs there) is the only thing written; ``execute`` releases it.

    Raises:
        ConfigError: bad method, option or training value. DataError: missing model or data.
        OutputExistsError: see ``check_output``; another run holds the output's lock.
    """
    factorization = make_config(config.method, **config.method_options) if config.method else None
    task = get_task(config.task) if config.task else None
    schedule = config.staged
    if schedule is None and factorization is not None:
        schedule = factorization.make_schedule()
    if schedule is None:
        schedule = Simultaneous()
    schedule.check(factorization, task is not None)
    # Accelerator(), not a bare PartialState(): that would ignore ACCELERATE_USE_CPU and, being
    # shared, fix one process for the whole launch
    accelerator = Accelerator()
    if task is not None:
        check_task_available(task, config.data_dir)
        micro_batch_size(config.training, accelerator.num_processes)
    model_path = resolve_model(config.model)
    limit = max_tokens(model_path) if task is not None else None
    if limit is not None and config.training.max_seq_length > limit:
        raise ConfigError(
            f"--max-seq-length {config.training.max_seq_length} is longer than the model takes "
            f"({limit} tokens: its position embeddings); use at most {limit}"
        )
    if factorization is not None:
        check_plan(model_path, factorization, task)
    if config.distillation is not None:
        check_distillation(config.distillation, task, model_path)
    calibration = resolve_calibration(
        config.calibration,
        config.method,
        config.task,
        config.data_dir,
        model_path,
        allocation=factorization.allocation if factorization is not None else "uniform",
    )
    check_output(config.output, config.to_dict(), overwrite)
    lock = OutputLock(config.output) if accelerator.is_main_process else None
    return PreparedRun(config, model_path, task, factorization, calibration, schedule, lock)


def check_plan(model_path: str, factorization: FactorizationConfig, task: GlueTask | None) -> None:
    """Plan every targeted module on an empty model built from the config on the meta device
    (shapes only, no weights, no memory), so bad targets and infeasible budgets fail before the
    weights are loaded. Skipped for factorlab checkpoints (their factorized structure exists only
    once loaded) and configs that cannot be read here (a Hub id offline): loading then reports.

    Raises:
        TargetError, ConfigError: see ``plan_modules``.
    """
    if is_checkpoint(model_path):
        return
    try:
        model_config = AutoConfig.from_pretrained(model_path)
        if task is not None:
            model_config.num_labels = task.num_labels
        auto = AutoModelForSequenceClassification if task is not None else AutoModel
        with torch.device("meta"):
            model = auto.from_config(model_config)
    except (OSError, ValueError, KeyError):
        return
    plan_modules(model, factorization)


def check_distillation(
    distillation: DistillationConfig, task: GlueTask | None, student_path: str
) -> None:
    """Refuse a distillation setting that cannot work, from the model configs alone.

    Raises:
        ConfigError: no task, or a teacher that does not fit (``check_teacher``).
        DataError: the teacher folder is missing or is not a model.
    """
    if task is None:
        raise ConfigError("distillation trains on a task: give --task with --teacher")
    teacher_path = resolve_model(distillation.teacher)
    try:
        teacher_config = AutoConfig.from_pretrained(teacher_path)
        student_config = AutoConfig.from_pretrained(student_path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the config of teacher {teacher_path}: {exc}") from exc
    teacher_config.architectures = saved_architectures(teacher_path)
    check_teacher(teacher_config, student_config, distillation, task.num_labels)


def training_split(task: GlueTask, data_dir: str | None, training: TrainingConfig) -> GlueSplit:
    """The training examples a run uses: the train split, or its seeded subset of
    ``training.train_samples`` examples or ``training.train_fraction`` of them."""
    split = load_split(task, "train", data_dir)
    if training.train_samples is not None and training.train_samples < len(split):
        return split.subset(training.train_samples, seed=training.seed)
    if training.train_fraction is not None and training.train_fraction < 1:
        return split.subset(float(training.train_fraction), seed=training.seed)
    return split


def versions() -> dict[str, str]:
    from factorlab import __version__

    return {
        "factorlab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def load_objective(run: PreparedRun) -> Objective:
    """The run's loss: its task loss, with distillation from the teacher when configured (the
    training loop moves the teacher to the batches' device)."""
    task, distillation = run.task, run.config.distillation
    assert task is not None
    if distillation is None:
        return Objective(task.is_regression)
    teacher = load_model(distillation.teacher, task.num_labels, task.is_regression)
    return Objective(task.is_regression, distillation, teacher)


def execute(run: PreparedRun, progress: bool = True, log: Any = print) -> dict[str, Any]:
    """Run a prepared run and save it (see ``_execute``), releasing the output's lock at the end,
    also when the run fails."""
    try:
        return _execute(run, progress, log)
    finally:
        if run.lock is not None:
            run.lock.release()


def _execute(run: PreparedRun, progress: bool, log: Any) -> dict[str, Any]:
    """Run a prepared run and save it; returns the ``results.json`` content.

    ``results.json`` holds ``method``, ``param_ratio``, ``seed``, ``task``, ``model``,
    ``parameters`` {targeted_before, targeted_after, model_before, model_after, and for a
    factorized run targeted_bytes_before / _after: ``targeted_bytes``}, ``metrics``
    (fractions), ``train`` (steps, examples, processes, losses, loss components, optimizer groups,
    callback state, distillation), ``timings`` (seconds per phase), ``versions``,
    ``factorization`` (per-module report) and the full ``config``.

    On several processes every process trains and evaluates its shard; only the main process
    logs and writes the run folder (the others wait for it).
    """
    config, task, training = run.config, run.task, run.config.training
    timings: dict[str, float] = {}
    accelerator = Accelerator()
    main = accelerator.is_main_process
    say = log if main else (lambda _line: None)

    start = time.perf_counter()
    seed_everything(training.seed)
    model = load_model(
        run.model_path,
        num_labels=task.num_labels if task else None,
        regression=bool(task and task.is_regression),
    )
    tokenizer = load_tokenizer(run.model_path)
    timings["load"] = time.perf_counter() - start
    model_before = count_parameters(model)
    say(f"loaded {run.model_path} ({model_before:,} parameters) in {timings['load']:.1f} s")
    targeted_before = 0
    if run.factorization is None:
        targeted_before = sum(
            sum(p.numel() for p in t.module.parameters()) for t in select_targets(model)
        )

    calibrate = None
    if run.calibration is not None:
        # error compensation reads each layer's inputs in the dense model beside the compressed
        reference = copy.deepcopy(model) if run.factorization.compensate else None

        def calibrate(model: nn.Module, modules: list[str] | None = None) -> dict[str, Any]:
            """Statistics for the targeted modules, or only ``modules`` (one stage)."""
            # until its first block is swapped the model is the reference: no second pass
            still_dense = reference is not None and not factorized_modules(model)
            statistics = run_calibration(
                model,
                tokenizer,
                run.factorization,
                run.calibration,
                config.data_dir,
                training.max_seq_length,
                progress=progress and main,
                modules=modules,
                reference=None if still_dense else reference,
            )
            return as_own_reference(statistics) if still_dense else statistics

    job, eval_data = None, {}
    if task is not None:
        start = time.perf_counter()
        train_split = training_split(task, config.data_dir, training)
        train_data = EncodedSplit(train_split, tokenizer, training.max_seq_length)
        eval_data = {
            split: EncodedSplit(
                load_split(task, split, config.data_dir), tokenizer, training.max_seq_length
            )
            for split in task.eval_splits
        }
        objective = load_objective(run)
        timings["data"] = time.perf_counter() - start
        job = TrainingJob(
            train_data, tokenizer, training, accelerator, objective, progress=progress, log=say
        )

    if run.factorization is not None:
        what = "calibrating, then " if calibrate is not None else ""
        say(f"{run.schedule.name}: {what}factorizing with {run.factorization.method} ...")
    options = {}
    if run.factorization is not None and run.factorization.allocation == "sensitivity":
        # only the simultaneous schedule takes it: the others refuse sensitivity allocation
        options["probe"] = probe_batches(
            tokenizer,
            run.calibration,  # type: ignore[arg-type]
            config.data_dir,
            training.max_seq_length,
            run.factorization.sensitivity_samples,
        )
    outcome = run.schedule.run(model, run.factorization, job, calibrate, **options)
    model, report = outcome.model, outcome.report
    timings.update(outcome.timings)
    targeted_after = targeted_before
    if report is not None:
        targeted_before, targeted_after = report.targeted_before, report.targeted_after
        say(
            f"factorized {len(report.modules)} modules with {report.method}: "
            f"{targeted_before:,} -> {targeted_after:,} targeted parameters "
            f"({report.kept_ratio:.3f} kept)"
        )
        if report.calibration_peak_bytes is not None:
            say(
                f"calibration statistics: at most {report.calibration_peak_bytes / 2**20:.1f} "
                "MiB held at once"
            )

    metrics: dict[str, float] = {}
    train_info: dict[str, Any] = {}
    if outcome.train is not None:
        result = outcome.train
        timings["train"] = result.seconds
        train_info = {
            "steps": result.steps,
            "examples": result.examples,
            "examples_per_step": result.examples / max(1, result.steps),
            "num_processes": result.num_processes,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "losses": result.losses,
            "loss_parts": result.loss_parts,
            "optimizer": result.optimizer,
            "distillation": config.distillation.to_dict() if config.distillation else None,
            "state": result.state,
        }
        if isinstance(result, StagedTrainResult):
            train_info["stages"] = [s.to_dict() for s in result.stages]
        if result.phases:
            train_info["phases"] = result.phases
        start = time.perf_counter()
        say(
            f"evaluating on {', '.join(f'{k} ({len(v):,} examples)' for k, v in eval_data.items())}"
        )
        for i, (split, data) in enumerate(eval_data.items()):
            scores = evaluate(
                model, data, tokenizer, training.eval_batch_size, accelerator, progress and main
            )
            metrics.update({(k if i == 0 else f"{split}/{k}"): v for k, v in scores.items()})
        timings["evaluate"] = time.perf_counter() - start

    sizes = {}
    if report is not None:
        sizes["targeted_bytes_before"], sizes["targeted_bytes_after"] = targeted_bytes(
            model, report
        )
    results = {
        "method": config.method or "dense",
        "param_ratio": run.factorization.param_ratio if run.factorization else 1.0,
        "seed": training.seed,
        "schedule": None if run.factorization is None else run.schedule.name,
        "task": task.name if task else None,
        "model": config.model or f"embedded:all-MiniLM-L6-v2 ({default_model_path()})",
        "parameters": {
            "targeted_before": targeted_before,
            "targeted_after": targeted_after,
            "model_before": model_before,
            "model_after": count_parameters(model),
            **sizes,
        },
        "metrics": metrics,
        "main_metric": task.main_metric if task else None,
        "train": train_info,
        "timings": timings,
        "versions": versions(),
        "factorization": report.to_dict() if report else None,
        "calibration": run.calibration.to_dict() if run.calibration else None,
        "config": config.to_dict(),
    }
    model.eval()
    method = run.factorization.to_dict() if run.factorization else None
    if main:
        save(model, config.output, tokenizer, method=method, extra_files={RESULTS_FILE: results})
    accelerator.wait_for_everyone()
    return results
