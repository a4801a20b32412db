"""distributed.shared_failure: a failure of rank 0's write reaches every rank as the same error (two gloo
processes meeting through a file store: no port)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import time

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


def _two_ranks(target, *args) -> dict:
    """Run ``target(rank, *args, results)`` in two spawned processes; each puts ``(rank, outcome)`` on the queue.
    Returns ``{rank: outcome}``; both must exit 0 within the guard's time."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=target, args=(rank, *args, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)  # a guard against a hang, not a measurement
    alive = [proc for proc in procs if proc.is_alive()]
    for proc in alive:
        proc.kill()
    assert not alive and all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return dict(results.get(timeout=5) for _ in procs)


@pytest.mark.parametrize("fail", ["disk", "value", "none"])
def test_rank_0_failure_reaches_every_rank(tmp_path, fail):
    outcomes = _two_ranks(_rank, str(tmp_path / "store"), fail)
    expected = {
        "disk": ("OSError", errno.ENOSPC, "No space left on device", "/runs/x/student"),
        "value": ("ValueError", "teacher.path models/t has no config.json"),
        "none": ("ok",),
    }[fail]
    assert outcomes == {0: expected, 1: expected}


def _on_main_rank(rank: int, store: str, fail: bool, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    from dist_kd import distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    calls = []

    def digest() -> dict:
        calls.append(rank)
        if fail:
            raise FileNotFoundError("model directory t holds no *.safetensors or *.bin weights")
        return {"t": f"digest made by rank {rank}"}

    try:
        outcome = ("ok", distributed.on_main(digest))
    except FileNotFoundError as err:
        outcome = ("FileNotFoundError", str(err))
    distributed.barrier()  # still in step
    dist.destroy_process_group()
    results.put((rank, (outcome, calls)))


@pytest.mark.parametrize("fail", [False, True])
def test_on_main_computes_on_rank_0_alone_and_tells_every_rank(tmp_path, fail):
    outcomes = _two_ranks(_on_main_rank, str(tmp_path / "store"), fail)
    if fail:
        expected = ("FileNotFoundError", "model directory t holds no *.safetensors or *.bin weights")
    else:
        expected = ("ok", {"t": "digest made by rank 0"})
    assert outcomes == {0: (expected, [0]), 1: (expected, [])}


class _Engine:
    """What save_checkpoint asks of a DeepSpeed engine: each rank writes its own file under the tag."""

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        from pathlib import Path

        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        # Rank 0 writes last: a rank that failed first and removed the unfinished save at once pulled the
        # directory from under it (rank 0 then reported "Parent directory ... does not exist").
        time.sleep(1.0 if self.rank == 0 else 0.0)
        name = f"zero_pp_rank_{self.rank}_mp_rank_00_model_states.pt"  # DeepSpeed's ZeRO-3 name
        (Path(save_dir) / tag / name).write_bytes(b"x" * (10 + self.rank))


def _saving_rank(rank: int, store: str, checkpoints: str, fail: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from pathlib import Path

    import torch.distributed as dist

    from dist_kd import distributed
    from dist_kd.train import checkpoint as ckpt

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    engine = _Engine(rank)
    ckpt.save_checkpoint(engine, Path(checkpoints), 1, {"position": 1}, {"run": "x"}, keep_last=0)
    real_save, real_write = ckpt.torch.save, ckpt.write_json_atomic
    if fail == "rank 1 state" and rank == 1:
        ckpt.torch.save = lambda obj, path: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded", path))
    if fail == "rank 0 meta" and rank == 0:
        ckpt.write_json_atomic = lambda path, obj: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left", path))
    try:
        ckpt.save_checkpoint(engine, Path(checkpoints), 2, {"position": 2}, {"run": "x"}, keep_last=0)
        outcome = ("ok",)
    except ckpt.CheckpointSaveError as err:
        outcome = ("CheckpointSaveError", str(err).split(" failed: ")[1].split(" (")[0].split(":")[0], err.disk_full)
    finally:
        ckpt.torch.save, ckpt.write_json_atomic = real_save, real_write
    distributed.barrier()  # both ranks are still in step
    dist.destroy_process_group()
    results.put((rank, outcome))


@pytest.mark.parametrize("fail", ["rank 1 state", "rank 0 meta"])
def test_a_checkpoint_save_failing_on_one_rank_stops_every_rank(tmp_path, fail):
    """Rank 0's meta.json write (or one rank's state file) failed on that rank alone: it raised there, while
    the other rank went on to the save's next barrier, matched it against a later one of the failed rank and
    carried on as if the save had succeeded."""
    from dist_kd.train import checkpoint as ckpt

    checkpoints = tmp_path / "checkpoints"
    outcomes = _two_ranks(_saving_rank, str(tmp_path / "store"), str(checkpoints), fail)
    expected = {
        "rank 1 state": ("CheckpointSaveError", "OSError", False),
        "rank 0 meta": ("CheckpointSaveError", "no space left on the device", True),
    }[fail]
    assert outcomes == {0: expected, 1: expected}
    # The step before is whole and still the newest; the failed save left nothing a resume could take.
    assert [step for step, _ in ckpt.step_checkpoints(checkpoints)] == [1]
    assert ckpt.damage(checkpoints / "step-00000001") is None


def _peer_dies(rank: int, store: str, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import contextlib
    import io

    import torch
    import torch.distributed as dist

    from dist_kd.cli import run_in_process_group

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    dist.barrier()
    if rank == 1:
        os._exit(3)  # killed, or crashed in its own code
    time.sleep(1.0)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            code = run_in_process_group(lambda: dist.all_reduce(torch.ones(4)) or 0)
    except BaseException as err:  # noqa: BLE001 - the test reports it
        code, stderr = None, io.StringIO(f"raised {type(err).__name__}: {err}")
    results.put((rank, (code, stderr.getvalue())))


def test_a_rank_that_lost_its_peer_says_so_in_one_line(tmp_path):
    """A rank killed mid-run left the others with tens of lines of gloo traceback and no word of the cause."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    procs = [context.Process(target=_peer_dies, args=(rank, str(tmp_path / "store"), results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    code, stderr = results.get(timeout=900)[1]  # a guard against a hang; two spawned torch imports on busy cores
    for proc in procs:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    assert code == 1, stderr
    assert stderr.startswith("error: [rank 0] lost contact with another rank (it exited or was killed"), stderr
    assert stderr.count("\n") == 1 and "a rerun resumes (training from its last checkpoint" in stderr, stderr
