"""The stop check's agreement: any rank's flag reaches every rank (2 gloo ranks)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.distributed


def test_any_rank_is_the_or_of_every_rank(ranks, tmp_path):
    proc = ranks("any_rank.py", str(tmp_path))
    # init_distributed on CPU ranks: DeepSpeed's own notices, said on every rank of every run, stay out of the
    # output ("Setting accelerator to CPU. If you have GPU ...", "... deepspeed_shm_comm_op built successfully")
    said = proc.stdout + proc.stderr
    assert "Setting accelerator" not in said and "built successfully" not in said, said
    expected = {"none": False, "only_last_rank": True, "only_rank_0": True, "all": True}
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
