"""dist_kd.cli: the task flags every task-data command shares mean the same everywhere."""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from dataclasses import dataclass, field

import pytest

from dist_kd.cli import add_task_arguments, bad_input, task_spec_from_args


def _parse(argv, **options):
    parser = argparse.ArgumentParser()
    add_task_arguments(parser, **options)
    return parser.parse_args(argv)


def test_custom_task_from_flags():
    args = _parse(["--task", "topic", "--labels", "b,a", "--text-a", "body", "--text-b", "none", "--label", "y"])
    spec = task_spec_from_args(args)
    assert (spec.name, spec.labels, spec.text_a, spec.text_b, spec.label) == ("topic", ["b", "a"], "body", None, "y")
    assert spec.type == "classification"


def test_glue_task_keeps_registry_columns_and_order():
    spec = task_spec_from_args(_parse(["--task", "sst2"]))
    assert spec.labels == ["0", "1"] and spec.text_b is None


def test_fallback_labels_only_when_flags_do_not_give_them():
    args = _parse(["--task", "topic"], metric=True)
    assert task_spec_from_args(args, labels=["x", "y", "z"]).labels == ["x", "y", "z"]
    args = _parse(["--task", "topic", "--labels", "p,q", "--metric", "f1"], metric=True)
    spec = task_spec_from_args(args, labels=["x", "y", "z"])
    assert spec.labels == ["p", "q"] and spec.metric == "f1"
    # "neg, pos" as typed after a comma: the space is no part of the label (the file's cells are stripped too)
    assert task_spec_from_args(_parse(["--task", "topic", "--labels", "neg, pos "])).labels == ["neg", "pos"]
    assert task_spec_from_args(_parse(["--task", "score"]), task_type="regression").type == "regression"


def test_unlabeled_only_where_allowed():
    assert task_spec_from_args(_parse(["--task", "sst2", "--label", "none"], unlabeled=True)).label is None
    assert _parse(["--task", "sst2", "--label", "none"]).label == "none"  # a column literally named none


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    assert bad_input(ValueError("data.tsv: column 'text' is missing")) == 2
    assert capsys.readouterr().err == "error: data.tsv: column 'text' is missing\n"
    assert bad_input(ValueError("quiet"), show=False) == 2
    assert capsys.readouterr().err == ""
    # the system's errors (an output on a read-only disk) as PATH: reason, not [Errno 30] ...: 'PATH'
    assert bad_input(OSError(30, "Read-only file system", "/ro/shards")) == 2
    assert capsys.readouterr().err == "error: /ro/shards: Read-only file system\n"


def test_metric_flag_only_where_asked():
    with pytest.raises(SystemExit):
        _parse(["--task", "sst2", "--metric", "f1"])


@dataclass
class _JobRun:
    output_dir: str = "runs/job"


@dataclass
class _JobConfig:
    steps: int = 1
    run: _JobRun = field(default_factory=_JobRun)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def test_config_job_runs_finishes_stops_and_reports_bad_input(tmp_path, capsys, monkeypatch):
    import os
    from types import SimpleNamespace

    from dist_kd import distributed
    from dist_kd.cli import config_job_parser, run_config_job

    Config = _JobConfig

    events = []

    class Trainer:
        def __init__(self, cfg, info):
            self.cfg = cfg
            assert (tmp_path / "run" / ".dist_kd.lock").is_file()  # the run directory is this job's

        def train(self):
            events.append(("train", self.cfg.steps))
            return self.cfg.steps < 100  # 100 steps stand for a preempted run

        def close(self):
            events.append(("close",))

    def finish(trainer, cfg, info):
        events.append(("finish", info.rank))

    def init_distributed():  # no process group here: record what the launcher variables were
        events.append(("init", os.environ.get("RANK")))
        return SimpleNamespace(rank=0, world_size=1, is_main=True)

    monkeypatch.setattr(distributed, "init_distributed", init_distributed)
    monkeypatch.setattr(distributed, "teardown", lambda in_step=True: events.append(("teardown",)))
    config = tmp_path / "run.yaml"
    config.write_text(f"steps: 3\nrun: {{output_dir: {tmp_path / 'run'}}}\n")
    parser = config_job_parser("job", config_help="YAML", debug_help="one process")

    monkeypatch.setenv("RANK", "3")
    assert run_config_job(parser.parse_args(["--config", str(config)]), Config, Trainer, finish) == 0
    assert events == [("init", "3"), ("train", 3), ("finish", 0), ("close",), ("teardown",)]

    events.clear()
    args = parser.parse_args(["--config", str(config), "--debug", "steps=7"])
    assert run_config_job(args, Config, Trainer, finish, ["steps=5"]) == 0
    # --debug: launcher variables dropped; its overrides come before the user's, which win.
    assert events == [("init", None), ("train", 7), ("finish", 0), ("close",), ("teardown",)]

    events.clear()
    assert run_config_job(parser.parse_args(["--config", str(config), "steps=100"]), Config, Trainer, finish) == 0
    assert events == [("init", None), ("train", 100), ("close",), ("teardown",)]  # preempted: no finish

    events.clear()
    assert run_config_job(parser.parse_args(["--config", str(config), "steps=0"]), Config, Trainer, finish) == 2
    # one process: said at once, before a process group starts (under a launcher, once for every rank)
    assert events == [("teardown",)] and capsys.readouterr().err == "error: steps must be >= 1, got 0\n"

    # another live run holds the run directory: one line, exit 2, before the trainer exists
    import json

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".dist_kd.lock").write_text(json.dumps({"host": "elsewhere", "pid": 9, "token": "t"}))
    events.clear()
    assert run_config_job(parser.parse_args(["--config", str(config)]), Config, Trainer, finish) == 2
    err = capsys.readouterr().err
    assert events == [("init", None), ("teardown",)] and err.count("\n") == 1
    assert err.startswith(f"error: run.output_dir {tmp_path / 'run'} is in use by another run (host elsewhere, pid 9")


def test_print_config_prints_the_resolved_yaml_and_starts_nothing(tmp_path, capsys, monkeypatch):
    import yaml

    from dist_kd import distributed
    from dist_kd.cli import config_job_parser, run_config_job

    monkeypatch.setattr(distributed, "init_distributed", lambda: pytest.fail("no process group for --print-config"))
    config = tmp_path / "run.yaml"
    config.write_text("steps: 3\n")
    parser = config_job_parser("job", config_help="YAML", debug_help="one process", config_class=_JobConfig)
    args = parser.parse_args(["--config", str(config), "--print-config", "steps=9"])
    assert run_config_job(args, _JobConfig, None, None) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"steps": 9, "run": {"output_dir": "runs/job"}}
    args = parser.parse_args(["--config", str(config), "--print-config", "steps=0"])
    assert run_config_job(args, _JobConfig, None, None) == 2
    assert capsys.readouterr().err == "error: steps must be >= 1, got 0\n"
    assert "steps (int, default 1)" in parser.format_help() and "run.output_dir (str, default runs/job)" in (
        parser.format_help()
    )


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bar_in_a_log_file_writes_whole_lines_without_carriage_returns(monkeypatch):
    """A SLURM log is not a terminal: the bar's redraws are separate lines, a minute apart at most, instead of
    carriage-return redraws piling up on one line for the whole run; on a terminal it redraws in place."""
    from dist_kd.train.common import progress_bar

    for tty in (False, True):
        stream = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        bar = progress_bar(200, 0, "general distillation", True)
        if not tty:  # tqdm's monitor thread redraws a bar idle for maxinterval (10 s): lines at 0:00, 1:00, 1:20
            assert bar.maxinterval >= bar.mininterval >= 60, (bar.mininterval, bar.maxinterval)
        for step in range(200):
            if step % 2 == 0:
                bar.set_postfix(loss=f"{1 / (step + 1):.4f}", refresh=False)
            bar.update(1)
        bar.close()
        text = stream.getvalue()
        if tty:
            assert "\r" in text
            continue
        lines = text.splitlines()
        assert "\r" not in text and text.endswith("\n"), text[:300]
        assert lines[0].startswith("general distillation:   0%") and "200/200" in lines[-1], lines
        assert len(lines) < 10 and len(set(lines)) == len(lines), lines  # 200 updates, not 200 redraws


def test_a_full_disk_outside_a_checkpoint_save_is_one_error_line(tmp_path, capsys, monkeypatch):
    """A full device while a run writes config.yaml or its export (safetensors says so in its own error type)
    was a traceback; it is one line naming the run directory, exit 2. Other errors are not disguised as it."""
    import errno
    from types import SimpleNamespace

    from dist_kd import distributed
    from dist_kd.cli import config_job_parser, run_config_job

    class SafetensorError(Exception):
        pass

    failures = {
        "init": OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "config.yaml")),
        "finish": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    }

    state = {"where": ""}

    class Trainer:
        def __init__(self, cfg, info):
            if state["where"] == "init":
                raise failures["init"]

        def train(self):
            return True

        def close(self):
            pass

    def finish(trainer, cfg, info):
        raise failures["finish"] if state["where"] == "finish" else RuntimeError("a bug, not a full disk")

    monkeypatch.setattr(distributed, "init_distributed", lambda: SimpleNamespace(rank=0, world_size=1, is_main=True))
    monkeypatch.setattr(distributed, "teardown", lambda in_step=True: None)
    config = tmp_path / "run.yaml"
    config.write_text(f"run: {{output_dir: {tmp_path / 'run'}}}\n")
    args = config_job_parser("job", config_help="YAML", debug_help="one process").parse_args(["--config", str(config)])
    for state["where"] in ("init", "finish"):
        assert run_config_job(args, _JobConfig, Trainer, finish) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: writing under run.output_dir {tmp_path / 'run'} failed: No space left on device")
        assert err.count("\n") == 1, err
    state["where"] = "elsewhere"
    with pytest.raises(RuntimeError, match="a bug"):
        run_config_job(args, _JobConfig, Trainer, finish)


def test_transformers_bars_only_on_rank_0_at_a_terminal(monkeypatch):
    """Every rank drew transformers' 'Loading weights' bar for each model, as carriage-return lines in a log."""
    from transformers.utils import logging as hf_logging

    from dist_kd.cli import configure_logging

    verbosity = hf_logging.get_verbosity()
    try:
        for rank, tty, shown in ((0, True, True), (0, False, False), (1, True, False)):
            hf_logging.enable_progress_bar()
            monkeypatch.setattr(sys, "stderr", _Stream(tty))
            configure_logging(rank)
            assert hf_logging.is_progress_bar_enabled() is shown, (rank, tty)
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


BAR_AND_LOG = """
import logging
from dist_kd.cli import configure_logging, progress
configure_logging(0)
bar = progress(total=10, desc="general distillation")
bar.update(3)
bar.refresh()
logging.getLogger("dist_kd.train.general").info("step 3 held-out quality")
bar.update(7)
bar.close()
"""


def test_a_log_line_at_a_terminal_is_written_above_the_progress_bar_not_onto_it():
    """At a terminal the bar's line has no newline; a log line written plainly was glued to its end
    ("... 3/10 [00:00<00:00, 3.2it/s]2026-12-05 ... step 3 held-out quality")."""
    import fcntl
    import pty
    import select
    import struct
    import subprocess
    import termios
    import time
    from pathlib import Path

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    env = {name: value for name, value in os.environ.items() if not name.startswith("TQDM_")}  # TQDM_DISABLE, ...
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", BAR_AND_LOG], stderr=follower, stdout=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if proc.poll() is None and time.monotonic() >= deadline:  # a hung child: the test fails, not hangs
            proc.kill()
    assert proc.wait(timeout=30) == 0
    before, after = b"".join(chunks).decode().split("step 3 held-out quality")
    drawn, line_start = before.rsplit("\r", 1)
    assert re.fullmatch(r"[\d-]+ [\d:,]+ \[rank 0\] INFO dist_kd\.train\.general: ", line_start), repr(before)
    assert re.search(r"\r {100,}$", drawn), repr(drawn[-200:])  # the bar was cleared from the line first
    assert "3/10" in drawn and "10/10" in after  # drawn before the line, and again below it


LOGGING_RANK = """
import logging, os, signal, sys, warnings
import torch
from dist_kd.cli import configure_logging
configure_logging(int(sys.argv[1]), level=sys.argv[2] if len(sys.argv) > 2 else None)
from dist_kd.models.teacher import resolve_dtype
from dist_kd.train.common import StopSignal
resolve_dtype("fp16", torch.device("cpu"))  # set-up: the same on every rank (an INFO line)
logging.getLogger("dist_kd.data.stream").warning("the shards hold fewer sequences than one epoch")
warnings.warn("a library's FutureWarning", FutureWarning)  # as torch's, where every rank calls it
stop = StopSignal()
os.kill(os.getpid(), signal.SIGUSR1)  # this rank's own signal
stop.restore()
logging.getLogger("dist_kd.train.general").error("this rank failed")
logging.getLogger("dist_kd.train.general").debug("a debug line")
logging.getLogger("matplotlib.font_manager").debug("a font lookup")  # 2,000 of them at the root's debug level
logging.getLogger("some_library").warning("a library's own warning")
from transformers.utils import logging as hf_logging
hf_logging.get_logger("transformers.modeling_utils").warning("BertModel LOAD REPORT")
"""


def _rank_log(rank: int, *level: str, **env: str) -> str:
    import subprocess
    from pathlib import Path

    env = {name: value for name, value in os.environ.items() if name != "DIST_KD_LOG_LEVEL"} | env
    env |= {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "TRANSFORMERS_VERBOSITY": "warning"}
    return subprocess.run(
        [sys.executable, "-W", "default", "-c", LOGGING_RANK, str(rank), *level],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stderr


def test_a_warning_the_same_on_every_rank_shows_once_a_ranks_own_and_errors_from_each():
    """Set-up warnings printed once per rank: 64 copies on 64 ranks. Python's warnings (a FutureWarning of
    torch's) and transformers' went around the log's format (no date or rank) and onto the progress bar's line."""
    logs = {rank: _rank_log(rank) for rank in (0, 1)}
    for rank, log in logs.items():
        assert f"[rank {rank}] WARNING dist_kd.train.common: received SIGUSR1" in log, log
        assert f"[rank {rank}] ERROR dist_kd.train.general: this rank failed" in log, log
        assert f"[rank {rank}] WARNING some_library: a library's own warning" in log, log
    rank0 = logs[0]
    assert "[rank 0] INFO dist_kd.models.teacher: fp16 teachers run in fp32 on a CPU" in rank0, rank0
    assert "[rank 0] WARNING dist_kd.data.stream: the shards hold fewer sequences" in rank0, rank0
    assert re.search(r"\[rank 0\] WARNING py\.warnings: .*FutureWarning: a library's FutureWarning", rank0), rank0
    # transformers' warnings (a load report per model: 8 lines, on every rank) come from rank 0 alone
    assert "[rank 0] WARNING transformers.modeling_utils: BertModel LOAD REPORT" in rank0, rank0
    # every line in the log's format (a warning's source line indented below it), none blank
    assert not any(not re.match(r"[\d-]+ [\d:,]+ \[rank 0\] ", line) for line in rank0.splitlines()
                   if not line.startswith("  ")), rank0  # fmt: skip
    for said_by_rank_0 in ("fp16 teachers", "fewer sequences", "FutureWarning", "BertModel LOAD REPORT"):
        assert said_by_rank_0 not in logs[1], logs[1]


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_log_level_sets_rank_0s_level_and_error_silences_the_warnings_of_every_rank(how):
    """--log-level (or $DIST_KD_LOG_LEVEL): warning drops rank 0's INFO lines; error every warning, library
    and Python ones included, and keeps the errors."""

    def log(rank, level):
        return _rank_log(rank, level) if how == "flag" else _rank_log(rank, DIST_KD_LOG_LEVEL=level.upper())

    quiet = log(0, "warning")
    assert "fp16 teachers" not in quiet and "fewer sequences" in quiet and "FutureWarning" in quiet, quiet
    for rank in (0, 1):
        errors_only = log(rank, "error")
        assert f"[rank {rank}] ERROR dist_kd.train.general: this rank failed" in errors_only, errors_only
        for warned in ("SIGUSR1", "fewer sequences", "FutureWarning", "a library's own warning", "LOAD REPORT"):
            assert warned not in errors_only, errors_only
    debug = log(0, "debug")
    assert "DEBUG dist_kd.train.general: a debug line" in debug and "debug line" not in log(1, "debug")
    assert "a font lookup" not in debug, debug


def test_log_level_of_a_name_a_logging_level_debug_or_the_variable(monkeypatch):
    import logging

    from dist_kd.cli import log_level

    monkeypatch.setenv("DIST_KD_LOG_LEVEL", "error")
    assert log_level(None) == logging.ERROR and log_level("Warning") == logging.WARNING
    assert log_level(logging.WARNING) == logging.WARNING  # as a library user passes it
    assert log_level(None, debug=True) == logging.DEBUG  # a command's --debug over the environment
    monkeypatch.setenv("DIST_KD_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="'loud' .*expected one of debug, info, warning, error"):
        log_level(None)
    monkeypatch.delenv("DIST_KD_LOG_LEVEL")
    assert log_level(None) == logging.INFO


def test_log_level_flag_and_variable_are_checked_when_parsed(monkeypatch, capsys):
    from dist_kd.cli import add_log_level_argument

    def parse(argv):
        parser = argparse.ArgumentParser(prog="dist-kd general")
        add_log_level_argument(parser)
        return parser.parse_args(argv).log_level

    monkeypatch.delenv("DIST_KD_LOG_LEVEL", raising=False)
    assert parse([]) is None and parse(["--log-level", "WARNING"]) == "warning"
    monkeypatch.setenv("DIST_KD_LOG_LEVEL", "Error")
    assert parse([]) == "error" and parse(["--log-level", "info"]) == "info"  # the flag wins
    monkeypatch.setenv("DIST_KD_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as stopped:
        parse([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "'loud' (--log-level or $DIST_KD_LOG_LEVEL): expected one of debug, info, warning, error" in err, err


def test_bad_input_from_another_rank_names_it(capsys):
    assert bad_input(ValueError("data.shards is not set"), rank=3) == 2
    assert capsys.readouterr().err == "error: [rank 3] data.shards is not set\n"
    bad_input(ValueError("data.shards is not set"))
    assert capsys.readouterr().err == "error: data.shards is not set\n"


def test_run_log_holds_lines_until_the_run_starts_then_appends_them_and_the_error_that_stops_it(tmp_path, capsys):
    """train.log: a run refused at set-up leaves no trace in its directory; a started run's lines (the held ones
    first), and the error that stopped it, are appended after an earlier run's."""
    import logging

    from dist_kd.cli import attach_run_log, detach_run_log, note_run_failure

    log = logging.getLogger("dist_kd.train.general")
    log.setLevel(logging.INFO)
    try:
        refused = attach_run_log(tmp_path, 0)
        log.info("set-up line of a refused run")
        note_run_failure(refused, ValueError("cannot resume"), expected=(ValueError,))
        detach_run_log(refused)
        assert list(tmp_path.iterdir()) == []  # nothing written, not even an empty file

        (tmp_path / "train.log").write_text("an earlier run's line\n")
        run = attach_run_log(tmp_path, 3)
        where = [str(tmp_path)]
        log.info("new run in %s", where)
        where[0] = "changed after the line was logged"  # held lines keep what they said when logged
        run.start()
        log.warning("a step's warning")
        try:
            raise RuntimeError("a bug")
        except RuntimeError as err:
            note_run_failure(run, err, expected=(ValueError,))
        detach_run_log(run)
        log.info("after the run: not in its log")
    finally:
        log.setLevel(logging.NOTSET)
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[0] == "an earlier run's line"
    started = rf"[\d-]+ [\d:,]+ \[rank 3\] INFO dist_kd\.train\.general: new run in {re.escape(str([str(tmp_path)]))}"
    assert re.fullmatch(started, lines[1]), lines
    assert lines[2].endswith("[rank 3] WARNING dist_kd.train.general: a step's warning")
    assert (
        lines[3].endswith("ERROR dist_kd.run: run stopped: RuntimeError: a bug")
        and lines[4] == "Traceback (most recent call last):"
    )
    assert lines[-1] == "RuntimeError: a bug"
    assert "refused" not in "\n".join(lines) and "after the run" not in "\n".join(lines)


def test_run_log_that_cannot_be_written_says_so_once_and_the_run_goes_on(tmp_path, capsys):
    import logging

    from dist_kd.cli import attach_run_log, detach_run_log

    (tmp_path / "train.log").mkdir()  # the file cannot be opened (as a full or read-only disk refuses it)
    log = logging.getLogger("dist_kd.train.general")
    log.setLevel(logging.INFO)
    run = attach_run_log(tmp_path, 0)
    try:
        run.start()
        for step in range(3):
            log.info("step %d", step)
    finally:
        detach_run_log(run)
        log.setLevel(logging.NOTSET)
    err = capsys.readouterr().err
    assert err.count("train.log is no longer written (") == 1 and "Traceback" not in err, err


def test_a_run_log_whose_last_lines_cannot_be_flushed_is_closed_quietly(tmp_path, monkeypatch):
    """A disk full at the end: closing train.log raised ENOSPC in the run's `finally` and a traceback replaced the
    one-line error that stopped the run."""
    import errno
    import logging

    from dist_kd.cli import attach_run_log, detach_run_log

    run = attach_run_log(tmp_path, 0)
    run.start()
    run.emit(logging.makeLogRecord({"msg": "a line", "levelno": logging.WARNING, "levelname": "WARNING"}))
    assert run.stream is not None  # the file is open

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run, "flush", full)
    detach_run_log(run)  # raised
    assert run not in logging.getLogger().handlers


UNCONFIGURED = """
import logging, sys
from dist_kd.cli import attach_run_log, detach_run_log
log = logging.getLogger("dist_kd.train.general")
run = attach_run_log(sys.argv[1], 0)
run.start()
log.info("new run in RUN")
log.warning("the student looks collapsed")
detach_run_log(run)
assert not logging.getLogger().handlers and logging.getLogger("dist_kd").level == logging.NOTSET
log.warning("after the run")
"""


def test_a_run_in_a_process_without_logging_set_up_keeps_its_warnings_on_the_terminal(tmp_path):
    """dist_kd.api in a script: train.log's handler on the root logger switched off Python's last-resort
    printing, so warnings went to the file alone; and the file got no INFO line."""
    import subprocess
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", UNCONFIGURED, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\[rank 0\] WARNING dist_kd.train.general: the student looks collapsed", proc.stderr)
    assert "new run in" not in proc.stderr and proc.stderr.rstrip().endswith("after the run"), proc.stderr
    log = (tmp_path / "train.log").read_text()
    assert "INFO dist_kd.train.general: new run in RUN" in log and "looks collapsed" in log
    assert "after the run" not in log


def test_bad_input_at_the_debug_level_shows_where_it_was_raised(capsys, monkeypatch):
    import subprocess
    from pathlib import Path

    from dist_kd import cli

    def refuse():
        raise ValueError("data.shards is not set")

    for traced in (False, True):
        monkeypatch.setattr(cli, "_traceback_errors", traced)
        try:
            refuse()
        except ValueError as err:
            assert bad_input(err) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: data.shards is not set\n")
        assert ("Traceback (most recent call last):" in err and "in refuse" in err) is traced, err
    # --log-level debug (or the variable) asks for it; a command's --debug (one process) does not
    script = ("from dist_kd import cli; cli.configure_logging(0, debug=True); print(cli._traceback_errors); "
              "cli.configure_logging(0, level='debug'); print(cli._traceback_errors)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.split() == ["False", "True"], out


def test_a_second_ctrl_c_says_what_a_rerun_resumes_from(tmp_path):
    """It said "stopped without a checkpoint" also when it landed after the first one's checkpoint was saved."""
    from types import SimpleNamespace

    from dist_kd.cli import _resumes_from
    from dist_kd.train import checkpoint as ckpt

    def run(path):
        return SimpleNamespace(run=SimpleNamespace(output_dir=str(path)))

    assert _resumes_from(None).startswith("a rerun resumes from the newest whole checkpoint")
    assert _resumes_from(run(tmp_path)) == f"no checkpoint in {tmp_path}; a rerun starts from step 0"
    saved = tmp_path / "checkpoints" / ckpt.step_dir_name(15)
    saved.mkdir(parents=True)
    (saved / "rank00000.pt").write_bytes(b"x")
    (saved / "meta.json").write_text('{"world_size": 1}')
    assert _resumes_from(run(tmp_path)) == f"a rerun resumes from {saved}"


def test_a_lost_rank_is_one_line_in_train_log_not_a_gloo_traceback(tmp_path):
    """Another rank failed (a corrupt shard only it read): rank 0's train.log held gloo's "Connection closed by
    peer" and ~60 lines of its traceback, not a word of what happened."""
    from dist_kd.cli import attach_run_log, detach_run_log, note_run_failure

    run = attach_run_log(tmp_path, 0)
    run.start()
    try:
        try:
            raise RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234")
        except RuntimeError as cause:
            raise RuntimeError("all_reduce failed") from cause
    except RuntimeError as err:
        note_run_failure(run, err, expected=(ValueError,))
    detach_run_log(run)
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 1 and "run stopped: lost contact with another rank (it exited or was killed;" in lines[0]
    assert lines[0].endswith("Connection closed by peer [127.0.0.1]:1234"), lines


@pytest.mark.parametrize("python", ["3.10", "3.11+"])
def test_a_captured_warning_is_one_log_line_as_either_python_logs_it(python):
    """logging.captureWarnings logs warnings.formatwarning's text, which ends in a newline: Python 3.11+ as the
    record's message, 3.10 as the argument of "%s", where the filter missed it and a blank line followed every
    warning on 3.10."""
    import logging
    import warnings

    from dist_kd.cli import _one_line_end

    text = warnings.formatwarning("a library's FutureWarning", FutureWarning, "lib.py", 10, "x = 1")
    assert text.endswith("\n")
    msg, args = ("%s", (text,)) if python == "3.10" else (text, ())
    record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1, msg, args, None)
    assert _one_line_end(record)
    line = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == "WARNING py.warnings: " + text.rstrip("\n"), line


@pytest.mark.parametrize("script", ["general", "task"])
def test_overrides_after_a_flag_are_taken_with_the_others(script):
    """`--config C a=1 --print-config b=2` was "unrecognized arguments: b=2": argparse's positional list took only
    the first block."""
    import importlib
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    try:
        module = importlib.import_module(f"launch.{script}")
    finally:
        sys.path.pop(0)
    args = module.parse_args(["--config", "c.yaml", "train.max_steps=3", "--print-config", "train.lr=1e-3", "--debug",
                              "run.output_dir=x"])  # fmt: skip
    assert args.overrides == ["train.max_steps=3", "train.lr=1e-3", "run.output_dir=x"]
    assert args.print_config and args.debug and args.config == "c.yaml"
