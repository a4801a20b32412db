"""launch/augment.py: bad input is one ``error:`` line and exit code 2, and nothing is written."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import run_script


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dist_kd.testing import build_tiny_bert

    root = tmp_path_factory.mktemp("augment_cli")
    mlm = build_tiny_bert(root / "mlm", seed=0, model_class="BertForMaskedLM", num_layers=1)
    glove = root / "glove.txt"
    glove.write_text("".join(f"{w} {i} 0.5 -1 2\n" for i, w in enumerate(["played", "goals", "markets", "team"])))
    return root, mlm, glove


def _augment(root, mlm, glove, data, *extra):
    args = ["launch/augment.py", "--task", "topic", "--labels", "sport,business", "--text-a", "text",
            "--data", str(data), "--mlm", str(mlm), "--glove", str(glove), "--output", str(root / "out"),
            "--n-a", "2", "--debug", *extra]  # fmt: skip
    return run_script(*args, check=False, timeout=300)


def _single_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_unknown_label_names_the_file_and_label(inputs):
    root, mlm, glove = inputs
    data = root / "unknown.jsonl"
    data.write_text('{"text": "the team played", "label": "sport"}\n{"text": "markets fell", "label": "weather"}\n')
    error = _single_error(_augment(root, mlm, glove, data))
    assert "weather" in error and "unknown.jsonl" in error
    assert not (root / "out").exists()


def test_missing_column_and_wrong_glove_dimension(inputs):
    root, mlm, glove = inputs
    data = root / "columns.jsonl"
    data.write_text('{"body": "the team played", "label": "sport"}\n')
    error = _single_error(_augment(root, mlm, glove, data))
    assert "text" in error and "columns.jsonl" in error

    data.write_text('{"text": "the team played", "label": "sport"}\n')
    error = _single_error(_augment(root, mlm, glove, data, "--glove-dim", "300"))
    assert "300" in error and "4" in error
    assert not (root / "out" / "augmented.parquet").exists()
