"""Soft-target store: schema, round trip, manifest-last completeness, and every validation of the reader."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_kd.data import soft_targets as st
from dist_kd.io import read_parquet_metadata

LABELS = ["neg", "neu", "pos"]


def _metadata(**overrides) -> st.StoreMetadata:
    fields = dict(
        task="topic",
        task_type="classification",
        label_names=LABELS,
        temperature=2.0,
        teachers=[{"path": "/t1", "sha256": "a" * 64}, {"path": "/t2", "sha256": "b" * 64}],
        source_data={"path": "/data.tsv", "sha256": "c" * 64},
        has_teacher_logits=True,
    )
    return st.StoreMetadata(**(fields | overrides))


def _rows(num: int, metadata: st.StoreMetadata, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    examples = pa.table(
        {
            "example_id": [f"topic-{i}" for i in range(num)],
            "text_a": [f"text {i}" for i in range(num)],
            "text_b": [None if i % 2 else f"second {i}" for i in range(num)],
            "label": [None if i % 3 == 0 else i % 3 for i in range(num)],
        }
    )
    logits = rng.normal(size=(num, metadata.num_teachers, metadata.num_classes)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    kept = logits if metadata.has_teacher_logits else None
    return st.build_rows(examples, metadata.task, probs.mean(1), kept, metadata.task_type)


def test_round_trip_keeps_rows_order_and_arrays(tmp_path):
    metadata = _metadata()
    rows = _rows(7, metadata)
    st.write_soft_targets([rows.slice(0, 3), rows.slice(3)], tmp_path / "store", metadata, rows_per_file=2)
    manifest = json.loads((tmp_path / "store" / st.MANIFEST_NAME).read_text())
    assert [f["num_rows"] for f in manifest["files"]] == [2, 2, 2, 1]
    assert manifest["num_rows"] == 7

    loaded = st.load_soft_targets(tmp_path / "store", expected_labels=LABELS, task="topic")
    assert loaded.metadata == metadata
    assert loaded.table.equals(rows.replace_schema_metadata(None))
    assert loaded.table.schema.field("soft_probs").type == pa.list_(pa.float32())
    assert loaded.table.column("text_b").null_count == 3
    assert loaded.soft_probs().shape == (7, 3)
    np.testing.assert_allclose(loaded.soft_probs().sum(1), 1.0, rtol=1e-6)
    assert loaded.teacher_logits().shape == (7, 2, 3)  # K x C per row
    # Every part file describes itself with the same metadata (readable copied out of the directory).
    for entry in manifest["files"]:
        assert read_parquet_metadata(tmp_path / "store" / entry["name"]) == metadata.to_dict()


def test_without_teacher_logits_and_regression(tmp_path):
    metadata = _metadata(task_type="regression", label_names=[], has_teacher_logits=False)
    examples = pa.table({"example_id": ["a", "b"], "text_a": ["x", "y"], "text_b": [None, None], "label": [0.5, None]})
    rows = st.build_rows(examples, "topic", np.array([[0.25], [1.5]]), None, "regression")
    st.write_soft_targets(rows, tmp_path, metadata)
    loaded = st.load_soft_targets(tmp_path, expected_labels=[])
    assert loaded.teacher_logits() is None
    assert loaded.soft_probs().tolist() == [[0.25], [1.5]]
    assert loaded.table.schema.field("label").type == pa.float64()


def test_columns_the_store_lacks_are_named_with_the_ones_it_has(tmp_path):
    """A column asked for that the store lacks was pyarrow's "No match for FieldRef.Name" and a schema dump."""
    metadata = _metadata(has_teacher_logits=False)
    st.write_soft_targets(_rows(4, metadata), tmp_path, metadata)
    assert st.load_soft_targets(tmp_path, columns=["label"]).table.column_names == ["example_id", "label", "soft_probs"]
    with pytest.raises(ValueError, match=r"store .* has no column teacher_logits; its columns: \['example_id', .*\] "
                       r"\(teacher_logits are kept only by a precompute run with --keep-teacher-logits\)"):  # fmt: skip
        st.load_soft_targets(tmp_path, columns=["teacher_logits"])
    with pytest.raises(ValueError, match=r"has no column lable, labels; its columns: \['example_id', 'task', "):
        st.load_soft_targets(tmp_path, columns=["lable", "labels"])


def test_empty_store_is_valid(tmp_path):
    metadata = _metadata()
    st.write_soft_targets([], tmp_path, metadata)
    loaded = st.load_soft_targets(tmp_path)
    assert loaded.num_rows == 0
    assert loaded.soft_probs().shape == (0, 3)


def test_no_manifest_means_incomplete(tmp_path):
    metadata = _metadata()
    st.write_soft_targets(_rows(4, metadata), tmp_path, metadata)
    (tmp_path / st.MANIFEST_NAME).unlink()  # as if the writer died before its last step
    assert not st.is_complete(tmp_path)
    with pytest.raises(ValueError, match="incomplete.*re-run launch/precompute.py"):
        st.load_soft_targets(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        st.load_soft_targets(tmp_path / "nowhere")
    # A data file given as the store exists: it was reported as missing.
    (tmp_path / "train.jsonl").write_text('{"text": "a b", "label": "x"}\n')
    with pytest.raises(ValueError, match=r"train.jsonl is a file; a store is the directory launch/precompute.py"):
        st.load_soft_targets(tmp_path / "train.jsonl")
    (tmp_path / "part-00000.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="no .manifest.json"):
        st.load_soft_targets(tmp_path)


def test_failed_write_leaves_no_part_under_its_final_name(tmp_path):
    metadata = _metadata()

    def tables():
        yield _rows(3, metadata)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        st.write_soft_targets(tables(), tmp_path, metadata)
    assert not (tmp_path / st.MANIFEST_NAME).exists()
    assert not list(tmp_path.glob("part-*.parquet"))
    assert not list(tmp_path.glob(".*.tmp"))


def test_rewrite_removes_the_old_manifest_first(tmp_path):
    metadata = _metadata()
    st.write_soft_targets(_rows(4, metadata), tmp_path, metadata)

    def failing():
        yield _rows(2, metadata)
        raise RuntimeError("crash mid-rewrite")

    with pytest.raises(RuntimeError):
        st.write_soft_targets(failing(), tmp_path, metadata)
    assert not st.is_complete(tmp_path)


def test_a_rewrite_leaves_no_part_file_of_the_earlier_store(tmp_path):
    """A store rewritten with fewer rows (or more per file) kept the earlier write's later part files: the
    manifest left them out, but a directory reader (datasets, pyarrow.dataset) read their rows as well."""
    import pyarrow.dataset as ds

    metadata = _metadata()
    st.write_soft_targets(_rows(7, metadata, seed=1), tmp_path, metadata, rows_per_file=2)
    assert len(list(tmp_path.glob("part-*.parquet"))) == 4
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "part-0.parquet").write_bytes(b"another writer's part (pyarrow.dataset, Spark name theirs so)")
    rows = _rows(5, metadata, seed=2)
    st.write_soft_targets(rows, tmp_path, metadata, rows_per_file=3)
    names = ["part-0.parquet", "part-00000.parquet", "part-00001.parquet"]  # another writer's names are left
    assert sorted(p.name for p in tmp_path.glob("part-*.parquet")) == names and (tmp_path / "notes.txt").is_file()
    (tmp_path / "part-0.parquet").unlink()
    read = ds.dataset(str(tmp_path), format="parquet", exclude_invalid_files=True).to_table()
    assert read.column("example_id").to_pylist() == rows.column("example_id").to_pylist()


def test_label_order_and_task_checks(tmp_path):
    metadata = _metadata()
    st.write_soft_targets(_rows(3, metadata), tmp_path, metadata)
    with pytest.raises(ValueError, match="same labels in a different order"):
        st.load_soft_targets(tmp_path, expected_labels=["pos", "neu", "neg"])
    with pytest.raises(ValueError, match="a different label set"):
        st.load_soft_targets(tmp_path, expected_labels=["neg", "pos"])
    # Labels that differ in case alone were "a different label set", with nothing pointing at the case.
    stored = metadata.label_names
    with pytest.raises(ValueError, match=r"\(the same labels in another casing\)"):
        st.load_soft_targets(tmp_path, expected_labels=[label.upper() for label in stored])
    with pytest.raises(ValueError, match=r"\(the same labels in another casing and order\)"):
        st.load_soft_targets(tmp_path, expected_labels=[label.title() for label in reversed(stored)])
    with pytest.raises(ValueError, match="computed for task 'topic', not 'sst2'"):
        st.load_soft_targets(tmp_path, task="sst2")


def test_tampered_part_file_is_detected(tmp_path):
    metadata = _metadata()
    st.write_soft_targets(_rows(5, metadata), tmp_path, metadata)
    part = tmp_path / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 4), part)  # same metadata, a row lost
    with pytest.raises(ValueError, match="sha256"):
        st.load_soft_targets(tmp_path)
    with pytest.raises(ValueError, match="4 rows, manifest says 5"):
        st.load_soft_targets(tmp_path, verify_checksums=False)
    part.unlink()
    with pytest.raises(FileNotFoundError, match="part-00000.parquet"):
        st.load_soft_targets(tmp_path)


def test_rows_that_disagree_with_metadata_are_refused(tmp_path):
    metadata = _metadata()
    wrong_width = _rows(3, _metadata(label_names=["a", "b"]))
    with pytest.raises(ValueError, match="soft_probs lists have lengths 2..2, expected 3"):
        st.write_soft_targets(wrong_width, tmp_path, metadata)
    three_teachers = _rows(3, _metadata(teachers=[{"path": str(i), "sha256": "d"} for i in range(3)]))
    with pytest.raises(ValueError, match="2 x 3"):
        st.write_soft_targets(three_teachers, tmp_path, metadata)
    no_logits = _rows(3, _metadata(has_teacher_logits=False))
    with pytest.raises(ValueError, match="schema"):
        st.write_soft_targets(no_logits, tmp_path, metadata)
    # A class id past the labels (a store written elsewhere, 1-based) failed only in the hard loss, mid-run.
    rows = _rows(3, metadata)
    one_based = rows.set_column(4, "label", pa.array([1, 2, 3], pa.int64()))
    with pytest.raises(ValueError, match=r"rows to write: label holds class ids 1..3, expected 0..2 \(indices into "):
        st.write_soft_targets(one_based, tmp_path, metadata)
    with pytest.raises(ValueError, match=r"store X: label holds class ids -1..2"):
        st.check_rows(rows.set_column(4, "label", pa.array([-1, None, 2], pa.int64())), metadata, "store X")
    st.check_rows(rows.set_column(4, "label", pa.array([None, None, None], pa.int64())), metadata, "unlabelled")
    # A null text (a store written elsewhere) failed in the task stage's tokenizer, naming no file or row.
    for name in ("example_id", "text_a"):
        index = rows.schema.get_field_index(name)
        holes = rows.set_column(index, rows.schema.field(index), pa.array(["x", None, None], pa.string()))
        with pytest.raises(ValueError, match=rf"^store Z: {name} is missing \(null\) in 2 rows, the first row 1;"):
            st.check_rows(holes, metadata, "store Z")
    # NaN targets (fp16 teachers that overflowed) made every loss of the task NaN.
    probs = np.full((3, 3), 1 / 3, dtype=np.float32)
    probs[1, 2] = np.nan
    examples = pa.table({"example_id": ["a", "b", "c"], "text_a": ["a", "b", "c"],
                         "text_b": pa.array([None] * 3, pa.string()), "label": [0, 1, 2]})  # fmt: skip
    nan_rows = st.build_rows(examples, "topic", probs, None, "classification")
    with pytest.raises(ValueError, match="rows to write: soft_probs holds 1 NaN or infinite values"):
        st.write_soft_targets(nan_rows, tmp_path, _metadata(has_teacher_logits=False))
    # A null (a store written elsewhere) was counted as NaN or infinite, pointing at fp16 teachers.
    column = nan_rows.schema.get_field_index("soft_probs")
    for holes in ([[0.5, None, 0.5], [0.2, 0.3, 0.5], None], [None, [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]):
        nulls = nan_rows.set_column(
            column, nan_rows.schema.field(column), pa.array(holes, nan_rows.schema.field(column).type)
        )
        with pytest.raises(ValueError, match=r"store Y: soft_probs holds \d missing \(null\) rows or values"):
            st.check_rows(nulls, _metadata(has_teacher_logits=False), "store Y")


def test_soft_probs_that_are_not_probabilities_are_refused_on_write_and_read(tmp_path):
    """Logits written as soft_probs (a store made elsewhere) loaded, and the soft cross-entropy went below 0."""
    metadata = _metadata(has_teacher_logits=False)
    examples = pa.table({"example_id": ["a", "b", "c"], "text_a": ["a", "b", "c"],
                         "text_b": pa.array([None] * 3, pa.string()), "label": [0, 1, 2]})  # fmt: skip
    fine = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]], dtype=np.float32)
    st.check_rows(st.build_rows(examples, "topic", fine, None, "classification"), metadata, "fine")
    for bad, shown in (
        ([[-0.9, 0.2, 0.3]], "sum -0.4000"),  # logits
        ([[0.5, 0.4, 0.3]], "sum 1.2000"),
        ([[1.5, -0.2, -0.3]], "sum 1.0000"),  # sums to 1, negative values
    ):
        probs = fine.copy()
        probs[1] = bad[0]
        rows = st.build_rows(examples, "topic", probs, None, "classification")
        said = rf"rows to write: soft_probs of 1 of 3 rows are not probabilities \(row 1, example_id 'b': .*{shown}\)"
        with pytest.raises(ValueError, match=said):
            st.write_soft_targets(rows, tmp_path / "w", metadata)
    st.write_soft_targets(st.build_rows(examples, "topic", fine, None, "classification"), tmp_path / "s", metadata)
    part = tmp_path / "s" / "part-00000.parquet"
    table = pq.read_table(part)
    column = table.schema.get_field_index("soft_probs")
    logits = pa.array([[2.0, -1.0, 0.5]] * 3, table.schema.field(column).type)
    pq.write_table(table.set_column(column, table.schema.field(column), logits), part)
    with pytest.raises(ValueError, match="soft_probs of 3 of 3 rows are not probabilities"):
        st.load_soft_targets(tmp_path / "s", verify_checksums=False)
    regression = _metadata(task_type="regression", label_names=None, has_teacher_logits=False)
    values = np.array([[3.5], [-2.0], [0.0]], dtype=np.float32)  # a regression store holds predictions
    st.check_rows(st.build_rows(examples.set_column(3, "label", pa.array([1.0, 2.0, 3.0])), "topic", values, None,
                                "regression"), regression, "regression")  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"task_type": "ranking"}, "task_type"),
        ({"label_names": ["only"]}, ">= 2 label_names"),
        ({"task_type": "regression"}, "no label_names"),
        ({"teachers": []}, "at least one teacher"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_metadata_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        _metadata(**overrides)


def test_newer_format_version_is_refused():
    data = _metadata().to_dict() | {"version": st.FORMAT_VERSION + 1}
    with pytest.raises(ValueError, match="upgrade dist_kd"):
        st.StoreMetadata.from_dict(data, "somewhere")


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda m: m.pop("files"), "files must be a list of part files, got None"),
        (lambda m: m.pop("num_rows"), "num_rows must be a row count, got None"),
        (lambda m: m.pop("metadata"), r"metadata must be the store's metadata \(a mapping\), got None"),
        (lambda m: m["files"][0].pop("sha256"), r"files\[0\] must be \{name: part-NNNNN.parquet, num_rows: count"),
        (lambda m: m["files"][0].update(name="../x.parquet"), r"files\[0\] must be"),
        (lambda m: m["metadata"].update(temperature="2.0"), "metadata temperature must be a number, got '2.0'"),
        (lambda m: m["metadata"].update(label_names=None), "metadata label_names must be a list of names, got None"),
        (lambda m: m["metadata"].update(label_names=[0, 1, 2]), "metadata label_names must be names"),
        (lambda m: m["metadata"].update(version="1"), "metadata version must be an integer, got '1'"),
        (lambda m: m["metadata"].update(has_teacher_logits=1), "metadata has_teacher_logits must be true or false"),
    ],
)
def test_a_manifest_without_a_field_or_of_another_type_names_the_file_and_the_field(tmp_path, edit, said):
    """A hand-edited or foreign manifest failed with a bare KeyError or TypeError (exit 1, a traceback)."""
    metadata = _metadata()
    st.write_soft_targets(_rows(3, metadata), tmp_path, metadata)
    path = tmp_path / st.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{said}"):
        st.load_soft_targets(tmp_path)


def test_hidden_manifest_lets_datasets_read_the_store_and_legacy_stores_still_load(tmp_path):
    metadata = _metadata()
    rows = _rows(7, metadata)
    store = tmp_path / "store"
    st.write_soft_targets(rows, store, metadata, rows_per_file=3)
    assert sorted(p.name for p in store.iterdir()) == [".manifest.json", *(f"part-0000{i}.parquet" for i in range(3))]
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_dir=str(store), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded["example_id"] == rows.column("example_id").to_pylist()
    # a store written before the manifest became a dot file
    (store / ".manifest.json").rename(store / "_manifest.json")
    assert st.load_soft_targets(store).table.column("example_id").to_pylist() == loaded["example_id"]
    st.write_soft_targets(rows, store, metadata)  # rewriting it leaves one manifest, the new one
    assert not (store / "_manifest.json").exists() and (store / ".manifest.json").is_file()


def test_a_part_file_of_another_store_or_a_manifest_row_count_edited_is_refused(tmp_path):
    metadata, hotter = _metadata(), _metadata(temperature=4.0)
    st.write_soft_targets(_rows(5, metadata), tmp_path / "a", metadata)
    st.write_soft_targets(_rows(5, hotter), tmp_path / "b", hotter)
    (tmp_path / "a" / "part-00000.parquet").write_bytes((tmp_path / "b" / "part-00000.parquet").read_bytes())
    with pytest.raises(ValueError, match="carries other metadata"):
        st.load_soft_targets(tmp_path / "a", verify_checksums=False)  # the checksum check is off: metadata still
    st.write_soft_targets(_rows(5, metadata), tmp_path / "c", metadata)
    manifest = json.loads((tmp_path / "c" / st.MANIFEST_NAME).read_text())
    (tmp_path / "c" / st.MANIFEST_NAME).write_text(json.dumps(manifest | {"num_rows": 6}))
    with pytest.raises(ValueError, match="5 rows, manifest says 6"):
        st.load_soft_targets(tmp_path / "c")


def test_non_finite_teacher_logits_or_regression_labels_are_refused_naming_the_row(tmp_path):
    """A store made elsewhere with a NaN teacher logit loaded; its targets recomputed at another temperature
    were NaN and the task run ended as "the student diverged". A NaN regression label counted as a label."""
    metadata = _metadata()
    rows = _rows(6, metadata)
    logits = rows.column("teacher_logits").to_pylist()
    logits[2][0][1], logits[4][1][0] = float("nan"), float("inf")
    column = rows.schema.get_field_index("teacher_logits")
    bad = rows.set_column(column, rows.schema.field(column), pa.array(logits, rows.schema.field(column).type))
    with pytest.raises(
        ValueError, match=r"^rows to write: teacher_logits is NaN or infinite in 2 rows, the first row 2"
    ):
        st.write_soft_targets(bad, tmp_path / "w", metadata)
    st.write_soft_targets(rows, tmp_path / "r", metadata)  # the same rows put in place of a written part
    part = tmp_path / "r" / "part-00000.parquet"
    pq.write_table(bad.replace_schema_metadata(pq.read_table(part).schema.metadata), part)
    with pytest.raises(ValueError, match=r"part-00000.parquet: teacher_logits is NaN or infinite in 2 rows"):
        st.load_soft_targets(tmp_path / "r", verify_checksums=False)

    regression = _metadata(task_type="regression", label_names=[], has_teacher_logits=False)
    examples = pa.table({"example_id": ["a", "b", "c"], "text_a": ["a", "b", "c"],
                         "text_b": pa.array([None] * 3, pa.string()), "label": [0.5, None, float("nan")]})  # fmt: skip
    targets = np.full((3, 1), 0.5, dtype=np.float32)
    with pytest.raises(ValueError, match=r"label is NaN or infinite in 1 row, the first row 2 \(nan\); expected a "):
        st.write_soft_targets(st.build_rows(examples, "topic", targets, None, "regression"), tmp_path / "g", regression)
    fine = examples.set_column(3, "label", pa.array([0.5, None, -2.0]))  # a null is an unlabelled row
    st.write_soft_targets(st.build_rows(fine, "topic", targets, None, "regression"), tmp_path / "g", regression)


def test_metadata_errors_name_the_manifest_read(tmp_path):
    """Metadata a manifest holds that its checks refuse was said as "store metadata: ...", naming no store
    (a run with several stores), and a legacy store's errors named .manifest.json, which it lacks."""
    metadata = _metadata()
    st.write_soft_targets(_rows(3, metadata), tmp_path, metadata)
    path = tmp_path / st.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["metadata"]["temperature"] = 0
    path.write_text(json.dumps(manifest))
    said = "soft-target metadata temperature must be a number > 0, got 0"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {said}"):
        st.load_soft_targets(tmp_path)
    legacy = path.rename(tmp_path / st.LEGACY_MANIFEST_NAME)
    for read in (st.load_soft_targets, st.read_store_metadata):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(legacy))}: {said}"):
            read(tmp_path)
    manifest["metadata"]["temperature"] = 2.0
    legacy.write_text(json.dumps(manifest))
    (tmp_path / "part-00000.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"part file part-00000.parquet listed in _manifest.json is missing"):
        st.load_soft_targets(tmp_path)


@pytest.mark.parametrize("columns", [None, ["text_a", "text_b"]])
def test_a_part_without_a_column_is_named_before_the_parts_are_joined(tmp_path, columns):
    """A part file that lost a column failed in pyarrow ("Schema at index 1 was different", or "No match for
    FieldRef.Name(text_b)" when reading some columns, as precompute --reuse does), naming no store or file."""
    metadata = _metadata()
    st.write_soft_targets(_rows(6, metadata), tmp_path, metadata, rows_per_file=3)
    part = tmp_path / "part-00001.parquet"
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(["text_b"]).replace_schema_metadata(table.schema.metadata), part)
    with pytest.raises(ValueError, match=r"^soft-target store .*: part-00001.parquet has no column text_b; a part "):
        st.load_soft_targets(tmp_path, columns=columns, verify_checksums=False)
