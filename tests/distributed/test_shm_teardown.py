"""A multi-rank CPU run leaves nothing in /dev/shm, however it ends. DeepSpeed's shared-memory all-reduce
creates a ~70 MB file per rank when all ranks are on one node and never unlinks it; ``init_distributed``
unlinks each rank's once every rank has mapped them all. The worker reads ``/proc/self/maps``: each rank has
mapped every buffer under the names ``shm_buffer_path`` gives (so the check looks at the right files) and
the kernel already marks them deleted, while the all-reduce through them still sums right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed


def _records(out: Path) -> list[dict]:
    records = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, record in enumerate(records):
        assert all(m["mapped"] for m in record["maps"]), (rank, "DeepSpeed's buffers are not where expected", record)
        assert all(m["deleted"] for m in record["maps"]), (rank, "a buffer was not unlinked at start", record)
        assert record["exist"] == [False, False], (rank, record)
        assert record["summed"], (rank, "the all-reduce through the shared buffers is wrong")
    return records


def test_buffers_are_unlinked_as_the_group_starts(ranks, tmp_path):
    ranks("shm_teardown.py", str(tmp_path), env={"LOCAL_SIZE": "2"})  # what the deepspeed launcher sets
    left = [path for path in _records(tmp_path)[0]["paths"] if Path(path).exists()]
    assert not left, f"shared-memory buffers left behind: {left}"


def test_a_killed_run_leaves_no_buffer(ranks, tmp_path):
    with pytest.raises(pytest.fail.Exception, match="exit code"):
        ranks("shm_teardown.py", str(tmp_path), "--kill", env={"LOCAL_SIZE": "2"})
    left = [path for path in _records(tmp_path)[0]["paths"] if Path(path).exists()]
    assert not left, f"a SIGKILLed run left shared-memory buffers: {left}"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc (Linux)")
@pytest.mark.parametrize("how", ["init_distributed", "init_process_group", "started_elsewhere", "api_exit"])
def test_the_groups_threads_end_with_it(ranks, tmp_path, how):
    """A model class loaded after the group started (or a group started before dist_kd was imported) does not
    keep the group alive past ``teardown``, nor past the end of a script that never calls it: its worker threads
    would otherwise outlive the interpreter's shutdown, where a rare one aborts the process."""
    ranks("group_teardown.py", str(tmp_path), how)
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["started"], (rank, "no gloo threads at start: the check would look at the wrong names")
        assert record["after_end"] == [], (rank, record)


def test_a_group_of_several_ranks_is_not_started_again_after_teardown(ranks, tmp_path):
    """api.general, teardown(), api.general under a launcher: the ranks met again at the launcher's MASTER_PORT,
    where one could reach the old group's store, still alive until the collector ran ("Gloo connectFullMesh
    failed", or a hang). Refused on every rank in one line instead (a one-process run starts again)."""
    ranks("group_teardown.py", str(tmp_path), "start_again")
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["again"].startswith("a process group of 2 ranks cannot start again in a process where "
                                          "dist_kd.distributed.teardown() ended one"), record  # fmt: skip
        assert record["after_end"] == [], record
