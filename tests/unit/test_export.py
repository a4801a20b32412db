"""``dist-kd export`` of a task run's checkpoint: the path as the user gives it, and the encoder as the run's own
``student/`` holds it (the run's dropout, its sentence modules only where the trainer carries them)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml

from dist_kd.export import main
from dist_kd.testing import build_tiny_bert, random_sentences, tiny_bert_config


@pytest.fixture(scope="module")
def sentence_student(tmp_path_factory):
    """A 2-layer BERT (hidden and attention dropout 0.0) with sentence-transformers modules, as student.path."""
    directory = build_tiny_bert(tmp_path_factory.mktemp("student") / "st", num_layers=2)
    (directory / "1_Pooling").mkdir()
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return directory


def _task_run(root, student_dir, student: dict, num_layers: int):
    """A task run directory as the trainer leaves it: config.yaml, a ZeRO-0 checkpoint step-00000010 of the
    shared encoder (and a head), and ``latest`` naming it. Returns (run dir, the encoder's weights)."""
    from transformers import BertModel

    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": "a"}) + "\n" for t in random_sentences(4, seed=2)))
    config = {
        "student": {"path": str(student_dir), **student},
        "tasks": [{"name": "topic", "labels": ["a", "b"], "train": str(train), "text_a": "text"}],
        "run": {"output_dir": str(root / "run")},
    }
    run = root / "run"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(3)
    encoder = BertModel(tiny_bert_config(num_layers=num_layers)).state_dict()
    module = {f"encoder.{name}": value for name, value in encoder.items()}
    module["heads.topic.classifier.weight"] = torch.zeros(2, 32)
    checkpoint = run / "checkpoints" / "step-00000010"
    torch.save({"module": module, "buffer_names": []}, checkpoint / "mp_rank_00_model_states.pt")
    torch.save({"step": 10}, checkpoint / "rank00000.pt")  # the trainer's state: a whole checkpoint has it
    (checkpoint / "meta.json").write_text(json.dumps({"step": 10}))
    (run / "checkpoints" / "latest").write_text("step-00000010")
    return run, encoder


def _exported(directory, encoder):
    from safetensors.torch import load_file

    weights = load_file(directory / "model.safetensors")
    for name, value in weights.items():
        torch.testing.assert_close(value, encoder[name], rtol=0, atol=0, msg=name)
    return json.loads((directory / "config.json").read_text())


def test_a_checkpoint_named_from_inside_checkpoints_or_by_latest_exports(
    sentence_student, tmp_path, monkeypatch, capsys
):
    """``--checkpoint step-N`` run inside RUN/checkpoints took the run to be two levels above the relative path
    ("config.yaml is missing"), and ``RUN/checkpoints/latest``, the file naming the newest tag, had "no
    meta.json"."""
    run, encoder = _task_run(tmp_path, sentence_student, {"dropout": 0.3}, num_layers=2)
    monkeypatch.chdir(run / "checkpoints")
    assert main(["--checkpoint", "step-00000010", "--output", str(tmp_path / "relative")]) == 0, capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["--checkpoint", "run/checkpoints/latest", "--output", str(tmp_path / "latest")]) == 0
    assert main(["--checkpoint", "run/checkpoints/latest", "--output", "typed"]) == 0
    for out in ("relative", "latest", "typed"):
        _exported(tmp_path / out, encoder)
        card = (tmp_path / out / "README.md").read_text()
        assert "step-00000010 (step 10)" in card
        # the card's loading code names the export wherever it is read from (it said "typed", as given)
        assert f'AutoModel.from_pretrained("{(tmp_path / out).resolve()}")' in card
    (run / "checkpoints" / "latest").write_text("step-00000020")
    capsys.readouterr()
    assert main(["--checkpoint", "run/checkpoints/latest", "--output", str(tmp_path / "gone")]) == 2
    assert "names the checkpoint 'step-00000020', which is not in" in capsys.readouterr().err
    # a latest of bytes that are no text: one line naming it (a UnicodeDecodeError naming no file before)
    (run / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00bad")
    assert main(["--checkpoint", "run/checkpoints/latest", "--output", str(tmp_path / "gone")]) == 2
    assert "latest is not a checkpoint's name (it holds bytes that are no text)" in capsys.readouterr().err
    # RUN/checkpoints as a link to scratch space: the run is still the link's parent, not the target's
    (run / "checkpoints").rename(tmp_path / "scratch")
    (run / "checkpoints").symlink_to(tmp_path / "scratch")
    (run / "checkpoints" / "latest").write_text("step-00000010")
    for given in ("run/checkpoints/latest", "run/checkpoints/step-00000010"):
        out = tmp_path / f"linked-{given[-6:]}"
        assert main(["--checkpoint", given, "--output", str(out)]) == 0, capsys.readouterr().err
        _exported(out, encoder)


@pytest.mark.parametrize(
    ("student", "num_layers", "modules"),
    [({"dropout": 0.3}, 2, True), ({"init": "random", "num_layers": 1, "dropout": 0.25}, 1, False)],
)
def test_a_task_checkpoint_exports_the_runs_dropout_and_its_sentence_modules(
    sentence_student, tmp_path, student, num_layers, modules
):
    """The export wrote student.path's dropout (0.0; for init random the default 0.1) instead of the run's,
    and carried path's pooling for an init: random student, which the run's own student/ does not have."""
    run, encoder = _task_run(tmp_path, sentence_student, student, num_layers)
    assert main(["--checkpoint", str(run / "checkpoints" / "step-00000010"), "--output", str(tmp_path / "out")]) == 0
    config = _exported(tmp_path / "out", encoder)
    assert config["num_hidden_layers"] == num_layers and config["dtype"] == "float32"
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == student["dropout"]
    assert (tmp_path / "out" / "modules.json").is_file() == modules


def test_an_output_holding_anything_but_an_earlier_dist_kd_model_is_refused_untouched(
    sentence_student, tmp_path, monkeypatch, capsys
):
    """The export swaps its whole directory in: ``--output .`` deleted the user's files in it, and ``--output RUN``
    the run's checkpoints, config and metrics, with exit code 0."""
    run, encoder = _task_run(tmp_path, sentence_student, {"dropout": 0.3}, num_layers=2)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    checkpoint = str(run / "checkpoints" / "latest")
    cases = [
        (".", "is the current directory or holds it"),
        (str(tmp_path), "is the current directory or holds it"),
        (str(run), r"holds files other than an earlier dist_kd model \(checkpoints, config.yaml, train.jsonl"),
        (str(sentence_student), "holds files other than an earlier dist_kd model (1_Pooling, config.json"),
    ]
    (run / "train.jsonl").write_text("")  # one more of the user's files beside the run's
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    for output, message in cases:
        assert main(["--checkpoint", checkpoint, "--output", output]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output {output} ") and (message in err or re.search(message, err)), err
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before
    assert (work / "notes.txt").read_text() == "mine"
    # An earlier export (the run's own student/ included) is replaced; so is an empty directory.
    (tmp_path / "empty").mkdir()
    for output in ("exported", "exported", str(tmp_path / "empty")):
        assert main(["--checkpoint", checkpoint, "--output", output]) == 0, capsys.readouterr().err
        _exported(work / output if output == "exported" else tmp_path / "empty", encoder)
    # An earlier export the user has added to (an HF Trainer's checkpoint there, a hub clone's .git, notes): its
    # README.md still our card, it was replaced whole and their files deleted, with exit 0.
    exported = work / "exported"
    (exported / "checkpoint-500").mkdir()
    (exported / ".git").mkdir()
    (exported / "my_notes.txt").write_text("mine")
    before = sorted(path.relative_to(exported) for path in exported.rglob("*"))
    assert main(["--checkpoint", checkpoint, "--output", "exported"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --output exported holds files other than an earlier dist_kd model (.git, checkpoint-500, my_notes.txt)"
    )
    assert sorted(path.relative_to(exported) for path in exported.rglob("*")) == before


def test_a_relative_student_path_read_from_elsewhere_is_named_not_taken_for_a_hub_model(
    sentence_student, tmp_path, monkeypatch, capsys
):
    """config.yaml of earlier releases kept paths as typed: export run from another directory took
    'student.path: st' for a hub name ("couldn't connect"), or a same-named directory there for the run's."""
    import shutil

    run, _ = _task_run(tmp_path, sentence_student, {"dropout": 0.3}, num_layers=2)
    shutil.copytree(sentence_student, tmp_path / "st")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["student"]["path"] = "st"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["--checkpoint", str(run / "checkpoints" / "latest"), "--output", "out"]) == 2
    err = capsys.readouterr().err
    assert f"error: {run / 'config.yaml'}: student.path st is not a directory (a relative path is read from" in err
    assert not (elsewhere / "out").exists()
    monkeypatch.chdir(tmp_path)  # where the run started
    assert main(["--checkpoint", str(run / "checkpoints" / "latest"), "--output", "out"]) == 0


def test_a_tokenizer_changed_since_the_run_is_refused(sentence_student, tmp_path, capsys):
    """The export ships the tokenizer of the directory config.yaml names; one replaced since the run (another
    vocabulary of the same size) gave a student whose ids meant other words, without a word."""
    import shutil

    from dist_kd.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    student = tmp_path / "st"
    shutil.copytree(sentence_student, student)
    run, encoder = _task_run(tmp_path, student, {"dropout": 0.3}, num_layers=2)
    meta_file = run / "checkpoints" / "step-00000010" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["tokenizer.sha256"] = tokenizer_fingerprint(load_tokenizer(student))["sha256"]
    meta_file.write_text(json.dumps(meta))
    checkpoint = str(run / "checkpoints" / "latest")
    assert main(["--checkpoint", checkpoint, "--output", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    _exported(tmp_path / "ok", encoder)
    saved = json.loads((student / "tokenizer.json").read_text())
    vocab = saved["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two words swap ids
    (student / "tokenizer.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["--checkpoint", checkpoint, "--output", str(tmp_path / "swapped")]) == 2
    assert "is not the one the run trained with (sha256" in capsys.readouterr().err
    assert not (tmp_path / "swapped").exists()


def test_an_output_holding_a_classifier_is_refused_untouched(sentence_student, tmp_path, capsys):
    """tasks/<name>/ and best/<name>/ are dist_kd models too: export replaced one with a bare encoder, losing the
    task's head, its best.json and its dev predictions."""
    run, _ = _task_run(tmp_path, sentence_student, {"dropout": 0.3}, num_layers=2)
    classifier = build_tiny_bert(run / "tasks" / "topic", num_layers=2, model_class="BertForSequenceClassification")
    (classifier / "README.md").write_text("---\nlibrary_name: transformers\ntags: [dist_kd]\n---\n")
    best = build_tiny_bert(run / "best" / "topic", num_layers=2)
    (best / "best.json").write_text("{}")
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    for output, mark in ((classifier, "config.json architectures BertForSequenceClassification"), (best, "best.json")):
        assert main(["--checkpoint", str(run / "checkpoints" / "latest"), "--output", str(output)]) == 2
        assert f"error: --output {output} holds a model with a head ({mark})" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before


def test_a_truncated_checkpoint_file_is_named(sentence_student, tmp_path, capsys):
    run, _ = _task_run(tmp_path, sentence_student, {"dropout": 0.3}, num_layers=2)
    checkpoint = run / "checkpoints" / "step-00000010"
    model_file = checkpoint / "mp_rank_00_model_states.pt"
    size = model_file.stat().st_size
    (checkpoint / "meta.json").write_text(json.dumps({"step": 10, "files": {model_file.name: size}}))
    model_file.write_bytes(model_file.read_bytes()[: size // 2])
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {checkpoint} is damaged: mp_rank_00_model_states.pt has {size // 2} bytes, {size}" in err
    assert "export an earlier one" not in err  # there is none
    shutil.copytree(checkpoint, checkpoint.with_name("step-00000004"))  # damaged too: not named
    checkpoint.with_name("step-00000002").mkdir()  # whole: its rank file, and no sizes to check
    (checkpoint.with_name("step-00000002") / "meta.json").write_text(json.dumps({"step": 2}))
    (checkpoint.with_name("step-00000002") / "rank00000.pt").write_bytes(b"")
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.rstrip().endswith("(truncated?); export an earlier one (step-00000002)")
    for name in ("step-00000002", "step-00000004"):
        shutil.rmtree(checkpoint.with_name(name))
    (checkpoint / "meta.json").write_text(json.dumps({"step": 10}))  # an earlier release's: no sizes recorded
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {checkpoint} does not load (") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_student_path_of_another_shape_and_a_step_that_is_not_there_are_one_line(sentence_student, tmp_path, capsys):
    """A student.path rebuilt at another width since the run gave load_state_dict's 50-line traceback (exit 1);
    a mistyped or pruned step was called "not a complete dist_kd checkpoint", as a save cut short."""
    import shutil

    student = tmp_path / "st"
    shutil.copytree(sentence_student, student)
    run, _ = _task_run(tmp_path, student, {"dropout": 0.3}, num_layers=2)
    shutil.rmtree(student)
    build_tiny_bert(student, num_layers=2, hidden_size=48, num_heads=4)  # the same tokenizer, another width
    checkpoint = run / "checkpoints" / "step-00000010"
    capsys.readouterr()
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {checkpoint}: the weights do not fit the student the run's config describes (")
    assert (
        "(37 of another shape, embeddings.word_embeddings.weight (300, 32) in the checkpoint, (300, 48) built): " in err
    )
    assert "the student.path directory changed since the run" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    typo = run / "checkpoints" / "step-38"
    assert main(["--checkpoint", str(typo), "--output", str(tmp_path / "out")]) == 2
    said = f"error: checkpoint {typo} does not exist; the whole checkpoints in {run / 'checkpoints'}: step-00000010\n"
    assert capsys.readouterr().err == said
    assert main(["--checkpoint", str(tmp_path / "no-such-run"), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path / 'no-such-run'} does not exist\n"


def test_saved_tokenizers_carry_no_truncation_and_no_load_options(tiny_tokenizer_dir, tmp_path):
    """The runs saved their live tokenizer: tokenizer.json kept the truncation of its last call (the run's
    max_length), which the tokenizers library applies to every input, and tokenizer_config.json gained
    transformers' load options (local_files_only)."""
    from tokenizers import Tokenizer

    from dist_kd.data.tokenizer import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    text = " ".join(random_sentences(8, seed=1))
    assert len(tokenizer(text, truncation=True, max_length=8)["input_ids"]) == 8
    save_tokenizer(tokenizer, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    settings = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "local_files_only" not in settings and "is_local" not in settings
    full = len(tokenizer(text)["input_ids"])
    assert full > 8 and len(Tokenizer.from_file(str(tmp_path / "saved" / "tokenizer.json")).encode(text).ids) == full
    # The live tokenizer is as it was: it truncates when asked, and loads offline again.
    assert len(tokenizer(text, truncation=True, max_length=8)["input_ids"]) == 8
    assert tokenizer.init_kwargs.get("local_files_only") is True
    assert load_tokenizer(tmp_path / "saved")(text)["input_ids"] == tokenizer(text)["input_ids"]
    # Truncation its tokenizer.json shipped with is kept (only what a call left behind goes).
    shipped = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    shipped["truncation"] = {"direction": "Right", "max_length": 64, "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "saved" / "tokenizer.json").write_text(json.dumps(shipped))
    reloaded = load_tokenizer(tmp_path / "saved")
    reloaded(text, truncation=True, max_length=8)
    save_tokenizer(reloaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text())["truncation"]["max_length"] == 64


def test_a_saved_tokenizer_truncates_to_what_the_model_beside_it_holds(tiny_tokenizer_dir, tmp_path):
    """A student of fewer positions than its teacher's tokenizer allows was saved with the teacher's
    model_max_length: tokenizer(text, truncation=True) then gave inputs AutoModel failed on."""
    from transformers import AutoTokenizer, BertConfig

    from dist_kd.data.tokenizer import load_tokenizer, save_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    shipped = tokenizer.model_max_length
    short = BertConfig(max_position_embeddings=40)
    save_tokenizer(tokenizer, tmp_path / "short", short)
    saved = AutoTokenizer.from_pretrained(tmp_path / "short")
    text = " ".join(random_sentences(20, seed=1))
    assert saved.model_max_length == 40 and len(saved(text, truncation=True)["input_ids"]) == 40
    assert tokenizer.model_max_length == shipped > 40  # the live tokenizer is as it was
    save_tokenizer(tokenizer, tmp_path / "long", BertConfig(max_position_embeddings=shipped + 100))
    assert AutoTokenizer.from_pretrained(tmp_path / "long").model_max_length == shipped  # never raised


def test_a_general_run_whose_student_does_not_fit_names_the_directory_it_is_built_from(tmp_path, capsys):
    """The shape error blamed config.yaml alone; a general run's student is built from teacher.path's config
    (or from student.path where the run has one)."""
    from transformers import BertConfig, BertModel

    teacher = build_tiny_bert(tmp_path / "teacher", num_layers=2)
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    student = {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32}
    config = {"teacher": {"path": str(teacher)}, "student": student, "data": {"shards": str(tmp_path / "shards")},
              "run": {"output_dir": str(run)}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    wider = BertConfig(vocab_size=300, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    module = {f"student.{name}": value for name, value in BertModel(wider).state_dict().items()}
    torch.save({"module": module, "buffer_names": []}, checkpoint / "mp_rank_00_model_states.pt")
    (checkpoint / "meta.json").write_text(json.dumps({"step": 4}))
    capsys.readouterr()
    assert main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "embeddings.word_embeddings.weight (300, 24) in the checkpoint, (300, 16) built): the teacher.path " in err


def test_a_checkpoint_of_zeros_at_its_saved_sizes_is_one_line_naming_it(sentence_student, tmp_path, capsys):
    """A model-states file of zeros (a crash after the sizes were recorded) passes the size check; torch's reader
    raised KeyError("filename 'storages' not found"), a traceback."""
    run, _ = _task_run(tmp_path, sentence_student, {"dropout": 0.3}, num_layers=2)
    states = run / "checkpoints" / "step-00000010" / "mp_rank_00_model_states.pt"
    states.write_bytes(b"\0" * states.stat().st_size)
    assert main(["--checkpoint", str(states.parent), "--output", str(tmp_path / "out")]) == 2
    assert "step-00000010 does not load (KeyError" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_the_runs_own_starting_model_is_refused(sentence_student, tmp_path, capsys):
    """A run whose student.path is an earlier dist_kd export (a second round of distillation): --output there
    passed the check that lets an earlier export be replaced, and replaced the model the run started from."""
    import shutil

    from dist_kd.model_card import model_card, write_model_card

    start = tmp_path / "round1"
    shutil.copytree(sentence_student, start)
    write_model_card(start, model_card("round 1", "an earlier export", {}, None, "", "feature-extraction"))
    run, _ = _task_run(tmp_path, start, {"dropout": 0.3}, num_layers=2)
    before = sorted((p.name, p.stat().st_size) for p in start.iterdir())
    assert main(["--checkpoint", str(run), "--output", str(start)]) == 2
    assert f"--output {start} is student.path of the run {run}" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_size) for p in start.iterdir()) == before
    assert main(["--checkpoint", str(run), "--output", str(tmp_path / "round2")]) == 0


def test_a_task_export_takes_that_tasks_head_and_leaves_the_other_tasks_heads(sentence_student, tmp_path, capsys):
    """--task topic of a two-task run: the head of the other task stays in the checkpoint."""
    from safetensors.torch import load_file

    run, encoder = _task_run(tmp_path, sentence_student, {}, 2)
    checkpoint = run / "checkpoints" / "step-00000010"
    states = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)
    weight = torch.arange(64, dtype=torch.float32).reshape(2, 32)
    states["module"] |= {"heads.topic.classifier.weight": weight, "heads.topic.classifier.bias": torch.ones(2),
                         "heads.other.classifier.weight": torch.zeros(3, 32),
                         "heads.other.classifier.bias": torch.zeros(3)}  # fmt: skip
    torch.save(states, checkpoint / "mp_rank_00_model_states.pt")
    tasks = [{"name": "topic", "labels": ["a", "b"], "type": "classification"},
             {"name": "other", "labels": ["x", "y", "z"], "type": "classification"}]  # fmt: skip
    (checkpoint / "meta.json").write_text(json.dumps({"step": 10, "tasks": tasks}))
    out = tmp_path / "topic"
    assert main(["--checkpoint", str(checkpoint), "--output", str(out), "--task", "topic"]) == 0, capsys.readouterr()
    exported = load_file(out / "model.safetensors")
    head = [value for name, value in exported.items() if value.shape == weight.shape and "classifier" in name]
    assert len(head) == 1 and torch.equal(head[0], weight)


def test_a_latest_older_than_the_newest_whole_checkpoint_is_exported_as_named_with_a_warning(
    sentence_student, tmp_path, caplog
):
    from dist_kd.export import resolve_checkpoint

    run, _ = _task_run(tmp_path, sentence_student, {}, 2)
    shutil.copytree(run / "checkpoints" / "step-00000010", run / "checkpoints" / "step-00000020")
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(run / "checkpoints" / "latest") == run / "checkpoints" / "step-00000010"
    assert "step-00000020 is newer and whole" in caplog.text
    caplog.clear()
    (run / "checkpoints" / "latest").write_text("step-00000020")
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(run / "checkpoints" / "latest") == run / "checkpoints" / "step-00000020"
    assert "newer" not in caplog.text
