"""General distillation's set-up checks: inputs that failed only at the first step, or after the teacher had
loaded, are refused with the config, before anything is written to the run directory; keys that student.path
overrides are named."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import run_script

TINY = ["student.num_layers=2", "student.hidden_size=16", "student.num_heads=4", "student.intermediate_size=32",
        "data.micro_batch_size=4", "data.num_workers=0", "eval.texts=null", "train.max_steps=2"]  # fmt: skip


def _general(tiny_bert_dir, tiny_corpus, run_dir, *extra):
    return run_script(
        "launch/general.py", "--debug", "--config", "launch/configs/quickstart.yaml", f"teacher.path={tiny_bert_dir}",
        f"data.shards={tiny_corpus / 'shards'}", f"run.output_dir={run_dir}", *TINY, *extra, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            ["distill.weights.embd=0", "distill.weights.hidden=0", "distill.weights.attn=0"],
            "every layer-loss weight (distill.weights.embd, distill.weights.hidden, distill.weights.attn, "
            "distill.weights.sentence) is 0",
        ),
        (["data.shuffle_buffer=0"], "data.shuffle_buffer must be >= 1, got 0"),
        (["data.eval_batches=0", "data.eval_shards=SHARDS"], "data.eval_batches must be >= 1, got 0"),
        (
            ["student.hidden_size=64", "student.num_heads=4", "student.intermediate_size=32"],
            "so the student's hidden_size (64) must not exceed the teacher's (32)",
        ),
        (
            ["student.path=TEACHER", "distill.attention=relations", "distill.relation_heads=5"],
            "distill.relation_heads 5 does not divide the teacher's width 32",
        ),
        (["train.compile=true", "deepspeed.config=ds_configs/zero3.json"], "train.compile works with ZeRO 0-2"),
        (
            ["deepspeed.config=JSON"],
            "ds.json: zero_optimization.overlap_comms is not a setting DeepSpeed knows there (misspelt?)",
        ),
    ],
    ids=[
        "zero weights",
        "shuffle buffer",
        "eval batches",
        "wider cut student",
        "relation heads of student.path",
        "compile at zero 3",
        "deepspeed key",
    ],  # fmt: skip
)
def test_a_bad_setting_is_refused_before_the_run_directory_changes(extra, said, tiny_bert_dir, tiny_corpus, tmp_path):
    """Each of these ended at the first step (after "new run in ..." and config.yaml were written; a resume had
    its config.yaml replaced by one that never trained), or after the teacher had loaded and the student been
    calibrated."""
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2, "overlap_comms": true}}')
    extra = [
        item.replace("SHARDS", str(tiny_corpus / "eval")).replace("TEACHER", str(tiny_bert_dir))
        .replace("JSON", str(tmp_path / "ds.json")) for item in extra
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    proc = _general(tiny_bert_dir, tiny_corpus, run_dir, *extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert said in proc.stderr
    assert "new run in" not in proc.stderr and not run_dir.exists()
    assert "calibrated the student" not in proc.stderr


def test_the_keys_that_student_path_overrides_are_named(tiny_bert_dir, tiny_corpus, tmp_path):
    """student.path fixes the shape and the weights: a 4 x 32 student was trained while config.yaml said 2 x 16,
    without a word. Only the keys that differ are named (the heads agree). student.shared_projection where no
    W_h is learnt (here the widths are equal) was taken without a word too."""
    proc = _general(tiny_bert_dir, tiny_corpus, tmp_path / "run", f"student.path={tiny_bert_dir}", "train.max_steps=1",
                    "student.shared_projection=true")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "student.shared_projection is not used: distill.projection=select learns no W_h here (the widths are equal)"
        in proc.stderr
    )
    assert (
        f"student.path {tiny_bert_dir} fixes the student's shape and weights; not used: student.num_layers=2 (its 4), "
        "student.hidden_size=16 (its 32), student.intermediate_size=32 (its 64), student.init=teacher (it starts "
        "from its own weights)" in proc.stderr
    )


def test_precompute_and_prepare_corpus_take_debug(tiny_bert_dir, tmp_path):
    """The command-line contract gives every launch script --debug (one process); precompute and prepare-corpus
    refused it. precompute --debug is one process whatever launcher variables the shell holds (without it, a
    WORLD_SIZE of 2 waits for a second rank), and prepare-corpus --debug tokenises in its own process, to the
    same corpus."""
    import json
    import subprocess
    import sys

    from dist_kd.testing import build_tiny_bert, random_sentences
    from tests.e2e.conftest import REPO, script_env

    labels = {0: "a", 1: "b"}
    teacher = build_tiny_bert(tmp_path / "teacher", num_layers=1, model_class="BertForSequenceClassification",
                              num_labels=2, id2label=labels, label2id={v: k for k, v in labels.items()})  # fmt: skip
    rows = [{"text": text, "label": "ab"[i % 2]} for i, text in enumerate(random_sentences(8, seed=2))]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = dict(script_env(), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29557")
    command = [sys.executable, "launch/precompute.py", "--debug", "--task", "t", "--labels", "a,b", "--text-a", "text",
               "--data", str(tmp_path / "d.jsonl"), "--teachers", str(teacher), "--output", str(tmp_path / "soft"),
               "--cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from dist_kd.data.soft_targets import load_soft_targets

    assert load_soft_targets(tmp_path / "soft").table.num_rows == 8

    (tmp_path / "text.txt").write_text("\n\n".join(random_sentences(40, seed=3)))
    corpus = ["launch/prepare_corpus.py", "--input", str(tmp_path / "text.txt"), "--tokenizer", str(tiny_bert_dir),
              "--seq-len", "16", "--shard-size", "8", "--no-progress"]  # fmt: skip
    run_script(*corpus, "--output", str(tmp_path / "plain"), "--num-workers", "0")
    run_script(*corpus, "--output", str(tmp_path / "debug"), "--debug")
    plain, debug = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("plain", "debug"))
    assert debug["shards"] == plain["shards"] and debug["num_sequences"] == plain["num_sequences"] > 0


def test_student_keys_left_at_their_defaults_are_not_named(caplog):
    """Only keys a config sets (away from their defaults) to another value than the directory's are named: with
    student.path alone, every run named the defaults 4 x 312 as not used."""
    import logging
    from types import SimpleNamespace

    from transformers import BertConfig

    from dist_kd.models.student import StudentConfig
    from dist_kd.train.general import GeneralTrainer

    directory = BertConfig(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
    trainer = SimpleNamespace(info=SimpleNamespace(is_main=True))
    trainer.cfg = SimpleNamespace(student=StudentConfig(path="/s"))
    with caplog.at_level(logging.WARNING, logger="dist_kd.train.general"):
        GeneralTrainer._say_unread_student_keys(trainer, directory)
    assert not caplog.records
    trainer.cfg = SimpleNamespace(student=StudentConfig(path="/s", num_layers=3, num_heads=12, init="teacher"))
    with caplog.at_level(logging.WARNING, logger="dist_kd.train.general"):
        GeneralTrainer._say_unread_student_keys(trainer, directory)
    assert caplog.records[-1].getMessage() == (
        "student.path /s fixes the student's shape and weights; not used: student.num_layers=3 (its 6), "
        "student.init=teacher (it starts from its own weights)"
    )


def test_the_logged_lr_is_the_rate_its_step_applied(tiny_bert_dir, tiny_corpus, tmp_path):
    """Each line's lr was read after the step had moved the schedule on: the next step's rate (step 1 logged
    lr/3 where it applied 0, the last step 0)."""
    import json

    run_dir = tmp_path / "run"
    proc = _general(tiny_bert_dir, tiny_corpus, run_dir, "train.max_steps=6", "train.warmup_ratio=0.34",
                    "train.lr=0.001", "run.log_every=1", "run.save_every=0")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {line["step"]: line["lr"] for line in lines if "lr" in line}
    # 3 warmup steps (ceil(0.34 x 6)): the multiplier of step s (0-based) is s/3, then (6 - s)/3
    expected = {s + 1: 1e-3 * (s / 3 if s < 3 else (6 - s) / 3) for s in range(6)}
    assert logged == pytest.approx(expected, abs=1e-12)


def test_adamax_trains_under_zero_2(tiny_bert_dir, tiny_corpus, tmp_path):
    """DeepSpeed's ZeRO takes only the optimizer classes it lists: train.optimizer=adamax stopped at the engine
    with "You are using an untested ZeRO Optimizer"."""
    proc = _general(tiny_bert_dir, tiny_corpus, tmp_path / "run", "train.optimizer=adamax",
                    "deepspeed.config=ds_configs/zero2.json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "student" / "config.json").exists()
