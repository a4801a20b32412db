"""launch/finetune.py end to end: two tiny teachers from a headless base encoder, exported, scored, reusable."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.e2e.conftest import run_script

LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    from dist_kd.testing import build_tiny_bert, random_sentences

    root = tmp_path_factory.mktemp("finetune")
    # A plain encoder without a classification head, like all-MiniLM-L6-v2.
    base = build_tiny_bert(root / "base", seed=0, num_layers=2)
    for name, num, seed in (("train", 24, 1), ("dev", 10, 2)):
        rows = [{"body": s, "y": LABELS[len(s.split()) > 10]} for s in random_sentences(num, seed=seed)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = [
        "launch/finetune.py", "--task", "demo", "--labels", ",".join(LABELS), "--text-a", "body", "--label", "y",
        "--train", str(root / "train.jsonl"), "--dev", str(root / "dev.jsonl"), "--base", str(base),
        "--output", str(root / "out"), "--num-teachers", "2", "--seeds", "3", "4", "--dropouts", "0.1", "0.2",
        "--max-steps", "4", "--batch-size", "8", "--lr", "1e-3", "--cpu",
    ]  # fmt: skip
    proc = run_script(*args, timeout=300)
    (root / "stderr.txt").write_text(proc.stderr)
    return root, args


def test_each_teacher_has_a_progress_bar(finetuned):
    """finetune showed nothing between "teacher 1/2: seed 3" and its dev score, even at a terminal."""
    root, _ = finetuned
    lines = (root / "stderr.txt").read_text().splitlines()
    for teacher in (1, 2):
        bar = [line for line in lines if line.startswith(f"teacher {teacher}/2: ")]
        assert bar and "4/4" in bar[-1] and "loss=" in bar[-1], lines[-20:]


def test_exported_teachers_load_with_the_task_label_maps(finetuned):
    from transformers import AutoModelForSequenceClassification

    root, _ = finetuned
    models = [AutoModelForSequenceClassification.from_pretrained(root / "out" / f"teacher-{k}") for k in (1, 2)]
    for model, dropout in zip(models, (0.1, 0.2)):
        assert model.config.id2label == {0: "neg", 1: "pos"}
        assert model.config.label2id == {"neg": 0, "pos": 1}
        assert model.config.hidden_dropout_prob == dropout
        assert model.classifier.out_features == 2
    # Different seeds give different teachers (head init, dropout masks, data order).
    assert not torch.equal(models[0].classifier.weight, models[1].classifier.weight)
    assert (root / "out" / "teacher-1" / "tokenizer.json").is_file()


def test_report_metrics_match_an_independent_evaluation(finetuned):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _ = finetuned
    report = json.loads((root / "out" / "report.json").read_text())
    assert report["label_names"] == LABELS and report["metric"] == "accuracy"
    assert [t["seed"] for t in report["teachers"]] == [3, 4]
    assert [t["steps"] for t in report["teachers"]] == [4, 4]
    dev = [json.loads(line) for line in (root / "dev.jsonl").read_text().splitlines()]
    labels = np.array([LABELS.index(row["y"]) for row in dev])
    probs = []
    for k, entry in enumerate(report["teachers"], start=1):
        path = root / "out" / f"teacher-{k}"
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            logits = torch.cat([model(**tokenizer(row["body"], return_tensors="pt")).logits for row in dev])
        assert entry["dev"]["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()))
        assert set(entry["dev"]) == {"accuracy", "f1", "mcc"}
        probs.append(logits.softmax(-1))
    ensemble = torch.stack(probs).mean(0).argmax(1).numpy()
    assert report["ensemble_dev"]["accuracy"] == pytest.approx(float((ensemble == labels).mean()))
    lines = [json.loads(line) for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {line["teacher"] for line in lines} == {1, 2} and all(np.isfinite(line["loss"]) for line in lines)


def test_evaluate_scores_a_teacher_as_it_was_trained(finetuned, tmp_path):
    """A teacher recorded its columns and length in finetune.json alone, which dist-kd evaluate does not read: it
    took the default text column and length 128 (a teacher trained at --max-length 16 scored 0.52, not 0.68)."""
    root, args = finetuned
    out = tmp_path / "short"
    run_script(*_one_teacher(args, out), "--max-length", "8", timeout=300)  # shorter than most dev texts
    record = json.loads((out / "teacher-1" / "task.json").read_text())
    assert record["max_length"] == 8 and record["pairs"] is False
    assert record["task"]["text_a"] == "body" and record["task"]["label"] == "y" and record["task"]["text_b"] is None
    proc = run_script(
        "launch/evaluate.py", "--model", str(out / "teacher-1"), "--task", "demo", "--labels", ",".join(LABELS),
        "--data", str(root / "dev.jsonl"), "--output", str(tmp_path / "eval"),
    )  # fmt: skip
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["num_labelled"] == 10, proc.stderr[-2000:]  # the labels of column y, as trained
    # the logits of the teacher's own dev scoring, at its length (128 gives others)
    lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    expected = np.load(out / "teacher-1" / "dev_logits.npy")
    np.testing.assert_allclose(np.array([line["logits"] for line in lines]), expected, atol=1e-5)
    result = json.loads((out / "teacher-1" / "finetune.json").read_text())
    assert scored["metrics"]["accuracy"] == pytest.approx(result["dev"]["accuracy"])


def test_the_ensemble_feeds_precompute(finetuned, tmp_path, caplog):
    import logging

    from dist_kd.data.soft_targets import load_soft_targets
    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.precompute import PrecomputeConfig, precompute_soft_targets

    root, _ = finetuned
    spec = resolve_task_spec("demo", labels=LABELS, text_a="body", label="y")
    teachers = [str(root / "out" / f"teacher-{k}") for k in (1, 2)]
    with caplog.at_level(logging.WARNING, logger="dist_kd.precompute"):
        precompute_soft_targets(spec, root / "dev.jsonl", tmp_path / "st", PrecomputeConfig(teachers=teachers),
                                progress=False)  # fmt: skip
        assert "was trained on inputs cut to" not in caplog.text  # trained at 128, the length used
        precompute_soft_targets(spec, root / "dev.jsonl", tmp_path / "st16",
                                PrecomputeConfig(teachers=teachers, max_length=16), progress=False)  # fmt: skip
    assert load_soft_targets(tmp_path / "st", expected_labels=LABELS).soft_probs().shape == (10, 2)
    # a length other than the teachers' own is said (each teacher's task.json records it)
    said = f"teacher {teachers[0]} was trained on inputs cut to 128 pieces (its task.json); they are cut to 16 here"
    assert said in caplog.text


def test_rerun_reuses_finished_teachers_and_bad_input_exits_2(finetuned):
    root, args = finetuned
    before = (root / "out" / "teacher-1" / "model.safetensors").stat().st_mtime_ns
    run_script(*args, timeout=300)
    assert (root / "out" / "teacher-1" / "model.safetensors").stat().st_mtime_ns == before
    # Another headline metric picks another figure of the same dev metrics: no reason to train again (it was
    # refused as "task differ"); other labels are named by field.
    proc = run_script(*args, "--metric", "f1", timeout=300)
    assert (root / "out" / "teacher-1" / "model.safetensors").stat().st_mtime_ns == before
    assert "teacher 1: reusing" in proc.stderr and 'dev f1: {"teacher-1": ' in proc.stderr
    # Fewer teachers than before: the ensemble is the first one; the second, still beside it, is named.
    fewer = _one_teacher(args, root / "out")
    proc = run_script(*fewer, timeout=300)
    assert "holds teacher-2 from an earlier run with more teachers" in proc.stderr
    run_script(*args, timeout=300)  # the fixture's two-teacher report back, for the tests after this one
    other = list(args)
    other[other.index("--labels") + 1] = ",".join(reversed(LABELS))
    recorded = (root / "out" / "config.yaml").read_text()
    proc = run_script(*other, timeout=300, check=False)
    assert proc.returncode == 2
    assert "(task.labels differ: task.labels: ['neg', 'pos'] then, ['pos', 'neg'] now)" in proc.stderr
    # refused before anything was written: config.yaml said labels no teacher was trained with
    assert (root / "out" / "config.yaml").read_text() == recorded
    bad = [*args[:-1], "--seeds", "1", "2", "3", "--cpu"]
    proc = run_script(*bad, check=False)
    assert proc.returncode == 2
    assert "error: seeds: give one per teacher (2 for --num-teachers)" in proc.stderr
    # a seed no generator takes: refused before any work (teacher 1 trained, then "train.seed must be >= 0")
    proc = run_script(*[*args[:-1], "--seeds", "1", "-1", "--cpu"], check=False)
    assert proc.returncode == 2 and "error: seeds (--seeds) must be whole numbers in 0..2**63-1" in proc.stderr
    assert (root / "out" / "teacher-1" / "model.safetensors").stat().st_mtime_ns == before


def test_rerun_with_another_dev_set_rescores_reused_teachers(finetuned, tmp_path):
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dist_kd.testing import random_sentences

    root, args = finetuned
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)  # copy2 keeps the mtimes: a retrain would show
    weights = (out / "teacher-1" / "model.safetensors").stat().st_mtime_ns
    # Another dev set of another size: the old logits (10 rows) must be neither reused nor mixed in.
    dev = [{"body": s, "y": LABELS[len(s.split()) > 6]} for s in random_sentences(7, seed=9)]
    (tmp_path / "dev2.jsonl").write_text("".join(json.dumps(row) + "\n" for row in dev))
    rerun = list(args)
    rerun[rerun.index("--dev") + 1] = str(tmp_path / "dev2.jsonl")
    rerun[rerun.index("--output") + 1] = str(out)
    run_script(*rerun, timeout=300)

    assert (out / "teacher-1" / "model.safetensors").stat().st_mtime_ns == weights  # reused, not retrained
    report = json.loads((out / "report.json").read_text())
    assert report["num_dev"] == 7
    labels = np.array([LABELS.index(row["y"]) for row in dev])
    probs = []
    for k, entry in enumerate(report["teachers"], start=1):
        path = out / f"teacher-{k}"
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.no_grad():
            logits = torch.cat([model(**tokenizer(row["body"], return_tensors="pt")).logits for row in dev])
        assert entry["dev"]["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == labels).mean()))
        np.testing.assert_allclose(np.load(path / "dev_logits.npy"), logits.numpy(), atol=1e-4)
        probs.append(logits.softmax(-1))
    ensemble = torch.stack(probs).mean(0).argmax(1).numpy()
    assert report["ensemble_dev"]["accuracy"] == pytest.approx(float((ensemble == labels).mean()))

    # A second rerun on the same dev set reads the re-scored logits back (no third scoring needed).
    saved = (out / "teacher-1" / "dev_logits.npy").stat().st_mtime_ns
    run_script(*rerun, timeout=300)
    assert (out / "teacher-1" / "dev_logits.npy").stat().st_mtime_ns == saved
    assert json.loads((out / "report.json").read_text())["ensemble_dev"] == report["ensemble_dev"]


def test_rerun_after_a_crash_logs_each_teacher_step_once(finetuned, tmp_path):
    import shutil

    root, args = finetuned
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    # The state a kill leaves after teacher 2 logged its steps and before it was exported: no teacher-2
    # directory, and its lines (marked by their loss) in metrics.jsonl, which the rerun trains and logs again.
    shutil.rmtree(out / "teacher-2")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    finished = [line for line in lines if line["teacher"] == 1]
    crashed = [{**line, "loss": 999.0} for line in lines if line["teacher"] == 2]
    assert finished and crashed
    (out / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in finished + crashed))
    rerun = list(args)
    rerun[rerun.index("--output") + 1] = str(out)
    run_script(*rerun, timeout=300)

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(line["teacher"], line["step"]) for line in lines]
    assert len(keys) == len(set(keys)), f"a (teacher, step) logged twice: {keys}"
    assert [line for line in lines if line["teacher"] == 1] == finished  # the reused teacher's lines stay
    retrained = [line for line in lines if line["teacher"] == 2]
    assert [line["step"] for line in retrained] == [line["step"] for line in crashed]
    # The lines left are the rerun's own: the last one's loss is the final loss the new teacher 2 recorded.
    result = json.loads((out / "teacher-2" / "finetune.json").read_text())
    assert retrained[-1]["loss"] == pytest.approx(result["final_loss"]) and result["final_loss"] != 999.0


def test_the_output_keeps_the_runs_log_and_one_run_writes_it(finetuned, tmp_path):
    """finetune wrote no train.log (a cluster job's output was its only log), and took no lock: a second run, or
    a requeue while the first still ran, trained and exported the same teacher-N directories alongside it."""
    from dist_kd.train.runlock import LOCK_NAME, RunLock
    from tests.e2e.conftest import snapshot

    root, args = finetuned
    log = (root / "out" / "train.log").read_text()
    said = ["teacher 1/2: seed 3, dropout 0.10", "teacher 1 dev accuracy = ", "teacher 2 dev accuracy = "]
    assert all(line in log for line in said) and sorted(said, key=log.index) == said, log[-3000:]
    assert "[rank 0] INFO dist_kd.train.finetune: " in log and not (root / "out" / LOCK_NAME).exists()

    out = tmp_path / "out"
    held = RunLock(out)
    held.acquire()  # a live run of this host (this process) owns the directory
    try:
        before = snapshot(out)
        busy = list(args)
        busy[busy.index("--output") + 1] = str(out)
        proc = run_script(*busy, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"error: --output {out} is in use by another run (host " in proc.stderr, proc.stderr[-2000:]
        assert "choose another --output" in proc.stderr and snapshot(out) == before
    finally:
        held.release()


def test_sigterm_gives_the_lock_back_and_says_so_in_the_log(finetuned, tmp_path):
    """finetune has no checkpoints and SIGTERM ends it (exit 143), but it ended by the signal's default action:
    the run lock stayed, refused for minutes to a rerun on another node, and train.log did not say why."""
    import signal

    from dist_kd.train.runlock import LOCK_NAME
    from tests.e2e.conftest import run_until_lines_then_sigterm

    root, args = finetuned
    out = tmp_path / "out"
    # 3 epochs of 24 rows were 9 steps, under --log-every 10: the first metrics line came with the last step, and
    # the signal could arrive after teacher-1 was exported. Enough epochs, and a line at every step.
    run = [*_one_teacher(args, out), "--max-steps", "100000", "--epochs", "100000", "--log-every", "1"]
    stderr = run_until_lines_then_sigterm(run, out / "metrics.jsonl", lines=1, expect_code=128 + signal.SIGTERM)
    assert "received SIGTERM: stopping now (a teacher not yet exported trains again from step 0" in stderr
    assert not (out / LOCK_NAME).exists() and not (out / "teacher-1").exists()
    assert "ERROR dist_kd.run: run stopped: SystemExit: 143" in (out / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)), steps  # --log-every 1: a line at every step


def test_max_length_beyond_the_base_is_refused_before_any_teacher_trains(finetuned, tmp_path):
    root, args = finetuned
    bad = list(args)
    bad[bad.index("--output") + 1] = str(tmp_path / "out")
    # build_tiny_bert's base has 128 position embeddings; any batch of more pieces would crash mid-training.
    proc = run_script(*bad, "--max-length", "200", check=False)
    assert proc.returncode == 2
    assert f"error: max_length (--max-length) 200 exceeds the max_position_embeddings 128 of model {root / 'base'}" in (
        proc.stderr
    )
    assert not (tmp_path / "out").exists()  # refused before the run took the directory: nothing written
    proc = run_script(*bad, "--max-length", "0", check=False)
    assert proc.returncode == 2 and "argument --max-length: expected a positive integer (>= 1), got 0" in proc.stderr


def test_a_base_stored_in_fp16_is_fine_tuned_in_fp32(tmp_path):
    """transformers loads a base saved in fp16 as fp16 (its config's dtype): the teachers trained and exported
    in fp16, without fp32 master weights."""
    from transformers import AutoModel

    from dist_kd.data.tasks import TaskSpec
    from dist_kd.testing import build_tiny_bert
    from dist_kd.train.finetune import build_classifier

    base = build_tiny_bert(tmp_path / "base", num_layers=1)
    half = AutoModel.from_pretrained(base).half()
    half.save_pretrained(tmp_path / "half")
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (base / name).is_file():
            (tmp_path / "half" / name).write_bytes((base / name).read_bytes())
    assert AutoModel.from_pretrained(tmp_path / "half").dtype == torch.float16  # the case being tested
    model = build_classifier(tmp_path / "half", TaskSpec(name="t", labels=["x", "y"]), dropout=0.1)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert model.config.dtype == torch.float32
    # the base's weights, widened exactly
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight, half.embeddings.word_embeddings.weight.float()
    )


def test_a_base_that_is_a_classifier_gives_every_teacher_a_fresh_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from dist_kd.data.tasks import TaskSpec
    from dist_kd.testing import build_tiny_bert
    from dist_kd.train.finetune import build_classifier

    # A teacher of another binary task as the base: its head knows that task's classes.
    base = build_tiny_bert(tmp_path / "base", seed=0, num_layers=2, model_class="BertForSequenceClassification")
    other = AutoModelForSequenceClassification.from_pretrained(base)
    with torch.no_grad():
        other.classifier.weight.fill_(1.0)
        other.classifier.bias.fill_(5.0)
    other.save_pretrained(base)
    heads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_classifier(base, TaskSpec(name="t", labels=["x", "y"]), dropout=0.1)
        assert model.config.id2label == {0: "x", 1: "y"}
        assert not torch.equal(model.classifier.bias, other.classifier.bias)
        assert float(model.classifier.weight.detach().std()) < 0.1  # freshly drawn (std 0.02), not the base's constant
        heads.append(model.classifier.weight.detach().clone())
    assert not torch.equal(*heads)  # the teacher's seed draws its head
    # The encoder still comes from the base.
    embeddings = model.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(embeddings, other.bert.embeddings.word_embeddings.weight)
    # A task with another number of classes: a fresh head of its size, not a size-mismatch traceback.
    model = build_classifier(base, TaskSpec(name="t3", labels=["a", "b", "c"]), dropout=0.1)
    assert model.classifier.out_features == 3 and model.config.id2label == {0: "a", 1: "b", 2: "c"}


def _one_teacher(args: list[str], output, **paths) -> list[str]:
    """The fixture's command for its first teacher alone into ``output`` (``train=`` / ``base=`` replaced)."""
    run = list(args)
    for flag, value in (("--output", output), *((f"--{name}", path) for name, path in paths.items())):
        run[run.index(flag) + 1] = str(value)
    run[run.index("--num-teachers") + 1 : run.index("--num-teachers") + 2] = ["1"]
    run[run.index("--seeds") + 1 : run.index("--seeds") + 3] = ["3"]
    run[run.index("--dropouts") + 1 : run.index("--dropouts") + 3] = ["0.1"]
    return run


def test_edited_training_data_at_the_same_path_is_not_reused(finetuned, tmp_path):
    import shutil

    root, args = finetuned
    shutil.copy(root / "train.jsonl", tmp_path / "train.jsonl")
    run = _one_teacher(args, tmp_path / "out", train=tmp_path / "train.jsonl")
    run_script(*run, timeout=300)
    # The same bytes elsewhere (staged to a job's disk) are the same data: reused (it was refused by path).
    (tmp_path / "staged").mkdir()
    shutil.copy(root / "train.jsonl", tmp_path / "staged" / "train.jsonl")
    staged = _one_teacher(args, tmp_path / "out", train=tmp_path / "staged" / "train.jsonl")
    assert "teacher 1: reusing" in run_script(*staged, timeout=300).stderr
    # The user fixes labels in place and reruns the same command: the teacher of the old labels must not stay.
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    flipped = [{**row, "y": LABELS[1 - LABELS.index(row["y"])]} for row in rows]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in flipped))
    proc = run_script(*run, timeout=300, check=False)
    assert proc.returncode == 2
    assert "teacher-1 was trained with other settings (train_sha256 differ: train_sha256: '" in proc.stderr
    digests = r"train_sha256: '[0-9a-f]{12}\.\.\.' then, '[0-9a-f]{12}\.\.\.' now"
    assert re.search(digests + r" \(train_sha256 digests the --train data's file names and bytes\)\)", proc.stderr)


def _copy_of_the_output(finetuned, tmp_path):
    """A copy of the fixture's finished output, and the fixture's command with --output the copy."""
    import shutil

    root, args = finetuned
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    rerun = list(args)
    rerun[rerun.index("--output") + 1] = str(out)
    return out, rerun


def test_damaged_finetune_json_of_a_finished_teacher_is_named(finetuned, tmp_path):
    """A hand-edited or cut finetune.json gave json's "Expecting value: line 1 column 1" naming no file."""
    out, rerun = _copy_of_the_output(finetuned, tmp_path)
    result = out / "teacher-2" / "finetune.json"
    result.write_text(result.read_text()[:40])
    proc = run_script(*rerun, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {result} is damaged: not JSON (" in proc.stderr
    assert f"delete {out / 'teacher-2'} to train that teacher again" in proc.stderr
    assert "Traceback" not in proc.stderr
    result.write_text(json.dumps({"params": {}, "dev": {}}))  # JSON, but not a teacher's
    proc = run_script(*rerun, timeout=300, check=False)
    assert proc.returncode == 2 and f"{result} is damaged: it lacks a teacher's steps, final_loss;" in proc.stderr


def test_a_finished_teacher_with_damaged_weights_is_named_not_reused(finetuned, tmp_path):
    """A teacher whose weights file was cut (a copy of the output interrupted) was reused, reported finished
    with exit 0, and failed only when precompute loaded it."""
    from dist_kd.io import weights_sha256

    exported = finetuned[0] / "out" / "teacher-1"
    recorded = json.loads((exported / "finetune.json").read_text())["weights_sha256"]
    assert recorded == weights_sha256(exported)  # the digest of the weights exported
    out, rerun = _copy_of_the_output(finetuned, tmp_path)
    damaged = out / "teacher-1" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    proc = run_script(*rerun, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    teacher = out / "teacher-1"
    assert (f"error: {teacher} holds other weights than its finetune.json records (damaged or replaced since it "
            f"was exported); delete {teacher} to train that teacher again") in proc.stderr  # fmt: skip
    damaged.unlink()
    proc = run_script(*rerun, timeout=300, check=False)
    assert proc.returncode == 2 and f"error: {teacher} holds no weights file" in proc.stderr


def test_a_run_directory_of_another_kind_is_refused_untouched(finetuned, tmp_path):
    """A general run given a fine-tuning directory as run.output_dir replaced its config.yaml and emptied its
    metrics.jsonl; finetune given a general run's directory overwrote that run's config.yaml. Both exited 0."""
    from tests.e2e.conftest import snapshot

    root, args = finetuned
    before = snapshot(root / "out")
    proc = run_script(
        "launch/general.py", "--debug", "--config", "launch/configs/quickstart.yaml", f"teacher.path={root / 'base'}",
        f"data.shards={root / 'shards'}", "eval.texts=null", f"run.output_dir={root / 'out'}", check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: run.output_dir {root / 'out'} holds a fine-tuned ensemble (dist-kd finetune), and a general "
        "distillation run (dist-kd general) would overwrite its config.yaml and metrics.jsonl: give a directory of "
        "its own"
    ], proc.stderr[-2000:]
    assert snapshot(root / "out") == before
    general = tmp_path / "general"
    general.mkdir()
    from dist_kd.config import dump_config
    from dist_kd.train.general import GeneralConfig

    (general / "config.yaml").write_text(dump_config(GeneralConfig()))  # as a general run writes it
    (general / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    before = snapshot(general)
    bad = list(args)
    bad[bad.index("--output") + 1] = str(general)
    proc = run_script(*bad, check=False)
    assert proc.returncode == 2 and f"error: --output {general} holds a general distillation run" in proc.stderr
    assert snapshot(general) == before


def test_a_teacher_directory_this_command_did_not_export_is_refused_untouched(finetuned, tmp_path):
    """OUTPUT/teacher-1 holding someone's model and notes, but no finetune.json: it was trained over and replaced
    whole, the notes gone, exit 0. An empty one is taken."""
    from tests.e2e.conftest import snapshot

    root, args = finetuned
    output = tmp_path / "out"
    (output / "teacher-1").mkdir(parents=True)
    (output / "teacher-1" / "NOTES.txt").write_text("mine")
    (output / "teacher-2").mkdir()  # empty
    before = snapshot(output)
    bad = list(args)
    bad[bad.index("--output") + 1] = str(output)
    proc = run_script(*bad, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {output / 'teacher-1'} exists and holds no finetune.json: it is not a teacher this command "
        "exported, and training would replace it whole; move it away, or give another --output"
    )
    assert snapshot(output) == before


def test_fp16_on_a_cpu_is_refused_by_its_flag_before_anything_is_written(finetuned, tmp_path):
    """It said "train.precision=fp16 needs a GPU" (another command's key) after the lock, train.log and a
    config.yaml recording fp16 were written."""
    root, args = finetuned
    bad = [*args, "--precision", "fp16"]
    bad[bad.index("--output") + 1] = str(tmp_path / "out")
    proc = run_script(*bad, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: --precision fp16 needs a GPU; use fp32, auto or bf16 on a CPU", last
    assert not (tmp_path / "out").exists()


def test_a_base_replaced_in_place_or_inside_the_output_and_an_output_inside_the_data_are_refused(finetuned, tmp_path):
    """A base replaced at the same path (another checkpoint) still reused the teachers of the old one; a base
    inside --output (OUT/teacher-1) was overwritten by teacher 1, and teacher 2 started from teacher 1."""
    import shutil

    from dist_kd.testing import build_tiny_bert

    root, args = finetuned
    shutil.copytree(root / "base", tmp_path / "base")
    run = _one_teacher(args, tmp_path / "out", base=tmp_path / "base")
    run_script(*run, timeout=300)
    params = json.loads((tmp_path / "out" / "teacher-1" / "finetune.json").read_text())["params"]
    assert params["world_size"] == 1 and len(params["base_sha256"]) == 64
    shutil.copytree(tmp_path / "base", tmp_path / "staged-base")  # the same base elsewhere: reused
    staged = _one_teacher(args, tmp_path / "out", base=tmp_path / "staged-base")
    assert "teacher 1: reusing" in run_script(*staged, timeout=300).stderr
    shutil.rmtree(tmp_path / "base")
    build_tiny_bert(tmp_path / "base", seed=9, num_layers=2)  # another checkpoint at the same path
    proc = run_script(*run, timeout=300, check=False)
    assert proc.returncode == 2 and "teacher-1 was trained with other settings (base_sha256 differ: " in proc.stderr
    inside = list(run)
    inside[inside.index("--base") + 1] = str(tmp_path / "out" / "teacher-1")
    before = (tmp_path / "out" / "teacher-1" / "model.safetensors").read_bytes()
    proc = run_script(*inside, timeout=300, check=False)
    assert proc.returncode == 2 and "is inside --output" in proc.stderr
    assert (tmp_path / "out" / "teacher-1" / "model.safetensors").read_bytes() == before
    nested = list(run)  # an --output inside the training data's directory: a rerun would take it for other data
    nested[nested.index("--train") + 1] = str(tmp_path)
    proc = run_script(*nested, timeout=300, check=False)
    assert proc.returncode == 2 and f"error: --output {tmp_path / 'out'} lies inside --train {tmp_path}" in proc.stderr
    assert (tmp_path / "out" / "teacher-1" / "model.safetensors").read_bytes() == before


def test_the_teachers_dropout_reaches_a_head_whose_base_sets_its_own(tmp_path):
    """--dropouts set the encoder's dropout, but a base whose config sets classifier_dropout kept that for the
    head."""
    from transformers import AutoConfig

    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.testing import build_tiny_bert
    from dist_kd.train.finetune import build_classifier

    base = build_tiny_bert(tmp_path / "base", num_layers=1)
    config = AutoConfig.from_pretrained(base)
    config.classifier_dropout = 0.3
    config.save_pretrained(base)
    model = build_classifier(base, resolve_task_spec("demo", labels=LABELS), dropout=0.05)
    assert model.config.classifier_dropout == 0.05 and model.config.hidden_dropout_prob == 0.05


POISON_TEACHER_2 = """
import sys
import dist_kd.train.finetune as finetune
from dist_kd.main import main

loss_of, train, poisoned = finetune.hard_label_loss, finetune.TeacherTrainer.train, []


def nan_loss(*args):  # teacher 2 trains on a nan loss (a learning rate far too high, an overflow)
    return loss_of(*args) * (float("nan") if poisoned else 1.0)


def train_and_mark(self, data, metrics):
    poisoned[:] = [True] if self.index == 1 else []
    return train(self, data, metrics)


finetune.hard_label_loss, finetune.TeacherTrainer.train = nan_loss, train_and_mark
sys.exit(main(["finetune", *sys.argv[1:]]))
"""


def test_a_diverged_teacher_stops_the_run_before_its_export(finetuned, tmp_path):
    """A nan teacher was exported and its nan soft targets fed precompute."""
    import shutil

    root, args = finetuned
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    shutil.rmtree(out / "teacher-2")
    rerun = list(args[1:])
    rerun[rerun.index("--output") + 1] = str(out)
    proc = run_script("-c", POISON_TEACHER_2, *rerun, timeout=300, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    said = (
        "error: teacher 2 diverged by step 4: its weights are no longer finite (nan or inf; its loss was nan "
        "in the steps up to step 4). It was not exported"
    )
    assert errors[0].startswith(said), errors[0]
    # advice that can be followed: a lower --lr into another --output (the same one refuses teacher-1 as of other
    # settings); no --clip (on already) and no --precision fp32 (fp32 already on a CPU)
    assert "Run again with a lower --lr (this run: 0.001) into another --output" in errors[0], errors[0]
    assert "--clip" not in errors[0] and "--precision" not in errors[0]
    assert (out / "teacher-1" / "finetune.json").is_file() and not (out / "teacher-2").exists()


def test_a_base_tokenizer_replaced_in_place_is_not_reused_and_pairs_are_scored_as_pairs(finetuned, tmp_path):
    """The base's weights alone were compared: a tokenizer replaced in place (cased for uncased) reused the
    teachers trained on the old one, and a re-score read the dev set with the new one (0.3 where the teacher
    scores 1.0). A dev file without the training rows' second texts was scored on its first texts alone, and a
    length that leaves no room for text besides the special tokens crashed mid-training."""
    import shutil

    from transformers import AutoTokenizer

    root, args = finetuned
    shutil.copytree(root / "base", tmp_path / "base")
    run = _one_teacher(args, tmp_path / "out", base=tmp_path / "base")
    run_script(*run, timeout=300)
    params = json.loads((tmp_path / "out" / "teacher-1" / "finetune.json").read_text())["params"]
    assert len(params["tokenizer_sha256"]) == 64
    cased = AutoTokenizer.from_pretrained(tmp_path / "base", do_lower_case=False)
    cased.save_pretrained(tmp_path / "base")  # the same weights, another tokenizer
    proc = run_script(*run, timeout=300, check=False)
    assert proc.returncode == 2 and "teacher-1 was trained with other settings (tokenizer_sha256 differ" in proc.stderr
    # A teacher of an earlier release (no tokenizer recorded) re-scored on a new dev set: not with another tokenizer
    record_path = tmp_path / "out" / "teacher-1" / "finetune.json"
    record = json.loads(record_path.read_text())
    del record["params"]["tokenizer_sha256"]
    record_path.write_text(json.dumps(record))
    dev = tmp_path / "dev2.jsonl"
    dev.write_text((root / "dev.jsonl").read_text().splitlines(keepends=True)[0] * 3)
    proc = run_script(*_one_teacher(args, tmp_path / "out", base=tmp_path / "base", dev=dev), timeout=300, check=False)
    assert proc.returncode == 2 and "teacher-1 has another tokenizer than --base" in proc.stderr

    pairs = tmp_path / "pairs.jsonl"
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    pairs.write_text("".join(json.dumps({**row, "text_b": row["body"][::-1]}) + "\n" for row in rows))
    paired = _one_teacher(args, tmp_path / "pairs-out", train=pairs)
    proc = run_script(*paired, timeout=300, check=False)
    assert proc.returncode == 2 and "are sentence pairs (text_b) but the dev rows of" in proc.stderr
    proc = run_script(*_one_teacher(args, tmp_path / "short"), "--max-length", "2", timeout=300, check=False)
    assert proc.returncode == 2
    assert "a maximum length of 2 pieces leaves no room for text: the tokenizer adds 2 special tokens" in proc.stderr
