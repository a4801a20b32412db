"""distributed.shared_failure: a failure of rank 0's write reaches every rank as the same error (two gloo
processes meeting through a file store: no port)."""

from __future__ import annotations

import errno
import multiprocessing
import os

import pytest


def _rank(rank: int, store: str, fail: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    from dist_kd import distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        with distributed.shared_failure():
            if rank == 0 and fail == "disk":
                raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/student")
            if rank == 0 and fail == "value":
                raise ValueError("teacher.path models/t has no config.json")
        outcome = ("ok",)
    except OSError as err:
        outcome = ("OSError", err.errno, err.strerror, err.filename)
    except ValueError as err:
        outcome = ("ValueError", str(err))
    # Both ranks are still in step: the next collective completes.
    distributed.barrier()
    dist.destroy_process_group()
    results.put((rank, outcome))


@pytest.mark.parametrize("fail", ["disk", "value", "none"])
def test_rank_0_failure_reaches_every_rank(tmp_path, fail):
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_rank, args=(r, str(tmp_path / "store"), fail, results)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)  # a guard against a hang, not a measurement
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive and all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    outcomes = dict(results.get(timeout=5) for _ in procs)
    expected = {
        "disk": ("OSError", errno.ENOSPC, "No space left on device", "/runs/x/student"),
        "value": ("ValueError", "teacher.path models/t has no config.json"),
        "none": ("ok",),
    }[fail]
    assert outcomes == {0: expected, 1: expected}
