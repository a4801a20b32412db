"""The soft-target store: ensemble teacher outputs on task data, in Parquet (the contract in docs/contracts.md).

Layout of a store directory::

    DIR/part-00000.parquet ...   rows in the input's order, split every ``rows_per_file`` rows
    DIR/.manifest.json           written last: {format, version, num_rows, files: [{name, num_rows, sha256}],
                                 metadata}

The manifest is a dot file so that readers of a directory of Parquet files (``datasets.load_dataset(
"parquet", data_dir=DIR)``, which skips hidden files) see only the parts. Stores written before this were
named ``_manifest.json``; they are still read.

Columns: ``example_id`` (string), ``task`` (string), ``text_a`` (string), ``text_b`` (string, null for
single texts), ``label`` (int64 class index / float64 for regression; null for augmented rows),
``soft_probs`` (list<float32>, length C: the mean of the K teachers' softmaxes at temperature t; for
regression C = 1 and the value is the mean prediction), optional ``teacher_logits`` (list<list<float32>>,
K x C, raw logits in the order of ``metadata.teachers``). Every part file carries the same JSON under the
Parquet key-value metadata key ``dist_kd`` (see :class:`StoreMetadata`), so a single file stays
self-describing when copied out of its directory.

Why a manifest written last: the part files are each written atomically, but a store is several files.
A reader that finds no manifest knows the writer did not finish, and refuses, instead of training on the
first half of the data. The manifest also pins each file's row count and sha256.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dist_kd.data.tasks import TASK_TYPES, label_order_check
from dist_kd.io import atomic_path, encode_parquet_metadata, read_parquet_metadata, sha256_file, write_json_atomic

FORMAT = "dist_kd.soft_targets"
FORMAT_VERSION = 1
MANIFEST_NAME = ".manifest.json"
LEGACY_MANIFEST_NAME = "_manifest.json"  # stores written by earlier versions
PART_PATTERN = "part-{index:05d}.parquet"
PART_NAME = re.compile(r"^part-\d{5,}\.parquet$")  # PART_PATTERN's names, and no other (a user's part-0.parquet)
DEFAULT_ROWS_PER_FILE = 1_000_000
TEXT_COLUMNS = ("example_id", "task", "text_a", "text_b", "label")


@dataclasses.dataclass(frozen=True)
class StoreMetadata:
    """What produced a store; stored as JSON in every part file and in the manifest.

    Attributes:
        task: task name (every row's ``task``).
        task_type: ``classification`` or ``regression``.
        label_names: class names in index order (the order of ``soft_probs``); empty for regression.
        temperature: t of the teachers' softmaxes.
        teachers: ``[{"path": str, "sha256": str}]``, one per teacher, in ``teacher_logits`` order.
        source_data: ``{"path": str, "sha256": str}`` of the task data the rows came from.
        has_teacher_logits: whether the ``teacher_logits`` column is present.
        version: store format version.
        extra: producer details that do not define the format (max_length, dtype, tokenizer, ...).
    """

    task: str
    task_type: str
    label_names: list[str]
    temperature: float
    teachers: list[dict[str, str]]
    source_data: dict[str, Any]
    has_teacher_logits: bool = False
    version: int = FORMAT_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"store metadata: task_type must be one of {list(TASK_TYPES)}, got {self.task_type!r}")
        if self.task_type == "classification" and len(self.label_names) < 2:
            raise ValueError(f"store metadata: a classification store needs >= 2 label_names, got {self.label_names}")
        if self.task_type == "regression" and self.label_names:
            raise ValueError(f"store metadata: a regression store has no label_names, got {self.label_names}")
        if not self.teachers:
            raise ValueError("store metadata: teachers must list at least one teacher")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"store metadata: temperature must be a number > 0, got {self.temperature}")

    @property
    def num_classes(self) -> int:
        """C, the length of ``soft_probs``: the number of labels, or 1 for regression."""
        return len(self.label_names) if self.task_type == "classification" else 1

    @property
    def num_teachers(self) -> int:
        """K, the number of teachers averaged."""
        return len(self.teachers)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> StoreMetadata:
        """Parse metadata read from ``where`` (named in errors)."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(name for name in ("task", "task_type", "label_names", "temperature", "teachers",
                                           "source_data") if name not in data)  # fmt: skip
        if unknown or missing:
            raise ValueError(f"{where}: soft-target metadata has unknown keys {unknown} / lacks keys {missing}")
        kinds = {"task": (str, "a string"), "task_type": (str, "a string"), "label_names": (list, "a list of names"),
                 "temperature": ((int, float), "a number"), "teachers": (list, "a list of {path, sha256}"),
                 "source_data": (dict, "a mapping"), "has_teacher_logits": (bool, "true or false"),
                 "version": (int, "an integer"), "extra": (dict, "a mapping")}  # fmt: skip
        for name, (kind, said) in kinds.items():
            value = data.get(name)
            if name in data and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
                raise ValueError(f"{where}: soft-target metadata {name} must be {said}, got {value!r}")
        if not all(isinstance(name, str) for name in data["label_names"]):
            raise ValueError(f"{where}: soft-target metadata label_names must be names, got {data['label_names']!r}")
        if not all(isinstance(teacher, dict) for teacher in data["teachers"]):
            raise ValueError(f"{where}: soft-target metadata teachers must be {{path, sha256}} mappings")
        if data.get("version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"{where}: store format version {data['version']} is newer than this dist_kd reads "
                f"({FORMAT_VERSION}); upgrade dist_kd"
            )
        try:
            return cls(**data)
        except ValueError as err:  # named "store metadata" alone: which of a run's stores was not said
            raise ValueError(f"{where}: {str(err).replace('store metadata: ', 'soft-target metadata ', 1)}") from None


@dataclasses.dataclass(frozen=True)
class SoftTargets:
    """A loaded store: the rows and what produced them.

    Attributes:
        table: the columns of the module docstring, rows in the store's (input) order.
        metadata: the store's :class:`StoreMetadata`.
        directory: where it was read from.
    """

    table: pa.Table
    metadata: StoreMetadata
    directory: Path

    @property
    def num_rows(self) -> int:
        """Number of examples."""
        return self.table.num_rows

    def soft_probs(self) -> np.ndarray:
        """``(N, C)`` float32 soft targets (the ensemble mean prediction ``(N, 1)`` for regression)."""
        return _list_column_array(self.table.column("soft_probs"), (self.metadata.num_classes,))

    def teacher_logits(self) -> np.ndarray | None:
        """``(N, K, C)`` float32 per-teacher logits, or None when the store was written without them."""
        if "teacher_logits" not in self.table.column_names:
            return None
        shape = (self.metadata.num_teachers, self.metadata.num_classes)
        return _list_column_array(self.table.column("teacher_logits"), shape)


def soft_target_schema(task_type: str, keep_teacher_logits: bool = False) -> pa.Schema:
    """Arrow schema of a store: int64 labels for classification, float64 for regression."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {list(TASK_TYPES)}, got {task_type!r}")
    fields = [
        ("example_id", pa.string()),
        ("task", pa.string()),
        ("text_a", pa.string()),
        ("text_b", pa.string()),
        ("label", pa.int64() if task_type == "classification" else pa.float64()),
        ("soft_probs", pa.list_(pa.float32())),
    ]
    if keep_teacher_logits:
        fields.append(("teacher_logits", pa.list_(pa.list_(pa.float32()))))
    return pa.schema(fields)


def build_rows(
    examples: pa.Table,
    task: str,
    soft_probs_NC: np.ndarray,
    teacher_logits_NKC: np.ndarray | None,
    task_type: str,
) -> pa.Table:
    """Assemble store rows from task examples and teacher outputs.

    Args:
        examples: ``example_id``, ``text_a``, ``text_b``, ``label`` (the shape of ``load_task_examples``).
        task: task name written to every row.
        soft_probs_NC: ``(N, C)`` ensemble probabilities (or ``(N, 1)`` mean predictions).
        teacher_logits_NKC: ``(N, K, C)`` logits, or None to leave the column out.
        task_type: ``classification`` or ``regression``.

    Returns:
        A table with :func:`soft_target_schema`.
    """
    num_rows = examples.num_rows
    if soft_probs_NC.ndim != 2 or soft_probs_NC.shape[0] != num_rows:
        raise ValueError(f"soft_probs has shape {soft_probs_NC.shape}, expected ({num_rows}, C)")
    schema = soft_target_schema(task_type, teacher_logits_NKC is not None)
    probs = np.ascontiguousarray(soft_probs_NC, dtype=np.float32)
    columns = {
        "example_id": examples.column("example_id"),
        "task": pa.array([task] * num_rows, pa.string()),
        "text_a": examples.column("text_a"),
        "text_b": examples.column("text_b"),
        "label": examples.column("label").cast(schema.field("label").type),
        "soft_probs": _fixed_lists(probs.reshape(-1), probs.shape[1], num_rows),
    }
    if teacher_logits_NKC is not None:
        if teacher_logits_NKC.ndim != 3 or teacher_logits_NKC.shape[0] != num_rows:
            raise ValueError(f"teacher_logits has shape {teacher_logits_NKC.shape}, expected ({num_rows}, K, C)")
        logits = np.ascontiguousarray(teacher_logits_NKC, dtype=np.float32)
        _, num_teachers, num_classes = logits.shape
        inner = _fixed_lists(logits.reshape(-1), num_classes, num_rows * num_teachers)
        columns["teacher_logits"] = pa.ListArray.from_arrays(
            pa.array(np.arange(num_rows + 1, dtype=np.int32) * num_teachers), inner
        )
    return pa.table(columns, schema=schema)


def _fixed_lists(flat: np.ndarray, width: int, num_lists: int) -> pa.ListArray:
    offsets = pa.array(np.arange(num_lists + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(flat, pa.float32()))


def _list_column_array(column: pa.ChunkedArray, inner_shape: tuple[int, ...]) -> np.ndarray:
    """A (nested) list column of equal-length lists as a dense float32 array ``(N, *inner_shape)``."""
    values = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    for _ in inner_shape:
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    expected = len(column) * int(np.prod(inner_shape))
    if flat.size != expected:
        raise ValueError(f"list column has {flat.size} values, expected {len(column)} x {inner_shape}")
    return flat.reshape(len(column), *inner_shape)


def write_soft_targets(
    tables: Iterable[pa.Table] | pa.Table,
    directory: str | Path,
    metadata: StoreMetadata,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> Path:
    """Write a store: part files (each atomically), then the manifest, last.

    Tables are streamed, so a store larger than memory can be written from chunks; each incoming table
    becomes one or more row groups, in order. An existing manifest in ``directory`` is removed first, so a
    store being rewritten is never mistaken for a complete one.

    Args:
        tables: one table or an iterable of tables with :func:`soft_target_schema`, in output order.
        directory: the store directory (created if missing).
        metadata: what produced the rows.
        rows_per_file: rows per part file before starting the next.

    Returns:
        The manifest's path.

    Raises:
        ValueError: a table whose schema or list lengths do not match ``metadata``.
    """
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be >= 1, got {rows_per_file}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_NAME).unlink(missing_ok=True)
    (directory / LEGACY_MANIFEST_NAME).unlink(missing_ok=True)
    schema = soft_target_schema(metadata.task_type, metadata.has_teacher_logits)
    schema = schema.with_metadata(encode_parquet_metadata(metadata.to_dict()))
    files: list[dict[str, Any]] = []
    writer = _PartWriter(directory, schema, rows_per_file, files)
    try:
        for table in [tables] if isinstance(tables, pa.Table) else tables:
            check_rows(table, metadata, where="rows to write")
            writer.write(table.replace_schema_metadata(schema.metadata))
        writer.close()
    finally:
        writer.abort()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "num_rows": sum(entry["num_rows"] for entry in files),
        "files": files,
        "metadata": metadata.to_dict(),
    }
    path = directory / MANIFEST_NAME
    write_json_atomic(path, manifest)
    # Part files of an earlier write that this one did not replace (more rows then, or fewer per file): the
    # manifest never lists them, but a reader of the directory (datasets, pyarrow.dataset) took their rows too.
    listed = {entry["name"] for entry in files}
    for stale in directory.glob("part-*.parquet"):
        if PART_NAME.match(stale.name) and stale.name not in listed:
            stale.unlink(missing_ok=True)
    return path


def store_strangers(directory: Path) -> list[str]:
    """The names in ``directory`` that a soft-target store does not have, leaving out hidden ones (``.`` or
    ``_`` first: a store's manifest, a precompute's ``_chunks`` and lock, temporary files, a ``.DS_Store``),
    which Parquet readers of the directory (pyarrow.dataset, datasets) skip too."""
    return sorted(path.name for path in directory.iterdir()
                  if not path.name.startswith((".", "_")) and not PART_NAME.match(path.name))  # fmt: skip


class _PartWriter:
    """Rolls part files every ``rows_per_file`` rows; each file is a temp file renamed when closed."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_file: int, files: list[dict[str, Any]]):
        self.directory, self.schema, self.rows_per_file, self.files = directory, schema, rows_per_file, files
        self.context = None
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def _open(self) -> None:
        name = PART_PATTERN.format(index=len(self.files))
        self.context = atomic_path(self.directory / name)
        tmp = self.context.__enter__()
        self.writer = pq.ParquetWriter(tmp, self.schema)
        self.files.append({"name": name, "num_rows": 0, "sha256": None})
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        offset = 0
        while offset < table.num_rows:
            if self.writer is None:
                self._open()
            take = min(self.rows_per_file - self.rows, table.num_rows - offset)
            self.writer.write_table(table.slice(offset, take))
            offset += take
            self.rows += take
            if self.rows == self.rows_per_file:
                self._finish()

    def _finish(self) -> None:
        self.writer.close()
        self.writer = None
        self.context.__exit__(None, None, None)
        self.context = None
        entry = self.files[-1]
        entry["num_rows"] = self.rows
        entry["sha256"] = sha256_file(self.directory / entry["name"])

    def close(self) -> None:
        if self.writer is None and not self.files:
            self._open()  # an empty store still has one (empty) part file with the schema
        if self.writer is not None:
            self._finish()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.context is not None:
            # Leaves the final name untouched: the temp file is deleted, nothing is renamed.
            self.context.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self.context = None


def check_rows(table: pa.Table, metadata: StoreMetadata, where: str) -> None:
    """Raise unless ``table`` has the store schema and lists of length C (and K x C) for ``metadata``."""
    _check_schema(table, soft_target_schema(metadata.task_type, metadata.has_teacher_logits), where)
    if table.num_rows == 0:
        return
    import pyarrow.compute as pc

    for name in ("example_id", "task", "text_a"):  # text_b may be null (single texts), label too (unlabelled rows)
        column = table.column(name)
        if column.null_count:
            first = pc.index(pc.is_null(column), True).as_py()
            raise ValueError(
                f"{where}: {name} is missing (null) in {column.null_count} row{'s' if column.null_count > 1 else ''}, "
                f"the first row {first}; every row needs a {name}"
            )
    missing = table.column("soft_probs").null_count + pc.list_flatten(table.column("soft_probs")).null_count
    if missing:
        raise ValueError(f"{where}: soft_probs holds {missing} missing (null) rows or values; every row needs "
                         f"{metadata.num_classes} probabilities")  # fmt: skip
    lengths = pc.list_value_length(table.column("soft_probs"))
    if pc.min(lengths).as_py() != metadata.num_classes or pc.max(lengths).as_py() != metadata.num_classes:
        raise ValueError(
            f"{where}: soft_probs lists have lengths {pc.min(lengths).as_py()}..{pc.max(lengths).as_py()}, "
            f"expected {metadata.num_classes} (labels {metadata.label_names or ['<regression>']})"
        )
    probs = pc.list_flatten(table.column("soft_probs"))
    not_finite = len(probs) - pc.sum(pc.is_finite(probs)).as_py() if len(probs) else 0
    if not_finite:
        raise ValueError(
            f"{where}: soft_probs holds {not_finite} NaN or infinite values (teachers that overflowed in fp16? "
            "run launch/precompute.py with --dtype bf16 or fp32)"
        )
    if metadata.task_type == "classification":
        _check_probabilities(probs.to_numpy(zero_copy_only=False).reshape(-1, metadata.num_classes), table, where)
        low, high = pc.min(table.column("label")).as_py(), pc.max(table.column("label")).as_py()
        if low is not None and (low < 0 or high >= metadata.num_classes):
            raise ValueError(
                f"{where}: label holds class ids {low}..{high}, expected 0..{metadata.num_classes - 1} (indices into "
                f"label_names {metadata.label_names}) or null"
            )
    else:  # a NaN target counted as a label: the hard loss of its batches was NaN
        _check_finite(table.column("label"), 1, where, "label", "a regression target, or null where unlabelled")
    if metadata.has_teacher_logits:
        outer = pc.list_value_length(table.column("teacher_logits"))
        inner = pc.list_value_length(pc.list_flatten(table.column("teacher_logits")))
        bounds = (pc.min(outer).as_py(), pc.max(outer).as_py(), pc.min(inner).as_py(), pc.max(inner).as_py())
        want = (metadata.num_teachers,) * 2 + (metadata.num_classes,) * 2
        if bounds != want:
            raise ValueError(
                f"{where}: teacher_logits must be {metadata.num_teachers} x {metadata.num_classes} (K x C) per row, "
                f"found {bounds[0]}..{bounds[1]} x {bounds[2]}..{bounds[3]}"
            )
        # The targets at another temperature are recomputed from them (a NaN one made the student diverge).
        logits = pc.list_flatten(pc.list_flatten(table.column("teacher_logits")))
        _check_finite(logits, metadata.num_teachers * metadata.num_classes, where, "teacher_logits",
                      "finite raw logits")  # fmt: skip


def _check_schema(table: pa.Table, expected: pa.Schema, where: str) -> None:
    found = table.schema.remove_metadata()
    if not found.equals(expected):
        raise ValueError(f"{where}: schema\n{found}\ndiffers from the soft-target schema\n{expected}")


def _check_finite(values: pa.Array | pa.ChunkedArray, per_row: int, where: str, name: str, expected: str) -> None:
    """Raise naming the first row of ``values`` (``per_row`` values a row, nulls allowed) that is not finite."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    array = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)  # nulls come as NaN
    bad = ~np.isfinite(array)
    if values.null_count:
        bad &= ~values.is_null().to_numpy(zero_copy_only=False)
    if bad.any():
        rows = np.unique(np.flatnonzero(bad) // per_row)
        raise ValueError(
            f"{where}: {name} is NaN or infinite in {len(rows)} row{'s' if len(rows) > 1 else ''}, the first row "
            f"{int(rows[0])} ({array[np.flatnonzero(bad)[0]]}); expected {expected}"
        )


PROBABILITY_SUM_TOLERANCE = 1e-3  # a mean of float32 softmaxes sums to 1 within about 1e-6


def _check_probabilities(probs: np.ndarray, table: pa.Table, where: str) -> None:
    """Raise unless every row of ``probs`` is a distribution: values in [0, 1], summing to 1."""
    sums = probs.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero((np.abs(sums - 1.0) > PROBABILITY_SUM_TOLERANCE) | (probs < 0).any(axis=1))
    if len(bad):
        row = int(bad[0])
        ids = table.column("example_id")
        raise ValueError(
            f"{where}: soft_probs of {len(bad)} of {len(probs)} rows are not probabilities (row {row}, example_id "
            f"{ids[row].as_py()!r}: {np.round(probs[row], 4).tolist()}, sum {sums[row]:.4f}): a classification "
            "store holds the mean of the teachers' softmaxes, each row summing to 1 (logits belong in teacher_logits)"
        )


def manifest_path(directory: Path) -> Path:
    """The manifest a reader reads: ``.manifest.json``, or an earlier version's ``_manifest.json`` alone."""
    if not (directory / MANIFEST_NAME).is_file() and (directory / LEGACY_MANIFEST_NAME).is_file():
        return directory / LEGACY_MANIFEST_NAME
    return directory / MANIFEST_NAME


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a complete store.

    Raises:
        FileNotFoundError: ``directory`` does not exist, or holds nothing of a store.
        ValueError: the store is incomplete (part files but no manifest: an interrupted write) or the
            manifest is not a soft-target manifest.
    """
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(
            f"soft-target store {directory} is a file; a store is the directory launch/precompute.py wrote "
            "(--output), with part-*.parquet and .manifest.json"
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"soft-target store {directory} does not exist (expected a directory)")
    path = manifest_path(directory)
    if not path.is_file():
        if any(directory.glob("part-*.parquet")) or (directory / "_chunks").is_dir():
            raise ValueError(
                f"soft-target store {directory} is incomplete: it has part files or precompute chunks but no "
                f"{MANIFEST_NAME} (the writer did not finish); re-run launch/precompute.py with the same "
                "arguments to resume it"
            )
        raise FileNotFoundError(f"soft-target store {directory} has no {MANIFEST_NAME}; is it a soft-target store?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise ValueError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """Raise, naming ``path`` and the field, unless ``manifest`` has the fields a reader uses, of their types."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not count(manifest.get("num_rows")):
        raise ValueError(f"{path}: num_rows must be a row count, got {manifest.get('num_rows')!r}")
    if not isinstance(manifest.get("metadata"), dict):
        raise ValueError(f"{path}: metadata must be the store's metadata (a mapping), got {manifest.get('metadata')!r}")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise ValueError(f"{path}: files must be a list of part files, got {files!r}")
    for index, entry in enumerate(files):
        fine = isinstance(entry, dict) and isinstance(entry.get("name"), str) and PART_NAME.match(entry["name"])
        if not (fine and count(entry.get("num_rows")) and isinstance(entry.get("sha256"), str)):
            raise ValueError(
                f"{path}: files[{index}] must be {{name: part-NNNNN.parquet, num_rows: count, sha256: hex}}, "
                f"got {entry!r}"
            )


def read_store_metadata(directory: str | Path) -> StoreMetadata:
    """The metadata of a complete store, from its manifest only (cheap: no Parquet file is opened)."""
    manifest = read_manifest(directory)
    return StoreMetadata.from_dict(manifest["metadata"], str(manifest_path(Path(directory))))


def is_complete(directory: str | Path) -> bool:
    """True when ``directory`` holds a store whose manifest was written (the writer finished)."""
    try:
        read_manifest(directory)
    except (FileNotFoundError, ValueError):
        return False
    return True


def load_soft_targets(
    directory: str | Path,
    expected_labels: Sequence[str] | None = None,
    task: str | None = None,
    *,
    columns: Sequence[str] | None = None,
    verify_checksums: bool = True,
) -> SoftTargets:
    """Read and validate a soft-target store (what task distillation trains on).

    Typical use in a task stage::

        targets = load_soft_targets(task.soft_targets, expected_labels=spec.labels, task=spec.name)
        probs_NC = targets.soft_probs()          # float32 (N, C), column c = spec.labels[c]
        texts = targets.table.column("text_a")   # rows in the store's order

    Args:
        directory: the store directory (``--output`` of ``launch/precompute.py``).
        expected_labels: the task's label order; checked with :func:`label_order_check` so that a store
            whose columns mean other classes is an error (None skips the check).
        task: the task name the store must have been computed for (None skips the check).
        columns: read only these columns (``soft_probs`` and ``example_id`` are always read).
        verify_checksums: compare each part file's sha256 with the manifest (reads the bytes once more).

    Returns:
        :class:`SoftTargets` with the table (rows in input order, part files concatenated) and metadata.

    Raises:
        FileNotFoundError: no store at ``directory``, or a part file the manifest lists is missing.
        ValueError: an incomplete store (no manifest), a checksum / row count / metadata mismatch between
            the manifest and a part file, a label order or task that differs from the expected one, or rows
            whose schema or list lengths disagree with the metadata.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    manifest_name = manifest_path(directory).name
    metadata = StoreMetadata.from_dict(manifest["metadata"], str(directory / manifest_name))
    where = f"soft-target store {directory}"
    if task is not None and metadata.task != task:
        raise ValueError(f"{where} was computed for task '{metadata.task}', not '{task}'")
    if expected_labels is not None:
        if metadata.task_type == "regression":
            if list(expected_labels):
                raise ValueError(f"{where} holds a regression task, but labels {list(expected_labels)} were expected")
        else:
            label_order_check(expected_labels, metadata.label_names, f"{where} (metadata label_names)", task)
    if columns is not None:  # pyarrow's own error named neither the store nor what it holds
        held = soft_target_schema(metadata.task_type, metadata.has_teacher_logits).names
        absent = [name for name in columns if name not in held]
        if absent:
            hint = " (teacher_logits are kept only by a precompute run with --keep-teacher-logits)" if (
                "teacher_logits" in absent) else ""  # fmt: skip
            raise ValueError(f"{where} has no column {', '.join(absent)}; its columns: {held}{hint}")
    schema = soft_target_schema(metadata.task_type, metadata.has_teacher_logits)
    wanted = schema.names if columns is None else list(dict.fromkeys(["example_id", *columns, "soft_probs"]))
    tables = []
    for entry in manifest["files"]:
        path = directory / entry["name"]
        if not path.is_file():
            raise FileNotFoundError(f"{where}: part file {entry['name']} listed in {manifest_name} is missing")
        if verify_checksums and sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{where}: {entry['name']} has another sha256 than {manifest_name} records (modified?)")
        if read_parquet_metadata(path) != manifest["metadata"]:
            raise ValueError(f"{where}: {entry['name']} carries other metadata than {manifest_name}")
        # Each part's columns are checked before the parts are joined (pyarrow's errors named no file).
        held = pq.read_schema(path).names
        absent = [name for name in wanted if name not in held]
        if absent:
            raise ValueError(f"{where}: {entry['name']} has no column {', '.join(absent)}; a part of this store holds "
                             f"{schema.names}")  # fmt: skip
        table = pq.read_table(path, columns=wanted if columns is not None else None)
        if table.num_rows != entry["num_rows"]:
            raise ValueError(f"{where}: {entry['name']} has {table.num_rows} rows, manifest says {entry['num_rows']}")
        if columns is None:
            check_rows(table, metadata, f"{where}: {entry['name']}")
        else:
            _check_schema(table, pa.schema([schema.field(name) for name in wanted]), f"{where}: {entry['name']}")
        tables.append(table)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    if table.num_rows != manifest["num_rows"]:
        raise ValueError(f"{where}: {table.num_rows} rows, manifest says {manifest['num_rows']}")
    return SoftTargets(table=table.replace_schema_metadata(None), metadata=metadata, directory=directory)
