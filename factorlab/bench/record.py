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

import os
from pathlib import Path

from factorlab.io import write_text_atomic

RECORDED_FILES = ("results.json", "bench.json")


def write_record(run_folder: str | os.PathLike, record: str | os.PathLike) -> Path:
    """Copy the ``RECORDED_FILES`` present in ``run_folder`` to ``record/<run folder name>/``,
    each file replaced atomically (a killed copy leaves the previous one). Returns that folder.

    Raises:
        FileNotFoundError: ``run_folder`` holds no ``results.json`` (the run has not finished).
    """
    source = Path(run_folder)
    if not (source / RECORDED_FILES[0]).is_file():
        raise FileNotFoundError(f"{source} holds no {RECORDED_FILES[0]}: the run has not finished")
    target = Path(record) / source.name
    for name in RECORDED_FILES:
        if not (source / name).is_file():
            continue
        text = (source / name).read_text()
        if not (target / name).is_file() or (target / name).read_text() != text:
            write_text_atomic(target / name, text)
    return target
