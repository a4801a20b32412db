"""Checkpoints: atomic DeepSpeed saves plus per-rank trainer state, and finding the newest complete one.

Layout under ``run_dir/checkpoints/``::

    step-00000500/                 a complete checkpoint (renamed into place when every rank finished)
        <DeepSpeed files>          model, optimizer (ZeRO shards), scheduler
        rank00000.pt ...           per-rank trainer state: step, tokens, data position, RNG states
        meta.json                  written last: step, shapes of teacher and student, data fingerprints
                                   (for resume checks) and every file's size (to verify it is whole)
    latest                         the newest complete tag, for DeepSpeed's own tools (zero_to_fp32.py)
    .tmp-step-00000750/            a save in progress (or interrupted): never resumed from; the next save removes it
    .pruned-step-00000250/         an older checkpoint being deleted (keep_last); the next save removes what is left

Every rank writes into the temporary directory (a shared filesystem, as DeepSpeed itself assumes); after
a barrier rank 0 writes ``meta.json`` and renames the directory, so a checkpoint is either complete
under its final name or absent. Older complete checkpoints beyond ``keep_last`` are then deleted. A step
that already has a whole checkpoint (a finished run started again) is not saved again, so there is never
a moment without the newest complete checkpoint. Resume takes the newest checkpoint whose files are all
there at the sizes ``meta.json`` lists; a damaged one is skipped with a warning naming it and what is
wrong, and the previous one is used; when none is whole the run is refused (never silently restarted), and
``keep_last`` counts whole checkpoints only. ``meta.json`` also holds the settings the optimizer state was
built under (:func:`settings_meta`) and the data settings the data position depends on (the trainers'
``data_settings_meta``), checked on resume (:func:`check_resume`). A save that fails (a full
disk) removes its temporary directory and is reported in one line naming the directory and the free space;
the checkpoints before it are untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_kd import distributed
from dist_kd.io import atomic_path, error_causes, fsync_path, within, write_errno, write_json_atomic

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (reported as one line; earlier checkpoints are intact).

    Attributes:
        disk_full: the cause was a full device (by default read from the message: another rank's failure is
            rebuilt from its message, :func:`dist_kd.distributed.shared_failure`).
    """

    def __init__(self, message: str, disk_full: bool | None = None):
        super().__init__(message)
        self.disk_full = NO_SPACE in message if disk_full is None else disk_full


NO_SPACE = "no space left on the device"  # in a CheckpointSaveError's message when the disk is full
PERMISSION_REFUSED = (errno.EACCES, errno.EPERM)  # a write refused for want of permission


class OutputWriteError(RuntimeError):
    """The run directory could not be written outside a checkpoint save (a full or read-only filesystem while
    writing config.yaml, metrics, the export or the report); reported as one line, checkpoints intact."""


def write_failure(err: BaseException) -> str | None:
    """What in ``err`` (or its causes) says a write failed: "No space left on device", ..., or None
    (:func:`dist_kd.io.write_errno`)."""
    number = write_errno(err)
    return None if number is None else os.strerror(number)


def output_write_failed(run_dir: Path, err: BaseException) -> OutputWriteError | None:
    """``err`` as one line naming the run directory when a write failed there, else None (not a write failure).

    A full, over-quota or read-only filesystem anywhere; a permission refused on a file inside ``run_dir`` (one
    refused elsewhere is an input's, not this)."""
    reason = write_failure(err)
    if reason is None:
        denied = next(
            (cause for cause in error_causes(err)
             if getattr(cause, "errno", None) in PERMISSION_REFUSED and getattr(cause, "filename", None)
             and within(cause.filename, run_dir)),
            None,
        )  # fmt: skip
        if denied is None:
            return None
        reason = f"{denied.strerror} ({denied.filename})"
    try:
        free = f" ({shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free there)" if run_dir.exists() else ""
    except OSError:
        free = ""
    previous = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    kept = f"; the newest whole checkpoint, {previous.name}, is intact" if previous else ""
    return OutputWriteError(
        f"writing under run.output_dir {run_dir} failed: {reason}{free}{kept}; make room or fix the cause and "
        "rerun to resume (a finished run writes its student and report again)"
    )


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != "meta.json"
    }


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint directory, or None when it is whole.

    Whole means: ``meta.json`` parses, every rank's state file is there, and every file ``meta.json`` lists
    has its recorded size (checkpoints from before sizes were recorded are checked for rank files only).
    """
    try:
        meta = json.loads((checkpoint / "meta.json").read_text())
    except FileNotFoundError:
        # a save renames its directory into place once meta.json is written: without it, something removed it
        # (or a release before 0.1 was cut short mid-save)
        return "no meta.json"
    except (OSError, ValueError) as err:
        return f"meta.json does not parse ({err})"
    ranks = int(meta.get("world_size", 1))
    missing = [f"rank{rank:05d}.pt" for rank in range(ranks) if not (checkpoint / f"rank{rank:05d}.pt").is_file()]
    if missing:
        return f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    return damaged_files(checkpoint, meta)


def damaged_files(checkpoint: Path, meta: dict[str, Any]) -> str | None:
    """The first file that ``meta.json`` lists and that is missing or not of its recorded size, said in words;
    None when all are whole (or the checkpoint predates the sizes). A list without DeepSpeed's model states, or
    with an empty state file (torch writes none), was recorded from a save that wrote its files elsewhere or
    later (another checkpoint writer): not whole either."""
    files = meta.get("files")
    if files is not None and not any(name.endswith("model_states.pt") for name in files):
        return "no DeepSpeed model states file (the save wrote none here)"
    for name, size in (files or {}).items():
        path = checkpoint / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when saved (truncated?)"
        if size == 0 and name.endswith(".pt"):
            return f"{name} is empty (0 bytes when saved)"
    return None


def step_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` directory, whole or damaged (:func:`damage`), oldest first. A save
    writes ``.tmp-step-N`` and renames it once its ``meta.json`` is written, so a ``step-N`` without one is
    damaged, not a save in progress: it is skipped with a warning, counts as damaged, and is pruned."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def whole_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The whole checkpoints of ``checkpoints_dir``, oldest first (no warning for the others)."""
    return [path for _, path in step_checkpoints(checkpoints_dir) if damage(path) is None]


def whole_before(checkpoint: Path) -> list[Path]:
    """The whole checkpoints older than ``checkpoint`` (a ``step-N`` directory), in its directory, oldest first."""
    return [path for path in whole_checkpoints(checkpoint.parent) if path.name < checkpoint.name]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest whole checkpoint, or None; newer damaged ones are skipped with a warning each."""
    for _, path in reversed(step_checkpoints(checkpoints_dir)):
        problem = damage(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is damaged (%s): skipping it for an older one", path, problem)
    return None


def all_damaged(checkpoints_dir: Path) -> str | None:
    """For a ``checkpoints_dir`` where :func:`latest_checkpoint` found none whole: how many finished checkpoints
    it holds, all damaged, and what is wrong with the newest (``"2 damaged; newest step-00000040: missing
    rank00001.pt"``); None where it holds none."""
    saved = step_checkpoints(checkpoints_dir)
    if not saved:
        return None
    _, newest = saved[-1]
    return f"{len(saved)} damaged; newest {newest.name}: {damage(newest)}"


def resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run starts from: the newest whole one under ``run_dir/checkpoints``, or None.

    Raises:
        ValueError: ``resume`` is ``never`` and ``run_dir`` already holds a run (checkpoints or metrics); or
            ``run_dir`` holds finished checkpoints and none of them is whole (starting from step 0 there would
            throw the run's progress and its metrics away without a word).
    """
    latest = latest_checkpoint(run_dir / "checkpoints")
    if resume == "never" and (latest is not None or (run_dir / "metrics.jsonl").exists()):
        raise ValueError(
            f"run.output_dir {run_dir} already holds a run; use run.resume=auto to continue it "
            "or choose another run.output_dir"
        )
    damaged = all_damaged(run_dir / "checkpoints") if latest is None else None
    if damaged:
        raise ValueError(
            f"cannot resume {run_dir}: no checkpoint under {run_dir / 'checkpoints'} is whole ({damaged}); restore "
            "the missing files, or delete the checkpoints directory to start this run again from step 0, or choose "
            "another run.output_dir"
        )
    return latest


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine, checkpoints_dir: Path, step: int, rank_state: dict[str, Any], meta: dict[str, Any], keep_last: int
) -> Path:
    """Save a complete checkpoint atomically (collective: every rank must call it).

    Args:
        engine: the DeepSpeed engine.
        checkpoints_dir: ``run_dir/checkpoints``.
        step: optimizer steps done.
        rank_state: this rank's trainer state (data position, counters); RNG states are added here.
        meta: run-level facts checked on resume (written by rank 0).
        keep_last: complete checkpoints to keep (older ones are deleted); 0 keeps all.

    Returns:
        The final checkpoint directory.
    """
    info = distributed.current()
    name = step_dir_name(step)
    tmp_tag = f".tmp-{name}"
    final = checkpoints_dir / name
    if final.is_dir() and damage(final) is None:
        # The same step is already whole (a finished run started again, resumed at its last step): the state is
        # the same, and replacing it would open a moment without a newest complete checkpoint. `latest` may
        # still name an older one, where writing it failed the last time.
        if info.is_main:
            point_latest(checkpoints_dir, name)
        return final
    with distributed.shared_failure(CheckpointSaveError):  # also the barrier before the save
        if info.is_main:
            try:
                checkpoints_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise _save_failed(checkpoints_dir, tmp_tag, err, remove=False) from err
            remove_unfinished_saves(checkpoints_dir)
    # A failure on one rank (its rank file, rank 0's meta.json or rename) stops every rank with the same one
    # line; before, the other ranks went on to the next barrier, matched it against a later one of the failed
    # rank and carried on as if the save had succeeded. The unfinished save is removed once every rank has
    # stopped writing into it (rank 0, after the agreement).
    try:
        with distributed.shared_failure(CheckpointSaveError):
            try:
                with _writes_recorded(engine) as (failed_writes, written):
                    engine.save_checkpoint(str(checkpoints_dir), tag=tmp_tag, save_latest=False)
                if failed_writes:
                    raise failed_writes[0]
                rank_file = checkpoints_dir / tmp_tag / f"rank{info.rank:05d}.pt"
                torch.save(dict(rank_state, rng=rng_state()), rank_file)
                # On the disk before the checkpoint goes live and older ones are pruned: a node that crashed
                # soon after could leave the files at their sizes but holding zeros, and nothing older.
                for path in [*written, rank_file]:
                    fsync_path(path)
            except Exception as err:  # noqa: BLE001 - any failure mid-save: say why in one line
                raise _save_failed(checkpoints_dir, tmp_tag, err, remove=False) from err
    except CheckpointSaveError:
        if info.is_main:
            shutil.rmtree(checkpoints_dir / tmp_tag, ignore_errors=True)
        raise
    with distributed.shared_failure(CheckpointSaveError):
        if info.is_main:
            try:
                files = _file_sizes(checkpoints_dir / tmp_tag)
                write_json_atomic(
                    checkpoints_dir / tmp_tag / "meta.json",
                    dict(meta, step=step, world_size=info.world_size, files=files),
                )
                fsync_path(checkpoints_dir / tmp_tag)  # every rank's files are in it, and meta.json
                if final.exists():  # a damaged checkpoint of this step: out of the way, then replaced
                    damaged = checkpoints_dir / f".damaged-{name}"
                    shutil.rmtree(damaged, ignore_errors=True)
                    final.rename(damaged)
                    shutil.rmtree(damaged, ignore_errors=True)
                (checkpoints_dir / tmp_tag).rename(final)
            except Exception as err:  # noqa: BLE001
                raise _save_failed(checkpoints_dir, tmp_tag, err) from err
            point_latest(checkpoints_dir, name)
            fsync_path(checkpoints_dir)  # the rename and `latest` on the disk before older checkpoints go
            if keep_last > 0:
                for old in prunable(checkpoints_dir, keep_last):
                    # Out of the checkpoints' names first: a prune cut short (a kill once meta.json was gone)
                    # left a step directory that no later prune counted, on the disk for good.
                    pruned = checkpoints_dir / f".pruned-{old.name}"
                    try:
                        old.rename(pruned)
                    except OSError:
                        pruned = old
                    shutil.rmtree(pruned, ignore_errors=True)
    return final


@contextlib.contextmanager
def _writes_recorded(engine) -> Iterator[list[BaseException]]:
    """Inside DeepSpeed's ``save_checkpoint``, a write that fails is recorded, not raised (yields the list of
    failures, and the paths of the files written).

    DeepSpeed writes each rank's files between two barriers. A write that raised on one rank (a full disk, a
    quota) sent that rank on to the agreement on the save's outcome while the others waited in DeepSpeed's last
    barrier: every rank hung, without a word, until the process group's timeout (30 minutes by default). With
    the failure recorded, the rank goes through DeepSpeed's barriers like the others (skipping its later
    writes), and the caller raises it once the save has returned, where every rank agrees on it.
    """
    failures: list[BaseException] = []
    written: list[str] = []  # the state files this rank wrote (the checkpoint engine's save(state_dict, path))

    def recorded(write, record: bool):
        def call(*args, **kwargs):
            if failures:
                return None
            try:
                result = write(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - raised by the caller after DeepSpeed's last barrier
                failures.append(err)
                return None
            path = args[1] if len(args) > 1 else kwargs.get("path")
            if record and path is not None:
                written.append(str(path))
            return result

        return call

    # The checkpoint engine writes every state file; rank 0 also copies DeepSpeed's recovery scripts.
    owners = [(getattr(engine, "checkpoint_engine", None), "save"), (engine, "_copy_recovery_script")]
    patched = [(owner, name, vars(owner).get(name)) for owner, name in owners
               if owner is not None and callable(getattr(owner, name, None))]  # fmt: skip
    for owner, name, _ in patched:
        setattr(owner, name, recorded(getattr(owner, name), record=name == "save"))
    try:
        yield failures, written
    finally:
        for owner, name, own in patched:
            if own is None:
                delattr(owner, name)  # the class's method again
            else:
                setattr(owner, name, own)


def point_latest(checkpoints_dir: Path, name: str) -> None:
    """Make ``checkpoints/latest`` (the newest tag, which DeepSpeed's zero_to_fp32.py and ``dist-kd export
    RUN/checkpoints/latest`` read) name ``name``. Where it cannot be written (a full disk after the checkpoint
    itself fitted), the stale file is removed, with a warning, rather than left naming a checkpoint that
    pruning then deletes or an older one that an export would silently take."""
    latest = checkpoints_dir / "latest"
    with contextlib.suppress(OSError):  # bytes: a damaged file that is no UTF-8 is rewritten, not an error
        if latest.read_bytes().strip() == name.encode():
            return
    try:
        with atomic_path(latest) as tmp:
            tmp.write_text(name)
    except OSError as err:
        with contextlib.suppress(OSError):
            latest.unlink()
        logger.warning(
            "could not write %s (%s): %s is saved and resumes, but %s now names no checkpoint; name it explicitly "
            "(RUN/checkpoints/%s) for dist-kd export and DeepSpeed's tools",
            latest, err.strerror or err, name, latest.name, name,
        )  # fmt: skip


def remove_unfinished_saves(checkpoints_dir: Path) -> None:
    """Delete what interrupted saves left: ``.tmp-step-*`` (a rank killed mid-save, e.g. SIGKILLed after SLURM's
    KillWait while it checkpointed on SIGTERM), ``.damaged-step-*`` and ``.pruned-step-*`` (a prune cut short).
    Called by rank 0 before a save, when no rank writes into the directory (the run lock keeps other runs out).
    Such a save is rarely of a step that is saved again, and a large run's was nearly a whole checkpoint, left on
    the disk at every preemption."""
    patterns = (".tmp-step-*", ".damaged-step-*", ".pruned-step-*")
    for leftover in sorted(path for pattern in patterns for path in checkpoints_dir.glob(pattern)):
        if leftover.is_dir():
            logger.info("removing %s, left by an interrupted save", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def prunable(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """The checkpoints that ``keep_last`` lets go: everything older than the ``keep_last`` newest whole ones.

    Only whole checkpoints count towards ``keep_last``: a damaged one kept in their place would leave the run
    nothing to resume from. A damaged one older than every kept whole one can never be resumed from and goes
    too; one between them stays (skipped on resume, replaced when its step is saved again).
    """
    saved = step_checkpoints(checkpoints_dir)
    whole = [step for step, path in saved if damage(path) is None]
    if not whole:
        return []
    oldest_kept = whole[-min(keep_last, len(whole))]
    return [path for step, path in saved if step < oldest_kept]


def _read_only(path: Path) -> bool:
    """Whether ``path`` lies on a filesystem mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _save_failed(checkpoints_dir: Path, tmp_tag: str, err: BaseException, remove: bool = True) -> CheckpointSaveError:
    """Remove the unfinished save (where ``remove``) and describe the failure in one line (a full disk said as
    such)."""
    try:
        free = shutil.disk_usage(checkpoints_dir).free  # before the clean-up frees some
    except OSError:
        free = -1
    if remove:
        shutil.rmtree(checkpoints_dir / tmp_tag, ignore_errors=True)
    full = any(getattr(c, "errno", None) == errno.ENOSPC or "No space left" in str(c) for c in error_causes(err))
    refused = (*PERMISSION_REFUSED, errno.EROFS)
    denied = next((c for c in error_causes(err) if getattr(c, "errno", None) in refused), None)
    if denied is None and not full and not os.access(checkpoints_dir, os.W_OK):
        # DeepSpeed reports an unwritable directory as "Parent directory ... does not exist".
        number = errno.EROFS if _read_only(checkpoints_dir) else errno.EACCES
        denied = OSError(number, os.strerror(number), str(checkpoints_dir))
    previous = latest_checkpoint(checkpoints_dir)
    kept = f"; the newest whole checkpoint, {previous.name}, is intact" if previous else ""
    # Little room left counts as full only when nothing says otherwise (DeepSpeed's own errors hide the errno).
    full = full or (denied is None and 0 <= free < (64 << 20))
    if full:
        reason = f"{NO_SPACE} ({free / 2**20:.0f} MiB free there)"
    elif denied is not None:
        reason = f"{denied.strerror or denied} ({getattr(denied, 'filename', None) or checkpoints_dir})"
    else:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return CheckpointSaveError(
        f"saving a checkpoint under {checkpoints_dir} failed: {reason}{kept}; make room or fix the cause and "
        "rerun to resume",
        disk_full=full,
    )


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The run-level facts a checkpoint was taken with."""
    return json.loads((checkpoint / "meta.json").read_text())


# meta.json's train.precision of a bf16 run -> the train.bf16_mode that trained it (and alone can resume it)
BF16_MODE_OF_PRECISION = {"bf16": "deepspeed", "bf16-autocast": "autocast"}


def resumed_bf16_mode(bf16_mode: str, checkpoint: Path | None) -> str:
    """``train.bf16_mode`` for a run that resumes ``checkpoint``: ``auto`` takes the mode a bf16 checkpoint was
    trained in (its optimizer state loads in that mode only: a checkpoint of DeepSpeed's bf16 optimizer,
    the only bf16 path before ``train.bf16_mode``, goes on in it); anything else is kept as given."""
    if bf16_mode != "auto" or checkpoint is None:
        return bf16_mode
    return BF16_MODE_OF_PRECISION.get(read_meta(checkpoint).get("train.precision"), "auto")


def settings_meta(train, ds_config: dict[str, Any], max_steps: int) -> dict[str, Any]:
    """The settings a checkpoint's optimizer and schedule state was built under, for its ``meta.json``.

    The ``train.*`` and ``deepspeed.*`` keys cannot change on resume: DeepSpeed restores the learning rate and
    weight decay from the checkpoint's optimizer and scheduler state (a new ``train.lr`` would be recorded in
    config.yaml and never used), and another optimizer, precision or ZeRO stage does not load (a traceback
    mid-load, or a missing-file error that reads like damage). ``schedule`` may change: the schedule's shape
    is rebuilt from the config on every start (:func:`check_schedule`).

    Args:
        train: the run's ``TrainConfig``.
        ds_config: the filled DeepSpeed config (its precision and ZeRO stage as resolved).
        max_steps: the run's total steps (the task stage derives it from epochs).
    """
    from dist_kd.train.engine import built_scheduler, zero_stage

    precision = next((key for key in ("bf16", "fp16") if ds_config.get(key, {}).get("enabled")), "fp32")
    if ds_config.get("torch_autocast", {}).get("enabled"):  # fp32 weights and optimizer state, unlike "bf16"
        precision = "bf16-autocast"
    return {
        "train.optimizer": train.optimizer,
        "train.lr": train.lr,
        "train.weight_decay": train.weight_decay,
        "train.seed": train.seed,
        "train.precision": precision,
        "deepspeed.zero_stage": zero_stage(ds_config),
        "schedule": {
            "max_steps": max_steps,
            "warmup_ratio": train.warmup_ratio,
            # the one built: a checkpoint of the constant run of an earlier release (no warmup) resumed under
            # constant_with_warmup is told the schedule changed
            "scheduler": built_scheduler(train.scheduler, max_steps, train.warmup_ratio),
        },
    }


UNCOMPARED = ("schedule", "changeable")  # meta.json keys a resume may change (warned about, not refused)


def _same(key: str, saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """``saved[key] == current[key]``; a model recorded with its weights' digest (``KEY.sha256``, in both) is
    the same model at another ``path``: a copy staged to a job's local disk resumes, a retrained one does not."""
    before, now = saved[key], current[key]
    if before == now:
        return True
    if isinstance(before, dict) and isinstance(now, dict) and f"{key}.sha256" in saved and f"{key}.sha256" in current:
        return {k: v for k, v in before.items() if k != "path"} == {k: v for k, v in now.items() if k != "path"}
    return False


def check_compatible(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume when what defines the run (teacher, student shape, tasks, optimizer settings, ...)
    changed since the checkpoint.

    Args:
        saved: the checkpoint's ``meta.json``.
        current: this run's meta (every key the checkpoint also has is compared, but ``schedule`` and
            ``changeable``, which :func:`check_schedule` and :func:`check_changeable` check; ``step`` and
            ``world_size`` are added at save time).

    Raises:
        ValueError: naming each differing field with its saved and current value.
    """
    differing = [key for key in current if key not in UNCOMPARED and key in saved and not _same(key, saved, current)]
    if not differing:  # keys an older checkpoint lacks are not compared
        for key in current:
            before, now = saved.get(key), current[key]
            moved = isinstance(before, dict) and isinstance(now, dict) and before.get("path") != now.get("path")
            if moved:
                logger.info("%s: %s moved to %s (the same weights)", key, before["path"], now["path"])
        return

    def at(meta: dict[str, Any], key: str) -> str:  # a model's digest: where that model is
        model = meta.get(key.removesuffix(".sha256")) if key.endswith(".sha256") else None
        return f" ({model['path']})" if isinstance(model, dict) and model.get("path") else ""

    details = "; ".join(
        f"{key}: checkpoint has {saved[key]!r}{at(saved, key)}, this run has {current[key]!r}{at(current, key)}"
        for key in differing
    )
    way_out = ""
    if {saved.get("train.precision"), current.get("train.precision")} == set(BF16_MODE_OF_PRECISION):
        mode = BF16_MODE_OF_PRECISION[saved["train.precision"]]
        way_out = (
            f"; 'bf16' is DeepSpeed's bf16 optimizer (bf16 weights, fp32 masters), 'bf16-autocast' fp32 weights "
            f"under torch.autocast: resume this checkpoint with train.bf16_mode={mode}"
        )
    if "deepspeed.zero_stage" in differing:
        stage = saved["deepspeed.zero_stage"]
        way_out += (
            f"; deepspeed.config=ds_configs/zero{stage}.json (or your own JSON of stage {stage}) resumes it: "
            "deepspeed.config defaults to ds_configs/zero0.json since the release that added train.bf16_mode "
            "(ds_configs/zero2.json before)"
        )
    if any(key.endswith(".dev") for key in differing):
        way_out += (
            "; the dev data changed since the checkpoint, whose eval.json and best/ exports were scored on the "
            "earlier dev set, which the new one would be mixed with"
        )
    if any(key.endswith(".metric") for key in differing):
        way_out += "; best/ holds the step the checkpoint's metric picked, which another metric did not judge"
    if "corpus" in differing:
        way_out += (
            "; 'corpus' is a digest of data.shards' manifest (its shards' names, sequence counts and sha256): the "
            "corpus there changed since the checkpoint (shards added, removed or prepared again), where the saved "
            "data position would point at other sequences"
        )
    if any(key.startswith(("train.", "deepspeed.", "data.")) or key.endswith((".dev", ".metric")) or key == "corpus"
           for key in differing):  # fmt: skip
        way_out += (
            f"; to go on from these weights under new settings, export them (dist-kd export --checkpoint {checkpoint} "
            "--output DIR) and start a new run.output_dir with student.path=DIR"
        )
    raise ValueError(
        f"cannot resume from {checkpoint}: {details} (put the checkpoint's values back, or start a new "
        f"run.output_dir{way_out})"
    )


def check_schedule(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """The schedule on resume: refuse a run shorter than the checkpoint's step; say when its shape changed.

    The learning-rate schedule is a function of the step, ``max_steps``, ``warmup_ratio`` and ``scheduler``,
    rebuilt from the config on every start: a longer ``train.max_steps`` (train on) reshapes it from the
    checkpoint's step on, which a warning says with the values before and after.

    Raises:
        ValueError: ``max_steps`` is below the step the checkpoint was taken at.
    """
    step, before, now = int(saved.get("step", 0)), saved.get("schedule") or {}, current["schedule"]
    if step > now["max_steps"]:
        raise ValueError(
            f"cannot resume from {checkpoint}: it is at step {step}, past this run's {now['max_steps']} steps "
            f"(train.max_steps, or the epochs); give at least {step} steps, or start a new run.output_dir"
        )
    changed = [f"{key} {before[key]} -> {new}" for key, new in now.items() if key in before and before[key] != new]
    if changed:
        logger.warning(
            "resuming from %s with another schedule (%s): the learning rate follows the new one from step %d on",
            checkpoint, ", ".join(changed), step,
        )  # fmt: skip


def merged_settings(*parts: dict[str, Any]) -> dict[str, Any]:
    """Meta dicts of settings (top-level keys, each with its ``changeable`` dict) as one."""
    merged: dict[str, Any] = {}
    changeable: dict[str, Any] = {}
    for part in parts:
        merged.update({key: value for key, value in part.items() if key != "changeable"})
        changeable.update(part.get("changeable") or {})
    return {**merged, "changeable": changeable}


# Changeable settings added after checkpoints first recorded them: one without the key ran at this value.
ADDED_CHANGEABLE: dict[str, Any] = {"distill.weights.sentence": 0.0}


def check_changeable(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Settings a resume may change (``changeable`` in ``meta.json``): a warning naming each with both values.

    The trainers record there the data settings under which the data position carries over (the general
    stream counts sequences and lays the rest of its epoch out afresh; the task sampler counts rows per task),
    e.g. ``data.micro_batch_size`` or ``train.grad_accum``, and the loss settings that change the objective
    but no parameter (``distill.weights.*``, ``distill.temperature``, ...); the ones that would re-cut the
    epoch in progress or change the parameters are top-level keys, which :func:`check_compatible` refuses to
    see changed.
    """
    before, now = saved.get("changeable") or {}, current.get("changeable") or {}
    if before:  # a checkpoint that records changeable settings, from before some were added
        before = {**{key: value for key, value in ADDED_CHANGEABLE.items() if key in now}, **before}
    changed = [f"{key} {before[key]} -> {new}" for key, new in now.items() if key in before and before[key] != new]
    if changed:
        logger.warning(
            "resuming from %s with other settings (%s): they apply from step %d on; the data position carries "
            "over (nothing of the epoch in progress comes twice)",
            checkpoint, ", ".join(changed), int(saved.get("step", 0)),
        )  # fmt: skip


def check_world_size(saved: dict[str, Any], world_size: int, zero_stage: int, checkpoint: Path) -> None:
    """Refuse, before anything is loaded, a resume at another world size that DeepSpeed cannot restore.

    ZeRO 0 keeps the whole optimizer state in one file, and the data stream re-lays out the rest of its
    epoch over any number of ranks, so any world size resumes. ZeRO 1-3 partition the optimizer state (and
    ZeRO 3 the weights) by rank; DeepSpeed fails on those with a traceback mid-load.

    Raises:
        ValueError: naming both world sizes and what to do.
    """
    before = int(saved.get("world_size", world_size))
    if before != world_size and zero_stage >= 1:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was saved by {before} ranks under ZeRO-{zero_stage}, whose "
            f"optimizer state is partitioned per rank, and this run has {world_size}; start it on {before} ranks "
            "(deepspeed --num_gpus/--num_nodes), or start a new run.output_dir"
        )


def check_resume(checkpoint: Path, meta: dict[str, Any], world_size: int) -> None:
    """Every check of a resume, before anything is loaded or written: :func:`check_compatible`,
    :func:`check_schedule`, :func:`check_world_size` and :func:`check_changeable` against the checkpoint's
    ``meta.json``.

    Args:
        meta: this run's meta, with :func:`settings_meta` in it.
    """
    saved = read_meta(checkpoint)
    check_compatible(saved, meta, checkpoint)
    check_schedule(saved, meta, checkpoint)
    check_world_size(saved, world_size, meta["deepspeed.zero_stage"], checkpoint)
    check_changeable(saved, meta, checkpoint)


def finished(checkpoint: Path | None) -> bool:
    """True when ``checkpoint`` was taken at its run's last step (its schedule's ``max_steps``)."""
    if checkpoint is None:
        return False
    meta = read_meta(checkpoint)
    return int(meta.get("step", -1)) == int((meta.get("schedule") or {}).get("max_steps", -2))


def saved_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """Rank 0's trainer state in ``checkpoint`` (its step and data position), read before anything is built."""
    with readable(checkpoint):
        return torch.load(checkpoint / "rank00000.pt", map_location="cpu", weights_only=False)


# What reading a state file that has its saved size but not its saved bytes raises (a node that crashed after the
# sizes were recorded can leave zeros): pickle's, torch's zip reader's ("PytorchStreamReader failed", "filename
# 'storages' not found"), a short read.
_UNREADABLE = (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, KeyError)
# A RuntimeError or KeyError counts as such only when it says so (others, from DeepSpeed or a collective, are not
# the files' fault and keep their traceback).
_READ_FAILURE = re.compile(r"PytorchStreamReader|zip archive|filename '.*' not found|unpickl|invalid load key", re.I)


@contextlib.contextmanager
def readable(checkpoint: Path) -> Iterator[None]:
    """Turn a state file of ``checkpoint`` that does not read into one error naming the checkpoint and the
    whole ones before it (a traceback from torch's unpickler named neither)."""
    try:
        yield
    except _UNREADABLE as err:
        if isinstance(err, RuntimeError | KeyError) and not _READ_FAILURE.search(str(err)):
            raise  # an out-of-memory error, a collective's: not the checkpoint's files
        if "weights only load failed" in str(err).lower():  # whole files holding what torch's safe loader refuses
            raise ValueError(
                f"checkpoint {checkpoint} does not load: torch's weights-only loader refuses an object in it "
                f"({str(err).splitlines()[0]}); its files are not damaged: it was written by another checkpoint "
                "writer or DeepSpeed release than this run reads with"
            ) from None
        older = whole_before(checkpoint)
        advice = (
            f"move it out of {checkpoint.parent} to resume from {older[-1].name}, the newest whole one before it"
            if older
            else "no whole checkpoint is older: delete the checkpoints directory to start again from step 0"
        )
        message = str(err).splitlines()[0] if str(err) else ""
        bad = damaged_state_file(checkpoint)
        where = f"its file {bad} is damaged" if bad else "where a file in it is damaged"
        raise ValueError(
            f"checkpoint {checkpoint} does not load ({type(err).__name__}: {message}); {where} "
            f"(its sizes are as saved, so not truncated: overwritten, or zeros from a crash), {advice}"
        ) from None


def damaged_state_file(checkpoint: Path) -> str | None:
    """The name of the first state file (``*.pt``, a zip archive as torch saves it) of ``checkpoint`` that is no
    zip archive or whose bytes fail the archive's checksums; None where each one reads whole. Reads every file
    once: for an error message only."""
    for path in sorted(checkpoint.glob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is None:
                    continue
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            pass
        return path.name
    return None


def load_checkpoint(engine, checkpoint: Path) -> dict[str, Any]:
    """Load model/optimizer/scheduler into ``engine`` and return this rank's trainer state (RNG restored).

    A checkpoint from a different world size (ZeRO 0 only: :func:`check_world_size`) restores the model,
    optimizer and step; the data position then comes from rank 0's state (the stream documents how it
    continues without repeating shards). A rank without its own state starts an empty log window (holding rank
    0's micro-batch counts, which are every rank's): rank 0's open window holds rank 0's own loss sums and
    tokens, which the next log line would count once more for every such rank (and add to ``tokens_seen``).
    On fewer ranks, rank ``r`` also takes the open windows of the
    old ranks ``r + W, r + 2W, ...`` (W the new world size), so that the next line counts every old rank's
    once. The learning rate is the one this run's schedule gives at the checkpoint's step
    (:func:`dist_kd.train.engine.follow_schedule`), whatever schedule saved it.
    """
    from dist_kd.train.engine import follow_schedule

    info = distributed.current()
    with readable(checkpoint):
        engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_optimizer_states=True)
    if engine.lr_scheduler is not None:  # the first step after a resume with another schedule takes its rate
        follow_schedule(engine.lr_scheduler)
    own = checkpoint / f"rank{info.rank:05d}.pt"
    path = own if own.is_file() else checkpoint / "rank00000.pt"
    with readable(checkpoint):
        state = torch.load(path, map_location="cpu", weights_only=False)
    if path == own:
        set_rng_state(state["rng"])
        saved_world = int(read_meta(checkpoint).get("world_size", info.world_size))
        for old_rank in range(info.rank + info.world_size, saved_world, info.world_size):
            with readable(checkpoint):
                other = torch.load(checkpoint / f"rank{old_rank:05d}.pt", map_location="cpu", weights_only=False)
            _add_window(state, other)
            if "corrupt" in state and "corrupt" in other:  # what the old rank met of damaged shards
                state["corrupt"] = {
                    "empty_batches": state["corrupt"]["empty_batches"] + other["corrupt"]["empty_batches"],
                    "skipped_shards": {**other["corrupt"]["skipped_shards"], **state["corrupt"]["skipped_shards"]},
                }
    else:
        if "corrupt" in state:  # rank 0's own, counted by rank 0
            state["corrupt"] = {"empty_batches": 0, "skipped_shards": {}}
        if state.get("window") is not None:  # rank 0's micro-batch counts (the same on every rank), not its sums
            from dist_kd.train.common import window_batches

            window = state["window"]
            state["window"] = {
                "names": window["names"], "totals": [0.0] * len(window["totals"]), "batches": window_batches(window)
            }  # fmt: skip
    return state


def _add_window(state: dict[str, Any], other: dict[str, Any]) -> None:
    """Add ``other``'s open log window (its sums, counts, tokens and rows) into ``state``'s; the micro-batch
    counts, the same on every rank, stay ``state``'s own."""
    mine, theirs = state.get("window"), other.get("window")
    if mine is None or theirs is None or mine["names"] != theirs["names"]:
        return
    from dist_kd.train.common import window_batches

    mine["batches"] = window_batches(mine)  # the counts, before the sums are added
    mine["totals"] = [a + b for a, b in zip(mine["totals"], theirs["totals"], strict=True)]
