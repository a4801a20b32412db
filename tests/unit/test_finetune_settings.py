"""What makes an exported teacher reusable, and the advice a diverged teacher's error gives."""

from __future__ import annotations

import dataclasses

import pytest

from dist_kd.data.tasks import TaskSpec
from dist_kd.train.finetune import FinetuneConfig, _differing, _steadier


def _params(**task):
    spec = TaskSpec(name="demo", labels=["neg", "pos"], **task)
    return {"task": dataclasses.asdict(spec), "lr": 1e-3}


def test_the_metric_and_the_id_column_do_not_make_a_teacher_another():
    """Training reads no ids: a rerun with --id-column alone was refused ("task.id_column differ")."""
    assert _differing(_params(id_column="id", metric="f1"), _params()) == []
    assert _differing(_params(label="y"), _params()) == ["task.label"]
    assert _differing({**_params(), "lr": 1e-4}, _params()) == ["lr"]


def test_the_advice_names_only_settings_that_would_change_something():
    on_cpu = FinetuneConfig()
    assert _steadier(on_cpu, "fp32") == "a lower --lr (this run: 2e-05)"
    unclipped = FinetuneConfig(clip=0.0)
    assert _steadier(unclipped, "bf16") == (
        "a lower --lr (this run: 2e-05), gradient clipping (--clip 1.0; off in this run) or --precision fp32 "
        "(this run: bf16)"
    )


@pytest.mark.parametrize("seeds", [[1, -1], [1, 2**63], [1, True], [1, 2.5]])
def test_seeds_no_generator_takes_are_refused_at_once(seeds):
    with pytest.raises(ValueError, match=r"seeds \(--seeds\) must be whole numbers in 0..2\*\*63-1"):
        FinetuneConfig(num_teachers=2, seeds=seeds)


def test_two_teachers_of_one_seed_and_dropout_are_refused_and_of_one_seed_alone_are_not():
    with pytest.raises(ValueError, match=r"^teachers 1 and 3 have the same seed and dropout \(7, 0.1\)"):
        FinetuneConfig(num_teachers=3, seeds=[7, 8, 7])
    with pytest.raises(ValueError, match=r"^teachers 2 and 3 have the same seed and dropout \(1, 0.2\)"):
        FinetuneConfig(num_teachers=3, seeds=[1, 1, 1], dropouts=[0.1, 0.2, 0.2])
    assert FinetuneConfig(num_teachers=2, seeds=[1, 1], dropouts=[0.1, 0.2]).seeds == [1, 1]  # other dropouts


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"num_teachers": 0}, "num_teachers (--num-teachers) must be >= 1, got 0"),
        ({"epochs": 0}, "epochs (--epochs) must be >= 1, got 0"),
        ({"max_steps": 0}, "max_steps (--max-steps) must be >= 1, or None for whole epochs, got 0"),
        ({"dropouts": [0.1, 1.0]}, r"dropouts (--dropouts) must lie in [0, 1), got [0.1, 1.0]"),
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1, got 0"),  # a setting of the API alone
    ],
)
def test_a_setting_out_of_range_is_named_with_its_flag(settings, said):
    """Field names alone ("max_steps must be >= 1 or null"), which no command-line user can pass."""
    with pytest.raises(ValueError) as caught:
        FinetuneConfig(**({"num_teachers": 2} | settings))
    assert str(caught.value) == said


def test_the_command_refuses_counts_below_one_as_it_parses():
    """--num-teachers, --epochs and --max-steps 0 went on to the settings' checks, named by their fields."""
    from launch.finetune import parse_args

    needed = ["--train", "t", "--dev", "d", "--base", "b", "--output", "o", "--task", "demo"]
    for flag in ("--num-teachers", "--epochs", "--max-steps"):
        with pytest.raises(SystemExit):
            parse_args([*needed, flag, "0"])
        assert getattr(parse_args([*needed, flag, "3"]), flag[2:].replace("-", "_")) == 3
