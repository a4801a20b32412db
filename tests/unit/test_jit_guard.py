"""The guard in front of DeepSpeed's JIT op build: a message before the first build, a wait with a message
while a build holds the lock, and removal of a lock that no build holds (which torch would wait on forever)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from dist_kd.distributed import extension_dirs, guard_jit_build


def _build_dir(tmp_path, monkeypatch, name="op_x"):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = tmp_path / name
    directory.mkdir()
    return directory


def test_extension_dir_follows_torch_extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension_dirs("op_x") == [tmp_path / "op_x"]


def test_first_build_is_announced_and_a_built_op_is_quiet(tmp_path, monkeypatch, capsys):
    directory = _build_dir(tmp_path, monkeypatch)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    guard_jit_build("op_x", poll=0.01)
    assert "builds its CPU op op_x" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")  # the node's other ranks wait for the same build: said once, not per rank
    guard_jit_build("op_x", poll=0.01)
    assert capsys.readouterr().err == ""
    (directory / "op_x.so").write_bytes(b"")
    guard_jit_build("op_x", poll=0.01)
    assert capsys.readouterr().err == ""


def test_a_lock_no_build_holds_is_removed_once_stale(tmp_path, monkeypatch, capsys):
    directory = _build_dir(tmp_path, monkeypatch)
    (directory / "op_x.so").write_bytes(b"")
    lock = directory / "lock"
    lock.write_text("")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    guard_jit_build("op_x", stale_after=600, poll=0.01)
    assert not lock.exists()
    assert f"removing {lock}: a stale lock 60 minutes old" in capsys.readouterr().err


def test_a_lock_held_by_a_running_build_is_waited_for_and_kept(tmp_path, monkeypatch, capsys):
    directory = _build_dir(tmp_path, monkeypatch)
    (directory / "op_x.so").write_bytes(b"")
    lock = directory / "lock"
    lock.write_text("")
    old = time.time() - 3600  # old, but a process works in the directory: a build is running
    os.utime(lock, (old, old))
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], cwd=directory)
    try:
        finished = threading.Event()

        def build_ends():  # the build finishes: torch removes its lock
            time.sleep(0.5)
            lock.unlink()
            finished.set()

        threading.Thread(target=build_ends, daemon=True).start()
        guard_jit_build("op_x", stale_after=600, poll=0.05, quiet=0)
        assert finished.is_set()  # returned only once the lock was gone
        err = capsys.readouterr().err
        assert f"waiting for {lock}: process {builder.pid} on this host is building op_x" in err
        assert "removing" not in err
    finally:
        builder.kill()
        builder.wait()


def test_a_lock_held_a_moment_is_waited_for_quietly(tmp_path, monkeypatch, capsys):
    """A rank loading the op built already holds the lock a moment (torch checks the op is current): another rank
    said "... is building op_x" and slept 5 s, though nothing was built."""
    directory = _build_dir(tmp_path, monkeypatch)
    (directory / "op_x.so").write_bytes(b"")
    lock = directory / "lock"
    lock.write_text("")

    def check_ends():
        time.sleep(0.3)
        lock.unlink()

    threading.Thread(target=check_ends, daemon=True).start()
    started = time.monotonic()
    guard_jit_build("op_x", stale_after=600)  # the default 5 s poll
    assert 0.3 <= time.monotonic() - started < 2.0 and not lock.exists()
    assert capsys.readouterr().err == ""


def test_a_young_lock_is_waited_for_even_without_a_local_build(tmp_path, monkeypatch, capsys):
    """Another node that shares the directory may be building: wait until the lock is stale, then remove it."""
    directory = _build_dir(tmp_path, monkeypatch)
    (directory / "op_x.so").write_bytes(b"")
    lock = directory / "lock"
    lock.write_text("")
    started = time.monotonic()
    guard_jit_build("op_x", stale_after=0.5, poll=0.05, quiet=0)
    assert time.monotonic() - started >= 0.4 and not lock.exists()
    err = capsys.readouterr().err
    assert f"waiting for {lock}: another process is building op_x" in err and f"removing {lock}" in err


def test_thread_count_is_the_ranks_share_of_the_free_cores(monkeypatch):
    from dist_kd.distributed import local_process_count, set_thread_count, threads_per_rank

    assert threads_per_rank(cores=2, local_processes=1, load=0.0) == 2  # idle laptop: every core
    assert threads_per_rank(cores=2, local_processes=1, load=2.1) == 1  # busy: one thread, not a fight
    assert threads_per_rank(cores=2, local_processes=2, load=0.0) == 1  # two ranks share two cores
    assert threads_per_rank(cores=2, local_processes=1, load=0.3) == 2  # background slivers: not a core
    assert threads_per_rank(cores=2, local_processes=1, load=0.8) == 1
    assert threads_per_rank(cores=64, local_processes=8, load=1.6) == 7
    assert threads_per_rank(cores=64, local_processes=8, load=0.4) == 8
    assert threads_per_rank(cores=64, local_processes=8, load=0.0) == 8
    assert threads_per_rank(cores=4, local_processes=8, load=0.0) == 1  # never 0
    assert local_process_count({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_process_count({"LOCAL_SIZE": "2"}) == 2
    assert local_process_count({"SLURM_NTASKS_PER_NODE": "8(x2)"}) == 8
    assert local_process_count({}) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert set_thread_count() is None  # the user's setting wins


def test_busy_cores_sees_a_spinning_process():
    import subprocess
    import sys

    from dist_kd.distributed import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        busy = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.7 <= busy <= (os.cpu_count() or 1) + 0.01


def test_busy_cores_leaves_out_this_process_own_threads():
    """A thread of our own (an OpenMP pool still spinning after a torch op) is not other work on the machine."""
    import threading

    from dist_kd.distributed import busy_cores

    def spin():
        while not stop.is_set():
            pass

    # Other work on the machine (a parallel test worker) varies between two windows, so a few tries: counted
    # as other work, the spinner would add a whole core to every one of them.
    seen = []
    for _ in range(3):
        base = busy_cores(0.5)
        stop = threading.Event()
        spinner = threading.Thread(target=spin)
        spinner.start()
        try:
            busy = busy_cores(0.5)
        finally:
            stop.set()
            spinner.join()
        seen.append((base, busy))
        if busy - base < 0.5:
            break
    assert min(busy - base for base, busy in seen) < 0.5, seen


def test_one_process_cpu_job_starts_without_building_the_shared_memory_op(tmp_path):
    # A fresh process (the process group starts once per process) with an empty extension directory: the
    # op that only reduces across ranks is not built, and collectives still reduce (over one rank: identity).
    script = (
        "import torch, deepspeed.comm as ds_comm\n"
        "from dist_kd import distributed\n"
        "info = distributed.init_distributed(force_cpu=True)\n"
        "t = torch.tensor([1.5, -2.0])\n"
        "ds_comm.all_reduce(t)\n"
        "torch.distributed.all_reduce(t)\n"
        "print('world', info.world_size, 'sum', t.tolist())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path), CUDA_VISIBLE_DEVICES="")  # DeepSpeed's CPU accelerator here too
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "world 1 sum [1.5, -2.0]" in done.stdout
    assert not (tmp_path / "deepspeed_shm_comm").exists()
    assert "builds its CPU op" not in done.stderr
