"""Task metrics as pure functions over numpy arrays (no sklearn / scipy).

Every stage that scores a model on task data (teacher fine-tuning, task distillation, evaluation) calls
:func:`compute_metrics`, so a task's headline number means the same thing everywhere. The definitions follow
GLUE's: F1 of a binary task is the F1 of the class at index 1 (``mrpc``/``qqp`` "positive"); a multi-class F1
is the macro average; MCC is Matthews' correlation (Gorodkin's multi-class generalisation); Spearman ranks
ties by their average rank.

Undefined values (a correlation or MCC of a constant vector) are 0.0 rather than NaN, the convention of
the reference implementations for MCC: a degenerate model then scores "no better than chance" and the
value stays valid JSON.
"""

from __future__ import annotations

import numpy as np

from dist_kd.io import listed

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


def _check_pair(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D, got shapes {predictions.shape} and {labels.shape} "
            "(pass class ids, or logits of shape (N, C) to compute_metrics)"
        )
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.shape[0]} predictions but {labels.shape[0]} labels")
    if predictions.size == 0:
        raise ValueError("no examples to score (empty predictions and labels)")
    return predictions, labels


def _class_ids(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as int64 class ids, refusing fractions: a cast truncated P(positive) of 0.9 to class 0."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and not np.all(values == np.round(values)):
        example = float(values[values != np.round(values)][0])
        raise ValueError(
            f"{what} must be whole class ids, found {example!r}; pass class ids, or logits / probabilities of "
            "shape (N, C) to compute_metrics (a 1-D probability is not a class)"
        )
    return values.astype(np.int64)


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Counts ``M[true, predicted]`` as an ``(C, C)`` int64 array.

    Args:
        predictions: ``(N,)`` predicted class ids.
        labels: ``(N,)`` true class ids.
        num_classes: C; default ``max(id) + 1`` (at least 2).
    """
    predictions, labels = _check_pair(predictions, labels)
    predictions, labels = _class_ids(predictions, "predictions"), _class_ids(labels, "labels")
    found = int(max(predictions.max(), labels.max())) + 1
    num_classes = max(found, 2) if num_classes is None else num_classes
    if found > num_classes or min(predictions.min(), labels.min()) < 0:
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}, found ids up to {found - 1}")
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``(N,)`` predictions equal to the ``(N,)`` labels."""
    predictions, labels = _check_pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """F1 score: of class 1 for a binary task, macro-averaged over classes otherwise.

    Args:
        predictions: ``(N,)`` predicted class ids.
        labels: ``(N,)`` true class ids.
        num_classes: C (decides binary vs macro); default ``max(id) + 1``, at least 2.

    Returns:
        F1 in [0, 1]; a class that is neither predicted nor present scores 0 (it is still averaged).
    """
    counts = confusion_matrix(predictions, labels, num_classes)
    true_positive = np.diag(counts).astype(np.float64)
    predicted = counts.sum(axis=0).astype(np.float64)
    actual = counts.sum(axis=1).astype(np.float64)
    denominator = predicted + actual
    per_class = np.divide(2 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return float(per_class[1]) if counts.shape[0] == 2 else float(per_class.mean())


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> float:
    """Matthews correlation coefficient (multi-class R_K statistic); 0.0 when undefined.

    Args:
        predictions: ``(N,)`` predicted class ids.
        labels: ``(N,)`` true class ids.
        num_classes: C; default ``max(id) + 1``.

    Returns:
        MCC in [-1, 1].
    """
    counts = confusion_matrix(predictions, labels, num_classes).astype(np.float64)
    total = counts.sum()
    correct = np.trace(counts)
    predicted = counts.sum(axis=0)
    actual = counts.sum(axis=1)
    covariance = correct * total - predicted @ actual
    denominator = np.sqrt((total**2 - predicted @ predicted) * (total**2 - actual @ actual))
    return float(covariance / denominator) if denominator > 0 else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation of two ``(N,)`` float arrays; 0.0 when either is constant."""
    predictions, labels = _check_pair(predictions, labels)
    x = predictions.astype(np.float64) - predictions.mean(dtype=np.float64)
    y = labels.astype(np.float64) - labels.mean(dtype=np.float64)
    denominator = np.sqrt((x @ x) * (y @ y))
    return float((x @ y) / denominator) if denominator > 0 else 0.0


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a ``(N,)`` array, ties sharing their average rank (scipy's ``method="average"``)."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values; a tie group's ranks are averaged.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (Pearson over average ranks) of two ``(N,)`` arrays; 0.0 when undefined."""
    predictions, labels = _check_pair(predictions, labels)
    return pearson(rankdata(predictions), rankdata(labels))


def compute_metrics(
    task_type: str, metric: str, predictions: np.ndarray, labels: np.ndarray, num_classes: int | None = None
) -> dict[str, float]:
    """Every metric of the task type, with the headline one guaranteed present.

    Args:
        task_type: ``classification`` or ``regression``.
        metric: the task's headline metric (``accuracy | f1 | mcc`` or ``pearson | spearman``).
        predictions: classification: ``(N,)`` class ids or ``(N, C)`` logits / probabilities (argmax is
            taken); regression: ``(N,)`` or ``(N, 1)`` predicted values.
        labels: ``(N,)`` class ids or float targets.
        num_classes: C for classification (F1's binary/macro choice); default ``C`` of 2-D predictions,
            else inferred from the ids.

    Returns:
        Classification: ``{"accuracy", "f1", "mcc"}``; regression: ``{"pearson", "spearman", "mse"}``;
        floats. ``metrics[metric]`` is the headline value.

    Raises:
        ValueError: an unknown task type or metric, a metric of the other task type, mismatched shapes, or
            predictions that are not finite (an argmax reads nan as the largest value, so rows of nan logits
            were class 0, and a nan regression prediction gave a plausible Spearman).
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    _check_finite(predictions)
    if task_type == "classification":
        allowed = CLASSIFICATION_METRICS
        if predictions.ndim == 2:
            num_classes = predictions.shape[1] if num_classes is None else num_classes
            predictions = predictions.argmax(axis=1)
        predictions, labels = _class_ids(predictions, "predictions"), _class_ids(labels, "labels")
        results = {
            "accuracy": accuracy(predictions, labels),
            "f1": f1(predictions, labels, num_classes),
            "mcc": matthews_corrcoef(predictions, labels, num_classes),
        }
    elif task_type == "regression":
        allowed = REGRESSION_METRICS
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
        predictions, labels = _check_pair(predictions.astype(np.float64), labels.astype(np.float64))
        results = {
            "pearson": pearson(predictions, labels),
            "spearman": spearman(predictions, labels),
            "mse": float(np.mean((predictions - labels) ** 2)),
        }
    else:
        raise ValueError(f"task type must be 'classification' or 'regression', got {task_type!r}")
    if metric not in allowed:
        raise ValueError(f"metric {metric!r} does not apply to a {task_type} task; expected one of {list(allowed)}")
    return results


def non_finite_rows(predictions: np.ndarray) -> np.ndarray:
    """Positions of the rows of ``predictions`` (``(N,)`` values or ``(N, C)`` logits) holding nan or inf."""
    predictions = np.asarray(predictions)
    if not np.issubdtype(predictions.dtype, np.floating):
        return np.zeros(0, dtype=np.int64)
    bad = ~np.isfinite(predictions)
    return np.flatnonzero(bad.any(axis=1) if bad.ndim == 2 else bad)


def _check_finite(predictions: np.ndarray) -> None:
    rows = non_finite_rows(predictions)
    if len(rows):
        raise ValueError(
            f"{len(rows)} of {len(predictions)} predictions are not finite (nan or inf; rows {listed(rows)}): the "
            "model's outputs overflowed (fp16) or its weights are not finite, and no metric over them means anything"
        )


def predicted_classes(logits: np.ndarray) -> int:
    """How many different classes the argmax of ``(N, C)`` logits predicts (1: every prediction is one class)."""
    return int(len(np.unique(np.asarray(logits).argmax(axis=1))))
