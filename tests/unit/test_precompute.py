"""Precompute in one process: soft targets against an independent computation, ensemble checks, resume."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dist_kd.data import soft_targets as st
from dist_kd.data.tasks import resolve_task_spec
from dist_kd.io import write_parquet_atomic
from dist_kd.precompute import (
    CHUNKS_DIR,
    PrecomputeConfig,
    chunk_path,
    precompute_soft_targets,
)
from dist_kd.predict import length_batches
from dist_kd.testing import build_tiny_bert, random_sentences, reorder_classifier_outputs

LABELS = ["neg", "neu", "pos"]
ID2LABEL = dict(enumerate(LABELS))
NUM_ROWS = 11


def _teacher(directory, seed: int, labels=LABELS):
    return build_tiny_bert(
        directory,
        seed=seed,
        model_class="BertForSequenceClassification",
        num_layers=2,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three teachers and a JSONL file mixing sentence pairs and single sentences (lengths vary a lot)."""
    root = tmp_path_factory.mktemp("precompute")
    teachers = [str(_teacher(root / f"t{k}", seed=k)) for k in (1, 2, 3)]
    firsts = random_sentences(NUM_ROWS, seed=5, min_words=2, max_words=40)
    seconds = random_sentences(NUM_ROWS, seed=6)
    rows = [
        {"id": f"ex{i}", "a": a, "b": b if i % 3 else None, "y": LABELS[i % 3] if i % 4 else None}
        for i, (a, b) in enumerate(zip(firsts, seconds))
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = resolve_task_spec("topic", labels=LABELS, text_a="a", text_b="b", label="y", id_column="id")
    return root, teachers, data, spec, rows


def _config(teachers, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(teachers=teachers, **({"dtype": "fp32", "batch_size": 4, "chunk_size": 4} | kw))


def _independent_logits(teacher_dir: str, rows) -> np.ndarray:
    """Each example alone through plain transformers: no padding, no batching, no dist_kd code."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            enc = tokenizer(row["a"], row["b"], truncation=True, max_length=128, return_tensors="pt")
            out.append(model(**enc).logits[0].numpy())
    return np.stack(out)


def test_soft_probs_equal_mean_of_independent_softmaxes(setup, tmp_path):
    _, teachers, data, spec, rows = setup
    temperature = 2.0
    result = precompute_soft_targets(
        spec, data, tmp_path / "st", _config(teachers, temperature=temperature, keep_teacher_logits=True),
        progress=False,
    )  # fmt: skip
    assert result.num_rows == NUM_ROWS and result.computed_examples == NUM_ROWS
    loaded = st.load_soft_targets(tmp_path / "st", expected_labels=LABELS, task="topic")

    logits_KNC = np.stack([_independent_logits(t, rows) for t in teachers])
    z = logits_KNC / temperature
    softmax = np.exp(z - z.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(loaded.soft_probs(), softmax.mean(0), atol=2e-6)
    # keep-teacher-logits: K x C per row, teacher order as given
    assert loaded.teacher_logits().shape == (NUM_ROWS, 3, 3)
    np.testing.assert_allclose(loaded.teacher_logits(), logits_KNC.transpose(1, 0, 2), atol=2e-5)

    # Every row, in input order, with its texts and (nullable) label index.
    table = loaded.table
    assert table.column("example_id").to_pylist() == [row["id"] for row in rows]
    assert table.column("text_b").to_pylist() == [row["b"] for row in rows]
    assert table.column("label").to_pylist() == [None if row["y"] is None else LABELS.index(row["y"]) for row in rows]
    assert set(table.column("task").to_pylist()) == {"topic"}
    meta = loaded.metadata
    assert meta.label_names == LABELS and meta.temperature == temperature and meta.num_teachers == 3
    assert [t["sha256"] for t in meta.teachers] == [_weights_sha(t) for t in teachers]
    assert meta.source_data["sha256"] == _file_sha(data)
    assert not (tmp_path / "st" / CHUNKS_DIR).exists()


def _weights_sha(teacher_dir: str) -> str:
    from dist_kd.io import sha256_file

    return sha256_file(f"{teacher_dir}/model.safetensors")


def _file_sha(path) -> str:
    from dist_kd.io import sha256_file

    return sha256_file(path)


def test_results_do_not_depend_on_batch_size(setup, tmp_path):
    _, teachers, data, spec, _ = setup
    precompute_soft_targets(spec, data, tmp_path / "a", _config(teachers[:2], batch_size=1), progress=False)
    precompute_soft_targets(spec, data, tmp_path / "b", _config(teachers[:2], batch_size=64), progress=False)
    a, b = st.load_soft_targets(tmp_path / "a"), st.load_soft_targets(tmp_path / "b")
    np.testing.assert_allclose(a.soft_probs(), b.soft_probs(), atol=1e-6)  # padding is masked out


def _subset_file(path, rows, keep) -> object:
    """A JSONL file of some of ``rows`` (the setup's format), in another order than the full data."""
    path.write_text("".join(json.dumps(rows[i]) + "\n" for i in keep))
    return path


def test_reuse_copies_the_rows_an_earlier_store_holds_and_computes_the_others(setup, tmp_path):
    _, teachers, data, spec, rows = setup
    keep = [7, 0, 3, 9, 1]
    earlier = _subset_file(tmp_path / "earlier.jsonl", rows, keep)
    precompute_soft_targets(spec, earlier, tmp_path / "earlier", _config(teachers, keep_teacher_logits=True),
                            progress=False)  # fmt: skip
    config = _config(teachers, keep_teacher_logits=True, reuse=[str(tmp_path / "earlier")])
    result = precompute_soft_targets(spec, data, tmp_path / "reusing", config, progress=False)
    assert result.reused_examples == len(keep) and result.computed_examples == NUM_ROWS - len(keep)
    precompute_soft_targets(spec, data, tmp_path / "fresh", _config(teachers, keep_teacher_logits=True),
                            progress=False)  # fmt: skip

    reusing, fresh = st.load_soft_targets(tmp_path / "reusing"), st.load_soft_targets(tmp_path / "fresh")
    np.testing.assert_allclose(reusing.soft_probs(), fresh.soft_probs(), atol=1e-6)
    np.testing.assert_allclose(reusing.teacher_logits(), fresh.teacher_logits(), atol=1e-5)
    for column in ("example_id", "text_a", "text_b", "label"):  # rows stay in this data's order
        assert reusing.table.column(column).to_pylist() == fresh.table.column(column).to_pylist()
    # The copied rows are the earlier store's values exactly, so provenance is recorded.
    earlier_store = st.load_soft_targets(tmp_path / "earlier")
    by_id = dict(zip(earlier_store.table.column("example_id").to_pylist(), earlier_store.soft_probs()))
    ids = reusing.table.column("example_id").to_pylist()
    for i, example_id in enumerate(ids):
        if example_id in by_id:
            np.testing.assert_array_equal(reusing.soft_probs()[i], by_id[example_id])
    sources = reusing.metadata.extra["reused_from"]
    assert [source["num_rows"] for source in sources] == [len(keep)]
    assert sources[0]["path"] == str((tmp_path / "earlier").resolve())


def test_reusing_every_row_loads_no_teacher(setup, tmp_path, monkeypatch):
    _, teachers, data, spec, _ = setup
    precompute_soft_targets(spec, data, tmp_path / "first", _config(teachers[:2]), progress=False)

    def no_teachers(*args, **kwargs):
        raise AssertionError("a teacher was loaded although every row was in the reused store")

    monkeypatch.setattr("dist_kd.precompute.TeacherEnsemble", no_teachers)
    config = _config(teachers[:2], reuse=[str(tmp_path / "first")])
    result = precompute_soft_targets(spec, data, tmp_path / "second", config, progress=False)
    assert result.computed_examples == 0 and result.reused_examples == NUM_ROWS
    first, second = st.load_soft_targets(tmp_path / "first"), st.load_soft_targets(tmp_path / "second")
    np.testing.assert_array_equal(second.soft_probs(), first.soft_probs())


def test_reuse_refuses_stores_computed_otherwise(setup, tmp_path):
    _, teachers, data, spec, rows = setup
    earlier = _subset_file(tmp_path / "earlier.jsonl", rows, [0, 1, 2])
    precompute_soft_targets(spec, earlier, tmp_path / "earlier", _config(teachers[:2]), progress=False)
    reuse = [str(tmp_path / "earlier")]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"reuse: .*earlier was not computed.*temperature: 1.0 there, 2.0"):
        precompute_soft_targets(spec, data, out, _config(teachers[:2], temperature=2.0, reuse=reuse), progress=False)
    with pytest.raises(ValueError, match=r"reuse: .*earlier was not computed like this run \(teachers: "):
        precompute_soft_targets(spec, data, out, _config(teachers[1:], reuse=reuse), progress=False)
    with pytest.raises(ValueError, match=r"max_length: 128 there, 64 here"):
        precompute_soft_targets(spec, data, out, _config(teachers[:2], max_length=64, reuse=reuse), progress=False)
    with pytest.raises(ValueError, match=r"reuse: .*has no teacher logits"):
        config = _config(teachers[:2], keep_teacher_logits=True, reuse=reuse)
        precompute_soft_targets(spec, data, out, config, progress=False)
    with pytest.raises(FileNotFoundError, match=r"reuse: soft-target store .*missing does not exist"):
        config = _config(teachers[:2], reuse=[str(tmp_path / "missing")])
        precompute_soft_targets(spec, data, out, config, progress=False)
    # The same weights with the labels renamed in config.json: other columns, so the earlier rows do not carry over.
    import shutil

    renamed = tmp_path / "renamed"
    shutil.copytree(teachers[0], renamed)
    config_json = json.loads((renamed / "config.json").read_text())
    config_json["id2label"] = {"0": "pos", "1": "neg", "2": "neu"}
    config_json["label2id"] = {"pos": 0, "neg": 1, "neu": 2}
    (renamed / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ValueError, match=r"reuse: .*earlier was not computed like this run.*teacher_label_orders"):
        precompute_soft_targets(spec, data, out, _config([str(renamed), teachers[1]], reuse=reuse), progress=False)
    assert not out.exists() or not any(out.rglob("*.parquet"))  # nothing was written for a refused run


def test_length_batches_sort_by_length_and_cover_every_row():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = length_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[1, 3, 6], [4, 0, 5], [2]]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))


def test_a_teacher_naming_the_classes_in_another_order_is_read_by_name(setup, tmp_path):
    """A teacher whose head lists the task's classes in another order (a Hugging Face MNLI model against the GLUE
    files' order) gives the soft targets of the same teacher in the task's order."""
    _, teachers, data, spec, _ = setup
    twin = str(reorder_classifier_outputs(teachers[0], tmp_path / "twin", perm=[2, 0, 1]))  # pos, neg, neu: a rotation
    config = {"keep_teacher_logits": True, "temperature": 2.0}
    reference = precompute_soft_targets(spec, data, tmp_path / "ref", _config([teachers[0], teachers[1]], **config),
                                        progress=False)  # fmt: skip
    mixed = precompute_soft_targets(spec, data, tmp_path / "mixed", _config([twin, teachers[1]], **config),
                                    progress=False)  # fmt: skip
    ref = st.load_soft_targets(reference.directory, expected_labels=LABELS, task="topic")
    got = st.load_soft_targets(mixed.directory, expected_labels=LABELS, task="topic")
    np.testing.assert_allclose(got.teacher_logits(), ref.teacher_logits(), atol=1e-6)
    np.testing.assert_allclose(got.soft_probs(), ref.soft_probs(), atol=1e-6)
    # The order is part of the run's record (a head renamed later is a new run); stores in order carry none.
    assert got.metadata.extra["teacher_label_orders"] == [[1, 2, 0], [0, 1, 2]]
    assert "teacher_label_orders" not in ref.metadata.extra


def test_teachers_that_disagree_with_the_task_are_refused(setup, tmp_path):
    _, teachers, data, _, _ = setup
    spec = resolve_task_spec("topic", labels=["neg", "neu", "mixed"], text_a="a", text_b="b", label="y")
    with pytest.raises(ValueError, match=r"a different label set"):
        precompute_soft_targets(spec, data, tmp_path / "out", _config(teachers), progress=False)
    sst2 = resolve_task_spec("sst2", text_a="a", text_b="b", label=None)  # GLUE registry labels ["0", "1"]
    with pytest.raises(ValueError, match="a different label set"):
        precompute_soft_targets(sst2, data, tmp_path / "out", _config(teachers), progress=False)
    unnamed = str(_teacher(tmp_path / "unnamed", seed=4, labels=["LABEL_0", "LABEL_1", "LABEL_2"]))
    spec = resolve_task_spec("topic", labels=LABELS, text_a="a", text_b="b", label="y")
    with pytest.raises(ValueError, match=r"default label names .* config.json \(id2label") as err:
        precompute_soft_targets(spec, data, tmp_path / "out", _config([teachers[0], unnamed]), progress=False)
    assert unnamed in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before any output
    # An encoder without its head (a task run's student/): refused from its config.json, before any output,
    # naming the flag; it was refused when its weights loaded, after _chunks/run.json was written.
    encoder = str(build_tiny_bert(tmp_path / "encoder", seed=5, num_layers=2))
    with pytest.raises(
        ValueError, match=r"teacher \(--teachers\) .*encoder is a BertModel \(config.json architectures"
    ):
        precompute_soft_targets(spec, data, tmp_path / "out", _config([teachers[0], encoder]), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_run_stopped_before_its_first_chunk_does_not_refuse_the_corrected_command(setup, tmp_path):
    """A teacher without its head whose config.json names no architectures is refused only as its weights load,
    after _chunks/run.json: the corrected command was refused as "a partial precompute started with other
    parameters" with nothing computed. A classifier of a class of its own (not *ForSequenceClassification)
    was refused by name."""
    import shutil

    _, teachers, data, spec, _ = setup
    encoder = build_tiny_bert(tmp_path / "encoder", seed=5, num_layers=2, id2label=dict(enumerate(LABELS)))
    config_file = encoder / "config.json"
    settings = json.loads(config_file.read_text())
    del settings["architectures"]
    config_file.write_text(json.dumps(settings))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"--teachers .*encoder: its weights hold no trained head"):
        precompute_soft_targets(spec, data, out, _config([teachers[0], str(encoder)]), progress=False)
    assert sorted(p.name for p in (out / "_chunks").iterdir()) == ["run.json"]
    renamed = tmp_path / "renamed"  # the fix: a real classifier, of a class named otherwise
    shutil.copytree(teachers[1], renamed)
    settings = json.loads((renamed / "config.json").read_text())
    settings["architectures"] = ["BertForMultiLabelSequenceClassification"]
    (renamed / "config.json").write_text(json.dumps(settings))
    precompute_soft_targets(spec, data, out, _config([teachers[0], str(renamed)]), progress=False)
    reference = tmp_path / "reference"
    precompute_soft_targets(spec, data, reference, _config(teachers[:2]), progress=False)
    np.testing.assert_array_equal(st.load_soft_targets(out).soft_probs(), st.load_soft_targets(reference).soft_probs())


def test_teachers_with_different_tokenizers_are_refused(setup, tmp_path):
    _, teachers, data, spec, _ = setup
    other = _teacher(tmp_path / "other_tok", seed=4)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(other)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(other)
    model.resize_token_embeddings(len(tokenizer))  # a row for the new token: a consistent teacher of its own
    model.save_pretrained(other)
    with pytest.raises(ValueError, match="teachers disagree on the tokenizer") as err:
        precompute_soft_targets(spec, data, tmp_path / "out", _config([teachers[0], str(other)]), progress=False)
    assert teachers[0] in str(err.value) and str(other) in str(err.value)


class Crash(RuntimeError):
    pass


def _files(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def test_crash_after_first_chunk_resumes_to_identical_store(setup, tmp_path):
    _, teachers, data, spec, _ = setup
    config = _config(teachers[:2], keep_teacher_logits=True)
    precompute_soft_targets(spec, data, tmp_path / "reference", config, progress=False)

    def crash(index: int) -> None:
        raise Crash(f"simulated crash after chunk {index}")

    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        precompute_soft_targets(spec, data, out, config, progress=False, on_chunk_written=crash)
    assert chunk_path(out, 0).is_file() and not chunk_path(out, 1).exists()
    assert not st.is_complete(out)
    with pytest.raises(ValueError, match="incomplete"):
        st.load_soft_targets(out)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written

    written = []
    result = precompute_soft_targets(spec, data, out, config, progress=False, on_chunk_written=written.append)
    assert written == [1, 2]  # chunk 0 was reused, not recomputed
    assert result.computed_examples == NUM_ROWS - 4 and result.reused_chunks == 1
    assert _files(out) == _files(tmp_path / "reference")  # byte-identical parts and manifest
    assert not (out / CHUNKS_DIR).exists()


def test_a_lost_chunk_is_recomputed_and_a_foreign_chunk_is_not_reused(setup, tmp_path):
    _, teachers, data, spec, _ = setup
    config = _config(teachers[:2])
    precompute_soft_targets(spec, data, tmp_path / "reference", config, progress=False)
    out = tmp_path / "out"
    seen = []

    def crash_at_two(index: int) -> None:
        seen.append(index)
        if index == 2:
            raise Crash("late crash")

    with pytest.raises(Crash):
        precompute_soft_targets(spec, data, out, config, progress=False, on_chunk_written=crash_at_two)
    chunk_path(out, 1).unlink()
    # A chunk file from another run (other key) under chunk 0's name must not be merged.
    table = pq.read_table(chunk_path(out, 0))
    write_parquet_atomic(table.replace_schema_metadata(None), chunk_path(out, 0), {"run": "other", "chunk": 0})
    written = []
    precompute_soft_targets(spec, data, out, config, progress=False, on_chunk_written=written.append)
    assert written == [0, 1]
    assert _files(out) == _files(tmp_path / "reference")


def test_resume_with_other_parameters_is_refused(setup, tmp_path):
    _, teachers, data, spec, _ = setup
    out = tmp_path / "out"

    def crash(index: int) -> None:
        raise Crash

    with pytest.raises(Crash):
        precompute_soft_targets(spec, data, out, _config(teachers[:2]), progress=False, on_chunk_written=crash)
    with pytest.raises(ValueError, match=r"partial precompute.*temperature: 1.0 -> 3.0"):
        precompute_soft_targets(spec, data, out, _config(teachers[:2], temperature=3.0), progress=False)
    with pytest.raises(ValueError, match=r"partial precompute.*teachers"):
        precompute_soft_targets(spec, data, out, _config(teachers[1:]), progress=False)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(data.read_text().replace("ex0", "exZ"))
    with pytest.raises(ValueError, match=r"partial precompute.*source_data.sha256"):
        precompute_soft_targets(spec, changed, out, _config(teachers[:2]), progress=False)
    # A record cut short (a full disk, a copy interrupted) was "error: Expecting value: line 1 column 1": no file
    # named, no way out said.
    record = out / CHUNKS_DIR / "run.json"
    record.write_text("")
    said = rf"{re.escape(str(record))} \(the record of a partial precompute\) does not read \(Expecting value"
    with pytest.raises(ValueError, match=said + rf".*\); delete {re.escape(str(out / CHUNKS_DIR))} to start over"):
        precompute_soft_targets(spec, data, out, _config(teachers[:2]), progress=False)


def test_a_length_beyond_a_teachers_positions_is_refused_before_anything_is_written(setup, tmp_path):
    """Refused after the run's record was written, the corrected command would meet 'a partial precompute
    started with other parameters'."""
    _, teachers, data, spec, _ = setup
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"max_length \(--max-length\) 129 exceeds .*128 of model {teachers[0]}"):
        precompute_soft_targets(spec, data, out, _config(teachers[:2], max_length=129), progress=False)
    assert not out.exists()
    result = precompute_soft_targets(spec, data, out, _config(teachers[:2], max_length=128), progress=False)
    assert result.num_rows == NUM_ROWS


def test_complete_store_is_kept_and_not_overwritten_by_other_parameters(setup, tmp_path, monkeypatch):
    import dist_kd.precompute as module

    _, teachers, data, spec, _ = setup
    out = tmp_path / "out"
    precompute_soft_targets(spec, data, out, _config(teachers[:2]), progress=False)
    before = _files(out)
    with monkeypatch.context() as patch:  # nothing written, not even a lock: a finished store may be read-only
        patch.setattr(module, "locked_run_dir", lambda *a, **k: pytest.fail("took the run lock of a finished store"))
        again = precompute_soft_targets(spec, data, out, _config(teachers[:2]), progress=False)
    assert again.computed_examples == 0 and _files(out) == before
    with pytest.raises(ValueError, match=r"already holds a soft-target store.*keep_teacher_logits|has_teacher_logits"):
        precompute_soft_targets(spec, data, out, _config(teachers[:2], keep_teacher_logits=True), progress=False)
    assert _files(out) == before


def test_regression_stores_the_mean_prediction(tmp_path):
    teachers = [
        str(build_tiny_bert(tmp_path / f"r{k}", seed=k, model_class="BertForSequenceClassification", num_layers=1,
                            num_labels=1))
        for k in (1, 2)
    ]  # fmt: skip
    rows = [{"a": s, "score": float(i)} for i, s in enumerate(random_sentences(5, seed=8))]
    data = tmp_path / "reg.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = resolve_task_spec("sim", type="regression", text_a="a", text_b=None, label="score")
    precompute_soft_targets(spec, data, tmp_path / "st", _config(teachers, temperature=5.0), progress=False)
    loaded = st.load_soft_targets(tmp_path / "st", task="sim")
    expected = np.mean([_independent_logits(t, [{"a": r["a"], "b": None} for r in rows]) for t in teachers], axis=0)
    np.testing.assert_allclose(loaded.soft_probs(), expected, atol=2e-6)  # (N, 1), no softmax
    assert loaded.table.column("label").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert loaded.metadata.label_names == []
    three_class = str(_teacher(tmp_path / "three", seed=1))
    with pytest.raises(ValueError, match="has 3 outputs.*regression and needs one"):
        precompute_soft_targets(spec, data, tmp_path / "x", _config([three_class]), progress=False)


def test_augmented_directory_is_read_with_canonical_columns(setup, tmp_path):
    """An augment output dir (augmented.parquet + its metadata) is accepted as --data, whatever the spec's columns."""
    _, teachers, _, spec, _ = setup
    table = pa.table(
        {
            "example_id": ["x-0", "x-0-aug1"],
            "task": ["topic", "topic"],
            "text_a": ["the team won", "the club won"],
            "text_b": [None, None],
            "label": pa.array([2, None], pa.int64()),
        }
    )
    meta = {"kind": "augmented_task_data", "label_names": LABELS}
    write_parquet_atomic(table, tmp_path / "aug" / "augmented.parquet", meta)
    precompute_soft_targets(spec, tmp_path / "aug", tmp_path / "st", _config(teachers[:1]), progress=False)
    loaded = st.load_soft_targets(tmp_path / "st")
    assert loaded.table.column("example_id").to_pylist() == ["x-0", "x-0-aug1"]
    assert loaded.table.column("label").to_pylist() == [2, None]
    meta["label_names"] = ["pos", "neu", "neg"]
    write_parquet_atomic(table, tmp_path / "aug2" / "augmented.parquet", meta)
    with pytest.raises(ValueError, match="augmented data"):
        precompute_soft_targets(spec, tmp_path / "aug2", tmp_path / "st2", _config(teachers[:1]), progress=False)
    # An augmentation killed before its merge: a rank's part, no augmented.parquet (was "not a datasets directory").
    write_parquet_atomic(table, tmp_path / "aug3" / "parts" / "part-00000-of-00002.parquet", meta)
    with pytest.raises(ValueError, match=r"aug3 is an unfinished augmentation: parts/ holds .* run the same augment"):
        precompute_soft_targets(spec, tmp_path / "aug3", tmp_path / "st3", _config(teachers[:1]), progress=False)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"teachers": []}, "at least one teacher"),
        ({"teachers": ["a", "a"]}, "'a' and 'a' are the same directory"),
        ({"teachers": ["a", "b", "a/"]}, "'a' and 'a/' are the same directory; list each teacher once"),
        ({"teachers": ["a", "./b/../a"]}, "'a' and './b/../a' are the same directory"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": float("inf")}, r"temperature \(--temperature\) must be a number > 0, got inf"),  # rows 1/C
        ({"temperature": float("nan")}, r"temperature \(--temperature\) must be a number > 0, got nan"),
        ({"dtype": "int8"}, "dtype"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        PrecomputeConfig(**({"teachers": ["t"]} | kw))


def test_a_teacher_copied_under_another_name_is_refused_before_anything_is_written(setup, tmp_path):
    """Paths alone told "t1" and "./t1" apart; a copy of t1 was averaged in twice: (2 t1 + t2) / 3."""
    import shutil

    _, teachers, data, spec, _ = setup
    copy = shutil.copytree(teachers[0], tmp_path / "t1-copy")
    expected = rf"^--teachers {re.escape(teachers[0])} and {re.escape(str(copy))} hold the same weights \(sha256 "
    with pytest.raises(ValueError, match=expected):
        precompute_soft_targets(spec, data, tmp_path / "st", _config([teachers[0], teachers[1], str(copy)]))
    assert not (tmp_path / "st").exists()


def test_a_teacher_giving_non_finite_outputs_stops_the_run_at_its_first_chunk(setup, tmp_path):
    """Found at the merge, after every chunk had been computed and kept; the kept chunks then refused the rerun
    with another --dtype that the message advised."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    _, teachers, data, spec, _ = setup
    broken = tmp_path / "overflowing"
    shutil.copytree(teachers[1], broken)
    model = AutoModelForSequenceClassification.from_pretrained(broken)
    with torch.no_grad():
        model.classifier.bias[0] = float("inf")
    model.save_pretrained(broken)
    written = []  # 12 values: the 4 rows of the first chunk, 3 classes each
    with pytest.raises(ValueError, match=r"st: chunk 0 \(examples 0\.\.3\): soft_probs holds 12 NaN or infinite"):
        precompute_soft_targets(
            spec, data, tmp_path / "st", _config([teachers[0], str(broken)]), progress=False,
            on_chunk_written=written.append,
        )  # fmt: skip
    assert written == [] and not list((tmp_path / "st").rglob("chunk-*"))


def test_missing_inputs(setup, tmp_path):
    _, teachers, data, spec, _ = setup
    with pytest.raises(FileNotFoundError, match="task data"):
        precompute_soft_targets(spec, tmp_path / "none.tsv", tmp_path / "o", _config(teachers), progress=False)
    with pytest.raises(FileNotFoundError, match="teacher"):
        precompute_soft_targets(spec, data, tmp_path / "o", _config([str(tmp_path / "nope")]), progress=False)


def test_an_output_holding_anything_but_a_store_is_refused_before_any_work(setup, tmp_path):
    """A data directory given as --output lost its part-N.parquet files (pyarrow.dataset's names; the store's
    write removed the parts its manifest did not list), the input among them; an augmentation directory given
    as --output read back as augmented rows and store rows mixed."""
    import shutil

    _, teachers, data, spec, _ = setup
    user = tmp_path / "spark"
    user.mkdir()
    table = pa.table({"id": ["u0", "u1"], "a": ["one text", "another"], "y": ["neg", "pos"]})
    for name in ("part-0.parquet", "part-1.parquet"):
        pq.write_table(table, user / name)
    before = _files(user)
    with pytest.raises(ValueError, match=r"--output .*spark holds the --data .*part-0.parquet"):
        precompute_soft_targets(spec, user / "part-0.parquet", user, _config(teachers[:1]), progress=False)
    shutil.copy(data, tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match=r"holds files that are not a soft-target store's \(part-0.parquet, "):
        precompute_soft_targets(spec, tmp_path / "data.jsonl", user, _config(teachers[:1]), progress=False)
    with pytest.raises(ValueError, match=r"holds the --teachers"):
        precompute_soft_targets(spec, data, teachers[0], _config(teachers[:1]), progress=False)
    # inside a data directory: its files would change the data's digest, and a rerun would refuse the store
    with pytest.raises(ValueError, match=r"--output .*spark/soft lies inside --data .*spark: the data's digest"):
        precompute_soft_targets(spec, user, user / "soft", _config(teachers[:1]), progress=False)
    assert _files(user) == before
    # A store (and one still being written: its chunks, lock and temporary files) is taken as before.
    out = tmp_path / "out"
    precompute_soft_targets(spec, data, out, _config(teachers[:1]), progress=False)
    (out / CHUNKS_DIR).mkdir()
    (out / ".part-00001.parquet.a1b2c3d4.tmp").write_bytes(b"")
    (out / "._manifest.json.a1b2c3d4.tmp").write_bytes(b"")  # an earlier release's manifest, its write killed
    (out / ".DS_Store").write_bytes(b"")  # hidden: no reader of the directory takes it
    (out / "part-100000.parquet").write_bytes(b"")  # PART_PATTERN past 99,999 parts
    assert st.store_strangers(out) == []
    (out / "part-100000.parquet").unlink()
    precompute_soft_targets(spec, data, out, _config(teachers[:1]), progress=False)


def test_a_missing_label_column_is_a_warning_unless_named(setup, tmp_path, caplog):
    import dataclasses
    import logging

    _, teachers, data, spec, rows = setup
    misnamed = dataclasses.replace(spec, label="category")
    caplog_name = "dist_kd.precompute"
    with caplog.at_level(logging.WARNING, logger=caplog_name):
        precompute_soft_targets(misnamed, data, tmp_path / "st", _config(teachers[:1]), progress=False)
    # precompute's own (the data's rows without a second text are warned by the task-data reader)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == caplog_name]
    assert len(warnings) == 1
    assert f"task data {data} has no label column 'category' (columns found: id, a, b, y)" in warnings[0]
    # ... said once: the data was read a second time without the label column, and its warnings said twice
    unpaired = [r.getMessage() for r in caplog.records if "no second text in column" in r.getMessage()]
    assert len(unpaired) == 1, unpaired
    assert "--label COLUMN" in warnings[0]
    loaded = st.load_soft_targets(tmp_path / "st")
    assert loaded.table.column("label").to_pylist() == [None] * len(rows)
    assert loaded.metadata.extra["label_column_missing"] == {
        "column": "category",
        "columns_found": ["id", "a", "b", "y"],
    }

    with pytest.raises(ValueError, match=r"data.jsonl has no column 'category' \(label of task 'topic'\); columns "
                                         r"found: \['id', 'a', 'b', 'y'\]"):  # fmt: skip
        precompute_soft_targets(
            misnamed, data, tmp_path / "st2", _config(teachers[:1]), progress=False, require_label_column=True
        )
    # With the label column present nothing is recorded.
    precompute_soft_targets(spec, data, tmp_path / "st3", _config(teachers[:1]), progress=False)
    assert "label_column_missing" not in st.load_soft_targets(tmp_path / "st3").metadata.extra


def test_the_command_line_tells_a_named_label_column_from_the_default():
    from launch.precompute import parse_args

    base = ["--data", "d", "--teachers", "t", "--output", "o", "--task", "topic"]
    assert parse_args(base).label_given is False and parse_args(base).label == "label"
    named = parse_args([*base, "--label", "category"])
    assert named.label_given is True and named.label == "category"


def test_each_teacher_gets_the_segment_ids_its_own_tokenizer_gives(tmp_path):
    """A DistilBERT teacher (its tokenizer emits no token_type_ids) and a BERT teacher of the same vocabulary
    pass the tokenizer check; the ensemble decided segment ids from the first teacher's tokenizer alone, so the
    BERT teacher after it read the second text of every pair as segment 0 (its logits 0.6 off)."""
    import transformers
    from transformers import BertTokenizerFast, DistilBertTokenizerFast

    from dist_kd.testing import tiny_bert_config, tiny_vocab

    vocab = {word: index for index, word in enumerate(tiny_vocab())}
    labels = dict(num_labels=3, id2label=ID2LABEL, label2id={name: i for i, name in ID2LABEL.items()})
    torch.manual_seed(0)
    distil = transformers.DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=128, **labels)  # fmt: skip
    transformers.DistilBertForSequenceClassification(distil).save_pretrained(tmp_path / "distil")
    DistilBertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512).save_pretrained(tmp_path / "distil")
    bert = tiny_bert_config(num_layers=2, initializer_range=0.2)
    for key, value in labels.items():
        setattr(bert, key, value)
    transformers.BertForSequenceClassification(bert).save_pretrained(tmp_path / "bert")
    BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512).save_pretrained(tmp_path / "bert")
    rows = [{"a": a, "b": b} for a, b in zip(random_sentences(6, seed=1), random_sentences(6, seed=2))]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = resolve_task_spec("topic", labels=LABELS, text_a="a", text_b="b", label=None)
    teachers = [str(tmp_path / "distil"), str(tmp_path / "bert")]
    assert "token_type_ids" not in transformers.AutoTokenizer.from_pretrained(teachers[0]).model_input_names
    precompute_soft_targets(spec, data, tmp_path / "store", _config(teachers, keep_teacher_logits=True),
                            progress=False)  # fmt: skip
    stored = st.load_soft_targets(tmp_path / "store").teacher_logits()  # (N, K, C)
    for index, teacher in enumerate(teachers):
        np.testing.assert_allclose(stored[:, index], _independent_logits(teacher, rows), atol=1e-5, err_msg=teacher)


def test_one_run_writes_an_output_at_a_time_and_an_ended_runs_empty_partial_run_is_started_over(setup, tmp_path):
    """Two precomputes on one --output (the same command started twice) both wrote chunks and merged the store;
    and a run with other parameters could take over a partial run whose writer was still loading its teachers.
    The output's run lock refuses the second run, and a partial run without chunks is started over only once
    its writer's lock is gone."""
    import subprocess
    import sys

    from dist_kd.train.runlock import LOCK_NAME, RunDirInUse, RunLock

    _, teachers, data, spec, _ = setup
    out = tmp_path / "out"
    (out / "_chunks").mkdir(parents=True)
    earlier = {"teachers": ["other"], "temperature": 3.0}  # a run with other parameters, before its first chunk
    (out / "_chunks" / "run.json").write_text(json.dumps(earlier))
    with RunLock(out, flag="--output"):  # its writer, alive (loading its teachers)
        with pytest.raises(RunDirInUse, match=rf"--output {re.escape(str(out))} .*{LOCK_NAME}"):
            precompute_soft_targets(spec, data, out, _config(teachers[:2]), progress=False)
        assert json.loads((out / "_chunks" / "run.json").read_text()) == earlier  # not taken over
    # Its writer killed: the lock it left is stale (its pid is gone), and the partial run holds no chunk.
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    writer.kill()
    writer.wait()
    (out / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": writer.pid, "token": "x",
                                             "started": 0.0, "proc_started": 1.0}))  # fmt: skip
    precompute_soft_targets(spec, data, out, _config(teachers[:2]), progress=False)
    reference = tmp_path / "reference"
    precompute_soft_targets(spec, data, reference, _config(teachers[:2]), progress=False)
    np.testing.assert_array_equal(st.load_soft_targets(out).soft_probs(), st.load_soft_targets(reference).soft_probs())
    assert not (out / LOCK_NAME).exists() and not (out / "_chunks").exists()


@pytest.mark.parametrize("use_token_types", [True, False])
def test_batched_logits_are_in_row_order_and_pass_segment_ids_only_where_the_model_takes_them(use_token_types):
    """A RoBERTa-type model has one segment: given token_type_ids of a pair's second text (1), it indexes past
    its one-row type embedding."""
    from dist_kd.data.encode import TokenizedRows
    from dist_kd.predict import batched_logits

    row_ids = [[5, 6], [7, 8, 9, 10], [11], [12, 13, 14]]
    row_types = [[0, 1], [0, 0, 1, 1], [0], [0, 1, 1]]
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in row_ids])]).astype(np.int64)
    rows = TokenizedRows(np.concatenate(row_ids).astype(np.int32), np.concatenate(row_types).astype(np.int8), offsets)
    seen = []

    def forward(batch):
        seen.append(sorted(batch))
        mask = batch["attention_mask"]
        ids_sum = (batch["input_ids"] * mask).sum(1, keepdim=True)
        types_sum = (
            batch["token_type_ids"].sum(1, keepdim=True) if "token_type_ids" in batch else -mask.sum(1, keepdim=True)
        )
        return torch.cat([ids_sum, types_sum], dim=1).double()  # a wider dtype: returned as float32

    out = batched_logits(forward, rows, pad_id=0, batch_size=3, device=torch.device("cpu"),
                         use_token_types=use_token_types)  # fmt: skip
    expected_types = [sum(t) for t in row_types] if use_token_types else [-len(ids) for ids in row_ids]
    np.testing.assert_array_equal(out, np.array([[sum(ids), t] for ids, t in zip(row_ids, expected_types)]))
    assert out.dtype == np.float32 and len(seen) == 2  # batches of 3 and 1
    names = ["attention_mask", "input_ids", "token_type_ids"][: 3 if use_token_types else 2]
    assert all(keys == names for keys in seen), seen
