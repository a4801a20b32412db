"""tests/forked.py: a command run in a fork of the test process behaves as the same command in a new
interpreter (its output, exit code, signals, environment, logging, warnings, exit handlers, module state)."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dist_kd.testing import run_process_group
from tests import forked

SCRIPT = textwrap.dedent(
    """
    import atexit, concurrent.futures, logging, os, sys, threading, time, warnings

    print("out", os.getcwd(), os.environ.get("FORKED_X"), os.environ.get("FORKED_GONE"), sys.argv[1:])
    print("err line", file=sys.stderr)
    sys.stderr.write("bar 1\\rbar 2\\r\\n")
    print("pgid", os.getpgid(0) == os.getpid())
    import dist_kd.models.dropout as dropout
    print("fast dropout", dropout._enabled)
    print("root handlers", len(logging.getLogger().handlers), "sigterm", signal_name())
    logging.getLogger("forked_test_library").warning("library warning")
    for _ in range(2):
        warnings.warn("told once", UserWarning)
    atexit.register(lambda: print("exit handler"))
    threading.Thread(target=lambda: (time.sleep(0.2), print("thread done"))).start()
    pool = concurrent.futures.ThreadPoolExecutor(1)  # held to the end: its worker waits for the exit
    pool.submit(print, "pool task")
    mode = sys.argv[1]
    if mode == "raise":
        raise RuntimeError("boom")
    if mode == "interrupt":
        raise KeyboardInterrupt
    if mode == "sleep":
        open("ready", "w").close()
        time.sleep(60)
    sys.exit(int(mode))
    """
).replace("signal_name()", "int(__import__('signal').getsignal(__import__('signal').SIGTERM))")


@pytest.fixture(autouse=True)
def forks_allowed(request, monkeypatch):
    """These tests are of the fork itself: a backward refused in a fork of this worker, by a test of another file
    before (the fallback that tests/forked.py then takes), must not turn them into new interpreters."""
    monkeypatch.setattr(forked, "_autograd_refused", False)
    if "autograd" not in request.node.name:
        monkeypatch.setattr(forked, "_autograd_runs_in_a_fork", lambda: True)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FORKED_GONE"}
    return {**env, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "DIST_KD_FAST_DROPOUT": "1", "FORKED_X": "x",
            **extra}  # fmt: skip


def _both(script, mode: str, tmp_path, **env) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    command = [sys.executable, str(script), mode]
    fresh = run_process_group(command, 60, cwd=tmp_path, env=_env(**env))
    assert forked.can_fork(command, _env(**env))
    fork = run_process_group(command, 60, popen=forked.popen, cwd=tmp_path, env=_env(**env))
    return fresh, fork


@pytest.fixture
def dirty_test_process(monkeypatch):
    """What a test process may hold that a new interpreter has not: a variable, a library logger whose handler
    writes to this process's stderr and one whose stream is closed, the repository's module state changed, an exit
    handler, a SIGTERM handler."""
    import dist_kd.models.dropout as dropout

    monkeypatch.setenv("FORKED_GONE", "still here")
    library = logging.getLogger("forked_test_library")
    handler = logging.StreamHandler(sys.stderr)
    library.addHandler(handler)
    closed = open(os.devnull, "w")  # a handler left on a stream that a test closed, as test_cli's were: its flush
    closed.close()  # raised in the child's set-up, which ended with 70 and said nothing
    left = logging.StreamHandler(closed)
    logging.getLogger("forked_test_other_library").addHandler(left)
    monkeypatch.setattr(dropout, "_enabled", False)
    ran: list[int] = []

    def handler_of_the_test() -> None:
        ran.append(os.getpid())
        print("the test's exit handler", file=sys.__stderr__)

    atexit.register(handler_of_the_test)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    yield ran
    signal.signal(signal.SIGTERM, previous)
    atexit.unregister(handler_of_the_test)
    library.removeHandler(handler)
    logging.getLogger("forked_test_other_library").removeHandler(left)


@pytest.mark.parametrize("mode", ["0", "3", "raise"])
def test_a_forked_command_says_and_exits_as_a_new_interpreter(script, tmp_path, mode, dirty_test_process):
    fresh, fork = _both(script, mode, tmp_path)
    assert fork.returncode == fresh.returncode == {"0": 0, "3": 3, "raise": 1}[mode]
    assert fork.stdout == fresh.stdout
    assert f"out {tmp_path} x None ['{mode}']" in fork.stdout  # its cwd, environment (without FORKED_GONE), argv
    assert "pgid True" in fork.stdout and "fast dropout True" in fork.stdout  # own session, fresh module state
    assert "root handlers 0 sigterm 0" in fork.stdout  # SIG_DFL
    assert fork.stdout.rstrip().endswith("thread done\nexit handler")  # threads joined, then exit handlers
    assert fork.stderr == fresh.stderr  # the traceback too, from the script's frame
    assert fork.stderr.count("UserWarning: told once") == 1
    assert fork.stderr.count("library warning") == 1  # the test process's handler, now on the child's stderr
    if mode == "raise":
        assert fork.stderr.rstrip().endswith("RuntimeError: boom") and "Traceback" in fork.stderr
    assert "the test's exit handler" not in fork.stderr and dirty_test_process == []


def test_an_uncaught_keyboard_interrupt_ends_by_sigint_as_python_does(script, tmp_path):
    fresh, fork = _both(script, "interrupt", tmp_path)
    assert fork.returncode == fresh.returncode == -signal.SIGINT
    assert fork.stderr == fresh.stderr and fork.stderr.rstrip().endswith("KeyboardInterrupt")


def test_signals_timeouts_and_a_merged_stderr(script, tmp_path):
    command = [sys.executable, str(script), "sleep"]
    proc = forked.popen(command, cwd=tmp_path, env=_env(), stderr=subprocess.STDOUT, start_new_session=True)
    assert isinstance(proc, forked.ForkedScript)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # its own process group
    output, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM and err is None
    assert b"err line" in output and b"out " in output  # stderr into stdout's pipe
    stopped = run_process_group(command, 10, popen=forked.popen, cwd=tmp_path, env=_env())
    assert stopped.returncode is None and "out " in stopped.stdout  # the timeout killed it, what it wrote kept


POOL_SCRIPT = """
import concurrent.futures, sys
held = sys.modules.get("forked_test_pool_holder")  # only in the fork: the test process's module
pool = held.pool if held else concurrent.futures.ThreadPoolExecutor(2)
print("pool", pool.submit(lambda: 6 * 7).result(timeout=20))
"""


def test_a_thread_pool_of_the_test_process_works_in_the_command(tmp_path, monkeypatch):
    """A pool whose workers ran in the test process (torch's inductor keeps one for its compiles) comes into the
    fork with those workers gone: the command's first task waited for ever in the queue (a compile hung on
    Python 3.13). Python 3.12+ warns of every fork of a process with threads; this one is meant, and is not."""
    import concurrent.futures
    import types
    import warnings

    held = types.ModuleType("forked_test_pool_holder")
    held.pool = concurrent.futures.ThreadPoolExecutor(2)
    assert list(held.pool.map(abs, [-1, -2, -3])) == [1, 2, 3] and len(held.pool._threads) == 2  # idle workers
    monkeypatch.setitem(sys.modules, held.__name__, held)
    (tmp_path / "pool.py").write_text(POOL_SCRIPT)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            fresh, fork = _both(tmp_path / "pool.py", "", tmp_path)
    finally:
        held.pool.shutdown()
    assert fresh.returncode == fork.returncode == 0, fork.stderr[-2000:]
    assert fork.stdout == fresh.stdout == "pool 42\n"
    assert not [w for w in said if "multi-threaded" in str(w.message)], [str(w.message) for w in said]


def test_commands_that_cannot_fork_run_in_a_new_interpreter(monkeypatch):
    assert not forked.can_fork(["deepspeed", "--num_gpus", "2", "launch/general.py"], _env())
    assert not forked.can_fork([sys.executable, "launch/general.py"], _env(CUDA_VISIBLE_DEVICES="0"))
    assert not forked.can_fork(["/usr/bin/python3", "launch/general.py"], _env())
    monkeypatch.setenv("DIST_KD_TEST_FORK", "0")
    assert not forked.can_fork([sys.executable, "launch/general.py"], _env())
    proc = forked.popen([sys.executable, "-c", "print(1)"], cwd=".", env=_env())
    assert isinstance(proc, subprocess.Popen) and proc.communicate(timeout=60)[0] == b"1\n"


def test_once_autograd_refuses_a_fork_commands_start_new_interpreters(monkeypatch, capfd):
    """After torch's autograd started threads for a device in the test process, every backward in a fork of it
    raises; the probe (a backward in a fork) sees it and the commands start new interpreters from then on."""
    import types

    import torch

    parent = os.getpid()

    class Tensor:
        def sum(self):
            return self

        def backward(self):  # as torch's engine in a child forked after its device threads started
            if os.getpid() != parent:
                raise RuntimeError("Unable to handle autograd's threading in combination with fork-based ...")

    command = [sys.executable, "-c", "print(1)"]
    probe = "import torch; from tests import forked; print(forked._autograd_runs_in_a_fork())"
    fresh = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[2], env=_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert fresh.stdout.strip() == "True", fresh.stderr[-2000:]  # a backward runs in a fork of a new process
    fake = types.SimpleNamespace(ones=lambda *a, **k: Tensor(), cuda=torch.cuda, distributed=torch.distributed)
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert not forked.can_fork(command, _env())
    assert "a backward failed in a fork of this process (exit 1)" in capfd.readouterr().err
    monkeypatch.setitem(sys.modules, "torch", torch)
    assert not forked.can_fork(command, _env())  # remembered: no fork from now on
    proc = forked.popen(command, cwd=".", env=_env())
    assert isinstance(proc, subprocess.Popen) and proc.communicate(timeout=60)[0] == b"1\n"
