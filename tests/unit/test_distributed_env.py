"""Where a process sits in the job, from the launcher's, SLURM's or no variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from dist_kd.distributed import discover_environment

LAUNCHERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")


def test_launcher_and_slurm_variables_are_kept(monkeypatch):
    for key in LAUNCHERS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("MASTER_ADDR", "node7")
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert discover_environment() == dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="0", MASTER_ADDR="node7",
                                          MASTER_PORT="29555")  # fmt: skip
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    found = discover_environment()
    assert (found["RANK"], found["WORLD_SIZE"], found["MASTER_ADDR"], found["MASTER_PORT"]) == ("5", "16", "node7",
                                                                                                "29555")  # fmt: skip


def test_one_process_ignores_a_master_port_the_shell_exported(monkeypatch):
    """A one-process run (--debug, a laptop) in a cluster shell with MASTER_PORT/MASTER_ADDR exported bound that
    port (EADDRINUSE when another job holds it) or waited for another node; it takes a free local port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for key in LAUNCHERS:
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("MASTER_ADDR", "node7")
        found = discover_environment()
        assert found["MASTER_ADDR"] == "127.0.0.1" and found["MASTER_PORT"] != str(port), found
        assert (found["RANK"], found["WORLD_SIZE"]) == ("0", "1")

        script = "from dist_kd import distributed\nprint(distributed.init_distributed(force_cpu=True).world_size)\n"
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHERS}
        env.update(MASTER_PORT=str(port), MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip().endswith("1"), done.stderr[-2000:]
