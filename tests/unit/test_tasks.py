"""Task data loading: formats, column mapping, label resolution, GLUE registry, and the errors users see."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_kd.data.tasks import (
    GLUE_TASKS,
    TaskSpec,
    head_label_order,
    label_order_check,
    load_task_examples,
    resolve_task_spec,
    task_schema,
)

ROWS = [
    {"text": "the team won", "other": "a goal", "category": "sport"},
    {"text": "markets fell", "other": "oil price", "category": "business"},
    {"text": "new phone", "other": "software", "category": "tech"},
]
TOPIC = TaskSpec(name="topic", labels=["business", "sport", "tech"], text_a="text", text_b="other", label="category")


def _write(path, rows, fmt):
    if fmt in ("tsv", "csv"):
        sep = "\t" if fmt == "tsv" else ","
        lines = [sep.join(rows[0])] + [sep.join(str(v) for v in row.values()) for row in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "datasets":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet", "datasets"])
def test_every_format_loads_to_the_same_table(tmp_path, fmt):
    path = _write(tmp_path / (f"data.{fmt}" if fmt != "datasets" else "ds"), ROWS, fmt)
    table = load_task_examples(path, TOPIC)
    assert table.schema == task_schema(TOPIC)
    assert table.to_pydict() == {
        "example_id": ["topic-0", "topic-1", "topic-2"],
        "text_a": ["the team won", "markets fell", "new phone"],
        "text_b": ["a goal", "oil price", "software"],
        "label": [1, 0, 2],
    }


def test_label_ids_accepted_when_names_are_not_integers(tmp_path):
    rows = [{"text": "a", "category": 2}, {"text": "b", "category": "sport"}, {"text": "c", "category": 0}]
    path = _write(tmp_path / "d.jsonl", rows, "jsonl")
    spec = dataclasses.replace(TOPIC, text_b=None)
    assert load_task_examples(path, spec).column("label").to_pylist() == [2, 1, 0]


def test_a_class_id_written_as_a_float_is_the_id_in_every_format(tmp_path):
    """pandas writes an int label column holding a missing value as 1.0, 0.0 to CSV: read from JSONL and
    Parquet as ids 1, 0, the same cells in a CSV were refused ("unknown label '1.0'; ... or their ids 0..1")."""
    spec = TaskSpec(name="bin", labels=["neg", "pos"], text_a="text")
    rows = [{"text": "x", "label": "1.0"}, {"text": "y", "label": "0.0"}, {"text": "z", "label": " 1 "}]
    assert load_task_examples(_write(tmp_path / "d.csv", rows, "csv"), spec).column("label").to_pylist() == [1, 0, 1]
    floats = [{"text": "x", "label": 1.0}, {"text": "y", "label": 0.0}]
    assert load_task_examples(_write(tmp_path / "d.jsonl", floats, "jsonl"), spec).column("label").to_pylist() == [1, 0]
    _write(tmp_path / "d.csv", [{"text": "x", "label": "1.5"}], "csv")
    with pytest.raises(ValueError, match=r"unknown label '1.5'"):
        load_task_examples(tmp_path / "d.csv", spec)


def test_integer_label_names_are_names_never_ids(tmp_path):
    # Labels named "1", "2": the cell "1" is the label named "1" (index 0), and "0" is unknown, not index 0.
    spec = TaskSpec(name="stars", labels=["1", "2"], text_a="text", label="stars")
    path = _write(tmp_path / "d.csv", [{"text": "x", "stars": "2"}, {"text": "y", "stars": "1"}], "csv")
    assert load_task_examples(path, spec).column("label").to_pylist() == [1, 0]
    _write(path, [{"text": "x", "stars": "0"}], "csv")
    with pytest.raises(ValueError, match=r"unknown label '0'"):
        load_task_examples(path, spec)


def test_datasets_class_labels_map_by_name_not_by_index(tmp_path):
    import datasets

    # The dataset's own order is [tech, sport, business]; index 0 there is "tech" = index 2 for the task.
    features = datasets.Features(
        {"text": datasets.Value("string"), "category": datasets.ClassLabel(names=["tech", "sport", "business"])}
    )
    data = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "category": [0, 1, 2]}, features=features)
    datasets.DatasetDict({"train": data}).save_to_disk(str(tmp_path / "ds"))
    spec = TaskSpec(name="topic", labels=["business", "sport", "tech"], text_a="text", label="category")
    assert load_task_examples(tmp_path / "ds", spec, split="train").column("label").to_pylist() == [2, 1, 0]
    # Two splits, and a command without --split (finetune, precompute, evaluate): the message names the split
    # directories, which load (it said "choose one with split=", a flag those commands lack).
    datasets.DatasetDict({"train": data, "validation": data}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"give the split's own directory \(.*two/train, .*two/validation;"):
        load_task_examples(tmp_path / "two", spec)
    assert load_task_examples(tmp_path / "two" / "validation", spec).column("label").to_pylist() == [2, 1, 0]


def test_parquet_from_datasets_maps_class_ids_by_the_names_it_carries(tmp_path):
    import datasets

    # Dataset.to_parquet keeps the ClassLabel names in the file's 'huggingface' metadata; MNLI's own order
    # (entailment, neutral, contradiction) is not GLUE's (contradiction, entailment, neutral).
    features = datasets.Features(
        {
            "premise": datasets.Value("string"),
            "hypothesis": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    data = datasets.Dataset.from_dict(
        {"premise": ["p0", "p1", "p2"], "hypothesis": ["h0", "h1", "h2"], "label": [0, 1, 2]}, features=features
    )
    data.to_parquet(str(tmp_path / "mnli.parquet"))
    data.save_to_disk(str(tmp_path / "ds"))
    spec = resolve_task_spec("mnli", text_a="premise", text_b="hypothesis", label="label")
    expected = [spec.labels.index(name) for name in ("entailment", "neutral", "contradiction")]
    assert expected == [1, 2, 0]
    for path in (tmp_path / "mnli.parquet", tmp_path / "ds"):
        assert load_task_examples(path, spec).column("label").to_pylist() == expected, path.name
    # names the task does not have are refused, not read as ids
    other = resolve_task_spec("nli", labels=["yes", "no", "maybe"], text_a="premise", text_b="hypothesis")
    with pytest.raises(ValueError, match="unknown label 'entailment'"):
        load_task_examples(tmp_path / "mnli.parquet", other)
    # damaged metadata is named, not ignored (ignoring it would read the ids in the task's order)
    table = pq.read_table(tmp_path / "mnli.parquet")
    pq.write_table(table.replace_schema_metadata({b"huggingface": b"{not json"}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: the 'huggingface' metadata .* cannot be read"):
        load_task_examples(tmp_path / "bad.parquet", spec)


def test_a_text_b_column_empty_in_every_row_is_single_text_as_null_in_jsonl(tmp_path):
    # pandas writes single-text data with an empty text_b column; read as pairs "[CLS] a [SEP] [SEP]" before
    spec = TaskSpec(name="t", labels=["neg", "pos"])
    rows = [{"text_a": "good film", "text_b": None, "label": "pos"}, {"text_a": "bad", "text_b": None, "label": "neg"}]
    jsonl = load_task_examples(_write(tmp_path / "d.jsonl", rows, "jsonl"), spec)
    assert jsonl.column("text_b").to_pylist() == [None, None]
    (tmp_path / "d.csv").write_text("text_a,text_b,label\ngood film,,pos\nbad,,neg\n")
    (tmp_path / "d.tsv").write_text("text_a\ttext_b\tlabel\ngood film\t\tpos\nbad\t\tneg\n")
    for name in ("d.csv", "d.tsv"):
        assert load_task_examples(tmp_path / name, spec).to_pylist() == jsonl.to_pylist(), name
    # pairs, one of whose second texts is empty: still a pair, as a tokenizer given (a, "") and JSONL's ""
    (tmp_path / "p.csv").write_text("text_a,text_b,label\ngood film,,pos\nbad,plot,neg\n")
    rows[0]["text_b"], rows[1]["text_b"] = "", "plot"
    pairs = load_task_examples(_write(tmp_path / "p.jsonl", rows, "jsonl"), spec)
    assert load_task_examples(tmp_path / "p.csv", spec).to_pylist() == pairs.to_pylist()
    assert pairs.column("text_b").to_pylist() == ["", "plot"]


def test_regression_and_id_column(tmp_path):
    spec = TaskSpec(name="sim", type="regression", text_a="s1", text_b="s2", label="score", id_column="pair")
    rows = [{"pair": "p7", "s1": "a", "s2": "b", "score": "4.5"}, {"pair": "p9", "s1": "c", "s2": "d", "score": "0"}]
    table = load_task_examples(_write(tmp_path / "d.tsv", rows, "tsv"), spec)
    assert table.column("example_id").to_pylist() == ["p7", "p9"]
    assert table.column("label").to_pylist() == [4.5, 0.0]
    assert table.schema.field("label").type == pa.float64()
    _write(tmp_path / "d.tsv", [{"pair": "p1", "s1": "a", "s2": "b", "score": "high"}], "tsv")
    with pytest.raises(ValueError, match=r"line 2, column 'score' holds 'high', expected a number"):
        load_task_examples(tmp_path / "d.tsv", spec)


def test_csv_quoted_fields_span_lines_and_encoding(tmp_path):
    path = tmp_path / "tweets.csv"
    path.write_bytes('sentiment,text\r\nneg,"two\r\nlines, one tweet"\r\npos,caf\xe9\r\n'.encode("latin-1"))
    spec = TaskSpec(name="tweets", labels=["neg", "pos"], text_a="text", label="sentiment")
    with pytest.raises(ValueError, match="not valid utf-8 text.*convert it to UTF-8 .*with dist-kd augment pass its"):
        load_task_examples(path, spec)
    table = load_task_examples(path, spec, encoding="latin-1")
    assert table.column("text_a").to_pylist() == ["two\r\nlines, one tweet", "caf\xe9"]


def test_jsonl_that_is_not_utf8_is_named_as_a_csv_is(tmp_path):
    # pyarrow.json takes the bytes into its strings without a word; the error came later, naming no file
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text_a": "caf\xe9", "label": "a"}\n{"text_a": "ok", "label": "b"}\n'.encode("latin-1"))
    spec = TaskSpec(name="t", labels=["a", "b"])
    with pytest.raises(ValueError, match=r"latin\.jsonl is not valid utf-8 text.*convert it to UTF-8"):
        load_task_examples(path, spec)
    assert load_task_examples(path, spec, encoding="latin-1").column("text_a").to_pylist() == ["caf\xe9", "ok"]


def test_default_columns_and_optional_text_b(tmp_path):
    spec = TaskSpec(name="t", labels=["neg", "pos"])  # text_a / text_b / label by default; text_b optional
    path = _write(tmp_path / "d.jsonl", [{"text_a": "good", "label": "pos"}], "jsonl")
    assert load_task_examples(path, spec).to_pylist() == [
        {"example_id": "t-0", "text_a": "good", "text_b": None, "label": 1}
    ]


def test_unlabeled_data_when_labels_not_required(tmp_path):
    path = _write(tmp_path / "test.tsv", [{"text": "a", "other": "b"}], "tsv")
    assert load_task_examples(path, TOPIC, require_labels=False).column("label").to_pylist() == [None]
    with pytest.raises(ValueError, match="no column 'category'"):
        load_task_examples(path, TOPIC)


def test_glue_tsv_quotes_and_headerless_cola(tmp_path):
    mrpc = tmp_path / "mrpc.tsv"
    mrpc.write_text(
        'Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tHe said "yes.\tShe said "no".\n0\t3\t4\tA b\tC d\n'
    )
    table = load_task_examples(mrpc, resolve_task_spec("MRPC"))
    assert table.column("text_a").to_pylist() == ['He said "yes.', "A b"]
    assert table.column("label").to_pylist() == [1, 0]
    cola = tmp_path / "cola.tsv"
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more we eat.\n")
    table = load_task_examples(cola, resolve_task_spec("cola"))
    assert table.column("text_a").to_pylist() == ["The sailors rode the breeze.", "The more we eat."]
    assert table.column("label").to_pylist() == [1, 0]


def test_glue_registry():
    assert set(GLUE_TASKS) == {"sst2", "cola", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["mnli"].labels == ["contradiction", "entailment", "neutral"]
    assert GLUE_TASKS["stsb"].type == "regression" and GLUE_TASKS["stsb"].num_labels == 1
    assert resolve_task_spec("sts-b").name == "stsb"
    assert resolve_task_spec("sst2", text_a="review").text_a == "review"
    with pytest.raises(ValueError, match=r"has labels \['neutral', 'entailment', 'contradiction'\]"):
        resolve_task_spec("mnli", labels=["neutral", "entailment", "contradiction"])


@pytest.mark.parametrize(
    "task, names, order",
    [
        ("topic", ["business", "sport", "tech"], [0, 1, 2]),
        ("topic", ["tech", "business", "sport"], [1, 2, 0]),
        ("topic", ["SPORT", "Business", "tech"], [1, 0, 2]),  # case ignored: no two labels differ only in it
        ("mnli", ["entailment", "neutral", "contradiction"], [2, 0, 1]),  # Hugging Face's MNLI models
        ("sst2", ["negative", "positive"], [0, 1]),  # datasets' class names for the GLUE files' ids 0, 1
        ("SST-2", ["POSITIVE", "NEGATIVE"], [1, 0]),
        ("cola", ["unacceptable", "acceptable"], [0, 1]),
        ("qnli", ["not_entailment", "entailment"], [1, 0]),
    ],
)
def test_a_head_naming_the_task_classes_in_any_order_is_read_by_name(task, names, order):
    spec = TOPIC if task == "topic" else resolve_task_spec(task)
    assert head_label_order(spec, names, "model m") == order
    logits = [[10 * column + row for column in range(len(names))] for row in range(2)]  # a head's outputs
    reordered = [[line[column] for column in order] for line in logits]
    # Column c of the reordered outputs is the head's output named like the task's class c.
    spellings = {"negative": "0", "positive": "1", "unacceptable": "0", "acceptable": "1"}
    for c, label in enumerate(spec.labels):
        head_column = [spellings.get(n.lower(), n.lower()) for n in names].index(label.lower())
        assert [line[c] for line in reordered] == [line[head_column] for line in logits]


def test_a_head_is_refused_when_its_names_do_not_say_the_task_classes():
    with pytest.raises(ValueError, match=r"default label names \['LABEL_0', 'LABEL_1'\].*config.json"):
        head_label_order(resolve_task_spec("sst2"), ["LABEL_0", "LABEL_1"], "model m (id2label)")
    with pytest.raises(ValueError, match=r"model m has labels .*a different label set"):
        head_label_order(TOPIC, ["business", "sport", "politics"], "model m")
    with pytest.raises(ValueError, match="a different label set"):  # datasets' names are GLUE's, not any task's
        head_label_order(TaskSpec(name="polarity", labels=["0", "1"]), ["negative", "positive"], "model m")
    cased = TaskSpec(name="cased", labels=["a", "A"])  # names differing only in case match exactly or not at all
    assert head_label_order(cased, ["A", "a"], "model m") == [1, 0]
    with pytest.raises(ValueError, match="a different label set"):
        head_label_order(cased, ["a", "b"], "model m")


def test_glue_data_saved_by_datasets_reads_its_label_and_text_b_columns(tmp_path):
    """HF's glue/mrpc has sentence1, sentence2, label; the GLUE TSV #1 String, #2 String, Quality. Columns left
    at their defaults mean the registry's, so `--label label` cannot name HF's: a file without the registry's
    column but with `label` / `text_b` reads those."""
    rows = [{"sentence1": "a b", "text_b": "c", "label": 1}, {"sentence1": "d", "text_b": "e f", "label": 0}]
    path = _write(tmp_path / "mrpc.jsonl", rows, "jsonl")
    for spec in (
        resolve_task_spec("mrpc", text_a="sentence1"),
        resolve_task_spec("MRPC", text_a="sentence1", label="label"),
    ):
        assert spec.label == "Quality"  # a config.yaml of an earlier run says label: label, and means this
        table = load_task_examples(path, spec)
        assert table.column("label").to_pylist() == [1, 0] and table.column("text_b").to_pylist() == ["c", "e f"]
    # the registry's column, where the file has it, is read, even beside one named label
    (tmp_path / "both.tsv").write_text("Quality\t#1 String\t#2 String\tlabel\n1\ta\tb\t0\n")
    assert load_task_examples(tmp_path / "both.tsv", resolve_task_spec("mrpc")).column("label").to_pylist() == [1]
    # a column the user named (not the registry's) is never swapped for another
    with pytest.raises(ValueError, match="no column 'gold'"):
        load_task_examples(path, resolve_task_spec("mrpc", text_a="sentence1", label="gold"))
    # a file with neither: the error names the registry's column
    (tmp_path / "none.jsonl").write_text(json.dumps({"sentence1": "a", "text_b": "b", "y": 1}) + "\n")
    with pytest.raises(ValueError, match="no column 'Quality'"):
        load_task_examples(tmp_path / "none.jsonl", resolve_task_spec("mrpc", text_a="sentence1"))


def _hf_glue(path, columns, names, rows):
    """A split as ``datasets``' GLUE builder saves it: its text columns, ``label`` a ClassLabel, ``idx``."""
    import datasets

    features = {column: datasets.Value("string") for column in columns}
    features |= {"label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")}
    data = {column: [row[i] for row in rows] for i, column in enumerate(columns)}
    data |= {"label": [row[-1] for row in rows], "idx": list(range(len(rows)))}
    dataset = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    dataset.save_to_disk(str(path))
    dataset.to_parquet(str(path) + ".parquet")
    return [path, path.with_name(path.name + ".parquet")]


def test_glue_splits_saved_by_datasets_read_with_the_registry_spec(tmp_path):
    """load_dataset("glue", t)[split] saved as it is: SST-2's class names negative/positive are the TSV's ids 0/1
    (they were refused as unknown labels), MRPC's and MNLI's text columns are datasets' own."""
    sst2 = _hf_glue(tmp_path / "sst2", ["sentence"], ["negative", "positive"], [("bad", 0), ("good", 1), ("ok", 1)])
    mrpc_rows = [("a", "b", 1), ("c", "d", 0)]
    mrpc = _hf_glue(tmp_path / "mrpc", ["sentence1", "sentence2"], ["not_equivalent", "equivalent"], mrpc_rows)
    mnli_rows = [("p0", "h0", 0), ("p1", "h1", 1), ("p2", "h2", 2)]
    mnli = _hf_glue(tmp_path / "mnli", ["premise", "hypothesis"], ["entailment", "neutral", "contradiction"], mnli_rows)
    for path in sst2:
        table = load_task_examples(path, resolve_task_spec("sst2"))
        assert table.column("label").to_pylist() == [0, 1, 1] and table.column("text_a").to_pylist()[0] == "bad"
    for path in mrpc:
        table = load_task_examples(path, resolve_task_spec("mrpc"))
        assert table.column("label").to_pylist() == [1, 0]
        assert table.column("text_a").to_pylist() == ["a", "c"] and table.column("text_b").to_pylist() == ["b", "d"]
    qqp_rows = [("q1", "q2", 1), ("q3", "q4", 0)]
    for path in _hf_glue(tmp_path / "qqp", ["question1", "question2"], ["not_duplicate", "duplicate"], qqp_rows):
        table = load_task_examples(path, resolve_task_spec("qqp"))  # its ids are idx, not the TSV's id
        assert table.column("label").to_pylist() == [1, 0] and table.column("example_id").to_pylist() == ["0", "1"]
    labels = GLUE_TASKS["mnli"].labels
    for path in mnli:
        table = load_task_examples(path, resolve_task_spec("mnli"))
        expected = [labels.index(name) for name in ("entailment", "neutral", "contradiction")]
        assert table.column("label").to_pylist() == expected and table.column("text_b").to_pylist()[2] == "h2"
    # GLUE's unlabelled test split (-1) reads as unlabelled
    test = _hf_glue(tmp_path / "test", ["sentence"], ["negative", "positive"], [("x", -1)])[0]
    assert load_task_examples(test, resolve_task_spec("sst2"), require_labels=False).column("label").to_pylist() == [
        None
    ]
    # names are ids only for the GLUE task whose builder uses them, in its order: other names, another task,
    # or a custom task with labels 0,1 are still mapped by name, so refused
    swapped = _hf_glue(tmp_path / "swapped", ["sentence"], ["positive", "negative"], [("good", 0)])[0]
    with pytest.raises(ValueError, match="unknown label 'positive'"):
        load_task_examples(swapped, resolve_task_spec("sst2"))
    with pytest.raises(ValueError, match="unknown label 'negative'"):
        load_task_examples(sst2[0], resolve_task_spec("cola", text_a="sentence"))
    with pytest.raises(ValueError, match="unknown label 'negative'"):
        load_task_examples(sst2[0], resolve_task_spec("sentiment", labels=["0", "1"], text_a="sentence"))
    # a custom task named by the dataset's names reads them as before
    custom = resolve_task_spec("sentiment", labels=["negative", "positive"], text_a="sentence")
    assert load_task_examples(sst2[0], custom).column("label").to_pylist() == [0, 1, 1]
    # a text column the user named is kept, and a missing one is named
    with pytest.raises(ValueError, match="no column 'question'"):
        load_task_examples(mrpc[0], resolve_task_spec("mrpc", text_a="question"))


def test_label_order_check_message():
    label_order_check(["a", "b"], ["a", "b"], "teacher t1")
    with pytest.raises(ValueError) as info:
        label_order_check(["a", "b", "c"], ["b", "a", "c"], "teacher runs/t1", task="topic")
    message = str(info.value)
    assert "teacher runs/t1 has labels ['b', 'a', 'c'], task 'topic' expects ['a', 'b', 'c']" in message
    assert "different order" in message
    with pytest.raises(ValueError, match="different label set"):
        label_order_check(["a", "b"], ["a", "c"], "soft-target store")


def test_spec_validation():
    with pytest.raises(ValueError, match="explicit list of at least 2 labels"):
        TaskSpec(name="t")
    with pytest.raises(ValueError, match="type must be one of"):
        TaskSpec(name="t", type="ranking", labels=["a", "b"])
    with pytest.raises(ValueError, match="repeat"):
        TaskSpec(name="t", labels=["a", "a"])
    with pytest.raises(ValueError, match="metric 'mcc' does not apply to a regression task"):
        TaskSpec(name="t", type="regression", metric="mcc")
    # Without a metric, each type gets its own default.
    assert TaskSpec(name="t", type="regression").metric == "pearson"
    assert TaskSpec(name="t", labels=["a", "b"]).metric == "accuracy"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv does not exist"):
        load_task_examples(tmp_path / "nope.tsv", TOPIC)


def test_missing_column_names_file_column_and_columns_found(tmp_path):
    path = _write(tmp_path / "d.csv", [{"txt": "a", "other": "b", "category": "tech"}], "csv")
    with pytest.raises(ValueError) as info:
        load_task_examples(path, TOPIC)
    message = str(info.value)
    assert str(path) in message and "no column 'text'" in message and "['txt', 'other', 'category']" in message


def test_unknown_label_names_file_row_label_and_allowed(tmp_path):
    rows = [dict(ROWS[0]), {"text": "x", "other": "y", "category": "politics"}]
    path = _write(tmp_path / "d.tsv", rows, "tsv")
    with pytest.raises(ValueError) as info:
        load_task_examples(path, TOPIC)
    message = str(info.value)
    assert str(path) in message and "line 3, column 'category'" in message and "'politics'" in message
    assert "['business', 'sport', 'tech']" in message


@pytest.mark.parametrize("content", ["", "text\tother\tcategory\n"])
def test_empty_input(tmp_path, content):
    path = tmp_path / "d.tsv"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty|no examples"):
        load_task_examples(path, TOPIC)


def test_empty_jsonl_and_parquet(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        load_task_examples(tmp_path / "d.jsonl", TOPIC)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="no examples"):
        load_task_examples(tmp_path / "d.parquet", TOPIC)


def test_ragged_rows_and_unknown_suffix(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tother\tcategory\na\tb\n")
    with pytest.raises(ValueError, match="line 2 has 2 fields, the header has 3"):
        load_task_examples(path, TOPIC)
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_task_examples(tmp_path / "d.xlsx", TOPIC)


def test_pyarrow_readers_give_the_tables_of_the_line_by_line_readers(tmp_path):
    """The fast paths (pyarrow.csv, pyarrow.json) against the csv/json modules on awkward but valid files; a file
    pyarrow refuses comes back from the line-by-line reader, with its coercions."""
    import csv as csv_module
    import json as json_module
    from functools import partial

    from dist_kd.data import tasks

    spec = resolve_task_spec("t", labels=["a", "b"], text_a="text")
    texts = ["plain", "with, comma", 'with "quotes"', "line\nbreak", "", "007", "  spaced  ", "naïve café", "1e5"]
    with open(tmp_path / "x.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv_module.writer(handle)
        writer.writerow(["text", "label", "extra"])
        for i, text in enumerate(texts):
            writer.writerow([text, "ab"[i % 2], str(i)])
            if i == 3:
                handle.write("\n")  # an empty line, skipped by both
    (tmp_path / "x.tsv").write_text(
        "text\tlabel\n" + "".join(f'{t.replace(chr(10), " ")}"\t{"ab"[i % 2]}\n' for i, t in enumerate(texts))
    )
    rows = [{"text": t, "label": "ab"[i % 2], "score": i * 0.5, "n": i} for i, t in enumerate(texts)]
    (tmp_path / "x.jsonl").write_text("".join(json_module.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    for name, fast, slow in (
        ("x.csv", partial(tasks._read_delimited, fmt="csv"), partial(tasks._read_delimited_python, fmt="csv")),
        ("x.tsv", partial(tasks._read_delimited, fmt="tsv"), partial(tasks._read_delimited_python, fmt="tsv")),
        ("x.jsonl", tasks._read_jsonl, tasks._read_jsonl_python),
    ):
        extra = {"spec": spec} if name != "x.jsonl" else {}
        fast, slow = partial(fast, encoding="utf-8", **extra), partial(slow, encoding="utf-8", **extra)
        got, expected = fast(tmp_path / name), slow(tmp_path / name)
        assert got.to_pylist() == expected.to_pylist(), name
    assert tasks._read_delimited(tmp_path / "x.csv", "csv", spec, "utf-8").column("text").to_pylist() == texts
    # labels "a" and 1 in one field: pyarrow refuses the type change; the line reader makes strings of them
    (tmp_path / "mixed.jsonl").write_text('{"text": "x", "label": "a"}\n\n{"text": "y", "label": 1}\n')
    assert tasks._read_jsonl(tmp_path / "mixed.jsonl", "utf-8").column("label").to_pylist() == ["a", "1"]


def test_jsonl_iso_date_strings_load_as_written_through_both_readers(tmp_path):
    """pyarrow.json infers timestamps from ISO-date strings; ids and texts must come back exactly as written,
    the same from the fast reader as from the line-by-line one (forced here by a field that mixes types)."""
    from dist_kd.data import tasks

    spec = TaskSpec(name="d", labels=["a", "b"], text_a="text", text_b="other")
    rows = [
        {"other": "x", "example_id": "2019-01-01", "label": "a", "text": "2019-01-01"},
        {"other": "y", "example_id": "2019-01-02T10:00:00Z", "label": "b", "text": "2019-01-02 10:00"},
    ]
    expected = {
        "example_id": ["2019-01-01", "2019-01-02T10:00:00Z"],
        "text_a": ["2019-01-01", "2019-01-02 10:00"],
        "text_b": ["x", "y"],
        "label": [0, 1],
    }
    fast = _write(tmp_path / "fast.jsonl", rows, "jsonl")
    slow = _write(tmp_path / "slow.jsonl", [dict(rows[0], n=1), dict(rows[1], n="two")], "jsonl")
    assert tasks._read_jsonl(fast, "utf-8").column_names == ["other", "example_id", "label", "text"]
    assert load_task_examples(fast, spec).to_pydict() == expected
    assert load_task_examples(slow, spec).to_pydict() == expected


def test_jsonl_integer_ids_beyond_int64_load_as_written(tmp_path):
    """pyarrow.json reads an integer beyond int64 as the nearest double: three neighbouring 64-bit hash ids
    became one ('1.8446744073709552e+19'), refused as a repeated id. Both readers give them as written, and
    the ids within int64 stay as pyarrow read them (exact beyond 2**53)."""
    spec = TaskSpec(name="h", labels=["a", "b"], text_a="text", id_column="id")
    big = [2**64 - 1, 2**64 - 2, -(2**63) - 1]
    rows = [{"id": value, "text": f"t{index}", "label": "a"} for index, value in enumerate(big)]
    fast = _write(tmp_path / "fast.jsonl", rows, "jsonl")
    slow = _write(tmp_path / "slow.jsonl", [dict(row, n=1 if index else "one") for index, row in enumerate(rows)],
                  "jsonl")  # fmt: skip
    for path in (fast, slow):
        assert load_task_examples(path, spec).column("example_id").to_pylist() == [str(value) for value in big]
    within = [2**53 + 1, 2**63 - 1, 7]
    exact = _write(tmp_path / "within.jsonl", [dict(row, id=value) for row, value in zip(rows, within)], "jsonl")
    assert load_task_examples(exact, spec).column("example_id").to_pylist() == [str(value) for value in within]


@pytest.mark.parametrize("labels", [["false", "true"], ["True", "False"]])
def test_boolean_labels_match_the_labels_named_true_and_false(tmp_path, labels):
    spec = TaskSpec(name="yn", labels=labels, text_a="text")
    rows = [{"text": "a", "label": True}, {"text": "b", "label": False}, {"text": "c", "label": True}]
    position_of_true = [label.lower() for label in labels].index("true")
    expected = [position_of_true, 1 - position_of_true, position_of_true]
    jsonl = _write(tmp_path / "d.jsonl", rows, "jsonl")
    parquet = _write(tmp_path / "d.parquet", rows, "parquet")
    assert load_task_examples(jsonl, spec).column("label").to_pylist() == expected
    assert load_task_examples(parquet, spec).column("label").to_pylist() == expected


def test_boolean_labels_beside_label_names_in_one_jsonl_column(tmp_path):
    """A column mixing true/false with strings became strings as Python writes them: 'True', an unknown label."""
    spec = TaskSpec(name="yn", labels=["false", "true", "unknown"], text_a="text")
    rows = [{"text": "a", "label": True}, {"text": "b", "label": False}, {"text": "c", "label": "unknown"}]
    path = _write(tmp_path / "d.jsonl", rows, "jsonl")
    assert load_task_examples(path, spec).column("label").to_pylist() == [1, 0, 2]


@pytest.mark.parametrize("labels", [["no", "yes"], ["0", "1"]])
def test_boolean_labels_are_never_read_as_ids(tmp_path, labels):
    path = _write(tmp_path / "d.jsonl", [{"text": "a", "label": False}, {"text": "b", "label": True}], "jsonl")
    with pytest.raises(ValueError, match=r"holds the boolean false, which matches only a label named 'false'"):
        load_task_examples(path, TaskSpec(name="yn", labels=labels, text_a="text"))
    with pytest.raises(ValueError, match=r"holds the boolean false, expected a number"):
        load_task_examples(path, TaskSpec(name="score", type="regression", text_a="text"))


def test_errors_name_the_line_in_csv_and_tsv_files(tmp_path):
    """Lines count the header, blank lines and every line of a quoted field, as an editor shows them."""
    spec = TaskSpec(name="t", labels=["neg", "pos"], text_a="text", label="sentiment")
    path = tmp_path / "d.csv"
    # line 1 header, 2 a row, 3 blank, 4-5 one row whose text spans two lines, 6 the unknown label
    path.write_text('text,sentiment\nfine,pos\n\n"two\nlines",neg\nbad,maybe\n')
    with pytest.raises(ValueError, match=r"d.csv: line 6, column 'sentiment' holds unknown label 'maybe'"):
        load_task_examples(path, spec)
    path.write_text('text,sentiment\nfine,pos\n\n"two\nlines",\nok,neg\n,\n')
    with pytest.raises(ValueError, match=r"d.csv: lines \[4, 7\] have no label in column 'sentiment'"):
        load_task_examples(path, spec)
    # A repeated id names every line that holds it.
    path.write_text("example_id,text,sentiment\na,x,pos\nb,y,neg\n\na,z,pos\n")
    with pytest.raises(ValueError, match=r"d.csv: column 'example_id' repeats the id 'a' \(lines \[2, 5\]\)"):
        load_task_examples(path, spec)
    path.write_text("text,sentiment\nfine,pos\n\nragged\n")
    with pytest.raises(ValueError, match=r"d.csv: line 4 has 1 fields, the header has 2"):
        load_task_examples(path, spec)
    cola = tmp_path / "cola.tsv"  # headerless: the first line is a row
    cola.write_text("gj04\t1\t\tfine.\ngj04\t7\t*\tbad.\n")
    with pytest.raises(ValueError, match=r"cola.tsv: line 2, column 'label' holds unknown label '7'"):
        load_task_examples(cola, resolve_task_spec("cola"))


@pytest.mark.parametrize("reader", ["pyarrow", "line by line"])
def test_errors_name_the_line_in_jsonl_files(tmp_path, reader):
    spec = TaskSpec(name="t", labels=["neg", "pos"], text_a="text", label="sentiment")
    # "n" mixing types sends the file to the line-by-line reader; a raw U+2028 in a string is no line end
    extra = [1, "two", 3, 4] if reader == "line by line" else [1, 2, 3, 4]
    records = [
        {"text": "a\u2028b", "sentiment": "pos"},
        {"text": "c", "sentiment": "neg"},
        {"text": "d", "sentiment": None},
        {"text": "e", "sentiment": "maybe"},
    ]
    lines = [json.dumps(dict(record, n=n), ensure_ascii=False) for record, n in zip(records, extra)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([lines[0], "", lines[1], "  ", lines[2], lines[3]]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d.jsonl: line 6, column 'sentiment' holds unknown label 'maybe'"):
        load_task_examples(path, spec)
    path.write_text("\n".join([lines[0], "", lines[1], "  ", lines[2]]) + "\n", encoding="utf-8")
    # says what to do from the command line (it named require_labels=False, a Python argument)
    unlabelled = r"d.jsonl: line 5 has no label in column 'sentiment', and every row needs one here \(training and dev"
    with pytest.raises(ValueError, match=unlabelled + r" data\): label them or leave them out \(rows without labels"):
        load_task_examples(path, spec)
    path.write_text("\n".join([lines[0], "", json.dumps({"text": None, "sentiment": "pos", "n": extra[1]})]) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl: line 3 has no text in column 'text'"):
        load_task_examples(path, spec)


def test_errors_name_the_0_based_row_in_parquet(tmp_path):
    spec = TaskSpec(name="t", labels=["neg", "pos"], text_a="text", label="sentiment")
    rows = [{"text": "a", "sentiment": "pos"}, {"text": "b", "sentiment": "maybe"}]
    path = _write(tmp_path / "d.parquet", rows, "parquet")
    with pytest.raises(ValueError, match=r"d.parquet: row 1 \(0-based\), column 'sentiment' holds unknown label"):
        load_task_examples(path, spec)


def test_row_places_without_lines_say_how_rows_are_counted(tmp_path):
    # Should the line reading ever see other rows than the table, the message counts rows and says how.
    from dist_kd.data.tasks import RowPlaces

    spec = TaskSpec(name="t", labels=["neg", "pos"])
    (tmp_path / "d.csv").write_text("text_a,label\na,pos\n")
    (tmp_path / "d.jsonl").write_text('{"text_a": "a"}\n')
    assert RowPlaces(tmp_path / "d.csv", spec, "utf-8", 1)(0) == "line 2"
    assert RowPlaces(tmp_path / "d.csv", spec, "utf-8", 5)(2) == "data row 3 (1-based, after the header)"
    assert RowPlaces(tmp_path / "d.jsonl", spec, "utf-8", 5)([0, 2], more=True) == (
        "records [1, 3, ...] (1-based, blank lines not counted)"
    )


def test_text_cells_that_are_not_strings_are_decoded_or_refused_not_stringified(tmp_path, caplog):
    """A Parquet text column stored as binary (Hive, Spark) became the text "b'...'", a list column "['...']";
    an empty text was kept without a word."""
    import logging

    spec = TaskSpec(name="t", labels=["neg", "pos"])
    texts = ["good film", "café noir"]
    path = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"text_a": [t.encode() for t in texts], "label": ["pos", "neg"]}), path)
    assert load_task_examples(path, spec).column("text_a").to_pylist() == texts
    pq.write_table(pa.table({"text_a": [b"ok", b"\xff\xfe"], "label": ["pos", "neg"]}), path)
    with pytest.raises(
        ValueError, match=r"binary.parquet: row 1 \(0-based\) holds bytes in column 'text_a' .*not UTF-8"
    ):
        load_task_examples(path, spec)
    pq.write_table(pa.table({"text_a": [["a", "b"], ["c"]], "label": ["pos", "neg"]}), tmp_path / "list.parquet")
    with pytest.raises(ValueError, match=r"rows \[0, 1\] \(0-based\) have a list in column 'text_a' \(text_a\), not a"):
        load_task_examples(tmp_path / "list.parquet", spec)
    rows = [{"text_a": "fine", "text_b": ["x"], "label": "pos"}]
    with pytest.raises(ValueError, match=r"line 1 has a list in column 'text_b' \(text_b\), not a text"):
        load_task_examples(_write(tmp_path / "pair.jsonl", rows, "jsonl"), spec)
    numbers = _write(tmp_path / "digits.csv", [{"text_a": 12, "label": "pos"}, {"text_a": 7, "label": "neg"}], "csv")
    assert load_task_examples(numbers, spec).column("text_a").to_pylist() == ["12", "7"]  # digits stay text
    empty = _write(
        tmp_path / "empty.jsonl", [{"text_a": "a", "label": "pos"}, {"text_a": " ", "label": "neg"}], "jsonl"
    )
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.tasks"):
        assert load_task_examples(empty, spec).column("text_a").to_pylist() == ["a", " "]
    assert "empty.jsonl: line 2 has an empty text in column 'text_a'" in caplog.text


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_blank_lines_between_the_rows_of_a_one_column_file_are_warned(tmp_path, caplog, fmt):
    """A blank line of a one-column file may be an empty text; it is skipped as no row, so the rows after it
    stood one line earlier than the user's file, silently (predictions counted by row then shifted)."""
    import logging

    spec = resolve_task_spec("demo", labels=["0", "1"], text_a="sentence")
    path = tmp_path / f"test.{fmt}"
    quoted = '"a quoted\n\nfield"\n' if fmt == "csv" else "d\n"  # a blank line inside a value is no blank row
    path.write_text("sentence\na\n\nb\n\n\nc\n" + quoted + "\n\n")
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.tasks"):
        table = load_task_examples(path, spec, require_labels=False)
    assert table.num_rows == 4 and table.column("text_a").to_pylist()[:3] == ["a", "b", "c"]
    assert "has one column and 3 blank lines between its rows (lines 3, 5, 6)" in caplog.text
    caplog.clear()
    path.write_text("sentence\na\nb\n\n\n")  # at the end only: nothing shifts
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.tasks"):
        load_task_examples(path, spec, require_labels=False)
    assert "blank lines" not in caplog.text
    path.write_text("sentence\tlabel\na\t0\n\nb\t1\n".replace("\t", "\t" if fmt == "tsv" else ","))
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.tasks"):  # two columns: a blank line is no row
        load_task_examples(path, spec)
    assert "blank lines" not in caplog.text


def test_a_tsv_written_with_csv_quoting_is_warned(tmp_path, caplog):
    """pandas' to_csv(sep="\\t") quotes cells holding a '"'; a TSV is read without quoting (GLUE's hold unbalanced
    quotes), so the text kept the quotes and doubled inner quotes, silently."""
    import logging

    path = tmp_path / "dev.tsv"
    path.write_text('sentence\tlabel\n"He said ""great"" movie"\t1\nfine as it is\t0\nan "unbalanced quote\t1\n')
    spec = resolve_task_spec("demo", labels=["0", "1"], text_a="sentence")
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.tasks"):
        table = load_task_examples(path, spec)
    assert table.column("text_a").to_pylist()[0] == '"He said ""great"" movie"'  # read as written
    assert "1 cells of column 'sentence' look CSV-quoted" in caplog.text and "write it as .csv" in caplog.text
    caplog.clear()
    path.write_text('sentence\tlabel\nfine as it is\t0\nan "unbalanced quote\t1\n')  # GLUE's own: no warning
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.tasks"):
        load_task_examples(path, spec)
    assert "CSV-quoted" not in caplog.text
    # A file of one column: Python's csv writer (pandas' to_csv) writes a row's one empty field as "", which
    # a TSV keeps as a two-character text; it was not warned.
    path.write_text('sentence\nx\n""\ny\n')
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.tasks"):
        table = load_task_examples(path, spec, require_labels=False)
    assert table.column("text_a").to_pylist() == ["x", '""', "y"]
    assert "1 cells of column 'sentence' look CSV-quoted (e.g. '\"\"')" in caplog.text


def test_a_json_array_file_is_named_as_such(tmp_path):
    """A .json file holding one JSON array failed with "line 1 is not valid JSON" and no hint that .json is read
    as JSON lines."""
    path = tmp_path / "dev.json"
    path.write_text('[\n  {"text": "a b", "label": "x"},\n  {"text": "c", "label": "y"}\n]\n')
    spec = resolve_task_spec("demo", labels=["x", "y"], text_a="text")
    with pytest.raises(ValueError, match=r"line 1 is not valid JSON .*looks like one JSON array: write one object"):
        load_task_examples(path, spec)
    path.write_text('[{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}]\n')  # the array on one line
    with pytest.raises(ValueError, match=r"line 1 must be a JSON object, found list \(a JSON array: write one"):
        load_task_examples(path, spec)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_labels_named_by_numbers_match_numeric_cells_by_value(tmp_path, fmt):
    # YAML `labels: [0.0, 0.5, 1.0]` gives the names "0.0", "0.5", "1.0"; JSONL and Parquet hold the cells as
    # floats, and 1.0 was read as the id 1 ("0.5") after its text "1" missed the label "1.0".
    spec = TaskSpec(name="t", labels=["0.0", "0.5", "1.0"], text_a="text", label="y")
    cells = [0.0, 0.5, 1.0, 1] if fmt != "csv" else ["0.0", "0.5", "1.0", "1"]
    rows = [{"text": f"x{i}", "y": cell} for i, cell in enumerate(cells)]
    labels = load_task_examples(_write(tmp_path / f"d.{fmt}", rows, fmt), spec).column("label").to_pylist()
    assert labels == [0, 1, 2, 2]
    # labels named by numbers are never ids: 2 is no label here, not index 2
    rows.append({"text": "x4", "y": 2.0 if fmt != "csv" else "2"})
    with pytest.raises(ValueError, match=r"holds unknown label .*2.*; task 't' allows \['0.0', '0.5', '1.0'\]$"):
        load_task_examples(_write(tmp_path / f"e.{fmt}", rows, fmt), spec)


@pytest.mark.parametrize("fmt", ["datasets", "parquet"])
def test_stsb_test_rows_saved_by_datasets_have_no_label(tmp_path, fmt):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "label": datasets.Value("float32"),
        }
    )
    rows = {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [-1.0, -1.0]}
    split = datasets.Dataset.from_dict(rows, features=features)
    path = tmp_path / ("ds" if fmt == "datasets" else "test.parquet")
    split.save_to_disk(str(path)) if fmt == "datasets" else split.to_parquet(str(path))
    spec = resolve_task_spec("stsb")
    assert load_task_examples(path, spec, require_labels=False).column("label").to_pylist() == [None, None]
    # another regression task keeps -1.0 as a score
    other = dataclasses.replace(spec, name="sim", label="label")
    assert load_task_examples(path, other, require_labels=False).column("label").to_pylist() == [-1.0, -1.0]


@pytest.mark.parametrize("fmt", ["tsv", "csv"])
def test_a_field_over_csv_default_limit_beside_a_ragged_row_names_the_row(tmp_path, fmt):
    # A ragged row sends the file to the csv module, whose default limit (128 KiB a field) was a bare
    # _csv.Error traceback; the whole article reads, and the ragged row is named.
    sep = "\t" if fmt == "tsv" else ","
    spec = TaskSpec(name="t", labels=["neg", "pos"], text_a="text", label="y")
    path = tmp_path / f"d.{fmt}"
    path.write_text(f"text{sep}y\n{'w' * 200_000}{sep}pos\n")
    assert len(load_task_examples(path, spec).column("text_a")[0].as_py()) == 200_000
    path.write_text(f"text{sep}y\n{'w' * 200_000}{sep}pos\nb{sep}neg{sep}extra\n")
    with pytest.raises(ValueError, match=rf"d.{fmt}: line 3 has 3 fields, the header has 2"):
        load_task_examples(path, spec)


def test_a_jsonl_text_with_half_a_character_names_the_line_and_field(tmp_path):
    spec = TaskSpec(name="t", labels=["neg", "pos"], text_a="text", label="y")
    path = tmp_path / "d.jsonl"
    # json.dumps writes a text cut inside an emoji as a lone surrogate escape
    path.write_text(json.dumps({"text": "fine", "y": "pos"}) + "\n" + json.dumps({"text": "cut \ud83d", "y": 1}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl: line 2, field 'text' holds a lone surrogate '\\ud83d'"):
        load_task_examples(path, spec)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16-le"])
@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.tsv"])
def test_a_byte_order_mark_is_no_part_of_the_data_in_either_reader(tmp_path, name, encoding):
    spec = TaskSpec(name="t", labels=["neg", "pos"], text_a="text", label="y")
    path = tmp_path / name
    if name.endswith(".jsonl"):
        # labels that mix names and ids send the file to the line-by-line reader
        body = json.dumps({"text": "hello", "y": "pos"}) + "\n" + json.dumps({"text": "bye", "y": 0}) + "\n"
    else:
        sep = "\t" if name.endswith(".tsv") else ","
        body = f"text{sep}y\nhello{sep}pos\nbye{sep}0{sep}\n"  # a ragged row: the csv module's reading
    path.write_bytes(("\ufeff" + body).encode(encoding))  # Windows' "Unicode" text: UTF-16-LE with a BOM
    if name.endswith(".jsonl"):
        assert load_task_examples(path, spec, encoding=encoding).column("label").to_pylist() == [1, 0]
    else:
        with pytest.raises(ValueError, match=r"line 3 has 3 fields, the header has 2 \(\['text', 'y'\]\)"):
            load_task_examples(path, spec, encoding=encoding)


def test_a_boolean_label_matching_two_labels_but_for_case_is_refused(tmp_path):
    """Labels True and TRUE: a JSON true names neither more than the other, so it must not pick the first."""
    path = _write(tmp_path / "d.jsonl", [{"text": "a", "label": True}], "jsonl")
    with pytest.raises(ValueError, match=r"holds the boolean true, which matches only a label named 'true'"):
        load_task_examples(path, TaskSpec(name="yn", labels=["True", "TRUE", "false"], text_a="text"))
