"""One writer per run directory: the lock refuses a live second run, takes over stale locks (dead pid on
this host, old heartbeat elsewhere), lets a SLURM requeue wait for its own old lock, and beats."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from dist_kd.train.runlock import LOCK_NAME, RunDirInUse, RunDirNotWritable, RunLock


def _plant(run_dir, age=0.0, **owner):
    """A lock file of another owner, its heartbeat ``age`` seconds old."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({"host": "other-node", "pid": 1, "job_id": None, "token": "theirs", **owner}))
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_lock_is_taken_and_released_and_an_empty_new_dir_goes_with_it(tmp_path):
    run_dir = tmp_path / "new" / "run"
    lock = RunLock(run_dir)
    lock.acquire()
    owner = json.loads((run_dir / LOCK_NAME).read_text())
    assert owner["pid"] == os.getpid() and owner["token"] == lock.owner["token"] and lock.holds()
    lock.release()
    assert not (tmp_path / "new").exists()  # created for the lock only, parent too: a refused start leaves nothing
    (tmp_path / "kept").mkdir()
    with RunLock(tmp_path / "kept"):
        (tmp_path / "kept" / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["metrics.jsonl"]


def test_a_live_second_writer_is_refused_in_one_line(tmp_path):
    path = _plant(tmp_path, age=5, job_id="77")
    with pytest.raises(RunDirInUse) as caught:
        RunLock(tmp_path).acquire()
    message = str(caught.value)
    assert "\n" not in message and f"run.output_dir {tmp_path} is in use by another run" in message
    assert "host other-node, pid 1, SLURM job 77, heartbeat 5 s ago" in message and str(path) in message
    assert json.loads(path.read_text())["token"] == "theirs"  # untouched


def test_same_host_live_pid_is_refused_and_dead_pid_is_taken_over(tmp_path, caplog):
    import socket

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _plant(tmp_path, host=socket.gethostname(), pid=sleeper.pid)
        with pytest.raises(RunDirInUse, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path)  # the same lock file, its process now dead (a SIGKILLed run)
    with caplog.at_level("WARNING"):
        lock.acquire()
    assert lock.holds() and "taking over the stale lock" in caplog.text
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stopped_run_keeps_its_lock_whatever_its_heartbeats_age(tmp_path, caplog):
    """A run stopped (Ctrl-Z, scontrol suspend) past the staleness lost its lock to the next run on the
    directory, and went on writing beside it when continued. The lock records when its writer began, so
    another process with its pid (pid 1 of a container sharing the host name, a pid used again) or a writer
    killed but not yet reaped (a zombie) does not hold it."""
    import signal
    import socket

    from dist_kd.io import process_started

    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        time.sleep(0.1)
        began = process_started(sleeper.pid)
        assert began is not None  # Linux's /proc
        _plant(tmp_path, age=5000, host=host, pid=sleeper.pid, proc_started=began)
        with pytest.raises(RunDirInUse) as caught:
            RunLock(tmp_path, stale_s=180).acquire()
        assert f"heartbeat 5000 s ago; lock {tmp_path / LOCK_NAME}; its heartbeat stopped, but pid {sleeper.pid}" in (
            str(caught.value)
        )
        assert f"kill -CONT {sleeper.pid}" in str(caught.value)
        for other in (
            dict(pid=sleeper.pid, proc_started=began - 100),  # the pid, another process: used again
            dict(pid=1, proc_started=began),  # a container's pid 1 that was killed; the host's pid 1 lives
            dict(pid=sleeper.pid),  # a lock of an earlier release: no start recorded
        ):
            _plant(tmp_path, age=5000, host=host, **other)
            lock = RunLock(tmp_path, stale_s=180)
            with caplog.at_level("WARNING"):
                lock.acquire()
            assert lock.holds() and "taking over the stale lock" in caplog.text
            lock.release()
        os.kill(sleeper.pid, signal.SIGKILL)  # killed, not yet reaped: a zombie whose pid still answers
        deadline = time.time() + 10
        while process_started(sleeper.pid) is not None and time.time() < deadline:
            time.sleep(0.05)
        _plant(tmp_path, age=5000, host=host, pid=sleeper.pid, proc_started=began)
        lock = RunLock(tmp_path, stale_s=180)
        lock.acquire()
        assert lock.holds()
        lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_another_hosts_old_heartbeat_is_stale(tmp_path):
    _plant(tmp_path, age=500)
    lock = RunLock(tmp_path, stale_s=180)
    lock.acquire()
    assert lock.holds()
    lock.release()


def test_a_requeued_job_waits_for_its_own_old_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _plant(tmp_path, age=0, job_id="4242")  # the previous run of this job, on another node, just died
    lock = RunLock(tmp_path, stale_s=0.6)
    started = time.monotonic()
    lock.acquire(poll=0.05)
    assert time.monotonic() - started >= 0.4 and lock.holds()
    lock.release()


def _outcome(lock: RunLock, within: float = 30.0) -> BaseException | None:
    """What ``lock.acquire`` raises (None: it took the lock), failing the test if it still waits after
    ``within`` seconds."""
    raised: list[BaseException] = []

    def take():
        try:
            lock.acquire(poll=0.05)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            raised.append(err)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still waiting for the lock after {within} s"
    return raised[0] if raised else None


def _outcome_while_beating(path, lock: RunLock) -> BaseException | None:
    """:func:`_outcome` while another writer's heartbeat renews ``path`` every 0.05 s."""
    beating = threading.Event()

    def beat():
        while not beating.wait(0.05):
            os.utime(path)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        return _outcome(lock, within=20.0)
    finally:
        beating.set()
        thread.join()


def test_a_second_run_in_the_same_slurm_job_is_refused_not_kept_waiting(tmp_path, monkeypatch):
    """Two runs on one directory inside one allocation (an salloc shell) share SLURM_JOB_ID: the second was
    taken for a requeue and waited as long as the first lived."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    first = RunLock(tmp_path, heartbeat_s=0.05, stale_s=2.0)
    first.acquire()
    try:  # the same host, its pid alive
        refused = _outcome(RunLock(tmp_path, stale_s=2.0))
    finally:
        first.release()
    assert isinstance(refused, RunDirInUse) and "in use by another run" in str(refused)
    # on another node: waited for while its heartbeat stands still, refused once it moves on
    path = _plant(tmp_path, age=0, job_id="777")
    refused = _outcome_while_beating(path, RunLock(tmp_path, stale_s=5.0))
    assert isinstance(refused, RunDirInUse) and "host other-node" in str(refused)


def test_an_unreadable_lock_is_waited_for_until_stale_unless_its_heartbeat_moves(tmp_path, caplog):
    """An empty lock file (a start killed, or its node lost, between making the file and writing it) was refused
    at once as "in use", which stopped a requeued SLURM job for good; it goes stale like any other now."""
    import logging

    path = tmp_path / LOCK_NAME
    path.write_text("")
    lock = RunLock(tmp_path, stale_s=0.6)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dist_kd.train.runlock"):
        assert _outcome(lock, within=20.0) is None
    assert time.monotonic() - started >= 0.4 and lock.holds()
    assert "is held by a run whose lock cannot be read (an unreadable owner, heartbeat 0 s ago)" in caplog.text
    lock.release()
    # unreadable, but its heartbeat moves on: a live run (its payload damaged) is refused, not taken over
    path.write_text("{not json")
    refused = _outcome_while_beating(path, RunLock(tmp_path, stale_s=5.0))
    assert isinstance(refused, RunDirInUse) and "an unreadable owner" in str(refused)


def test_a_heartbeat_from_a_clock_running_ahead_is_said_as_clock_skew():
    assert RunLock.describe(None, -300.0) == "an unreadable owner, heartbeat 300 s in the future (clock skew)"
    assert RunLock.describe({"host": "n1", "pid": 7}, 12.4) == "host n1, pid 7, heartbeat 12 s ago"


def test_a_requeue_given_the_old_runs_pid_takes_its_lock_over(tmp_path, monkeypatch):
    """In a container a requeued job's process may get the pid its earlier run had: that run is gone, though a
    process with its pid is alive (this one)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = RunLock(tmp_path, stale_s=60.0)
    _plant(tmp_path, age=0, job_id="4242", host=lock.owner["host"], pid=os.getpid(), started=time.time() - 3600)
    assert _outcome(lock, within=20.0) is None and lock.holds()  # taken, not waited for until stale (60 s)
    lock.release()


def test_heartbeat_renews_the_lock_and_notices_a_take_over(tmp_path, caplog):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (1, 1))
    deadline = time.time() + 5
    while path.stat().st_mtime < 100 and time.time() < deadline:
        time.sleep(0.02)
    assert time.time() - path.stat().st_mtime < 5  # beaten
    from dist_kd.train.common import check_run_lock
    from dist_kd.train.runlock import lost_lock

    check_run_lock()  # held: nothing to say
    assert lost_lock() is None
    with caplog.at_level("ERROR"):
        _plant(tmp_path, age=0)  # someone took it over
        time.sleep(0.3)
    assert "is no longer this run's (host other-node, pid 1" in caplog.text
    assert lost_lock() is lock
    with pytest.raises(RunDirInUse, match=f"its run lock {path} is now held by another run \\(host other-node, pid 1"):
        check_run_lock()  # what the trainers call at each log line, save and evaluation
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"  # not ours to remove
    assert lost_lock() is None  # released: a later run of this process starts clean


def test_two_takers_of_a_stale_lock_end_with_one_owner(tmp_path):
    _plant(tmp_path, age=1000)
    locks = [RunLock(tmp_path) for _ in range(2)]
    outcomes = []

    def take(lock):
        try:
            lock.acquire(poll=0.01)
            outcomes.append("held")
        except RunDirInUse:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Same process, so the pid check says the winner is alive: exactly one holds it.
    assert sorted(outcomes) == ["held", "refused"] and sum(lock.holds() for lock in locks) == 1
    for lock in locks:
        lock.release()


def test_a_run_dir_that_cannot_be_written_is_one_error_naming_it(tmp_path):
    """A file where the run directory should be (or a read-only filesystem) was an OSError traceback."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirNotWritable, match=r"^run.output_dir \S+/file/run cannot be written: Not a directory"):
        RunLock(tmp_path / "file" / "run").acquire()
    with pytest.raises(RunDirNotWritable, match=r"file cannot be written: Not a directory"):
        RunLock(tmp_path / "file").acquire()  # exists, but as a file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_full_disk_while_taking_the_lock_leaves_no_empty_lock_behind(tmp_path, monkeypatch):
    """The lock file was created, its owner could not be written, and the empty file refused every rerun (an
    unreadable owner) until it went stale, after the disk had room again."""
    import errno

    from dist_kd.train import runlock

    real = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.handle = real(fd, mode)

        def __enter__(self):
            return self

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __exit__(self, *exc):
            self.handle.close()

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(runlock.os, "fdopen", Full)
    with pytest.raises(RunDirNotWritable, match=r"cannot be written: No space left on device; make room there$"):
        RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    monkeypatch.setattr(runlock.os, "fdopen", real)
    with RunLock(tmp_path / "run") as lock:  # the rerun once there is room
        assert lock.holds()


def test_a_full_disk_while_taking_over_a_stale_lock_leaves_no_temporary_and_names_the_lock(tmp_path, monkeypatch):
    """The take-over's temporary `.dist_kd.lock.<token>` stayed, empty, for good, and the error named no file."""
    import errno
    from pathlib import Path

    stale = _plant(tmp_path / "run", pid=2**22 + 7, host=os.uname().nodename)  # a dead pid on this host
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(f"{LOCK_NAME}."):
            real(self, "")  # created, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(RunDirNotWritable, match=rf"No space left on device \({stale}\); make room there$"):
        RunLock(tmp_path / "run").acquire()
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [LOCK_NAME]


def test_a_lock_that_cannot_be_removed_does_not_replace_the_runs_error(tmp_path, monkeypatch, caplog):
    """A filesystem gone read-only: the run's one-line error was replaced by a traceback of the lock's unlink."""
    import errno
    from pathlib import Path

    lock = RunLock(tmp_path / "run")
    real = Path.unlink

    def read_only(self, *args, **kwargs):
        if self.name == LOCK_NAME:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *args, **kwargs)

    with pytest.raises(ValueError, match="the run's own error"), lock:
        monkeypatch.setattr(Path, "unlink", read_only)
        raise ValueError("the run's own error")
    assert "could not remove the run lock" in caplog.text and "Read-only file system" in caplog.text


def test_a_run_directory_removed_or_moved_stops_the_run_in_one_line(tmp_path):
    """rm -rf or mv of the run directory mid-run: saves made it again and the run finished there with exit 0
    (a directory without config.yaml or train.log; or the run split across two), or it stopped later saying
    another run had taken its lock over."""
    import shutil

    from dist_kd.train.common import check_run_lock
    from dist_kd.train.runlock import REMOVED, RunDirRemoved, lost_lock

    for gone in ("removed", "moved"):
        run_dir = tmp_path / gone
        with RunLock(run_dir) as lock:
            check_run_lock()  # nothing wrong yet
            if gone == "removed":
                shutil.rmtree(run_dir)
            else:
                run_dir.rename(tmp_path / "elsewhere")
            assert lost_lock() is lock and lock.lost == REMOVED
            with pytest.raises(RunDirRemoved, match=rf"^this run stopped writing: {run_dir} was removed or moved"):
                check_run_lock()
            run_dir.mkdir()  # a save made it again: still not this run's directory
            with pytest.raises(RunDirRemoved, match="was removed or moved away"):
                check_run_lock()
    # Moved while the last save ran, which made the directory again before any check: the lock file is missing
    # from a directory at the path, but not the run's own (it was said as the lock file alone removed).
    with RunLock(tmp_path / "late") as lock:
        (tmp_path / "late").rename(tmp_path / "late-moved")
        (tmp_path / "late").mkdir()
        with pytest.raises(RunDirRemoved, match="late was removed or moved away.*made again at that path"):
            check_run_lock()
    # The lock file alone removed (by hand, a clean-up job): said as such, not as the directory gone.
    with RunLock(tmp_path / "kept") as lock:
        lock.path.unlink()
        with pytest.raises(RunDirRemoved, match=rf"^this run stopped writing: its run lock {lock.path} was removed"):
            check_run_lock()


def test_every_rank_stops_with_rank_0s_refusal(tmp_path, monkeypatch):
    """Rank 0 takes the lock; the other ranks raise the error it broadcasts instead of waiting for it."""
    from types import SimpleNamespace

    from dist_kd import api, distributed

    told = ("RunDirNotWritable", "run.output_dir /ro/run cannot be written: Read-only file system (/ro/run)")
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: told)
    rank1 = SimpleNamespace(rank=1, world_size=2, is_main=False)
    cfg = SimpleNamespace(run=SimpleNamespace(output_dir=str(tmp_path / "run")))
    with pytest.raises(RunDirNotWritable, match="Read-only file system"):
        api.run_training(cfg, lambda *a: pytest.fail("no trainer after a refusal"), None, rank1)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: ("RunDirInUse", "in use"))
    with pytest.raises(RunDirInUse, match="in use"):
        api.run_training(cfg, lambda *a: pytest.fail("no trainer after a refusal"), None, rank1)
    assert not (tmp_path / "run").exists()


def test_the_kind_of_run_a_directory_holds_comes_from_its_config_yaml(tmp_path):
    """A task run's config.yaml has tasks (and distill, teacher, data); a general run's a corpus (data.shards) and
    no tasks; finetune's finetune."""
    import yaml

    from dist_kd.train.common import check_run_kind, run_kind
    from dist_kd.train.general import GeneralConfig
    from dist_kd.train.task_config import TaskConfig

    assert run_kind(tmp_path) is None  # nothing there yet
    (tmp_path / "config.yaml").write_text("just: a user's file\n")
    assert run_kind(tmp_path) is None
    for kind in ("general", "task", "finetune"):  # it was replaced, and a metrics.jsonl beside it emptied
        with pytest.raises(ValueError, match=r"holds a config.yaml that is no dist_kd run's, which a"):
            check_run_kind(tmp_path, kind)
    general = dataclasses.asdict(GeneralConfig())
    task = {field.name: {} for field in dataclasses.fields(TaskConfig)}  # a valid TaskConfig needs task files
    assert {"distill", "teacher"} <= set(task) and "tasks" in task
    for kind, config in (("general", general), ("task", task)):
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        assert run_kind(tmp_path) == kind
        check_run_kind(tmp_path, kind)  # the same kind: a resume or a rerun
    with pytest.raises(ValueError, match="holds a task distillation run .*, and a general distillation run"):
        check_run_kind(tmp_path, "general")
    (tmp_path / "config.yaml").write_text("task: {name: topic}\nfinetune: {epochs: 1}\n")
    assert run_kind(tmp_path) == "finetune"
    (tmp_path / "config.yaml").write_text("{unclosed")
    assert run_kind(tmp_path) is None  # damaged: left to the run's own checks
    check_run_kind(tmp_path, "general")


def test_a_model_input_where_the_run_writes_its_exports_is_refused(tmp_path):
    """``dist-kd task student.path=models/student run.output_dir=models`` replaced the starting student with the
    trained one (exit 0): the run's export of student/ swaps the whole directory in."""
    from dist_kd.train.common import check_inputs_outside_outputs

    run = tmp_path / "models"
    for inside in ("student", "best/topic", "tasks/topic/sub"):
        with pytest.raises(ValueError, match=rf"student.path .* lies in .*models/{inside.split('/')[0]}, which this"):
            check_inputs_outside_outputs(run, {"student.path": str(run / inside), "teacher.path": None})
    # elsewhere, or beside the exports in the same directory, is fine (phase 1's student/ read by phase 2's run)
    check_inputs_outside_outputs(run, {"student.path": str(tmp_path / "phase1" / "student"), "teacher.path": ""})
    check_inputs_outside_outputs(run, {"teacher.path": str(run / "teacher"), "student.path": str(run / "students")})


def test_taking_a_run_directory_puts_right_what_killed_writes_left(tmp_path, caplog):
    """A finished task run killed inside best/share's swap lost best/share when it was resumed (eval.json named
    it); the run that takes the directory puts it back, and checkpoints/ keeps to its own clean-up."""
    import logging

    from dist_kd.train.runlock import locked_run_dir

    run = tmp_path / "run"
    for path in (run / "best" / ".share.old", run / "best" / "topic", run / "checkpoints" / ".step-00000004.old"):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
    info = type("Info", (), {"is_main": True, "rank": 0, "world_size": 1})()
    with caplog.at_level(logging.WARNING), locked_run_dir(run, info):
        assert (run / "best" / "share" / "config.json").is_file() and not (run / "best" / ".share.old").exists()
    assert (run / "checkpoints" / ".step-00000004.old").is_dir()
    assert f"{run / 'best' / 'share'} put back (its replacement was killed midway)" in caplog.text
