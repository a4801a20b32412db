"""launch/general.py end to end on a tiny teacher and corpus: 2 CPU ranks (ZeRO-2, ZeRO-3), debug mode,
exact resume after SIGTERM, the copy-of-the-teacher invariant, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import run_script, run_until_lines_then_sigterm, snapshot

CONFIG = "launch/configs/quickstart.yaml"
TINY_STUDENT = [
    "student.num_layers=2",
    "student.hidden_size=16",
    "student.num_heads=4",
    "student.intermediate_size=32",
    "data.micro_batch_size=4",
    "train.lr=3e-3",
    "train.warmup_ratio=0.1",
]


def _args(teacher, corpus, out, *extra):
    return [
        f"teacher.path={teacher}",
        f"data.shards={corpus / 'shards'}",
        f"data.eval_shards={corpus / 'eval'}",
        f"run.output_dir={out}",
        *TINY_STUDENT,
        *extra,
    ]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_run(run_dir: Path, max_steps: int, log_every: int):
    from transformers import AutoModel, AutoTokenizer

    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(log_every, max_steps + 1, log_every))
    for record in records:
        for key in ("step", "loss", "loss_embd", "loss_hidden", "loss_attn", "lr", "tokens_per_s", "samples_per_s"):
            assert key in record, key
        assert record["loss"] == pytest.approx(record["loss_embd"] + record["loss_hidden"] + record["loss_attn"])
    assert records[-1]["loss"] < 0.9 * records[0]["loss"], "the loss should fall"
    student = AutoModel.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 16
    assert AutoTokenizer.from_pretrained(run_dir / "student").vocab_size > 0
    assert (run_dir / "config.yaml").is_file()
    assert any((run_dir / "checkpoints").glob("step-*/meta.json"))


@pytest.mark.distributed
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_ranks_with_deepspeed_launcher(zero, tiny_bert_dir, tiny_corpus, tmp_path):
    out = tmp_path / zero
    run_script(
        "deepspeed", "--num_gpus", "2", "--master_port", str(29500 + (7 if zero == "zero2" else 11)),
        "launch/general.py", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=16", "run.log_every=4", "run.save_every=8",
               f"deepspeed.config=ds_configs/{zero}.json", "data.num_workers=1"),
    )  # fmt: skip
    _check_run(out, 16, 4)
    meta = json.loads((out / "checkpoints" / "step-00000016" / "meta.json").read_text())
    assert meta["world_size"] == 2


def test_debug_mode_single_process(tiny_bert_dir, tiny_corpus, tmp_path):
    out = tmp_path / "debug"
    proc = run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=16", "run.log_every=4", "run.save_every=8"),
    )  # fmt: skip
    _check_run(out, 16, 4)
    assert "student saved to" in proc.stdout and "random student" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["agreement"]["student"] > summary["agreement"]["random_student"]


def test_resume_after_sigterm_gives_the_same_losses(tiny_bert_dir, tiny_corpus, tmp_path):
    # log_every=3: the signal usually lands between log lines, so the checkpoint must carry the open window.
    steps = ["train.max_steps=150", "run.log_every=3", "run.save_every=0", "data.eval_shards=null"]
    straight = tmp_path / "straight"
    run_script("launch/general.py", "--debug", "--config", CONFIG, *_args(tiny_bert_dir, tiny_corpus, straight, *steps))

    interrupted = tmp_path / "interrupted"
    args = ["launch/general.py", "--debug", "--config", CONFIG, *_args(tiny_bert_dir, tiny_corpus, interrupted, *steps)]
    run_until_lines_then_sigterm(args, interrupted / "metrics.jsonl")
    saved = sorted((interrupted / "checkpoints").glob("step-*"))
    assert len(saved) == 1, "SIGTERM should leave exactly one checkpoint"
    stopped_at = int(saved[0].name.split("-")[1])
    assert 3 <= stopped_at < 150, f"stopped at {stopped_at}: the signal came too late to test resume"
    assert not (interrupted / "student").exists()

    run_script(
        "launch/general.py", "--debug", "--config", CONFIG, *_args(tiny_bert_dir, tiny_corpus, interrupted, *steps)
    )
    expected, resumed = _metrics(straight), _metrics(interrupted)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected] == list(range(3, 151, 3))
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "loss_embd", "loss_hidden", "loss_attn", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
        assert b["tokens_seen"] == a["tokens_seen"], a["step"]


def test_copy_of_teacher_starts_at_zero_loss(tiny_bert_dir, tiny_corpus, tmp_path):
    out = tmp_path / "copy"
    run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        f"teacher.path={tiny_bert_dir}", f"data.shards={tiny_corpus / 'shards'}", "data.eval_shards=null",
        f"run.output_dir={out}", "student.num_layers=4", "student.hidden_size=32", "student.num_heads=4",
        "student.intermediate_size=64", "student.init=teacher", "student.dropout=0.0", "train.max_steps=1",
        "run.log_every=1", "data.micro_batch_size=4", "teacher.dtype=fp32",
    )  # fmt: skip
    first = _metrics(out)[0]
    for key in ("loss", "loss_embd", "loss_hidden", "loss_attn"):
        assert first[key] < 1e-9, (key, first[key])


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=4", "run.log_every=2", "data.eval_shards=null"),
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def other_tokenizer_corpus(tmp_path_factory):
    from transformers import BertTokenizerFast

    from dist_kd.data.corpus import prepare_corpus
    from dist_kd.testing import random_sentences, tiny_vocab

    root = tmp_path_factory.mktemp("other")
    vocab = {token: index for index, token in enumerate(reversed(tiny_vocab()))}
    BertTokenizerFast(vocab=vocab).save_pretrained(root / "tok")
    (root / "t.txt").write_text("\n\n".join(random_sentences(50, seed=9)))
    prepare_corpus([root / "t.txt"], root / "tok", root / "shards", seq_len=32, num_workers=0, progress=False)
    return root / "shards"


@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        ("missing teacher", ["teacher.path=/nonexistent/teacher"], "teacher.path /nonexistent/teacher does not exist"),
        ("tokenizer mismatch", ["data.shards=OTHER"], "corpus .* was tokenized with .* teacher uses"),
        ("student shape", ["student.hidden_size=30"], "student.hidden_size 30 is not divisible by student.num_heads 4"),
        ("batch settings", ["train.global_batch_size=7"], "train.global_batch_size=7 but data.micro_batch_size"),
        ("unknown key", ["train.max_step=3"], "unknown config key 'train.max_step'; did you mean 'train.max_steps'"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_the_run_alone(
    case, overrides, message, finished_run, tiny_bert_dir, tiny_corpus, other_tokenizer_corpus
):
    import re

    before = snapshot(finished_run)
    overrides = [o.replace("OTHER", str(other_tokenizer_corpus)) for o in overrides]
    proc = run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, finished_run, "train.max_steps=8", *overrides),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(finished_run) == before
