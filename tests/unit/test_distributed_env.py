"""Where a process sits in the job, from the launcher's, SLURM's or no variables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dist_kd.distributed import device_index, discover_environment

LAUNCHERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
             "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID",
             "SLURM_STEP_ID", "SLURM_STEP_NODELIST", "SLURM_NODELIST", "DIST_KD_ONE_PROCESS")  # fmt: skip


@pytest.fixture
def no_launcher(monkeypatch):
    """The environment of a process that no launcher started (the variables of the shell running the tests gone).

    init_distributed writes RANK, WORLD_SIZE and MASTER_* into os.environ itself: the whole environment is put
    back afterwards, so that no later test in this process believes it is rank 13 of 16.
    """
    saved = dict(os.environ)
    for key in LAUNCHERS:
        monkeypatch.delenv(key, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_a_launchers_port_in_use_is_one_error_that_says_what_to_set():
    """A launcher's (or SLURM's derived) rendezvous port held by another process: rank 0 printed a 30-line
    DistNetworkError traceback that never named MASTER_PORT."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        script = "from dist_kd import distributed\ndistributed.init_distributed(force_cpu=True)\n"
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHERS}
        env.update(RANK="0", WORLD_SIZE="1", MASTER_PORT=str(port), MASTER_ADDR="127.0.0.1", CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1")  # fmt: skip
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == (
        f"ValueError: the rendezvous port 127.0.0.1:{port} is in use (another job on this node, or one that ended a "
        "moment ago): export MASTER_PORT=<a free port> for every rank and start again"
    ), done.stderr[-2000:]


@pytest.mark.usefixtures("no_launcher")
def test_a_dist_kd_parents_one_process_values_are_not_a_launchers(monkeypatch):
    """A process that a dist_kd process started (a notebook's `!dist-kd ...` after api.general) inherits the
    RANK=0, WORLD_SIZE=1 and MASTER_PORT its parent exported for its own group: it took them for a launcher's
    and tried to listen on the parent's port ("the rendezvous port ... is in use")."""
    parent = os.getpid() + 1
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_PORT", "41234")
    monkeypatch.setenv("DIST_KD_ONE_PROCESS", f"{parent}:41234")
    found = discover_environment()
    assert found["WORLD_SIZE"] == "1" and found["MASTER_ADDR"] == "127.0.0.1"
    assert found["MASTER_PORT"] != "41234"  # a free port of its own
    # Under SLURM with several tasks, the step's variables count again.
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert discover_environment()["RANK"] == "1"
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key)
    # What a launcher set over them is a launcher's: its own port (torchrun --nproc-per-node 1), several ranks,
    # or the process that set the mark itself.
    for changes in ({"MASTER_PORT": "29500"}, {"WORLD_SIZE": "2"}, {"DIST_KD_ONE_PROCESS": f"{os.getpid()}:41234"}):
        with monkeypatch.context() as patched:
            for key, value in changes.items():
                patched.setenv(key, value)
            found = discover_environment()
            assert (found["WORLD_SIZE"], found["MASTER_PORT"]) == (
                os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]), changes  # fmt: skip


@pytest.mark.usefixtures("no_launcher")
def test_launcher_and_slurm_variables_are_kept(monkeypatch):
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


@pytest.mark.usefixtures("no_launcher")
def test_one_process_ignores_a_master_port_the_shell_exported(monkeypatch):
    """A one-process run (--debug, a laptop) in a cluster shell with MASTER_PORT/MASTER_ADDR exported bound that
    port (EADDRINUSE when another job holds it) or waited for another node; it takes a free local port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
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


@pytest.mark.usefixtures("no_launcher")
def test_slurm_step_tasks_are_the_world_size(monkeypatch):
    """``srun --preserve-env -n 2`` in a job of 8 tasks keeps SLURM_NTASKS=8; the step has 2 (SLURM_STEP_NUM_TASKS)."""
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert discover_environment()["WORLD_SIZE"] == "2"


@pytest.mark.usefixtures("no_launcher")
@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2, WORLD_SIZE=2, LOCAL_RANK=0: a rank must lie in 0..WORLD_SIZE-1"),
        ({"RANK": "-1", "WORLD_SIZE": "1"}, "RANK=-1, WORLD_SIZE=1, LOCAL_RANK=0: a rank must lie"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0, WORLD_SIZE=0, LOCAL_RANK=0: a rank must lie"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-3"}, "LOCAL_RANK=-3: a rank must lie"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer (the process's rank)"),
        ({"RANK": "0", "WORLD_SIZE": "2.0"}, "WORLD_SIZE='2.0' is not an integer"),
        ({"SLURM_PROCID": "3", "SLURM_NTASKS": "2"},
         "SLURM_PROCID=3, SLURM_NTASKS=2, SLURM_LOCALID=0: a rank must lie in 0..SLURM_NTASKS-1"),
        ({"SLURM_PROCID": "4", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"},
         "SLURM_PROCID=4, SLURM_STEP_NUM_TASKS=2"),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not an integer"),
    ],
)  # fmt: skip
def test_a_rank_outside_its_world_is_one_line_naming_the_variables(monkeypatch, variables, message):
    """RANK=2 of WORLD_SIZE=2 waited the whole rendezvous timeout, then a gloo traceback; RANK=-1 hung; a rank
    that is no integer was a bare int() error."""
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError) as raised:
        discover_environment()
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.usefixtures("no_launcher")
def test_two_srun_steps_of_one_job_rendezvous_on_different_ports(monkeypatch):
    """The port came from the job id alone: ``srun -n 2 dist-kd augment & srun -n 2 dist-kd precompute &`` in one
    allocation had both steps' rank 0 listen on one port (EADDRINUSE, or the other step's ranks joining)."""
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    ports = {}
    for step in ("0", "1", "2", "4294967294"):  # the last is SLURM's id for the batch script itself
        monkeypatch.setenv("SLURM_STEP_ID", step)
        per_task = set()
        for task in ("0", "1"):
            monkeypatch.setenv("SLURM_PROCID", task)
            per_task.add(discover_environment()["MASTER_PORT"])
        assert len(per_task) == 1  # every task of a step agrees
        ports[step] = int(per_task.pop())
    assert len(set(ports.values())) == 4 and all(20000 <= port < 40000 for port in ports.values()), ports
    assert ports["0"] == 20000 + 123456 % 20000  # step 0: the job's port, as the sbatch scripts compute it
    monkeypatch.delenv("SLURM_STEP_ID")
    assert discover_environment()["MASTER_PORT"] == str(ports["0"])
    monkeypatch.setenv("MASTER_PORT", "29555")  # an exported port still wins
    assert discover_environment()["MASTER_PORT"] == "29555"


def test_device_index_per_task_gpus():
    """SLURM's --gpus-per-task / GPU binding: LOCAL_RANK counts the node's tasks, each task sees its own GPUs."""
    assert device_index(3, 8, {}) == 3  # every process sees the node's GPUs
    slurm = {"SLURM_LOCALID": "5", "SLURM_STEP_GPUS": "5"}
    assert device_index(5, 1, {"CUDA_VISIBLE_DEVICES": "0", **slurm}) == 0  # bound to one GPU
    assert device_index(7, 1, {"SLURM_GPUS_PER_TASK": "1"}) == 0
    assert device_index(3, 2, {"SLURM_GPUS_PER_TASK": "2", "CUDA_VISIBLE_DEVICES": "6,7"}) == 1
    assert device_index(3, 2, {"SLURM_GPUS_PER_TASK": "a100:2"}) == 1


def test_device_index_refuses_more_processes_than_gpus():
    # torchrun --nproc_per_node 2 on a one-GPU machine: GPU 0 twice would fail inside NCCL
    with pytest.raises(ValueError, match=r"LOCAL_RANK=1 but this process sees 1 GPU: .*one process per GPU"):
        device_index(1, 1, {})
    # four GPUs listed for every process and eight processes: which four share is unknowable
    with pytest.raises(ValueError, match=r"LOCAL_RANK=5 .* 4 GPUs \(CUDA_VISIBLE_DEVICES=0,1,2,3\)"):
        device_index(5, 4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    # --gpu-bind=closest shows task 5 its socket's four GPUs; under SLURM's cyclic placement tasks 1 and 5 both
    # see one socket's, so local_rank % 4 would give two tasks one GPU: refused, naming a binding that works
    closest = {"SLURM_LOCALID": "5", "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    with pytest.raises(ValueError, match=r"--gpus-per-task=1 or --gpu-bind=single:1, not --gpu-bind=closest"):
        device_index(5, 4, closest)
    # torchrun --nproc_per_node 2 under a global CUDA_VISIBLE_DEVICES=0: both processes took GPU 0 (NCCL:
    # "Duplicate GPU detected"); so did SLURM tasks that were given no GPUs
    for env in ({}, {"SLURM_LOCALID": "1"}):
        with pytest.raises(ValueError, match=r"LOCAL_RANK=1 .* 1 GPU \(CUDA_VISIBLE_DEVICES=0\)"):
            device_index(1, 1, {"CUDA_VISIBLE_DEVICES": "0", **env})


@pytest.mark.usefixtures("no_launcher")
def test_init_distributed_uses_the_one_gpu_a_task_sees(monkeypatch):
    """SLURM_LOCALID 5 with --gpus-per-task=1: torch.cuda.set_device(5) was 'invalid device ordinal', and
    DeepSpeed (engine, ZeRO-3, NCCL's device_id) reads its GPU from LOCAL_RANK; both now get GPU 0."""
    import torch
    import torch.distributed as dist
    from deepspeed.comm.utils import get_local_rank_from_launcher

    from dist_kd import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the group itself needs NCCL
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SLURM_PROCID", "13")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("SLURM_GPUS_PER_TASK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    info = distributed.init_distributed()
    assert chosen == [0] and info.device == torch.device("cuda", 0), (chosen, info)
    assert (info.rank, info.world_size, info.local_rank) == (13, 16, 5)
    assert os.environ["LOCAL_RANK"] == "0" and get_local_rank_from_launcher() == 0


@pytest.mark.usefixtures("no_launcher")
def test_init_distributed_says_what_slurm_rank_0_waits_for(monkeypatch, capsys):
    """A python run in an sbatch script with --ntasks 4 and no srun is rank 0 of 4 (SLURM sets SLURM_PROCID=0
    there too) and waits for tasks that never start: it says so, with the timeout and srun, before waiting."""
    import deepspeed

    from dist_kd import distributed

    def stop(**kwargs):
        raise RuntimeError("no rendezvous in this test")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setattr(distributed, "guard_jit_build", lambda *a, **k: None)
    monkeypatch.setattr(deepspeed, "init_distributed", stop)
    with pytest.raises(RuntimeError, match="no rendezvous"):
        distributed.init_distributed(force_cpu=True)
    err = capsys.readouterr().err
    assert "rank 0 of 4 from SLURM_PROCID/SLURM_NTASKS" in err and "srun" in err and ":20077" in err, err


@pytest.mark.usefixtures("no_launcher")
def test_the_master_is_the_first_node_of_the_step(monkeypatch):
    """A step of a multi-node job that does not start on the job's first node (two steps side by side) took
    the job's first node as its master, where nobody listened: both ranks waited until the timeout."""
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no scontrol")))
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "othernode,gpu[07-08]")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08]")
    assert discover_environment()["MASTER_ADDR"] == "gpu07"
    monkeypatch.delenv("SLURM_STEP_NODELIST")
    assert discover_environment()["MASTER_ADDR"] == "othernode"
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    monkeypatch.setenv("SLURM_NODELIST", "node[3-4]")  # older SLURM's name
    assert discover_environment()["MASTER_ADDR"] == "node3"
    # Host names with text after a bracket group (the fallback parser cut them at the first one).
    for nodelist, first in (("rack[1-2]-node[01-04]", "rack1-node01"), ("nid[0001-0002]-ib", "nid0001-ib"),
                            ("node[03-05,07],gpu1", "node03")):  # fmt: skip
        monkeypatch.setenv("SLURM_NODELIST", nodelist)
        assert discover_environment()["MASTER_ADDR"] == first, nodelist


@pytest.mark.usefixtures("no_launcher")
def test_rank_variables_no_launcher_set_are_named(monkeypatch, capsys):
    """RANK=0 WORLD_SIZE=2 left exported in a shell made rank 0 wait ten minutes without a word; RANK alone was
    ignored silently."""
    import deepspeed

    from dist_kd import distributed

    def stop(**kwargs):
        raise RuntimeError("no rendezvous in this test")

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(distributed, "guard_jit_build", lambda *a, **k: None)
    monkeypatch.setattr(deepspeed, "init_distributed", stop)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="no rendezvous"):
        distributed.init_distributed(force_cpu=True)
    err = capsys.readouterr().err
    assert "RANK=0 and WORLD_SIZE=2 come from the environment without a launcher's LOCAL_RANK" in err, err
    assert "unset RANK and WORLD_SIZE to run one process" in err
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(RuntimeError, match="no rendezvous"):
        distributed.init_distributed(force_cpu=True)
    assert "RANK=3 is set without WORLD_SIZE: ignored" in capsys.readouterr().err
    # Under srun, the stray RANK does not hide what SLURM's rank 0 waits for.
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(RuntimeError, match="no rendezvous"):
        distributed.init_distributed(force_cpu=True)
    err = capsys.readouterr().err
    assert "RANK=0 is set without WORLD_SIZE: ignored" in err and "rank 0 of 2 from SLURM_PROCID" in err
    # A start by hand that names its master (one process per node) is not told to unset anything.
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    with pytest.raises(RuntimeError, match="no rendezvous"):
        distributed.init_distributed(force_cpu=True)
    assert "unset RANK" not in capsys.readouterr().err


def test_the_environment_is_put_back():
    """Runs after the tests above in one process: init_distributed's variables did not leak out of them."""
    assert os.environ.get("RANK") != "13" and os.environ.get("WORLD_SIZE") != "16"
