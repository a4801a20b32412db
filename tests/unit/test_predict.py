"""evaluate_classifier and launch/evaluate.py: bad label columns and flags are one clear error, not null metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dist_kd.data.tasks import resolve_task_spec
from dist_kd.predict import evaluate_classifier

LABELS = ["neg", "pos"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    from dist_kd.testing import build_tiny_bert

    directory = tmp_path_factory.mktemp("classifier")
    return build_tiny_bert(
        directory, num_layers=1, model_class="BertForSequenceClassification", max_position_embeddings=128,
        num_labels=2, id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from dist_kd.testing import random_sentences

    path = tmp_path_factory.mktemp("data") / "dev.jsonl"
    rows = [{"text": s, "category": LABELS[i % 2]} for i, s in enumerate(random_sentences(6, seed=1))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _spec(label: str | None):
    return resolve_task_spec("demo", labels=LABELS, text_a="text", label=label)


def _evaluate_main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    try:
        from launch.evaluate import main
    finally:
        sys.path.pop(0)
    return main(argv)


def test_a_misspelt_label_column_is_an_error_naming_the_file_and_columns(classifier, data):
    with pytest.raises(ValueError, match=rf"data {data} has no label column 'categroy' .*columns found: \['text', "):
        evaluate_classifier(classifier, _spec("categroy"), data)
    # The named column that exists is scored; data without the default column stays a test set.
    assert evaluate_classifier(classifier, _spec("category"), data)["metrics"]["accuracy"] is not None
    report = evaluate_classifier(classifier, _spec("label"), data)
    assert report["metrics"] is None and report["num_rows"] == 6


def test_evaluate_command_exits_2_on_a_misspelt_label_column(classifier, data, capsys):
    argv = ["--model", str(classifier), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
    assert _evaluate_main([*argv, "--label", "categroy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: data {data} has no label column 'categroy'") and err.count("\n") == 1


def test_an_encoder_without_a_classification_head_is_refused(tmp_path, data, capsys):
    """A task run's student/ scored as a classifier got a new random head: predictions and exit 0 on a test set."""
    from dist_kd.testing import build_tiny_bert

    encoder = build_tiny_bert(tmp_path / "student", num_layers=1)
    capsys.readouterr()  # the save's progress bars
    argv = ["--model", str(encoder), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
    assert _evaluate_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model {encoder} is a BertModel (config.json architectures), an encoder without")
    with pytest.raises(ValueError, match="not its student/"):
        evaluate_classifier(encoder, _spec("category"), data)


def test_max_length_beyond_the_position_embeddings_is_refused_up_front(classifier, data):
    with pytest.raises(
        ValueError, match=rf"--max-length 129 exceeds the max_position_embeddings 128 of model {classifier}"
    ):
        evaluate_classifier(classifier, _spec("category"), data, max_length=129)
    assert evaluate_classifier(classifier, _spec("category"), data, max_length=128)["num_rows"] == 6


def test_max_input_length_matches_what_the_model_runs(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModel

    from dist_kd.models.teacher import check_max_length, max_input_length
    from dist_kd.testing import build_tiny_bert, build_tiny_encoder

    # The reference is the model itself: the longest input its forward accepts.
    # MPNet numbers its positions from 2 whatever its pad_token_id (0 in the tiny one): one token too many passed
    # the check and failed as an IndexError inside the embedding.
    mpnet = build_tiny_encoder(tmp_path / "mpnet", arch="mpnet", num_layers=1)
    bert, roberta = build_tiny_bert(tmp_path / "bert", num_layers=1), build_tiny_encoder(tmp_path / "roberta")
    # data2vec-text numbers its positions as RoBERTa does: seq_len 34 of 34 positions failed mid-run
    from transformers import Data2VecTextConfig, Data2VecTextModel

    data2vec = tmp_path / "data2vec"
    Data2VecTextModel(Data2VecTextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=34, pad_token_id=1)
                      ).save_pretrained(data2vec)  # fmt: skip
    for directory in (bert, roberta, mpnet, data2vec):
        config = AutoConfig.from_pretrained(directory)
        model = AutoModel.from_pretrained(directory).eval()
        limit = max_input_length(config)
        with torch.no_grad():
            model(input_ids=torch.full((1, limit), 7))
            with pytest.raises((IndexError, RuntimeError)):
                model(input_ids=torch.full((1, limit + 1), 7))
        check_max_length(config, limit, directory, "--max-length")
        with pytest.raises(ValueError, match=rf"--max-length {limit + 1} exceeds .* of model {directory}; set"):
            check_max_length(config, limit + 1, directory, "--max-length")
    assert max_input_length(AutoConfig.from_pretrained(tmp_path / "roberta")) == 131  # 132 positions, padding id 0
    # DeBERTa-v3's layout adds no absolute positions: inputs past max_position_embeddings run, and are allowed
    directory = build_tiny_encoder(tmp_path / "deberta", arch="deberta-v2", num_layers=1)
    config = AutoConfig.from_pretrained(directory)
    with torch.no_grad():
        AutoModel.from_pretrained(directory).eval()(input_ids=torch.full((1, 2 * config.max_position_embeddings), 7))
    assert max_input_length(config) is None
    check_max_length(config, 2 * config.max_position_embeddings, directory, "--max-length")


def test_evaluate_command_errors_on_bad_lengths_and_batch_sizes(classifier, data, capsys):
    argv = ["--model", str(classifier), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
    assert _evaluate_main([*argv, "--label", "category", "--max-length", "129"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-length 129 exceeds the max_position_embeddings 128") and err.count("\n") == 1
    for flag in ("--batch-size", "--max-length"):
        with pytest.raises(SystemExit) as exit_info:
            _evaluate_main([*argv, flag, "0"])
        assert exit_info.value.code == 2
        assert f"argument {flag}: expected a positive integer (>= 1), got 0" in capsys.readouterr().err


def test_evaluate_command_exits_2_when_output_is_a_file(classifier, data, tmp_path, capsys):
    output = tmp_path / "ev"
    output.write_text("keep me\n")
    argv = ["--model", str(classifier), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
    assert _evaluate_main([*argv, "--label", "category", "--output", str(output)]) == 2
    assert capsys.readouterr().err == f"error: --output {output} is a file; give a directory\n"
    assert output.read_text() == "keep me\n"
    # A path below a file is the same mistake, reported the same way.
    with pytest.raises(ValueError, match=rf"^--output {output / 'sub'}: {output} is a file; give a directory$"):
        evaluate_classifier(classifier, _spec("category"), data, output=output / "sub")


def test_output_directory_of_a_previous_evaluation_is_replaced_whole(classifier, data, tmp_path, monkeypatch):
    import dist_kd.io

    output = tmp_path / "ev"
    first = evaluate_classifier(classifier, _spec("category"), data, output=output)
    before = {name: (output / name).read_text() for name in ("predictions.jsonl", "metrics.json")}
    assert json.loads(before["metrics.json"]) == first and len(before["predictions.jsonl"].splitlines()) == 6

    # A crash after the predictions were written, before the metrics: the previous evaluation stays whole.
    fewer = tmp_path / "dev4.jsonl"
    fewer.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))

    def crash(*args, **kwargs):
        raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(dist_kd.io, "write_json_atomic", crash)
        with pytest.raises(RuntimeError, match="killed"):
            evaluate_classifier(classifier, _spec("category"), fewer, output=output)
    assert {name: (output / name).read_text() for name in before} == before

    # Completed, the new evaluation replaces the old one as a pair, leaving nothing else behind.
    second = evaluate_classifier(classifier, _spec("category"), fewer, output=output)
    assert json.loads((output / "metrics.json").read_text()) == second and second["num_rows"] == 4
    assert len((output / "predictions.jsonl").read_text().splitlines()) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dev4.jsonl", "ev"]
    assert sorted(path.name for path in output.iterdir()) == ["metrics.json", "predictions.jsonl"]


def test_a_model_naming_the_classes_in_another_order_is_scored_by_name(classifier, data, tmp_path):
    """Its outputs are read by their names: the scores and predictions of the same model in the task's order."""
    from dist_kd.testing import reorder_classifier_outputs

    twin = reorder_classifier_outputs(classifier, tmp_path / "twin", perm=[1, 0])
    assert json.loads((twin / "config.json").read_text())["id2label"] == {"0": "pos", "1": "neg"}
    first = evaluate_classifier(classifier, _spec("category"), data, output=tmp_path / "first")
    second = evaluate_classifier(twin, _spec("category"), data, output=tmp_path / "second")
    assert second["metrics"] == pytest.approx(first["metrics"])
    lines = [[json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
             for name in ("first", "second")]  # fmt: skip
    assert [line["prediction"] for line in lines[1]] == [line["prediction"] for line in lines[0]]
    for mine, theirs in zip(*lines):
        assert mine["logits"] == pytest.approx(theirs["logits"], abs=1e-5)


def test_evaluate_names_glue_tasks_as_the_other_commands_do(tmp_path, capsys):
    """`--task SST-2` is GLUE's SST-2 (its labels from the registry, as `sst2` and the other commands take it),
    and a Hugging Face SST-2 model names datasets' classes negative, positive for the GLUE files' ids 0, 1."""
    from dist_kd.testing import build_tiny_bert, random_sentences

    names = ["negative", "positive"]
    model = build_tiny_bert(
        tmp_path / "sst2", num_layers=1, model_class="BertForSequenceClassification", num_labels=2,
        id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)},
    )  # fmt: skip
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"sentence": s, "label": i % 2}) + "\n"
                            for i, s in enumerate(random_sentences(6, seed=2))))  # fmt: skip
    reports = []
    for task in ("sst2", "SST-2"):
        assert _evaluate_main(["--model", str(model), "--task", task, "--data", str(data), "--cpu"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[0]["metrics"] == reports[1]["metrics"] and reports[0]["num_labelled"] == 6
    assert reports[0]["task"] == reports[1]["task"] == "sst2"


def test_a_glue_test_split_without_the_tasks_label_column_is_scored_as_a_test_set(tmp_path, capsys):
    """GLUE's MRPC labels sit in `Quality`, which its test split lacks: without a task.json it was refused as a
    column named with --label ("leave --label out", which the user had), so no MRPC test split could be scored.
    A dev split with the column is still scored, and a column the user names must exist."""
    from dist_kd.testing import build_tiny_bert, random_sentences

    model = build_tiny_bert(
        tmp_path / "mrpc", num_layers=1, model_class="BertForSequenceClassification", num_labels=2,
        id2label={0: "0", 1: "1"}, label2id={"0": 0, "1": 1},
    )  # fmt: skip
    a, b = random_sentences(4, seed=3), random_sentences(4, seed=4)
    head = "#1 ID\t#2 ID\t#1 String\t#2 String"
    test, dev = tmp_path / "test.tsv", tmp_path / "dev.tsv"
    test.write_text(f"index\t{head}\n" + "".join(f"{i}\t1\t2\t{x}\t{y}\n" for i, (x, y) in enumerate(zip(a, b))))
    dev.write_text(f"Quality\t{head}\n" + "".join(f"{i % 2}\t1\t2\t{x}\t{y}\n" for i, (x, y) in enumerate(zip(a, b))))
    argv = ["--model", str(model), "--task", "mrpc", "--cpu", "--data"]
    assert _evaluate_main([*argv, str(test)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"] is None and report["num_rows"] == 4 and report["num_labelled"] == 0
    assert _evaluate_main([*argv, str(dev)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_labelled"] == 4 and report["metrics"]["accuracy"] is not None
    assert _evaluate_main([*argv, str(test), "--label", "Quality"]) == 2
    assert "has no label column 'Quality' (--label)" in capsys.readouterr().err
    # The API as the command: its spec's label is the registry's column, which it did not name either
    assert evaluate_classifier(model, resolve_task_spec("mrpc"), test)["metrics"] is None
    assert evaluate_classifier(model, resolve_task_spec("mrpc"), dev)["num_labelled"] == 4
    with pytest.raises(ValueError, match="has no label column 'Quality'"):
        evaluate_classifier(model, resolve_task_spec("mrpc"), test, label_optional=False)


def test_a_hugging_face_mnli_model_on_a_split_saved_by_datasets_scores_as_plain_transformers(tmp_path):
    """Both sides in datasets' MNLI order (entailment, neutral, contradiction) against the GLUE registry's
    (contradiction, entailment, neutral): the data's labels map by name and the model's outputs by name, so the
    accuracy is the one plain transformers gives on the raw label ids."""
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dist_kd.testing import build_tiny_bert, random_sentences

    names = ["entailment", "neutral", "contradiction"]
    model_dir = build_tiny_bert(
        tmp_path / "mnli", seed=3, num_layers=1, model_class="BertForSequenceClassification", num_labels=3,
        id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)},
    )  # fmt: skip
    premises, hypotheses = random_sentences(9, seed=4), random_sentences(9, seed=5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        encoded = tokenizer(premises, hypotheses, padding=True, truncation=True, max_length=128, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(-1).numpy()
    labels = [int(p) if i % 3 else int(p + 1) % 3 for i, p in enumerate(predicted)]  # 6 of 9 as predicted
    features = datasets.Features({
        "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32"),
    })  # fmt: skip
    rows = {"premise": premises, "hypothesis": hypotheses, "label": labels, "idx": list(range(9))}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "validation_matched"))

    spec = resolve_task_spec("mnli")
    report = evaluate_classifier(model_dir, spec, tmp_path / "validation_matched", output=tmp_path / "eval")
    assert report["metrics"]["accuracy"] == pytest.approx(float(np.mean(predicted == np.array(labels))))
    assert report["metrics"]["accuracy"] == pytest.approx(6 / 9)
    lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [line["prediction"] for line in lines] == [names[p] for p in predicted]
    assert [line["label"] for line in lines] == [names[label] for label in labels]


def test_output_directory_holding_other_files_is_refused_untouched(classifier, data, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / "config.json").write_text("{}\n")
    argv = ["--model", str(classifier), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
    assert _evaluate_main([*argv, "--label", "category", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {output} holds files other than a previous evaluation (config.json)")
    assert "or one holding only predictions.jsonl and metrics.json (replaced)" in err
    (output / "metrics.json").write_text("{}\n")  # a previous evaluation's file beside it is not named
    assert _evaluate_main([*argv, "--label", "category", "--output", str(output)]) == 2
    assert "other than a previous evaluation (config.json);" in capsys.readouterr().err
    assert err.count("\n") == 1
    assert sorted(path.name for path in output.iterdir()) == ["config.json", "metrics.json"]


def test_an_output_holding_the_data_is_refused_untouched(classifier, data, tmp_path, capsys):
    """The data named predictions.jsonl, alone in its directory, and that directory given as --output: it passed
    for a previous evaluation and the data was replaced by the predictions (exit 0)."""
    output = tmp_path / "mine"
    output.mkdir()
    moved = output / "predictions.jsonl"
    moved.write_bytes(Path(data).read_bytes())
    argv = ["--model", str(classifier), "--task", "demo", "--data", str(moved), "--text-a", "text", "--cpu"]
    assert _evaluate_main([*argv, "--label", "category", "--output", str(output)]) == 2
    assert capsys.readouterr().err == (
        f"error: --data {moved} lies inside --output {output}, which the evaluation replaces whole: give --output "
        "a directory of its own\n"
    )
    assert moved.read_bytes() == Path(data).read_bytes() and [path.name for path in output.iterdir()] == [moved.name]


def test_output_that_is_the_current_directory_is_refused(classifier, data, tmp_path, monkeypatch, capsys):
    """--output . (empty, or holding a previous evaluation) passed the check, ran the model, then crashed on
    "PosixPath('.') has an empty name"; replacing the directory whole would have moved the shell's own away."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(classifier), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
    for output in (".", str(tmp_path), ".."):
        assert _evaluate_main([*argv, "--label", "category", "--output", output]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output {output} is the current directory or holds it;"), err
        assert "(e.g. --output eval)" in err
    assert _evaluate_main([*argv, "--label", "category", "--output", "eval"]) == 0
    assert sorted(path.name for path in (tmp_path / "eval").iterdir()) == ["metrics.json", "predictions.jsonl"]


def test_evaluate_draws_no_library_bars_into_a_log_file(classifier, data, capsys):
    """transformers' "Loading weights" bar went into log files (a carriage-return line per model loaded);
    the other commands turn it off where stderr is not a terminal."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as a fresh process starts
    try:
        argv = ["--model", str(classifier), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
        assert _evaluate_main([*argv, "--label", "category"]) == 0
        assert "Loading weights" not in capsys.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_a_one_output_model_without_problem_type_is_scored_as_a_regression(tmp_path, capsys):
    """transformers trains a one-output classifier with no problem_type as a regression (MSE); evaluate read it
    as a classifier with the one label LABEL_0 and refused the float scores as unknown labels."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dist_kd.testing import build_tiny_bert, random_sentences

    model_dir = build_tiny_bert(
        tmp_path / "scorer", num_layers=1, model_class="BertForSequenceClassification", num_labels=1
    )  # fmt: skip
    assert json.loads((model_dir / "config.json").read_text()).get("problem_type") is None
    texts = random_sentences(8, seed=3)
    scores = [0.5 * i for i in range(len(texts))]
    data = tmp_path / "scores.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": s}) + "\n" for t, s in zip(texts, scores)))
    capsys.readouterr()
    argv = ["--model", str(model_dir), "--task", "score", "--data", str(data), "--text-a", "text", "--cpu"]
    assert _evaluate_main(argv) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        predicted = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0].numpy()
    assert report["metrics"]["pearson"] == pytest.approx(float(np.corrcoef(predicted, scores)[0, 1]), abs=1e-5)


def test_a_file_with_some_unlabelled_rows_is_scored_over_its_labelled_rows(classifier, tmp_path, caplog):
    """A labelled dev file with a few gaps gave metrics null and exit 0, without a word."""
    import logging

    import numpy as np

    from dist_kd.testing import random_sentences

    texts = random_sentences(8, seed=4)
    labels = [LABELS[i % 2] if i not in (2, 5) else None for i in range(len(texts))]
    path = tmp_path / "gaps.jsonl"
    path.write_text("".join(json.dumps({"id": f"g{i}", "text": t, "category": y}) + "\n"
                            for i, (t, y) in enumerate(zip(texts, labels))))  # fmt: skip
    spec = resolve_task_spec("demo", labels=LABELS, text_a="text", label="category", id_column="id")
    with caplog.at_level(logging.WARNING, logger="dist_kd.predict"):
        report = evaluate_classifier(classifier, spec, path, output=tmp_path / "out")
    assert "2 of 8 rows have no label (example ids g2, g5); the metrics are over the 6 labelled rows" in caplog.text
    assert report["num_rows"] == 8 and report["num_labelled"] == 6
    predictions = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8  # every row is predicted
    kept = [p for p in predictions if p["label"] is not None]
    accuracy = np.mean([p["prediction"] == p["label"] for p in kept])
    assert [p["example_id"] for p in kept] == ["g0", "g1", "g3", "g4", "g6", "g7"]
    assert report["metrics"]["accuracy"] == pytest.approx(accuracy)
    unlabelled = tmp_path / "test.jsonl"  # a test set: no metrics, no warning
    unlabelled.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dist_kd.predict"):
        report = evaluate_classifier(classifier, resolve_task_spec("demo", labels=LABELS, text_a="text"), unlabelled)
    assert report["metrics"] is None and report["num_labelled"] == 0 and "no label" not in caplog.text


def test_evaluate_reads_a_task_runs_columns_and_length_from_its_task_record(tmp_path, capsys, caplog):
    """A pair classifier scored without --text-b read the first texts alone (the default text_b column is
    optional), and at --max-length 128 whatever the run trained at: a lower score, exit 0, not a word."""
    import logging

    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dist_kd.io import write_json_atomic
    from dist_kd.predict import TASK_RECORD, task_record
    from dist_kd.testing import build_tiny_bert, random_sentences

    model_dir = build_tiny_bert(
        tmp_path / "pair", num_layers=1, model_class="BertForSequenceClassification", num_labels=2,
        id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)},
    )  # fmt: skip
    spec = resolve_task_spec("para", labels=LABELS, text_a="s1", text_b="s2", label="same")
    write_json_atomic(model_dir / TASK_RECORD, task_record(spec, pairs=True, max_length=12))
    firsts, seconds = random_sentences(6, seed=1, min_words=8), random_sentences(6, seed=2, min_words=8)
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps({"s1": a, "s2": b, "same": LABELS[i % 2]}) + "\n"
                            for i, (a, b) in enumerate(zip(firsts, seconds))))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = np.stack([
            model(**tokenizer(a, b, truncation=True, max_length=12, return_tensors="pt")).logits[0].numpy()
            for a, b in zip(firsts, seconds)
        ])  # fmt: skip
    capsys.readouterr()
    for extra in ([], ["--text-a", "s1"]):  # nothing given, or only the first column: the record's pair
        out = tmp_path / f"out{len(extra)}"
        argv = ["--model", str(model_dir), "--task", "para", "--data", str(data), "--cpu", "--output", str(out)]
        assert _evaluate_main(argv + extra) == 0, capsys.readouterr().err
        predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        np.testing.assert_allclose([p["logits"] for p in predictions], expected, atol=1e-5)
    report = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert report["metrics"]["accuracy"] == pytest.approx(np.mean(expected.argmax(1) == np.arange(6) % 2))
    # The API without max_length scores at the trained length too (it took 128: other figures than eval.json's)
    from dist_kd.predict import evaluate_classifier

    evaluate_classifier(model_dir, spec, data, output=tmp_path / "api")
    predictions = [json.loads(line) for line in (tmp_path / "api" / "predictions.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([p["logits"] for p in predictions], expected, atol=1e-5)
    argv = ["--model", str(model_dir), "--task", "para", "--data", str(data), "--cpu"]
    assert _evaluate_main([*argv, "--text-b", "none"]) == 2
    assert (
        f"was trained on sentence pairs (its task.json: text_b 's2') but the data {data} has no second text "
        "(--text-b none): name" in capsys.readouterr().err
    )  # it said "(column None)"
    assert _evaluate_main([*argv, "--text-b", "missing"]) == 2  # a named column the data lacks
    assert "missing" in capsys.readouterr().err
    test = tmp_path / "test.jsonl"  # the record's label column missing: a test set, as without `label`
    test.write_text("".join(json.dumps({"s1": a, "s2": b}) + "\n" for a, b in zip(firsts, seconds)))
    assert _evaluate_main(["--model", str(model_dir), "--task", "para", "--data", str(test), "--cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] is None
    assert _evaluate_main([*argv, "--label", "absent"]) == 2  # but one the user names must be there
    assert "has no label column 'absent' (--label)" in capsys.readouterr().err
    # The record's column missing but the default `label` there: scored on it, with a warning (it was null).
    relabelled = tmp_path / "relabelled.jsonl"
    relabelled.write_text("".join(json.dumps({"s1": a, "s2": b, "label": LABELS[i % 2]}) + "\n"
                                  for i, (a, b) in enumerate(zip(firsts, seconds))))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dist_kd.predict"):
        assert _evaluate_main(["--model", str(model_dir), "--task", "para", "--data", str(relabelled), "--cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["accuracy"] == pytest.approx(report["metrics"]["accuracy"])
    assert "has no column 'same', the task's label column (the model's task.json" in caplog.text
    # Some rows without a second text: scored on their first alone, as before, but said (not a word before)
    partial = tmp_path / "partial.jsonl"
    rows = [{"s1": a, "s2": b, "same": LABELS[i % 2]} for i, (a, b) in enumerate(zip(firsts, seconds))]
    rows[2]["s2"] = None
    del rows[4]["s2"]
    partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.tasks"):
        assert _evaluate_main(["--model", str(model_dir), "--task", "para", "--data", str(partial), "--cpu"]) == 0
    assert f"{partial}: lines [3, 5] have no second text in column 's2' (text_b) where the other" in caplog.text


def test_evaluate_takes_the_id_column_of_the_model_s_task_record(classifier, tmp_path, capsys, caplog):
    """A task trained with id_column 'guid' was evaluated with ids demo-0, demo-1, ... (the run's own dev
    predictions said g7, g9, ...), and a repeated guid passed unseen."""
    import logging
    import shutil

    from dist_kd.io import write_json_atomic
    from dist_kd.predict import TASK_RECORD, task_record
    from dist_kd.testing import random_sentences

    model_dir = tmp_path / "copy"  # the module's classifier, with a task record beside it
    shutil.copytree(classifier, model_dir)
    spec = resolve_task_spec("demo", labels=LABELS, text_a="text", label="category", id_column="guid")
    write_json_atomic(model_dir / TASK_RECORD, task_record(spec, pairs=False, max_length=16))
    texts = random_sentences(4, seed=3)
    rows = [{"guid": f"g{7 + 2 * i}", "text": t, "category": LABELS[i % 2]} for i, t in enumerate(texts)]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--model", str(model_dir), "--task", "demo", "--data", str(data), "--cpu"]
    out = tmp_path / "out"
    assert _evaluate_main([*argv, "--output", str(out)]) == 0, capsys.readouterr().err
    ids = [json.loads(line)["example_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["g7", "g9", "g11", "g13"]
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps({**row, "guid": "g7"}) + "\n" for row in rows))
    assert _evaluate_main([*argv[:-2], str(repeated), "--cpu"]) == 2
    assert "column 'guid' repeats the id 'g7'" in capsys.readouterr().err
    # --id-column names another; a test file without the record's column has its rows numbered, with a warning
    assert _evaluate_main([*argv, "--id-column", "text", "--output", str(out)]) == 0
    ids = [json.loads(line)["example_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == texts
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": row["text"]}) + "\n" for row in rows))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING, logger="dist_kd.predict"):
        assert _evaluate_main([*argv[:-2], str(plain), "--cpu", "--output", str(out)]) == 0
    assert "has no column 'guid', the id column of the model's task.json" in caplog.text
    ids = [json.loads(line)["example_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["demo-0", "demo-1", "demo-2", "demo-3"]
    assert _evaluate_main([*argv[:-2], str(plain), "--cpu", "--id-column", "guid"]) == 2  # one the user names
    assert "has no column 'guid' (id_column" in capsys.readouterr().err


def test_a_classifier_stored_in_half_precision_is_scored_in_fp32(classifier, data, tmp_path):
    """transformers 5 loads weights in the dtype they were saved in: a bf16 checkpoint was scored in bf16."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier, dtype=torch.float32)
    half = tmp_path / "half"
    model.to(torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(classifier).save_pretrained(half)
    reference = AutoModelForSequenceClassification.from_pretrained(half, dtype=torch.float32).eval()
    assert AutoModelForSequenceClassification.from_pretrained(half).dtype == torch.bfloat16  # what it did
    out = tmp_path / "out"
    evaluate_classifier(half, _spec("category"), data, output=out, max_length=32)
    tokenizer = AutoTokenizer.from_pretrained(half)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    with torch.no_grad():
        expected = np.stack([
            reference(**tokenizer(text, truncation=True, max_length=32, return_tensors="pt")).logits[0].numpy()
            for text in texts
        ])  # fmt: skip
    found = [json.loads(line)["logits"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(found, expected, atol=1e-5)


def test_outputs_that_are_not_finite_are_an_error_naming_the_rows(classifier, data, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(classifier)
    with torch.no_grad():
        model.classifier.bias[0] = float("nan")
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(classifier).save_pretrained(broken)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"not finite \(nan or inf\) on 6 of 6 rows of .*example ids demo-0, "):
        evaluate_classifier(broken, _spec("category"), data, output=out)
    assert not out.exists()


def test_an_id2label_with_a_gap_in_its_ids_is_named():
    from types import SimpleNamespace

    from dist_kd.predict import teacher_label_names

    assert teacher_label_names(SimpleNamespace(id2label={"1": "pos", "0": "neg"}), "t") == ["neg", "pos"]
    with pytest.raises(ValueError, match=r"teacher t: config.json id2label has ids \[0, 2\], expected 0..C-1"):
        teacher_label_names(SimpleNamespace(id2label={0: "neg", 2: "pos"}), "t")


def test_an_output_directory_that_cannot_be_written_is_refused_before_inference(
    classifier, data, tmp_path, refuse_mkdir_in, capsys
):
    """A read-only or foreign --output's parent was found after the model had run over all the data."""
    (tmp_path / "shared").mkdir()
    refuse_mkdir_in(tmp_path / "shared")
    output = tmp_path / "shared" / "eval"
    argv = ["--model", str(classifier), "--task", "demo", "--data", str(data), "--text-a", "text", "--cpu"]
    assert _evaluate_main([*argv, "--label", "category", "--output", str(output)]) == 2
    assert capsys.readouterr().err == (
        f"error: --output {output}: cannot write in {tmp_path / 'shared'} (Permission denied); give a directory you "
        "can write to\n"
    )
    assert not output.exists() and list((tmp_path / "shared").iterdir()) == []
