"""GLUE dev-set metrics (Wang et al. 2019, ICLR; METHODS.md section 9).

CoLA: Matthews correlation. STS-B: Pearson and Spearman correlation (plus their mean,
``"combined"``). MRPC, QQP: accuracy and F1 of the positive class (equivalent / duplicate = 1).
SST-2, MNLI, QNLI, RTE, WNLI: accuracy. Computed with scikit-learn and scipy; all values are
plain Python floats in fraction units (0.91, not 91%).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from factorlab.tasks.glue import GlueTask, get_task

__all__ = ["baseline_score", "compute_metrics"]


def _as_1d(values: Any, what: str, task: GlueTask) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim == 2 and not task.is_regression and arr.shape[1] == task.num_labels:
        raise ValueError(
            f"{what} for {task.name} has shape {arr.shape}: these look like logits; pass class ids "
            "(e.g. logits.argmax(-1))"
        )
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{what} for {task.name} must be 1-D, got shape {arr.shape}")
    return arr


def _as_class_ids(arr: np.ndarray, what: str, task: GlueTask) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} for {task.name} must be integer class ids, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.integer):
        integral = np.isfinite(arr) & (arr == np.round(arr))
        if not integral.all():
            raise ValueError(
                f"{what} for {task.name} must be integer class ids, got non-integer values "
                f"(e.g. {arr[~integral][:3].tolist()}); pass the argmax of the logits"
            )
    ids = arr.astype(np.int64)
    bad = (ids < 0) | (ids >= task.num_labels)
    if bad.any():
        raise ValueError(
            f"{what} for {task.name} must be class ids in 0..{task.num_labels - 1}, found "
            f"{sorted(set(ids[bad].tolist()))[:5]}"
        )
    return ids


def _as_scores(arr: np.ndarray, what: str, task: GlueTask) -> np.ndarray:
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{what} for {task.name} must be numeric scores, got dtype {arr.dtype}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{what} for {task.name} contain NaN or infinite values")
    return out


def _corr(fn: Any, x: np.ndarray, y: np.ndarray) -> float:
    # A constant vector has no defined correlation (scipy returns nan with a warning); a
    # constant predictor carries no information, so we report 0.0.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    value = float(fn(x, y)[0])
    return 0.0 if np.isnan(value) else value


def compute_metrics(
    task: str | GlueTask,
    predictions: Sequence[int] | Sequence[float] | np.ndarray | Any,
    labels: Sequence[int] | Sequence[float] | np.ndarray | Any,
) -> dict[str, float]:
    """GLUE dev metrics for one task (Wang et al. 2019; METHODS.md section 9).

    Args:
        task: Task name (see :func:`factorlab.tasks.get_task`) or :class:`GlueTask`.
        predictions: Shape ``(n,)``. Classification: class ids (ints, or integral floats) in
            ``0..num_labels-1``, canonical ``nyu-mll/glue`` order. STS-B: predicted similarity
            scores (floats, any scale; correlations are scale-free). Lists, numpy arrays and
            torch tensors are accepted; an ``(n, 1)`` array is flattened.
        labels: Gold labels, shape ``(n,)``, same conventions.

    Returns:
        Python floats in fraction units (not percent):
        ``cola``: ``{"matthews_correlation"}``; ``stsb``: ``{"pearson", "spearman", "combined"}``
        (combined = their mean); ``mrpc``, ``qqp``: ``{"accuracy", "f1"}`` (F1 of class 1,
        0.0 when class 1 is never predicted and never gold); all others: ``{"accuracy"}``.
        Correlations of a constant vector (predictions or labels) are reported as 0.0 instead of
        scipy's nan; sklearn's Matthews correlation is already 0.0 there.

    Raises:
        ValueError: lengths differ, inputs are empty, STS-B has fewer than 2 examples, values
            are not valid class ids / finite scores, or predictions look like 2-D logits.
    """
    spec = get_task(task)
    pred = _as_1d(predictions, "predictions", spec)
    gold = _as_1d(labels, "labels", spec)
    if pred.shape[0] != gold.shape[0]:
        raise ValueError(
            f"{spec.name}: {pred.shape[0]} predictions but {gold.shape[0]} labels; they must match"
        )
    if pred.shape[0] == 0:
        raise ValueError(f"{spec.name}: no predictions/labels given (empty input)")

    if spec.is_regression:
        if pred.shape[0] < 2:
            raise ValueError(f"{spec.name}: correlations need at least 2 examples, got 1")
        p = _as_scores(pred, "predictions", spec)
        g = _as_scores(gold, "labels", spec)
        pearson = _corr(pearsonr, p, g)
        spearman = _corr(spearmanr, p, g)
        return {"pearson": pearson, "spearman": spearman, "combined": (pearson + spearman) / 2}

    p = _as_class_ids(pred, "predictions", spec)
    g = _as_class_ids(gold, "labels", spec)
    if spec.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(g, p))}
    out = {"accuracy": float(accuracy_score(g, p))}
    if spec.name in ("mrpc", "qqp"):
        out["f1"] = float(f1_score(g, p, pos_label=1, average="binary", zero_division=0.0))
    return out


def baseline_score(
    task: str | GlueTask,
    train_labels: Sequence[int] | Sequence[float] | np.ndarray | Any,
    eval_labels: Sequence[int] | Sequence[float] | np.ndarray | Any,
) -> float:
    """Main metric of the constant predictor fitted on the training labels.

    Classification: always predict the majority class of ``train_labels`` (ties go to the
    smaller class id). Regression (STS-B): always predict the mean of ``train_labels``, which
    scores a Pearson correlation of 0.0. Used to detect failed runs (a fine-tuned model at or
    below this score has learned nothing).

    Args:
        task: Task name or :class:`GlueTask`.
        train_labels: Training labels, shape ``(n_train,)``, class ids or STS-B scores.
        eval_labels: Gold labels of the evaluation split, shape ``(n_eval,)``.

    Returns:
        ``compute_metrics(task, constant, eval_labels)[task.main_metric]`` as a float
        (fraction units).

    Raises:
        ValueError: empty ``train_labels``, or anything :func:`compute_metrics` rejects.
    """
    spec = get_task(task)
    train = _as_1d(train_labels, "train_labels", spec)
    gold = _as_1d(eval_labels, "eval_labels", spec)
    if train.shape[0] == 0:
        raise ValueError(f"{spec.name}: train_labels is empty; cannot fit a constant predictor")
    if spec.is_regression:
        constant: float | int = float(np.mean(_as_scores(train, "train_labels", spec)))
    else:
        counts = Counter(_as_class_ids(train, "train_labels", spec).tolist())
        constant = min(counts, key=lambda c: (-counts[c], c))
    preds = np.full(gold.shape[0], constant)
    return compute_metrics(spec, preds, gold)[spec.main_metric]
