"""Sentence pairs on models with one segment embedding (``type_vocab_size`` 1): a BERT tokenizer gives the
second text segment id 1, which indexed past such a model's embedding (an IndexError in evaluate, precompute,
finetune and the task stage). Such a model now reads every text as segment 0, as plain transformers does when
given no segment ids."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dist_kd.data.encode import pad_rows, tokenize_rows, uses_token_types
from dist_kd.data.tasks import resolve_task_spec
from dist_kd.testing import build_tiny_bert, random_sentences

LABELS = ["no", "yes"]


def _classifier(directory, type_vocab_size: int, seed: int = 0):
    return build_tiny_bert(
        directory, seed=seed, model_class="BertForSequenceClassification", num_layers=2,
        type_vocab_size=type_vocab_size, num_labels=2, id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )  # fmt: skip


def _pairs(path, num: int, seed: int) -> list[dict]:
    rows = [
        {"id": f"r{i}", "a": a, "b": b, "label": LABELS[i % 2]}
        for i, (a, b) in enumerate(zip(random_sentences(num, seed=seed), random_sentences(num, seed=seed + 1)))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def _reference_logits(model_dir, rows) -> np.ndarray:
    """Plain transformers, one pair at a time, given no segment ids (all 0)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return np.stack([
            model(**tokenizer(row["a"], row["b"], return_tensors="pt", return_token_type_ids=False)).logits[0].numpy()
            for row in rows
        ])  # fmt: skip


def test_segment_ids_go_only_to_models_with_a_second_segment(tiny_tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert uses_token_types(tokenizer)  # no model named: the tokenizer decides
    assert uses_token_types(tokenizer, BertConfig(type_vocab_size=2))
    assert not uses_token_types(tokenizer, BertConfig(type_vocab_size=1))
    assert not uses_token_types(tokenizer, BertConfig(type_vocab_size=0))


def test_evaluate_scores_pairs_on_a_one_segment_classifier(tmp_path):
    from dist_kd.predict import evaluate_classifier

    model_dir = _classifier(tmp_path / "clf", type_vocab_size=1)
    rows = _pairs(tmp_path / "dev.jsonl", 10, seed=3)
    spec = resolve_task_spec("pairs", labels=LABELS, text_a="a", text_b="b", id_column="id")
    result = evaluate_classifier(model_dir, spec, tmp_path / "dev.jsonl", batch_size=4, output=tmp_path / "out")
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    expected = _reference_logits(model_dir, rows)
    np.testing.assert_allclose([p["logits"] for p in predictions], expected, atol=1e-5)
    accuracy = np.mean(expected.argmax(1) == np.arange(len(rows)) % 2)
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy)


def test_precompute_scores_pairs_on_a_one_segment_teacher(tmp_path):
    from dist_kd.data import soft_targets as st
    from dist_kd.precompute import PrecomputeConfig, precompute_soft_targets

    teachers = [str(_classifier(tmp_path / "t1", type_vocab_size=1, seed=1)),
                str(_classifier(tmp_path / "t2", type_vocab_size=2, seed=2))]  # fmt: skip
    rows = _pairs(tmp_path / "train.jsonl", 9, seed=5)
    spec = resolve_task_spec("pairs", labels=LABELS, text_a="a", text_b="b", id_column="id")
    config = PrecomputeConfig(teachers=teachers, dtype="fp32", batch_size=4, keep_teacher_logits=True)
    precompute_soft_targets(spec, tmp_path / "train.jsonl", tmp_path / "st", config, progress=False)
    logits = st.load_soft_targets(tmp_path / "st", expected_labels=LABELS, task="pairs").teacher_logits()
    np.testing.assert_allclose(logits[:, 0], _reference_logits(teachers[0], rows), atol=2e-5)
    # The two-segment teacher in the same ensemble still reads the pair's segments.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teachers[1])
    model = AutoModelForSequenceClassification.from_pretrained(teachers[1]).eval()
    with torch.no_grad():
        expected = np.stack([model(**tokenizer(r["a"], r["b"], return_tensors="pt")).logits[0].numpy() for r in rows])
    np.testing.assert_allclose(logits[:, 1], expected, atol=2e-5)


def test_a_one_segment_teachers_features_ignore_segment_ids(tmp_path):
    from transformers import AutoTokenizer

    from dist_kd.models.teacher import Teacher

    model_dir = build_tiny_bert(tmp_path / "enc", num_layers=2, type_vocab_size=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = tokenize_rows(tokenizer, random_sentences(3, seed=1), random_sentences(3, seed=2), 64)
    batch = pad_rows(rows, np.arange(3), 0)
    assert int(batch["token_type_ids"].max()) == 1
    teacher = Teacher(model_dir, dtype="fp32", score_layers=[1, 2])
    given = teacher.features(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    zeros = teacher.features(batch["input_ids"], batch["attention_mask"], torch.zeros_like(batch["token_type_ids"]))
    torch.testing.assert_close(given.embeddings, zeros.embeddings)
    torch.testing.assert_close(given.last_hidden, zeros.last_hidden)
    assert sorted(given.scores) == [1, 2]
    for layer in (1, 2):
        torch.testing.assert_close(given.scores[layer], zeros.scores[layer])


TASK_SCRIPT = r"""
import json, sys
from pathlib import Path
from dist_kd import api

root = Path(sys.argv[1])
phase = sys.argv[2]
from dist_kd.models.teacher import Teacher
seen = []  # the largest segment id each teacher call was given (None: none given)
features = Teacher.features
def recording(self, input_ids, attention_mask, token_type_ids=None):
    seen.append(None if token_type_ids is None else int(token_type_ids.max()))
    return features(self, input_ids, attention_mask, token_type_ids)
Teacher.features = recording
task = {"name": "pairs", "labels": ["no", "yes"], "train": str(root / "train.jsonl"), "dev": str(root / "dev.jsonl"),
        "text_a": "a", "text_b": "b", "id_column": "id"}
if phase == "intermediate":
    task["teacher"] = str(root / "teacher")
result = api.task({
    "student": {"path": str(root / "student")},
    "tasks": [task],
    "distill": {"phase": phase},
    "data": {"micro_batch_size": 4},
    "train": {"max_steps": 3, "lr": 1e-3},
    "run": {"output_dir": str(root / phase)},
})
print(json.dumps({"completed": result.completed, "teacher_segments": max((v for v in seen if v is not None),
                                                                             default=None)}))
"""


@pytest.mark.parametrize(("phase", "teacher_types"), [("prediction", 1), ("intermediate", 1), ("intermediate", 2)])
def test_the_task_stage_trains_pairs_on_one_segment_models(tmp_path, phase, teacher_types):
    """Phase intermediate: a teacher with two segment embeddings still reads the pairs' segment ids beside a
    one-segment student (they were dropped for both)."""
    from tests.e2e.conftest import REPO, script_env

    build_tiny_bert(tmp_path / "student", num_layers=2, type_vocab_size=1)
    build_tiny_bert(tmp_path / "teacher", num_layers=2, type_vocab_size=teacher_types, seed=3)
    _pairs(tmp_path / "train.jsonl", 12, seed=7)
    dev = _pairs(tmp_path / "dev.jsonl", 6, seed=9)
    proc = subprocess.run(
        [sys.executable, "-c", TASK_SCRIPT, str(tmp_path), phase], cwd=REPO, env=script_env(), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["completed"]
    if phase == "intermediate":  # given the ids (1 on second texts) wherever it has a second segment embedding
        assert result["teacher_segments"] == 1
    if phase == "prediction":  # the exported classifier scores dev as plain transformers does without segment ids
        predictions = (tmp_path / phase / "predictions" / "pairs.dev.jsonl").read_text().splitlines()
        logits = [json.loads(line)["logits"] for line in predictions]
        np.testing.assert_allclose(logits, _reference_logits(tmp_path / phase / "tasks" / "pairs", dev), atol=1e-4)
