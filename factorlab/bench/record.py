"""A sweep's record: the ``results.json`` and ``bench.json`` of every finished run, without its
checkpoint, in one folder meant to be kept (committed beside the sweep file).

Run folders hold checkpoints (tens of MiB each) and live on one machine; a record holds what the
report reads (a few KiB per run). ``factorlab sweep --record DIR`` writes it and resumes from it:
a run found there with its exact config is not run again, so a sweep that spans many sessions
survives machines that lose their run folders, and ``factorlab report DIR`` rebuilds the tables
from the record alone. Layout: ``DIR/<run name>/results.json`` (a run folder's layout, so
``collect_results`` reads either).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from factorlab.io import write_text_atomic
from factorlab.runs import RESULTS_FILE

BENCH_FILE = "bench.json"
RECORDED_FILES = (RESULTS_FILE, BENCH_FILE)


def write_record(run_folder: str | os.PathLike, record: str | os.PathLike) -> Path:
    """Copy the ``RECORDED_FILES`` present in ``run_folder`` to ``record/<run folder name>/``,
    each written atomically. A readable ``results.json`` already recorded is kept: the record
    holds a run's first results, which the runs recorded after it (started from it) used;
    a ``bench.json`` is replaced by a different one (a benchmark with other settings). Returns
    that folder.

    Raises:
        FileNotFoundError: ``run_folder`` holds no ``results.json`` (the run has not finished).
    """
    source = Path(run_folder)
    if not (source / RESULTS_FILE).is_file():
        raise FileNotFoundError(f"{source} holds no {RESULTS_FILE}: the run has not finished")
    target = Path(record) / source.name
    for name in RECORDED_FILES:
        recorded = target / name
        kept = name == RESULTS_FILE and read_json(recorded) is not None
        if not (source / name).is_file() or kept:
            continue
        text = (source / name).read_text()
        if not recorded.is_file() or recorded.read_text() != text:
            write_text_atomic(recorded, text)
    return target


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in the file at ``path``; ``None`` if it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
