"""launch/task.py --debug (one process, a free port) on three tasks of different kinds: a 3-class task with a
soft-target store, a 2-class and a regression task on hard labels. Cheap: the store is written directly
(no teachers to fine-tune), the student has 2 layers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dist_kd.testing import random_sentences, topic_examples
from tests.e2e.conftest import run_script, snapshot

LABELS = ["business", "politics", "sport"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _store(root: Path, rows: list[dict]) -> Path:
    """A soft-target store for 'topic': targets that lean to each row's label (as a good ensemble's would)."""
    import numpy as np
    import pyarrow as pa

    from dist_kd.data import soft_targets as st

    labels = np.array([LABELS.index(row["label"]) for row in rows])
    probs = np.full((len(rows), 3), 0.1, dtype=np.float32)
    probs[np.arange(len(rows)), labels] = 0.8
    examples = pa.table({
        "example_id": [f"topic-{i}" for i in range(len(rows))], "text_a": [row["text"] for row in rows],
        "text_b": pa.array([None] * len(rows), pa.string()), "label": pa.array(labels.tolist(), pa.int64()),
    })  # fmt: skip
    metadata = st.StoreMetadata(
        task="topic", task_type="classification", label_names=LABELS, temperature=1.0,
        teachers=[{"path": "t1", "sha256": "0"}], source_data={"path": "topic_train.jsonl"},
    )  # fmt: skip
    st.write_soft_targets(st.build_rows(examples, "topic", probs, None, "classification"), root / "soft", metadata)
    return root / "soft"


@pytest.fixture(scope="module")
def tasks_root(tmp_path_factory):
    from dist_kd.testing import build_tiny_bert

    root = tmp_path_factory.mktemp("multitask")
    build_tiny_bert(root / "student", seed=5, num_layers=2, initializer_range=0.1)
    topic = topic_examples(260, seed=1, num_keywords=3)
    _store(root, topic[:200])
    _jsonl(root / "topic_dev.jsonl", topic[200:])
    sentences = random_sentences(160, seed=5, min_words=4, max_words=12)
    yes_no = [{"text": s, "label": "yes" if len(s.split()) > 8 else "no"} for s in sentences]
    _jsonl(root / "long_train.jsonl", yes_no[:40])  # a small task beside a large one
    _jsonl(root / "long_dev.jsonl", yes_no[120:])
    share = [{"text": s, "score": s.split().count("the") / len(s.split())} for s in sentences]
    _jsonl(root / "share_train.jsonl", share[:120])
    _jsonl(root / "share_dev.jsonl", share[120:])
    return root


def _config(root: Path, out: Path, **sections) -> Path:
    config = {
        "student": {"path": str(root / "student")},
        "tasks": [
            {
                "name": "topic",
                "labels": LABELS,
                "soft_targets": str(root / "soft"),
                "dev": str(root / "topic_dev.jsonl"),
                "text_a": "text",
            },
            {
                "name": "long",
                "labels": ["no", "yes"],
                "train": str(root / "long_train.jsonl"),
                "dev": str(root / "long_dev.jsonl"),
                "text_a": "text",
            },
            {
                "name": "share",
                "type": "regression",
                "train": str(root / "share_train.jsonl"),
                "dev": str(root / "share_dev.jsonl"),
                "text_a": "text",
                "label": "score",
            },
        ],  # fmt: skip
        "data": {"micro_batch_size": 8, "max_length": 32},
        "train": {"epochs": 2, "lr": 2.0e-3, "warmup_ratio": 0.1},
        "deepspeed": {"config": "ds_configs/zero0.json"},
        "run": {
            "output_dir": str(out),
            "log_every": 4,
            "save_every": 0,
            "progress": False,
            "report_to": ["tensorboard"],
        },
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def run(tasks_root):
    out = tasks_root / "run"
    run_script("launch/task.py", "--debug", "--config", str(_config(tasks_root, out)))
    return out


def test_each_best_classifier_card_loads_that_classifier(run):
    """best/<task>/README.md tells the reader to load best/<task>, not the final tasks/<task> (another model)."""
    for name in ("topic", "long", "share"):
        best_card = (run / "best" / name / "README.md").read_text()
        assert f'model="{run / "best" / name}"' in best_card, best_card
        assert f'model="{run / "tasks" / name}"' in (run / "tasks" / name / "README.md").read_text()


def test_metrics_lines_carry_the_dev_figures_of_each_evaluation(run):
    """docs/contracts.md: metrics.jsonl has the dev metrics at eval steps (they went to eval.json and the
    trackers only). An evaluation step gets a line even off the log_every grid."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    history = json.loads((run / "eval.json").read_text())["history"]
    assert len(history) == 2 and any(h["step"] % 4 for h in history), "an epoch should end off the log grid"
    with_dev = {r["step"]: r["dev"] for r in records if "dev" in r}
    assert with_dev == {h["step"]: h["tasks"] for h in history}
    assert [r["step"] for r in records] == sorted({*range(4, history[-1]["step"] + 1, 4), *with_dev})


def test_trackers_get_each_tasks_loss_and_dev_figures_once_per_evaluation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"task_loss/{name}" for name in ("topic", "long", "share")} <= tags  # they were left out
    history = json.loads((run / "eval.json").read_text())["history"]
    accuracy = [(e.step, round(e.value, 6)) for e in events.Scalars("dev/topic/accuracy")]
    assert accuracy == [(h["step"], round(h["tasks"]["topic"]["accuracy"], 6)) for h in history]
    assert "dev/share/pearson" in tags and "task_batches/long" in tags


def test_resume_with_another_feed_forward_width_is_refused_in_one_line(tasks_root, run):
    """The student's intermediate_size was not in the checkpoint's meta: a resume with another one got past the
    checks and failed in DeepSpeed's load with a traceback of size mismatches."""
    before = snapshot(run)
    config = _config(tasks_root, run)
    proc = run_script("launch/task.py", "--debug", "--config", str(config), "train.epochs=3", "student.init=random",
                      "student.intermediate_size=48", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "student.intermediate_size: checkpoint has 64, this run has 48" in errors[0]
    assert "Traceback" not in proc.stderr
    assert snapshot(run) == before


POISON_AT_STEP_3 = """
import sys
import torch
from dist_kd.main import main
from dist_kd.train.task import TaskTrainer

step = TaskTrainer.train_step


def poisoned(self, task_index, rows):  # the update of step 3 leaves nan weights, as a step on a nan loss does
    terms = step(self, task_index, rows)
    if self.step == 2:
        with torch.no_grad():
            next(self.engine.module.parameters()).fill_(float("nan"))
    return terms


TaskTrainer.train_step = poisoned
sys.exit(main(["task", "--debug", *sys.argv[1:]]))
"""


def test_a_diverged_student_stops_before_its_dev_evaluation_and_keeps_the_best_classifiers(tasks_root):
    """Diverged weights went on to the dev evaluation (best/ could take them), the checkpoints and the export."""
    out = tasks_root / "diverged"
    config = _config(tasks_root, out, eval={"every": 2}, run={"save_every": 2, "log_every": 1})
    proc = run_script("-c", POISON_AT_STEP_3, "--config", str(config), check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    said = (
        "error: the student diverged by step 4: its weights are no longer finite (nan or inf; found before the "
        f"dev evaluation). Nothing of it was saved; {out / 'checkpoints' / 'step-00000002'} is its last checkpoint"
    )
    assert errors[0].startswith(said), errors[0]
    assert sorted(path.name for path in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    for task in ("topic", "long", "share"):  # the step-2 evaluation's classifiers
        assert json.loads((out / "best" / task / "best.json").read_text())["step"] == 2
    assert not (out / "tasks").exists() and "Traceback" not in proc.stderr


def test_a_warning_of_the_config_is_in_the_logs_format_and_follows_the_log_level(tasks_root, tmp_path):
    """The config is read before the process group starts: its warnings came before logging was set up, as
    bare lines that --log-level error did not silence."""
    config = _config(tasks_root, tmp_path / "run", student={"path": str(tmp_path / "missing")})
    data = yaml.safe_load(config.read_text())
    data["tasks"][0]["train"] = str(tasks_root / "long_train.jsonl")  # beside its soft targets: not read
    config.write_text(yaml.safe_dump(data))
    for level, shown in (("info", True), ("error", False)):
        proc = run_script("launch/task.py", "--config", str(config), "--log-level", level, check=False)
        assert proc.returncode == 2 and "student.path" in proc.stderr.splitlines()[-1], proc.stderr
        warned = re.search(r"^[\d-]+ [\d:,]+ \[rank 0\] WARNING dist_kd\.[\w.]+: task 'topic': train .* is not read",
                           proc.stderr, re.MULTILINE)  # fmt: skip
        assert bool(warned) is shown and ("is not read" in proc.stderr) is shown, proc.stderr
