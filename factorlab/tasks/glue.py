"""GLUE task specifications and readers for the standard ``glue_data/`` TSV layout.

Source: the GLUE benchmark, Wang, Singh, Michael, Hill, Levy, Bowman, "GLUE: A Multi-Task
Benchmark and Analysis Platform for Natural Language Understanding", ICLR 2019
(arXiv:1804.07461), and METHODS.md section 9 (evaluation on the GLUE dev sets).

Label ids follow the canonical order of the Hugging Face Hub dataset ``nyu-mll/glue`` (for
example MNLI: entailment=0, neutral=1, contradiction=2; RTE/QNLI: entailment=0,
not_entailment=1), so that classifier heads are interchangeable with Hub-trained models.

Data comes from a folder in the usual ``glue_data/`` layout (``<dir>/SST-2/train.tsv``,
``<dir>/MNLI/dev_matched.tsv`` ...), given explicitly or through the ``GLUE_DIR`` environment
variable. Only when neither is given, and the optional ``datasets`` package is installed, is
the Hub dataset ``nyu-mll/glue`` used instead.

File format notes (all tasks): tab-separated, read with ``csv.QUOTE_NONE`` so that ``"`` and
``'`` inside sentences come through unchanged; CoLA ``train.tsv``/``dev.tsv`` have no header
row; MRPC ``train.tsv``/``dev.tsv`` start with a UTF-8 byte-order mark (files are read as
``utf-8-sig``, which strips a leading BOM when present and is a no-op otherwise).

Errors: missing data raises :class:`factorlab.errors.DataError` (a ``FileNotFoundError``); a bad
task/split name or subset size raises :class:`factorlab.errors.ConfigError` (a ``ValueError``);
a malformed file raises :class:`GlueFormatError` (a ``ValueError``). All derive from
:class:`factorlab.errors.FactorlabError`, which the CLI reports as a user error.
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import math
import os
import random
import sys
import warnings
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from factorlab.errors import ConfigError, DataError, FactorlabError

__all__ = [
    "GLUE_TASKS",
    "HUB_DATASET",
    "GlueFormatError",
    "GlueSplit",
    "GlueTask",
    "check_task_available",
    "get_task",
    "load_split",
    "resolve_data_dir",
]

#: Hub dataset used as a fallback when no data folder is given.
HUB_DATASET = "nyu-mll/glue"

_LAYOUT_HINT = (
    "Pass --data-dir (or data_dir=...) or set the GLUE_DIR environment variable to a folder with "
    "the standard GLUE layout (<dir>/SST-2/train.tsv, <dir>/MNLI/dev_matched.tsv, ...), "
    "or install the `datasets` package and go online to read the Hub dataset "
    f"{HUB_DATASET!r}."
)


class GlueFormatError(FactorlabError, ValueError):
    """A GLUE file exists but does not have the expected format (header, columns, labels)."""


@dataclass(frozen=True)
class GlueTask:
    """Specification of one GLUE task (Wang et al. 2019; METHODS.md section 9).

    Attributes:
        name: Short lowercase task name as used on the Hub, e.g. ``"sst2"``, ``"mnli"``.
        folder: Folder name in the ``glue_data/`` layout, e.g. ``"SST-2"``.
        text_fields: Header names of the one or two text columns in the TSV files, in order
            (e.g. ``("sentence1", "sentence2")``). For CoLA, whose train/dev files have no header,
            these refer to ``headerless_columns``.
        label_field: Header name of the gold label column (``"gold_label"`` for MNLI,
            ``"score"`` for STS-B, ...).
        label_names: Class names, index = class id, in the canonical ``nyu-mll/glue`` order;
            ``None`` for the regression task STS-B.
        eval_splits: Labelled evaluation splits (file stems): ``("dev",)``; MNLI:
            ``("dev_matched", "dev_mismatched")``.
        main_metric: Key of :func:`factorlab.tasks.metrics.compute_metrics` that ranks runs:
            ``"accuracy"``, ``"matthews_correlation"`` (CoLA) or ``"pearson"`` (STS-B).
        raw_labels: For classification, the label strings exactly as written in the TSV files,
            index = class id (e.g. ``("0", "1")`` for SST-2, the class names for MNLI/RTE/QNLI).
            ``None`` for regression.
        headerless_columns: Column names for files without a header row (CoLA train/dev);
            ``None`` when the files have a header.
        hub_text_fields: Names of the text columns in the Hub dataset ``nyu-mll/glue``.
        max_malformed_fraction: Fraction of data rows whose column count differs from the
            header that may be skipped (QQP: 0.01, known malformed rows in some releases);
            0.0 means any malformed row is an error.
    """

    name: str
    folder: str
    text_fields: tuple[str, ...]
    label_field: str
    label_names: tuple[str, ...] | None
    eval_splits: tuple[str, ...]
    main_metric: str
    raw_labels: tuple[str, ...] | None = None
    headerless_columns: tuple[str, ...] | None = None
    hub_text_fields: tuple[str, ...] = ()
    max_malformed_fraction: float = 0.0

    @property
    def num_labels(self) -> int:
        """Number of output units of a classifier head: classes, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        """True for STS-B (similarity score 0..5), False for the classification tasks."""
        return self.label_names is None

    @property
    def splits(self) -> tuple[str, ...]:
        """All labelled splits: ``("train",) + eval_splits``."""
        return ("train", *self.eval_splits)


_BINARY = ("0", "1")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask(
            name="cola",
            folder="CoLA",
            text_fields=("sentence",),
            label_field="label",
            label_names=("unacceptable", "acceptable"),
            eval_splits=("dev",),
            main_metric="matthews_correlation",
            raw_labels=_BINARY,
            headerless_columns=("source", "label", "original_label_mark", "sentence"),
            hub_text_fields=("sentence",),
        ),
        GlueTask(
            name="sst2",
            folder="SST-2",
            text_fields=("sentence",),
            label_field="label",
            label_names=("negative", "positive"),
            eval_splits=("dev",),
            main_metric="accuracy",
            raw_labels=_BINARY,
            hub_text_fields=("sentence",),
        ),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            text_fields=("#1 String", "#2 String"),
            label_field="Quality",
            label_names=("not_equivalent", "equivalent"),
            eval_splits=("dev",),
            main_metric="accuracy",
            raw_labels=_BINARY,
            hub_text_fields=("sentence1", "sentence2"),
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            text_fields=("sentence1", "sentence2"),
            label_field="score",
            label_names=None,
            eval_splits=("dev",),
            main_metric="pearson",
            hub_text_fields=("sentence1", "sentence2"),
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            text_fields=("question1", "question2"),
            label_field="is_duplicate",
            label_names=("not_duplicate", "duplicate"),
            eval_splits=("dev",),
            main_metric="accuracy",
            raw_labels=_BINARY,
            hub_text_fields=("question1", "question2"),
            max_malformed_fraction=0.01,
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            text_fields=("sentence1", "sentence2"),
            label_field="gold_label",
            label_names=("entailment", "neutral", "contradiction"),
            eval_splits=("dev_matched", "dev_mismatched"),
            main_metric="accuracy",
            raw_labels=("entailment", "neutral", "contradiction"),
            hub_text_fields=("premise", "hypothesis"),
        ),
        GlueTask(
            name="qnli",
            folder="QNLI",
            text_fields=("question", "sentence"),
            label_field="label",
            label_names=("entailment", "not_entailment"),
            eval_splits=("dev",),
            main_metric="accuracy",
            raw_labels=("entailment", "not_entailment"),
            hub_text_fields=("question", "sentence"),
        ),
        GlueTask(
            name="rte",
            folder="RTE",
            text_fields=("sentence1", "sentence2"),
            label_field="label",
            label_names=("entailment", "not_entailment"),
            eval_splits=("dev",),
            main_metric="accuracy",
            raw_labels=("entailment", "not_entailment"),
            hub_text_fields=("sentence1", "sentence2"),
        ),
        GlueTask(
            name="wnli",
            folder="WNLI",
            text_fields=("sentence1", "sentence2"),
            label_field="label",
            label_names=("not_entailment", "entailment"),
            eval_splits=("dev",),
            main_metric="accuracy",
            raw_labels=_BINARY,
            hub_text_fields=("sentence1", "sentence2"),
        ),
    )
}


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


_ALIASES: dict[str, str] = {}
for _t in GLUE_TASKS.values():
    _ALIASES[_norm(_t.name)] = _t.name
    _ALIASES[_norm(_t.folder)] = _t.name


def get_task(name: str | GlueTask) -> GlueTask:
    """Look up a GLUE task by name.

    Args:
        name: One of the nine task names (``cola sst2 mrpc stsb qqp mnli qnli rte wnli``) or their
            ``glue_data`` folder names (``"SST-2"``, ``"STS-B"``, ``"CoLA"`` ...), case-insensitive;
            hyphens and underscores are ignored (``"sst-2"`` = ``"sst2"``). A :class:`GlueTask` is
            returned unchanged.

    Returns:
        The :class:`GlueTask` from :data:`GLUE_TASKS`.

    Raises:
        ValueError: unknown name; the message lists the known tasks.
    """
    if isinstance(name, GlueTask):
        return name
    if not isinstance(name, str):
        raise TypeError(f"task must be a str or GlueTask, got {type(name).__name__}")
    key = _ALIASES.get(_norm(name))
    if key is None:
        known = ", ".join(f"{t.name} ({t.folder})" for t in GLUE_TASKS.values())
        raise ConfigError(f"unknown GLUE task {name!r}; known tasks: {known}")
    return GLUE_TASKS[key]


@dataclass
class GlueSplit:
    """One labelled split of a GLUE task, held in memory.

    Attributes:
        task: The :class:`GlueTask`.
        split: Split name: ``"train"`` or one of ``task.eval_splits``.
        texts: One tuple per example, ``(sentence,)`` or ``(sentence1, sentence2)``, strings
            exactly as in the source (no stripping, quotes unchanged).
        labels: Class ids (``int``, canonical ``nyu-mll/glue`` order) or, for STS-B, similarity
            scores (``float``, 0..5).
        source: The file read, or ``"hub:nyu-mll/glue"``.
        n_malformed: Data rows skipped because their column count differed from the header
            (only tolerated for QQP; see :attr:`GlueTask.max_malformed_fraction`).
    """

    task: GlueTask
    split: str
    texts: list[tuple[str, ...]]
    labels: list[float] | list[int]
    source: str
    n_malformed: int = 0

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(
                f"GlueSplit {self.task.name}/{self.split}: {len(self.texts)} texts but "
                f"{len(self.labels)} labels"
            )

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.labels)

    def subset(self, n_or_fraction: int | float, seed: int) -> GlueSplit:
        """Deterministic random subset, examples kept in their original order.

        Args:
            n_or_fraction: An ``int`` in ``1..len(self)``: that many examples; or a ``float`` in
                ``(0, 1]``: that fraction of the examples, rounded to the nearest count and at
                least 1 (``1.0`` keeps everything).
            seed: Seed of the sampler (``random.Random(seed)``); same seed, same subset.

        Returns:
            A new :class:`GlueSplit` with the same task, split and source.

        Raises:
            TypeError: ``n_or_fraction`` is not an int or float (``bool`` is rejected), or
                ``seed`` is not an int.
            ValueError: count outside ``1..len(self)``, fraction outside ``(0, 1]`` or not
                finite, or the split is empty.
        """
        total = len(self)
        if isinstance(n_or_fraction, bool) or not isinstance(n_or_fraction, Real):
            raise TypeError(
                "n_or_fraction must be an int (number of examples) or a float in (0, 1] "
                f"(fraction), got {n_or_fraction!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if total == 0:
            raise ConfigError(
                f"cannot take a subset of the empty split {self.task.name}/{self.split}"
            )
        if isinstance(n_or_fraction, Integral):
            n = int(n_or_fraction)
            if not 1 <= n <= total:
                raise ConfigError(
                    f"subset size {n} is outside 1..{total} (the size of "
                    f"{self.task.name}/{self.split}); pass a smaller int or a fraction in (0, 1]"
                )
        else:
            frac = float(n_or_fraction)
            if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
                raise ConfigError(
                    f"subset fraction {frac!r} is outside (0, 1]; pass a fraction in (0, 1] or an "
                    f"int count in 1..{total}"
                )
            n = max(1, min(total, round(frac * total)))
        idx = sorted(random.Random(int(seed)).sample(range(total), n))
        return GlueSplit(
            task=self.task,
            split=self.split,
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],  # type: ignore[misc]
            source=self.source,
            n_malformed=self.n_malformed,
        )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """Find the GLUE data folder.

    Args:
        data_dir: Folder in the ``glue_data/`` layout, or ``None``.

    Returns:
        ``Path(data_dir)`` if given, else ``Path($GLUE_DIR)`` if that environment variable is set
        and non-empty, else ``None`` (meaning: fall back to the Hub, see :func:`load_split`).

    Raises:
        FileNotFoundError: the given folder (or ``$GLUE_DIR``) does not exist or is not a folder.
    """
    origin = "data_dir"
    if data_dir is None or str(data_dir) == "":
        env = os.environ.get("GLUE_DIR", "")
        if not env:
            return None
        data_dir, origin = env, "GLUE_DIR"
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(
            f"GLUE data folder {str(path)!r} (from {origin}) does not exist. {_LAYOUT_HINT}"
        )
    if not path.is_dir():
        raise DataError(
            f"GLUE data folder {str(path)!r} (from {origin}) is not a folder. {_LAYOUT_HINT}"
        )
    return path


def _canonical_split(task: GlueTask, split: str) -> str:
    s = split.strip().lower()
    if s == "validation":
        return task.eval_splits[0]
    if s.startswith("validation_"):
        s = "dev_" + s[len("validation_") :]
    if s in task.splits:
        return s
    raise ConfigError(
        f"unknown split {split!r} for GLUE task {task.name}; use one of "
        f"{', '.join(task.splits)} (or 'validation' for {task.eval_splits[0]}). "
        "Test splits have no labels and are not supported."
    )


def _present_task_folders(data_dir: Path) -> list[str]:
    folders = {t.folder for t in GLUE_TASKS.values()}
    return sorted(p.name for p in data_dir.iterdir() if p.is_dir() and p.name in folders)


def _split_path(task: GlueTask, split: str, data_dir: Path) -> Path:
    """Return the TSV path of a split, or raise FileNotFoundError with a helpful message."""
    folder = data_dir / task.folder
    path = folder / f"{split}.tsv"
    if path.is_file():
        return path
    if not folder.is_dir():
        present = _present_task_folders(data_dir)
        listing = ", ".join(present) if present else "none"
        hint = ""
        if (data_dir / "glue_data").is_dir():
            hint = f" Did you mean {str(data_dir / 'glue_data')!r}?"
        raise DataError(
            f"GLUE task folder for {task.name} not found: expected {str(path)!r}. "
            f"Task folders present in {str(data_dir)!r}: {listing}.{hint} Point --data-dir or "
            f"GLUE_DIR at a folder in the standard GLUE layout that holds "
            f"{task.folder}/{split}.tsv."
        )
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise DataError(
        f"GLUE split file not found: expected {str(path)!r}. Files present in "
        f"{str(folder)!r}: {', '.join(files) if files else 'none'}. Add the file (standard GLUE "
        f"release) or choose a split that is present."
    )


def _datasets_available() -> bool:
    if "datasets" in sys.modules:
        return sys.modules["datasets"] is not None
    try:
        return importlib.util.find_spec("datasets") is not None
    except (ImportError, ValueError):
        return False


def _no_data_error(task: GlueTask) -> DataError:
    return DataError(
        f"no GLUE data folder given for task {task.name} and the `datasets` package is not "
        f"installed. {_LAYOUT_HINT}"
    )


def check_task_available(
    task: str | GlueTask,
    data_dir: str | os.PathLike[str] | None,
    splits: tuple[str, ...] | None = None,
) -> None:
    """Cheap pre-flight check that the files of a task exist (nothing is parsed).

    Args:
        task: Task name or :class:`GlueTask`.
        data_dir: Data folder as for :func:`load_split` (``None``: ``$GLUE_DIR``, else the Hub).
        splits: Splits to check; default ``("train", <first eval split>)``.

    Raises:
        ValueError: unknown task or split.
        FileNotFoundError: as :func:`load_split`: folder/file missing (naming the expected path
            and the task folders present), or no folder given and ``datasets`` not installed.
            With no folder and ``datasets`` installed, nothing is checked (no network access).
    """
    spec = get_task(task)
    wanted = ("train", spec.eval_splits[0]) if splits is None else tuple(splits)
    canonical = [_canonical_split(spec, s) for s in wanted]
    root = resolve_data_dir(data_dir)
    if root is None:
        if not _datasets_available():
            raise _no_data_error(spec)
        return
    for s in canonical:
        _split_path(spec, s, root)


def _parse_label(task: GlueTask, raw: str, path: Path, line: int) -> int | float:
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and 0.0 <= value <= 5.0):
            raise GlueFormatError(
                f"{path}: line {line}: bad {task.name} score {raw!r} in column "
                f"{task.label_field!r}; expected a number in 0..5"
            )
        return value
    assert task.raw_labels is not None
    try:
        return task.raw_labels.index(raw)
    except ValueError:
        raise GlueFormatError(
            f"{path}: line {line}: unknown {task.name} label {raw!r} in column "
            f"{task.label_field!r}; expected one of {list(task.raw_labels)}"
        ) from None


def _read_tsv(task: GlueTask, split: str, path: Path) -> GlueSplit:
    texts: list[tuple[str, ...]] = []
    labels: list[Any] = []
    malformed: list[int] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.headerless_columns is not None:
            header = list(task.headerless_columns)
        else:
            try:
                header = next(reader)
            except StopIteration:
                raise GlueFormatError(
                    f"{path}: file is empty; expected a header with columns "
                    f"{[*task.text_fields, task.label_field]}"
                ) from None
        missing = [c for c in (*task.text_fields, task.label_field) if c not in header]
        if missing:
            raise GlueFormatError(
                f"{path}: header lacks the expected {task.name} columns {missing}; expected "
                f"columns {[*task.text_fields, task.label_field]}, found {header}. Is this the "
                f"{split} file of the standard GLUE release?"
            )
        text_idx = [header.index(c) for c in task.text_fields]
        label_idx = header.index(task.label_field)
        width = len(header)
        try:
            for row in reader:
                line = reader.line_num
                if len(row) != width:
                    if task.max_malformed_fraction <= 0.0:
                        where = (
                            "(this file has no header row)"
                            if task.headerless_columns is not None
                            else "as in the header"
                        )
                        raise GlueFormatError(
                            f"{path}: line {line}: expected {width} tab-separated columns "
                            f"{header} {where}, found {len(row)}. The file looks corrupted or "
                            "is not the standard GLUE release; re-download it."
                        )
                    malformed.append(line)
                    continue
                texts.append(tuple(row[i] for i in text_idx))
                labels.append(_parse_label(task, row[label_idx], path, line))
        except csv.Error as exc:
            raise GlueFormatError(
                f"{path}: line {reader.line_num}: cannot parse TSV: {exc}"
            ) from exc
    total = len(texts) + len(malformed)
    if malformed:
        frac = len(malformed) / total
        if frac > task.max_malformed_fraction:
            raise GlueFormatError(
                f"{path}: {len(malformed)} of {total} data rows ({frac:.2%}) have a column count "
                f"different from the header (first at line {malformed[0]}); at most "
                f"{task.max_malformed_fraction:.0%} is tolerated. Re-download the file."
            )
        warnings.warn(
            f"{path}: skipped {len(malformed)} malformed row(s) of {total} (column count "
            f"differs from the header; first at line {malformed[0]})",
            stacklevel=3,
        )
    return GlueSplit(
        task=task,
        split=split,
        texts=texts,
        labels=labels,
        source=str(path),
        n_malformed=len(malformed),
    )


def _hub_split_name(split: str) -> str:
    return "validation" + split[len("dev") :] if split.startswith("dev") else split


def _load_hub(task: GlueTask, split: str) -> GlueSplit:
    try:
        datasets = importlib.import_module("datasets")
    except ImportError:
        raise _no_data_error(task) from None
    hub_split = _hub_split_name(split)
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.name, split=hub_split)
    except Exception as exc:  # network, cache or Hub errors: say how to avoid the Hub
        raise DataError(
            f"could not load {HUB_DATASET!r} config {task.name!r} split {hub_split!r} from the "
            f"Hub ({type(exc).__name__}: {exc}). {_LAYOUT_HINT}"
        ) from exc
    columns = list(getattr(ds, "column_names", []) or [])
    missing = [c for c in (*task.hub_text_fields, "label") if c not in columns]
    if missing:
        raise GlueFormatError(
            f"hub:{HUB_DATASET} {task.name}/{hub_split}: expected columns "
            f"{[*task.hub_text_fields, 'label']}, found {columns}"
        )
    cols = [list(ds[c]) for c in task.hub_text_fields]
    texts = [tuple(str(v) for v in vals) for vals in zip(*cols, strict=True)]
    labels: list[Any] = []
    for i, v in enumerate(ds["label"]):
        if task.is_regression:
            labels.append(float(v))
        else:
            iv = int(v)
            if not 0 <= iv < task.num_labels:
                raise GlueFormatError(
                    f"hub:{HUB_DATASET} {task.name}/{hub_split}: row {i}: label {v!r} outside "
                    f"0..{task.num_labels - 1}"
                )
            labels.append(iv)
    return GlueSplit(
        task=task, split=split, texts=texts, labels=labels, source=f"hub:{HUB_DATASET}"
    )


def load_split(
    task: str | GlueTask,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
) -> GlueSplit:
    """Read one labelled split of a GLUE task (Wang et al. 2019; METHODS.md section 9).

    Reads ``<data_dir>/<task.folder>/<split>.tsv`` (tab-separated, ``csv.QUOTE_NONE``, UTF-8 with
    an optional BOM). If no folder is given and ``$GLUE_DIR`` is unset, falls back to
    ``datasets.load_dataset("nyu-mll/glue", task.name)`` when the ``datasets`` package is
    installed (requires network or a warm cache).

    Args:
        task: Task name (see :func:`get_task`) or :class:`GlueTask`.
        split: ``"train"`` or one of ``task.eval_splits`` (``"dev"``; MNLI ``"dev_matched"``,
            ``"dev_mismatched"``); ``"validation"`` means the first eval split and
            ``"validation_matched"``/``"validation_mismatched"`` the MNLI ones.
        data_dir: Folder in the ``glue_data/`` layout, or ``None`` for ``$GLUE_DIR``/the Hub.

    Returns:
        A :class:`GlueSplit`: texts as 1- or 2-tuples of str, labels as int class ids
        (canonical ``nyu-mll/glue`` order) or float scores 0..5 for STS-B.

    Raises:
        ValueError: unknown task or split; a header without the expected columns (names the
            file, the expected and the found columns); an unknown label value (names the file,
            line number and value); a row with the wrong number of columns (QQP: more than 1%
            of rows; fewer are skipped with a warning).
        FileNotFoundError: the data folder does not exist; the task folder or split file is
            missing (names the expected path and lists the task folders present); no folder
            given and ``datasets`` not installed, or the Hub could not be reached.
    """
    spec = get_task(task)
    canonical = _canonical_split(spec, split)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _load_hub(spec, canonical)
    return _read_tsv(spec, canonical, _split_path(spec, canonical, root))
