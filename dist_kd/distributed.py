"""Process-group set-up for every way dist_kd is started, and the DeepSpeed engine.

This is the only module that reads launcher and SLURM environment variables. Supported starts:

- ``deepspeed`` launcher and ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set.
- ``srun`` without a launcher: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, master from SLURM_STEP_NODELIST
  (else SLURM_JOB_NODELIST, SLURM_NODELIST; the first host; ``launch/slurm/general.sbatch`` exports MASTER_ADDR
  itself, which takes precedence).
- a plain ``python`` process (``--debug``, notebooks, tests): world size 1 on a free local port.

The backend comes from DeepSpeed's accelerator: NCCL on CUDA, gloo on the CPU accelerator. On a CPU,
DeepSpeed JIT-builds its shared-memory communication op the first time a process group starts; a build
killed midway leaves torch's ``lock`` file behind, and every later start would wait on it forever in
silence. :func:`guard_jit_build` runs first: it says when the build happens, waits with a message naming
the lock while a build runs, and removes a lock that no build holds. A one-process job skips the op, which
only reduces across ranks (:func:`skip_shm_op`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import io
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from dist_kd.io import usable_cores

# torch.distributed.nn.functional takes ``group=group.WORLD`` as a default argument of its functions, evaluated
# when it is first imported. transformers imports it (through torch's FSDP) when a model class first loads; were
# that after a process group started, those defaults would hold the group, destroy_process_group could not free
# it, and its gloo worker threads would live on into the interpreter's shutdown, where one releasing a finished
# barrier needs the GIL and aborts the process ("terminate called without an active exception", SIGABRT, after
# the run's work is done). Imported here, before any group exists, the defaults are None.
if torch.distributed.is_available():
    import torch.distributed.nn.functional  # noqa: F401

T = TypeVar("T")

logger = logging.getLogger(__name__)

# ``logger.warning(..., extra=RANK_SPECIFIC)``: a warning about this rank alone (a shard it found damaged while
# reading, its own failure), shown from every rank. dist_kd's other warnings say the same on every rank and
# show on rank 0 only (:func:`dist_kd.cli.configure_logging`).
RANK_SPECIFIC = {"rank_specific": True}


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


def _address_in_use(err: BaseException) -> bool:
    """Whether ``err`` (torch's DistNetworkError, or its cause) says the rendezvous port was taken (EADDRINUSE)."""
    seen = 0
    while err is not None and seen < 8:
        text = str(err)
        if "EADDRINUSE" in text or "address already in use" in text.lower():
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return _first_listed_host(nodelist)


def _first_listed_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist without scontrol: "node[03-05,07],gpu1" -> "node03",
    "rack[1-2]-node[01-04]" -> "rack1-node01" (every bracket group at its first value)."""
    depth, end = 0, len(nodelist)
    for index, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = index
            break
    return re.sub(r"\[([^\]]*)\]", lambda group: re.split(r"[,-]", group.group(1))[0], nodelist[:end])


def slurm_tasks(env) -> str:
    """The tasks of this SLURM step: srun's SLURM_STEP_NUM_TASKS, else SLURM_NTASKS (the job's under
    ``srun --preserve-env`` or in the batch script), else "1"."""
    return env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"


def _slurm_tasks_name(env) -> str:
    """The variable :func:`slurm_tasks` read, for messages."""
    return "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"


def slurm_port(env: Mapping[str, str]) -> int:
    """A rendezvous port in 20000-39999 from the job and step ids, so every task of a step agrees without talking
    first, and two steps of one job run side by side (``srun ... augment & srun ... precompute &``) do not
    both listen on one port. The step id counts for nothing in step 0 or where SLURM sets none."""
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    step = env.get("SLURM_STEP_ID", "0")
    step = int(step) if step.isdigit() else 0
    return 20000 + (job + 1009 * step) % 20000


# "<pid>:<port>" of the one-process group a dist_kd process started (set beside the RANK=0, WORLD_SIZE=1 and
# MASTER_PORT it exported for it), so that a child process that inherits them (a notebook's `!dist-kd task ...`
# after api.general) does not take them for a launcher's and try to listen on its parent's port.
ONE_PROCESS_MARK = "DIST_KD_ONE_PROCESS"


def launcher_variables(env: Mapping[str, str]) -> bool:
    """RANK and WORLD_SIZE are set by a launcher (or by hand): both there, and not the one-process values a dist_kd
    parent process exported for its own group (:data:`ONE_PROCESS_MARK`)."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return False
    pid, _, port = env.get(ONE_PROCESS_MARK, "").partition(":")
    inherited = pid not in ("", str(os.getpid())) and env["WORLD_SIZE"] == "1" and env.get("MASTER_PORT") == port
    return not inherited


def _check_place(found: Mapping[str, str], names: Mapping[str, str]) -> None:
    """RANK, WORLD_SIZE and LOCAL_RANK as integers with 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, or one line
    naming the variables they came from (``names``: RANK/WORLD_SIZE/LOCAL_RANK -> the variable read). Out of
    range they waited the whole rendezvous timeout and ended in a gloo or TCPStore traceback, or hung."""
    values = {}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = found[key].strip()
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(f"{names[key]}={found[key]!r} is not an integer (the process's {key.lower()})")
        values[key] = int(text)
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"{names['RANK']}={rank}, {names['WORLD_SIZE']}={world_size}, {names['LOCAL_RANK']}={local_rank}: a "
            f"rank must lie in 0..{names['WORLD_SIZE']}-1 (and the local rank be 0 or more); start the job with "
            "deepspeed, torchrun or srun, or set the variables for each process alike"
        )


def discover_environment() -> dict[str, str]:
    """The RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* variables this process should use (launcher, SLURM or none).

    Raises:
        ValueError: a rank, world size or local rank that is no integer, or out of range (one line naming the
            variables).
    """
    env = os.environ
    if launcher_variables(env):
        found = {k: env[k] for k in ("RANK", "WORLD_SIZE") if k in env}
        found["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        _check_place(found, {key: key for key in found})
    elif "SLURM_PROCID" in env and not re.fullmatch(r"\s*[+-]?\d+\s*", slurm_tasks(env)):
        raise ValueError(
            f"{_slurm_tasks_name(env)}={slurm_tasks(env)!r} is not an integer (the tasks of the SLURM step)"
        )
    elif "SLURM_PROCID" in env and int(slurm_tasks(env)) > 1:
        found = {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": slurm_tasks(env),
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        }
        _check_place(
            found, {"RANK": "SLURM_PROCID", "WORLD_SIZE": _slurm_tasks_name(env), "LOCAL_RANK": "SLURM_LOCALID"}
        )
        # The step's first node: a step of a multi-node job may not start on the job's first node (two steps
        # side by side, `srun ... augment & srun ... precompute &`), where nobody would listen.
        nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)),
                        None)  # fmt: skip
        if "MASTER_ADDR" not in env and nodelist:
            found["MASTER_ADDR"] = _first_slurm_host(nodelist)
        found.setdefault("MASTER_PORT", env.get("MASTER_PORT", str(slurm_port(env))))
    else:
        # One process that no launcher started: nobody else connects, so a free local port, whatever MASTER_*
        # the shell exported (a cluster shell's MASTER_PORT may be another job's: EADDRINUSE; its MASTER_ADDR
        # another node).
        found = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
        found["MASTER_PORT"] = str(_free_port())
    found.setdefault("MASTER_ADDR", env.get("MASTER_ADDR", "127.0.0.1"))
    found.setdefault("MASTER_PORT", env.get("MASTER_PORT", "29500"))
    return found


# Variables that narrow the GPUs a process sees (SLURM's GPU binding sets them per task).
DEVICE_LISTS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
# Set by SLURM in a job or step that was given GPUs (--gres, --gpus*).
SLURM_GPU_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE")


def device_index(local_rank: int, visible: int, env: Mapping[str, str]) -> int:
    """The GPU, among the ``visible`` ones this process sees, that the process with ``local_rank`` uses.

    Usually every process of a node sees all its GPUs and takes GPU ``local_rank``. SLURM with
    ``--gpus-per-task`` (or another per-task GPU binding) shows each task only its own GPUs, numbered from 0,
    while SLURM_LOCALID (hence LOCAL_RANK) still counts the node's tasks 0..7: there GPU ``local_rank`` does
    not exist ("invalid device ordinal") and the process takes ``local_rank % visible`` of its own GPUs. One
    GPU listed in CUDA_VISIBLE_DEVICES counts as such a binding only in a SLURM task that was given GPUs.

    Raises:
        ValueError: ``local_rank`` is beyond the GPUs seen and nothing says they are this task's own (more
            processes on the node than GPUs): one line naming the variables and what to do.
    """
    if local_rank < visible:
        return local_rank
    listed = next((f"{key}={env[key]}" for key in DEVICE_LISTS if env.get(key, "").strip()), None)
    per_task = re.search(r"(\d+)$", env.get("SLURM_GPUS_PER_TASK", "").strip())
    # One GPU listed is SLURM's binding only in a SLURM task given GPUs; elsewhere (torchrun or deepspeed with
    # a global CUDA_VISIBLE_DEVICES=0) every process would take that one GPU, and NCCL refuses duplicates.
    bound = listed and visible == 1 and "SLURM_LOCALID" in env and any(key in env for key in SLURM_GPU_VARIABLES)
    # Several GPUs listed per task without --gpus-per-task (--gpu-bind=closest: a socket's GPUs) are not taken
    # apart: SLURM's default cyclic placement alternates sockets between tasks, so local_rank % visible would
    # give two tasks one GPU. The error below names the bindings that work.
    if visible > 0 and ((per_task and int(per_task.group(1)) == visible) or bound):
        return local_rank % visible
    seen = f"{visible} GPU{'s' if visible != 1 else ''}" + (f" ({listed})" if listed else "")
    raise ValueError(
        f"LOCAL_RANK={local_rank} but this process sees {seen}: more processes on this node than GPUs; start "
        "one process per GPU (srun --ntasks-per-node=GPUS or --gpus-per-task=1, deepspeed --num_gpus, torchrun "
        "--nproc_per_node), or give each SLURM task its own GPU (--gpus-per-task=1 or --gpu-bind=single:1, "
        "not --gpu-bind=closest, which shows a task a socket's GPUs)"
    )


def _say_about_rank_variables(found: Mapping[str, str]) -> None:
    """RANK / WORLD_SIZE that no launcher set (left exported in a shell) made rank 0 wait in silence for ranks
    that never start; one of the two alone was ignored without a word."""
    env = os.environ
    if not launcher_variables(env) and "RANK" in env and "WORLD_SIZE" in env:
        return  # a dist_kd parent's one-process values
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        given = "RANK" if "RANK" in env else "WORLD_SIZE"
        other = "WORLD_SIZE" if given == "RANK" else "RANK"
        _say(f"{given}={env[given]} is set without {other}: ignored (a launcher sets both)")
    elif (
        "RANK" in env and found["WORLD_SIZE"] != "1" and found["RANK"] == "0"
        and "LOCAL_RANK" not in env and "MASTER_ADDR" not in env  # a start by hand names its master
    ):  # fmt: skip
        minutes = env.get("DEEPSPEED_TIMEOUT", "10")
        _say(
            f"RANK=0 and WORLD_SIZE={found['WORLD_SIZE']} come from the environment without a launcher's LOCAL_RANK: "
            f"waiting for the other ranks at {found['MASTER_ADDR']}:{found['MASTER_PORT']} (up to "
            f"DEEPSPEED_TIMEOUT={minutes} minutes); unset RANK and WORLD_SIZE to run one process, or start the job "
            "with deepspeed, torchrun or srun"
        )


def slurm_wait_message(found: Mapping[str, str]) -> str:
    """What rank 0 of a job found from SLURM's variables says before it waits for the other tasks.

    SLURM sets SLURM_PROCID=0 and SLURM_NTASKS in the batch script too, where only one copy runs: a python
    started there without ``srun`` is rank 0 of N and would wait in silence for tasks that never start. The
    documented variables do not tell that case apart, so the line says what was found and what to do.
    """
    minutes = os.environ.get("DEEPSPEED_TIMEOUT", "10")
    return (
        f"rank 0 of {found['WORLD_SIZE']} from SLURM_PROCID/SLURM_NTASKS: waiting for the other tasks at "
        f"{found['MASTER_ADDR']}:{found['MASTER_PORT']} (up to DEEPSPEED_TIMEOUT={minutes} minutes); a command "
        "in an sbatch script needs srun to start one task per rank (srun python -m dist_kd ...)"
    )


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU communication op, JIT-built on first use
STALE_LOCK_S = 600.0  # the op builds in about a minute; a lock this old that no process builds is stale


def _say(message: str) -> None:
    # Before logging is configured (this runs ahead of the process group), on every rank that waits.
    print(f"dist_kd: {message}", file=sys.stderr, flush=True)


def extension_dirs(name: str) -> list[Path]:
    """Where torch JIT-builds the extension ``name``: ``$TORCH_EXTENSIONS_DIR/name``, else every Python/CUDA
    variant under torch's default build root (``~/.cache/torch_extensions/py313_cpu/name``, ...)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return [Path(os.environ["TORCH_EXTENSIONS_DIR"]) / name]
    from torch.utils.cpp_extension import get_default_build_root

    return sorted(Path(get_default_build_root()).glob(f"*/{name}"))


def _local_builders(directory: Path) -> list[int]:
    """Pids of this host's processes that work in ``directory`` (the compiler and ninja run there)."""
    target = str(directory.resolve())
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(proc.name) != os.getpid() and (cwd == target or target in cmdline):
            found.append(int(proc.name))
    return found


def skip_shm_op() -> bool:
    """Let a one-process CPU job start without DeepSpeed's shared-memory op; True when it is switched off.

    DeepSpeed builds the op whenever its CPU backend starts (about a minute, once per machine, and a build
    killed midway leaves a lock), but calls it only to reduce across more than one rank. Marking it
    unavailable in DeepSpeed's table of compatible ops makes the backend skip it; with one rank every
    collective is then torch.distributed's own. False (the op is built as before) when this DeepSpeed has no
    such table.
    """
    try:
        import deepspeed.ops

        table = deepspeed.ops.__compatible_ops__
    except (ImportError, AttributeError):
        return False
    if not isinstance(table, dict):
        return False
    table[SHM_OP] = False
    return True


def guard_jit_build(
    name: str = SHM_OP, stale_after: float = STALE_LOCK_S, poll: float = 5.0, quiet: float = 3.0
) -> None:
    """Make DeepSpeed's JIT build of ``name`` visible and never a silent hang.

    - No build yet: one line says the first run builds it (about a minute, once per machine).
    - A ``lock`` file in its build directory while a process on this host builds there (or the lock is
      younger than ``stale_after`` seconds: a build on another node sharing the directory): wait, with a
      line naming the lock every 30 s. For the first ``quiet`` seconds it is looked at often and nothing is
      said: another rank that loads the op built already holds the lock a moment while it checks the op is
      current (that was "... is building", and a 5 s wait, at starts with nothing to build).
    - A lock that no process on this host builds under and older than ``stale_after``: left by a build
      that was killed; it is removed, with a line naming it, and the build starts again.
    """
    directories = extension_dirs(name)
    # Said by each node's first process: the node's other ranks wait for the same build (it printed once per rank).
    if not any((d / f"{name}.so").is_file() for d in directories) and os.environ.get("LOCAL_RANK", "0") == "0":
        _say(f"DeepSpeed builds its CPU op {name} with a C++ compiler (first run on this machine, about a minute)")
    for directory in directories:
        lock = directory / "lock"
        said, began = -1e9, time.monotonic()
        while True:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                break
            builders = _local_builders(directory)
            if not builders and age > stale_after:
                _say(
                    f"removing {lock}: a stale lock {age / 60:.0f} minutes old that no build process holds "
                    "(left by an interrupted DeepSpeed op build)"
                )
                lock.unlink(missing_ok=True)
                break
            waited = time.monotonic() - began
            if waited >= quiet and time.monotonic() - said >= 30:
                who = f"process {', '.join(map(str, builders))} on this host" if builders else "another process"
                _say(
                    f"waiting for {lock}: {who} is building {name} (a lock with no build is removed after "
                    f"{stale_after / 60:.0f} minutes)"
                )
                said = time.monotonic()
            time.sleep(min(poll, 0.1) if waited < quiet else poll)


def local_process_count(env: dict[str, str] | None = None) -> int:
    """Processes of this job on this node: torchrun's LOCAL_WORLD_SIZE, DeepSpeed's LOCAL_SIZE, SLURM's
    tasks per node ("8" or "8(x2)"), else 1."""
    env = os.environ if env is None else env
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        match = re.match(r"\d+", env.get(key, ""))
        if match and int(match.group()) > 0:
            return int(match.group())
    return 1


def busy_cores(seconds: float = 0.2) -> float:
    """Cores busy right now, from two readings of /proc/stat (0 where it does not exist).

    Measured over a fraction of a second while this process sleeps, so it is the other work on the machine;
    the load average would lag by a minute (the previous step of a pipeline would still count).
    """

    def sample() -> tuple[int, int, int] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        values = [int(v) for v in fields]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle, os.cpu_count() or 1

    def own_ticks() -> int:  # this process's threads (an OpenMP pool still spinning after a torch op)
        try:
            fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            return 0

    first, mine = sample(), own_ticks()
    time.sleep(seconds)
    second, mine = sample(), own_ticks() - mine
    if first is None or second is None or second[0] <= first[0]:
        return 0.0
    total, idle = second[0] - first[0], second[1] - first[1]
    # /proc/stat counts ticks of every core together; the share busy, times the cores, minus our own ticks
    busy_ticks = max(0, total - idle - mine)
    return busy_ticks / total * second[2]


def threads_per_rank(cores: int, local_processes: int, load: float) -> int:
    """torch threads for one rank: its share of the cores the rest of the machine leaves free.

    torch's default is every core in every process; with several ranks per node, or other jobs on the
    machine, the threads then fight for the cores (on a busy 2-core machine fine-tuning ran 6x slower than
    with one thread). ``load`` is the number of cores other work keeps busy as this process starts; it counts
    in whole cores, rounded, so that background work below half a core (a kernel thread, a shell) does not
    take one of a laptop's two cores away for the whole run.
    """
    free = max(1, cores - max(0, round(load)))
    return max(1, min(cores // max(1, local_processes), free // max(1, local_processes)))


def set_thread_count() -> int | None:
    """Apply :func:`threads_per_rank` unless OMP_NUM_THREADS says otherwise; returns the count it set."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = usable_cores()
    # Two short readings, the smaller kept: the previous stage of a pipeline still exiting, or a spike, is not
    # work that will compete with this run.
    load = min(busy_cores(0.15), busy_cores(0.15))
    threads = threads_per_rank(cores, local_process_count(), load)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info(
            "%d torch threads per rank (%d cores, %d processes on this node, load %.1f); OMP_NUM_THREADS overrides",
            threads, cores, local_process_count(), load,
        )  # fmt: skip
    return threads


NVIDIA_DEVICE_NODE = Path("/dev/nvidiactl")  # present where an NVIDIA driver is loaded


def prefer_cpu_accelerator(say: bool = True) -> None:
    """Where torch sees no CUDA device, tell DeepSpeed to use its CPU accelerator (``DS_ACCELERATOR=cpu``, unless
    the environment names one) before it is imported.

    Left to guess, DeepSpeed warned "Setting accelerator to CPU. If you have GPU or other accelerator, we were
    unable to detect it." on every rank of every CPU run, and in ``dist-kd export``. dist_kd runs on CUDA or the
    CPU, so there is nothing to guess. Where the machine has an NVIDIA driver that torch cannot use, it says
    why instead (with ``say``: rank 0; a CPU build of torch, or no device visible), unless
    ``CUDA_VISIBLE_DEVICES`` hides the GPUs on purpose (empty or -1).
    """
    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available():
        return
    os.environ["DS_ACCELERATOR"] = "cpu"
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1")  # the GPUs hidden on purpose
    if say and not hidden and NVIDIA_DEVICE_NODE.exists():
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU build (install a CUDA build of torch to use the GPU)"
        else:
            why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable device: check the driver "
                   "(nvidia-smi) and CUDA_VISIBLE_DEVICES")  # fmt: skip
        _say(f"running on the CPU: this machine has an NVIDIA driver, but {why}")


def init_distributed(force_cpu: bool = False, timeout_s: float | None = None) -> DistInfo:
    """Initialise (once) the process group for this process and return its place in the job.

    Args:
        force_cpu: run on the CPU even when CUDA is available (debug mode, tests).
        timeout_s: how long a collective waits for the other ranks (None: DeepSpeed's, ``DEEPSPEED_TIMEOUT``
            minutes, 10 by default); a command whose ranks wait while one works alone (precompute's last chunk
            and merge) sets a longer one. A rank that dies is found at once either way.
    """
    import torch.distributed as dist

    # What the environment says, completed (a one process job's MASTER_* replaced) unless a group already runs.
    found = discover_environment()
    prefer_cpu_accelerator(say=found.get("RANK") == "0")
    import deepspeed

    if not dist.is_initialized():
        if _TORN_DOWN and found["WORLD_SIZE"] != "1":
            # The ranks would meet again at the launcher's MASTER_PORT, where a rank may still reach the old
            # group's store (the collector frees it when it runs): a gloo "connectFullMesh failed", or a hang.
            raise ValueError(
                f"a process group of {found['WORLD_SIZE']} ranks cannot start again in a process where "
                "dist_kd.distributed.teardown() ended one: keep the group up between stages (call teardown() once, "
                "at the end, or not at all) or run each stage in a process of its own"
            )
        _say_about_rank_variables(found)
        from_slurm = not launcher_variables(os.environ)  # discover_environment's choice
        if from_slurm and found["WORLD_SIZE"] != "1" and found["RANK"] == "0":
            _say(slurm_wait_message(found))
        # What the caller had, put back by teardown (an API caller's process goes on after the group).
        if not _CALLER_ENV:
            _CALLER_ENV.update({key: os.environ.get(key) for key in (*found, ONE_PROCESS_MARK)})
        if from_slurm and found["WORLD_SIZE"] == "1":
            os.environ[ONE_PROCESS_MARK] = f"{os.getpid()}:{found['MASTER_PORT']}"
    os.environ.update({k: v for k, v in found.items() if not dist.is_initialized() or k not in os.environ})
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    set_thread_count()
    if torch.cuda.is_available() and not force_cpu:
        index = device_index(local_rank, torch.cuda.device_count(), os.environ)
        if index != local_rank:
            # DeepSpeed takes its GPU from LOCAL_RANK (the engine, ZeRO-3's parameters, NCCL's device_id).
            if rank == 0:
                seen = torch.cuda.device_count()
                _say(f"LOCAL_RANK {local_rank} sees {seen} GPU(s) (a per-task binding): using GPU {index} of them")
            os.environ["LOCAL_RANK"] = str(index)
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name() if device.type == "cuda" else "gloo"
        shm_op = get_accelerator().device_name() == "cpu" and (world_size > 1 or not skip_shm_op())
        if shm_op:
            guard_jit_build()
        # DeepSpeed prints "DeepSpeed ...deepspeed_shm_comm_op built successfully" on stdout, on every rank and
        # every run (loading the op it built once): a debug line here, unless the start fails. (A build's compiler
        # output does not go through Python's stdout: it shows as before.)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                extra = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, **extra)
        except BaseException as err:
            sys.stdout.write(printed.getvalue())
            if _address_in_use(err):  # a 30-line traceback on rank 0 that never named the fix
                address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise ValueError(
                    f"the rendezvous port {address} is in use (another job on this node, or one that ended a moment "
                    "ago): export MASTER_PORT=<a free port> for every rank and start again"
                ) from None
            raise
        for line in printed.getvalue().splitlines():
            logger.debug("deepspeed: %s", line)
        atexit.register(_teardown_at_exit)
        if shm_op and world_size > 1:
            release_shm_buffer(rank)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def current() -> DistInfo:
    """This process's place in an initialised job (world size 1 when no process group exists)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return DistInfo(0, 1, 0, torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    nccl = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else None  # the GPU init_distributed set
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


_HOST_GROUP: list = []  # the gloo group of any_rank beside a default group that is not gloo (NCCL)
_CALLER_ENV: dict[str, str | None] = {}  # the rendezvous variables as they were before init_distributed set them
_TORN_DOWN: list[int] = []  # groups of several ranks that teardown() ended in this process


def _host_group():
    """The group for host-side agreements: None (the default group) when that is gloo, else a gloo group made
    on first use, whoever created the default group. Making it is collective; every rank reaches its first
    :func:`any_rank` at the same point of the same loop."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank.

    A host-side all-reduce of one number (over gloo: the default group on a CPU, a gloo group beside NCCL on
    GPUs), so it never waits for the device's queued work: no host-device sync.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=_host_group())
    return bool(value.item())


def _rebuilt(
    rank: int, kind: str, message: str, errno_: int | None, filename: str | None, known: tuple[type[Exception], ...]
) -> Exception:
    """Another rank's failure as an exception of the kind the commands report in one line (exit code 2)."""
    if errno_ is not None:  # a write that failed there (a full or read-only disk): the same OSError here
        return OSError(errno_, message, filename)
    kinds = {cls.__name__: cls for cls in (ValueError, FileNotFoundError, *known)}
    if kind in kinds:
        return kinds[kind](message)
    return RuntimeError(f"rank {rank} failed: {kind}: {message}")


@contextlib.contextmanager
def shared_failure(*known: type[Exception]):
    """A block every rank enters (typically rank 0 writes a file while the others wait): when it raises on
    any rank, it raises on every rank, so that no rank goes on to a collective that the failed one never
    reaches (a gloo error or a hang). Collective: ends with a host-side exchange of one small object, which
    also serves as a barrier. The failed rank raises its own exception; the others an equivalent one (the
    same OSError, ValueError, FileNotFoundError or one of the ``known`` classes, each made from the message
    alone; otherwise a RuntimeError naming the rank).
    """
    import torch.distributed as dist

    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - told to every rank, then raised again below
        error = err
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    said = None
    if error is not None:
        errno_ = error.errno if isinstance(error, OSError) and error.errno else None
        text = error.strerror if errno_ and error.strerror else str(error)
        said = (type(error).__name__, text, errno_, getattr(error, "filename", None) if errno_ else None)
    told = [None] * dist.get_world_size()
    dist.all_gather_object(told, said, group=_host_group())
    if error is not None:
        raise said_by(error, _reporter(told, told[dist.get_rank()]))
    for rank, failure in enumerate(told):
        if failure is not None:
            raise said_by(_rebuilt(rank, *failure, known), rank)


def _reporter(told: list, failure: tuple) -> int:
    """The rank that reports an error every rank knows of: the first one that had it (one line, not one per
    rank, when all ranks failed alike)."""
    return next(rank for rank, other in enumerate(told) if other is not None and other[:2] == failure[:2])


def said_by(err: BaseException, rank: int) -> BaseException:
    """Mark ``err``, which every rank raises at the same point (one rank's decision, broadcast), as said by
    ``rank``: the others stay silent, and the ranks tear down in step (:func:`reported_elsewhere`, :func:`agreed`)."""
    err.reported_by = rank
    return err


def reported_elsewhere(err: BaseException, rank: int) -> bool:
    """True when ``err`` came out of :func:`shared_failure` and another rank reports it (the rank that had it
    first); every rank then stops at the same point, so the process group can be torn down in step."""
    return getattr(err, "reported_by", rank) != rank


def agreed(err: BaseException) -> bool:
    """True when every rank raised ``err`` (or its twin) through :func:`shared_failure`; otherwise the other
    ranks may be inside a collective that this rank will never join."""
    return hasattr(err, "reported_by")


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` run by rank 0 alone, its result given to every rank: for digests of model weights and data
    that every rank needs, which would otherwise read each file once per rank (N reads of a teacher on a shared
    filesystem). Collective. A failure on rank 0 raises on every rank (:func:`shared_failure`)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return compute()
    result = None
    with shared_failure():
        if dist.get_rank() == 0:
            result = compute()
    return broadcast_object(result)


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (collective; ``[obj]`` without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object from ``src`` to every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shm_buffer_path(rank: int) -> Path:
    """The shared-memory file in which DeepSpeed's CPU op keeps ``rank``'s all-reduce workspace.

    The op (``shm.cpp``) names it ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``,
    creates it when a CPU process group whose ranks are all on one node starts, and never unlinks it: every
    multi-rank CPU run would leave about 70 MB per rank in /dev/shm (RAM) until the machine restarts.
    """
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"
    return Path("/dev/shm") / name


def release_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer (:func:`shm_buffer_path`) once every rank has mapped
    every other's, so that no exit, SIGKILL included, leaves it in /dev/shm.

    The op maps the other ranks' buffers while the process group starts (``deepspeed.init_distributed``
    returns only after that) and never opens them again; the barrier makes sure every rank got there. The
    mappings stay valid after the unlink (``/proc/PID/maps`` lists them as deleted) until the processes exit,
    which then frees the memory. A group whose ranks span nodes has no buffers: nothing to unlink.
    """
    import torch.distributed as dist

    dist.barrier()
    with contextlib.suppress(OSError):
        shm_buffer_path(rank).unlink(missing_ok=True)


def _free_captured_group(group) -> None:
    """Replace ``group`` by None where a function took it as a default argument when first imported:
    torch.distributed.nn.functional's collectives (imported after the group started, which this module's own
    import of it prevents for the groups dist_kd starts) and DeepSpeed's ``TorchBackend.barrier`` and
    ``monitored_barrier`` (imported after a group started elsewhere). Such a default would keep the group, and
    its gloo threads, alive past ``destroy_process_group``; None means the default group, as before."""
    import inspect

    functions = []
    module = sys.modules.get("torch.distributed.nn.functional")
    if module is not None:
        functions += [value for value in vars(module).values() if inspect.isfunction(value)]
    backend = getattr(sys.modules.get("deepspeed.comm.torch"), "TorchBackend", None)
    functions += [getattr(backend, name) for name in ("barrier", "monitored_barrier") if hasattr(backend, name)]
    for function in functions:
        defaults = getattr(function, "__defaults__", None)
        if defaults and any(value is group for value in defaults):
            function.__defaults__ = tuple(None if value is group else value for value in defaults)


def _teardown_at_exit() -> None:
    """A group still up when the interpreter exits (a Python API script, which keeps it for its next stage) is
    destroyed while the interpreter is whole: after it, gloo's threads could release a finished collective
    only by taking the GIL of an interpreter being torn down, which aborts the process."""
    import torch.distributed as dist

    if dist.is_initialized():
        teardown(in_step=False)


def teardown(in_step: bool = True) -> None:
    """Destroy the process group if one exists (safe to call twice).

    A group that :func:`init_distributed` started unlinked its DeepSpeed shared-memory buffers as it started
    (:func:`release_shm_buffer`). For one started elsewhere (an API caller's), once every rank has reached the
    final barrier (so each has long mapped the others' buffers) each rank unlinks its own here; without the
    barrier a rank may still be looking for the file, so a failed barrier leaves it in place.

    Args:
        in_step: every rank is here at the same point (a normal end, or an error every rank raised: see
            :func:`agreed`). A rank that leaves on an error of its own passes False: the others may be waiting
            in another collective, against which the final barrier would wait until the process group's timeout
            (10 minutes) instead of exiting, so that the launcher (srun --kill-on-bad-exit, torchrun,
            deepspeed) stops the job at once. (A group started elsewhere then leaves its buffer in place.)
    """
    import torch.distributed as dist

    if dist.is_initialized():
        _free_captured_group(dist.group.WORLD)
        synced = False
        with contextlib.suppress(Exception):
            if in_step or dist.get_world_size() == 1:
                dist.barrier()
                synced = True
        rank, ranks = dist.get_rank(), dist.get_world_size()
        dist.destroy_process_group()
        _forget_deepspeed_groups()
        gc.collect()  # the group's rendezvous store is freed by the collector: its port listened on after
        if ranks > 1:
            _TORN_DOWN.append(ranks)
        if synced:
            with contextlib.suppress(OSError):
                shm_buffer_path(rank).unlink(missing_ok=True)
    _HOST_GROUP.clear()
    for key, value in _CALLER_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _CALLER_ENV.clear()


def _forget_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed keeps in module globals (its data-parallel and world groups, cached by
    the first ``deepspeed.initialize``): after ``torch.distributed.destroy_process_group`` they name destroyed
    groups, and the next run in the process failed in ``deepspeed.initialize`` ("Group ... is not registered").
    DeepSpeed 0.19's own destroy does this (``_release_process_group_references``), not torch's; it is called
    where it exists, and these names, which earlier releases keep too, are set back to their initial values."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        with contextlib.suppress(Exception):
            release(group=None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):  # fmt: skip
        cached = getattr(groups, name, None)
        if isinstance(cached, dict):
            cached.clear()
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE",
                 "_MPU_TENSOR_MODEL_PARALLEL_RANK", "mesh_device", "mpu"):  # fmt: skip
        if hasattr(groups, name):
            setattr(groups, name, None)
    if hasattr(groups, "expert_tensor_parallel_world_size"):
        groups.expert_tensor_parallel_world_size = 1
