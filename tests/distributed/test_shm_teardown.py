"""A multi-rank CPU run leaves nothing in /dev/shm. DeepSpeed's shared-memory all-reduce creates a ~70 MB
file per rank when all ranks are on one node and never unlinks it; ``distributed.teardown`` does, after the
final barrier. The worker first checks that the files exist under the names ``shm_buffer_path`` gives (so the
check below looks at the right files), then tears down; afterwards none may remain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def test_teardown_unlinks_every_ranks_shared_memory_buffer(ranks, tmp_path):
    ranks("shm_teardown.py", str(tmp_path), env={"LOCAL_SIZE": "2"})  # what the deepspeed launcher sets
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, record in enumerate(records):
        assert record["existed"] == [True, True], (rank, "DeepSpeed's buffers are not where expected", record)
        assert record["summed"], (rank, "the all-reduce through the shared buffers is wrong")
    left = [path for path in records[0]["paths"] if Path(path).exists()]
    assert not left, f"shared-memory buffers left behind: {left}"
