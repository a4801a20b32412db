"""docs/api.md's pipeline through dist_kd.api on tiny models, in a plain Python process: corpus, general
distillation, a 2-teacher ensemble, GloVe augmentation, soft targets, task distillation, report."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.conftest import REPO, script_env

SCRIPT = r"""
import json, sys
from pathlib import Path
from dist_kd import api
from dist_kd.data.tasks import resolve_task_spec
from dist_kd.testing import build_tiny_bert, random_sentences, topic_examples

root = Path(sys.argv[1])
teacher = build_tiny_bert(root / "teacher")
(root / "text.txt").write_text("\n\n".join(random_sentences(300, seed=1)))
for name, rows in (("train", topic_examples(96, seed=1)), ("dev", topic_examples(48, seed=2))):
    (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
(root / "glove.txt").write_text("".join(f"{w} {i} 0.5 -1 2\n" for i, w in enumerate(["game", "team", "bank", "vote"])))

api.prepare_corpus([root / "text.txt"], teacher, root / "corpus", seq_len=32, shard_size=64, num_workers=0,
                   progress=False)
general = api.general(
    "launch/configs/quickstart.yaml",
    [f"teacher.path={teacher}", f"data.shards={root / 'corpus'}", f"run.output_dir={root / 'general'}",
     "train.max_steps=4", "eval.texts=null", "data.micro_batch_size=4", "data.num_workers=0",
     "student.num_layers=2", "student.hidden_size=16", "student.num_heads=4", "student.intermediate_size=32"],
)
spec = resolve_task_spec("topic", labels=["business", "politics", "sport"], text_a="text")
api.finetune_teachers(spec, api.FinetuneConfig(
    train=str(root / "train.jsonl"), dev=str(root / "dev.jsonl"), base=str(teacher), output=str(root / "teachers"),
    num_teachers=2, epochs=1, lr=1e-3, batch_size=16,
))
teachers = [str(root / "teachers" / f"teacher-{k}") for k in (1, 2)]
augmented = api.augment_task(spec, root / "train.jsonl", root / "aug", root / "glove.txt", api.AugmentConfig(n_a=2))
api.precompute_soft_targets(spec, root / "aug", root / "soft", api.PrecomputeConfig(teachers=teachers),
                            progress=False)
task = api.task({
    "student": {"path": str(general.student)},
    "tasks": [{"name": "topic", "labels": spec.labels, "soft_targets": str(root / "soft"),
               "dev": str(root / "dev.jsonl"), "text_a": "text"}],
    "train": {"epochs": 1, "lr": 1e-3},
    "run": {"output_dir": str(root / "task")},
})
report = api.write_report(root / "task")
print(json.dumps({
    "general": [general.completed, general.summary is not None, general.student.is_dir()],
    "augmented_rows": augmented.num_rows,
    "task": [task.completed, sorted(task.eval["tasks"])],
    "report": str(report),
}))
"""


def _run(script: str, tmp_path) -> dict:
    """Run ``script`` in a plain Python process (argv[1]: ``tmp_path``); returns the JSON of its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=script_env(), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_documented_pipeline_runs_through_the_python_api(tmp_path):
    result = _run(SCRIPT, tmp_path)
    assert result["general"] == [True, True, True]
    assert result["augmented_rows"] == 96 * 3  # each example and its 2 copies
    assert result["task"] == [True, ["topic"]]
    assert result["report"] == str(tmp_path / "task" / "report.md")
    predictions = (tmp_path / "task" / "predictions" / "topic.dev.jsonl").read_text().splitlines()
    assert len(predictions) == 48


AGAIN = r"""
import json, os, subprocess, sys
from pathlib import Path
from dist_kd import api, distributed
from dist_kd.testing import build_tiny_bert, random_sentences

root = Path(sys.argv[1])
teacher = build_tiny_bert(root / "teacher")
(root / "text.txt").write_text("\n\n".join(random_sentences(200, seed=1)))
api.prepare_corpus([root / "text.txt"], teacher, root / "corpus", seq_len=32, shard_size=64, num_workers=0,
                   progress=False)
tiny = [f"teacher.path={teacher}", f"data.shards={root / 'corpus'}", "train.max_steps=2", "eval.texts=null",
        "data.micro_batch_size=4", "data.num_workers=0", "student.num_layers=2", "student.hidden_size=16",
        "student.num_heads=4", "student.intermediate_size=32"]
names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
before = {key: os.environ.get(key) for key in names}
first = api.general("launch/configs/quickstart.yaml", [*tiny, f"run.output_dir={root / 'a'}"])
during = {key: os.environ.get(key) for key in names}
# A command started from this process while its group runs (a notebook's `!dist-kd general ...`).
child = subprocess.run([sys.executable, "-m", "dist_kd", "general", "--config", "launch/configs/quickstart.yaml",
                        *tiny, f"run.output_dir={root / 'b'}"], capture_output=True, text=True)
distributed.teardown()
after = {key: os.environ.get(key) for key in names}
second = api.general("launch/configs/quickstart.yaml", [*tiny, f"run.output_dir={root / 'c'}"])
print(json.dumps({"before": before, "during": during, "after": after, "child": [child.returncode, child.stderr[-2000:]],
                  "completed": [first.completed, second.completed]}))
"""


def test_a_process_goes_on_after_a_run_and_after_teardown(tmp_path):
    """A child command started while the API's group runs picks its own port (it inherited RANK=0, WORLD_SIZE=1
    and the parent's MASTER_PORT, took them for a launcher's and was refused: "the rendezvous port ... is in use");
    teardown gives the caller back its environment, and a run after it works (DeepSpeed's cached groups named the
    destroyed group: "Group ... is not registered")."""
    result = _run(AGAIN, tmp_path)
    assert result["before"] == dict.fromkeys(result["before"])  # script_env sets none of them
    assert result["during"]["WORLD_SIZE"] == "1" and result["during"]["MASTER_PORT"]
    assert result["child"][0] == 0, result["child"][1]
    assert (tmp_path / "b" / "student" / "config.json").is_file()
    assert result["after"] == result["before"]
    assert result["completed"] == [True, True]
