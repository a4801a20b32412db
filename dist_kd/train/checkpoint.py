"""Checkpoints: atomic DeepSpeed saves plus per-rank trainer state, and finding the newest complete one.

Layout under ``run_dir/checkpoints/``::

    step-00000500/                 a complete checkpoint (renamed into place when every rank finished)
        <DeepSpeed files>          model, optimizer (ZeRO shards), scheduler
        rank00000.pt ...           per-rank trainer state: step, tokens, data position, RNG states
        meta.json                  written last: step, shapes of teacher and student (for resume checks)
    .tmp-step-00000750/            a save in progress (or interrupted): never picked for resume

Every rank writes into the temporary directory (a shared filesystem, as DeepSpeed itself assumes); after
a barrier rank 0 writes ``meta.json`` and renames the directory, so a checkpoint is either complete
under its final name or absent. Older complete checkpoints beyond ``keep_last`` are then deleted.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_kd import distributed
from dist_kd.io import write_json_atomic

STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    """The directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step-{step:08d}"


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / "meta.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


def resume_point(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run starts from: the newest complete one under ``run_dir/checkpoints``, or None.

    Raises:
        ValueError: ``resume`` is ``never`` and ``run_dir`` already holds a run (checkpoints or metrics).
    """
    latest = latest_checkpoint(run_dir / "checkpoints")
    if resume == "never" and (latest is not None or (run_dir / "metrics.jsonl").exists()):
        raise ValueError(
            f"run.output_dir {run_dir} already holds a run; use run.resume=auto to continue it "
            "or choose another run.output_dir"
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
    if info.is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        if (checkpoints_dir / tmp_tag).exists():
            shutil.rmtree(checkpoints_dir / tmp_tag)  # left by an interrupted save of the same step
    distributed.barrier()
    engine.save_checkpoint(str(checkpoints_dir), tag=tmp_tag, save_latest=False)
    torch.save(dict(rank_state, rng=rng_state()), checkpoints_dir / tmp_tag / f"rank{info.rank:05d}.pt")
    distributed.barrier()
    if info.is_main:
        write_json_atomic(checkpoints_dir / tmp_tag / "meta.json", dict(meta, step=step, world_size=info.world_size))
        if final.exists():
            shutil.rmtree(final)
        (checkpoints_dir / tmp_tag).rename(final)
        if keep_last > 0:
            for _, old in complete_checkpoints(checkpoints_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """The run-level facts a checkpoint was taken with."""
    return json.loads((checkpoint / "meta.json").read_text())


def check_compatible(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume when what defines the run (teacher, student shape, tasks, ...) changed since the checkpoint.

    Args:
        saved: the checkpoint's ``meta.json``.
        current: this run's meta (every key is compared; ``step`` and ``world_size`` are added at save time).

    Raises:
        ValueError: naming each differing field with its saved and current value.
    """
    differences = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {current[key]!r}"
        for key in current
        if saved.get(key) != current[key]
    ]
    if differences:
        raise ValueError(
            f"cannot resume from {checkpoint}: " + "; ".join(differences) + " (start a new run.output_dir instead)"
        )


def load_checkpoint(engine, checkpoint: Path) -> dict[str, Any]:
    """Load model/optimizer/scheduler into ``engine`` and return this rank's trainer state (RNG restored).

    A checkpoint from a different world size restores the model, optimizer and step; the data position
    then comes from rank 0's state (the stream documents how it continues without repeating shards).
    """
    info = distributed.current()
    engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_optimizer_states=True)
    own = checkpoint / f"rank{info.rank:05d}.pt"
    path = own if own.is_file() else checkpoint / "rank00000.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    if path == own:
        set_rng_state(state["rng"])
    return state
