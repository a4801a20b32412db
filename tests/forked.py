"""The tests' command runs in a forked copy of the test process, not a new interpreter (CI time).

Each `python launch/*.py ...` the end-to-end tests start spent 5-8 s of CPU importing torch, transformers,
DeepSpeed and the rest before its own few seconds of work: about half of CI's CPU time on two cores. Here the
test process imports them once, and each command runs in a fork of it: a process of its own (its own pid,
session, output pipes, signals and exit code, killed like any other), whose state starts as a new
interpreter's would, not as the test process left it:

- the repository's own modules (``dist_kd``, ``launch``, ``bench``) are imported afresh, so their module
  state (the dropout switch read from the environment, held run locks, open loaders) is the command's own;
- ``os.environ``, the working directory, ``sys.argv``/``sys.path[0]``, stdin/stdout/stderr, signal handlers,
  the logging tree, warnings filters and torch's global settings are reset to what ``python SCRIPT`` has;
- thread pools the test process holds (torch's inductor keeps one) start their own workers in the child;
- exit handlers and non-daemon threads run at the end, and the exit code follows Python's own rules.

Where that cannot hold, the command runs in a new interpreter as before: the deepspeed launcher, a command
that needs the GPUs, a test process holding a process group or a CUDA context or whose autograd refuses to run
in a fork, a platform without fork, or ``DIST_KD_TEST_FORK=0`` in the environment (a whole suite in new
interpreters, to compare).
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings

# Imported once in the test process, before its first fork: what the commands import (the rest they import
# themselves, costing only that child).
WARM_MODULES = (
    "torch",
    "numpy",
    "yaml",
    "tqdm",
    "safetensors.torch",
    "pyarrow.parquet",
    "webdataset",
    "datasets",
    "transformers",
    "deepspeed",
    "deepspeed.runtime.engine",
    "matplotlib.pyplot",
    "sklearn.linear_model",
)
# The repository's packages: a fork drops them so that the command imports its own copy.
OWN_PACKAGES = ("dist_kd", "launch", "bench")
# The filters pytest adds around each test (a new interpreter has neither).
_PYTEST_FILTERS = {
    ("always", None, DeprecationWarning, None, 0),
    ("always", None, PendingDeprecationWarning, None, 0),
}
_warmed = False
_child_stdio = False  # in a child, once fds 0-2 are its own
_autograd_refused = False  # once a backward failed in a fork of this process


def can_fork(command: list[str], env: dict[str, str] | None = None) -> bool:
    """Whether ``command`` (``[python, SCRIPT|-m MODULE|-c CODE, ...]``) may run in a fork of this process."""
    if os.environ.get("DIST_KD_TEST_FORK", "1") == "0" or not hasattr(os, "fork") or sys.platform != "linux":
        return False
    if len(command) < 2 or command[0] != sys.executable:
        return False  # the deepspeed launcher, a console script, another interpreter
    if (env or {}).get("CUDA_VISIBLE_DEVICES", "") != "":
        return False  # a command on the GPUs: CUDA does not survive a fork
    torch = sys.modules.get("torch")
    if torch is None:
        return True
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False  # would share its sockets
    return _autograd_runs_in_a_fork()


def _fork() -> int:
    with warnings.catch_warnings():  # Python 3.12+ warns of any fork of a process with threads: this one is the
        # point, and the child starts what it needs afresh (_child)
        warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
        return os.fork()


def _autograd_runs_in_a_fork() -> bool:
    """torch's autograd refuses every backward in a child forked after its engine started threads for a device
    ("Unable to handle autograd's threading in combination with fork-based multiprocessing"), which a test in
    this process may have done: a fork tries one backward first (a few ms), and from the first refusal on every
    command starts a new interpreter. (On Python 3.10, 24 commands of one pytest worker failed so.)"""
    global _autograd_refused
    if _autograd_refused:
        return False
    pid = _fork()
    if pid == 0:
        code = 1
        try:
            sys.modules["torch"].ones(1, requires_grad=True).sum().backward()
            code = 0
        finally:
            os._exit(code)
    deadline, status = time.monotonic() + 30, None
    while status is None:
        done, waited = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(waited)
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -signal.SIGKILL
        else:
            time.sleep(0.002)
    if status != 0:
        _autograd_refused = True
        test = os.environ.get("PYTEST_CURRENT_TEST", "?")
        print(f"tests/forked: a backward failed in a fork of this process (exit {status}) at {test}; its commands "
              "now start new interpreters", file=sys.stderr)  # fmt: skip
    return status == 0


def warm() -> None:
    """Import :data:`WARM_MODULES` in this process (once); a missing optional one is passed over."""
    global _warmed
    if _warmed:
        return
    import importlib

    for name in WARM_MODULES:
        with contextlib.suppress(ImportError), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module(name)
    _warmed = True


class ForkedScript:
    """:class:`subprocess.Popen`'s interface (``pid``, ``poll``, ``wait``, ``send_signal``, ``kill``,
    ``communicate``, ``returncode``) for a command run in a fork of this process.

    Args:
        command: ``[sys.executable, SCRIPT, ARGS...]``, ``[sys.executable, "-m", MODULE, ...]`` or
            ``[sys.executable, "-c", CODE, ...]``.
        cwd: the working directory of the command.
        env: its whole environment.
        start_new_session: the child leads a session (and process group) of its own, as Popen's flag.
        merge_stderr: stderr goes to the stdout pipe (Popen's ``stderr=STDOUT``).
        text: ``communicate`` returns str (UTF-8, undecodable bytes replaced, universal newlines), else bytes.

    Unlike Popen's, the command is not given its first argument's interpreter: it is this one, forked.
    """

    def __init__(
        self,
        command: list[str],
        *,
        cwd: str | os.PathLike,
        env: dict[str, str],
        start_new_session: bool = False,
        merge_stderr: bool = False,
        text: bool = True,
    ) -> None:
        warm()
        self.args, self.returncode, self._text = list(command), None, text
        out_read, out_write = os.pipe()
        err_read, err_write = (None, None) if merge_stderr else os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = _fork()
        if pid == 0:  # the child: never returns into the test
            code = 70
            try:
                os.close(out_read)
                if err_read is not None:
                    os.close(err_read)
                code = _child(command[1:], os.fspath(cwd), env, start_new_session, out_write, err_write or out_write)
            except BaseException:  # noqa: BLE001 (the child's own set-up failed: say so on its stderr)
                with contextlib.suppress(OSError):  # stderr once the child's are in place, else the pipe's end
                    os.write(2 if _child_stdio else err_write or out_write, traceback.format_exc().encode())
            finally:
                os._exit(code)
        self.pid = pid
        os.close(out_write)
        if err_write is not None:
            os.close(err_write)
        self._pipes = {out_read: bytearray()} | ({} if err_read is None else {err_read: bytearray()})
        self._stdout_fd, self._stderr_fd = out_read, err_read
        self._open = set(self._pipes)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple:
        """Read both pipes to their end and wait for the exit, as Popen's (a timeout keeps what was read)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            for fd in self._open:
                selector.register(fd, selectors.EVENT_READ)
            while self._open:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in selector.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        self._pipes[key.fd] += chunk
                    else:
                        selector.unregister(key.fd)
                        os.close(key.fd)
                        self._open.discard(key.fd)
        self.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        outputs = [bytes(self._pipes[fd]) if fd is not None else None for fd in (self._stdout_fd, self._stderr_fd)]
        if self._text:  # as Popen's text mode: universal newlines (a progress bar's \r redraws become lines)
            outputs = [None if o is None else o.decode(errors="replace").replace("\r\n", "\n").replace("\r", "\n")
                       for o in outputs]  # fmt: skip
        return outputs[0], outputs[1]

    def __del__(self) -> None:
        for fd in getattr(self, "_open", ()):
            with contextlib.suppress(OSError):
                os.close(fd)


def popen(command: list[str], *, cwd, env: dict[str, str], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text: bool = False, start_new_session: bool = False):  # fmt: skip
    """:class:`subprocess.Popen` (pipes for stdout and stderr, or stderr=STDOUT) as a :class:`ForkedScript`
    where :func:`can_fork` allows it, else the same command in a new interpreter."""
    if not can_fork(command, env) or stdout != subprocess.PIPE or stderr not in (subprocess.PIPE, subprocess.STDOUT):
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text,
                                start_new_session=start_new_session)  # fmt: skip
    return ForkedScript(command, cwd=cwd, env=env, start_new_session=start_new_session,
                        merge_stderr=stderr == subprocess.STDOUT, text=text)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# The child's side


def _child(args: list[str], cwd: str, env: dict[str, str], new_session: bool, out_fd: int, err_fd: int) -> int:
    if new_session:
        os.setsid()
    _reset_signals()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in {null, out_fd, err_fd} - {0, 1, 2}:
        os.close(fd)
    global _child_stdio
    _child_stdio = True
    _fresh_exit_handlers()
    _fresh_thread_pools()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    old_stdout = sys.stdout
    _fresh_stdio()
    _fresh_logging(old_stdout)
    _fresh_warnings()
    _fresh_torch()
    _drop_own_modules()
    sys.excepthook = sys.__excepthook__
    threading.excepthook = threading.__excepthook__
    return _run(args, cwd)


def _reset_signals() -> None:
    """The dispositions of a new interpreter: Python's own SIGINT handler, SIGPIPE and SIGXFSZ ignored (as
    Python sets them at start), every other signal at its default, none blocked, no alarm pending."""
    import faulthandler

    faulthandler.disable()
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        target = {signal.SIGINT: signal.default_int_handler, signal.SIGPIPE: signal.SIG_IGN,
                  signal.SIGXFSZ: signal.SIG_IGN}.get(sig, signal.SIG_DFL)  # fmt: skip
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, target)


def _fresh_exit_handlers() -> None:
    """The test process's exit handlers are not the command's: only those a new interpreter has before it runs
    the command (logging's, multiprocessing's) stay, and the command's modules register their own as they are
    imported again. multiprocessing's state is reset as it resets a process it forks itself: no children, no
    finalizers of the parent's objects, its after-fork hooks run."""
    import atexit
    import logging

    atexit._clear()
    atexit.register(logging.shutdown)
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        sys.modules["multiprocessing.process"]._children.clear()
        util._finalizer_registry.clear()
        util._run_after_forkers()
        atexit.register(util._exit_function)


def _fresh_thread_pools() -> None:
    """A thread pool the test process holds comes into the child with its workers counted but gone (a fork keeps
    only the thread that forked): torch's inductor keeps one for its compiles, made by a test that compiled in
    the test process, and a compile in the child queued its work there and waited for ever. A pool's next
    ``submit`` in the child drops the dead workers first, so that it starts its own as a new pool does."""
    from concurrent.futures import thread

    adjust = thread.ThreadPoolExecutor._adjust_thread_count
    if getattr(adjust, "_forked_child", False):
        return

    def adjust_after_fork(self):
        workers = getattr(self, "_threads", None)
        if workers and any(not worker.is_alive() for worker in workers):
            self._threads = {worker for worker in workers if worker.is_alive()}
            self._idle_semaphore = threading.Semaphore(0)  # the dead workers' "idle" counts, which took new work
        adjust(self)

    adjust_after_fork._forked_child = True
    thread.ThreadPoolExecutor._adjust_thread_count = adjust_after_fork


def _fresh_stdio() -> None:
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, errors: str) -> io.TextIOWrapper:
        raw = io.FileIO(fd, "w", closefd=False)
        buffered = raw if unbuffered else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", errors=errors, write_through=unbuffered,
                                line_buffering=not unbuffered and os.isatty(fd))  # fmt: skip

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = sys.__stdout__ = stream(1, "strict")
    sys.stderr = sys.__stderr__ = stream(2, "backslashreplace")


def _fresh_logging(old_stdout) -> None:
    """No handler on the root logger (the test's capture handlers were there), library handlers that wrote to
    the test's stdout/stderr writing to the child's, the repository's loggers as never configured."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    root.filters.clear()
    logging.captureWarnings(False)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        if name.split(".")[0] in OWN_PACKAGES or name == "py.warnings":
            logger.handlers.clear()
            logger.filters.clear()
            logger.setLevel(logging.NOTSET)
            logger.propagate, logger.disabled = True, False
            continue
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:
                to_stdout = handler.stream is old_stdout or getattr(handler.stream, "name", None) == "<stdout>"
                with contextlib.suppress(ValueError, OSError):  # a test's stream may be closed (setStream flushes)
                    handler.flush()
                handler.stream = sys.stdout if to_stdout else sys.stderr
    logging.Logger.manager._clear_cache()
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # its logging as at import: its own handler, its verbosity from the environment
        hf_logging = transformers.utils.logging
        hf_logging.enable_default_handler()
        hf_logging.disable_propagation()
        hf_logging.enable_progress_bar()
        named = os.environ.get("TRANSFORMERS_VERBOSITY", "warning").upper()
        levels = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
        hf_logging.set_verbosity(levels.get(named, logging.WARNING))


def _fresh_warnings() -> None:
    """The filters without pytest's, every "shown once" record forgotten, warnings printed to stderr (pytest
    records them into a list)."""
    kept = [f for f in warnings.filters if f not in _PYTEST_FILTERS]
    warnings.resetwarnings()
    warnings.filters[:] = kept
    mutated = getattr(warnings, "_filters_mutated", None)  # the per-module "already shown" registries start over
    if mutated is not None:
        mutated()
    warnings.onceregistry.clear()
    warnings.showwarning = warnings._showwarning_orig
    warnings._showwarnmsg_impl = _print_warning


def _print_warning(message: warnings.WarningMessage) -> None:
    file = message.file if message.file is not None else sys.stderr
    with contextlib.suppress(OSError):
        file.write(warnings._formatwarnmsg(message))


def _fresh_torch() -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else (os.cpu_count() or 1))
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.use_deterministic_algorithms(False)
    torch.set_float32_matmul_precision("highest")
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def _drop_own_modules() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in OWN_PACKAGES]:
        del sys.modules[name]


def _run(args: list[str], cwd: str) -> int:
    """Run ``python ARGS`` in this process and return its exit code (after its exit handlers)."""
    import atexit

    interrupted = False
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]
            sys.path.insert(0, cwd)
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
        else:
            sys.argv = list(args)
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        _print_uncaught()
        code, interrupted = 1, True
    except BaseException:  # noqa: BLE001 (an uncaught error: Python prints it and exits 1)
        _print_uncaught()
        code = 1
    # As the interpreter's own shutdown, before the exit handlers: threading's exit hooks (a thread pool's workers
    # are told to stop; joining them without that waits forever), then every non-daemon thread joined.
    threading._shutdown()
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    if interrupted:  # Python ends by SIGINT after an uncaught KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _print_uncaught() -> None:
    """The traceback Python prints, from the command's first frame (not this module's or runpy's)."""
    kind, value, tb = sys.exc_info()
    while tb is not None and tb.tb_frame.f_globals.get("__name__") in (__name__, "runpy"):
        tb = tb.tb_next
    sys.excepthook(kind, value.with_traceback(tb), tb)


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    with contextlib.suppress(Exception):
        print(value, file=sys.stderr)
    return 1
