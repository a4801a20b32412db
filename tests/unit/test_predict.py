"""evaluate_classifier and launch/evaluate.py: bad label columns and flags are one clear error, not null metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dist_kd.data.tasks import resolve_task_spec
from dist_kd.predict import evaluate_classifier

LABELS = ["neg", "pos"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from dist_kd.testing import build_tiny_bert

    directory = tmp_path_factory.mktemp("classifier")
    return build_tiny_bert(
        directory, num_layers=1, model_class="BertForSequenceClassification", max_position_embeddings=64,
        num_labels=2, id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from dist_kd.testing import random_sentences

    path = tmp_path_factory.mktemp("data") / "dev.jsonl"
    rows = [{"text": s, "category": LABELS[i % 2]} for i, s in enumerate(random_sentences(6, seed=1))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _spec(label: str | None):
    return resolve_task_spec("demo", labels=LABELS, text_a="text", label=label)


def _evaluate_main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    try:
        from launch.evaluate import main
    finally:
        sys.path.pop(0)
    return main(argv)


def test_a_misspelt_label_column_is_an_error_naming_the_file_and_columns(classifier, data):
    with pytest.raises(ValueError, match=rf"data {data} has no label column 'categroy' .*columns found: \['text', "):
        evaluate_classifier(classifier, _spec("categroy"), data)
    # The named column that exists is scored; data without the default column stays a test set.
    assert evaluate_classifier(classifier, _spec("category"), data)["metrics"]["accuracy"] is not None
    report = evaluate_classifier(classifier, _spec("label"), data)
    assert report["metrics"] is None and report["num_rows"] == 6


def test_evaluate_command_exits_2_on_a_misspelt_label_column(classifier, data, capsys):
    argv = ["--model", str(classifier), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
    assert _evaluate_main([*argv, "--label", "categroy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data {data} has no label column 'categroy'") and err.count("\n") == 1
