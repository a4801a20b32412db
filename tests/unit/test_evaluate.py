"""Task metrics against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dist_kd.evaluate import (
    accuracy,
    compute_metrics,
    confusion_matrix,
    f1,
    matthews_corrcoef,
    pearson,
    rankdata,
    spearman,
)

# Binary: TP = 3 (rows 0, 2, 6), FN = 1 (row 1), FP = 2 (rows 4, 7), TN = 2 (rows 3, 5).
BIN_LABELS = np.array([1, 1, 1, 0, 0, 0, 1, 0])
BIN_PREDS = np.array([1, 0, 1, 0, 1, 0, 1, 1])


def test_binary_metrics_by_hand():
    assert accuracy(BIN_PREDS, BIN_LABELS) == pytest.approx(5 / 8)
    assert f1(BIN_PREDS, BIN_LABELS) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # positive class = index 1
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 - 2) / sqrt(5*4*4*3)
    assert matthews_corrcoef(BIN_PREDS, BIN_LABELS) == pytest.approx(4 / math.sqrt(240))


def test_binary_f1_uses_class_one_not_class_zero():
    # Swapping the class names changes F1 (class 0 here has TP=2, FP=1, FN=2 -> 4/7), not accuracy.
    assert f1(1 - BIN_PREDS, 1 - BIN_LABELS) == pytest.approx(4 / 7)
    assert accuracy(1 - BIN_PREDS, 1 - BIN_LABELS) == pytest.approx(5 / 8)


def test_multiclass_metrics_by_hand():
    labels = np.array([0, 1, 2, 0, 1, 2])
    preds = np.array([0, 1, 1, 0, 0, 2])
    assert confusion_matrix(preds, labels).tolist() == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # per class 2TP / (predicted + actual): class 0: 4/5, class 1: 2/4, class 2: 2/3; macro average
    assert f1(preds, labels) == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    # correct c=4, total s=6, predicted p=[3,2,1], true t=[2,2,2]:
    # (c*s - p.t) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt(22 * 24)
    assert matthews_corrcoef(preds, labels) == pytest.approx(12 / math.sqrt(22 * 24))


def test_multiclass_mcc_reduces_to_binary_formula():
    assert matthews_corrcoef(BIN_PREDS, BIN_LABELS, num_classes=2) == pytest.approx(4 / math.sqrt(240))


def test_mcc_of_unbalanced_classes_is_the_correlation_of_one_hot_codes():
    """The hand-worked cases above have balanced classes, where predicted.actual = actual.actual: unbalanced ones
    against the binary formula and against R_K's definition (Gorodkin 2004) as the correlation of the one-hot
    coded predictions and labels, summed over the classes."""
    # TP=3, FP=1, TN=1, FN=0: (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 3 / sqrt(4*3*2*1)
    assert matthews_corrcoef(np.array([1, 1, 1, 1, 0]), np.array([1, 1, 1, 0, 0])) == pytest.approx(3 / math.sqrt(24))
    rng = np.random.default_rng(0)
    for _ in range(50):
        classes, rows = int(rng.integers(2, 6)), int(rng.integers(5, 80))
        labels = rng.choice(classes, size=rows, p=rng.dirichlet(np.ones(classes) * 0.7))
        preds = np.where(rng.random(rows) < 0.6, labels, rng.integers(0, classes, size=rows))
        x = np.eye(classes)[preds] - np.eye(classes)[preds].mean(0)
        y = np.eye(classes)[labels] - np.eye(classes)[labels].mean(0)
        denominator = math.sqrt((x * x).sum() * (y * y).sum())
        expected = (x * y).sum() / denominator if denominator > 0 else 0.0
        assert matthews_corrcoef(preds, labels, num_classes=classes) == pytest.approx(expected, abs=1e-12)


def test_correlations_by_hand():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([2.0, 4.0, 5.0, 4.0])
    # deviations (-1.5, -.5, .5, 1.5) and (-1.75, .25, 1.25, .25): sum of products 3.5, squares 5 and 4.75
    assert pearson(x, y) == pytest.approx(3.5 / math.sqrt(5 * 4.75))
    # y's ranks with the tie averaged: (1, 2.5, 4, 2.5) -> products 3, squares 5 and 4.5
    assert rankdata(y).tolist() == [1.0, 2.5, 4.0, 2.5]
    assert spearman(x, y) == pytest.approx(3 / math.sqrt(5 * 4.5))
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, -2 * x + 1) == pytest.approx(-1.0)


def test_degenerate_inputs_score_zero_not_nan():
    constant = np.zeros(4)
    assert pearson(constant, np.arange(4.0)) == 0.0
    assert spearman(constant, np.arange(4.0)) == 0.0
    assert matthews_corrcoef(np.zeros(4, dtype=int), np.array([0, 1, 0, 1])) == 0.0


def test_compute_metrics_classification_takes_logits():
    logits = np.eye(2)[BIN_PREDS] * 3.0 - 1.0  # argmax = BIN_PREDS
    metrics = compute_metrics("classification", "f1", logits, BIN_LABELS)
    assert set(metrics) == {"accuracy", "f1", "mcc"}
    assert metrics["f1"] == pytest.approx(6 / 9)
    assert metrics == compute_metrics("classification", "accuracy", BIN_PREDS, BIN_LABELS)
    json.dumps(metrics)  # plain floats


def test_compute_metrics_three_class_logits_are_macro_even_if_one_class_is_absent():
    # 3-column logits: F1 is macro over 3 classes though only ids 0 and 1 occur.
    logits = np.eye(3)[BIN_PREDS]
    per_class = [2 * 2 / (3 + 4), 6 / 9, 0.0]  # class 0: TP 2, predicted 3, actual 4
    assert compute_metrics("classification", "f1", logits, BIN_LABELS)["f1"] == pytest.approx(np.mean(per_class))


def test_compute_metrics_regression():
    predictions = np.array([[1.0], [2.0], [3.0], [4.0]])
    metrics = compute_metrics("regression", "pearson", predictions, np.array([2.0, 4.0, 5.0, 4.0]))
    assert metrics["pearson"] == pytest.approx(3.5 / math.sqrt(23.75))
    assert metrics["mse"] == pytest.approx((1 + 4 + 4 + 0) / 4)


@pytest.mark.parametrize(
    ("task_type", "metric", "predictions", "labels", "match"),
    [
        ("classification", "pearson", [0, 1], [0, 1], "does not apply"),
        ("regression", "accuracy", [0.0, 1.0], [0.0, 1.0], "does not apply"),
        ("ranking", "accuracy", [0], [0], "task type"),
        ("classification", "accuracy", [0, 1, 1], [0, 1], "3 predictions but 2 labels"),
        ("classification", "accuracy", [], [], "no examples"),
    ],
)
def test_compute_metrics_errors(task_type, metric, predictions, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(task_type, metric, np.array(predictions), np.array(labels))


def test_predictions_that_are_not_finite_are_refused_not_scored():
    # argmax reads nan as the largest value: two rows of nan logits were class 0 and, with labels 0, scored 1.0;
    # a nan regression prediction ranked last gave Spearman 0.4 and Pearson 0.0
    logits = np.array([[np.nan, np.nan], [0.0, 1.0], [np.nan, 0.5], [1.0, 0.0]])
    with pytest.raises(ValueError, match=r"2 of 4 predictions are not finite \(nan or inf; rows 0, 2\)"):
        compute_metrics("classification", "accuracy", logits, np.array([0, 1, 0, 0]))
    with pytest.raises(ValueError, match=r"1 of 5 predictions are not finite \(nan or inf; rows 3\)"):
        compute_metrics("regression", "spearman", np.array([1.0, 2.0, 3.0, np.inf, 5.0]), np.arange(5.0))
    assert compute_metrics("classification", "accuracy", np.array([1, 0]), np.array([1, 0]))["accuracy"] == 1.0


def test_one_dimensional_fractions_are_refused_as_class_ids():
    # P(positive) as (N,) floats was cast to class 0 for every row: accuracy 0.25 where the argmax gives 1.0
    probabilities = np.array([0.9, 0.2, 0.8, 0.1])
    with pytest.raises(ValueError, match=r"predictions must be whole class ids, found 0\.9; .*shape \(N, C\)"):
        compute_metrics("classification", "accuracy", probabilities, np.array([1, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"labels must be whole class ids, found 1\.7"):
        compute_metrics("classification", "accuracy", np.array([1, 1, 0, 1]), np.array([1.7, 1.2, 0.4, 1.0]))
    with pytest.raises(ValueError, match=r"labels must be whole class ids, found 0\.5"):
        f1(np.array([0, 1]), np.array([0.5, 1.0]), num_classes=2)
    two_columns = np.stack([1 - probabilities, probabilities], axis=1)  # the same as (N, C): scored
    assert compute_metrics("classification", "accuracy", two_columns, np.array([1, 0, 1, 0]))["accuracy"] == 1.0
    # whole numbers in a float array (labels read from a Parquet float column) are ids
    assert compute_metrics("classification", "accuracy", np.array([1.0, 0.0]), np.array([1.0, 0.0]))["accuracy"] == 1.0


def test_class_id_out_of_range():
    with pytest.raises(ValueError, match="0..1"):
        f1(np.array([0, 2]), np.array([0, 1]), num_classes=2)


def test_predicted_classes_counts_distinct_argmax():
    import numpy as np

    from dist_kd.evaluate import predicted_classes

    assert predicted_classes(np.array([[0.1, 0.9], [0.2, 0.8]])) == 1
    assert predicted_classes(np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.0, 0.1, 0.9]])) == 3
