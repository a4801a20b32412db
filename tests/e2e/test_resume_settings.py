"""Resuming with other data or loss settings, end to end (one process each, --debug: a free port): a change that would
re-cut the epoch in progress is refused in one line before anything is loaded or written; one under which the
data position carries over trains on, with a warning naming it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dist_kd.testing import topic_examples
from tests.e2e.conftest import run_script, snapshot

GENERAL = [
    "launch/general.py", "--debug", "--config", "launch/configs/quickstart.yaml", "student.num_layers=2",
    "student.hidden_size=16", "student.num_heads=4", "student.intermediate_size=32", "student.init=random",
    "eval.texts=null", "teacher.dtype=fp32", "run.log_every=2", "run.save_every=0", "data.num_workers=0",
]  # fmt: skip


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_general_resume_refuses_another_shuffle_and_trains_on_with_another_batch(tiny_bert_dir, tiny_corpus, tmp_path):
    out = tmp_path / "general"
    args = [*GENERAL, f"teacher.path={tiny_bert_dir}", f"data.shards={tiny_corpus / 'shards'}", f"run.output_dir={out}"]
    run_script(*args, "data.micro_batch_size=4", "train.max_steps=4")
    before = snapshot(out)
    # The stream refused its own state only after DeepSpeed had loaded the checkpoint, naming no config key.
    proc = run_script(*args, "data.micro_batch_size=4", "train.max_steps=6", "data.shuffle=false", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [error] = _errors(proc)
    assert "data.shuffle: checkpoint has True, this run has False" in error and "dist-kd export" in error
    assert "Traceback" not in proc.stderr and "resumed from" not in proc.stderr
    assert snapshot(out) == before
    # Another projection is other parameters: it failed inside DeepSpeed's load.
    proc = run_script(*args, "data.micro_batch_size=4", "train.max_steps=6", "distill.projection=auto", check=False)
    assert proc.returncode == 2 and "distill.projection: checkpoint has 'select', this run has 'auto'" in proc.stderr
    assert snapshot(out) == before
    # Another micro-batch size and accumulation: the stream counts sequences; the run trains on and says so.
    # So does another loss weight.
    # So do another dropout, clipping and teacher precision (accepted without a word before; on a CPU an fp16
    # teacher runs in fp32, so bf16 is the change there).
    proc = run_script(*args, "data.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=6",
                      "distill.weights.attn=0.5", "student.dropout=0.0", "train.clip=0.5",
                      "teacher.dtype=bf16")  # fmt: skip
    assert "data.micro_batch_size 4 -> 2, train.grad_accum 1 -> 2" in proc.stderr, proc.stderr[-3000:]
    assert "distill.weights.attn 1.0 -> 0.5" in proc.stderr
    assert "student.dropout 0.1 -> 0.0, train.clip 1.0 -> 0.5, teacher.dtype fp32 -> bf16" in proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def _task_config(
    tmp_path: Path, student: Path, name: str, num_rows: int, max_steps: int, log_every: int, **extra
) -> tuple[Path, Path]:
    """A one-task topic config (``num_rows`` training rows) at ``tmp_path/NAME.yaml``, output ``tmp_path/NAME``;
    ``extra``: more top-level sections. Returns (config path, output directory)."""
    rows = topic_examples(num_rows, seed=num_rows)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / name
    config = {
        "student": {"path": str(student)},
        "tasks": [{"name": "topic", "labels": ["business", "politics", "sport"],
                   "train": str(tmp_path / "train.jsonl"), "text_a": "text"}],
        "data": {"micro_batch_size": 8, "max_length": 32},
        "train": {"max_steps": max_steps, "lr": 1e-3},
        "deepspeed": {"config": "ds_configs/zero0.json"},
        "run": {"output_dir": str(out), "log_every": log_every, "save_every": 0, "progress": False},
        **extra,
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, out


def test_task_resume_refuses_another_micro_batch_under_length_grouping(tiny_bert_dir, tmp_path):
    path, out = _task_config(tmp_path, tiny_bert_dir, "task", num_rows=96, max_steps=4, log_every=2)
    run_script("launch/task.py", "--debug", "--config", str(path))
    before = snapshot(out)
    # Each task's epoch order groups micro_batch_size rows by length: the saved row counter would point into
    # another order, and rows of the epoch in progress came twice or not at all.
    proc = run_script("launch/task.py", "--debug", "--config", str(path), "train.max_steps=6",
                      "data.micro_batch_size=4", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    [error] = _errors(proc)
    assert "data.micro_batch_size: checkpoint has 8, this run has 4" in error
    assert f"dist-kd export --checkpoint {out / 'checkpoints' / 'step-00000004'} --output DIR" in error
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before
    # Switching the grouping off re-orders the epoch in progress as well.
    proc = run_script("launch/task.py", "--debug", "--config", str(path), "train.max_steps=6",
                      "data.group_by_length=false", check=False)  # fmt: skip
    assert proc.returncode == 2 and "data.group_by_length: checkpoint has True, this run has False" in proc.stderr
    assert snapshot(out) == before
    proc = run_script("launch/task.py", "--debug", "--config", str(path), "train.max_steps=6", "train.grad_accum=2")
    assert "train.grad_accum 1 -> 2" in proc.stderr, proc.stderr[-3000:]
    assert json.loads(Path(out / "checkpoints" / "step-00000006" / "meta.json").read_text())["step"] == 6


def test_intermediate_phase_resume_with_another_teacher_is_refused(tiny_bert_dir, tmp_path):
    """Phase intermediate recorded no teacher in its checkpoints: a resume against another teacher (another
    tasks[].teacher or teacher.path) went on silently, its projections learnt against the first one. The same
    teacher copied elsewhere (staged to a job's disk) is the same teacher: known by its weights, it resumes."""
    import shutil

    from dist_kd.testing import build_tiny_bert

    other = build_tiny_bert(tmp_path / "other_teacher", seed=1)  # the same shape, other weights
    path, out = _task_config(
        tmp_path, tiny_bert_dir, "intermediate", num_rows=48, max_steps=2, log_every=1,
        teacher={"path": str(tiny_bert_dir), "dtype": "fp32"}, distill={"phase": "intermediate"},
    )  # fmt: skip
    run_script("launch/task.py", "--debug", "--config", str(path))
    before = snapshot(out)
    proc = run_script("launch/task.py", "--debug", "--config", str(path), "train.max_steps=3",
                      f"teacher.path={other}", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    [error] = _errors(proc)
    assert "tasks[topic].teacher.sha256: checkpoint has " in error, error
    assert f"({Path(tiny_bert_dir).resolve()}), this run has '" in error and f"({other.resolve()})" in error, error
    assert snapshot(out) == before
    staged = tmp_path / "staged_teacher"
    shutil.copytree(tiny_bert_dir, staged)
    proc = run_script("launch/task.py", "--debug", "--config", str(path), "train.max_steps=3",
                      f"teacher.path={staged}")  # fmt: skip
    assert f"tasks[topic].teacher: {Path(tiny_bert_dir).resolve()} moved to {staged.resolve()} (the same weights)" in (
        proc.stderr
    ), proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
