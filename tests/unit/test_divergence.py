"""A diverged student (weights no longer finite) stops the run before a save, an evaluation or a log line."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from dist_kd.train.common import Diverged, DivergenceGuard, weights_finite

TRAIN = SimpleNamespace(lr=5e-5, clip=1.0, precision="bf16")


def _module(poison: float | None = None) -> torch.nn.Module:
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    if poison is not None:
        with torch.no_grad():
            module[1].weight[2] = poison
    return module


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
def test_weights_finite_finds_one_bad_value(poison):
    assert weights_finite(_module()) and not weights_finite(_module(poison))


def test_a_zero3_partition_is_what_a_rank_checks():
    """Under ZeRO-3 a parameter's own tensor is empty; this rank's part of it is ``ds_tensor``."""
    module = _module()
    module[0].weight.ds_tensor = torch.tensor([1.0, math.nan])
    assert not weights_finite(module)


def test_a_log_line_with_a_nan_loss_stops_a_diverged_run_and_names_its_last_checkpoint(tmp_path):
    step = tmp_path / "checkpoints" / "step-00000020"
    step.mkdir(parents=True)
    (step / "meta.json").write_text('{"step": 20}')
    (step / "rank00000.pt").write_bytes(b"state")
    guard = DivergenceGuard(_module(math.nan), tmp_path, TRAIN)
    guard.after_log({"step": 30, "loss": 1.5})  # a finite loss: no check
    with pytest.raises(Diverged) as stopped:
        guard.after_log({"step": 30, "loss": math.nan})
    said = str(stopped.value)
    assert said.startswith("the student diverged by step 30: its weights are no longer finite (nan or inf; its loss")
    assert f"{step} is its last checkpoint" in said and "lower train.lr (this run: 5e-05)" in said
    assert "train.precision=fp32 (this run: bf16)" in said
    with pytest.raises(Diverged, match=r"found before its checkpoint\)\. Nothing of it was saved"):
        guard.before("its checkpoint", 31)


def test_a_nan_loss_with_finite_weights_is_a_warning(tmp_path, caplog):
    """fp16's loss scaling skips a step whose gradients overflowed: the weights stay as they were."""
    guard = DivergenceGuard(_module(), tmp_path, TRAIN)
    with caplog.at_level(logging.WARNING):
        guard.after_log({"step": 7, "loss": math.inf})
        guard.before("its checkpoint", 7)
    assert "the loss was inf in the steps up to 7, but the weights are finite" in caplog.text
    with pytest.raises(Diverged, match="it saved no checkpoint"):
        DivergenceGuard(_module(math.nan), tmp_path, TRAIN).before("the dev evaluation", 8)
