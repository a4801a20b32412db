"""The task stage with DistilBERT and ModernBERT, whose classifiers have their own head layouts: fine-tuned
teachers, their soft targets, TinyBERT's two task phases from a student cut from a teacher, and the export of a
task's classifier from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dist_kd.testing import build_tiny_encoder, topic_examples
from tests.e2e.conftest import run_script

LABELS = ["business", "politics", "sport"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _task_config(root: Path, out: Path, **sections) -> Path:
    topic = {"name": "topic", "labels": LABELS, "soft_targets": str(root / "soft"), "text_a": "text"}
    config = {
        "tasks": [{**topic, "dev": str(root / "dev.jsonl")}],
        "distill": {"soft_weight": 1.0, "hard_weight": 0.0},
        "data": {"micro_batch_size": 8, "max_length": 32},
        "train": {"epochs": 1, "lr": 2.0e-3, "warmup_ratio": 0.1},
        "deepspeed": {"config": "ds_configs/zero2.json"},
        "run": {"output_dir": str(out), "log_every": 5, "save_every": 20, "progress": False},
        **sections,
    }
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("family", ["distilbert", "modernbert"])
def test_task_stage_of_a_family_with_its_own_head_layout(family, tmp_path):
    """A fine-tuned teacher of the family, its soft targets, the intermediate phase against it from a student
    cut from it (the teacher's classifier directory read as an encoder), the prediction phase from that
    student; the run's classifier is a stock classifier of the family, and dist-kd export of the run's last
    checkpoint gives it again, logits and all."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path
    base = build_tiny_encoder(root / "base", family, num_layers=4, hidden_size=32, num_heads=4, initializer_range=0.1)
    rows = topic_examples(600, seed=1, num_keywords=3)
    _jsonl(root / "train.jsonl", rows[:400])
    _jsonl(root / "dev.jsonl", rows[400:])
    labels = ",".join(LABELS)
    run_script(
        "launch/finetune.py", "--task", "topic", "--labels", labels, "--text-a", "text",
        "--train", str(root / "train.jsonl"), "--dev", str(root / "dev.jsonl"), "--base", str(base),
        "--output", str(root / "teachers"), "--num-teachers", "1", "--epochs", "2", "--lr", "1e-3",
        "--batch-size", "16", "--max-length", "32", "--cpu",
    )  # fmt: skip
    teacher = str(root / "teachers" / "teacher-1")
    run_script(
        "launch/precompute.py", "--task", "topic", "--labels", labels, "--text-a", "text",
        "--data", str(root / "train.jsonl"), "--teachers", teacher, "--output", str(root / "soft"), "--cpu",
    )  # fmt: skip
    shape = {"path": teacher, "num_layers": 2, "hidden_size": 16, "num_heads": 4, "intermediate_size": 32}
    inter = root / "inter"
    run_script("launch/task.py", "--debug", "--config", str(_task_config(
        root, inter, student={**shape, "init": "teacher"}, distill={"phase": "intermediate"},
        teacher={"path": teacher, "dtype": "fp32"}, train={"max_steps": 8, "lr": 3.0e-3},
    )))  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (inter / "metrics.jsonl").read_text().splitlines()]
    assert all(loss > 0 for loss in losses) and losses[-1] < losses[0]
    pred = root / "pred"
    run_script("launch/task.py", "--debug", "--config", str(_task_config(
        root, pred, student={"path": str(inter / "student")},
    )))  # fmt: skip
    classifier = AutoModelForSequenceClassification.from_pretrained(pred / "tasks" / "topic").eval()
    assert type(classifier).__name__.startswith({"distilbert": "DistilBert", "modernbert": "ModernBert"}[family])
    assert classifier.config.num_hidden_layers == 2 and classifier.config.id2label == dict(enumerate(LABELS))
    history = json.loads((pred / "eval.json").read_text())["history"]
    assert 0.0 <= history[-1]["tasks"]["topic"]["accuracy"] <= 1.0

    run_script("-m", "dist_kd", "export", "--checkpoint", str(pred), "--task", "topic", "--output", str(root / "exp"))
    exported = AutoModelForSequenceClassification.from_pretrained(root / "exp").eval()
    tokenizer = AutoTokenizer.from_pretrained(pred / "tasks" / "topic")
    batch = tokenizer([row["text"] for row in rows[400:408]], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, classifier(**batch).logits)


def test_export_of_a_narrower_distilbert_student_leaves_out_its_teachers_dense_module(tiny_corpus, tmp_path):
    """dist-kd export read the modules' width from config.json's hidden_size, which DistilBERT's (dim) lacks:
    it took the student's, carried the teacher's 32-wide Dense into the 16-wide student, and
    SentenceTransformer(student).encode failed. The run's own student/ export refused it already."""
    teacher = build_tiny_encoder(tmp_path / "teacher", "distilbert", num_layers=2, hidden_size=32, num_heads=4)
    assert "hidden_size" not in json.loads((teacher / "config.json").read_text())
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (teacher / "modules.json").write_text(json.dumps(modules))
    for path, config in (("1_Pooling", {"embedding_dimension": 32, "pooling_mode": "mean"}),
                         ("2_Dense", {"in_features": 32, "out_features": 8})):  # fmt: skip
        (teacher / path).mkdir()
        (teacher / path / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    proc = run_script(
        "launch/general.py", "--debug", "--config", "launch/configs/quickstart.yaml", f"teacher.path={teacher}",
        f"data.shards={tiny_corpus / 'shards'}", f"run.output_dir={run}", "student.num_layers=1",
        "student.hidden_size=16", "student.num_heads=4", "student.intermediate_size=32", "data.micro_batch_size=4",
        "data.num_workers=0", "eval.texts=null", "train.max_steps=2", "run.save_every=2",
    )  # fmt: skip
    assert "modules made for width 32 (Dense)" in proc.stderr
    proc = run_script("-m", "dist_kd", "export", "--checkpoint", str(run), "--output", str(tmp_path / "export"))
    assert "modules made for width 32 (Dense)" in proc.stderr
    assert not (tmp_path / "export" / "modules.json").exists() and (tmp_path / "export" / "config.json").exists()
