"""Task definitions and task data loading.

Every stage that touches task data (augmentation, teacher precompute, task distillation, evaluation) reads
it through :func:`load_task_examples`, which turns TSV / CSV / JSONL / Parquet files and ``datasets``
directories into one shape: a table with ``example_id``, ``text_a``, ``text_b`` (nullable) and ``label``
(class index or float, nullable). Column names in the file map through the :class:`TaskSpec`.

Label order is explicit: a classification task carries its label list, and a label index means "position
in that list" everywhere downstream (soft targets, teacher heads, student heads). Labels in files may be
names or ids; they are resolved against the list here, once, so nothing later has to guess.
:func:`label_order_check` is the one place that compares two label orders; stages call it on soft-target
stores, augmented sets and students so that a mismatch is an error rather than silently permuted classes.
A model's head names each output (``id2label``), so :func:`head_label_order` reads one that names the task's
classes in another order by those names (teachers in precompute, classifiers in evaluate).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dist_kd.config import doc
from dist_kd.evaluate import CLASSIFICATION_METRICS, REGRESSION_METRICS
from dist_kd.io import listed, parquet_metadata_of

logger = logging.getLogger(__name__)

TASK_TYPES = ("classification", "regression")
METRICS = ("accuracy", "f1", "mcc", "pearson", "spearman")
DEFAULT_TEXT_B = "text_b"

# Column a file may carry with its own stable ids; used when the spec names no id column.
DEFAULT_ID_COLUMN = "example_id"
FILE_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclasses.dataclass
class TaskSpec:
    """What a task is and how its files map onto ``text_a`` / ``text_b`` / ``label``."""

    name: str = doc("task name; used in example ids and in every output's metadata")
    type: str = doc("classification | regression", default="classification")
    labels: list[str] = doc("label names in index order (classification); empty for regression", default_factory=list)
    text_a: str = doc("column holding the first (or only) text", default="text_a")
    text_b: str | None = doc(
        "column holding the second text of sentence pairs; null for single texts. The default 'text_b' is "
        "optional: a file without that column reads as single-text",
        default=DEFAULT_TEXT_B,
    )
    label: str | None = doc("column holding the label; null when the data has no labels", default="label")
    metric: str | None = doc(
        "headline metric: accuracy | f1 | mcc (classification), pearson | spearman (regression); null: accuracy / "
        "pearson by type",
        default=None,
    )
    id_column: str | None = doc("column with stable example ids; null -> '<task>-<row index>'", default=None)
    tsv_columns: list[str] | None = doc(
        "names of a headerless TSV's columns (GLUE's CoLA); a file whose first row holds text_a is read as headed",
        default=None,
    )

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("task name must not be empty")
        if self.type not in TASK_TYPES:
            raise ValueError(f"task '{self.name}': type must be one of {list(TASK_TYPES)}, got {self.type!r}")
        if self.metric is None:
            self.metric = "accuracy" if self.type == "classification" else "pearson"
        if self.metric not in METRICS:
            raise ValueError(f"task '{self.name}': metric must be one of {list(METRICS)}, got {self.metric!r}")
        # A metric of the other type would be refused by compute_metrics only at the first evaluation, after
        # an epoch of training (and after the tasks scored before it had exported their best/ classifiers).
        allowed = CLASSIFICATION_METRICS if self.type == "classification" else REGRESSION_METRICS
        if self.metric not in allowed:
            raise ValueError(
                f"task '{self.name}': metric {self.metric!r} does not apply to a {self.type} task; expected one of "
                f"{list(allowed)}"
            )
        self.labels = [str(label) for label in self.labels]
        if self.type == "classification":
            if len(self.labels) < 2:
                raise ValueError(
                    f"task '{self.name}': a classification task needs an explicit list of at least 2 labels "
                    f"(labels: [a, b, ...] or --labels a,b,...), got {self.labels}"
                )
            duplicates = sorted({label for label in self.labels if self.labels.count(label) > 1})
            if duplicates:
                raise ValueError(f"task '{self.name}': labels {self.labels} repeat {duplicates}")
        elif self.labels:
            raise ValueError(f"task '{self.name}': a regression task takes no labels, got {self.labels}")

    @property
    def num_labels(self) -> int:
        """Output width of a head for this task: the number of classes, or 1 for regression."""
        return len(self.labels) if self.type == "classification" else 1


def _glue(name: str, text_a: str, text_b: str | None, label: str, labels: list[str], metric: str, **kw) -> TaskSpec:
    kind = "regression" if not labels else "classification"
    return TaskSpec(name=name, type=kind, labels=labels, text_a=text_a, text_b=text_b, label=label, metric=metric, **kw)


# Column names as they appear in the GLUE distribution's train/dev TSV files; label orders follow the
# reference GLUE processors (BERT / TinyBERT), so teachers fine-tuned with those scripts line up.
GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _glue(
        "cola", "sentence", None, "label", ["0", "1"], "mcc", tsv_columns=["source", "label", "author", "sentence"]
    ),
    "sst2": _glue("sst2", "sentence", None, "label", ["0", "1"], "accuracy"),
    "mrpc": _glue("mrpc", "#1 String", "#2 String", "Quality", ["0", "1"], "f1"),
    "qqp": _glue("qqp", "question1", "question2", "is_duplicate", ["0", "1"], "f1", id_column="id"),
    "stsb": _glue("stsb", "sentence1", "sentence2", "score", [], "pearson"),
    "mnli": _glue(
        "mnli", "sentence1", "sentence2", "gold_label", ["contradiction", "entailment", "neutral"], "accuracy"
    ),
    "qnli": _glue("qnli", "question", "sentence", "label", ["entailment", "not_entailment"], "accuracy"),
    "rte": _glue("rte", "sentence1", "sentence2", "label", ["entailment", "not_entailment"], "accuracy"),
    "wnli": _glue("wnli", "sentence1", "sentence2", "label", ["0", "1"], "accuracy"),
}

# What ``datasets``' own GLUE builder names differently from the GLUE TSVs. Its ClassLabel names for the tasks
# whose TSVs hold ids: class i of these names is the TSV's id i (SST-2's 0 is negative, MRPC's 1 equivalent).
GLUE_DATASETS_CLASS_NAMES: dict[str, list[str]] = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "wnli": ["not_entailment", "entailment"],
}
# Its text columns where they are not the TSV's (text_a, text_b); the label column is always ``label``.
GLUE_DATASETS_TEXT_COLUMNS: dict[str, tuple[str, str]] = {
    "mrpc": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
}


def check_task_spec(spec: Any) -> None:
    """Raise a TypeError naming what to pass unless ``spec`` is a :class:`TaskSpec` (an API caller's task name
    failed deep inside with "'str' object has no attribute 'type'")."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(
            f"spec must be a TaskSpec, got {type(spec).__name__} {spec!r}: make one with "
            "dist_kd.data.tasks.resolve_task_spec (a GLUE name, or a task name with labels=[...] and its columns)"
        )


def resolve_task_spec(
    name: str,
    *,
    type: str | None = None,  # noqa: A002 - mirrors the config key
    labels: Sequence[str] | None = None,
    text_a: str | None = None,
    text_b: str | None = DEFAULT_TEXT_B,
    label: str | None = "label",
    metric: str | None = None,
    id_column: str | None = None,
) -> TaskSpec:
    """Build a task spec: a GLUE registry entry with column overrides, or a custom task.

    For a GLUE name (``sst2``, ``mnli``, ...; case-insensitive, ``sst-2``/``sts-b`` accepted) the registry's
    columns and label order are the defaults; column arguments left at their defaults keep the registry's
    names (a file without a registry column but with the one ``datasets`` saves GLUE with, or ``text_b``,
    reads that, and ``datasets``' class names for the TSV's ids are read as those ids:
    :func:`load_task_examples`). ``labels`` given for a GLUE task must equal the registry's order (the order
    is part of the model).

    Args:
        name: task name.
        type: classification | regression (custom tasks; default classification).
        labels: label names in index order.
        text_a: text column (default ``text_a``).
        text_b: second text column, or None (default ``text_b``, optional in the file).
        label: label column, or None for unlabeled data.
        metric: headline metric (default accuracy, or pearson for regression).
        id_column: column with stable example ids.

    Returns:
        The validated :class:`TaskSpec`.

    Raises:
        ValueError: invalid fields, or labels that disagree with a GLUE task's order.
    """
    key = glue_key(name)
    if key is not None:
        base = GLUE_TASKS[key]
        if labels is not None:
            label_order_check(base.labels, list(labels), f"the labels given for GLUE task '{key}'", task=key)
        if type is not None and type != base.type:
            raise ValueError(f"GLUE task '{key}' is {base.type}, got type {type!r}")
        return dataclasses.replace(
            base,
            text_a=text_a or base.text_a,
            text_b=base.text_b if text_b == DEFAULT_TEXT_B else text_b,
            label=base.label if label == "label" else label,
            metric=metric or base.metric,
            id_column=id_column or base.id_column,
        )
    kind = type or "classification"
    return TaskSpec(
        name=name,
        type=kind,
        labels=list(labels or []),
        text_a=text_a or "text_a",
        text_b=text_b,
        label=label,
        metric=metric or ("pearson" if kind == "regression" else "accuracy"),
        id_column=id_column,
    )


def label_order_check(expected: Sequence[str], found: Sequence[str], what: str, task: str | None = None) -> None:
    """Raise unless two label orders are identical.

    Call it wherever labels cross a boundary: a teacher's ``id2label``, a soft-target store's
    ``label_names`` metadata, a student head, against the task's list. A permuted order would otherwise
    train and evaluate on silently swapped classes.

    Args:
        expected: the task's label list (index order).
        found: the other side's label list (index order).
        what: who ``found`` belongs to, e.g. ``"teacher runs/t1"`` or ``"soft-target store st/ (metadata)"``.
        task: task name, for the message.

    Raises:
        ValueError: the orders differ; the message shows both and says whether only the order differs.
    """
    expected_list = [str(label) for label in expected]
    found_list = [str(label) for label in found]
    if expected_list != found_list:
        raise _label_order_error(expected_list, found_list, what, task)


def _label_order_error(expected_list: list[str], found_list: list[str], what: str, task: str | None) -> ValueError:
    folded = [label.casefold() for label in expected_list], [label.casefold() for label in found_list]
    if sorted(expected_list) == sorted(found_list):
        hint = "the same labels in a different order"
    elif folded[0] == folded[1]:
        hint = "the same labels in another casing"
    elif sorted(folded[0]) == sorted(folded[1]):
        hint = "the same labels in another casing and order"
    else:
        hint = "a different label set"
    owner = f"task '{task}'" if task else "the task"
    return ValueError(
        f"{what} has labels {found_list}, {owner} expects {expected_list} ({hint}); "
        "label order must match exactly, retrain or remap explicitly"
    )


_DEFAULT_HEAD_LABEL = re.compile(r"LABEL_\d+")


def head_label_order(spec: TaskSpec, names: Sequence[str], what: str) -> list[int]:
    """The columns of a classification head's outputs in the task's label order: ``logits[:, order]``.

    A head names its classes in ``config.json``'s ``id2label``. Names equal to the task's labels give
    ``0..C-1``. A head naming the same classes in another order is read by name: Hugging Face's GLUE models
    name ``datasets``' classes in ``datasets``' order (MNLI's entailment, neutral, contradiction; SST-2's
    negative, positive, which are the GLUE files' ids 0, 1). Names match exactly, else ignoring case where
    that is unambiguous (``NEGATIVE``).

    Args:
        spec: a classification task.
        names: the head's label names in output order (:func:`dist_kd.predict.teacher_label_names`).
        what: who the head belongs to, for messages, e.g. ``"teacher runs/t1 (config.json id2label)"``.

    Raises:
        ValueError: other classes than the task's, or transformers' default names ``LABEL_0``, ... that say
            nothing of which class is which (the message says how to name them).
    """
    expected = [str(label) for label in spec.labels]
    found = [str(name) for name in names]
    for candidates in _label_spellings(found, _datasets_class_names(spec), expected):
        if sorted(candidates) == sorted(expected):
            return [candidates.index(label) for label in expected]
    if found and all(_DEFAULT_HEAD_LABEL.fullmatch(name) for name in found):
        raise ValueError(
            f"{what} has transformers' default label names {found}, which do not say which class each output "
            f"is; task '{spec.name}' expects {expected}: write the class of each output into the model's "
            "config.json (id2label, and label2id to match)"
        )
    raise _label_order_error(expected, found, what, spec.name)


def _label_spellings(found: list[str], datasets_names: list[str] | None, expected: list[str]) -> Iterator[list[str]]:
    """A head's names as the task may spell them: as they are, ``datasets``' GLUE class names as the GLUE
    files' ids, then either with case ignored where no two names differ only in case."""
    spellings = [found]
    if datasets_names is not None:
        lowered = {name.lower(): label for name, label in zip(datasets_names, expected)}
        if len({name.lower() for name in found}) == len(found) and all(name.lower() in lowered for name in found):
            spellings.append([lowered[name.lower()] for name in found])
    yield from spellings
    by_case = {label.lower(): label for label in expected}
    if len(by_case) == len(expected):
        for names in spellings:
            if len({name.lower() for name in names}) == len(names) and all(n.lower() in by_case for n in names):
                yield [by_case[name.lower()] for name in names]


# ---------------------------------------------------------------------------------------------- readers


def detect_format(path: str | Path) -> str:
    """``tsv`` | ``csv`` | ``jsonl`` | ``parquet`` | ``datasets`` for a path, from its suffix or directory."""
    path = Path(path)
    if path.is_dir():
        return "datasets"
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"task data {path}: cannot tell the format from suffix {path.suffix!r}; "
            f"expected one of {sorted(FILE_FORMATS)} or a datasets directory"
        )
    return fmt


def _read_text(path: Path, encoding: str) -> str:
    try:
        # newline="": the csv module sees line ends itself, so quoted fields may span lines (tweets do).
        with open(path, encoding=encoding, newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"task data {path} is not valid {encoding} text ({err}); convert it to UTF-8 (e.g. iconv -f latin1 -t "
            "utf-8), or with dist-kd augment pass its encoding (--encoding latin-1); the other commands read UTF-8"
        ) from None
    # A byte-order mark (Excel, Notepad; Windows' "Unicode" files are UTF-16-LE with one) is no part of the first
    # column's name or the first JSON line, as for pyarrow's readers; only utf-8-sig, utf-16 and utf-32 drop it.
    return text.removeprefix("\ufeff") if codecs.lookup(encoding).name.startswith("utf") else text


def _rows_to_table(path: Path, header: list[str], rows: list[tuple[int, list[str]]]) -> pa.Table:
    width = len(header)
    for line, row in rows:
        if len(row) != width:
            raise ValueError(
                f"task data {path}: line {line} has {len(row)} fields, the header has {width} ({header}); "
                "remove (or, in CSV, quote) the extra separators, or fill in the missing fields"
            )
    if len(set(header)) != width:
        raise ValueError(f"task data {path}: the header repeats column names: {header}")
    return pa.table({name: pa.array([row[i] for _, row in rows], pa.string()) for i, name in enumerate(header)})


def _read_delimited(path: Path, fmt: str, spec: TaskSpec, encoding: str) -> pa.Table:
    """A TSV/CSV file through pyarrow.csv, every column as strings (about 10x the csv module: bench/task_files.py).

    Whatever pyarrow refuses (a row with another number of fields, bytes that are not ``encoding``, an empty
    file) is read again with the csv module, which either reads it or raises the error naming the row.
    """
    import pyarrow.csv as pcsv

    tsv = fmt == "tsv"
    parse = pcsv.ParseOptions(
        delimiter="\t" if tsv else ",",
        # GLUE TSVs contain unbalanced quotes inside sentences; quoting must be off or rows merge.
        quote_char=False if tsv else '"',
        newlines_in_values=not tsv,  # quoted CSV fields may span lines (tweets do)
        ignore_empty_lines=True,
    )
    try:
        read = pcsv.ReadOptions(encoding=encoding)
        header = pcsv.open_csv(path, read_options=read, parse_options=parse).schema.names
        if _headerless(header, fmt, spec):
            header = list(spec.tsv_columns)
            read = pcsv.ReadOptions(encoding=encoding, column_names=header)
        if len(set(header)) != len(header):
            raise pa.ArrowInvalid("repeated column names")
        convert = pcsv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )
        table = pcsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, UnicodeError, LookupError):
        table = _read_delimited_python(path, fmt, spec, encoding)
    if tsv:
        _warn_csv_quoted(path, table)
    if table.num_columns == 1:
        _warn_blank_rows(path, fmt, encoding)
    return table


def _warn_blank_rows(path: Path, fmt: str, encoding: str) -> None:
    """In a file of one column a blank line may be an empty text, but TSV/CSV readers skip it as no row: the
    rows after it (and ids counted by row, ``<task>-<row>``) then stand one earlier than the file's lines."""
    blank, last_row = [], 0
    for line, row in _delimited_rows(_read_text(path, encoding), fmt, path, keep_blank=True):
        if row:
            last_row = line
        else:
            blank.append(line)
    inside = [line for line in blank if line < last_row]  # blank lines at the end shift nothing
    if inside:
        logger.warning(
            "task data %s has one column and %d blank lines between its rows (lines %s): they are skipped, not read "
            "as empty texts, so the rows after them (and ids counted by row) do not match the file's line numbers; "
            "remove them, or give each row an id column", path, len(inside), listed(inside),
        )  # fmt: skip


def _warn_csv_quoted(path: Path, table: pa.Table) -> None:
    """A TSV is read without quoting (GLUE's hold unbalanced quotes), but pandas' ``to_csv(sep="\t")`` quotes
    every cell holding a ``"``: such cells kept their quotes and doubled inner quotes in the text, silently."""
    import pyarrow.compute as pc

    for name in table.column_names:
        column = table.column(name)
        if not pa.types.is_string(column.type):
            continue
        # A quoted cell holds a doubled quote inside, or is a bare "" (pandas' one empty field on a row).
        quoted = pc.match_substring_regex(column, r'^"(.*"".*)?"$')
        count = pc.sum(quoted).as_py() or 0
        if count:
            example = column.filter(quoted)[0].as_py()
            logger.warning(
                "task data %s: %d cells of column %r look CSV-quoted (e.g. %r); a TSV is read without quoting, so "
                "the quotes stay in the text: write it as .csv, or without quoting (pandas: to_csv(sep='\\t', "
                "quoting=csv.QUOTE_NONE, escapechar='\\\\'))", path, count, name, example[:80],
            )  # fmt: skip


def _read_jsonl(path: Path, encoding: str) -> pa.Table:
    """A JSON-lines file through pyarrow.json (about 8x json line by line: bench/task_files.py).

    pyarrow reads UTF-8 only and refuses fields whose type changes between lines, blank lines and invalid
    lines; those files are read again line by line, which reads them or raises the error naming the line.
    """
    import pyarrow.json as pjson

    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        return _read_jsonl_python(path, encoding)
    try:
        table = pjson.read_json(path)
        # pyarrow turns a field whose every value looks like an ISO date into timestamps ("2019-01-01" ->
        # "2019-01-01 00:00:00", a "Z" offset dropped); ids and texts must stay as written, as json reads them.
        temporal = [field.name for field in table.schema if pa.types.is_temporal(field.type)]
        if temporal:
            schema = pa.schema([(name, pa.string()) for name in temporal])
            parse = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="infer")
            # an explicit schema puts its fields first; keep the file's column order
            table = pjson.read_json(path, parse_options=parse).select(table.schema.names)
        # pyarrow.json passes bytes that are not UTF-8 into its strings; the full check finds them, and the
        # line-by-line reading names the file.
        table.validate(full=True)
        if _beyond_int64(table):
            return _read_jsonl_python(path, encoding)
        return table
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeError):
        return _read_jsonl_python(path, encoding)


def _beyond_int64(table: pa.Table) -> bool:
    """Whether a float column holds a whole number outside int64: pyarrow.json reads an integer too large for
    int64 as the nearest double (18446744073709551615 -> 1.8446744073709552e+19), so neighbouring ids became
    one; json's reading keeps such integers as written."""
    import pyarrow.compute as pc

    for column in table.columns:
        if pa.types.is_floating(column.type) and len(column):
            beyond = pc.greater_equal(pc.abs(column), 2.0**63)
            if pc.any(pc.and_(beyond, pc.equal(pc.floor(column), column))).as_py():
                return True
    return False


def _read_delimited_python(path: Path, fmt: str, spec: TaskSpec, encoding: str) -> pa.Table:
    """The csv module's reading: slow, but its errors name the line and the fields found."""
    rows = _delimited_rows(_read_text(path, encoding), fmt, path)
    if not rows:
        raise ValueError(f"task data {path} is empty: no header and no rows")
    header, body = rows[0][1], rows[1:]
    if _headerless(header, fmt, spec):
        header, body = list(spec.tsv_columns or []), rows
    return _rows_to_table(path, header, body)


def _headerless(first_row: list[str], fmt: str, spec: TaskSpec) -> bool:
    return fmt == "tsv" and bool(spec.tsv_columns) and spec.text_a not in first_row


# csv's limit on one field's characters when dist_kd reads (the largest a C long holds everywhere).
_CSV_FIELD_LIMIT = 2**31 - 1


def _delimited_rows(text: str, fmt: str, path: Path, keep_blank: bool = False) -> list[tuple[int, list[str]]]:
    """The non-empty rows of TSV/CSV text, each with the 1-based line it starts on (a quoted CSV field may
    span lines, and empty lines are skipped, so the row number alone does not find a row in the file).
    ``keep_blank``: the empty lines too, as empty rows."""
    # The csv module refuses a field over 128 KiB by default (a whole article in one cell; pyarrow reads it).
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    if fmt == "tsv":
        # GLUE TSVs contain unbalanced quotes inside sentences; quoting must be off or rows merge.
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    start = 1
    try:
        for row in reader:
            if row or keep_blank:
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as err:
        raise ValueError(f"task data {path}: line {start} cannot be read as {fmt.upper()} ({err})") from None
    return rows


def _jsonl_lines(text: str) -> list[tuple[int, str]]:
    """The non-blank lines of JSON-lines text with their 1-based numbers. Lines end at \\n, \\r\\n or \\r
    only, as for pyarrow.json and editors; ``str.splitlines`` would also split at U+2028 or U+0085, which JSON
    strings may hold as they are."""
    return [(number, line) for number, line in enumerate(re.split(r"\r\n?|\n", text), start=1) if line.strip()]


def _read_jsonl_python(path: Path, encoding: str) -> pa.Table:
    """json's reading, line by line: slow, but its errors name the line, and fields that mix types become
    strings."""
    records = []
    for number, line in _jsonl_lines(_read_text(path, encoding)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            array = "" if not line.lstrip().startswith("[") else (
                "; a .json file is read as JSON lines (one object per line), and this one looks like one JSON "
                "array: write one object per line (pandas: to_json(path, orient='records', lines=True))"
            )  # fmt: skip
            raise ValueError(f"task data {path}: line {number} is not valid JSON ({err}){array}") from None
        if not isinstance(record, dict):
            hint = " (a JSON array: write one object per line)" if isinstance(record, list) else ""
            raise ValueError(
                f"task data {path}: line {number} must be a JSON object, found {type(record).__name__}{hint}"
            )
        _check_surrogates(record, path, number)
        records.append(record)
    if not records:
        return pa.table({})
    columns: dict[str, list[Any]] = {}
    for record in records:
        for key in record:
            columns.setdefault(key, [])
    return pa.table({key: _json_column([record.get(key) for record in records]) for key in columns})


def _check_surrogates(record: dict[str, Any], path: Path, number: int) -> None:
    """JSON may escape half of a character (``"\\ud83d"``, as ``json.dumps`` writes a text cut inside an
    emoji); such a string is no UTF-8 text, and every later step (pyarrow, the tokenizer) would refuse it."""
    for key, value in record.items():
        if not isinstance(value, str):
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"task data {path}: line {number}, field '{key}' holds a lone surrogate {value[err.start]!r} at "
                f"character {err.start} (half of a character, as a text cut inside an emoji), which is no text; "
                "remove it or write the whole character"
            ) from None


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _json_column(values: list[Any]) -> pa.Array:
    """One JSONL field as an array; fields that mix types (labels ``"sport"`` and ``2``) become strings, a
    boolean as JSON writes it (``true``, as a column of booleans alone is read: :func:`_bool_label`), as do
    numbers among which an integer exceeds int64 (ids of 64-bit hashes; written as they are)."""
    kinds = {type(value) for value in values if value is not None}
    beyond = any(type(value) is int and not _INT64_MIN <= value <= _INT64_MAX for value in values)
    if (kinds <= {int, float} and not beyond) or kinds in ({str}, {bool}):
        return pa.array(values)
    return pa.array(
        [None if value is None else _json_bool(value) if isinstance(value, bool) else str(value) for value in values],
        pa.string(),
    )


def _read_datasets(path: Path, split: str | None) -> tuple[pa.Table, dict[str, list[str]]]:
    """A ``datasets`` directory as a table plus the names of its ClassLabel columns."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"task data {path} is not a datasets directory ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = sorted(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            shown = listed([Path(path) / name for name in splits], limit=3)
            raise ValueError(
                f"task data {path} holds splits {splits}: give the split's own directory ({shown}; augment also "
                f"takes --split){'' if split is None else f', not split {split!r}'}"
            )
        loaded = loaded[split]
    class_names = {
        column: list(feature.names)
        for column, feature in loaded.features.items()
        if isinstance(feature, datasets.ClassLabel)
    }
    return loaded.with_format("arrow")[:], class_names


def _augmented_label_names(table: pa.Table) -> dict[str, list[str]]:
    """An augmented set (``launch/augment.py``) stores class *ids* in ``label`` with its ``label_names`` in
    the file's ``dist_kd`` metadata; like a ``datasets`` ClassLabel, they are mapped by name. Read as names,
    ids would silently permute classes whose names look like integers (labels ``["1", "0"]``)."""
    metadata = parquet_metadata_of(table.schema.metadata) or {}
    if metadata.get("kind") != "augmented_task_data" or not metadata.get("label_names"):
        return {}
    return {"label": [str(name) for name in metadata["label_names"]]}


def _hf_label_names(path: Path, table: pa.Table) -> dict[str, list[str]]:
    """ClassLabel names that ``datasets`` (``Dataset.to_parquet``) keeps in a Parquet file's ``huggingface``
    metadata. The column holds class ids into those names, whose order is the dataset's own (MNLI's is
    entailment, neutral, contradiction; GLUE's processors', which the task uses, contradiction, entailment,
    neutral): they are mapped by name, as for a ``datasets`` directory."""
    raw = (table.schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return {}
    try:
        features = json.loads(raw)["info"]["features"]
        return {
            str(column): [str(name) for name in feature["names"]]
            for column, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"
        }
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"task data {path}: the 'huggingface' metadata of this Parquet file (written by datasets) cannot be "
            f"read ({type(err).__name__}: {err}), so its class ids cannot be named; write the file again with "
            "Dataset.to_parquet, or write the labels as names"
        ) from None


def read_raw_table(
    path: str | Path, spec: TaskSpec, encoding: str = "utf-8", split: str | None = None
) -> tuple[pa.Table, dict[str, list[str]]]:
    """The file's columns as stored, plus ClassLabel names for ``datasets`` columns that have them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"task data {path} does not exist (task '{spec.name}')")
    fmt = detect_format(path)
    if fmt == "datasets":
        return _read_datasets(path, split)
    if fmt == "parquet":
        table = pq.read_table(path)
        return table, {**_hf_label_names(path, table), **_augmented_label_names(table)}
    if fmt == "jsonl":
        return _read_jsonl(path, encoding), {}
    return _read_delimited(path, fmt, spec, encoding), {}


# -------------------------------------------------------------------------------------------- normalise


class RowPlaces:
    """Where rows of a loaded table are in the file, in words a user can find: ``line 7`` for TSV / CSV /
    JSONL (1-based, the header counted), ``row 7 (0-based)`` for Parquet and ``datasets``.

    Blank lines and quoted CSV fields that span lines make a row index differ from its line, and the fast
    readers count no lines, so the file is read again line by line, only when an error needs a position.
    """

    def __init__(self, path: Path, spec: TaskSpec, encoding: str, num_rows: int):
        self.path, self.spec, self.encoding, self.num_rows = path, spec, encoding, num_rows
        self.fmt = detect_format(path)
        self._lines: list[int] | None = None
        self._scanned = False

    def _scan(self) -> list[int] | None:
        text = _read_text(self.path, self.encoding)
        if self.fmt == "jsonl":
            lines = [number for number, _ in _jsonl_lines(text)]
        else:
            rows = _delimited_rows(text, self.fmt, self.path)
            if rows and not _headerless(rows[0][1], self.fmt, self.spec):
                rows = rows[1:]
            lines = [line for line, _ in rows]
        # The line reading saw other rows than the table (it should not): give no line rather than a wrong one.
        return lines if len(lines) == self.num_rows else None

    def lines(self) -> list[int] | None:
        """Start line of each table row, or None where the format has no lines or they cannot be told."""
        if not self._scanned and self.fmt in ("tsv", "csv", "jsonl"):
            self._scanned = True
            try:
                self._lines = self._scan()
            except (ValueError, csv.Error):
                self._lines = None
        return self._lines

    def __call__(self, rows: int | list[int], more: bool = False) -> str:
        """``line 3`` for one row, ``lines [3, 5, ...]`` for a list (``more``: the list is cut short)."""
        indices = rows if isinstance(rows, list) else [rows]
        lines = self.lines()
        if lines is not None:
            noun, numbers, note = "line", [lines[row] for row in indices], ""
        elif self.fmt in ("tsv", "csv"):
            noun, numbers, note = "data row", [row + 1 for row in indices], " (1-based, after the header)"
        elif self.fmt == "jsonl":
            noun, numbers, note = "record", [row + 1 for row in indices], " (1-based, blank lines not counted)"
        else:
            noun, numbers, note = "row", indices, " (0-based)"
        if not isinstance(rows, list):
            return f"{noun} {numbers[0]}{note}"
        shown = ", ".join(str(number) for number in numbers) + (", ..." if more else "")
        return f"{noun}s [{shown}]{note}"

    def subject(self, rows: list[int], limit: int = 10) -> str:
        """``line 3 has`` for one row, ``lines [3, 5, ...] have`` for more (at most ``limit`` shown): the start
        of an error sentence about these rows."""
        if len(rows) == 1:
            return f"{self(rows[0])} has"
        return f"{self(rows[:limit], more=len(rows) > limit)} have"


def has_pairs(table: pa.Table) -> bool:
    """Whether canonical task rows (``load_task_examples``) are sentence pairs: some row has a ``text_b``."""
    return table.column("text_b").null_count < table.num_rows


def _resolve_labels(
    values: list[Any], spec: TaskSpec, path: Path, names: list[str] | None, where: Callable[[int], str]
) -> list[Any]:
    """Raw label cells -> class indices (classification) or floats (regression); None stays None.
    ``where(row)`` says where a row is in the file, for the errors."""
    out: list[Any] = []
    if spec.type == "regression":
        # datasets' GLUE writes STS-B's unlabelled test rows as the score -1.0 (a ClassLabel's -1 elsewhere); a
        # similarity score is 0-5, so -1 is no label there, not a score to compare predictions with.
        no_score = -1.0 if glue_key(spec.name) == "stsb" else None
        for row, value in enumerate(values):
            if value is None or (isinstance(value, str) and not value.strip()):
                out.append(None)
                continue
            if isinstance(value, bool):
                raise ValueError(
                    f"task data {path}: {where(row)}, column '{spec.label}' holds the boolean {_json_bool(value)}, "
                    f"expected a number (task '{spec.name}' is regression); write the score as a number"
                )
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"task data {path}: {where(row)}, column '{spec.label}' holds {value!r}, expected a number "
                    f"(task '{spec.name}' is regression)"
                ) from None
            if not math.isfinite(number):
                raise ValueError(
                    f"task data {path}: {where(row)}, column '{spec.label}' holds {value!r}, expected a finite number "
                    f"(task '{spec.name}' is regression)"
                )
            out.append(None if number == no_score else number)
        return out
    index_of = {label: i for i, label in enumerate(spec.labels)}
    # Labels named by numbers (["1", "2"], or ["0.0", "0.5", "1.0"] as YAML writes floats) match a numeric cell
    # by value: 1, 1.0 and "1.00" are the label "1" (or "1.0"). Integer ids are accepted only when no label name
    # is itself a number: with labels ["1", "2"], the cell "1" must mean the label named "1", and a cell "0" is
    # an error, not label "1".
    value_of = {number: i for i, label in enumerate(spec.labels) if (number := _as_number(label)) is not None}
    ids_allowed = not value_of
    for row, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            out.append(None)
            continue
        if names is not None:
            # datasets ClassLabel: ints index the dataset's own names (-1 = no label); map by name so a
            # dataset whose label order differs from the task's cannot permute classes.
            if int(value) < 0:
                out.append(None)
                continue
            if int(value) >= len(names):
                raise ValueError(
                    f"task data {path}: {where(row)}, column '{spec.label}' holds class id {value}, but the file "
                    f"names only {len(names)} classes {names}"
                )
            value = names[int(value)]
        if isinstance(value, bool):
            value = _bool_label(value, spec, path, where(row))
        key = str(value).strip()
        if key in index_of:
            out.append(index_of[key])
            continue
        if (number := _as_number(key)) is not None and number in value_of:
            out.append(value_of[number])
            continue
        key = _cell_key(value)
        number = _as_int(key)
        if ids_allowed and number is not None and 0 <= number < len(spec.labels):
            out.append(number)
            continue
        allowed = f"{spec.labels}" + (f" or their ids 0..{len(spec.labels) - 1}" if ids_allowed else "")
        raise ValueError(
            f"task data {path}: {where(row)}, column '{spec.label}' holds unknown label {value!r}; "
            f"task '{spec.name}' allows {allowed}"
        )
    return out


def _json_bool(value: bool) -> str:
    return "true" if value else "false"


def _bool_label(value: bool, spec: TaskSpec, path: Path, place: str) -> str:
    """A boolean label cell (JSON ``true``, a Parquet bool) -> the task's label named ``true`` / ``false``.

    ``str(True)`` is ``"True"``, which matched no label ``true``; and a boolean is never read as the id 0 or
    1, which would silently put it on whatever labels ``["no", "yes"]`` or ``["1", "0"]`` hold at that index.
    """
    word = _json_bool(value)
    if word in spec.labels:
        return word
    matches = [label for label in spec.labels if label.lower() == word]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(
        f"task data {path}: {place}, column '{spec.label}' holds the boolean {word}, which matches only a label "
        f"named '{word}' (any case); task '{spec.name}' has labels {spec.labels}; name the task's labels false,true "
        "or write the labels in the file as label names"
    )


def _cell_key(value: Any) -> str:
    """A label cell as the text of a class id where it is a whole number: the float 1.0 (JSONL, Parquet) and
    the text "1.0" (pandas writes an int column holding a missing value as floats to CSV) are id 1 alike."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    number = _as_number(text)
    return str(int(number)) if number is not None and number.is_integer() else text


def _as_number(text: str) -> float | None:
    """``text`` as a finite number, or None (``"nan"``, ``"inf"`` and words are no number here)."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


class MissingColumnError(ValueError):
    """Task data lacks a column the task names; ``role`` is the spec field (``text_a``, ``label``, ...)."""

    def __init__(self, message: str, role: str, column: str, columns_found: list[str]):
        super().__init__(message)
        self.role = role
        self.column = column
        self.columns_found = columns_found


def _column(table: pa.Table, name: str, path: Path, spec: TaskSpec, role: str) -> list[Any]:
    if name not in table.column_names:
        raise MissingColumnError(
            f"task data {path} has no column '{name}' ({role} of task '{spec.name}'); columns found: "
            f"{table.column_names}. Map the column with --{role.replace('_', '-')} or the task config's '{role}' key",
            role,
            name,
            list(table.column_names),
        )
    return table.column(name).to_pylist()


def task_schema(spec: TaskSpec) -> pa.Schema:
    """Arrow schema of :func:`load_task_examples` output: int64 labels for classification, float64 else."""
    label_type = pa.int64() if spec.type == "classification" else pa.float64()
    return pa.schema(
        [("example_id", pa.string()), ("text_a", pa.string()), ("text_b", pa.string()), ("label", label_type)]
    )


def glue_key(name: str) -> str | None:
    """The GLUE registry's key for a task name (case-insensitive, ``sst-2`` as ``sst2``), or None."""
    key = name.lower().replace("-", "")
    return key if key in GLUE_TASKS else None


def _glue_columns_of(spec: TaskSpec, columns: list[str]) -> TaskSpec:
    """A GLUE task read from a file that lacks a registry column (the TSV's) but has the one ``datasets`` saves
    GLUE with reads that: MRPC's ``label``, ``sentence1``, ``sentence2`` for the TSV's ``Quality``,
    ``#1 String``, ``#2 String``; MNLI's ``premise``, ``hypothesis``; QQP's ids ``idx`` for ``id``; or
    ``text_b``. ``--label label`` cannot name it, since a column left at its default means the registry's; a
    column the user named is kept."""
    key = glue_key(spec.name)
    if key is None:
        return spec
    base = GLUE_TASKS[key]
    text_a, text_b = GLUE_DATASETS_TEXT_COLUMNS.get(key, (None, None))
    moved = {}
    roles = (("label", ["label"]), ("text_a", [text_a]), ("text_b", [text_b, DEFAULT_TEXT_B]), ("id_column", ["idx"]))
    for role, others in roles:
        named = getattr(spec, role)
        if named is None or named != getattr(base, role) or named in columns:
            continue
        found = [other for other in others if other is not None and other in columns]
        if found:
            moved[role] = found[0]
    return dataclasses.replace(spec, **moved) if moved else spec


def _datasets_class_names(spec: TaskSpec) -> list[str] | None:
    """``datasets``' ClassLabel names for the ids of a GLUE task with the registry's labels (SST-2's negative,
    positive for 0, 1), or None (another task, or a GLUE task whose labels are names already)."""
    key = glue_key(spec.name)
    if key is None or spec.labels != GLUE_TASKS[key].labels:
        return None
    return GLUE_DATASETS_CLASS_NAMES.get(key)


def _glue_class_names(spec: TaskSpec, names: list[str] | None) -> list[str] | None:
    """ClassLabel names of a GLUE task's file, as the task's labels where they are ``datasets``' GLUE names for
    the TSV's ids (SST-2's negative, positive are 0, 1); any other names are kept, to be mapped by name."""
    if names is None or names != _datasets_class_names(spec):
        return names
    return list(spec.labels)


def _texts(values: list[Any], path: Path, where: RowPlaces, column: str | None, role: str) -> list[Any]:
    """A text column's cells as str (None stays None). Scalars (a CSV column of digits read as numbers) become
    their text, bytes (Parquet written by Hive or Spark with strings as binary) are decoded as UTF-8, and a list
    or a record is an error naming the rows: their Python form ("['a', 'b']", "b'...'") was trained on.
    """
    out: list[Any] = []
    bad: list[int] = []
    for row, value in enumerate(values):
        if value is None or isinstance(value, str):
            out.append(value)
        elif isinstance(value, bytes | bytearray):
            try:
                out.append(bytes(value).decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"task data {path}: {where(row)} holds bytes in column '{column}' ({role}) that are not UTF-8 "
                    f"text ({err.reason} at byte {err.start}); store the texts as strings"
                ) from None
        elif isinstance(value, list | tuple | dict):
            out.append(None)
            bad.append(row)
        else:  # a number, a boolean, a decimal: its text, as before
            out.append(str(value))
    if bad:
        kind = type(values[bad[0]]).__name__
        raise ValueError(
            f"task data {path}: {where.subject(bad)} a {kind} in column '{column}' ({role}), not a text; give one "
            "string per row"
        )
    return out


def load_task_examples(
    path: str | Path,
    spec: TaskSpec,
    *,
    require_labels: bool = True,
    require_label_column: bool | None = None,
    encoding: str = "utf-8",
    split: str | None = None,
) -> pa.Table:
    """Load task data into the normalised shape every stage uses.

    Args:
        path: a ``.tsv`` / ``.csv`` / ``.jsonl`` (``.json`` lines) / ``.parquet`` file, or a directory saved
            with ``datasets`` (``Dataset.save_to_disk``; for a ``DatasetDict`` pass ``split``).
        spec: the task (columns, type, label order).
        require_labels: if True, the label column must exist and every row must have a label; if False
            (test sets), a missing label column or empty cells give null labels.
        require_label_column: if True, the spec's label column must exist even when cells may be empty
            (augmented rows have none); default: ``require_labels``.
        encoding: text encoding of TSV / CSV / JSONL files.
        split: split of a ``DatasetDict`` directory (optional when it has one split).

    Returns:
        A table with the schema :func:`task_schema`: ``example_id`` (string: the spec's id column, else an
        ``example_id`` column in the file, else ``"<task>-<row index>"``), ``text_a`` (string), ``text_b``
        (string or null), ``label`` (int64 index into ``spec.labels``, or float64 for regression; null only
        when ``require_labels`` is False). Rows keep the file's order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unknown format, no rows, a missing column (:class:`MissingColumnError`, naming the file,
            the column and the columns found), an unknown label (naming the file, row, label and the allowed
            labels), a missing label or text, or duplicate example ids.
    """
    path = Path(path)
    raw, class_names = read_raw_table(path, spec, encoding=encoding, split=split)
    if raw.num_rows == 0:
        raise ValueError(f"task data {path} has no examples (task '{spec.name}'); columns found: {raw.column_names}")
    num_rows = raw.num_rows
    spec = _glue_columns_of(spec, raw.column_names)
    where = RowPlaces(path, spec, encoding, num_rows)

    text_a = _column(raw, spec.text_a, path, spec, "text_a")
    if spec.text_b is None or (spec.text_b == DEFAULT_TEXT_B and spec.text_b not in raw.column_names):
        text_b: list[Any] = [None] * num_rows
    else:
        text_b = _column(raw, spec.text_b, path, spec, "text_b")
    if require_label_column is None:
        require_label_column = require_labels
    # Every missing column is an error before the rows' warnings (a caller that retries without the label
    # column, as precompute does, would say them twice).
    has_labels = spec.label is not None and (require_label_column or spec.label in raw.column_names)
    label_cells = _column(raw, spec.label, path, spec, "label") if has_labels else None
    for row, value in enumerate(text_a):
        if value is None:
            raise ValueError(
                f"task data {path}: {where(row)} has no text in column '{spec.text_a}' (text_a); "
                "fill it in or drop the row"
            )
    text_a = _texts(text_a, path, where, spec.text_a, "text_a")
    text_b = _texts(text_b, path, where, spec.text_b, "text_b")
    empty = [row for row, value in enumerate(text_a) if not value.strip()]
    if empty:
        logger.warning(
            "task data %s: %s an empty text in column '%s' (text_a); they are kept, as [CLS] [SEP] alone",
            path, where.subject(empty), spec.text_a,
        )  # fmt: skip
    # CSV / TSV write a missing value as an empty cell: a text_b column left empty in every row (pandas writes
    # one for single-text data) holds no second texts, as null in JSONL, not pairs "[CLS] a [SEP] [SEP]". A
    # pair task with some empty second texts keeps them, "[CLS] a [SEP] [SEP]", as a tokenizer called on the
    # batch (texts, second_texts) does (called on one pair, (a, "") it drops the empty second text).
    if where.fmt in ("tsv", "csv") and all(not value for value in text_b):
        text_b = [None] * num_rows
    unpaired = [row for row, value in enumerate(text_b) if value is None]
    if 0 < len(unpaired) < num_rows:  # a pair task's rows without a second text: read (and scored) as single texts
        logger.warning(
            "task data %s: %s no second text in column '%s' (text_b) where the other rows have one; they are read "
            "as single texts", path, where.subject(unpaired), spec.text_b,
        )  # fmt: skip

    if label_cells is None:
        labels: list[Any] = [None] * num_rows
    else:
        column_names = _glue_class_names(spec, class_names.get(spec.label))
        labels = _resolve_labels(label_cells, spec, path, column_names, where)
        if require_labels:
            missing = [row for row, value in enumerate(labels) if value is None]
            if missing:
                raise ValueError(
                    f"task data {path}: {where.subject(missing)} no label in column '{spec.label}', and every row "
                    "needs one here (training and dev data): label them or leave them out (rows without labels, "
                    "such as test data, go to dist-kd precompute or evaluate, which take them)"
                )
    if spec.label is None and require_labels:
        raise ValueError(f"task '{spec.name}' has no label column (label: null) but labels are required")

    id_column = spec.id_column or (DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in raw.column_names else None)
    if id_column is not None:
        values = _column(raw, id_column, path, spec, "id_column")
        missing = [row for row, value in enumerate(values) if value is None]
        if missing:  # str(None) gave every such row the id 'None'
            raise ValueError(f"task data {path}: {where.subject(missing)} no id in column '{id_column}'; fill it in")
        ids = [str(value) for value in values]
        if len(set(ids)) != num_rows:
            seen: set[str] = set()
            duplicate = next(value for value in ids if value in seen or seen.add(value))
            rows = [row for row, value in enumerate(ids) if value == duplicate]
            raise ValueError(
                f"task data {path}: column '{id_column}' repeats the id {duplicate!r} "
                f"({where(rows[:10], more=len(rows) > 10)}); ids must be unique"
            )
    else:
        ids = [f"{spec.name}-{row}" for row in range(num_rows)]
    return pa.table({"example_id": ids, "text_a": text_a, "text_b": text_b, "label": labels}, schema=task_schema(spec))
