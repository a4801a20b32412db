"""launch/slurm/*.sbatch under stand-ins for srun and scontrol: one task, the job's preemption signal, and
whether the script requeues the job."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, script_env

SRUN = """#!/usr/bin/env bash
# srun for one task: drop srun's own flags, run the command; with PREEMPT_WHEN set, send the task SIGUSR1 (as
# --signal=USR1@120 does) once that file is non-empty. Like srun, pass SIGUSR1 / SIGTERM on to the task.
while [[ "$1" == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0
"$@" &
task=$!
trap 'kill -USR1 "$task" 2>/dev/null || true' USR1
trap 'kill -TERM "$task" 2>/dev/null || true' TERM
if [ -n "${PREEMPT_WHEN:-}" ]; then
  until [ -s "$PREEMPT_WHEN" ] || ! kill -0 "$task" 2>/dev/null; do sleep 0.05; done
  kill -USR1 "$task" 2>/dev/null || true
fi
while :; do status=0; wait "$task" || status=$?; kill -0 "$task" 2>/dev/null || break; done
exit "$status"
"""

SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames LIST -> this host; scontrol requeue ID -> a line in $REQUEUED.
case "$1" in
  show) echo localhost ;;
  requeue) echo "$2" >> "$REQUEUED" ;;
esac
"""


def _tools(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (directory / name).write_text(text)
        (directory / name).chmod((directory / name).stat().st_mode | stat.S_IXUSR)
    return directory


def sbatch(
    script: str,
    args: list[str],
    tmp_path: Path,
    preempt_when: Path | None = None,
    submit_dir: Path = REPO,
    shell_signal: signal.Signals | None = None,
    restart_count: int = 0,
):
    """Run ``bash launch/slurm/SCRIPT ARGS`` as SLURM would (job 4242, submitted from ``submit_dir``; SLURM runs a
    copy of the script from its spool directory); returns the finished process and the job ids it requeued.

    ``preempt_when``: once that file is non-empty, the task gets SIGUSR1 (``--signal=USR1@N``), or with
    ``shell_signal`` the batch script itself gets that signal (``--signal=B:USR1@N``, ``scancel``'s SIGTERM).
    ``restart_count``: SLURM_RESTART_COUNT, the times the job was requeued before (unset at 0, as SLURM does)."""
    requeued = tmp_path / "requeued.txt"
    requeued.unlink(missing_ok=True)
    tools = _tools(tmp_path / "bin")
    env = dict(
        script_env(),
        PATH=f"{tools}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONPATH=str(REPO),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_SUBMIT_DIR=str(submit_dir),
        SLURM_CPUS_PER_TASK="1",
        REQUEUED=str(requeued),
        PREEMPT_WHEN=str(preempt_when or "") if shell_signal is None else "",
    )
    env.pop("SLURM_RESTART_COUNT", None)
    if restart_count:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    shutil.copy(REPO / "launch" / "slurm" / script, spool / script)
    with subprocess.Popen(
        ["bash", str(spool / script), *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as job:  # fmt: skip
        if shell_signal is not None:
            deadline = time.monotonic() + 300
            while not (preempt_when.exists() and preempt_when.stat().st_size) and job.poll() is None:
                assert time.monotonic() < deadline, "the run logged no step"
                time.sleep(0.05)
            job.send_signal(shell_signal)
        stdout, stderr = job.communicate(timeout=600)
    proc = subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr)
    return proc, requeued.read_text().split() if requeued.exists() else []


@pytest.fixture()
def general_args(tiny_bert_dir, tiny_corpus, tmp_path):
    return [
        "launch/configs/quickstart.yaml", f"teacher.path={tiny_bert_dir}", f"data.shards={tiny_corpus / 'shards'}",
        f"run.output_dir={tmp_path / 'run'}", "eval.texts=null", "data.num_workers=0", "data.micro_batch_size=4",
        "student.num_layers=2", "student.hidden_size=16", "student.num_heads=4", "student.intermediate_size=32",
        "run.log_every=1", "run.save_every=0",
    ]  # fmt: skip


def test_a_preempted_continuation_of_a_finished_run_is_requeued(general_args, tmp_path):
    """A finished run continued with a longer train.max_steps already has student/ from its first end: the
    preempted continuation must still be requeued (it was not, and the job ended at the checkpoint)."""
    proc, requeued = sbatch("general.sbatch", [*general_args, "train.max_steps=3"], tmp_path)
    assert proc.returncode == 0 and requeued == [], proc.stdout + proc.stderr[-3000:]
    assert (tmp_path / "run" / "student").is_dir()

    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text("")  # cut to step 3 by the resumed run anyway; non-empty again once it logs a step
    proc, requeued = sbatch("general.sbatch", [*general_args, "train.max_steps=100000"], tmp_path, metrics)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "received SIGUSR1" in proc.stderr and "requeueing job 4242" in proc.stdout, proc.stderr[-3000:]
    assert requeued == ["4242"]


def test_a_requeued_job_of_a_run_started_with_resume_never_continues_it(general_args, tmp_path):
    """run.resume=never guards the first start; the requeued job (SLURM_RESTART_COUNT 1) was refused by it
    ("already holds a run"), exit 2, and the run stopped for good."""
    args = [*general_args, "train.max_steps=40", "run.resume=never"]
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc, requeued = sbatch("general.sbatch", args, tmp_path, metrics)
    assert proc.returncode == 0 and requeued == ["4242"], proc.stdout + proc.stderr[-3000:]
    proc, requeued = sbatch("general.sbatch", args, tmp_path, restart_count=1)
    assert proc.returncode == 0 and requeued == [], proc.stdout + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr and (tmp_path / "run" / "student" / "config.json").is_file()
    # A new submission of the same command (no restart count) is still refused by run.resume=never.
    proc, _ = sbatch("general.sbatch", args, tmp_path)
    assert proc.returncode == 2 and "already holds a run; use run.resume=auto" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_batch_script_checkpoints_and_requeues_only_for_usr1(general_args, tmp_path, sig):
    """--signal=B:USR1@N reaches the script, not the tasks: the script passes it on, the ranks checkpoint and
    exit 0, and the job is requeued (the script used to keep wait's 138 from the trap, skip the requeue and
    fail). SIGTERM (scancel, preemption) checkpoints too but is not requeued."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    args = [*general_args, "train.max_steps=100000"]
    proc, requeued = sbatch("general.sbatch", args, tmp_path, metrics, shell_signal=sig)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "received SIGUSR1" in proc.stderr, proc.stderr[-3000:]
    assert list((tmp_path / "run" / "checkpoints").glob("step-*")), "no checkpoint written"
    if sig == signal.SIGUSR1:
        assert "requeueing job 4242" in proc.stdout and requeued == ["4242"]
    else:
        assert "not requeued" in proc.stdout and requeued == []


def test_sbatch_submitted_outside_the_checkout_runs_the_installed_commands(general_args, tmp_path):
    """With dist_kd installed and the job submitted from a project directory (no launch/ there), the scripts
    start the installed commands and find each other; they ran `python launch/general.py` from the submit dir."""
    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    proc, requeued = sbatch("general.sbatch", [*general_args, "train.max_steps=2"], tmp_path, submit_dir=elsewhere)
    assert proc.returncode == 0 and requeued == [], proc.stdout + proc.stderr[-3000:]
    assert (tmp_path / "run" / "student").is_dir()
    # task.sbatch reaches the task stage, whose first check is that the shipped example's student exists
    proc, requeued = sbatch("task.sbatch", ["launch/configs/task_example.yaml"], tmp_path, submit_dir=elsewhere)
    assert proc.returncode == 2 and requeued == [], proc.stdout + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: student.path runs/quickstart/student does not exist (expected a Hugging Face model directory)"
    ), proc.stderr[-3000:]


def test_a_finished_run_whose_student_is_a_link_is_not_requeued(general_args, tmp_path):
    """student/ as a symbolic link to other storage is written through (README): the script compared the link's
    own inode and time, which the export never changes, took every finished run for a stopped one and requeued
    it forever."""
    storage = tmp_path / "storage" / "student"
    storage.mkdir(parents=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "student").symlink_to(storage)
    proc, requeued = sbatch("general.sbatch", [*general_args, "train.max_steps=2"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert (storage / "config.json").is_file() and (tmp_path / "run" / "student").is_symlink()
    assert requeued == [] and "requeueing" not in proc.stdout, proc.stdout


def test_bad_input_exits_2_before_srun(general_args, tmp_path):
    """docs/contracts.md: bad input exits with 2. The script's own read of the config exited 1."""
    proc, requeued = sbatch("general.sbatch", [*general_args, "train.max_step=3"], tmp_path)
    assert proc.returncode == 2 and requeued == [], proc.stdout + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'train.max_step'")
    assert not (tmp_path / "run").exists()
