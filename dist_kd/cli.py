"""Command-line pieces the launch scripts share.

Every task-data command (augment, finetune, precompute, evaluate) names a task and its columns the same
way, every launched command accepts the ``--local_rank`` the deepspeed launcher appends, and every one
reports bad input as a single ``error: ...`` line with exit code 2. Keeping those here keeps the flags, their
help and their meaning identical across commands.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dist_kd.data.tasks import TaskSpec, resolve_task_spec

# Launcher variables a --debug run ignores, so that it is one plain process whatever the shell exported.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
BAD_INPUT_EXIT_CODE = 2


def optional_value(value: str) -> str | None:
    """``none`` / ``null`` / empty on the command line mean "no such column"."""
    return None if value.lower() in ("", "none", "null") else value


class _StoreGiven(argparse.Action):
    """Store the value and set ``<dest>_given``: a flag's default and a value typed by the user can be told apart."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def positive_int(value: str) -> int:
    """An argparse type: an integer >= 1 (a batch size or length of 0 would fail later with a cryptic error)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {number}")
    return number


def positive_float(value: str) -> float:
    """An argparse type: a finite number > 0 (``nan`` and ``inf`` parse as floats and passed a "<= 0" test)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return number


def add_task_arguments(
    parser: argparse.ArgumentParser,
    *,
    unlabeled: bool = False,
    metric: bool = False,
    labels_help: str = "comma-separated label names in index order",
) -> None:
    """``--task`` and the flags that describe a custom task's labels and columns.

    Args:
        parser: the command's parser.
        unlabeled: accept ``--label none`` (data without labels, e.g. to precompute or augment).
        metric: add ``--metric`` (commands that score a dev set).
        labels_help: help text of ``--labels`` (evaluate defaults it to the model's label order).
    """
    parser.add_argument("--task", required=True, help="GLUE name (sst2, mnli, ...) or a custom task name")
    parser.add_argument("--labels", default=None, help=labels_help)
    parser.add_argument("--task-type", default=None, choices=["classification", "regression"])
    if metric:
        parser.add_argument("--metric", default=None, help="accuracy | f1 | mcc | pearson | spearman")
    parser.add_argument("--text-a", default=None, help="column of the first text (default text_a / GLUE's)")
    parser.add_argument(
        "--text-b", type=optional_value, default="text_b", action=_StoreGiven, help="column of the second text; none"
    )
    parser.set_defaults(text_b_given=False)
    parser.add_argument(
        "--id-column", default=None, help="column of stable example ids (default example_id where the data has it, "
        "else <task>-<row>)"
    )  # fmt: skip
    if unlabeled:
        # label_given: a named label column must exist; the default one may be missing (unlabeled data).
        parser.add_argument(
            "--label", type=optional_value, default="label", action=_StoreGiven, help="label column; none if unlabeled"
        )
        parser.set_defaults(label_given=False)
    else:
        parser.add_argument("--label", default="label", action=_StoreGiven, help="label column")
        parser.set_defaults(label_given=False)


def task_spec_from_args(
    args: argparse.Namespace, *, labels: list[str] | None = None, task_type: str | None = None
) -> TaskSpec:
    """The task spec that :func:`add_task_arguments`' flags describe.

    Args:
        args: parsed flags.
        labels: label order to use when ``--labels`` was not given (e.g. the model's own).
        task_type: task type to use when ``--task-type`` was not given.
    """
    return resolve_task_spec(
        args.task,
        type=args.task_type or task_type,
        labels=[label.strip() for label in args.labels.split(",")] if args.labels else labels,
        text_a=args.text_a,
        text_b=args.text_b,
        label=args.label,
        metric=getattr(args, "metric", None),
        id_column=args.id_column,
    )


def add_launcher_argument(parser: argparse.ArgumentParser) -> None:
    """Accept the ``--local_rank=N`` the deepspeed launcher appends (the environment carries the same value)."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def drop_launcher_variables() -> None:
    """Forget launcher variables so that a ``--debug`` run is one process whatever the shell exported."""
    for key in LAUNCHER_VARIABLES:
        os.environ.pop(key, None)


class SameOnEveryRank(logging.Filter):
    """On a rank other than 0: drops dist_kd's warnings unless marked ``extra=RANK_SPECIFIC``, and Python's.

    Every rank runs the same set-up, so a warning such as "the shards hold fewer sequences than one epoch of
    the run" came once per rank (64 copies on 64 ranks); rank 0 says it. The same holds for Python warnings
    (``warnings.warn``: a library's FutureWarning where every rank calls it). Kept: warnings about one rank alone
    (a shard it found damaged while reading, its own failure; :data:`dist_kd.distributed.RANK_SPECIFIC`), every
    error, and other libraries' records (and, with ``--debug``, dist_kd's INFO and DEBUG lines).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or getattr(record, "rank_specific", False):
            return True
        return not (record.name in ("dist_kd", "py.warnings") or record.name.startswith("dist_kd."))


class _BarSafeHandler(logging.StreamHandler):
    """At a terminal, each log line goes through ``tqdm.write``: it clears the progress bars drawn there, writes
    the line and draws them again below it. Written plainly, a line was appended to the bar's own line ("... 28%|##7
    | 83/300 ... 2026-12-05 ... step 100 held-out quality ..."). A log file has no bar line to break."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        except ValueError:  # a closed stream: StreamHandler's emit reports it through handleError
            terminal = False
        if not terminal:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # as logging.StreamHandler: a failing handler reports and never raises into the run
            self.handleError(record)


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
LOG_LEVEL_VARIABLE = "DIST_KD_LOG_LEVEL"
_traceback_errors = False  # bad_input adds the traceback: --log-level debug (not a command's --debug)


def _log_level_name(value: str) -> str:
    name = value.strip().lower()
    if name not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{value!r} (--log-level or ${LOG_LEVEL_VARIABLE}): expected one of {', '.join(LOG_LEVELS)}"
        )
    return name


def add_log_level_argument(parser: argparse.ArgumentParser) -> None:
    """``--log-level``, defaulting to ``$DIST_KD_LOG_LEVEL`` (checked as the flag is): how much the command logs
    (:func:`configure_logging`)."""
    parser.add_argument(
        "--log-level",
        type=_log_level_name,
        default=os.environ.get(LOG_LEVEL_VARIABLE) or None,
        metavar="{" + ",".join(LOG_LEVELS) + "}",
        help=f"rank 0's log level (default info, or ${LOG_LEVEL_VARIABLE}); the other ranks log warnings and "
        "errors, or errors alone at error",
    )


def log_level(name: str | int | None, debug: bool = False) -> int:
    """DEBUG with ``debug`` (a command's ``--debug``); else the level ``name`` gives (``--log-level``: a name or
    a :mod:`logging` level); else ``$DIST_KD_LOG_LEVEL``'s; else INFO.

    Raises:
        ValueError: ``name`` or ``$DIST_KD_LOG_LEVEL`` names no level.
    """
    if debug:
        return logging.DEBUG
    if isinstance(name, int):
        return name
    name = name or os.environ.get(LOG_LEVEL_VARIABLE) or None
    if name is None:
        return logging.INFO
    try:
        return LOG_LEVELS[_log_level_name(name)]
    except argparse.ArgumentTypeError as err:
        raise ValueError(str(err)) from None


def log_format(rank: int) -> logging.Formatter:
    """The format of every log line: date, ``[rank N]``, level, logger, message."""
    return logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


RUN_LOG = "train.log"


class RunLog(logging.FileHandler):
    """A run's ``train.log``: this process's log lines (those that pass the root logger's level), appended, so that
    a run directory keeps its log after the terminal or the job's output is gone; a resumed run appends.

    Lines are held back until :meth:`start` (the run's set-up passed its checks): a run refused at set-up (bad
    input, a resume that does not fit) leaves the directory as it was. Where a write fails (a full disk), one
    line says so and the file is left alone; logging's own report printed a traceback for every line after.
    """

    def __init__(self, path: Path, rank: int):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)
        self.setFormatter(log_format(rank))
        self.held: list[logging.LogRecord] | None = []
        self.failed = False
        self.mirror: logging.Handler | None = None  # attach_run_log's stand-in for logging's last resort
        self.level_was: int | None = None  # the "dist_kd" logger's level before attach_run_log raised it

    def start(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            self.emit(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:  # held as its text: no arguments formatted later, no traceback's frames kept
            held = logging.makeLogRecord(record.__dict__)
            held.msg, held.args = record.getMessage(), None
            if record.exc_info:
                held.exc_text, held.exc_info = self.formatter.formatException(record.exc_info), None
            self.held.append(held)
        elif not self.failed:
            try:
                super().emit(record)  # opens the file at its first line: an error there is not the run's
            except Exception:  # noqa: BLE001 - as logging's handlers: report, never raise into the run
                self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(f"dist_kd: {self.baseFilename} is no longer written ({error}); the log goes on on the terminal",
                  file=sys.stderr, flush=True)  # fmt: skip


def attach_run_log(run_dir: str | Path, rank: int) -> RunLog:
    """A :class:`RunLog` for ``run_dir/train.log`` on the root logger; lines are held until its ``start()``.

    In a process that configured no logging (``dist_kd.api`` in a script or a notebook), Python printed
    warnings through its last-resort handler, which any handler on the root logger switches off: the run's
    warnings would have gone to the file alone. There a stderr handler for warnings stands in for it, and
    dist_kd's INFO lines reach the file, until :func:`detach_run_log`.
    """
    root, ours = logging.getLogger(), logging.getLogger("dist_kd")
    handler = RunLog(Path(run_dir) / RUN_LOG, rank)
    if not root.handlers:
        handler.mirror = logging.StreamHandler()
        handler.mirror.setLevel(logging.WARNING)
        handler.mirror.setFormatter(log_format(rank))
        root.addHandler(handler.mirror)
        if ours.getEffectiveLevel() > logging.INFO:
            handler.level_was = ours.level
            ours.setLevel(logging.INFO)
    root.addHandler(handler)
    return handler


def note_run_failure(handler: logging.Handler | None, err: BaseException, expected: tuple[type, ...] = ()) -> None:
    """Write the error that stops a run into its ``train.log`` alone (the terminal hears it from the command's
    ``error:`` line or Python's traceback): an ``expected`` error (bad input, a full disk) or Ctrl-C as its
    message, anything else with its traceback."""
    if handler is None:
        return
    lost = lost_peer(err)
    if lost is not None:  # another rank's failure: one line (gloo's ~60 lines of traceback said nothing of it)
        record = logging.LogRecord(
            "dist_kd.run", logging.ERROR, "", 0, "run stopped: lost contact with another rank (it exited or was "
            "killed; its error is in its own output, the launcher's or the job's log): %s", (_first_line(lost),),
            None,
        )  # fmt: skip
        handler.handle(record)
        return
    brief = isinstance(err, (*expected, KeyboardInterrupt))
    record = logging.LogRecord(
        "dist_kd.run", logging.ERROR, "", 0, "run stopped: %s: %s", (type(err).__name__, err),
        None if brief else (type(err), err, err.__traceback__),
    )  # fmt: skip
    handler.handle(record)


def detach_run_log(handler: RunLog | None) -> None:
    if handler is None:
        return
    root = logging.getLogger()
    root.removeHandler(handler)
    try:
        handler.close()
    except OSError:  # its last lines cannot be flushed (a full disk): the error that stopped the run is said
        pass
    if handler.mirror is not None:
        root.removeHandler(handler.mirror)
    if handler.level_was is not None:
        logging.getLogger("dist_kd").setLevel(handler.level_was)


def _one_line_end(record: logging.LogRecord) -> bool:
    """A captured warning's text ends in a newline (``warnings.formatwarning``): with the handler's own, a blank
    line followed each one. Python 3.11+ logs that text as the message, 3.10 as the argument of ``"%s"``."""
    if record.msg == "%s" and isinstance(record.args, tuple) and len(record.args) == 1:
        record.msg, record.args = str(record.args[0]), None
    if isinstance(record.msg, str):
        record.msg = record.msg.rstrip("\n")
    return True


def configure_logging(rank: int, debug: bool = False, level: str | int | None = None) -> None:
    """INFO logs on rank 0 (DEBUG with ``debug``), warnings only on the other ranks, each line tagged with its rank.

    ``level`` (``--log-level``; else ``$DIST_KD_LOG_LEVEL``) sets rank 0's level; the other ranks keep warnings
    and errors (with ``debug``, what rank 0 logs), or errors alone at ``error``. The debug level is dist_kd's
    own: other libraries stay at INFO (matplotlib alone logged 2,000 debug lines of font lookups). On the other
    ranks dist_kd's own warnings show only where they are about that rank (:class:`SameOnEveryRank`); errors
    show from every rank.

    The lines of transformers (its load reports among them) and Python's warnings go through the same handler:
    dated, tagged with the rank, and at a terminal written above the progress bars, not onto one
    (:class:`_BarSafeHandler`); each printed its own way, a FutureWarning of torch once per rank. transformers'
    warnings show on rank 0 only, and at ``error`` not at all. Its own bars (``Loading weights``, ``Writing
    model shards``: one per model loaded or saved) show on rank 0 at a terminal only: every rank drew them, and
    in a log file each is a carriage-return line.

    Raises:
        ValueError: ``$DIST_KD_LOG_LEVEL`` names no level.
    """
    global _traceback_errors
    named = log_level(level)  # --log-level or the variable: a command's --debug asks for debug lines alone
    chosen = logging.DEBUG if debug else named
    _traceback_errors = named <= logging.DEBUG
    ours = chosen if rank == 0 or debug else max(chosen, logging.WARNING)
    root = logging.getLogger()
    installed = not root.handlers  # as logging.basicConfig: a process that configured logging itself keeps its own
    if installed:
        handler = _BarSafeHandler()
        handler.setFormatter(log_format(rank))
        if rank != 0:
            handler.addFilter(SameOnEveryRank())
        root.addHandler(handler)
        root.setLevel(max(ours, logging.INFO))
        logging.getLogger("dist_kd").setLevel(ours)
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").addFilter(_one_line_end)
    from transformers.utils import logging as hf_logging

    if installed:
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    if rank != 0 or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        hf_logging.disable_progress_bar()
    # Other ranks: its load reports and warnings say on every rank what rank 0 says (8 lines per model each).
    if rank != 0 or chosen >= logging.ERROR:
        hf_logging.set_verbosity_error()


LOG_FILE_REFRESH_S = 60.0  # seconds between progress lines when stderr is a file (a SLURM log), not a terminal


class _LineStream:
    """tqdm's output where stderr is not a terminal: each refresh one line, never a carriage return.

    tqdm redraws a terminal line with ``\\r``; in a log file those redraws pile up on one line that grows for the
    whole run (megabytes on a long job). Here each refresh is written as its own line, and a refresh that
    repeats the previous one (tqdm shows the final state again on close) is dropped.
    """

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def progress(**kwargs):
    """A tqdm bar on stderr: redrawn in place on a terminal; in a log file, one line every
    :data:`LOG_FILE_REFRESH_S` seconds at most (``kwargs`` are tqdm's)."""
    from tqdm.auto import tqdm

    stream = sys.stderr
    notebook = "notebook" in tqdm.__module__  # Jupyter's widget draws in place without a terminal
    if not notebook and not (hasattr(stream, "isatty") and stream.isatty()):
        # maxinterval too: tqdm's monitor thread otherwise redraws a slow bar every 10 s, between the minute lines.
        kwargs = {
            **kwargs,
            "file": _LineStream(stream),
            "mininterval": LOG_FILE_REFRESH_S,
            "maxinterval": LOG_FILE_REFRESH_S,
        }
    return tqdm(**kwargs)


def bad_input(err: Exception, show: bool = True, rank: int = 0) -> int:
    """Report bad input as one ``error: ...`` line on stderr (where ``show``) and return the exit code for it.

    An OSError of the system (an output on a read-only or full disk, a file where a directory should be) is
    said as ``PATH: reason`` instead of Python's ``[Errno 30] ...: 'PATH'``. A rank other than 0 names itself
    (``error: [rank 3] ...``): its error may be its own. At ``--log-level debug`` the traceback follows (for a
    bug report, where the error is not the input's).
    """
    if show:
        text = str(err)
        if isinstance(err, OSError) and err.filename is not None and err.strerror:
            text = f"{err.filename}: {err.strerror}"
        print(f"error: {f'[rank {rank}] ' if rank else ''}{text}", file=sys.stderr, flush=True)
        if _traceback_errors:  # --log-level debug: where it was raised
            traceback.print_exception(err, file=sys.stderr)
    return BAD_INPUT_EXIT_CODE


PEER_LOST_EXIT_CODE = 1
# What gloo and NCCL say when a peer of a collective is gone (it exited, was killed, or its node failed).
_PEER_LOST = re.compile(
    r"Connection (closed|reset) by peer|ncclRemoteError|NCCL communicator was aborted|"
    r"remote process exited or there was a network error"
)


# What gloo and NCCL say when a collective waited for the other ranks longer than the group's timeout.
_TIMED_OUT = re.compile(r"Timed out waiting \d+ms|Watchdog caught collective operation timeout")


def lost_peer(err: BaseException, pattern: re.Pattern = _PEER_LOST) -> str | None:
    """The message, in ``err`` or its causes, saying that another rank of the process group is gone (or, with
    ``_TIMED_OUT``, that waiting for the others timed out); or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, RuntimeError) and pattern.search(str(err)):
            return str(err)
        err = err.__cause__ or err.__context__
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else text


def run_in_process_group(body: Callable[[], int], bad: tuple[type[Exception], ...] = (ValueError, OSError)) -> int:
    """Run a command's ``body`` (which may start the process group) and tear the group down; returns the exit code.

    Bad input (``bad``) is one ``error:`` line from the rank it concerns (:func:`bad_input`): every rank of
    the job may fail, and one rank alone may fail (a file missing on one node). An error that every rank
    raised together (:func:`dist_kd.distributed.shared_failure`) is said once, by the rank that had it first,
    and the ranks tear down in step. A rank that failed alone leaves without the final barrier, which would
    wait for the others (busy in a collective it never joins) until the group's 10-minute timeout: it exits
    at once, and the launcher stops the job.
    """
    from dist_kd import distributed

    failed: BaseException | None = None
    try:
        return body()
    except Exception as err:
        failed = err
        rank = distributed.current().rank
        lost = lost_peer(err)
        if lost is not None:  # the other rank's own log says why: here one line, not a traceback of gloo's
            print(
                f"error: [rank {rank}] lost contact with another rank (it exited or was killed; its log or the "
                f"launcher's says why): {_first_line(lost)}; a rerun resumes (training from its last checkpoint, "
                "precompute and augment from the chunks and parts written)",
                file=sys.stderr,
                flush=True,
            )
            return PEER_LOST_EXIT_CODE
        waited = lost_peer(err, _TIMED_OUT)
        if waited is not None:  # gloo's traceback named no setting
            print(
                f"error: [rank {rank}] waited for the other ranks past the process group's timeout "
                f"({_first_line(waited)}): a rank still working (precompute's and augment's --wait-timeout set it, "
                "24 h by default; training's is DEEPSPEED_TIMEOUT minutes, 10 by default) or hung; a rerun resumes",
                file=sys.stderr,
                flush=True,
            )
            return PEER_LOST_EXIT_CODE
        if isinstance(err, bad):
            said = distributed.reported_elsewhere(err, rank) or getattr(err, "already_said", False)
            return bad_input(err, show=not said, rank=rank)
        raise
    except BaseException as err:
        failed = err
        raise
    finally:
        distributed.teardown(in_step=failed is None or distributed.agreed(failed))


def config_job_parser(
    description: str, config_help: str, debug_help: str, config_class: type | None = None
) -> argparse.ArgumentParser:
    """The command line of a config-driven training job: ``--config FILE [--debug] [key=value ...]``.

    With ``config_class``, ``--help`` ends with every config key, its type, default and doc text.
    """
    epilog = None
    if config_class is not None:
        from dist_kd.config import describe

        epilog = "config keys (set in the YAML or as key=value):\n" + "\n".join(
            f"  {line}" for line in describe(config_class)
        )
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (YAML + overrides) and exit"
    )
    add_log_level_argument(parser)
    add_launcher_argument(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def run_config_job(
    args: argparse.Namespace,
    config_class: type,
    trainer_class: type,
    finish: Callable[[Any, Any, Any], list[str]],
    debug_overrides: Sequence[str] = (),
) -> int:
    """Config -> :func:`dist_kd.api.run_training` -> print ``finish``'s summary lines; returns the exit code.

    A preempted run (checkpointed, ``completed`` False) exits 0 so the job can be requeued; bad input is one
    error line and exit code 2. ``--debug`` is one process whatever launcher variables the shell holds, with
    ``debug_overrides`` before the user's.
    """
    from dist_kd import distributed
    from dist_kd.api import run_training
    from dist_kd.config import load_config
    from dist_kd.train.checkpoint import CheckpointSaveError, OutputWriteError

    overrides = list(args.overrides)
    if args.debug:
        drop_launcher_variables()
        overrides = [*debug_overrides, *overrides]
    if getattr(args, "print_config", False):
        from dist_kd.config import dump_config

        try:
            print(dump_config(load_config(config_class, args.config, overrides)), end="")
        except (ValueError, FileNotFoundError) as err:
            return bad_input(err)
        return 0

    def body() -> int:
        from dist_kd.train.common import RunSignals

        # A preemption from here on is remembered (the run stops at its first step with a checkpoint), not the
        # death by signal that SLURM does not requeue: the process group may wait minutes for the other nodes.
        with RunSignals():
            return start()

    def start() -> int:
        cfg = None
        try:
            # Read before the process group starts: a one-process job says its error at once. Under a launcher
            # every rank waits for the group, so that an error every rank has is said once, not once per rank.
            # Logging first: the config's own warnings (a key its phase does not read) in the log's format.
            found = distributed.discover_environment()
            configure_logging(int(found["RANK"]), level=getattr(args, "log_level", None))
            refused = None
            try:
                cfg = load_config(config_class, args.config, overrides)
            except (ValueError, FileNotFoundError) as err:
                if found["WORLD_SIZE"] == "1":
                    raise
                refused = err
                if found["RANK"] == "0":  # said at once: ranks that never come (sbatch without srun) are waited for
                    bad_input(err)
                    err.already_said = True
            info = distributed.init_distributed()  # may wait for the other ranks
            with distributed.shared_failure():
                if refused is not None:
                    raise refused
            result = run_training(cfg, trainer_class, finish, info)
        except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints and stops), or one before training
            print(f"interrupted: {_resumes_from(cfg)}", file=sys.stderr)
            return 130
        if result.lines:
            print("\n".join(result.lines), flush=True)
        return 0

    # RunDirInUse is a ValueError
    return run_in_process_group(body, (ValueError, FileNotFoundError, CheckpointSaveError, OutputWriteError))


def _resumes_from(cfg) -> str:
    """What a rerun of an interrupted run starts from, in words: a second Ctrl-C may land before the first one's
    checkpoint is saved, or after (the run said "stopped without a checkpoint" then too)."""
    from dist_kd.train.checkpoint import latest_checkpoint

    run_dir = getattr(getattr(cfg, "run", None), "output_dir", None)
    if run_dir is None:
        return "a rerun resumes from the newest whole checkpoint of its run directory, if any"
    newest = latest_checkpoint(Path(run_dir) / "checkpoints")
    if newest is None:
        return f"no checkpoint in {run_dir}; a rerun starts from step 0"
    return f"a rerun resumes from {newest}"


_EARLY_STOP: list[int] = []  # SIGTERM/SIGUSR1 received before a run's RunSignals took over


@contextlib.contextmanager
def catch_stop_signals():
    """A training command's first moments, before :class:`dist_kd.train.common.RunSignals` takes over: a
    SIGTERM or SIGUSR1 is remembered, and the run stops with a checkpoint at its first step, as one received
    while it sets up. Before, the signal's default action ended the process (exit 143, no checkpoint: SLURM
    does not requeue) while torch, transformers and DeepSpeed were imported (1.5 s here, far longer on a cold
    shared filesystem). The handlers before are put back on leaving."""
    _EARLY_STOP.clear()
    previous = {sig: signal.signal(sig, _remember_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _EARLY_STOP.clear()


def _remember_stop(signum, frame) -> None:
    _EARLY_STOP.append(signum)


def early_stop_signal() -> int | None:
    """The first stop signal :func:`catch_stop_signals` received and nobody took yet, taken (None: none)."""
    return _EARLY_STOP.pop(0) if _EARLY_STOP else None


class ExitOnSignal:
    """SIGTERM / SIGUSR1 end the process with the code their default action gives (128 + the signal), but as a
    ``SystemExit`` raised in the main thread, so that ``finally`` blocks run: the run lock is given back and the
    run's log says why it stopped (killed by the default action, a rerun from another host found the lock held
    for minutes), or a half-written output is removed. For a command without checkpoints (dist-kd finetune,
    prepare-corpus), where stopping at once loses nothing that stopping later would keep."""

    def __init__(self, what: str):
        self.what = what
        self.pid = os.getpid()
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if os.getpid() == self.pid:  # not in a process forked meanwhile (prepare-corpus's tokenizers)
            # a rank's own (see configure_logging): every rank of a job says what it received
            logging.getLogger(__name__).warning(
                "received %s: %s", signal.Signals(signum).name, self.what, extra={"rank_specific": True}
            )
        raise SystemExit(128 + signum)

    def __enter__(self) -> ExitOnSignal:
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
