"""Pieces every training entry point shares: the ``run`` config section, preemption signals, progress bar,
and the window of loss terms between log lines."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_kd import distributed
from dist_kd.config import doc
from dist_kd.io import within

logger = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class RunConfig:
    """The run directory, logging and checkpoints."""

    output_dir: str = doc(
        "run directory (config.yaml, metrics.jsonl, checkpoints/, student/)", "runs/general", path=True
    )
    log_every: int = doc("optimizer steps between metric lines", 10)
    save_every: int = doc("optimizer steps between checkpoints (0: only at the end)", 500)
    keep_last: int = doc(
        "complete checkpoints kept (0 keeps all); the disk must hold one more while a new one is saved", 3
    )
    resume: str = doc("auto (continue from the newest checkpoint if any) | never (refuse a used directory)", "auto")
    report_to: list[str] = doc(
        "trackers that also receive every metric line and the dev metrics: tensorboard (run_dir/tensorboard), "
        "wandb, mlflow (each an optional install: pip install 'dist_kd[wandb]')",
        default_factory=list,
    )
    tensorboard: bool = doc("shorthand for adding tensorboard to run.report_to", False)
    progress: bool = doc("tqdm progress bar on rank 0", True)

    def __post_init__(self):
        if not str(self.output_dir).strip():  # "" wrote the whole run (checkpoints/, student/ ...) into the cwd
            raise ValueError("run.output_dir must name a directory, got an empty path")
        if self.resume not in RESUME_MODES:
            raise ValueError(f"run.resume must be one of {list(RESUME_MODES)}, got {self.resume!r}")
        if self.log_every < 1:
            raise ValueError(f"run.log_every must be >= 1, got {self.log_every}")
        if self.save_every < 0 or self.keep_last < 0:
            raise ValueError("run.save_every and run.keep_last must be >= 0")
        for name in self.report_to:
            if name not in TRACKERS:
                raise ValueError(f"run.report_to: unknown tracker {name!r}; one of {list(TRACKERS)}")
        for name in self.trackers():
            # Checked with the config, before the run directory is touched, not at the first log line.
            if importlib.util.find_spec(name) is None:
                raise ValueError(
                    f"run.report_to includes {name} but the {name} package is not installed: "
                    f"pip install 'dist_kd[{name}]' (or {name}), or leave it out of run.report_to"
                    + (" and set run.tensorboard=false" if name == "tensorboard" and self.tensorboard else "")
                )

    def trackers(self) -> list[str]:
        """run.report_to, with tensorboard added by run.tensorboard, each once."""
        return list(dict.fromkeys([*self.report_to, *(["tensorboard"] if self.tensorboard else [])]))


# The kinds of run, in words, and what a config of each says when given to another command.
RUN_KINDS = {
    "finetune": "a fine-tuned ensemble (dist-kd finetune)",
    "task": "a task distillation run (dist-kd task)",
    "general": "a general distillation run (dist-kd general)",
}
OTHER_KIND = {
    "finetune": "is a fine-tuning directory's record of dist-kd finetune's settings, not a config to run",
    "task": "is a task distillation config (it lists tasks): run it with dist-kd task (launch/task.py)",
    "general": "is a general distillation config (a corpus, no tasks): run it with dist-kd general",
}


def config_kind(data: dict[str, Any]) -> str | None:
    """Which command a config mapping (a YAML file, a run's config.yaml) is for, from its top-level keys:
    ``finetune`` (the record dist-kd finetune writes), ``tasks`` (task), a corpus ``data.shards`` (general)."""
    if "finetune" in data:
        return "finetune"
    if "tasks" in data:
        return "task"
    corpus = data.get("data")
    return "general" if isinstance(corpus, dict) and "shards" in corpus else None


def other_kind(data: dict[str, Any], kind: str) -> str | None:
    """Why a config mapping given to command ``kind`` is another command's, or None (``other_kind`` of the
    config classes, which :func:`dist_kd.config.load_config` asks)."""
    found = config_kind(data)
    return OTHER_KIND[found] if found not in (None, kind) else None


def run_kind(run_dir: str | Path) -> str | None:
    """The kind of run whose ``config.yaml`` is in ``run_dir`` (a key of ``RUN_KINDS``); None without one, or
    for a config.yaml that is not a dist_kd run's."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config_kind(loaded) if isinstance(loaded, dict) else None


def check_run_kind(run_dir: str | Path, kind: str, flag: str = "run.output_dir") -> None:
    """Refuse a run directory that holds another kind of run: a general run in a fine-tuning directory replaced
    its config.yaml and emptied its metrics.jsonl (and the other way round), and exited 0.

    Raises:
        ValueError: naming the directory, what it holds, and what to do.
    """
    found = run_kind(run_dir)
    if found is not None and found != kind:
        raise ValueError(
            f"{flag} {run_dir} holds {RUN_KINDS[found]}, and {RUN_KINDS[kind]} would overwrite its "
            "config.yaml and metrics.jsonl: give a directory of its own"
        )
    if found is None and _users_yaml(Path(run_dir) / "config.yaml"):
        raise ValueError(
            f"{flag} {run_dir} holds a config.yaml that is no dist_kd run's, which {RUN_KINDS[kind]} would "
            "overwrite (and its metrics.jsonl): give a directory of its own"
        )


def _users_yaml(path: Path) -> bool:
    """Whether ``path`` is a YAML file of someone else's: it parses (one that does not, damaged, is left to the
    run's own checks) and is no dist_kd run's config."""
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return not (isinstance(loaded, dict) and config_kind(loaded) is not None)


# What a training run replaces whole in its run directory (atomic_dir): a model given as an input there is lost.
REPLACED_OUTPUTS = ("student", "best", "tasks")


def check_inputs_outside_outputs(run_dir: str | Path, inputs: dict[str, str | None]) -> None:
    """Refuse a model input that lies where the run writes its exports: ``student.path=RUN/student`` with
    ``run.output_dir=RUN`` was replaced by the run's own student, the starting weights lost, with exit 0.

    Args:
        inputs: config key -> path (None or empty: not given).

    Raises:
        ValueError: naming the key, the path and the run directory.
    """
    outputs = [Path(run_dir) / name for name in REPLACED_OUTPUTS]
    for key, given in inputs.items():
        if not given:
            continue
        hit = next((out for out in outputs if within(given, out)), None)
        if hit is not None:
            raise ValueError(
                f"{key} {given} lies in {hit}, which this run replaces with its own export: give run.output_dir "
                "another directory (or copy the model out of it first)"
            )


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption) and Ctrl-C (SIGINT) set a flag; the loop checkpoints and exits at
    the next step. A second Ctrl-C aborts at once (KeyboardInterrupt), losing the steps since the last
    checkpoint.

    A StopSignal made while a :class:`RunSignals` is installed (the training loop inside a run) starts with the
    preemption that reached the run's set-up already requested.
    """

    def __init__(self):
        self.requested = bool(RunSignals.current and RunSignals.current.requested)
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt("second Ctrl-C: stopping without a checkpoint")
        hint = " (Ctrl-C again to abort without one)" if signum == signal.SIGINT else ""
        logger.warning(  # a signal reaches a process: the rank that got it says so
            "received %s: saving a checkpoint and stopping after this step%s", signal.Signals(signum).name, hint,
            extra=distributed.RANK_SPECIFIC,
        )  # fmt: skip
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class RunSignals:
    """SIGTERM / SIGUSR1 around a whole run, outside its training loop (where :class:`StopSignal` takes over).

    Their default action kills the process: a preemption while the run sets up (loading the teacher, checking
    shards) or finishes (the final evaluation, the export) ended it with 143 or 138, which the SLURM script
    reads as a failure and does not requeue. Here a signal during set-up is remembered, and the loop stops
    with a checkpoint at its first step; one after the loop (the final checkpoint is saved) is logged and the
    run finishes. Ctrl-C keeps its default: it stops a run that has not started training at once.
    """

    current: RunSignals | None = None

    def __init__(self):
        # one inside another (the command line's around its start-up: the process group's wait for the other
        # nodes): a signal the outer one got carries over
        self.requested = bool(RunSignals.current and RunSignals.current.requested)
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        self.outer, RunSignals.current = RunSignals.current, self
        from dist_kd.cli import early_stop_signal

        early = early_stop_signal()  # received while the command line started (catch_stop_signals)
        if early is not None:  # read after this one's handlers are in: a signal between the two is caught here
            self._handle(early, None)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.requested:
            logger.warning("received %s outside the training loop: the run checkpoints and stops at its first step "
                           "or, past its last step, finishes", name, extra=distributed.RANK_SPECIFIC)  # fmt: skip
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        RunSignals.current = self.outer

    def __enter__(self) -> RunSignals:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def stop_agreed(local: bool) -> bool:
    """True on every rank when any rank was asked to stop.

    Every rank must leave the loop at the same step, or the collective checkpoint save would hang. The
    agreement is a host-side all-reduce (:func:`distributed.any_rank`): no host-device sync at every step.
    """
    return distributed.any_rank(local)


def check_run_lock() -> None:
    """Raise :class:`~dist_kd.train.runlock.RunDirInUse` on every rank when rank 0's run lock was taken over by
    another run (this one stalled past the lock's staleness: a suspended job, a hung filesystem); collective.
    The other run owns the directory now: this one writes nothing more there."""
    from dist_kd.train.runlock import LOCK_FILE_REMOVED, REMOVED, RunDirInUse, RunDirRemoved, lost_lock

    lock = lost_lock()
    if not distributed.any_rank(lock is not None):
        return
    # Every rank raises, each from rank 0's state (the lock is rank 0's): said once, by rank 0.
    if distributed.any_rank(lock is not None and lock.lost == REMOVED):
        # Saves and exports would make the directory again (mkdir) and go on there, without its config.yaml,
        # train.log and earlier checkpoints (or those went wherever it was moved).
        remade = lock is not None and lock.run_dir.exists()
        remade = "; what it wrote since is in a directory made again at that path" if remade else ""
        raise distributed.said_by(RunDirRemoved(
            f"this run stopped writing: {lock.run_dir if lock else 'its run directory'} was removed or moved away "
            f"while the run wrote it (its run lock went with it){remade}. Put the directory back and run the same "
            "command again to resume (from its last checkpoint, if it saved one)"
        ), 0)  # fmt: skip
    if distributed.any_rank(lock is not None and lock.lost == LOCK_FILE_REMOVED):
        raise distributed.said_by(RunDirRemoved(
            f"this run stopped writing: its run lock {lock.path if lock else ''} was removed while the run held it "
            "(by hand, or a clean-up job), so nothing keeps a second run out of the directory; run the same "
            "command again to resume (from its last checkpoint, if it saved one)"
        ), 0)  # fmt: skip
    where = f"its run lock {lock.path} is now held by another run ({lock.lost})" if lock else "its run lock was taken"
    raise distributed.said_by(RunDirInUse(
        f"this run stopped writing: {where}, taken over while this run stalled for longer than the lock's "
        "staleness (a suspended job or node, a hung filesystem). That run owns the directory now; nothing more of "
        "this one was saved"
    ), 0)  # fmt: skip


class Diverged(ValueError):
    """The student's weights are no longer finite: the run stops without saving them (said as one ``error:``
    line, exit code 2; the checkpoints saved before stay as they are)."""


def weights_finite(module: torch.nn.Module) -> bool:
    """True on every rank when every parameter of ``module`` is finite (under ZeRO-3, this rank's partition of
    it). Collective; one host-device sync per device the weights lie on, so it runs where the loop syncs anyway
    (a log line with a non-finite loss, an evaluation, a save)."""
    finite: dict[torch.device, list[torch.Tensor]] = {}
    for parameter in module.parameters():
        tensor = getattr(parameter, "ds_tensor", parameter)  # ZeRO-3 offloaded to the CPU: apart from the GPU's
        finite.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    local = all(bool(torch.stack(flags).all()) for flags in finite.values())
    return not distributed.any_rank(not local)


class DivergenceGuard:
    """Stops a run whose student diverged before anything of it is saved, exported or evaluated.

    A step on a loss of nan or inf (a learning rate too high, an overflow) makes every weight nan under fp32
    and bf16; the run went on, its checkpoints (which replaced the good ones past ``run.keep_last``), its
    export and its held-out figures all nan, and it exited 0. Now a log line whose loss is not finite checks
    the weights: no longer finite, the run stops (:class:`Diverged`); still finite (fp16's loss scaling
    skipped the step), a warning. Each save and evaluation checks the weights first, so a checkpoint or an
    export is never of diverged weights.
    """

    def __init__(self, module: torch.nn.Module, run_dir: Path, train_cfg: Any):
        self.module, self.run_dir, self.train_cfg = module, Path(run_dir), train_cfg

    def after_log(self, record: dict[str, Any]) -> None:
        check_run_lock()  # collective, as the log line: a run whose directory another run took over stops here
        loss = record.get("loss")
        if loss is None or math.isfinite(loss):
            return
        if weights_finite(self.module):
            logger.warning("the loss was %s in the steps up to %d, but the weights are finite (steps skipped, as "
                           "fp16's loss scaling does on an overflow)", loss, record["step"])  # fmt: skip
            return
        raise self._diverged(record["step"], f"its loss was {loss} in the steps up to step {record['step']}")

    def before(self, what: str, step: int) -> None:
        """Before a save or an evaluation (``what``) at ``step`` (collective)."""
        check_run_lock()
        if not weights_finite(self.module):
            raise self._diverged(step, f"found before {what}")

    def _diverged(self, step: int, how: str) -> Diverged:
        from dist_kd.train.checkpoint import latest_checkpoint

        last = latest_checkpoint(self.run_dir / "checkpoints")
        kept = f"{last} is its last checkpoint" if last is not None else "it saved no checkpoint"
        cfg = self.train_cfg
        return Diverged(
            f"the student diverged by step {step}: its weights are no longer finite (nan or inf; {how}). Nothing "
            f"of it was saved; {kept}. Start again in a new run.output_dir with a lower train.lr (this run: "
            f"{cfg.lr:g}), train.clip on (this run: {cfg.clip:g}) or train.precision=fp32 (this run: "
            f"{cfg.precision}), or teacher.dtype=bf16 where an fp16 teacher overflows; a resume with the same "
            "settings diverges the same way"
        )


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar over optimizer steps (shown on rank 0 only; one line a minute in a log file)."""
    from dist_kd.cli import progress

    return progress(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


@dataclass
class WindowStats:
    """One log line's worth of a :class:`LossWindow`, over every rank.

    Attributes:
        values: term -> mean over the window's micro-batches and the ranks (terms nobody produced are absent).
        batches: term -> micro-batches per rank that produced it (``task/<name>``: batches of that task).
        tokens: real tokens of all ranks.
        rows: rows of all ranks.
        seconds: wall time since the window opened.
    """

    values: dict[str, float]
    batches: dict[str, int]
    tokens: int
    rows: int
    seconds: float


def window_batches(state: dict[str, Any]) -> list[float]:
    """The micro-batch counts of a saved :class:`LossWindow` (its ``state_dict``); a checkpoint of an earlier
    release has none: its rank's own counts, the second block of its totals, are them."""
    names = len(state["names"])
    return state.get("batches") or state["totals"][names : 2 * names]


class LossWindow:
    """Loss terms, real tokens and rows of this rank, summed on the device between log lines.

    One collective per log line: the sums are reduced together with their counts, over a fixed list of
    names, so the reduction has the same shape on every rank whatever terms a rank's batches produced, and
    every mean is a global sum over a global count. The open window is part of a checkpoint
    (:meth:`state_dict`), so a run resumed between log lines logs the same line as one that was not stopped.
    float64 keeps token counts of long windows exact.

    Args:
        device: where the sums live (the training device: adding a loss needs no host sync).
        groups: names of the per-task losses (``task/<name>``: the loss of that task's batches).
    """

    TERMS = ("loss", "soft", "hard", "embd", "hidden", "attn", "pred", "sentence")

    def __init__(self, device: torch.device, groups: Sequence[str] = ()):
        self.device = device
        self.names = [*self.TERMS, *(f"task/{name}" for name in groups)]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.reset()

    def reset(self) -> None:
        # Layout: sums per name, counts per name, tokens, rows.
        self.totals = torch.zeros(2 * len(self.names) + 2, dtype=torch.float64, device=self.device)
        # This rank's micro-batches per name, not reduced: every rank draws the same task for a micro-batch, so
        # they are the run's. The reduced counts over the world size were not, after a resume on another number
        # of ranks (the window of the old ranks merged, or an empty one on a new rank).
        self.batches = [0] * len(self.names)
        self.started = time.perf_counter()
        self.carried = 0.0  # training seconds of a window restored from a checkpoint, counted at restart_clock

    def restart_clock(self) -> None:
        """Start the window's time now: work done since it opened (an evaluation, a resume's loading) is not
        training time; a window restored from a checkpoint keeps the training time it had."""
        self.started = time.perf_counter() - self.carried
        self.carried = 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (an evaluation, a save) is not the window's training time, wherever in the window
        it falls: the micro-batches added before it keep theirs."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - began

    def add(self, terms: dict[str, torch.Tensor], tokens: int | torch.Tensor, rows: int, group: str | None = None):
        """One micro-batch: its loss terms (``group``: also as that task's loss), this rank's tokens and rows."""
        named = [*terms.items(), *([(f"task/{group}", terms["loss"])] if group is not None else [])]
        count = len(self.names)
        for name, value in named:
            if name not in self.index:
                raise KeyError(f"loss term {name!r} is not one the log window knows ({self.names})")
            self.totals[self.index[name]] += value.detach().double()
            self.totals[count + self.index[name]] += 1
            self.batches[self.index[name]] += 1
        self.totals[-2] += tokens.to(self.device) if torch.is_tensor(tokens) else tokens
        self.totals[-1] += rows

    def reduce(self) -> WindowStats:
        """The window over every rank (collective), then a new window."""
        world_size = distributed.current().world_size
        reduced = (distributed.all_reduce_mean(self.totals) * world_size).tolist()  # sums over ranks
        count = len(self.names)
        sums, counts = reduced[:count], reduced[count : 2 * count]
        stats = WindowStats(
            values={name: total / n for name, total, n in zip(self.names, sums, counts, strict=True) if n},
            batches={name: n for name, n in zip(self.names, self.batches, strict=True) if n},
            tokens=round(reduced[-2]),
            rows=round(reduced[-1]),
            seconds=time.perf_counter() - self.started,
        )
        self.reset()
        return stats

    def state_dict(self) -> dict[str, Any]:
        """This rank's open window, with the training time it has been open (its first line after a resume
        divided the tokens before the stop by the time after it alone)."""
        return {
            "names": self.names,
            "totals": self.totals.tolist(),
            "batches": list(self.batches),
            "seconds": time.perf_counter() - self.started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore by name: a checkpoint of a release with fewer loss terms restores the ones it has (a
        checkpoint of other tasks is refused elsewhere)."""
        saved, totals = state["names"], state["totals"]
        if not set(saved) <= set(self.index):
            return
        restored = [0.0] * len(self.totals)
        count = len(self.names)
        batches = window_batches(state)
        self.batches = [0] * count
        for place, name in enumerate(saved):
            restored[self.index[name]] = totals[place]
            restored[count + self.index[name]] = totals[len(saved) + place]
            self.batches[self.index[name]] = round(batches[place])
        restored[-2:] = totals[-2:]
        self.totals = torch.tensor(restored, dtype=torch.float64, device=self.device)
        self.carried = float(state.get("seconds", 0.0))  # a checkpoint of an earlier release: not kept
