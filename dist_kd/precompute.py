"""Precompute: run K frozen fine-tuned teachers once over task data and write the soft-target store.

MT-DNN-KD trains the student on ``Q = mean_k softmax(z_k / t)``. Task distillation iterates many epochs
over (augmented) data, so the ensemble runs here, once, and the task stage loads no teacher at all.

Design:

- **Checks first, weights last.** Each teacher's label names (``config.id2label``) are matched to the task's
  (another order is read by name: :func:`dist_kd.data.tasks.head_label_order`) and the tokenizer fingerprints
  compared across teachers before any weights load: averaging softmaxes whose columns mean different classes,
  or that saw different token ids, would be silently wrong.
- **Chunks are the unit of work and of resume.** Examples ``[c * chunk_size, (c + 1) * chunk_size)`` form
  chunk ``c``, whatever the world size. Chunks not yet on disk are dealt to ranks round-robin; each is
  written atomically to ``OUTPUT/_chunks/chunk-NNNNNN.parquet`` tagged with the run's key. A restart (any
  world size) reuses every chunk with the same key; ``_chunks/run.json`` records the parameters of the first
  start, and a restart with other teachers / temperature / data is an error rather than a mixed store.
- **Length buckets.** Within a chunk, rows are sorted by token length and batched, so a batch pads to
  about its own length; outputs are scattered back to input order. Batches depend only on the chunk, so the
  numbers are identical whichever rank (or how many ranks) computed them.
- **Reuse earlier stores.** ``reuse`` names stores computed by the same teachers with the same parameters
  (for instance the original rows' store, when the augmented set holds those rows again): a row whose texts
  are found there takes its targets from it, and the teachers run on the other rows only. A chunk made
  entirely of such rows loads no teacher.
- **Merge last.** When every chunk exists, rank 0 streams them, in order, into the store
  (:mod:`dist_kd.data.soft_targets`), whose manifest is written last; then ``_chunks`` is removed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dist_kd import distributed
from dist_kd.config import doc, paths_as_text
from dist_kd.data import soft_targets as store
from dist_kd.data.encode import TokenizedRows, pad_id_of, tokenize_rows, uses_token_types
from dist_kd.data.tasks import (
    MissingColumnError,
    TaskSpec,
    check_task_spec,
    head_label_order,
    label_order_check,
    load_task_examples,
)
from dist_kd.io import (
    check_output_dir,
    check_output_outside_data,
    listed,
    read_parquet_metadata,
    sha256_file,
    weights_sha256,
    within,
    write_json_atomic,
    write_parquet_atomic,
)
from dist_kd.models.teacher import DTYPES, check_max_length, check_model_dir
from dist_kd.predict import batched_logits, check_classifier, read_task_record, teacher_label_names
from dist_kd.train.common import check_run_lock
from dist_kd.train.runlock import locked_run_dir

logger = logging.getLogger(__name__)

CHUNKS_DIR = "_chunks"
RUN_RECORD = "run.json"
# A directory of the augmentation stage (launch/augment.py) holds its rows in this file.
AUGMENTED_FILE = "augmented.parquet"


@dataclasses.dataclass
class PrecomputeConfig:
    """Teachers and how to run them."""

    teachers: list[str] = doc("HF *ForSequenceClassification directories of the K fine-tuned teachers", None)
    temperature: float = doc("t of each teacher's softmax (ignored for regression: the mean prediction)", 1.0)
    keep_teacher_logits: bool = doc("also store each teacher's raw logits (K x C per row)", False)
    batch_size: int = doc("sequences per teacher forward pass", 64)
    max_length: int = doc("truncate tokenised inputs to this many pieces", 128)
    dtype: str = doc("teacher precision: fp16 | bf16 | fp32 (fp16 runs as fp32 on a CPU)", "fp16")
    chunk_size: int = doc("examples per resumable chunk file", 4096)
    rows_per_file: int = doc("rows per part file of the final store", store.DEFAULT_ROWS_PER_FILE)
    reuse: list[str] = doc(
        "earlier stores of the same teachers and parameters: rows with the same texts take their targets from "
        "there, the teachers run on the rest", default_factory=list,
    )  # fmt: skip

    def __post_init__(self) -> None:
        paths_as_text(self)
        if not self.teachers:
            raise ValueError("teachers: give at least one teacher directory (--teachers DIR1 DIR2 ...)")
        self.teachers = [str(path) for path in self.teachers]
        self.reuse = [str(path) for path in self.reuse or []]
        # Resolved: "t1", "t1/" and "./t1" are one teacher, which would silently count twice in the ensemble.
        first_of: dict[Path, str] = {}
        for path in self.teachers:
            resolved = Path(path).resolve()
            if resolved in first_of:
                raise ValueError(
                    f"teachers: {first_of[resolved]!r} and {path!r} are the same directory; list each teacher once "
                    f"(got {self.teachers})"
                )
            first_of[resolved] = path
        if not (math.isfinite(self.temperature) and self.temperature > 0):  # nan passed "<= 0"; inf gave uniform rows
            raise ValueError(f"temperature (--temperature) must be a number > 0, got {self.temperature}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        for name in ("batch_size", "max_length", "chunk_size", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class EnsembleCheck:
    """What the teachers agree on (the result of :func:`check_teachers`).

    Attributes:
        label_names: the store's classes (the task's labels; empty for regression).
        tokenizer: the shared tokenizer's fingerprint.
        label_orders: per teacher, its output columns in the task's order (:func:`head_label_order`; empty
            for regression).
    """

    label_names: list[str]
    tokenizer: dict[str, Any]
    label_orders: list[list[int]] = dataclasses.field(default_factory=list)

    @property
    def reordered(self) -> bool:
        """Whether some teacher names the task's classes in another order than the task's."""
        return any(order != sorted(order) for order in self.label_orders)


@dataclasses.dataclass(frozen=True)
class PrecomputeResult:
    """What one rank did.

    Attributes:
        directory: the store directory.
        num_rows: rows in the store.
        computed_examples: examples this rank ran through the teachers (0 when everything was reused).
        reused_chunks: chunks found complete on disk (counted on rank 0 only).
        teacher_seconds: wall time this rank spent on tokenising + teacher passes.
        reused_examples: examples of this rank's chunks whose targets came from the ``reuse`` stores.
    """

    directory: Path
    num_rows: int
    computed_examples: int
    reused_chunks: int
    teacher_seconds: float
    reused_examples: int = 0


# ------------------------------------------------------------------------------------------ checks


def _load_tokenizer(path: str | Path):
    from dist_kd.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, TypeError) as err:
        raise ValueError(f"teacher {path}: no usable tokenizer in the directory ({err})") from None


def check_teachers(paths: Sequence[str | Path], spec: TaskSpec, max_length: int | None = None) -> EnsembleCheck:
    """Check that the teachers form one ensemble for ``spec``; loads configs and tokenizers, not weights.

    Args:
        paths: teacher directories (HF ``*ForSequenceClassification`` with a tokenizer).
        spec: the task (type and label order).
        max_length: the truncation length, which must fit every teacher's position embeddings (checked here,
            before a run writes anything, so that the corrected command is not refused as another run's).

    Returns:
        The shared label names (empty for regression) and tokenizer fingerprint.

    Raises:
        FileNotFoundError: a directory or its config.json is missing.
        ValueError: two teachers differ in tokenizer (both are named), a teacher's classes differ from the
            task's or are transformers' default names (:func:`head_label_order`; another order of the same
            names is read by name), a regression task meets a teacher with more than one output, or
            ``max_length`` exceeds a teacher's position embeddings.
    """
    from transformers import AutoConfig

    from dist_kd.data.tokenizer import tokenizer_fingerprint

    first_fingerprint: dict[str, Any] | None = None
    orders: list[list[int]] = []
    for path in paths:
        check_model_dir(path, "teacher")
        config = AutoConfig.from_pretrained(path)
        check_classifier(config, path, "teacher (--teachers)")  # before run.json: the corrected command is this run
        if max_length is not None:
            check_max_length(config, max_length, path, "max_length (--max-length)")
            trained = (read_task_record(path) or {}).get("max_length")
            if isinstance(trained, int) and trained != max_length and distributed.current().is_main:
                logger.warning(
                    "teacher %s was trained on inputs cut to %d pieces (its task.json); they are cut to %d here "
                    "(--max-length)", path, trained, max_length,
                )  # fmt: skip
        fingerprint = tokenizer_fingerprint(_load_tokenizer(path))
        if spec.type == "regression":
            if config.num_labels != 1:
                raise ValueError(
                    f"teacher {path} has {config.num_labels} outputs ({teacher_label_names(config, path)}); "
                    f"task '{spec.name}' is regression and needs one"
                )
        else:
            what = f"teacher {path} (config.json id2label)"
            orders.append(head_label_order(spec, teacher_label_names(config, path), what))
            if orders[-1] != sorted(orders[-1]):
                logger.info("teacher %s names the task's classes in another order; its outputs are read by name "
                            "(columns %s in the task's order %s)", path, orders[-1], list(spec.labels))  # fmt: skip
        if first_fingerprint is None:
            first_fingerprint = fingerprint
            continue
        if fingerprint["sha256"] != first_fingerprint["sha256"]:
            first, this = first_fingerprint, fingerprint
            raise ValueError(
                f"teachers disagree on the tokenizer: {paths[0]} uses {first['name_or_path']} "
                f"(vocab {first['vocab_size']}, sha256 {first['sha256'][:16]}), {path} uses "
                f"{this['name_or_path']} (vocab {this['vocab_size']}, sha256 {this['sha256'][:16]})"
                "; inputs are tokenised once for the whole ensemble"
            )
    return EnsembleCheck(label_names=list(spec.labels), tokenizer=first_fingerprint, label_orders=orders)


# ---------------------------------------------------------------------------------------- data and keys


def resolve_data_path(path: str | Path) -> Path:
    """A task data file or directory; an augmentation output directory stands for its ``augmented.parquet``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task data {path} does not exist")
    if path.is_dir() and (path / AUGMENTED_FILE).is_file():
        return path / AUGMENTED_FILE
    if path.is_dir() and any((path / "parts").glob("part-*-of-*.parquet")):
        raise ValueError(
            f"task data {path} is an unfinished augmentation: parts/ holds its ranks' parts, but {AUGMENTED_FILE} "
            "is missing (launch/augment.py did not finish); run the same augment command again to finish it"
        )
    return path


def spec_for_data(spec: TaskSpec, path: Path) -> TaskSpec:
    """The spec to read ``path`` with: an augmented set (``launch/augment.py``) has canonical columns.

    Raises:
        ValueError: the augmented set was made for labels in another order than the task's.
    """
    if path.suffix.lower() != ".parquet":
        return spec
    try:
        found = read_parquet_metadata(path)
    except ValueError:
        return spec
    if found.get("kind") != "augmented_task_data":
        return spec
    # Two tasks with the same labels (GLUE's binary ones) pass the label check: the name tells them apart.
    if found.get("task") not in (None, spec.name):
        raise ValueError(f"augmented data {path} was made for task '{found['task']}', not '{spec.name}'")
    if found.get("task_type") not in (None, spec.type):
        raise ValueError(f"augmented data {path} holds a {found['task_type']} task, but '{spec.name}' is {spec.type}")
    if spec.type == "classification":
        label_order_check(spec.labels, found.get("label_names", []), f"augmented data {path} (metadata)", spec.name)
    return dataclasses.replace(spec, text_a="text_a", text_b="text_b", label="label", id_column="example_id")


def data_sha256(path: str | Path) -> str:
    """sha256 of a data file, or of a directory's files (relative names and their digests, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [f"{item.relative_to(path).as_posix()}:{sha256_file(item)}\n" for item in sorted(path.rglob("*"))
             if item.is_file()]  # fmt: skip
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def build_store_metadata(
    spec: TaskSpec,
    config: PrecomputeConfig,
    check: EnsembleCheck,
    data_path: Path,
    hashes: dict[str, Any],
    num_examples: int,
) -> store.StoreMetadata:
    """The store's metadata; it depends on the inputs and parameters only (not on ranks or time)."""
    from dist_kd import __version__

    return store.StoreMetadata(
        task=spec.name,
        task_type=spec.type,
        label_names=list(spec.labels),
        temperature=float(config.temperature),
        teachers=[
            {"path": str(Path(p).resolve()), "sha256": sha} for p, sha in zip(config.teachers, hashes["teachers"])
        ],
        source_data={"path": str(data_path.resolve()), "sha256": hashes["data"], "num_examples": num_examples},
        has_teacher_logits=config.keep_teacher_logits,
        extra={
            "producer": f"dist_kd {__version__} precompute",
            "columns": {"text_a": spec.text_a, "text_b": spec.text_b, "label": spec.label, "id": spec.id_column},
            "max_length": config.max_length,
            "dtype": config.dtype,
            "chunk_size": config.chunk_size,
            "tokenizer": check.tokenizer,
            # Only where some teacher's columns were reordered, so that earlier stores keep their run key.
            **({"teacher_label_orders": check.label_orders} if check.reordered else {}),
        },
    )


def run_record(metadata: store.StoreMetadata) -> dict[str, Any]:
    """The parameters a resumed run must share with the first start: the metadata minus paths.

    Paths are left out so a moved data set or teacher directory (same bytes) still resumes.
    """
    record = metadata.to_dict()
    record["teachers"] = [teacher["sha256"] for teacher in record["teachers"]]
    record["source_data"] = {key: value for key, value in record["source_data"].items() if key != "path"}
    record["extra"] = {key: value for key, value in record["extra"].items() if key != "producer"}
    record["extra"]["tokenizer"] = record["extra"]["tokenizer"]["sha256"]
    if "reused_from" in record["extra"]:
        record["extra"]["reused_from"] = [entry["key"] for entry in record["extra"]["reused_from"]]
    return record


def run_key(record: dict[str, Any]) -> str:
    """Short digest of a run record; chunk files carry it so chunks of another run are never merged."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            out += _differences(before, after, f"{prefix}{key}.")
        elif before != after:
            out.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return out


# ---------------------------------------------------------------------------------------------- reuse

# What a reused store must share with this run for its rows to be what these teachers would compute here.
REUSE_MUST_MATCH = (
    ("task_type",), ("label_names",), ("temperature",), ("teachers",),
    ("extra", "max_length"), ("extra", "dtype"), ("extra", "tokenizer"),
    ("extra", "teacher_label_orders"),  # the same weights under renamed labels give other columns
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ReusedTargets:
    """The rows of earlier stores, found by their texts.

    Attributes:
        rows: ``(text_a, text_b)`` -> row in ``probs`` (the first store that has the texts wins).
        probs: ``(M, C)`` soft targets of every reused store, concatenated.
        logits: ``(M, K, C)`` teacher logits, or None when this run does not keep them.
        sources: ``{"path", "key", "num_rows"}`` per store, ``key`` being its run record's digest.
    """

    rows: dict[tuple[str, str | None], int]
    probs: np.ndarray
    logits: np.ndarray | None
    sources: list[dict[str, Any]]

    def find(self, text_a: list[str], text_b: list[str | None]) -> list[int | None]:
        """The row of each example in ``probs``, None where no reused store has its texts."""
        return [self.rows.get(pair) for pair in zip(text_a, text_b)]


def check_reused_stores(paths: Sequence[str | Path], metadata: store.StoreMetadata) -> list[dict[str, Any]]:
    """Check, from their manifests only, that the stores named by ``PrecomputeConfig.reuse`` fit this run.

    Args:
        paths: store directories.
        metadata: this run's store metadata (:func:`build_store_metadata`).

    Returns:
        ``{"path", "key", "num_rows"}`` per store, ``key`` being its run record's digest.

    Raises:
        FileNotFoundError: a store is missing.
        ValueError: a store is incomplete, was made by other teachers or with another temperature, max_length,
            dtype, tokenizer or label order (each difference is named), or lacks the teacher logits this run keeps.
    """
    wanted = run_record(metadata)
    sources = []
    for path in paths:
        where = f"reuse: soft-target store {path}"
        try:
            manifest = store.read_manifest(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"reuse: {err}") from None
        found = run_record(store.StoreMetadata.from_dict(manifest["metadata"], str(path)))
        changes = []
        for keys in REUSE_MUST_MATCH:
            before, after = found, wanted
            for key in keys:
                before, after = before.get(key), after.get(key)
            if before != after:
                changes.append(f"{'.'.join(keys)}: {before!r} there, {after!r} here")
        if changes:
            raise ValueError(
                f"{where} was not computed like this run ({'; '.join(changes)}); reuse only stores of the same "
                "teachers with the same temperature, max_length, dtype and labels"
            )
        if metadata.has_teacher_logits and not found["has_teacher_logits"]:
            raise ValueError(f"{where} has no teacher logits, and this run keeps them (--keep-teacher-logits)")
        sources.append({"path": str(Path(path).resolve()), "key": run_key(found), "num_rows": manifest["num_rows"]})
    return sources


def load_reused_targets(sources: list[dict[str, Any]], metadata: store.StoreMetadata) -> ReusedTargets:
    """The rows of the stores :func:`check_reused_stores` accepted (checksums verified as they are read)."""
    rows: dict[tuple[str, str | None], int] = {}
    probs, logits = [], []
    offset = 0
    columns = ["text_a", "text_b"] + (["teacher_logits"] if metadata.has_teacher_logits else [])
    for source in sources:
        loaded = store.load_soft_targets(source["path"], columns=columns)
        texts = zip(loaded.table.column("text_a").to_pylist(), loaded.table.column("text_b").to_pylist())
        for index, pair in enumerate(texts):
            rows.setdefault(pair, offset + index)
        offset += loaded.num_rows
        probs.append(loaded.soft_probs())
        logits.append(loaded.teacher_logits())
    return ReusedTargets(
        rows=rows,
        probs=np.concatenate(probs) if probs else np.zeros((0, metadata.num_classes), np.float32),
        logits=np.concatenate(logits) if metadata.has_teacher_logits and logits else None,
        sources=sources,
    )


# --------------------------------------------------------------------------------------------- chunks


def chunk_bounds(num_examples: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every chunk, in input order."""
    return [(start, min(start + chunk_size, num_examples)) for start in range(0, num_examples, chunk_size)]


def chunk_path(output_dir: str | Path, index: int) -> Path:
    """``OUTPUT/_chunks/chunk-NNNNNN.parquet``."""
    return Path(output_dir) / CHUNKS_DIR / f"chunk-{index:06d}.parquet"


def chunk_is_complete(path: Path, key: str, index: int, num_rows: int) -> bool:
    """True when ``path`` is a finished chunk of this run (atomic writes: existing means whole)."""
    try:
        found = read_parquet_metadata(path)
        rows = pq.read_metadata(path).num_rows
    except (OSError, ValueError, pa.ArrowInvalid):
        return False
    return found.get("run") == key and found.get("chunk") == index and rows == num_rows


# ------------------------------------------------------------------------------------------- teachers


class TeacherEnsemble:
    """K frozen teachers sharing one tokenizer; logits of a list of examples, batched by length.

    Args:
        paths: teacher directories (already checked with :func:`check_teachers`).
        dtype: ``fp16`` | ``bf16`` | ``fp32``.
        device: where the teachers run.
        max_length: truncation length in pieces (within every teacher's positions: :func:`check_teachers`).
        batch_size: sequences per forward pass.
        label_orders: per teacher, its output columns in the task's order (:attr:`EnsembleCheck.label_orders`);
            None or empty keeps every teacher's own order.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        dtype: str,
        device: torch.device,
        max_length: int,
        batch_size: int,
        label_orders: Sequence[Sequence[int]] | None = None,
    ):
        from dist_kd.models.teacher import Teacher

        self.tokenizer = _load_tokenizer(paths[0])
        self.teachers = [
            Teacher(
                path, dtype=dtype, device=device, model_class="AutoModelForSequenceClassification", flag="--teachers"
            )  # fmt: skip
            for path in paths
        ]
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.label_orders = [list(order) for order in label_orders] if label_orders else [None] * len(paths)
        self.pad_id = pad_id_of(self.tokenizer)
        # Each teacher its own segment ids, as its own tokenizer and config give them: the teachers share the
        # vocabulary (check_teachers), not the model inputs (a DistilBERT tokenizer emits no token_type_ids, and a
        # BERT teacher after it read the second text of a pair as segment 0).
        self.token_types = [
            uses_token_types(self.tokenizer if index == 0 else _load_tokenizer(path), teacher.config)
            for index, (path, teacher) in enumerate(zip(paths, self.teachers))
        ]

    def encode(self, text_a: list[str], text_b: list[str | None]) -> TokenizedRows:
        """Token ids and segment ids per row (single texts and pairs may mix)."""
        return tokenize_rows(self.tokenizer, text_a, text_b, self.max_length)

    @torch.no_grad()
    def logits(self, text_a: list[str], text_b: list[str | None]) -> np.ndarray:
        """``(N, K, C)`` float32 logits of every teacher, rows in the order given."""

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            types = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
            per_teacher = [teacher.logits(batch["input_ids"], batch["attention_mask"], **(types if uses else {}))
                           for teacher, uses in zip(self.teachers, self.token_types)]  # fmt: skip
            return torch.stack([_in_order(logits.float(), order) for logits, order in
                                zip(per_teacher, self.label_orders)], dim=1)  # fmt: skip

        rows = self.encode(text_a, text_b)
        return batched_logits(forward, rows, self.pad_id, self.batch_size, self.device, any(self.token_types))


def _in_order(logits: torch.Tensor, order: list[int] | None) -> torch.Tensor:
    return logits if order is None or order == sorted(order) else logits[:, order]


def soft_targets_from_logits(logits_NKC: np.ndarray, task_type: str, temperature: float) -> np.ndarray:
    """``(N, C)`` mean of the K softmaxes at ``temperature`` (classification) or ``(N, 1)`` mean prediction."""
    if task_type == "regression":
        return logits_NKC.astype(np.float32).mean(axis=1)
    from dist_kd.losses import ensemble_probs

    logits_KNC = torch.from_numpy(np.ascontiguousarray(logits_NKC.transpose(1, 0, 2)))
    return ensemble_probs(logits_KNC, temperature).numpy()


# ------------------------------------------------------------------------------------------- the run


def check_distinct_teachers(teachers: Sequence[str | os.PathLike], digests: Sequence[str]) -> None:
    """Refuse two teachers with the same weights (a directory copied, a run repeated with its seed): the
    ensemble's average would count that teacher twice, and nothing in the store would show it."""
    first_of: dict[str, str | os.PathLike] = {}
    for path, digest in zip(teachers, digests, strict=True):
        if digest in first_of:
            raise ValueError(
                f"--teachers {first_of[digest]} and {path} hold the same weights (sha256 {digest[:12]}...), so the "
                "ensemble would count one teacher twice; list each teacher once (teachers fine-tuned apart, e.g. "
                "with other --seeds, differ)"
            )
        first_of[digest] = path


def _check_store_output(output: Path, data_path: Path, teachers: Sequence[str | os.PathLike]) -> None:
    """Refuse an ``--output`` holding anything but a store: the write removes the ``part-NNNNN.parquet`` files
    its manifest does not list, and a reader of the directory (pandas, datasets) takes every Parquet file in it,
    so a data or augmentation directory given by mistake lost its files or mixed them with the store's."""
    for flag, inputs in (("--data", [data_path]), ("--teachers", teachers)):
        for given in inputs:
            if within(given, output):
                raise ValueError(f"--output {output} holds the {flag} {given}: give the store a directory of its own")
    check_output_outside_data(output, "--output", {"--data": data_path})
    strangers = store.store_strangers(output) if output.is_dir() else []
    if strangers:
        raise ValueError(
            f"--output {output} holds files that are not a soft-target store's ({listed(strangers)}); the store's "
            f"write would mix its files with them: give a new or empty directory (e.g. --output soft/<task>), or "
            "an earlier store"
        )


def _prepare_work_dir(output: Path, record: dict[str, Any]) -> str:
    """On rank 0: ``done`` when the store is already complete for this run, else ``work`` (run.json written).

    Raises:
        ValueError: the output holds a store or a partial run with other parameters.
    """
    if store.is_complete(output):
        found = run_record(store.read_store_metadata(output))
        if found == record:  # a store whose _chunks were left (see precompute_soft_targets for the others)
            # A crash between the manifest and the clean-up leaves chunks behind; they are no longer needed.
            shutil.rmtree(output / CHUNKS_DIR, ignore_errors=True)
            return "done"
        changes = "; ".join(_differences(found, record)) or "unknown"
        raise ValueError(
            f"output {output} already holds a soft-target store computed with other parameters ({changes}); "
            "choose another --output or delete it"
        )
    record_path = output / CHUNKS_DIR / RUN_RECORD
    if record_path.is_file():
        try:
            found = json.loads(record_path.read_text())
        except (OSError, ValueError) as err:  # a truncated write, a disk error: say which file, and the way out
            raise ValueError(
                f"{record_path} (the record of a partial precompute) does not read ({err}); delete "
                f"{output / CHUNKS_DIR} to start over"
            ) from None
        if found != record and not any((output / CHUNKS_DIR).glob("chunk-*.parquet")):
            # A run that ended before its first chunk (a teacher refused as it loaded): nothing to keep. The caller
            # holds the output's run lock, so no run that may still be loading its teachers is taken over.
            logger.info("%s: the earlier run with other parameters ended before its first chunk; starting over", output)
            write_json_atomic(record_path, record)
        elif found != record:
            changes = "; ".join(_differences(found, record))
            raise ValueError(
                f"{output} holds a partial precompute started with other parameters ({changes}); resume it with the "
                f"same teachers, temperature and data, or delete {output / CHUNKS_DIR} to start over"
            )
    else:
        write_json_atomic(record_path, record)
    return "work"


def _complete_for(output: Path, record: dict[str, Any]) -> bool:
    """Whether ``output`` holds a complete store of the run ``record`` describes (a refusal of one that holds
    another run's is :func:`_prepare_work_dir`'s)."""
    try:
        return store.is_complete(output) and run_record(store.read_store_metadata(output)) == record
    except (OSError, ValueError):
        return False


def _missing_chunks(output: Path, bounds: list[tuple[int, int]], key: str) -> list[int]:
    return [
        index
        for index, (start, stop) in enumerate(bounds)
        if not chunk_is_complete(chunk_path(output, index), key, index, stop - start)
    ]


def _compute_chunk(
    ensemble: Callable[[], TeacherEnsemble],
    examples: pa.Table,
    spec: TaskSpec,
    config: PrecomputeConfig,
    reused: ReusedTargets | None,
    num_classes: int,
) -> tuple[pa.Table, int]:
    """A chunk's store rows, and how many of them the teachers computed (the rest came from ``reused``)."""
    text_a = examples.column("text_a").to_pylist()
    text_b = examples.column("text_b").to_pylist()
    found = reused.find(text_a, text_b) if reused is not None else [None] * len(text_a)
    todo = [i for i, row in enumerate(found) if row is None]
    done = [i for i, row in enumerate(found) if row is not None]
    probs = np.empty((len(text_a), num_classes), np.float32)
    kept = (
        np.empty((len(text_a), len(config.teachers), num_classes), np.float32) if config.keep_teacher_logits else None
    )
    if todo:
        logits_NKC = ensemble().logits([text_a[i] for i in todo], [text_b[i] for i in todo])
        probs[todo] = soft_targets_from_logits(logits_NKC, spec.type, config.temperature)
        if kept is not None:
            kept[todo] = logits_NKC
    if done:
        rows = [found[i] for i in done]
        probs[done] = reused.probs[rows]
        if kept is not None:
            kept[done] = reused.logits[rows]
    return store.build_rows(examples, spec.name, probs, kept, spec.type), len(todo)


def _read_chunks(output: Path, num_chunks: int) -> Iterator[pa.Table]:
    for index in range(num_chunks):
        yield pq.read_table(chunk_path(output, index)).replace_schema_metadata(None)


def _load_examples(
    data_path: Path, spec: TaskSpec, require_label_column: bool, warn: bool
) -> tuple[pa.Table, dict[str, Any] | None]:
    """The task rows, and what to record when the data has no label column (None when it has one)."""
    try:
        examples = load_task_examples(
            data_path, spec, require_labels=False, require_label_column=spec.label is not None
        )
    except MissingColumnError as err:
        if err.role != "label" or require_label_column:
            raise
        if warn:
            # A store without labels is right for soft-target-only training, but a misnamed label column
            # (e.g. 'category') would otherwise pass unnoticed.
            logger.warning(
                "task data %s has no label column '%s' (columns found: %s): the store gets no labels, which suits "
                "soft-target-only training; pass --label COLUMN if one of them holds the labels",
                data_path, err.column, ", ".join(err.columns_found),
            )  # fmt: skip
        examples = load_task_examples(data_path, spec, require_labels=False)
        return examples, {"column": err.column, "columns_found": err.columns_found}
    return examples, None


def precompute_soft_targets(
    spec: TaskSpec,
    data_path: str | Path,
    output_dir: str | Path,
    config: PrecomputeConfig,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    on_chunk_written: Callable[[int], None] | None = None,
    require_label_column: bool = False,
) -> PrecomputeResult:
    """Run the ensemble over the task data and write (or finish) the soft-target store at ``output_dir``.

    Collective when a process group is initialised (every rank calls it with the same arguments); works
    without one as a single process. Safe to call again after a crash: finished chunks are reused.

    Args:
        spec: the task; its label order must equal the teachers'.
        data_path: task data file or directory (``load_task_examples`` formats; an augmentation output
            directory is read through its ``augmented.parquet``). Rows may lack labels.
        output_dir: the store directory.
        config: teachers and run parameters.
        device: where teachers run (default: this rank's device from :mod:`dist_kd.distributed`).
        progress: show a progress bar on rank 0.
        on_chunk_written: called with the chunk index after each chunk file is in place (tests use it to
            simulate a crash).
        require_label_column: the data must have the spec's label column (the user named it). Otherwise a
            missing label column is a warning naming the file and the columns found, recorded in the store's
            metadata (``extra.label_column_missing``), and the store has no labels: fine for soft-target-only
            training (``load_task_data`` refuses ``hard_weight`` > 0 on a store without any label).

    Returns:
        What this rank did.

    Raises:
        FileNotFoundError: missing data or teacher directories.
        ValueError: teachers that disagree (labels, order, tokenizer) or disagree with the task; an output
            holding a store or partial run with other parameters; a chunk missing at merge time.
        RunDirInUse: another live precompute writes ``output_dir`` (a ValueError; its ``.dist_kd.lock``).
    """
    check_task_spec(spec)
    info = distributed.current()
    device = device or info.device
    output = Path(output_dir)
    # Every rank checks the inputs; a refusal on any rank (a file missing on one node) stops every rank there.
    with distributed.shared_failure():
        check_output_dir(output)
        data_path = resolve_data_path(data_path)
        _check_store_output(output, data_path, config.teachers)
        spec = spec_for_data(spec, data_path)
        check = check_teachers(config.teachers, spec, config.max_length)
        examples, missing_label = _load_examples(data_path, spec, require_label_column, warn=info.is_main)
        # Hashing weights and data reads every byte; one rank does it and tells the others.
        hashes = None
        if info.is_main:
            hashes = {"teachers": [weights_sha256(path) for path in config.teachers], "data": data_sha256(data_path)}
    hashes = distributed.broadcast_object(hashes)
    check_distinct_teachers(config.teachers, hashes["teachers"])
    metadata = build_store_metadata(spec, config, check, data_path, hashes, examples.num_rows)
    if missing_label is not None:
        metadata = dataclasses.replace(metadata, extra={**metadata.extra, "label_column_missing": missing_label})
    if config.reuse:
        sources = check_reused_stores(config.reuse, metadata)
        metadata = dataclasses.replace(metadata, extra={**metadata.extra, "reused_from": sources})
    record = run_record(metadata)
    key = run_key(record)
    bounds = chunk_bounds(examples.num_rows, config.chunk_size)

    def already_complete() -> PrecomputeResult:
        logger.info("%s is already complete for these inputs; nothing to do", output)
        return PrecomputeResult(output, store.read_manifest(output)["num_rows"], 0, len(bounds), 0.0)

    # A store already complete for these inputs needs nothing written, not even a lock (it may be read-only).
    complete = info.is_main and not (output / CHUNKS_DIR).exists() and _complete_for(output, record)
    if distributed.broadcast_object(complete):
        return already_complete()
    # One run writes the output at a time: a second one (the same command started twice) is refused, and a run
    # that finds the lock free knows that the run that wrote a partial run's record has ended.
    with locked_run_dir(output, info, flag="--output"):
        # Rank 0 decides and every rank learns the outcome, so a refusal raises everywhere instead of
        # leaving the other ranks waiting at a barrier.
        decision: dict[str, Any] = {}
        if info.is_main:
            try:
                decision["status"] = _prepare_work_dir(output, record)
                decision["missing"] = _missing_chunks(output, bounds, key) if decision["status"] == "work" else []
            except ValueError as err:
                decision["error"] = str(err)
        decision = distributed.broadcast_object(decision)
        if "error" in decision:
            raise distributed.said_by(ValueError(decision["error"]), 0)  # rank 0's refusal, raised by every rank
        if decision["status"] == "done":  # complete, with the _chunks a crash before their removal left
            return already_complete()

        # Dealing the *missing* chunks round-robin keeps ranks balanced on a resume too.
        mine = decision["missing"][info.rank :: info.world_size]
        reused_chunks = len(bounds) - len(decision["missing"])
        if info.is_main:
            logger.info(
                "%d examples in %d chunks: %d done earlier, %d to compute on %d rank(s)",
                examples.num_rows, len(bounds), reused_chunks, len(decision["missing"]), info.world_size,
            )  # fmt: skip
        computed, from_reuse, seconds = 0, 0, 0.0
        if mine:
            # Read only by a rank with chunks to compute, and the teachers loaded on first use: chunks made of
            # reused rows need none.
            reused = load_reused_targets(metadata.extra["reused_from"], metadata) if config.reuse else None

            @functools.cache
            def ensemble() -> TeacherEnsemble:
                return TeacherEnsemble(
                    config.teachers, config.dtype, device, config.max_length, config.batch_size, check.label_orders
                )

            from dist_kd.cli import progress as tqdm

            total = sum(bounds[index][1] - bounds[index][0] for index in mine)
            with tqdm(total=total, desc="precompute", unit="ex", disable=not (progress and info.is_main)) as bar:
                for index in mine:
                    start, stop = bounds[index]
                    began = time.perf_counter()
                    rows, ran = _compute_chunk(
                        ensemble, examples.slice(start, stop - start), spec, config, reused, metadata.num_classes
                    )
                    seconds += time.perf_counter() - began
                    # Checked as the merge checks them, before the chunk counts as done: teachers overflowing in fp16
                    # were found at the merge, after every chunk, and the chunks kept refused the rerun's --dtype.
                    store.check_rows(rows, metadata, f"{output}: chunk {index} (examples {start}..{stop - 1})")
                    write_parquet_atomic(rows, chunk_path(output, index), {"run": key, "chunk": index})
                    computed += ran
                    from_reuse += stop - start - ran
                    bar.update(stop - start)
                    if on_chunk_written is not None:
                        on_chunk_written(index)
            ensemble.cache_clear()
            del reused
            if from_reuse:
                logger.info("rank %d: %d examples from the reused stores, %d through the teachers", info.rank,
                            from_reuse, computed)  # fmt: skip
        distributed.barrier()
        check_run_lock()  # a run that stalled past the lock's staleness and was taken over merges nothing

        if info.is_main:
            still_missing = _missing_chunks(output, bounds, key)
            if still_missing:
                raise ValueError(f"{output}: chunks {still_missing[:10]} are missing after every rank finished")
            store.write_soft_targets(_read_chunks(output, len(bounds)), output, metadata, config.rows_per_file)
            shutil.rmtree(output / CHUNKS_DIR)
            logger.info("wrote %s: %d rows", output, examples.num_rows)
        distributed.barrier()
        return PrecomputeResult(
            output, examples.num_rows, computed, reused_chunks if info.is_main else 0, seconds, from_reuse
        )
