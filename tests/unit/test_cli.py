"""dist_kd.cli: the task flags every task-data command shares mean the same everywhere."""

from __future__ import annotations

import argparse

import pytest

from dist_kd.cli import add_task_arguments, bad_input, task_spec_from_args


def _parse(argv, **options):
    parser = argparse.ArgumentParser()
    add_task_arguments(parser, **options)
    return parser.parse_args(argv)


def test_custom_task_from_flags():
    args = _parse(["--task", "topic", "--labels", "b,a", "--text-a", "body", "--text-b", "none", "--label", "y"])
    spec = task_spec_from_args(args)
    assert (spec.name, spec.labels, spec.text_a, spec.text_b, spec.label) == ("topic", ["b", "a"], "body", None, "y")
    assert spec.type == "classification"


def test_glue_task_keeps_registry_columns_and_order():
    spec = task_spec_from_args(_parse(["--task", "sst2"]))
    assert spec.labels == ["0", "1"] and spec.text_b is None


def test_fallback_labels_only_when_flags_do_not_give_them():
    args = _parse(["--task", "topic"], metric=True)
    assert task_spec_from_args(args, labels=["x", "y", "z"]).labels == ["x", "y", "z"]
    args = _parse(["--task", "topic", "--labels", "p,q", "--metric", "f1"], metric=True)
    spec = task_spec_from_args(args, labels=["x", "y", "z"])
    assert spec.labels == ["p", "q"] and spec.metric == "f1"
    assert task_spec_from_args(_parse(["--task", "score"]), task_type="regression").type == "regression"


def test_unlabeled_only_where_allowed():
    assert task_spec_from_args(_parse(["--task", "sst2", "--label", "none"], unlabeled=True)).label is None
    assert _parse(["--task", "sst2", "--label", "none"]).label == "none"  # a column literally named none


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    assert bad_input(ValueError("data.tsv: column 'text' is missing")) == 2
    assert capsys.readouterr().err == "error: data.tsv: column 'text' is missing\n"
    assert bad_input(ValueError("quiet"), show=False) == 2
    assert capsys.readouterr().err == ""


def test_metric_flag_only_where_asked():
    with pytest.raises(SystemExit):
        _parse(["--task", "sst2", "--metric", "f1"])
