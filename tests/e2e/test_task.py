"""launch/task.py (and launch/evaluate.py) end to end on tiny models and a learnable synthetic task.

The fixture runs the real pipeline: two teachers fine-tuned by launch/finetune.py on a 3-class topic task,
their soft targets written by launch/precompute.py, then task distillation of a small random student with
the topic task (soft targets) and a regression task without a teacher (hard labels).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from dist_kd.testing import random_sentences, topic_examples
from tests.e2e.conftest import run_script, run_until_lines_then_sigterm, snapshot

LABELS = ["business", "politics", "sport"]
SHARE_TASK = "name: share, type: regression, train: SHARE, text_a: text, label: score"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Data, two fine-tuned teachers, their soft-target store and a random 2-layer student."""
    from dist_kd.testing import build_tiny_bert

    root = tmp_path_factory.mktemp("task")
    # Initialised at 0.1 (not BERT's 0.02), models this small learn the task in a few epochs, reliably.
    base = build_tiny_bert(root / "base", seed=0, initializer_range=0.1)
    build_tiny_bert(root / "student", seed=5, num_layers=2, initializer_range=0.1)
    rows = topic_examples(900, seed=1, num_keywords=3)
    _jsonl(root / "topic_train.jsonl", rows[:600])
    _jsonl(root / "topic_dev.jsonl", rows[600:])
    # Regression without a teacher: the share of words that are "the" (a function of the text).
    sentences = [s.replace("a ", "the ", 1) for s in random_sentences(400, seed=5, min_words=4, max_words=12)]
    length = [{"text": s, "score": s.split().count("the") / len(s.split())} for s in sentences]
    _jsonl(root / "share_train.jsonl", length[:300])
    _jsonl(root / "share_dev.jsonl", length[300:])
    run_script(
        "launch/finetune.py", "--task", "topic", "--labels", ",".join(LABELS), "--text-a", "text",
        "--train", str(root / "topic_train.jsonl"), "--dev", str(root / "topic_dev.jsonl"), "--base", str(base),
        "--output", str(root / "teachers"), "--num-teachers", "2", "--epochs", "3", "--lr", "1e-3",
        "--batch-size", "16", "--max-length", "32", "--cpu",
    )  # fmt: skip
    teachers = [str(root / "teachers" / f"teacher-{k}") for k in (1, 2)]
    run_script(
        "launch/precompute.py", "--task", "topic", "--labels", ",".join(LABELS), "--text-a", "text",
        "--data", str(root / "topic_train.jsonl"), "--teachers", *teachers, "--output", str(root / "soft"), "--cpu",
    )  # fmt: skip
    return root


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _config(root: Path, out: Path, *, share: bool = True, **sections) -> Path:
    topic = {"name": "topic", "labels": LABELS, "soft_targets": str(root / "soft"), "text_a": "text"}
    tasks = [{**topic, "dev": str(root / "topic_dev.jsonl")}]
    if share:
        tasks.append({"name": "share", "type": "regression", "train": str(root / "share_train.jsonl"),
                      "dev": str(root / "share_dev.jsonl"), "text_a": "text", "label": "score"})  # fmt: skip
    config = {
        "student": {"path": str(root / "student")},
        "tasks": tasks,
        "distill": {"soft_weight": 1.0, "hard_weight": 0.0},
        "data": {"micro_batch_size": 8, "max_length": 32},
        "train": {"epochs": 3, "lr": 2.0e-3, "warmup_ratio": 0.1},
        "deepspeed": {"config": "ds_configs/zero2.json"},
        "run": {"output_dir": str(out), "log_every": 5, "save_every": 0, "progress": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _two_ranks(config: Path, port: int) -> None:
    run_script("deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/task.py", "--config", str(config))
    # DeepSpeed's CPU all-reduce leaves a ~70 MB /dev/shm file per rank unless the run unlinks it.
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"the run left its shared-memory buffers behind: {left}"


@pytest.fixture(scope="module")
def two_rank_run(pipeline):
    out = pipeline / "run2"
    _two_ranks(_config(pipeline, out), 29531)
    return out


@pytest.mark.distributed
def test_two_ranks_multitask_run_follows_the_contract(two_rank_run):
    from transformers import AutoModel, AutoModelForSequenceClassification

    records = _metrics(two_rank_run)
    for record in records:
        for key in ("step", "loss", "lr", "tokens_per_s", "samples_per_s", "task_loss", "task_batches"):
            assert key in record, key
    assert {name for r in records for name in r["task_batches"]} == {"topic", "share"}
    # tasks without a weight are drawn in proportion to their training rows: topic's 600 against share's 300 (about
    # 170 draws, so 2/3 give or take 0.036; equal weights would be 1/2)
    counts = {name: sum(r["task_batches"].get(name, 0) for r in records) for name in ("topic", "share")}
    assert abs(counts["topic"] / sum(counts.values()) - 2 / 3) < 0.08, counts
    assert any("loss_soft" in r for r in records) and any("loss_hard" in r for r in records)
    topic_losses = [r["task_loss"]["topic"] for r in records if "topic" in r["task_loss"]]
    assert np.mean(topic_losses[-3:]) < 0.8 * np.mean(topic_losses[:3]), "the topic loss should fall"
    report = json.loads((two_rank_run / "eval.json").read_text())
    assert set(report["tasks"]) == {"topic", "share"} and len(report["history"]) == 3  # one per epoch
    assert report["tasks"]["topic"]["metric"] == "accuracy" and report["tasks"]["share"]["metric"] == "pearson"
    assert report["tasks"]["topic"]["final"]["accuracy"] > 0.8  # chance is 1/3
    assert AutoModel.from_pretrained(two_rank_run / "student").config.num_hidden_layers == 2
    topic = AutoModelForSequenceClassification.from_pretrained(two_rank_run / "tasks" / "topic")
    assert [topic.config.id2label[i] for i in range(3)] == LABELS
    best = report["tasks"]["topic"]["best"]
    assert (two_rank_run / "best" / "topic" / "config.json").is_file() and best["accuracy"] >= max(
        h["tasks"]["topic"]["accuracy"] for h in report["history"]
    )
    assert (
        json.loads((two_rank_run / "checkpoints" / f"step-{report['step']:08d}" / "meta.json").read_text())[
            "world_size"
        ]
        == 2
    )
    # model cards: the final and the best classifier each with its own dev figure, the shared encoder too
    final_card = (two_rank_run / "tasks" / "topic" / "README.md").read_text()
    assert f"| topic dev accuracy (step {report['step']}) | {report['tasks']['topic']['final']['accuracy']:.4f} |" in (
        final_card
    )
    best_card = (two_rank_run / "best" / "topic" / "README.md").read_text()
    assert f"| topic dev accuracy (step {best['step']}) | {best['accuracy']:.4f} |" in best_card
    assert 'pipeline("text-classification"' in final_card and "labels: " + ", ".join(LABELS) in final_card
    assert "shared encoder" in (two_rank_run / "student" / "README.md").read_text()
    assert "A regression head for share: one output" in (two_rank_run / "tasks" / "share" / "README.md").read_text()
    # Every export's tokenizer as loaded: no truncation at the run's max_length left in it, absolute inputs in
    # the run's config.yaml (dist-kd export reads it from anywhere).
    for export in ("student", "tasks/topic", "best/topic"):
        assert json.loads((two_rank_run / export / "tokenizer.json").read_text())["truncation"] is None, export
    config = yaml.safe_load((two_rank_run / "config.yaml").read_text())
    assert all(Path(path).is_absolute() for path in (config["student"]["path"], config["tasks"][0]["soft_targets"]))


@pytest.mark.distributed
def test_deleting_the_teachers_changes_nothing(pipeline, two_rank_run):
    moved = pipeline / "teachers-away"
    shutil.move(pipeline / "teachers", moved)
    try:
        out = pipeline / "run2-no-teachers"
        _two_ranks(_config(pipeline, out), 29533)
    finally:
        shutil.move(moved, pipeline / "teachers")
    drop = ("tokens_per_s", "samples_per_s")
    strip = [[{k: v for k, v in r.items() if k not in drop} for r in _metrics(run)] for run in (two_rank_run, out)]
    assert strip[0] == strip[1]
    assert json.loads((out / "eval.json").read_text()) == json.loads((two_rank_run / "eval.json").read_text())


@pytest.mark.distributed
def test_zero3_gives_the_run_of_zero2(pipeline, two_rank_run):
    """ZeRO-3 kept the last gradient of a head whose task had no batch in a step and stepped the head with it
    again (loss curves up to 4.3 % apart, 0.44 % on average); every head now takes part in every step (zero
    gradients for the idle ones, as ZeRO 0-2 give them), and the runs agree to summation order (6e-8)."""
    out = pipeline / "run2-zero3"
    _two_ranks(_config(pipeline, out, deepspeed={"config": "ds_configs/zero3.json"}), 29537)
    gaps = []
    for a, b in zip(_metrics(two_rank_run), _metrics(out), strict=True):
        assert a["task_batches"] == b["task_batches"]
        gaps.append(abs(b["loss"] - a["loss"]) / max(a["loss"], 0.1))  # the last window can be one tiny step
    # Same data, same maths; ZeRO-3 sums gradients in another order, so the curves agree to the last bits.
    assert max(gaps) < 1e-5, gaps
    reports = [json.loads((run / "eval.json").read_text()) for run in (two_rank_run, out)]
    for task, metric in (("topic", "accuracy"), ("share", "pearson")):  # one dev row of 300 may tip either way
        assert reports[1]["tasks"][task]["final"][metric] == pytest.approx(
            reports[0]["tasks"][task]["final"][metric], abs=0.004
        )
    assert (out / "tasks" / "topic" / "model.safetensors").stat().st_size == (
        two_rank_run / "tasks" / "topic" / "model.safetensors"
    ).stat().st_size


def test_eval_json_equals_metrics_recomputed_from_the_predictions(pipeline, two_rank_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = json.loads((two_rank_run / "eval.json").read_text())
    topic = [json.loads(line) for line in (two_rank_run / "predictions" / "topic.dev.jsonl").read_text().splitlines()]
    truth = [json.loads(line)["label"] for line in (pipeline / "topic_dev.jsonl").read_text().splitlines()]
    assert [row["label"] for row in topic] == truth
    accuracy = np.mean([row["prediction"] == row["label"] for row in topic])
    assert report["tasks"]["topic"]["final"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    share = [json.loads(line) for line in (two_rank_run / "predictions" / "share.dev.jsonl").read_text().splitlines()]
    predicted, target = np.array([r["prediction"] for r in share]), np.array([r["label"] for r in share])
    pearson = np.corrcoef(predicted, target)[0, 1]
    assert report["tasks"]["share"]["final"]["pearson"] == pytest.approx(pearson, abs=1e-5)

    # The exported classifier, run here without dist_kd, predicts what the file says.
    model = AutoModelForSequenceClassification.from_pretrained(two_rank_run / "tasks" / "topic").eval()
    tokenizer = AutoTokenizer.from_pretrained(two_rank_run / "tasks" / "topic")
    texts = [json.loads(line)["text"] for line in (pipeline / "topic_dev.jsonl").read_text().splitlines()]
    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    with torch.no_grad():
        encoded = [tokenizer(b, padding=True, truncation=True, max_length=32, return_tensors="pt") for b in batches]
        logits = torch.cat([model(**batch).logits for batch in encoded])
    assert [LABELS[i] for i in logits.argmax(1).tolist()] == [row["prediction"] for row in topic]
    np.testing.assert_allclose(logits.numpy(), np.array([row["logits"] for row in topic]), atol=1e-4)


def test_a_checkpoint_exports_each_tasks_classifier_as_the_run_does(two_rank_run, tmp_path):
    """A preempted task run had no way to its classifiers but the last best/: export gave the encoder alone."""
    import torch
    from transformers import AutoModelForSequenceClassification

    checkpoint = two_rank_run / "checkpoints" / "latest"
    ids = torch.randint(5, 100, (3, 12))
    for task in ("topic", "share"):
        out = tmp_path / task
        proc = run_script("-m", "dist_kd", "export", "--checkpoint", str(checkpoint), "--output", str(out),
                          "--task", task)  # fmt: skip
        assert "load with transformers.AutoModelForSequenceClassification" in proc.stdout
        exported, final = (AutoModelForSequenceClassification.from_pretrained(d).eval()
                           for d in (out, two_rank_run / "tasks" / task))  # fmt: skip
        with torch.no_grad():
            torch.testing.assert_close(exported(input_ids=ids).logits, final(input_ids=ids).logits)
        assert exported.config.id2label == final.config.id2label
        assert json.loads((out / "task.json").read_text()) == json.loads(
            (two_rank_run / "tasks" / task / "task.json").read_text()
        )
    bad = run_script("-m", "dist_kd", "export", "--checkpoint", str(checkpoint), "--output",
                     str(tmp_path / "x"), "--task", "nope", check=False)  # fmt: skip
    assert bad.returncode == 2 and "--task nope: the run's tasks are topic, share" in bad.stderr
    # It replaces an earlier classifier of its task only: not the shared encoder, not another task's.
    for copy, message in (("student", "holds an encoder, not a classifier"),
                          ("tasks/share", "holds task 'share''s classifier, not 'topic''s")):  # fmt: skip
        target = tmp_path / "copies" / copy
        shutil.copytree(two_rank_run / copy, target)
        before = (target / "config.json").read_text()
        bad = run_script("-m", "dist_kd", "export", "--checkpoint", str(checkpoint), "--output", str(target),
                         "--task", "topic", check=False)  # fmt: skip
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
        assert (target / "config.json").read_text() == before
    run_script("-m", "dist_kd", "export", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "topic"),
               "--task", "topic")  # fmt: skip


def test_a_bf16_run_scores_the_weights_it_exports_and_a_glue_spelling_exports(pipeline, tmp_path):
    """Two things a user of a GLUE task on a GPU met: the dev scores (eval.json, best/, dev predictions) of a
    bf16 engine came from its bf16 copy of the weights while the exports hold the fp32 ones (best.json said
    pearson 0.2516 where the exported model scored 0.2333); and a task named SST-2 in the config (run as sst2)
    had no --task spelling dist-kd export took. Under ZeRO-3, where the fp32 weights are scored on a twin of the
    model (the engine's hooks would re-partition them in the module); ZeRO 0-2 put them in the module itself,
    checked by tests/distributed/test_half_export.py."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (pipeline / "share_train.jsonl").read_text().splitlines()]
    _jsonl(tmp_path / "sst_train.jsonl", [{"text": r["text"], "label": int(r["score"] > 0.1)} for r in rows[:200]])
    _jsonl(tmp_path / "sst_dev.jsonl", [{"text": r["text"], "label": int(r["score"] > 0.1)} for r in rows[200:]])
    out = tmp_path / "run"
    config = _config(pipeline, out, share=False, train={"epochs": 1}, deepspeed={"config": "ds_configs/zero3.json"})
    settings = yaml.safe_load(config.read_text())
    settings["tasks"] = [{"name": "SST-2", "text_a": "text", "train": str(tmp_path / "sst_train.jsonl"),
                          "dev": str(tmp_path / "sst_dev.jsonl")}]  # fmt: skip
    config.write_text(yaml.safe_dump(settings))
    run_script("launch/task.py", "--debug", "--config", str(config), "train.precision=bf16",
               "train.bf16_mode=deepspeed")  # fmt: skip
    best = out / "best" / "sst2"
    predictions = [json.loads(line) for line in (best / "dev_predictions.jsonl").read_text().splitlines()]
    model = AutoModelForSequenceClassification.from_pretrained(best).eval()
    assert model.dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(best)
    texts = [json.loads(line)["text"] for line in (tmp_path / "sst_dev.jsonl").read_text().splitlines()]
    batches = [tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=32, return_tensors="pt")
               for i in range(0, len(texts), 32)]  # fmt: skip
    with torch.no_grad():
        logits = torch.cat([model(**batch).logits for batch in batches])
    np.testing.assert_allclose(logits.numpy(), np.array([row["logits"] for row in predictions]), atol=1e-5)
    accuracy = float(np.mean(logits.argmax(1).numpy() == np.array([int(row["label"]) for row in predictions])))
    assert json.loads((best / "best.json").read_text())["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    # Its classifier from the checkpoint, under the config's spelling and the run's name alike.
    ids = torch.randint(5, 100, (3, 12))
    final = AutoModelForSequenceClassification.from_pretrained(out / "tasks" / "sst2").eval()
    for spelling in ("SST-2", "sst2"):
        target = tmp_path / f"export-{spelling}"
        run_script("-m", "dist_kd", "export", "--checkpoint", str(out), "--output", str(target), "--task", spelling)
        exported = AutoModelForSequenceClassification.from_pretrained(target).eval()
        with torch.no_grad():
            torch.testing.assert_close(exported(input_ids=ids).logits, final(input_ids=ids).logits, rtol=0, atol=0)
        assert json.loads((target / "task.json").read_text())["task"]["name"] == "sst2"


def test_evaluate_command_reproduces_eval_json(pipeline, two_rank_run, tmp_path):
    # No --text-a text, no --max-length 32: the classifier's task.json gives what the run trained with.
    record = json.loads((two_rank_run / "tasks" / "topic" / "task.json").read_text())
    assert record["max_length"] == 32 and record["pairs"] is False and record["task"]["text_a"] == "text"
    proc = run_script(
        "launch/evaluate.py", "--model", str(two_rank_run / "tasks" / "topic"), "--task", "topic",
        "--data", str(pipeline / "topic_dev.jsonl"), "--output", str(tmp_path / "ev"), "--cpu",
    )  # fmt: skip
    printed = json.loads(proc.stdout[proc.stdout.index("{") :])
    expected = json.loads((two_rank_run / "eval.json").read_text())["tasks"]["topic"]["final"]
    for key, value in expected.items():
        assert printed["metrics"][key] == pytest.approx(value, abs=1e-9), key
    lines = (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()
    assert lines == (two_rank_run / "predictions" / "topic.dev.jsonl").read_text().splitlines()
    # The task's labels in another order: the classifier's outputs are read by their names, to the same scores
    # and predictions; other labels are refused.
    reordered = run_script(
        "launch/evaluate.py", "--model", str(two_rank_run / "tasks" / "topic"), "--task", "topic", "--labels",
        "politics,business,sport", "--data", str(pipeline / "topic_dev.jsonl"), "--text-a", "text", "--cpu",
        "--output", str(tmp_path / "reordered"),
    )  # fmt: skip
    again = json.loads(reordered.stdout[reordered.stdout.index("{") :])["metrics"]
    assert again == pytest.approx(printed["metrics"], abs=1e-9)
    predicted = [json.loads(line)["prediction"] for line in (tmp_path / "reordered" / "predictions.jsonl").open()]
    assert predicted == [json.loads(line)["prediction"] for line in lines]
    bad = run_script(
        "launch/evaluate.py", "--model", str(two_rank_run / "tasks" / "topic"), "--task", "topic", "--labels",
        "politics,business,weather", "--data", str(pipeline / "topic_dev.jsonl"), "--text-a", "text", "--cpu",
        check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "a different label set" in bad.stderr


def test_student_of_the_soft_targets_reaches_the_ensemble(pipeline):
    """The soft-target path learns: distilled from the ensemble's probabilities alone (no hard labels), the
    student's dev accuracy comes within 0.05 of the ensemble's."""
    ensemble = json.loads((pipeline / "teachers" / "report.json").read_text())["ensemble_dev"]["accuracy"]
    out = pipeline / "learn"
    config = _config(pipeline, out, share=False, train={"epochs": 8}, deepspeed={"config": "ds_configs/zero0.json"})
    run_script("launch/task.py", "--debug", "--config", str(config))
    best = json.loads((out / "eval.json").read_text())["tasks"]["topic"]["best"]["accuracy"]
    assert ensemble > 0.8, f"the ensemble itself should have learned the task (dev accuracy {ensemble})"
    assert best >= ensemble - 0.05, f"student {best:.3f} vs ensemble {ensemble:.3f}"


def test_resume_after_sigterm_gives_the_same_run(pipeline):
    # log_every=3: the signal usually lands between log lines, so the checkpoint must carry the open window.
    settings = {"train": {"epochs": 6}, "run": {"log_every": 3}, "deepspeed": {"config": "ds_configs/zero0.json"}}
    straight = pipeline / "straight"
    run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, straight, **settings)))

    interrupted = pipeline / "interrupted"
    config = _config(pipeline, interrupted, **settings)
    run_until_lines_then_sigterm(["launch/task.py", "--debug", "--config", str(config)], interrupted / "metrics.jsonl")
    saved = sorted((interrupted / "checkpoints").glob("step-*"))
    total = _metrics(straight)[-1]["step"]
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-")[1]) < total, saved
    run_script("launch/task.py", "--debug", "--config", str(config))

    expected, resumed = _metrics(straight), _metrics(interrupted)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    evaluated = {h["step"] for h in json.loads((straight / "eval.json").read_text())["history"]}
    assert [r["step"] for r in expected] == sorted({*range(3, total, 3), *evaluated, total})  # evaluations get a line
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
        assert a["task_batches"] == b["task_batches"] and a["tokens_seen"] == b["tokens_seen"], a["step"]
    history = [json.loads((run / "eval.json").read_text())["history"] for run in (straight, interrupted)]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]]
    for a, b in zip(history[0], history[1], strict=True):
        assert b["tasks"]["topic"]["accuracy"] == pytest.approx(a["tasks"]["topic"]["accuracy"])


def test_train_epochs_hold_across_a_resume_with_other_rows_per_step(pipeline):
    """train.epochs counted the steps of a resumed run in its own batches from step 0: a resume that doubled
    train.grad_accum (allowed, with a warning) ended with 0.9 of its 2 epochs trained (or, past the first epoch,
    was refused as past the end), and its evaluations were not at the epochs' ends."""
    out = pipeline / "epochs-regrouped"
    settings = {"share": False, "data": {"micro_batch_size": 16, "group_by_length": False}, "train": {"epochs": 2},
                "run": {"log_every": 1}, "deepspeed": {"config": "ds_configs/zero0.json"}}  # fmt: skip
    run_until_lines_then_sigterm(["launch/task.py", "--debug", "--config", str(_config(pipeline, out, **settings))],
                                 out / "metrics.jsonl", lines=10)  # fmt: skip
    stopped = int(sorted((out / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    settings["train"]["grad_accum"] = 2
    proc = run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, out, **settings)))

    # An epoch of the topic task's 600 rows is ceil(600 / 16) = 38 steps of 16 rows, or 19 steps of 32: 608 rows.
    rows_per_epoch = 608
    lines = _metrics(out)
    rows = sum(16 * sum(line["task_batches"].values()) for line in lines)  # 16-row micro-batches, 1 rank
    assert 2 * rows_per_epoch <= rows < 2 * rows_per_epoch + 32, rows  # 2 epochs, then at most one 32-row step
    # Evaluations at the end of each epoch: the first steps by which the rows drawn reach 608, then 1,216.
    drawn, ends = 0, []
    for line in lines:
        before, drawn = drawn, drawn + 16 * sum(line["task_batches"].values())
        if before < rows_per_epoch * (len(ends) + 1) <= drawn:
            ends.append(line["step"])
    history = json.loads((out / "eval.json").read_text())["history"]
    assert [h["step"] for h in history] == ends, (ends, [h["step"] for h in history])
    assert history[-1]["epoch"] == pytest.approx(rows / rows_per_epoch, abs=1e-3)
    assert f"resuming at step {stopped}, epoch " in proc.stderr, proc.stderr[-3000:]
    # Started again: in the first rows per step the finished run has nothing left (its last step went past the
    # 2 epochs by less than a step); asked for 1 epoch it is refused, as past the end, whatever the rows per step.
    last = lines[-1]["step"]
    settings["train"]["grad_accum"] = 1
    proc = run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, out, **settings)))
    assert _metrics(out)[-1]["step"] == last and f"{last} steps" in proc.stderr, proc.stderr[-3000:]
    for accum in (1, 2):
        settings["train"].update(epochs=1, grad_accum=accum)
        proc = run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, out, **settings)), check=False)
        assert proc.returncode == 2 and f"it is at step {last}, past this run's" in proc.stderr, proc.stderr[-3000:]


def test_intermediate_phase_copy_of_the_teacher_starts_at_zero_and_a_student_learns(pipeline):
    from transformers import AutoModel

    teacher = str(pipeline / "teachers" / "teacher-1")
    copy = pipeline / "phase1-copy"
    run_script("launch/task.py", "--debug", "--config", str(_config(
        pipeline, copy, share=False, student={"path": teacher, "dropout": 0.0}, teacher={"dtype": "fp32"},
        distill={"phase": "intermediate"}, train={"max_steps": 2, "epochs": None}, run={"log_every": 1},
    )), f"teacher.path={teacher}")  # fmt: skip
    first = _metrics(copy)[0]
    for key in ("loss", "loss_embd", "loss_hidden", "loss_attn"):
        assert first[key] < 1e-9, (key, first[key])

    out = pipeline / "phase1"
    run_script("launch/task.py", "--debug", "--config", str(_config(
        pipeline, out, share=False, distill={"phase": "intermediate"}, teacher={"path": teacher, "dtype": "fp32"},
        train={"epochs": 3, "lr": 3.0e-3}, run={"log_every": 2},
    )))  # fmt: skip
    losses = [r["loss"] for r in _metrics(out)]
    assert losses[-1] < 0.7 * losses[0]
    report = json.loads((out / "eval.json").read_text())
    dev = [h["tasks"]["topic"]["loss"] for h in report["history"]]
    assert report["phase"] == "intermediate" and dev[-1] < dev[0]
    student = AutoModel.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2 and not (out / "tasks").exists()
    # The dev loss goes in batches of the training's micro-batch size: it does not move with eval.batch_size
    # (its terms are means over a batch's tokens, so with eval.batch_size's batches it did).
    short = {"share": False, "distill": {"phase": "intermediate"}, "teacher": {"path": teacher, "dtype": "fp32"},
             "train": {"max_steps": 2, "epochs": None}, "data": {"micro_batch_size": 4}}  # fmt: skip
    dev_losses = []
    for size in (1, 64):
        run = pipeline / f"phase1-eval-{size}"
        run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, run, **short)),
                   f"eval.batch_size={size}")  # fmt: skip
        history = json.loads((run / "eval.json").read_text())["history"]
        dev_losses.append([(h["step"], h["tasks"]["topic"]["loss"]) for h in history])
    assert dev_losses[0] and [s for s, _ in dev_losses[0]] == [s for s, _ in dev_losses[1]]
    for (_, a), (_, b) in zip(*dev_losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    # The phase-1 student is the phase-2 starting point.
    phase2 = pipeline / "phase2"
    run_script("launch/task.py", "--debug", "--config",
               str(_config(pipeline, phase2, share=False, student={"path": str(out / "student")},
                           train={"epochs": 1})))  # fmt: skip
    assert (phase2 / "tasks" / "topic" / "config.json").is_file()


def test_intermediate_phase_student_cut_from_the_teacher_starts_its_projections_as_the_cut(pipeline):
    """init: teacher in phase intermediate built W_e/W_h at random, where general distillation starts them as the
    transpose of the units kept: a step-0 loss 3.2x the cut's, random gradients into a student close to its
    source."""
    import torch

    from dist_kd.models.student import unit_selection
    from dist_kd.testing import tiny_bert_config

    teacher = str(pipeline / "teachers" / "teacher-1")
    out = pipeline / "phase1-cut"
    shape = {"path": teacher, "init": "teacher", "num_layers": 2, "hidden_size": 16, "num_heads": 4,
             "intermediate_size": 32, "dropout": 0.0}  # fmt: skip
    config = _config(
        pipeline, out, share=False, student=shape, teacher={"path": teacher, "dtype": "fp32"},
        distill={"phase": "intermediate"}, train={"max_steps": 1, "epochs": None, "lr": 1e-9},
        run={"save_every": 1},
    )  # fmt: skip
    # and a dev set without labels, which the layer losses never read (it was refused: "no column 'label'")
    unlabelled = pipeline / "topic_dev_unlabelled.jsonl"
    rows = [json.loads(line) for line in (pipeline / "topic_dev.jsonl").read_text().splitlines()]
    unlabelled.write_text("".join(json.dumps({"text": row["text"]}) + "\n" for row in rows))
    settings = yaml.safe_load(config.read_text())
    settings["tasks"][0]["dev"] = str(unlabelled)
    config.write_text(yaml.safe_dump(settings))
    run_script("launch/task.py", "--debug", "--config", str(config))
    assert json.loads((out / "eval.json").read_text())["history"][-1]["tasks"]["topic"]["loss"] > 0
    states = torch.load(out / "checkpoints" / "step-00000001" / "mp_rank_00_model_states.pt", weights_only=False)
    residual = unit_selection(tiny_bert_config(num_layers=2, hidden_size=16, intermediate_size=32),
                              tiny_bert_config()).residual  # fmt: skip
    expected = torch.zeros(32, 16)
    expected[residual, torch.arange(16)] = 1.0
    for name in ("projections.embedding.weight", "projections.layers.0.weight", "projections.layers.1.weight"):
        torch.testing.assert_close(states["module"][name], expected, atol=1e-6, rtol=0)  # one step at lr 1e-9


@pytest.mark.slow  # 2-3 minutes of inductor compiles on 2 CPU cores; the prediction phase's twin below is in CI
def test_compiled_intermediate_phase_copy_of_the_teacher_starts_at_zero(pipeline, monkeypatch):
    """train.compile in the task stage (ZeRO-2, the tests' JSON): the student's encoder and the teacher compile
    (kernels are written), and a copy of the teacher still matches it exactly (every loss term 0), as in the
    eager run above."""
    teacher = str(pipeline / "teachers" / "teacher-1")
    copy = pipeline / "phase1-copy-compiled"
    cache = pipeline / "inductor-task"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    run_script("launch/task.py", "--debug", "--config", str(_config(
        pipeline, copy, share=False, student={"path": teacher, "dropout": 0.0}, teacher={"dtype": "fp32"},
        distill={"phase": "intermediate"}, train={"max_steps": 2, "epochs": None, "compile": True},
        run={"log_every": 1},
    )), f"teacher.path={teacher}")  # fmt: skip
    assert any(cache.rglob("*.py"))
    for record in _metrics(copy):
        for key in ("loss", "loss_embd", "loss_hidden", "loss_attn"):
            assert record[key] < 1e-9, (record["step"], key, record[key])


def test_compiled_prediction_phase_trains_and_writes_its_classifier(pipeline, monkeypatch):
    """train.compile in the prediction phase: the student's encoder under its heads compiles (with dropout: the
    CPU's cheaper mask steps aside inside the graph), trains and writes its classifier."""
    predicted = pipeline / "prediction-compiled"
    cache = pipeline / "inductor-task-prediction"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    run_script("launch/task.py", "--debug", "--config", str(_config(
        pipeline, predicted, share=False, train={"max_steps": 2, "epochs": None, "compile": True},
        run={"log_every": 1},
    )))  # fmt: skip
    assert any(cache.rglob("*.py")) and [r["step"] for r in _metrics(predicted)] == [1, 2]
    assert (predicted / "tasks" / "topic" / "config.json").is_file()


def test_random_init_student_of_a_chosen_shape_learns(pipeline):
    """student.init=random builds the no-general-distillation baseline from any directory's config and
    tokenizer: the shape given, new weights, and it learns the task."""
    import torch
    from transformers import AutoModel

    out = pipeline / "random-init"
    shape = {"num_layers": 2, "hidden_size": 16, "num_heads": 4, "intermediate_size": 32}
    config = _config(
        pipeline, out, share=False, student={"path": str(pipeline / "base"), "init": "random", **shape},
        train={"epochs": 6}, deepspeed={"config": "ds_configs/zero0.json"},
    )  # fmt: skip
    run_script("launch/task.py", "--debug", "--config", str(config))
    student = AutoModel.from_pretrained(out / "student")
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)
    assert student.config.intermediate_size == 32
    base = AutoModel.from_pretrained(pipeline / "base")
    cut = base.embeddings.word_embeddings.weight[:, ::2]
    assert not torch.allclose(student.embeddings.word_embeddings.weight, cut, atol=1e-2), "weights are new"
    report = json.loads((out / "eval.json").read_text())
    assert report["tasks"]["topic"]["best"]["accuracy"] > 0.6  # chance is 1/3


def test_teacher_init_student_is_cut_from_the_directory(pipeline):
    """student.init=teacher: the student starts as every other unit of the directory's layers 2 and 4."""
    import torch
    from transformers import AutoModel

    out = pipeline / "teacher-init"
    shape = {"num_layers": 2, "hidden_size": 16, "num_heads": 4, "intermediate_size": 32}
    config = _config(
        pipeline, out, share=False, student={"path": str(pipeline / "base"), "init": "teacher", **shape},
        train={"max_steps": 1, "epochs": None, "lr": 1.0e-12}, deepspeed={"config": "ds_configs/zero0.json"},
    )  # fmt: skip
    run_script("launch/task.py", "--debug", "--config", str(config))
    student, base = AutoModel.from_pretrained(out / "student"), AutoModel.from_pretrained(pipeline / "base")
    torch.testing.assert_close(
        student.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight[:, ::2], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        student.encoder.layer[1].intermediate.dense.weight,
        base.encoder.layer[3].intermediate.dense.weight[::2, ::2], atol=1e-6, rtol=0,
    )  # fmt: skip


def test_one_class_predictions_for_two_evaluations_are_warned(pipeline, tmp_path):
    """A head that predicts one class at two evaluations in a row is named in a warning; a learning head is not."""
    rows = [json.loads(line) for line in (pipeline / "topic_train.jsonl").read_text().splitlines()]
    _jsonl(tmp_path / "one_label.jsonl", [{**row, "label": "sport"} for row in rows[:200]])
    stuck = tmp_path / "stuck"
    config = _config(pipeline, stuck, share=False, train={"epochs": 2}, deepspeed={"config": "ds_configs/zero0.json"})
    settings = yaml.safe_load(config.read_text())
    settings["tasks"][0].pop("soft_targets")
    settings["tasks"][0]["train"] = str(tmp_path / "one_label.jsonl")
    config.write_text(yaml.safe_dump(settings))
    proc = run_script("launch/task.py", "--debug", "--config", str(config))
    history = json.loads((stuck / "eval.json").read_text())["history"]
    assert [h["tasks"]["topic"]["predicted_classes"] for h in history] == [1, 1]
    warnings = [line for line in proc.stderr.splitlines() if "fell into one class" in line]
    assert len(warnings) == 1 and "task 'topic'" in warnings[0], proc.stderr[-2000:]
    learning = run_script(
        "launch/task.py", "--debug", "--config", str(_config(pipeline, tmp_path / "fine", share=False,
        train={"epochs": 2}, deepspeed={"config": "ds_configs/zero0.json"})), "distill.layer_map=top",
    )  # fmt: skip
    assert "fell into one class" not in learning.stderr
    # a key of the other phase is said to do nothing, once
    note = "distill.layer_map: read in phase intermediate only; this run (phase prediction) does not use it"
    assert learning.stderr.count(note) == 1, learning.stderr[-2000:]


@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        ("label order", ["tasks=[{name: topic, labels: [politics, business, sport], soft_targets: SOFT}]"],
         r"soft-target store .* has labels \['business', 'politics', 'sport'\], task 'topic' expects"),
        ("store of another task", ["tasks=[{name: news, labels: [business, politics, sport], soft_targets: SOFT}]"],
         "was computed for task 'topic', not 'news'"),
        ("missing student", ["student.path=/nonexistent/student"], "student.path /nonexistent/student does not exist"),
        ("unknown key", ["distill.soft_weigth=1"], "did you mean 'distill.soft_weight'"),
        ("intermediate without teacher", ["distill.phase=intermediate"], "phase intermediate needs a teacher"),
        ("missing dev file", [f"tasks=[{{{SHARE_TASK}, dev: /nonexistent.jsonl}}]"],
         "task data /nonexistent.jsonl does not exist"),
        ("shape of pretrained weights", ["student.num_layers=1"], "set student.init=random or student.init=teacher"),
        ("wider than its source", ["student.init=teacher", "student.hidden_size=64"],
         r"hidden_size \(64\) must not exceed the teacher's \(32\)"),
        # the run's export of student/ would have replaced the starting student (exit 0)
        ("student in the outputs", ["student.path=RUN/student"], r"student.path .*student lies in .*which this run"),
        # the teacher reads the student's batches: a RuntimeError inside its embeddings mid-training
        ("teacher of fewer positions", ["distill.phase=intermediate", "teacher.path=SHORT"],
         r"data.max_length 32 exceeds the max_position_embeddings 16 of model .*short_teacher"),
        # student.num_heads alone is refused for a pretrained student.path: the advice names what reshapes it
        ("teacher of other heads", ["distill.phase=intermediate", "teacher.path=HEADS"],
         r"set student.init=random and student.num_heads=8, distill.attention=relations"),  # 4 heads: no cut of 8
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line_and_leaves_the_run_alone(
    case, overrides, message, pipeline, two_rank_run, tmp_path
):
    from dist_kd.testing import build_tiny_bert

    before = snapshot(two_rank_run)
    if "SHORT" in " ".join(overrides):
        build_tiny_bert(tmp_path / "short_teacher", max_position_embeddings=16)
    if "HEADS" in " ".join(overrides):
        build_tiny_bert(tmp_path / "heads_teacher", num_heads=8)
    substitutions = {"SOFT": str(pipeline / "soft"), "SHARE": str(pipeline / "share_train.jsonl"),
                     "RUN": str(two_rank_run), "SHORT": str(tmp_path / "short_teacher"),
                     "HEADS": str(tmp_path / "heads_teacher")}  # fmt: skip
    overrides = [re.sub("SOFT|SHARE|RUN|SHORT|HEADS", lambda m: substitutions[m.group(0)], o) for o in overrides]
    proc = run_script("launch/task.py", "--debug", "--config", str(pipeline / "run2.yaml"), *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(two_rank_run) == before


def test_a_best_exported_after_the_checkpoint_is_the_best_the_resumed_run_reports(pipeline, tmp_path):
    """An evaluation exports a new best at once; the checkpoint recording it comes later. A run killed in between
    (here: its later checkpoints gone, so it resumes from an earlier one) kept best/<task>/ from the lost steps
    while eval.json and the summary named the checkpoint's best: a user shipped another model than the one named.
    """
    import re
    import shutil

    def exported(name):  # the step and headline figure the export's model card gives (first dev line)
        card = (out / "best" / name / "README.md").read_text()
        step, value = re.search(r"dev \w+ \(step (\d+)\) \| ([-0-9.]+) \|", card).groups()
        return int(step), float(value)

    def exported_step(name):
        return exported(name)[0]

    out = tmp_path / "run"
    settings = {"train": {"epochs": None, "max_steps": 24}, "eval": {"every": 4},
                "run": {"save_every": 4, "keep_last": 0}, "deepspeed": {"config": "ds_configs/zero0.json"}}  # fmt: skip
    run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, out, **settings)))
    for saved in (out / "checkpoints").glob("step-*"):  # as if killed after step 4's checkpoint: no later one
        if saved.name != "step-00000004":
            shutil.rmtree(saved)
    (out / "checkpoints" / "latest").write_text("step-00000004")
    before = {name: exported(name) for name in ("topic", "share")}
    assert max(step for step, _ in before.values()) > 4, before  # some best was exported after the checkpoint
    resumed = _config(pipeline, out, **{**settings, "train": {"epochs": None, "max_steps": 6}})
    proc = run_script("launch/task.py", "--debug", "--config", str(resumed))
    assert "resumed from" in proc.stderr and "step 4" in proc.stderr, proc.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    for name in ("topic", "share"):
        best = report["tasks"][name]["best"]
        assert best["step"] == exported_step(name), (name, best)  # eval.json names the export that is there
        # The better export is never replaced by a worse one (step 6 overwrote step 8's better classifier).
        metric = report["tasks"][name]["metric"]
        assert best[metric] >= before[name][1] - 1e-4, (name, best, before[name])
        record = json.loads((out / "best" / name / "best.json").read_text())
        assert record["step"] == best["step"] and record["metrics"] == {k: best[k] for k in record["metrics"]}
        if before[name][0] > 4 and best["step"] == before[name][0]:
            assert f"best/{name} holds the classifier of step {before[name][0]}" in proc.stderr
    assert [h["step"] for h in report["history"]] == [4, 6]  # the lost run's later evaluations are gone


def test_a_run_resumed_at_its_last_step_scores_it(pipeline, tmp_path):
    """train.max_steps set to the checkpoint's step trains nothing: the loop's evaluation at max_steps never ran,
    so eval.json and the model cards gave an earlier step's figures for the model of this step."""
    out = tmp_path / "run"
    settings = {"train": {"epochs": None, "max_steps": 6}, "eval": {"every": 4}, "run": {"save_every": 3,
                "log_every": 3}, "deepspeed": {"config": "ds_configs/zero0.json"}}  # fmt: skip
    run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, out, share=False, **settings)))
    assert [h["step"] for h in json.loads((out / "eval.json").read_text())["history"]] == [4, 6]
    resumed = _config(pipeline, out, share=False, **{**settings, "train": {"epochs": None, "max_steps": 6}})
    run_script("launch/task.py", "--debug", "--config", str(resumed))  # finished: scored at 6 already, once
    assert [h["step"] for h in json.loads((out / "eval.json").read_text())["history"]] == [4, 6]
    shutil.rmtree(out / "checkpoints" / "step-00000006")
    (out / "checkpoints" / "latest").write_text("step-00000003")
    shorter = _config(pipeline, out, share=False, **{**settings, "train": {"epochs": None, "max_steps": 3}})
    run_script("launch/task.py", "--debug", "--config", str(shorter))
    report = json.loads((out / "eval.json").read_text())
    assert report["step"] == 3 and [h["step"] for h in report["history"]] == [3]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3 and lines[-1]["dev"] == report["history"][0]["tasks"]  # the trackers get it too
    # one line for step 3: the training figures the stopped process logged there, with the dev figures added
    assert [line["step"] for line in lines] == [3] and "loss" in lines[-1]
    card = (out / "tasks" / "topic" / "README.md").read_text()
    assert "(step 3)" in card and "(step 4)" not in card, card


def test_a_run_from_scratch_removes_an_earlier_runs_outputs_for_other_tasks(pipeline, tmp_path):
    """best/share, tasks/share and predictions/share.dev.jsonl of an earlier run stayed beside a topic-only
    run's outputs, while its eval.json named topic alone."""
    out = tmp_path / "run"
    settings = {"train": {"epochs": None, "max_steps": 2}, "eval": {"every": 2},
                "deepspeed": {"config": "ds_configs/zero0.json"}}  # fmt: skip
    run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, out, **settings)))
    assert (out / "best" / "share").is_dir() and (out / "predictions" / "share.dev.jsonl").is_file()
    shutil.rmtree(out / "checkpoints")
    (out / "predictions" / "notes.txt").write_text("mine")  # not a dist_kd output: stays
    (out / "predictions" / "teacher.dev.jsonl").write_text("mine too\n")  # no dist_kd export of 'teacher': stays
    proc = run_script("launch/task.py", "--debug", "--config", str(_config(pipeline, out, share=False, **settings)))
    assert sorted(p.name for p in (out / "best").iterdir()) == ["topic"]
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["topic"]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["notes.txt", "teacher.dev.jsonl",
                                                                       "topic.dev.jsonl"]  # fmt: skip
    assert f"removing {out / 'best' / 'share'}: an earlier run's output for task 'share'" in proc.stderr
    # This run's own task trained without a dev set writes no predictions: the earlier model's are removed.
    shutil.rmtree(out / "checkpoints")
    undev = _config(pipeline, out, share=False, **settings)
    config = yaml.safe_load(undev.read_text())
    del config["tasks"][0]["dev"]
    undev.write_text(yaml.safe_dump(config))
    proc = run_script("launch/task.py", "--debug", "--config", str(undev))
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["notes.txt", "teacher.dev.jsonl"]
    assert "which this run trains without a dev set" in proc.stderr


def test_a_run_directory_inside_the_data_it_reads_is_refused(pipeline, tmp_path):
    """The data's digest takes in every file under a data directory: a run directory inside one made the same
    command's resume find 'other data' and refuse it."""
    shutil.copytree(pipeline / "soft", tmp_path / "soft")
    out = tmp_path / "soft" / "run"
    settings = yaml.safe_load(_config(pipeline, tmp_path / "first", share=False).read_text())
    settings["tasks"][0]["soft_targets"] = str(tmp_path / "soft")
    settings["run"]["output_dir"] = str(out)
    (tmp_path / "inside.yaml").write_text(yaml.safe_dump(settings))
    before = snapshot(tmp_path / "soft")
    proc = run_script("launch/task.py", "--debug", "--config", str(tmp_path / "inside.yaml"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: run.output_dir {out} lies inside tasks[topic].soft_targets {tmp_path / 'soft'}: " in proc.stderr
    assert snapshot(tmp_path / "soft") == before and not out.exists()


def test_resume_refuses_a_dev_set_or_teacher_changed_in_place(pipeline, tmp_path):
    """Edited in place, the dev file mixed two dev sets in eval.json and best/; a teacher retrained in place
    (same path and shape, new weights) was distilled from with the old one's projections. Both are refused,
    naming the task, and the run is left as it was; put back, the run resumes."""
    teacher, dev = tmp_path / "teacher", tmp_path / "topic_dev.jsonl"
    shutil.copytree(pipeline / "teachers" / "teacher-1", teacher)
    shutil.copy(pipeline / "topic_dev.jsonl", dev)
    out = tmp_path / "run"

    def config(max_steps: int) -> Path:
        path = _config(
            pipeline, out, share=False, distill={"phase": "intermediate"}, teacher={"path": str(teacher)},
            train={"epochs": None, "max_steps": max_steps}, run={"save_every": 2},
            deepspeed={"config": "ds_configs/zero0.json"},
        )  # fmt: skip
        settings = yaml.safe_load(path.read_text())
        settings["tasks"][0]["dev"] = str(dev)
        path.write_text(yaml.safe_dump(settings))
        return path

    run_script("launch/task.py", "--debug", "--config", str(config(2)))
    before = snapshot(out)
    lines = dev.read_text().splitlines(keepends=True)
    dev.write_text("".join(lines[:-5]))  # five dev rows fewer
    proc = run_script("launch/task.py", "--debug", "--config", str(config(4)), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    digest = "'[0-9a-f]{64}'"
    assert re.search(rf"error: cannot resume from .*step-00000002: tasks\[topic\]\.dev: checkpoint has {digest}, "
                     rf"this run has {digest}.*the dev data changed since the checkpoint", proc.stderr)  # fmt: skip
    dev.write_text("".join(lines))
    weights = teacher / "model.safetensors"
    kept = weights.read_bytes()
    shutil.copy(pipeline / "teachers" / "teacher-2" / "model.safetensors", weights)  # retrained in place
    proc = run_script("launch/task.py", "--debug", "--config", str(config(4)), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.search(r"error: cannot resume from .*: tasks\[topic\]\.teacher\.sha256: checkpoint has", proc.stderr)
    assert snapshot(out) == before
    weights.write_bytes(kept)
    # The dev set dropped (the earlier best/ and dev predictions stayed beside the new exports), or another metric
    # (best/ kept the step the old one picked): both were accepted without a word.
    for change, said in (
        ({"dev": None}, rf"tasks\[topic\]\.dev: checkpoint has {digest}, this run has None"),
        ({"metric": "f1"}, r"tasks\[topic\]\.metric: checkpoint has 'accuracy', this run has 'f1'.*best/ holds"),
    ):
        settings = yaml.safe_load(config(4).read_text())
        settings["tasks"][0].update(change)
        (tmp_path / "changed.yaml").write_text(yaml.safe_dump(settings))
        proc = run_script("launch/task.py", "--debug", "--config", str(tmp_path / "changed.yaml"), check=False)
        assert proc.returncode == 2 and re.search(rf"error: cannot resume from .*: {said}", proc.stderr), change
        assert snapshot(out) == before
    proc = run_script("launch/task.py", "--debug", "--config", str(config(4)))
    assert "resumed from" in proc.stderr and _metrics(out)[-1]["step"] == 4
