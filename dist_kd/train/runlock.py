"""One writer per run directory: a lock file with its owner and a heartbeat, safe on shared filesystems.

``run_dir/.dist_kd.lock`` holds the owner as JSON (host, pid, SLURM job id, a random token, start time);
its modification time is the heartbeat, renewed every ``heartbeat_s`` seconds by a daemon thread of the
owning process (rank 0). A lock is held while its heartbeat is younger than ``stale_s`` and, on the same
host, while its pid is alive; the process that wrote it, still alive on this host, holds it whatever its
heartbeat's age (a stopped run: Ctrl-Z, ``scontrol suspend``). Otherwise it is stale (a killed or preempted
job, a dead node) and the next run takes it over, saying so.

- A run whose lock was taken over all the same (its node stalled longer than ``stale_s``) stops at its next
  log line, save or evaluation after its heartbeat finds it (within ``heartbeat_s``), without writing more
  (:func:`lost_lock`, checked by the trainers).

- A second run on the same directory is refused with one line naming the owner and the lock file.
- A SLURM requeue (the same job id) whose old heartbeat is still fresh, on another node, waits until it is
  stale instead of failing, and then resumes. A run of the same job that is alive (its pid on this host, or
  its heartbeat renewed meanwhile) is another run in the same allocation, and is refused.
- Creation is atomic (``O_EXCL``); a take-over writes a new file, renames it over the stale one, and
  re-reads it, so of two runs taking over at once one wins and the other is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dist_kd.io import pid_alive, process_started, recover_interrupted_writes, same_process

logger = logging.getLogger(__name__)

LOCK_NAME = ".dist_kd.lock"
_LOADED = time.time()  # no lock of this process was written before it imported this module
HEARTBEAT_S = 30.0
STALE_S = 180.0


class RunDirInUse(ValueError):
    """Another live run owns the run directory."""


class RunDirRemoved(ValueError):
    """The run directory was removed or moved away while the run wrote it."""


class RunDirNotWritable(ValueError):
    """The run directory cannot be created or written (a read-only or full filesystem, a file in the way)."""


_HELD: list[RunLock] = []  # the locks this process holds, for lost_lock()


REMOVED = "the run directory removed or moved away"  # RunLock.lost when its directory is gone
LOCK_FILE_REMOVED = "the lock file removed"  # ... when the lock file alone is


def lost_lock() -> RunLock | None:
    """A lock this process holds that is no longer its own, or None: taken over by another run (its heartbeat
    found it), or gone with its directory (looked at here: one stat a log line, save or evaluation)."""
    for lock in _HELD:
        if lock.lost is None and not lock.path.exists():
            lock.lost = lock.why_gone()
    return next((lock for lock in _HELD if lock.lost is not None), None)


def _identity(directory: Path) -> tuple[int, int] | None:
    """(device, inode) of ``directory``, None where it is not there: a directory made again at the same path
    (a save after the run's directory was moved away) is another one."""
    try:
        found = directory.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


class RunLock:
    """The lock of one run directory (take it on rank 0 only).

    Args:
        run_dir: the run directory (created if missing, with its missing parents; those removed again on
            release if they stayed empty).
        heartbeat_s: seconds between heartbeats.
        stale_s: a heartbeat older than this means the owner is gone.
        flag: how the user names the directory, for messages (``--output`` in dist-kd finetune).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        heartbeat_s: float = HEARTBEAT_S,
        stale_s: float = STALE_S,
        flag: str = "run.output_dir",
    ):
        self.run_dir = Path(run_dir)  # as the user wrote it, for messages
        self.flag = flag
        # Absolute: the lock is released where it was taken even after a chdir, or once the directory it named
        # is another (prepare-corpus --output . --overwrite swaps a new directory in under the working one).
        self.path = Path(os.path.abspath(run_dir)) / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "token": uuid.uuid4().hex,
            "started": time.time(),
            "proc_started": process_started("self"),  # tells this process from another that has its pid later
        }
        self._created: list[Path] = []  # directories this lock made, deepest first
        self._held = False
        self.lost: str | None = None  # who took the lock over, once the heartbeat finds it taken
        self._dir_id: tuple[int, int] | None = None  # the run directory's (device, inode) while held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- reading --------------------------------------------------------------------------------------

    def read_owner(self) -> tuple[dict[str, Any] | None, float] | None:
        """``(owner or None if unreadable, heartbeat age in seconds)``, or None when there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(text)
            owner = owner if isinstance(owner, dict) else None
        except ValueError:
            owner = None  # being written, or damaged: judged by its age alone
        return owner, age

    def _alive(self, owner: dict[str, Any] | None, age: float) -> bool:
        if owner is not None and owner.get("host") == self.owner["host"]:
            pid = int(owner.get("pid", -1))
            # Our own pid in a lock written before this process began: an earlier run's, whose pid this process
            # now has (a requeue in a container numbers its processes alike); that run is gone.
            if pid == os.getpid():
                return float(owner.get("started", 0.0)) >= _LOADED and age < self.stale_s
            if not pid_alive(pid):
                return False
            if same_process(pid, owner.get("proc_started")):
                # The lock's writer, stopped (Ctrl-Z, scontrol suspend) or stalled, not gone: its heartbeat resumes
                # with it. Another process with its pid, a zombie, or a lock that does not record when its writer
                # began is judged by the heartbeat.
                return True
        return age < self.stale_s

    @staticmethod
    def describe(owner: dict[str, Any] | None, age: float) -> str:
        # A heartbeat in the future: the writer's clock (or the file server's) runs ahead of this host's.
        beat = f"heartbeat {age:.0f} s ago" if age >= -1 else f"heartbeat {-age:.0f} s in the future (clock skew)"
        if owner is None:
            return f"an unreadable owner, {beat}"
        job = f", SLURM job {owner['job_id']}" if owner.get("job_id") else ""
        return f"host {owner.get('host')}, pid {owner.get('pid')}{job}, {beat}"

    # --- taking and giving back -------------------------------------------------------------------------

    def acquire(self, poll: float = 2.0) -> None:
        """Take the lock, take over a stale one, or wait for a requeued job's old one; then start the heartbeat.

        Raises:
            RunDirInUse: another live run holds the directory.
            RunDirNotWritable: the directory or its lock file cannot be written.
        """
        try:
            self._acquire(poll)
        except OSError as err:
            self.release()  # a directory this lock created and left empty goes again
            reason = err.strerror or str(err)
            if err.filename:
                reason = f"{err.strerror or type(err).__name__} ({err.filename})"
            advice = "make room there" if err.errno == errno.ENOSPC else f"choose a writable {self.flag}"
            raise RunDirNotWritable(f"{self.flag} {self.run_dir} cannot be written: {reason}; {advice}") from None
        self._held = True
        self._dir_id = _identity(self.run_dir)
        _HELD.append(self)
        self._thread = threading.Thread(target=self._beat, name="dist_kd-run-lock", daemon=True)
        self._thread.start()

    def _acquire(self, poll: float) -> None:
        missing = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        if missing:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._created = missing  # run.output_dir=runs/x in an empty directory makes runs/ too
        payload = json.dumps(self.owner)
        said, first_beat = False, 0.0
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                try:
                    with os.fdopen(fd, "w") as handle:
                        handle.write(payload)
                        handle.flush()
                        os.fsync(handle.fileno())  # never an empty lock after a node crash
                except OSError:
                    # a full disk: the empty file just made would hold the directory, unreadable, until stale
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                    raise
                break
            found = self.read_owner()
            if found is None:
                continue  # released meanwhile
            owner, age = found
            if not self._alive(owner, age):
                logger.warning("taking over the stale lock %s (%s)", self.path, self.describe(owner, age))
                if self._take_over(payload):
                    break
                continue
            try:
                beat = self.path.stat().st_mtime  # the heartbeat itself: a slow read must not look like one
            except FileNotFoundError:
                continue
            same_job = owner is not None and owner.get("job_id") and owner.get("job_id") == self.owner["job_id"]
            # A requeue of this job: its earlier run, on another node, is gone but its heartbeat is not stale yet.
            # Not when that run is alive on this host (its pid), or its heartbeat moves on while we wait: then it
            # is a second run in the same allocation (an salloc shell, one batch script), which waits for nothing.
            # An unreadable lock likewise (a start killed, or its node lost, between making the file and writing
            # it; or a run writing it this moment): refused at once, it stopped a requeued job for good.
            earlier = same_job and owner.get("host") != self.owner["host"]
            if (earlier or owner is None) and not (said and beat > first_beat + 1.0):
                if not said:
                    whose = "an earlier run of this SLURM job" if earlier else "a run whose lock cannot be read"
                    logger.warning(
                        "%s is held by %s (%s); waiting up to %.0f s for it to go stale",
                        self.path, whose, self.describe(owner, age), self.stale_s - age,
                    )  # fmt: skip
                    said, first_beat = True, beat
                time.sleep(min(poll, max(0.05, self.stale_s - age)))
                continue
            stopped = ""
            if age >= self.stale_s:  # held by its live writer alone
                stopped = (f"; its heartbeat stopped, but pid {owner.get('pid')} lives on this host: a stopped run "
                           f"goes on with kill -CONT {owner.get('pid')}")  # fmt: skip
            raise RunDirInUse(
                f"{self.flag} {self.run_dir} is in use by another run ({self.describe(owner, age)}; lock "
                f"{self.path}{stopped}): wait for it to finish, stop it, or choose another {self.flag}"
            )

    def _take_over(self, payload: str) -> bool:
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.owner['token']}")
        try:
            tmp.write_text(payload)
            os.replace(tmp, self.path)
        except OSError as err:  # a full disk: no empty temporary left behind (nothing would ever remove it)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror, str(self.path)) from None
        time.sleep(min(0.2, self.stale_s / 10))  # a concurrent take-over renames after us: the last one wins
        found = self.read_owner()
        return found is not None and found[0] is not None and found[0].get("token") == self.owner["token"]

    def why_gone(self) -> str:
        """Why the lock file is gone: its directory removed or moved away (a save may have made one again at
        the path), or the file alone removed."""
        return LOCK_FILE_REMOVED if _identity(self.run_dir) == self._dir_id else REMOVED

    def holds(self) -> bool:
        """True while the lock file is this lock's (nobody took it over)."""
        found = self.read_owner()
        return bool(found and found[0] and found[0].get("token") == self.owner["token"])

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.holds():
                found = self.read_owner()
                if found is None:  # no other run: said by the trainers' next check (check_run_lock)
                    self.lost = self.why_gone()
                    return
                self.lost = self.describe(*found)
                logger.error(
                    "the run lock %s is no longer this run's (%s; taken over after this run's heartbeat stalled "
                    "for over %.0f s): the run stops at its next log line, save or evaluation, writing nothing more "
                    "to %s", self.path, self.lost, self.stale_s, self.run_dir,
                )  # fmt: skip
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's (and a directory left empty)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._held and self.holds():
            try:
                self.path.unlink(missing_ok=True)
            except OSError as err:  # a read-only filesystem now: the error that stops the run is the one to say
                logger.warning("could not remove the run lock %s (%s): the next run takes it over", self.path,
                               err.strerror or err)  # fmt: skip
        self._held = False
        if self in _HELD:
            _HELD.remove(self)
        for directory in self._created:  # only if empty: a start refused before writing anything leaves nothing
            try:
                directory.rmdir()
            except OSError:
                break

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _recover_interrupted_writes(run_dir: Path) -> None:
    """The run directory's and its subdirectories' leftovers of writes killed midway (:func:`dist_kd.io.
    recover_interrupted_writes`); ``checkpoints/`` has its own (:func:`dist_kd.train.checkpoint.
    remove_unfinished_saves`)."""
    try:
        subdirectories = [
            path
            for path in run_dir.iterdir()
            if path.is_dir() and not path.name.startswith(".") and path.name != "checkpoints"
        ]
    except OSError:
        return
    for directory in [run_dir, *sorted(subdirectories)]:
        for line in recover_interrupted_writes(directory):
            logger.warning("%s", line)


@contextlib.contextmanager
def locked_run_dir(run_dir: str | os.PathLike, info: Any, flag: str = "run.output_dir") -> Iterator[RunLock | None]:
    """Rank 0 holds ``run_dir``'s :class:`RunLock` for the block; every rank raises rank 0's refusal (the others
    would wait for it forever). Collective.

    Yields:
        The lock on rank 0, None on the other ranks.

    Raises:
        RunDirInUse: another live run writes to the directory.
        RunDirNotWritable: the directory cannot be created or written.
    """
    from dist_kd import distributed

    lock = refused = None
    if info.is_main:
        lock = RunLock(run_dir, flag=flag)
        try:
            lock.acquire()
        except (RunDirInUse, RunDirNotWritable) as err:
            lock, refused = None, (type(err).__name__, str(err))
        else:
            _recover_interrupted_writes(Path(run_dir))
    try:
        refused = distributed.broadcast_object(refused)
        if refused:  # rank 0's, said by it alone
            kind = {"RunDirInUse": RunDirInUse, "RunDirNotWritable": RunDirNotWritable}[refused[0]]
            raise distributed.said_by(kind(refused[1]), 0)
        yield lock
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def owned_run_dir(
    run_dir: str | os.PathLike, info: Any, flag: str = "run.output_dir", expected: tuple[type, ...] = (ValueError,)
) -> Iterator[Any]:
    """One writer for the run directory, and its ``train.log``: what every training command holds while it runs.

    Rank 0 takes the directory's lock (:func:`locked_run_dir`). Rank 0 then writes its log lines to
    ``run_dir/train.log``, held until the caller's ``log.start()`` (the set-up passed its checks: a run refused
    at set-up leaves the directory as it was). The error that stops the run goes into the log, with its
    traceback unless it is one of ``expected`` (bad input, a full disk), before the lock is given back.

    Yields:
        The :class:`dist_kd.cli.RunLog` on rank 0, None on the other ranks.

    Raises:
        RunDirInUse: another live run writes to the directory.
        RunDirNotWritable: the directory cannot be created or written.
    """
    from dist_kd.cli import attach_run_log, detach_run_log, note_run_failure

    with locked_run_dir(run_dir, info, flag) as lock:
        run_log = attach_run_log(run_dir, info.rank) if lock is not None else None  # rank 0, the directory its own
        try:
            yield run_log
        except BaseException as err:
            note_run_failure(run_log, err, expected=expected)
            raise
        finally:
            detach_run_log(run_log)
