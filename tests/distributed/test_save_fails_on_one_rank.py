"""A checkpoint write that fails on one rank inside DeepSpeed's save (a full disk) hung every rank: the failed
rank went on to the agreement on the save's outcome while the others waited in DeepSpeed's last barrier, until
the process group's timeout (30 minutes by default), without a word. Every rank must raise the same one-line
error at once, stay in step, and keep the checkpoint before as the newest whole one. Real DeepSpeed engines on
2 CPU ranks, so the test follows DeepSpeed's own barriers."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    ("zero", "rank", "file_part"),
    [
        ("zero0", 0, "mp_rank_00_model_states.pt"),  # at ZeRO-0 rank 0 alone writes the model and optimizer
        ("zero2", 1, "zero_pp_rank_1_mp_rank_00_optim_states.pt"),  # a ZeRO-2 rank's own optimizer shard
    ],
)  # fmt: skip
def test_a_write_failing_on_one_rank_inside_deepspeeds_save_stops_every_rank(ranks, tmp_path, zero, rank, file_part):
    from dist_kd.train import checkpoint as ckpt

    ranks("save_fails_on_one_rank.py", str(tmp_path), f"ds_configs/{zero}.json", str(rank), file_part, timeout=240)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["outcome"] for r in results] == ["CheckpointSaveError disk_full=True"] * 2, results
    assert all(math.isfinite(r["after"]) for r in results)
    checkpoints = tmp_path / "checkpoints"
    assert [step for step, _ in ckpt.step_checkpoints(checkpoints)] == [1]
    assert ckpt.latest_checkpoint(checkpoints) == checkpoints / "step-00000001"
    assert not list(checkpoints.glob(".tmp-*")), "the unfinished save is removed"
