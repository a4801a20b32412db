"""Preemption and Ctrl-C: the first signal asks for a checkpoint and a stop, a second Ctrl-C aborts."""

from __future__ import annotations

import os
import signal

import pytest

from dist_kd.train.common import StopSignal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_asks_for_a_checkpoint_and_a_stop(sig):
    before = signal.getsignal(sig)
    stop = StopSignal()
    try:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        assert stop.requested
    finally:
        stop.restore()
    assert signal.getsignal(sig) is before


def test_second_ctrl_c_aborts_but_a_repeated_sigterm_does_not():
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the cluster repeating itself: still one clean stop
        assert stop.requested
        with pytest.raises(KeyboardInterrupt, match="second Ctrl-C"):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()


JOB = """
import os, signal, sys
from dataclasses import dataclass, field
from types import SimpleNamespace

from dist_kd import api
from dist_kd.train.common import StopSignal

where, run_dir = sys.argv[1], sys.argv[2]


class Trainer:
    def __init__(self, cfg, info):
        if where == "setup":  # SLURM's preemption signal while the teacher loads
            os.kill(os.getpid(), signal.SIGTERM)

    def train(self):
        stop = StopSignal()
        try:
            for step in range(1, 4):
                if stop.requested:
                    print(f"checkpoint at step {step}, stopped")
                    return False
            return True
        finally:
            stop.restore()

    def close(self):
        pass


def finish(trainer, cfg, info):
    if where == "finish":  # --signal=USR1@120 arriving during the final export
        os.kill(os.getpid(), signal.SIGUSR1)
    return ["student exported"]


info = SimpleNamespace(rank=0, world_size=1, is_main=True)
if where == "start":  # through the command line, the signal while the process group waits for other nodes
    import argparse

    from dist_kd import cli, distributed

    @dataclass
    class Run:
        output_dir: str = ""

    @dataclass
    class Config:
        run: Run = field(default_factory=Run)

    def waiting():
        os.kill(os.getpid(), signal.SIGUSR1)
        return info

    distributed.init_distributed = waiting
    args = argparse.Namespace(config=None, overrides=[f"run.output_dir={run_dir}"], debug=True, log_level=None)
    print("exit", cli.run_config_job(args, Config, Trainer, finish))
    sys.exit(0)
cfg = SimpleNamespace(run=SimpleNamespace(output_dir=run_dir))
result = api.run_training(cfg, Trainer, finish, info)
print("completed" if result.completed else "preempted", *result.lines)
"""


@pytest.mark.parametrize(
    "where, expected",
    [
        ("setup", "checkpoint at step 1, stopped\npreempted\n"),
        ("finish", "completed student exported\n"),
        ("start", "checkpoint at step 1, stopped\nexit 0\n"),
    ],
)
def test_a_preemption_signal_outside_the_loop_does_not_kill_the_run(where, expected, tmp_path):
    """SIGTERM/SIGUSR1 while a run sets up or exports killed it (exit -15/-10: not requeued by the SLURM script);
    one during set-up now stops the loop at its first step, one after the loop lets the run finish. So does
    one while the command line starts (the process group waited for other nodes, under the default action)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", JOB, where, str(tmp_path / "run")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout == expected, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "outside the training loop" in proc.stderr


@pytest.mark.parametrize("command", ["general", "task"])
def test_a_preemption_while_the_command_imports_is_kept_for_the_run(command):
    """A SIGTERM before the run's RunSignals (while torch, transformers and DeepSpeed imported: 1.5 s here, more
    on a cold shared filesystem) took its default action: exit 143, no checkpoint, and SLURM did not requeue."""
    import subprocess
    import sys
    import textwrap

    from tests.e2e.conftest import REPO

    script = textwrap.dedent(f"""
        import os, signal, sys
        import launch.{command} as command
        from dist_kd.train.common import RunSignals

        def run_config_job(*args, **kwargs):  # the run's start: a preemption first, then its RunSignals
            os.kill(os.getpid(), signal.SIGTERM)
            with RunSignals() as signals:
                print("requested", signals.requested)
            return 0

        command.run_config_job = run_config_job
        command.parse_args = lambda argv: None
        code = command.main([])
        print("after", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["requested", "True", "after", "True"]  # kept, then the handlers put back
