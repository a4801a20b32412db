"""Multi-task training data: each task's tokenised rows and targets, and MT-DNN's task sampler.

A task's training rows come from a soft-target store (``launch/precompute.py``: texts, the ensemble's
probabilities, labels on original rows and none on augmented ones) or from task data with hard labels.
Either way they are tokenised once, with the student's tokenizer, into flat arrays
(:class:`dist_kd.data.encode.TokenizedRows`).

:class:`TaskSampler` decides which task each micro-batch comes from and which rows it takes; its whole
state is a few integers, so a resumed run continues exactly (see ``dist_kd.train.task``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dist_kd.data.encode import TokenizedRows, length_grouped_order, tokenize_rows
from dist_kd.data.tasks import TaskSpec, has_pairs, load_task_examples

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    """One task's training rows and targets, and its dev set.

    Attributes:
        spec: the task.
        rows: tokenised training rows.
        soft: ``(N, C)`` float32 soft targets (None for a hard-label task).
        labels: ``(N,)`` class ids (int64) or values (float64); ``has_label`` marks the valid ones.
        has_label: ``(N,)`` bool.
        dev_table: the dev examples (``load_task_examples``), or None.
        dev_rows: tokenised dev rows, or None.
        teacher: phase intermediate: the teacher directory.
        source: where the training rows came from (logged and recorded in checkpoints).
        pairs: the training rows are sentence pairs (some row has a second text).
    """

    spec: TaskSpec
    rows: TokenizedRows
    soft: np.ndarray | None
    labels: np.ndarray
    has_label: np.ndarray
    dev_table: Any
    dev_rows: TokenizedRows | None
    teacher: str | None
    source: str
    pairs: bool = False

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def _labels_array(values: list[Any], task_type: str) -> tuple[np.ndarray, np.ndarray]:
    has_label = np.array([value is not None for value in values], dtype=bool)
    if task_type == "classification":
        labels = np.array([-1 if value is None else value for value in values], dtype=np.int64)
    else:
        labels = np.array([np.nan if value is None else value for value in values], dtype=np.float64)
    return labels, has_label


def _soft_at(targets, path: str, temperature: float | None) -> np.ndarray:
    """The store's soft targets at the student's temperature (see :func:`load_task_data`)."""
    stored = targets.metadata.temperature
    if temperature is None or targets.metadata.task_type == "regression" or math.isclose(stored, temperature):
        return targets.soft_probs()
    logits = targets.teacher_logits()
    if logits is None:
        raise ValueError(
            f"soft-target store {path} holds teacher probabilities at temperature {stored:g}, but "
            f"distill.temperature is {temperature:g} (student and teachers must share t): set "
            f"distill.temperature={stored:g}, or re-run launch/precompute.py with --temperature {temperature:g} "
            "(with --keep-teacher-logits any temperature can be used later)"
        )
    from dist_kd.losses import ensemble_probs

    logger.info("soft-target store %s: recomputing its targets at temperature %g from the teachers' logits "
                "(written at %g)", path, temperature, stored)  # fmt: skip
    return ensemble_probs(torch.tensor(logits).transpose(0, 1), temperature).numpy()  # a copy: the column is read-only


def load_task_data(
    spec: TaskSpec,
    *,
    train: str | None,
    soft_targets: str | None,
    dev: str | None,
    tokenizer,
    max_length: int,
    need_labels: bool,
    teacher: str | None = None,
    temperature: float | None = None,
    hard_weight: float = 0.0,
) -> TaskData:
    """Read, check and tokenise one task's training rows (a soft-target store, else ``train``) and dev set.

    Args:
        spec: the task.
        train: task data with hard labels (file, ``datasets`` directory, or an augment output directory).
        soft_targets: a soft-target store; when given, its rows are the training rows.
        dev: dev data (labels required where ``need_labels``), or None.
        tokenizer: the student's tokenizer.
        max_length: truncation length in pieces.
        need_labels: every training row must have a label (hard-label training without a store), and every dev
            row (its metrics): phase prediction.
        teacher: the task's teacher directory (phase intermediate), recorded as given.
        temperature: ``distill.temperature``, the t the student's logits are divided by. A classification
            store's targets must be at the same t (the loss compares softmax(z_T/t) with softmax(z_S/t)): they
            are recomputed from the store's teacher logits when it kept them, else a different t is an error.
        hard_weight: ``distill.hard_weight`` (phase prediction): with a soft-target store and a weight > 0, at
            least one training row must have a label, else the hard term would be 0 at every step. Some rows
            without labels (augmented ones) are expected: the hard term averages over the labelled rows.

    Raises:
        FileNotFoundError / ValueError: missing files, a store made for another task, type or label order,
            no training rows, a training file without the label column or rows without labels where
            ``need_labels``, or a store without any label where ``hard_weight`` > 0.
    """
    from dist_kd.data.soft_targets import LEGACY_MANIFEST_NAME, MANIFEST_NAME, load_soft_targets
    from dist_kd.precompute import resolve_data_path, spec_for_data

    soft = None
    if soft_targets:
        # A regression task expects no labels: a classification store is then the type error below, not a
        # label list compared with [].
        expected = spec.labels if spec.type == "classification" else None
        targets = load_soft_targets(soft_targets, expected_labels=expected, task=spec.name)
        if targets.metadata.task_type != spec.type:
            raise ValueError(
                f"soft-target store {soft_targets} holds a {targets.metadata.task_type} task, "
                f"but task '{spec.name}' is {spec.type}"
            )
        table, soft, source = targets.table, _soft_at(targets, soft_targets, temperature), str(soft_targets)
    else:
        path = resolve_data_path(train)
        if path.is_dir() and any((path / name).is_file() for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME)):
            raise ValueError(
                f"task '{spec.name}': train {path} is a soft-target store (launch/precompute.py); give it as the "
                "task's soft_targets"
            )
        # Without a store the rows train on their labels: a missing label column is the same error as the
        # dev set's (naming the columns found and the task config's 'label' key), not "rows have no label".
        table = load_task_examples(
            path, spec_for_data(spec, path), require_labels=False, require_label_column=need_labels
        )
        source = str(path)
    if table.num_rows == 0:
        raise ValueError(f"task '{spec.name}': {source} has no training rows")
    labels, has_label = _labels_array(table.column("label").to_pylist(), spec.type)
    if soft is None and need_labels and not has_label.all():
        missing = int((~has_label).sum())
        raise ValueError(
            f"task '{spec.name}': {missing} training rows of {source} have no label (augmented rows?); a task "
            "without soft_targets trains on hard labels, so give it a soft-target store from launch/precompute.py"
        )
    if soft is not None and hard_weight > 0 and not has_label.any():
        raise ValueError(
            f"task '{spec.name}': distill.hard_weight is {hard_weight:g} but none of the {len(has_label)} training "
            f"rows of {source} has a label, so the hard loss would be 0 at every step; set distill.hard_weight: 0 "
            "to train on the soft targets only, or re-run launch/precompute.py with --label naming the data's label "
            "column"
        )
    texts = table.column("text_a").to_pylist(), table.column("text_b").to_pylist()
    rows = tokenize_rows(tokenizer, *texts, max_length, "data.max_length")
    dev_table = dev_rows = None
    if dev:
        # phase intermediate scores dev sets by the layer losses alone: unlabelled ones were refused
        dev_table = load_task_examples(dev, spec, require_labels=need_labels, require_label_column=need_labels)
        check_pairs(spec, source, table, dev, dev_table)
        dev_texts = dev_table.column("text_a").to_pylist(), dev_table.column("text_b").to_pylist()
        dev_rows = tokenize_rows(tokenizer, *dev_texts, max_length, "data.max_length")
    pairs = has_pairs(table)
    return TaskData(spec, rows, soft, labels, has_label, dev_table, dev_rows, teacher, source, pairs)


def check_pairs(spec: TaskSpec, source: str, table, dev: str, dev_table) -> None:
    """Training and dev rows must both be sentence pairs or both single texts: a store made with precompute's
    ``--text-b`` and a config without ``text_b`` would score the pair task's dev set on its first texts only."""
    train_pairs, dev_pairs = has_pairs(table), has_pairs(dev_table)
    if train_pairs == dev_pairs or dev_table.num_rows == 0:
        return
    if train_pairs:
        read = "the task has no text_b" if spec.text_b is None else f"no column '{spec.text_b}' there"
        raise ValueError(
            f"task '{spec.name}': the training rows of {source} are sentence pairs (text_b) but the dev rows of {dev} "
            f"are single texts ({read}); set the task's text_b to the dev data's second-text column"
        )
    raise ValueError(
        f"task '{spec.name}': the training rows of {source} are single texts but the dev rows of {dev} are sentence "
        f"pairs (column '{spec.text_b}'); set the task's text_b: null, or train on pairs"
    )


class TaskSampler:
    """Which task each micro-batch comes from and which of its rows (see the module docstring).

    Args:
        sizes: training rows per task.
        weights: sampling weight per task (normalised here).
        seed: the run's seed.
        rows_per_batch: rows one micro-batch takes across all ranks (micro-batch size x world size).
        lengths: pieces per row of each task; when given, each task's order per epoch groups rows of
            similar length into the same micro-batch (:func:`length_grouped_order`), which cuts padding.
        group_rows: rows padded together, one rank's slice of a micro-batch (default ``rows_per_batch``).
            The grouped order depends on it and not on the world size, so a run resumed at another world
            size (ZeRO 0) continues each task's epoch in the same order: every row still comes once.
    """

    def __init__(
        self,
        sizes: list[int],
        weights: list[float],
        seed: int,
        rows_per_batch: int,
        lengths: list[np.ndarray] | None = None,
        group_rows: int | None = None,
    ):
        self.sizes = list(sizes)
        self.lengths = lengths
        self.group_rows = rows_per_batch if group_rows is None else group_rows
        if rows_per_batch % self.group_rows:
            raise ValueError(f"rows_per_batch {rows_per_batch} is not a multiple of group_rows {self.group_rows}")
        total = float(sum(weights))
        self.probs = np.array([weight / total for weight in weights], dtype=np.float64)
        self.seed = seed
        self.rows_per_batch = rows_per_batch
        self.micro_batches = 0
        self.positions = [0] * len(sizes)
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    def _permutation(self, task: int, epoch: int) -> np.ndarray:
        cached = self._permutations.get(task)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, task, epoch])
            if self.lengths is None:
                order = rng.permutation(self.sizes[task])
            else:
                # The task's draws, and so each rank's slice, start at multiples of group_rows from its
                # position 0: in this epoch the first boundary comes after (-epoch * size) mod group_rows rows.
                first = (-epoch * self.sizes[task]) % self.group_rows
                order = length_grouped_order(self.lengths[task], self.group_rows, rng, first_batch=first)
            cached = (epoch, order)
            self._permutations[task] = cached
        return cached[1]

    def next(self) -> tuple[int, np.ndarray]:
        """The task index of the next micro-batch and its ``rows_per_batch`` row indices (all ranks)."""
        draw = np.random.default_rng([self.seed, 1 << 20, self.micro_batches])
        task = int(draw.choice(len(self.sizes), p=self.probs))
        rows, position, size = [], self.positions[task], self.sizes[task]
        wanted = self.rows_per_batch
        while wanted:
            epoch, offset = divmod(position, size)
            take = min(wanted, size - offset)
            rows.append(self._permutation(task, epoch)[offset : offset + take])
            position, wanted = position + take, wanted - take
        self.positions[task] = position
        self.micro_batches += 1
        return task, np.concatenate(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batches": self.micro_batches, "positions": list(self.positions), "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sizes"] != self.sizes:
            raise ValueError(
                f"the tasks' training rows changed since the checkpoint ({state['sizes']} rows then, "
                f"{self.sizes} now); start a new run.output_dir"
            )
        self.micro_batches = state["micro_batches"]
        self.positions = list(state["positions"])
