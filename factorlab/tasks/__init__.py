"""GLUE tasks: task specifications, TSV/Hub readers and dev metrics (METHODS.md section 9)."""

from factorlab.tasks.glue import (
    GLUE_TASKS,
    HUB_DATASET,
    GlueFormatError,
    GlueSplit,
    GlueTask,
    check_task_available,
    get_task,
    load_split,
    resolve_data_dir,
)
from factorlab.tasks.metrics import baseline_score, compute_metrics

__all__ = [
    "GLUE_TASKS",
    "HUB_DATASET",
    "GlueFormatError",
    "GlueSplit",
    "GlueTask",
    "baseline_score",
    "check_task_available",
    "compute_metrics",
    "get_task",
    "load_split",
    "resolve_data_dir",
]
