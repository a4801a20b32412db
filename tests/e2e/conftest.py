"""End-to-end fixtures: a tiny teacher and a tiny sharded corpus, and a runner for the launch scripts."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_kd.testing import run_process_group
from tests import forked

REPO = Path(__file__).resolve().parents[2]


# Where a process sits in a job: a script inherits none of them (the test's own job, or one that a unit test's
# init_distributed left in this process, would make it rank 13 of 16 waiting for the others).
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def script_env(cuda: bool = False) -> dict[str, str]:
    """The environment of a script the tests start: one process of no job, on the CPU (or, ``cuda``, with the
    machine's GPUs visible), offline."""
    inherited = {
        key: value
        for key, value in os.environ.items()
        if key not in LAUNCHER_VARIABLES and not key.startswith(("SLURM_", "OMPI_", "PMI_"))
    }
    return dict(
        inherited,
        **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""}),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )


def run_script(*args: str, timeout: float = 600, check: bool = True, cuda: bool = False) -> subprocess.CompletedProcess:
    """Run ``python ARGS...`` (or ``deepspeed ...`` when args[0] == 'deepspeed') from the repository root.

    The job runs in its own process group, and nothing of it outlives the call: a launcher's rank processes
    left behind by a timeout (or a crash) would hold the tests' fixed ports and hang the next run on them."""
    cmd = list(args) if args[0] == "deepspeed" else [sys.executable, *args]
    proc = run_process_group(cmd, timeout, popen=forked.popen, cwd=REPO, env=script_env(cuda))
    if proc.returncode is None:
        pytest.fail(f"{' '.join(cmd)} did not end in {timeout:.0f} s (all its processes were killed)\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}")  # fmt: skip
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return proc


def run_until_lines_then_sigterm(
    args: list[str],
    metrics: Path,
    lines: int = 3,
    timeout: float = 300,
    sig: int = signal.SIGTERM,
    expect_code: int = 0,
    group: bool = False,
) -> str:
    """Run ``python ARGS...``, send ``sig`` once ``metrics`` has ``lines`` lines, wait; returns stderr.

    ``group``: the process runs in its own process group and the signal goes to the whole group, its DataLoader
    workers included, as ``scancel``, a preemption, a launcher or Ctrl-C send it.
    Fails unless the process exits with ``expect_code`` (a preempted run checkpoints and exits 0).
    """
    cmd = [sys.executable, *args]
    proc = forked.popen(cmd, cwd=REPO, env=script_env(), text=True, start_new_session=group)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=timeout)
    if proc.returncode != expect_code:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\nstderr:\n{stderr[-4000:]}")
    return stderr


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory`` (to show that a failed command wrote nothing there)."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, tiny_bert_dir):
    """~300 packed sequences of length 32 tokenised with the tiny teacher's tokenizer."""
    from dist_kd.data.corpus import prepare_corpus
    from dist_kd.testing import random_sentences

    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text("\n\n".join(random_sentences(600, seed=3)))
    prepare_corpus(
        [root / "text.txt"], tiny_bert_dir, root / "shards", seq_len=32, shard_size=64, num_workers=0, progress=False
    )
    (root / "heldout.txt").write_text("\n\n".join(random_sentences(100, seed=4)))
    prepare_corpus(
        [root / "heldout.txt"], tiny_bert_dir, root / "eval", seq_len=32, shard_size=64, num_workers=0, progress=False
    )
    # Labelled held-out texts for the quality signals (a keyword topic task a linear probe can read).
    from dist_kd.testing import topic_examples

    (root / "probe.jsonl").write_text("".join(json.dumps(row) + "\n" for row in topic_examples(60, seed=6)))
    return root
