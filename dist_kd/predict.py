"""Batched inference over tokenised task rows, and prediction files.

Dev evaluation in task distillation, stand-alone evaluation (``launch/evaluate.py``) and teacher scoring
all run a classifier over a set of rows in length buckets (little padding) and scatter the logits back to
row order; they share :func:`batched_logits`. A prediction file is JSON lines, one per row, in the rows'
order::

    {"example_id": "topic-17", "label": "sport", "prediction": "sport", "logits": [-1.2, 0.3, 4.1]}

with label names for classification (``label`` null for unlabeled rows) and floats for regression, so
that anyone can recompute a metric from it without dist_kd.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from dist_kd.data.encode import TokenizedRows, pad_rows
from dist_kd.data.tasks import GLUE_TASKS, TaskSpec, check_task_spec, glue_key, has_pairs
from dist_kd.io import atomic_dir, atomic_path, check_replaceable_dir, listed, within

logger = logging.getLogger(__name__)

# A file without this column is a test set; one without a column the user named instead is an error.
DEFAULT_LABEL_COLUMN = TaskSpec.__dataclass_fields__["label"].default
# What an evaluation's output directory holds; a directory holding nothing else is a previous evaluation.
OUTPUT_FILES = ("predictions.jsonl", "metrics.json")


# What a task run's classifier exports (tasks/<name>/, best/<name>/) record of the task they were trained on:
# dist-kd evaluate reads its text columns and length from there unless told otherwise.
TASK_RECORD = "task.json"


def task_record(spec: TaskSpec, pairs: bool | None, max_length: int) -> dict[str, Any]:
    """``task.json`` of a classifier export: the task (``text_b`` null for single texts), whether it was trained
    on sentence pairs (None: not known, for a checkpoint of an earlier release), and the truncation length."""
    task = dataclasses.asdict(spec) | ({"text_b": None} if pairs is False else {})
    return {"task": task, "pairs": pairs, "max_length": max_length}


def read_task_record(model_dir: str | Path) -> dict[str, Any] | None:
    """``model_dir``'s ``task.json``, or None (another classifier, or a record that does not parse: warned)."""
    path = Path(model_dir) / TASK_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and isinstance(record.get("task"), dict):
            return record
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    logger.warning("%s does not parse as a task record; its text columns and length are not used", path)
    return None


def _check_pairs_as_trained(record: dict | None, table: pa.Table, model_dir: Path, data, spec: TaskSpec) -> None:
    """A classifier trained on sentence pairs scored on first texts alone gave a lower score and no word (the
    default ``text_b`` column is optional); one trained on single texts and given pairs is warned."""
    if record is None or table.num_rows == 0:
        return
    given = has_pairs(table)
    trained = record.get("pairs")
    if trained and not given:
        raise ValueError(
            f"model {model_dir} was trained on sentence pairs (its {TASK_RECORD}: text_b "
            f"{record['task'].get('text_b')!r}) but the data {data} has no second text "
            f"({'--text-b none' if spec.text_b is None else f'column {spec.text_b!r}'}): "
            "name the data's second-text column with --text-b"
        )
    if trained is False and given:
        logger.warning(
            "model %s was trained on single texts (its %s) but the data %s gives pairs (column %r); it reads them "
            "as one input, which it never saw: --text-b none scores the first texts alone",
            model_dir, TASK_RECORD, data, spec.text_b,
        )  # fmt: skip


def teacher_label_names(config: Any, path: str | Path) -> list[str]:
    """Label names of a classification head in index order, from ``config.id2label``."""
    id2label = {int(key): str(value) for key, value in (getattr(config, "id2label", None) or {}).items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"teacher {path}: config.json id2label has ids {sorted(id2label)}, expected 0..C-1")
    return [id2label[index] for index in range(len(id2label))]


# Classes known to have no sequence-classification head (an encoder, a language model, another task's head).
NOT_SEQUENCE_CLASSIFIERS = (
    "Model", "ForMaskedLM", "ForPreTraining", "ForCausalLM", "ForTokenClassification", "ForQuestionAnswering",
    "ForMultipleChoice",
)  # fmt: skip


def check_classifier(config: Any, path: str | Path, what: str = "model") -> None:
    """Raise when ``config`` names an architecture without a sequence-classification head (an encoder such as
    a task run's ``student/``), which ``AutoModelForSequenceClassification`` would load with a new random head.
    ``what`` names the model's role in the message ("teacher (--teachers)")."""
    architectures = getattr(config, "architectures", None) or []
    # Only the classes known to have no such head: a classifier of a class of its own
    # (BertForMultiLabelSequenceClassification) loads its head, and weights decide (load_pretrained) elsewhere.
    if architectures and all(name.endswith(NOT_SEQUENCE_CLASSIFIERS) for name in architectures):
        raise ValueError(
            f"{what} {path} is a {architectures[0]} (config.json architectures), an encoder without a classification "
            "head, which would score with new random weights; give a *ForSequenceClassification directory (a task "
            "run's tasks/<name>/ or best/<name>/, not its student/)"
        )


def length_batches(lengths: np.ndarray | list[int], batch_size: int) -> list[np.ndarray]:
    """Row indices grouped into batches of similar length (longest first, ties in input order)."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def batched_logits(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    rows: TokenizedRows,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    use_token_types: bool,
) -> np.ndarray:
    """``(N, C)`` float32 outputs of ``forward`` over every row, in row order.

    Args:
        forward: maps a batch (``input_ids``, ``attention_mask`` and, when ``use_token_types``,
            ``token_type_ids``, on ``device``) to ``(B, C)`` logits.
        rows: the tokenised rows.
        pad_id: the tokenizer's padding id.
        batch_size: rows per forward pass.
        device: where the model runs.
        use_token_types: pass segment ids (BERT) or not (RoBERTa).
    """
    out: np.ndarray | None = None
    for batch_rows in length_batches(rows.lengths, batch_size):
        batch = {name: tensor.to(device) for name, tensor in pad_rows(rows, batch_rows, pad_id).items()}
        if not use_token_types:
            batch.pop("token_type_ids")
        logits = forward(batch).float().cpu().numpy()
        if out is None:
            out = np.empty((len(rows), *logits.shape[1:]), dtype=np.float32)
        out[batch_rows] = logits
    if out is None:
        raise ValueError("batched_logits needs at least one row")
    return out


def predictions_of(spec: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """Class ids (classification) or values (regression) from ``(N, C)`` logits."""
    return logits.argmax(axis=1) if spec.type == "classification" else logits[:, 0]


def write_predictions(path: str | Path, spec: TaskSpec, table: pa.Table, logits: np.ndarray) -> None:
    """Write one JSON line per row of ``table`` (``example_id``, ``label``) with its prediction (atomically)."""
    ids = table.column("example_id").to_pylist()
    labels = table.column("label").to_pylist()
    predicted = predictions_of(spec, logits)
    lines = []
    for row, example_id in enumerate(ids):
        if spec.type == "classification":
            label = None if labels[row] is None else spec.labels[labels[row]]
            prediction = spec.labels[int(predicted[row])]
        else:
            label, prediction = labels[row], float(predicted[row])
        record = {"example_id": example_id, "label": label, "prediction": prediction}
        record["logits"] = [round(float(value), 6) for value in logits[row]]
        lines.append(json.dumps(record))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))


def _load_examples(
    data: str | Path, spec: TaskSpec, label_optional: bool = False, id_optional: bool = False
) -> pa.Table:
    """The rows to score, as :func:`_load_labelled` reads them; an id column from the model's task record that the
    data lacks (``id_optional``) numbers the rows instead, as a test set without the training data's ids."""
    from dist_kd.data.tasks import MissingColumnError

    try:
        return _load_labelled(data, spec, label_optional)
    except MissingColumnError as err:
        if not (id_optional and err.role == "id_column"):
            raise
    logger.warning(
        "data %s has no column %r, the id column of the model's task.json; its rows are numbered (%s-0, %s-1, ...; "
        "--id-column names another)", data, spec.id_column, spec.name, spec.name,
    )  # fmt: skip
    return _load_labelled(data, dataclasses.replace(spec, id_column=None), label_optional)


def _load_labelled(data: str | Path, spec: TaskSpec, label_optional: bool = False) -> pa.Table:
    """The rows to score. Data without the default ``label`` column is a test set (predictions, no metrics),
    but a column the user named (``--label category``) that is missing is a typo, which would otherwise end in
    null metrics and exit 0: the task reader's column check is required for it."""
    from dist_kd.data.tasks import MissingColumnError, load_task_examples

    if label_optional and spec.label not in (None, DEFAULT_LABEL_COLUMN):
        try:  # the model's task.json names the column: used where the data has it
            return load_task_examples(data, spec, require_labels=False, require_label_column=True)
        except MissingColumnError as err:
            if err.role != "label":
                raise
            logger.warning(
                "data %s has no column %r, the task's label column (the model's task.json, or the GLUE task's); "
                "reading labels from %r if it has one, else scoring none (--label names another)",
                data, spec.label, DEFAULT_LABEL_COLUMN,
            )  # fmt: skip
            spec = dataclasses.replace(spec, label=DEFAULT_LABEL_COLUMN)
    named = spec.label not in (None, DEFAULT_LABEL_COLUMN) and not label_optional
    try:
        return load_task_examples(data, spec, require_labels=False, require_label_column=named)
    except MissingColumnError as err:
        if err.role != "label":
            raise
        raise ValueError(
            f"data {data} has no label column '{err.column}' (--label); columns found: {err.columns_found}. Name one "
            "of them with --label, or leave --label out to score unlabeled (test) data"
        ) from None


def check_output_dir(output: str | Path, flag: str = "--output") -> Path:
    """Raise unless ``output`` can take an evaluation: absent, empty, or a previous evaluation (replaced whole).

    A directory holding anything else (a model or run directory given by mistake) is refused rather than
    replaced, which would delete those files, or written into, which would mix an evaluation with them.
    """

    def strangers(directory: Path) -> list[str]:
        # Besides the two outputs, only their temporaries from an interrupted write may be there.
        return [
            path.name
            for path in directory.iterdir()
            if path.name not in OUTPUT_FILES
            and not any(path.name.startswith(f".{file}.") and path.name.endswith(".tmp") for file in OUTPUT_FILES)
        ]

    only = f"one holding only {' and '.join(OUTPUT_FILES)}"
    return check_replaceable_dir(output, flag, strangers, "a previous evaluation", "eval", only)


DEFAULT_MAX_LENGTH = 128


def evaluate_classifier(
    model_dir: str | Path,
    spec: TaskSpec,
    data: str | Path,
    *,
    batch_size: int = 128,
    max_length: int | None = None,
    device: torch.device | str = "cpu",
    output: str | Path | None = None,
    label_optional: bool | None = None,
    id_optional: bool = False,
) -> dict:
    """Score an HF ``*ForSequenceClassification`` directory on task data (``launch/evaluate.py``).

    The model's ``id2label`` must name the task's classes; outputs in another order are read by name
    (:func:`dist_kd.data.tasks.head_label_order`). A regression model has one output.

    Args:
        model_dir: the classifier (e.g. a task run's ``tasks/<name>/`` or ``best/<name>/``) with tokenizer.
        spec: the task; unlabeled rows are allowed (no metrics then).
        data: task data file or ``datasets`` directory.
        batch_size: rows per forward pass.
        max_length: truncation length in pieces; None: the length the model's ``task.json`` says it was trained
            with (a task run's classifier), else 128 (``dist-kd evaluate``'s default).
        device: where to run.
        output: a directory for ``predictions.jsonl`` and ``metrics.json`` (None writes nothing). One holding a
            previous evaluation (only those files) is replaced as a whole once the new one is complete.
        label_optional: data without ``spec.label`` is a test set, as without the default ``label`` column
            (the column came from the model's task record or the GLUE registry, not from the user). None (the
            default): so for a GLUE task's own column (MRPC's ``Quality``, which its test split lacks).
        id_optional: data without ``spec.id_column`` has its rows numbered, with a warning (the column came from
            the model's task record, not from the user).

    Returns:
        ``{"task", "model", "data", "num_rows", "num_labelled", "metrics"}``; ``metrics`` are over the labelled
        rows (a warning names the others), None when no row has a label (a test set).

    Raises:
        FileNotFoundError / ValueError: missing inputs, labels that disagree with the model's, a label column
            named explicitly (not the default ``label``) that the data lacks, ``max_length`` beyond the
            model's position embeddings, or an ``output`` that is a file or a directory holding other files.
    """
    check_task_spec(spec)
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from dist_kd.data.encode import pad_id_of, tokenize_rows, uses_token_types
    from dist_kd.data.tasks import head_label_order
    from dist_kd.data.tokenizer import load_tokenizer
    from dist_kd.evaluate import compute_metrics, non_finite_rows, predicted_classes
    from dist_kd.io import write_json_atomic
    from dist_kd.models.teacher import check_max_length, check_model_dir, load_pretrained

    if output is not None:
        output = check_output_dir(output)  # before inference, so a bad --output costs no model run
        for flag, given in (("--data", data), ("--model", model_dir)):
            if within(given, output):
                # A data file named predictions.jsonl alone in its directory passed for a previous evaluation.
                raise ValueError(
                    f"{flag} {given} lies inside --output {output}, which the evaluation replaces whole: give "
                    "--output a directory of its own"
                )
    model_dir = check_model_dir(model_dir, "--model")
    config = AutoConfig.from_pretrained(model_dir)
    check_classifier(config, model_dir)
    record = read_task_record(model_dir)
    if max_length is None:  # scored as trained: eval.json's figures, not those of longer inputs
        max_length = (record or {}).get("max_length") or DEFAULT_MAX_LENGTH
    check_max_length(config, max_length, model_dir, "--max-length")
    order = None
    if spec.type == "classification":
        order = head_label_order(spec, teacher_label_names(config, model_dir), f"model {model_dir} (id2label)")
    elif config.num_labels != 1:
        raise ValueError(f"model {model_dir} has {config.num_labels} outputs; regression task '{spec.name}' needs 1")
    if label_optional is None:
        key = glue_key(spec.name)
        label_optional = key is not None and spec.label == GLUE_TASKS[key].label
    table = _load_examples(data, spec, label_optional, id_optional)
    _check_pairs_as_trained(record, table, model_dir, data, spec)
    tokenizer = load_tokenizer(model_dir)
    rows = tokenize_rows(tokenizer, table.column("text_a").to_pylist(), table.column("text_b").to_pylist(), max_length)
    device = torch.device(device)
    model, _ = load_pretrained(AutoModelForSequenceClassification, model_dir, "model")  # in fp32
    model = model.to(device).eval()
    logits = batched_logits(lambda batch: model(**batch).logits, rows, pad_id_of(tokenizer), batch_size, device,
                            uses_token_types(tokenizer, config))  # fmt: skip
    if order is not None and order != sorted(order):  # the model names the task's classes in another order
        logits = logits[:, order]
    bad_rows = non_finite_rows(logits)
    if len(bad_rows):  # every row, labelled or not: its prediction would be written as nan
        ids = table.column("example_id").to_pylist()
        raise ValueError(
            f"model {model_dir} gave outputs that are not finite (nan or inf) on {len(bad_rows)} of {len(ids)} rows "
            f"of {data} (example ids {listed([ids[row] for row in bad_rows])}): its weights are not finite or its "
            "outputs overflow in the precision it is stored in"
        )
    labels = table.column("label").to_pylist()
    labelled = np.array([label is not None for label in labels])
    metrics = None
    if labelled.any():
        if not labelled.all():  # a labelled set with gaps: scored over its labelled rows, and said so
            ids = table.column("example_id").to_pylist()
            unlabelled = [str(ids[row]) for row in np.flatnonzero(~labelled)]
            logger.warning(
                "data %s: %d of %d rows have no label (example ids %s); the metrics are over the %d labelled "
                "rows, every row is predicted", data, len(unlabelled), len(labels), listed(unlabelled),
                int(labelled.sum()),
            )  # fmt: skip
        known = np.asarray([label for label in labels if label is not None])
        metrics = compute_metrics(spec.type, spec.metric, logits[labelled], known, spec.num_labels)
        if spec.type == "classification":
            metrics["predicted_classes"] = predicted_classes(logits[labelled])  # as the task stage's eval.json has it
    report = {
        "task": spec.name, "model": str(model_dir), "data": str(data), "num_rows": len(rows),
        "num_labelled": int(labelled.sum()), "metrics": metrics,
    }  # fmt: skip
    if output is not None:
        # One directory swap: a crash never leaves new predictions beside an older evaluation's metrics.
        with atomic_dir(output) as tmp:
            write_predictions(tmp / "predictions.jsonl", spec, table, logits)
            write_json_atomic(tmp / "metrics.json", report)
    return report
