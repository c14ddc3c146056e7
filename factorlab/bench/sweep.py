"""Sweeps: methods x param_ratios x tasks x seeds from one YAML file, cached and resumable.

Every combination becomes one ``RunConfig`` (``factorlab.runs``) run by ``prepare_run`` /
``execute`` into its own folder of the sweep's output directory, named by a readable prefix and a
short hash of the run's config (``rte-low-rank-0.5-s42-1a2b3c4d``). A run whose folder already
holds a ``results.json`` with the same config is skipped; ``execute`` writes the checkpoint and
``results.json`` in one atomic rename, so a killed sweep, started again, redoes only the run that
was interrupted. Changing anything in a run's config changes its hash, hence its folder: the old
result stays and the new run is made. With a record (``run_sweep(record=...)``, CLI
``--record DIR``; ``factorlab.bench.record``) the finished runs' results are also kept without
their checkpoints, and a run found there is skipped even where its folder is gone.

YAML schema (unknown keys are errors)::

    model: path or Hub id            # optional; default the embedded all-MiniLM-L6-v2
    data_dir: path                   # optional; GLUE folder (else $GLUE_DIR, else the Hub)
    tasks: [rte, sst2]               # optional; omitted or [null]: factorize and save only
    methods:                         # names, or mappings {name: ..., method options...}
      - dense                        # the fine-tuned dense baseline (RunConfig.method=None)
      - low-rank
      - {name: monarch, nblocks: 4}
      - {name: block-low-rank, grid: {nblocks: [2, 4]}}   # grid: one variant per combination
      - {name: low-rank, staged: {order: top-down}}       # staged factorization (METHODS.md §4)
      - {name: low-rank, param_ratios: [0.1]}             # this entry's own ratios
      - {name: low-rank, staged: {}, tasks: [mrpc]}       # only on these of the sweep's tasks
      - {name: act-svd, start: dense, distill: {alpha: 0.9}}
          # start: dense compresses the dense run of the same task and seed (its fine-tuned
          # model) instead of `model`; distill: recover with distillation from that dense run
          # (DistillationConfig fields except teacher: alpha, temperature, hidden_weight).
          # Either needs `dense` among the methods; such a run waits for its dense run.
    param_ratios: [0.5, 0.25]        # fraction of targeted parameters kept (not used by dense)
    seeds: [42, 43, 44]              # TrainingConfig.seed of each run; default [42]
    training: {epochs: 3, batch_size: 32}   # TrainingConfig fields except seed
    train_samples: 10000             # optional; TrainingConfig.train_samples
    recipes:                         # optional; per task, TrainingConfig fields over `training`
      sst2: {train_samples: 20000, epochs: 1}
      mrpc: {epochs: 5}
    bench: {batch_sizes: [1, 32], seq_len: 128, threads: 2, runs: 20}   # optional, see below

With ``bench``, after the runs one checkpoint per (method variant, param_ratio) - the first task
and seed with a checkpoint on this machine - is benchmarked against its dense reference
(``factorlab.bench.latency.bench``) and the result written to ``bench.json`` in its folder
(skipped when one with the same settings exists there or in the record);
``factorlab report`` shows the latency ratios.

Runs go seed by seed (every task and method of the first seed, then the next), each dense run
before the runs that need it. ``run_sweep(lane=(i, n))`` (CLI ``--lane i/n``) runs every n-th
(task, seed) group, so n single-thread processes share a sweep; ``methods=["dense"]`` (CLI
``--methods dense``) runs only the baselines, to check the recipes first.

A run that starts from or distils from its dense run names that run's folder in its config; its
folder hash is computed with the dense run's name in place of the folder path, so it does not
change when the sweep folder moves.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from factorlab.bench.record import BENCH_FILE, read_json, write_record
from factorlab.errors import ConfigError, DataError
from factorlab.runs import RESULTS_FILE, PreparedRun, RunConfig, execute, prepare_run

SWEEP_FILE = "sweep.json"
DENSE = "dense"
TOP_KEYS = {
    "model",
    "data_dir",
    "tasks",
    "methods",
    "param_ratios",
    "seeds",
    "training",
    "train_samples",
    "bench",
    "recipes",
}
METHOD_KEYS = {"name", "grid", "staged", "param_ratios", "start", "distill", "tasks"}
DISTILL_KEYS = {"alpha", "temperature", "hidden_weight"}
STARTS = ("pretrained", DENSE)
BENCH_KEYS = {"batch_sizes", "seq_len", "threads", "runs", "warmup"}


@dataclass(frozen=True)
class MethodVariant:
    """One method entry of a sweep after expanding its ``grid``.

    Attributes:
        name: registered method name, or ``"dense"``.
        options: method options other than ``param_ratio``.
        staged: ``StagedSchedule`` fields for staged factorization, or ``None``.
        param_ratios: the ratios to run (``(1.0,)`` for dense).
        start: ``"pretrained"`` (compress the sweep's ``model``) or ``"dense"`` (compress the
            fine-tuned model of the dense run of the same task and seed).
        distill: ``DistillationConfig`` fields other than ``teacher`` (the teacher is the dense
            run of the same task and seed), or ``None``: the task loss alone.
        tasks: the sweep's tasks this variant runs on, or ``None``: all of them.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    staged: tuple[tuple[str, Any], ...] | None = None
    param_ratios: tuple[float, ...] = (1.0,)
    start: str = "pretrained"
    distill: tuple[tuple[str, Any], ...] | None = None
    tasks: tuple[str, ...] | None = None

    @property
    def needs_dense(self) -> bool:
        """Whether the variant's runs use the dense run of their task and seed."""
        return self.start == DENSE or self.distill is not None

    @property
    def label(self) -> str:
        """Readable name: ``monarch nblocks=4 staged``, ``act-svd from-dense kd alpha=0.9``."""
        parts = [self.name, *(f"{k}={_short(v)}" for k, v in self.options)]
        if self.staged is not None:
            parts.append("staged")
        if self.start == DENSE:
            parts.append("from-dense")
        if self.distill is not None:
            parts += ["kd", *(f"{k}={_short(v)}" for k, v in self.distill)]
        return " ".join(parts)


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


@dataclass
class SweepSpec:
    """A validated sweep file. See the module docstring for the meaning of each field."""

    model: str | None
    data_dir: str | None
    tasks: list[str | None]
    methods: list[MethodVariant]
    seeds: list[int]
    training: dict[str, Any] = field(default_factory=dict)
    bench: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its place in the grid and its ``RunConfig``; ``after`` names the dense
    run it starts or distils from (``None``: it needs no other run)."""

    name: str
    task: str | None
    method: MethodVariant
    param_ratio: float
    seed: int
    config: RunConfig
    after: str | None = None

    @property
    def label(self) -> str:
        """``rte low-rank 0.5 seed 42`` (the method's options included)."""
        ratio = "" if self.method.name == DENSE else f" {self.param_ratio:g}"
        return f"{self.task or 'no task'} {self.method.label}{ratio} seed {self.seed}"

    @property
    def output(self) -> Path:
        """The run's folder."""
        return Path(self.config.output)


@dataclass
class SweepSummary:
    """What ``run_sweep`` did: run names executed and skipped, and every run's results."""

    output: Path
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    benched: list[str] = field(default_factory=list)


def _fail(source: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message}")


def _check_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")


def _list_of(value: Any, kind: type | tuple[type, ...], key: str, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"{key} must be a non-empty list, got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, kind):
            names = kind if isinstance(kind, tuple) else (kind,)
            expected = " or ".join(k.__name__ for k in names)
            raise _fail(where, f"{key} has {item!r}, which is not a {expected}")
    return value


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` (no dot) as a string: turn numeric strings into floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _ratios(value: Any, where: str) -> tuple[float, ...]:
    if isinstance(value, list):
        value = [_number(v) for v in value]
    ratios = _list_of(value, (int, float), "param_ratios", where)
    for r in ratios:
        if not 0 < r <= 1:
            raise _fail(where, f"param_ratios must be in (0, 1] (fraction kept), got {r}")
    return tuple(float(r) for r in ratios)


def _switch(entry: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    """A method entry's ``key`` given as ``true`` / ``false`` or a mapping of its options:
    the mapping (``{}`` for ``true``), or ``None`` when absent or ``false``."""
    value = entry.get(key)
    if value is True:
        return {}
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        raise _fail(where, f"method {entry['name']!r}: {key} must be true or a mapping of options")
    return value


def _expand_method(entry: Any, ratios: tuple[float, ...] | None, where: str) -> list[MethodVariant]:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise _fail(where, f"a method is a name or a mapping with 'name', got {entry!r}")
    name = entry["name"]
    options = {k: v for k, v in entry.items() if k not in METHOD_KEYS}
    if "param_ratio" in options:
        raise _fail(
            where, f"method {name!r}: give ratios as param_ratios (a list), not param_ratio"
        )
    grid = entry.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise _fail(where, f"method {name!r}: grid must map option names to non-empty lists")
    staged = _switch(entry, "staged", where)
    start = entry.get("start", "pretrained")
    if start not in STARTS:
        raise _fail(where, f"method {name!r}: start must be one of {list(STARTS)}, got {start!r}")
    distill = _switch(entry, "distill", where)
    if distill is not None:
        _check_keys(distill, DISTILL_KEYS, f"{where}: method {name!r}: distill")
        distill = {k: _number(v) for k, v in distill.items()}
    tasks = entry.get("tasks")
    if tasks is not None and (
        not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks)
    ):
        raise _fail(
            where, f"method {name!r}: tasks must be a non-empty list of names, got {tasks!r}"
        )
    if name == DENSE:
        if set(entry) - {"name"}:
            raise _fail(where, "method 'dense' (the baseline) takes no options")
        return [MethodVariant(DENSE)]
    own = _ratios(entry["param_ratios"], where) if "param_ratios" in entry else ratios
    if own is None:
        raise _fail(where, f"method {name!r} needs param_ratios (top level or in its entry)")
    keys = sorted(grid)
    variants = []
    for values in itertools.product(*(grid[k] for k in keys)):
        opts = {**options, **dict(zip(keys, values, strict=True))}
        variants.append(
            MethodVariant(
                name,
                tuple(sorted(opts.items())),
                None if staged is None else tuple(sorted(staged.items())),
                own,
                start,
                None if distill is None else tuple(sorted(distill.items())),
                None if tasks is None else tuple(tasks),
            )
        )
    return variants


def parse_sweep(data: Any, where: str = "sweep") -> SweepSpec:
    """Validate the content of a sweep file (a mapping, see the module docstring).

    Only the shape of the file is checked here; ``plan_sweep`` and ``validate_sweep`` check every
    run's method options, task, data and model.

    Raises:
        ConfigError: not a mapping, unknown keys (top level, method entries, ``bench``), or a value
            of the wrong type.
    """
    if not isinstance(data, dict):
        raise _fail(where, f"a sweep file is a mapping of keys, got {type(data).__name__}")
    _check_keys(data, TOP_KEYS, where)
    if "methods" not in data:
        raise _fail(where, "methods is required (e.g. methods: [dense, low-rank])")
    for key in ("model", "data_dir"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _fail(where, f"{key} must be a string, got {data[key]!r}")
    tasks = data.get("tasks")
    tasks = [None] if tasks is None else tasks
    if not isinstance(tasks, list) or not tasks:
        raise _fail(where, f"tasks must be a non-empty list, got {tasks!r}")
    for t in tasks:
        if t is not None and not isinstance(t, str):
            raise _fail(where, f"tasks has {t!r}, which is not a task name")
    ratios = _ratios(data["param_ratios"], where) if "param_ratios" in data else None
    methods_raw = data["methods"]
    if not isinstance(methods_raw, list) or not methods_raw:
        raise _fail(where, "methods must be a non-empty list")
    methods = [v for entry in methods_raw for v in _expand_method(entry, ratios, where)]
    needing = [m.label for m in methods if m.needs_dense]
    if needing and all(m.name != DENSE for m in methods):
        raise _fail(where, f"{needing[0]!r} starts or distils from the dense run: add dense")
    if needing and None in tasks:
        raise _fail(where, f"{needing[0]!r} needs a task: its dense run is fine-tuned on one")
    for m in methods:
        unknown = sorted(set(m.tasks or ()) - set(tasks))
        if unknown:
            raise _fail(
                where, f"method {m.label!r}: tasks {unknown} are not among the tasks {tasks}"
            )
    methods.sort(key=lambda m: m.name != DENSE)  # dense runs first: others may need them
    seeds = _list_of(data.get("seeds", [42]), int, "seeds", where)
    training = _training_fields(data.get("training"), "training", where)
    recipes_raw = data.get("recipes") or {}
    if not isinstance(recipes_raw, dict):
        raise _fail(where, f"recipes must map task names to training fields, got {recipes_raw!r}")
    unused = sorted(set(recipes_raw) - {t for t in tasks if t is not None})
    if unused:
        raise _fail(where, f"recipes for {unused}, which are not among the tasks {tasks}")
    recipes = {t: _training_fields(r, f"recipes.{t}", where) for t, r in recipes_raw.items()}
    if data.get("train_samples") is not None:
        if training.get("train_samples") is not None:
            raise _fail(where, "train_samples is given twice (top level and under training)")
        training["train_samples"] = data["train_samples"]
    bench = data.get("bench")
    if bench is not None:
        if not isinstance(bench, dict):
            raise _fail(where, f"bench must be a mapping, got {bench!r}")
        _check_keys(bench, BENCH_KEYS, f"{where}: bench")
        bench = {"batch_sizes": [1, 32], "seq_len": 128, "threads": None, **bench}
    return SweepSpec(
        model=data.get("model"),
        data_dir=data.get("data_dir"),
        tasks=tasks,
        methods=methods,
        seeds=seeds,
        training=training,
        bench=bench,
        source=data,
        recipes=recipes,
    )


def _training_fields(value: Any, key: str, where: str) -> dict[str, Any]:
    """``TrainingConfig`` fields other than ``seed`` from a sweep file's mapping ``key``."""
    from factorlab.training import TrainingConfig

    value = value or {}
    if not isinstance(value, dict):
        raise _fail(where, f"{key} must be a mapping of TrainingConfig fields, got {value!r}")
    if "seed" in value:
        raise _fail(where, f"{key}.seed: give the seeds as the top-level list seeds")
    known = {f.name for f in dataclasses.fields(TrainingConfig)} - {"seed"}
    _check_keys(value, known, f"{where}: {key}")
    floats = {f.name for f in dataclasses.fields(TrainingConfig) if "float" in str(f.type)}
    return {k: _number(v) if k in floats else v for k, v in value.items()}


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep YAML file.

    Raises:
        DataError: the file does not exist. ConfigError: invalid YAML or content.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_sweep(data, str(path))


def config_hash(config: RunConfig) -> str:
    """First 8 hex digits of the SHA-256 of the run's config (``RunConfig.to_dict``, sorted JSON):
    what the run computes, not where it is written."""
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _slug(text: str) -> str:
    keep = [c if c.isalnum() or c in "-._" else "-" for c in text]
    return "".join(keep).strip("-")


def plan_sweep(spec: SweepSpec, output: str | os.PathLike) -> list[SweepRun]:
    """Every run of ``spec`` (task, method variant, ratio, seed order; dense first), with its
    folder under ``output`` (``<task>-<method>[-<options>][-staged][-from-dense][-kd]-<ratio>-
    s<seed>-<hash8>``). Each task trains with ``training`` updated by its ``recipes`` entry.

    Raises:
        ConfigError: bad training or distillation values, or two identical runs.
    """
    from factorlab.training import DistillationConfig, StagedSchedule, TrainingConfig

    output = Path(output)
    runs: list[SweepRun] = []
    dense_runs: dict[tuple[str | None, int], SweepRun] = {}
    for task in spec.tasks:
        fields = {**spec.training, **spec.recipes.get(task or "", {})}
        for method in spec.methods:
            if method.tasks is not None and task not in method.tasks:
                continue
            for ratio in method.param_ratios:
                for seed in spec.seeds:
                    try:
                        training = TrainingConfig(**fields, seed=seed)
                    except TypeError as exc:  # a value of the wrong type
                        raise ConfigError(f"sweep training {fields}: {exc}") from exc
                    is_dense = method.name == DENSE
                    options = {} if is_dense else {"param_ratio": ratio, **dict(method.options)}
                    staged = None
                    if method.staged is not None:
                        try:
                            staged = StagedSchedule(**dict(method.staged))
                        except TypeError as exc:  # an unknown option
                            raise ConfigError(f"method {method.label!r}: staged: {exc}") from exc
                    dense = dense_runs[task, seed] if method.needs_dense else None
                    # hashed with the dense run's name, not its folder (see the module docstring)
                    reference = f"sweep-run:{dense.name}" if dense is not None else None
                    distill = None
                    if method.distill is not None:
                        distill = DistillationConfig(teacher=reference, **dict(method.distill))
                    config = RunConfig(
                        output="",
                        model=reference if method.start == DENSE else spec.model,
                        task=task,
                        data_dir=spec.data_dir,
                        method=None if is_dense else method.name,
                        method_options=options,
                        training=training,
                        staged=staged,
                        distillation=distill,
                    )
                    parts = [task or "base", method.name]
                    parts += [f"{k}{_short(v)}" for k, v in method.options]
                    parts += ["staged"] if staged is not None else []
                    parts += ["from-dense"] if method.start == DENSE else []
                    parts += ["kd"] if distill is not None else []
                    parts += [] if is_dense else [f"{ratio:g}"]
                    name = _slug("-".join([*parts, f"s{seed}", config_hash(config)]))
                    config = dataclasses.replace(config, output=str(output / name))
                    if dense is not None:
                        config = _with_dense_folder(config, dense.config.output)
                    run = SweepRun(
                        name, task, method, ratio, seed, config, dense.name if dense else None
                    )
                    runs.append(run)
                    if is_dense:
                        dense_runs[task, seed] = run
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"the sweep lists the same run twice: {duplicates[:3]}")
    return runs


def _with_dense_folder(config: RunConfig, folder: str) -> RunConfig:
    """``config`` with its ``sweep-run:`` references replaced by the dense run's folder."""
    if config.model is not None and config.model.startswith("sweep-run:"):
        config = dataclasses.replace(config, model=folder)
    if config.distillation is not None:
        distillation = dataclasses.replace(config.distillation, teacher=folder)
        config = dataclasses.replace(config, distillation=distillation)
    return config


def is_cached(run: SweepRun, results_folder: str | os.PathLike | None = None) -> bool:
    """Whether ``run``'s folder (or ``results_folder``, e.g. the run's folder in a record) holds
    a ``results.json`` with exactly its config (the folder of its dense run compared by name, so
    a moved sweep folder stays cached)."""
    folder = results_folder if results_folder is not None else run.output
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return False
    try:
        previous = json.loads(path.read_text()).get("config")
    except (json.JSONDecodeError, AttributeError):
        return False
    current = json.loads(json.dumps(run.config.to_dict()))
    return _by_name(previous, run.after) == _by_name(current, run.after)


def _by_name(config: Any, dense: str | None) -> Any:
    """A run's config dict with the folder of its dense run ``dense`` replaced by its name."""
    if dense is None or not isinstance(config, dict):
        return config
    config = dict(config)
    if Path(str(config.get("model"))).name == dense:
        config["model"] = dense
    teacher = (config.get("distillation") or {}).get("teacher")
    if teacher is not None and Path(str(teacher)).name == dense:
        config["distillation"] = {**config["distillation"], "teacher": dense}
    return config


def runs_to_skip(runs: list[SweepRun], record: str | os.PathLike | None = None) -> dict[str, Path]:
    """``{run name: folder of its results.json}`` for the runs of ``runs`` that need not run: its
    own folder (``is_cached``), else its folder in ``record`` (``factorlab.bench.record``), except
    a dense run known only from the record while a run still to do starts or distils from it:
    that one runs again, for its checkpoint."""
    done: dict[str, Path] = {}
    recorded_only = set()
    for run in runs:
        if is_cached(run):
            done[run.name] = run.output
        elif record is not None and is_cached(run, Path(record) / run.name):
            done[run.name] = Path(record) / run.name
            recorded_only.add(run.name)
    needed = {r.after for r in runs if r.name not in done and r.after is not None}
    for name in needed & recorded_only:
        del done[name]
    return done


def _waits(run: SweepRun, output: Path) -> bool:
    """Whether ``run`` needs a dense run that has not finished yet."""
    return run.after is not None and not (output / run.after / RESULTS_FILE).is_file()


def validate_sweep(
    runs: list[SweepRun], model: str | None = None, done: Collection[str] | None = None
) -> list[PreparedRun | None]:
    """``prepare_run`` on every run, before anything is executed: method options, tasks, data and
    model are all checked first, so a typo in the last run does not surface hours later.

    A finished run (named in ``done``; by default every ``is_cached`` run) is not prepared again
    (``None`` in its place). A run whose dense run has not finished (``SweepRun.after``) is
    checked with the sweep's ``model`` in place of the dense model and without its teacher,
    released at once, and ``None`` is returned in its place: it is prepared for real once its
    dense run is done.

    Raises:
        ConfigError, DataError, OutputExistsError: as ``prepare_run``, naming the run.
    """
    if done is None:
        done = {r.name for r in runs if is_cached(r)}
    prepared: list[PreparedRun | None] = []
    for run in runs:
        try:
            if run.name in done:
                prepared.append(None)
            elif _waits(run, run.output.parent):
                stand_in = dataclasses.replace(run.config, model=model, distillation=None)
                check = prepare_run(stand_in, overwrite=False)
                if check.lock is not None:
                    check.lock.release()
                prepared.append(None)
            else:
                prepared.append(prepare_run(run.config, overwrite=False))
        except Exception as exc:
            from factorlab.errors import FactorlabError

            if isinstance(exc, FactorlabError):
                raise type(exc)(f"sweep run {run.name} ({run.label}): {exc}") from exc
            raise
    return prepared


def _main_metric(results: dict[str, Any]) -> str:
    metrics = results.get("metrics") or {}
    if not metrics:
        return "no task"
    name = results.get("main_metric") or next(iter(metrics))
    return f"{name} {metrics.get(name, float('nan')):.4f}"


def _remove_partials(run: SweepRun) -> None:
    """Remove temporaries an interrupted ``execute`` of this very run left beside its folder."""
    for stale in run.output.parent.glob(f".{run.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def bench_runs(
    runs: list[SweepRun],
    settings: dict[str, Any],
    log: Callable[[str], None] = print,
    record: str | os.PathLike | None = None,
) -> list[str]:
    """Benchmark one checkpoint per (method variant, param_ratio) - its first run with a
    checkpoint here - against its dense reference and write ``bench.json`` into that run's
    folder. A ``bench.json`` with the same settings, in a run folder or in the ``record``, is
    kept. Returns the run names benchmarked now."""
    from factorlab.bench.latency import bench, load_for_bench, write_json

    record = Path(record) if record is not None else None
    groups: dict[tuple[Any, ...], list[SweepRun]] = {}
    for run in runs:
        groups.setdefault((run.method.label, run.param_ratio), []).append(run)
    done = []
    for (label, ratio), members in groups.items():
        folders = [r.output for r in members]
        folders += [record / r.name for r in members] if record is not None else []
        if any(_bench_settings(f / BENCH_FILE) == settings for f in folders):
            continue
        run = next((r for r in members if (r.output / RESULTS_FILE).is_file()), None)
        if run is None:
            log(f"bench {label} {ratio:g}: skipped, no checkpoint here (recorded runs only)")
            continue
        start = time.perf_counter()
        model = load_for_bench(str(run.output))
        result = bench(
            model,
            batch_sizes=settings["batch_sizes"],
            seq_len=settings["seq_len"],
            threads=settings["threads"],
            runs=settings.get("runs", 20),
            warmup=settings.get("warmup", 3),
            name=str(run.output),
        )
        result["settings"] = settings
        write_json(result, run.output / BENCH_FILE)
        ratios = ", ".join(
            f"batch {b['batch_size']} {b['latency_ratio']:.3f}x" for b in result["batches"]
        )
        log(f"bench {run.label}: {ratios} of dense latency ({time.perf_counter() - start:.0f} s)")
        done.append(run.name)
    return done


def _bench_settings(path: Path) -> Any:
    """The ``settings`` of the ``bench.json`` at ``path``; ``None`` if missing or unreadable."""
    bench = read_json(path)
    return bench.get("settings") if isinstance(bench, dict) else None


def parse_lane(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``: lane 1 of 4 (0-based).

    Raises:
        ConfigError: not ``I/N`` with integers ``0 <= I < N``.
    """
    index, _, count = text.partition("/")
    try:
        lane = (int(index), int(count))
    except ValueError:
        lane = (-1, 0)
    if not 0 <= lane[0] < lane[1]:
        raise ConfigError(f"--lane must be I/N with 0 <= I < N (lane I of N), got {text!r}")
    return lane


def lane_runs(runs: list[SweepRun], lane: tuple[int, int]) -> list[SweepRun]:
    """The runs of lane ``(i, n)``: every n-th (task, seed) group from the i-th, in planning
    order. A dense run and the runs that start or distil from it share a group, so n processes
    with lanes 0/n ... (n-1)/n run a sweep in parallel without waiting for each other."""
    groups: dict[tuple[str | None, int], int] = {}
    for run in runs:
        groups.setdefault((run.task, run.seed), len(groups))
    index, count = lane
    return [r for r in runs if groups[r.task, r.seed] % count == index]


def select_runs(
    runs: list[SweepRun],
    methods: list[str] | None = None,
    tasks: list[str] | None = None,
    param_ratios: list[float] | None = None,
    seeds: list[int] | None = None,
) -> list[SweepRun]:
    """The runs of ``runs`` whose method name, task, param_ratio and seed are among the given
    ones (``None``: any). Dense runs pass the ``param_ratios`` filter: the compressed runs of
    their task and seed start or distil from them.

    Raises:
        ConfigError: a value that no run has (a typo would otherwise select nothing).
    """
    wanted = {
        "methods": (methods, lambda r: r.method.name),
        "tasks": (tasks, lambda r: r.task),
        "param-ratios": (param_ratios, lambda r: r.param_ratio),
        "seeds": (seeds, lambda r: r.seed),
    }
    for flag, (values, key) in wanted.items():
        if values is None:
            continue
        known = {key(r) for r in runs if not (flag == "param-ratios" and r.method.name == DENSE)}
        unknown = [v for v in values if v not in known]
        if unknown:
            shown = sorted(known, key=str)
            raise ConfigError(f"--{flag} {unknown}: not in the sweep, whose {flag} are {shown}")
    return [
        r
        for r in runs
        if all(
            values is None
            or key(r) in values
            or (flag == "param-ratios" and r.method.name == DENSE)
            for flag, (values, key) in wanted.items()
        )
    ]


def run_sweep(
    spec: SweepSpec | str | os.PathLike,
    output: str | os.PathLike,
    progress: bool = False,
    log: Callable[[str], None] = print,
    execute_fn: Callable[..., dict[str, Any]] | None = None,
    lane: tuple[int, int] | None = None,
    methods: list[str] | None = None,
    record: str | os.PathLike | None = None,
    tasks: list[str] | None = None,
    param_ratios: list[float] | None = None,
    seeds: list[int] | None = None,
    bench_only: bool = False,
) -> SweepSummary:
    """Run every run of a sweep that is not already done, then the optional benchmark. Runs go
    seed by seed (every task and method of the first seed, then the next), dense first.

    All runs are planned and validated first (``plan_sweep``, ``validate_sweep``); nothing is run
    if any is invalid. ``output/sweep.json`` records the sweep file and the run list. One line is
    logged per run: ``[3/12] rte low-rank 0.5 seed 42: done in 95 s, accuracy 0.6100`` or
    ``skipped (cached)``. A failing run is logged and its exception re-raised (finished runs stay
    done; running the sweep again resumes).

    Args:
        spec: a ``SweepSpec`` or the path of a sweep YAML file.
        output: the sweep folder; one subfolder per run.
        progress: show training progress bars.
        log: where the lines go.
        execute_fn: replaces ``factorlab.runs.execute`` (tests).
        lane: ``(i, n)``: run only lane i of n (``lane_runs``), e.g. one single-thread process
            per lane; the benchmark is left to a run of the whole sweep once every lane is done.
        methods: run only the variants of these method names (``["dense"]``: the baselines
            first, to check the recipes); the benchmark is then skipped too.
        tasks, param_ratios, seeds: run only these tasks, ratios (dense runs are kept: the
            others need them) and seeds of the sweep (``select_runs``), e.g. a smaller grid
            first; the runs keep their folders and hashes, so the whole sweep later skips them.
            The benchmark is then skipped too.
        record: a folder that keeps every finished run's ``results.json`` and ``bench.json``
            (``factorlab.bench.record``): filled as runs finish (and from runs already cached),
            and read on start, so a run recorded there is not run again even where its folder is
            gone. A dense run recorded but without a folder runs again when a run still to do
            needs its checkpoint; the log says whether it reproduced its recorded metrics (the
            record keeps the first results of a run: nothing recorded is replaced).
        bench_only: train nothing; benchmark the selected runs that have a checkpoint in
            ``output`` (``bench_runs``: one per method variant and param_ratio), e.g. on an
            idle machine after single-thread lanes ran a smaller grid. The ``record`` takes the
            ``bench.json`` files.

    Returns:
        A ``SweepSummary``.

    Raises:
        ConfigError, DataError, OutputExistsError: invalid sweep, a ``record`` that is a file or
        holds or lies in ``output``, ``bench_only`` for a sweep without a ``bench`` section
        (before anything runs); any exception of a run.
    """
    if not isinstance(spec, SweepSpec):
        spec = load_sweep(spec)
    execute_fn = execute_fn or execute
    output = Path(output)
    planned = plan_sweep(spec, output)
    selection = {"tasks": tasks, "param_ratios": param_ratios, "seeds": seeds}
    select_runs(planned, methods=methods, **selection)  # unknown values fail before any work
    record = Path(record) if record is not None else None
    if record is not None:
        _check_record(record, output)
    in_lane = planned if lane is None else lane_runs(planned, lane)
    # over the whole lane, so that --methods dense rebuilds a recorded dense run without a
    # folder when a run of another method still needs its checkpoint
    done = runs_to_skip(in_lane, record)
    runs = select_runs(in_lane, methods=methods, **selection)
    # one seed over every task and method before the next: a sweep cut short still compares all
    runs = sorted(runs, key=lambda r: spec.seeds.index(r.seed))
    if bench_only:
        return _bench_only(spec, runs, output, log, record)
    selected = {r.name for r in runs}
    missing = [
        r for r in runs if r.name not in done and _waits(r, output) and r.after not in selected
    ]
    if missing:
        raise ConfigError(
            f"sweep run {missing[0].name} needs its dense run {missing[0].after}, which is not "
            "done and not selected: run the sweep with --methods dense (or no --methods) first"
        )
    prepared = validate_sweep(runs, spec.model, done)
    from factorlab.io import write_json_atomic

    write_json_atomic(
        output / SWEEP_FILE,
        {
            "sweep": spec.source,
            "runs": [
                {
                    "name": r.name,
                    "task": r.task,
                    "method": r.method.name,
                    "label": r.method.label,
                    "param_ratio": r.param_ratio,
                    "seed": r.seed,
                    "after": r.after,
                }
                for r in planned
            ],
        },
    )
    summary = SweepSummary(output)
    total = len(runs)
    for i, (run, prep) in enumerate(zip(runs, prepared, strict=True), 1):
        head = f"[{i}/{total}] {run.label}"
        if run.name in done:
            summary.skipped.append(run.name)
            summary.results[run.name] = json.loads((done[run.name] / RESULTS_FILE).read_text())
            if done[run.name] == run.output:
                if record is not None:
                    write_record(run.output, record)
                log(f"{head}: skipped (cached)")
            else:
                log(f"{head}: skipped (recorded in {record})")
            continue
        _remove_partials(run)
        start = time.perf_counter()
        try:
            if prep is None:  # its dense run finished in this sweep
                prep = validate_sweep([run])[0]
            results = execute_fn(prep, progress=progress, log=lambda msg: log(f"    {msg}"))
        except BaseException as exc:
            log(f"{head}: failed after {time.perf_counter() - start:.0f} s ({exc!r})")
            raise
        summary.executed.append(run.name)
        summary.results[run.name] = results
        line = f"{head}: done in {time.perf_counter() - start:.0f} s, {_main_metric(results)}"
        if record is not None:
            line += _against_record(run, record, results)
            write_record(run.output, record)
        log(line)
    subset = (
        lane is not None or methods is not None or any(v is not None for v in selection.values())
    )
    if spec.bench is not None and subset:
        log("bench: skipped; run the whole sweep once every run is done")
    elif spec.bench is not None:
        summary.benched = bench_runs(runs, spec.bench, log, record)
        for name in summary.benched if record is not None else ():
            write_record(output / name, record)
    return summary


def _bench_only(
    spec: SweepSpec,
    runs: list[SweepRun],
    output: Path,
    log: Callable[[str], None],
    record: Path | None,
) -> SweepSummary:
    """``run_sweep(..., bench_only=True)``: benchmark the runs that have checkpoints here."""
    if spec.bench is None:
        raise ConfigError(
            "--bench-only needs a 'bench' section in the sweep file; add one, e.g. "
            "bench: {batch_sizes: [1, 32], seq_len: 128, threads: 2, runs: 20}"
        )
    summary = SweepSummary(output)
    summary.benched = bench_runs(runs, spec.bench, log, record)
    for name in summary.benched if record is not None else ():
        write_record(output / name, record)
    return summary


def _check_record(record: Path, output: Path) -> None:
    """Refuse a record that is a file, or that holds or lies in the sweep folder (``factorlab
    report`` on the outer one would count every run twice)."""
    if record.exists() and not record.is_dir():
        raise ConfigError(f"the record {record} is a file; give a folder (made if missing)")
    inner, outer = record.resolve(), output.resolve()
    if inner == outer or inner.is_relative_to(outer) or outer.is_relative_to(inner):
        raise ConfigError(
            f"the record {record} and the sweep folder {output} must not hold one another "
            "(a report of the outer one would count every run twice): put them side by side"
        )


def _against_record(run: SweepRun, record: Path, results: dict[str, Any]) -> str:
    """``""``, or whether a rerun of a recorded run reproduced the recorded metrics."""
    if not is_cached(run, record / run.name):
        return ""
    recorded = json.loads((record / run.name / RESULTS_FILE).read_text()).get("metrics")
    if recorded == results.get("metrics"):
        return "; reproduces its record"
    return (
        f"; differs from its record ({recorded}), which keeps its first results: the recorded "
        "runs that start from it were trained from that model"
    )
