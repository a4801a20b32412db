"""Score a fine-tuned or distilled classifier on task data, and write its predictions.

    python launch/evaluate.py --model runs/task/tasks/topic --task topic --data data/bbc/dev.csv \
        --text-a text --label category --output runs/task/eval-topic

``--model`` is any HF ``*ForSequenceClassification`` directory with a tokenizer (``tasks/<name>/`` or
``best/<name>/`` of a task run, a fine-tuned teacher). Its ``id2label`` names the classes unless ``--labels`` (or a
GLUE task's registry) gives them, which it must then name (outputs in another order are read by name); a one-output
model without a ``problem_type`` is a regression, as transformers trains it. A task run's classifier holds
``task.json``: the column, metric and length flags not given take what it was trained with, and data without the
second texts a pair classifier was trained on is refused. Prints the task metrics as JSON; with ``--output`` writes
``predictions.jsonl`` (one line per row) and ``metrics.json`` into that directory, replacing a previous evaluation
there as a whole; an ``--output`` that is a file, or a directory holding other files, is refused. Rows without a
label (a test set) get predictions and no metrics, as does data without the default ``label`` column; a file where
only some rows lack one is scored over its labelled rows, with a warning; a ``--label`` column the data lacks is an
error. Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if (Path(__file__).resolve().parents[1] / "dist_kd" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_kd.cli import (  # noqa: E402
    add_log_level_argument,
    add_task_arguments,
    bad_input,
    configure_logging,
    positive_int,
    task_spec_from_args,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF *ForSequenceClassification directory with tokenizer")
    parser.add_argument("--data", required=True, help="task data file or datasets directory")
    parser.add_argument(
        "--output", default=None, help="directory for predictions.jsonl and metrics.json (replaces an earlier one's)"
    )
    add_task_arguments(parser, metric=True, labels_help="comma-separated label names (default: the model's id2label)")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="rows per forward pass")
    parser.add_argument(
        "--max-length", type=positive_int, default=None,
        help="truncation length in pieces (default: the length in the model's task.json, else 128)",
    )  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    add_log_level_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(0, level=args.log_level)  # as the other commands: transformers' bars at a terminal only
    import torch

    from dist_kd.data.tasks import glue_key
    from dist_kd.predict import evaluate_classifier, read_task_record

    try:
        _trained_defaults(args, read_task_record(args.model))
        labels = task_type = None
        if args.labels is None and glue_key(args.task) is None:
            labels, task_type = _model_labels(args.model, args.task_type)
        spec = task_spec_from_args(args, labels=labels, task_type=task_type)
        device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        report = evaluate_classifier(args.model, spec, args.data, batch_size=args.batch_size,
                                     max_length=args.max_length, device=device, output=args.output,
                                     label_optional=args.label_optional, id_optional=args.id_optional)  # fmt: skip
    except (ValueError, OSError) as err:  # OSError: an output it cannot write
        return bad_input(err)
    print(json.dumps(report, indent=2))
    return 0


def _trained_defaults(args: argparse.Namespace, record: dict | None) -> None:
    """Flags not given take what the model's task record says it was trained with (a task run's classifier):
    the text, label and id columns and the metric (the truncation length: evaluate_classifier reads it)."""
    task = (record or {}).get("task") or {}
    if args.text_a is None and task.get("text_a"):
        args.text_a = task["text_a"]
    if not args.text_b_given and "text_b" in task:
        args.text_b = task["text_b"]
    # A column the user named must exist; one not named may be missing (None: evaluate_classifier's rule, which
    # makes a GLUE task's own column, as MRPC's Quality, optional: its test splits have none).
    args.label_optional = False if args.label_given else None
    if not args.label_given and task.get("label"):  # missing from the data: a test set, as the default column
        args.label, args.label_optional = task["label"], True
    args.id_optional = False
    if args.id_column is None and task.get("id_column"):  # missing from the data: its rows are numbered
        args.id_column, args.id_optional = task["id_column"], True
    if args.metric is None and task.get("metric"):
        args.metric = task["metric"]


def _model_labels(model: str, task_type: str | None) -> tuple[list[str] | None, str | None]:
    """A custom task without --labels takes the label order the model carries, or is a regression where the
    model is one: ``problem_type`` regression, or (as transformers reads it) one output and no problem_type."""
    from transformers import AutoConfig

    from dist_kd.models.teacher import check_model_dir
    from dist_kd.predict import check_classifier, teacher_label_names

    config = AutoConfig.from_pretrained(check_model_dir(model, "--model"))
    check_classifier(config, model)  # an encoder's default LABEL_0, LABEL_1 are no labels to take
    problem_type = getattr(config, "problem_type", None)
    regression = problem_type == "regression" or (problem_type is None and config.num_labels == 1)
    if task_type == "regression" or (task_type is None and regression):
        return None, "regression"
    return teacher_label_names(config, model), "classification"


if __name__ == "__main__":
    sys.exit(main())
