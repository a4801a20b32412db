"""Run worker scripts on 2 CPU ranks (gloo) in subprocesses, so a hung rank cannot hang pytest."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "workers"


def free_port() -> int:
    """A local port no one listens on now (for a launcher's --master_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    script: str,
    *args: str,
    nproc: int = 2,
    timeout: float = 300,
    cuda: bool = False,
    env: dict | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Start ``script`` (in tests/distributed/workers, or a path) on ``nproc`` ranks with torchrun (CPU ranks
    unless ``cuda``; ``env`` adds variables); with ``check``, fail on a non-zero exit."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    # --standalone: torchrun picks a free port itself (a port found free here could be taken before it bound it)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
        str(WORKERS / script), *args,
    ]  # fmt: skip
    # A rank that hangs past the timeout is killed with the launcher (torchrun starts each rank in a session of
    # its own), not left behind spinning on the CI's two cores through every test after it.
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            import psutil

            launcher = psutil.Process(popen.pid)
            for process in [*launcher.children(recursive=True), launcher]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            stdout, stderr = popen.communicate(timeout=60)
            pytest.fail(f"{script} did not end within {timeout} s (a hang):\n{stdout[-4000:]}\n{stderr[-8000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"{script} failed with exit code {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture
def ranks():
    return run_ranks
