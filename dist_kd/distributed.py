"""Process-group set-up for every way dist_kd is started, and the DeepSpeed engine.

This is the only module that reads launcher and SLURM environment variables. Supported starts:

- ``deepspeed`` launcher and ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set.
- ``srun`` without a launcher: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, master from SLURM_JOB_NODELIST
  (the first host; ``launch/slurm/general.sbatch`` exports MASTER_ADDR itself, which takes precedence).
- a plain ``python`` process (``--debug``, notebooks, tests): world size 1 on a free local port.

The backend comes from DeepSpeed's accelerator: NCCL on CUDA, gloo on the CPU accelerator.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs, writes shared files and exports)."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # Without scontrol: "node[03-05,07],gpu1" -> "node03".
        match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
        return match.group(1) + (match.group(2) or "") if match else nodelist


def discover_environment() -> dict[str, str]:
    """The RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* variables this process should use (launcher, SLURM or none)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        found = {k: env[k] for k in ("RANK", "WORLD_SIZE") if k in env}
        found["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        found = {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        }
        if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
            found["MASTER_ADDR"] = _first_slurm_host(env["SLURM_JOB_NODELIST"])
        # A port derived from the job id, so every task of the job agrees without talking first.
        found.setdefault("MASTER_PORT", env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)))
    else:
        found = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        if "MASTER_PORT" not in env:
            found["MASTER_PORT"] = str(_free_port())
    found.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    found.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return found


def init_distributed(force_cpu: bool = False) -> DistInfo:
    """Initialise (once) the process group for this process and return its place in the job.

    Args:
        force_cpu: run on the CPU even when CUDA is available (debug mode, tests).
    """
    import deepspeed
    import torch.distributed as dist

    for key, value in discover_environment().items():
        os.environ.setdefault(key, value)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and not force_cpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name() if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def current() -> DistInfo:
    """This process's place in an initialised job (world size 1 when no process group exists)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return DistInfo(0, 1, 0, torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() and dist.get_backend() == "nccl" else None
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device or torch.device("cpu"))


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor across ranks (returned as-is without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` to every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def teardown() -> None:
    """Destroy the process group if one exists (safe to call twice)."""
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()
