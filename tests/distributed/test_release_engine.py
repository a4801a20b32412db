"""``release_engine`` frees a DeepSpeed engine in a process that goes on (an ensemble's teachers are trained
one after another in one process): no reference to the engine, its module or its parameters survives, under
ZeRO 0, 2 and 3, while another engine in the same process keeps training. Dropping the last reference alone
leaves ZeRO-2/3 engines alive (DeepSpeed's gradient hooks, ZeRO-3's module stack): a teacher's weights,
fp32 masters and optimizer states each time. The model's one-element bias also checks that the fp32 masters
start as built when a ZeRO-3 partition is all padding (DeepSpeed's own setter fails there)."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(("zero", "precision", "nproc"), [("zero0", "fp32", 1), ("zero2", "bf16", 2),
                                                          ("zero3", "bf16", 2)])  # fmt: skip
def test_release_engine_frees_it_and_the_engine_beside_it_trains_on(ranks, tmp_path, zero, precision, nproc):
    ranks("release_engine.py", str(tmp_path), f"ds_configs/{zero}.json", precision, nproc=nproc)
    for rank in range(nproc):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["seeded_exactly"], (rank, "the fp32 masters did not start as the weights were built")
        assert result["first_freed"], (rank, "the released engine is still referenced")
        assert result["second_freed"], (rank, "the engine released last is still referenced")
        losses = result["second_losses"]
        assert all(math.isfinite(loss) for loss in losses)
        assert losses[-1] < losses[0], (rank, "the engine beside the released one stopped learning", result)
