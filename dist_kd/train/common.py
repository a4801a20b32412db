"""Pieces every training entry point shares: the ``run`` config section, preemption signals, progress bar."""

from __future__ import annotations

import importlib.util
import logging
import signal
from dataclasses import dataclass

import torch

from dist_kd import distributed
from dist_kd.config import doc

logger = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")


@dataclass
class RunConfig:
    """The run directory, logging and checkpoints."""

    output_dir: str = doc("run directory (config.yaml, metrics.jsonl, checkpoints/, student/)", "runs/general")
    log_every: int = doc("optimizer steps between metric lines", 10)
    save_every: int = doc("optimizer steps between checkpoints (0: only at the end)", 500)
    keep_last: int = doc("complete checkpoints kept (0 keeps all)", 3)
    resume: str = doc("auto (continue from the newest checkpoint if any) | never (refuse a used directory)", "auto")
    tensorboard: bool = doc("also write TensorBoard event files under run_dir/tensorboard", False)
    progress: bool = doc("tqdm progress bar on rank 0", True)

    def __post_init__(self):
        if self.resume not in RESUME_MODES:
            raise ValueError(f"run.resume must be one of {list(RESUME_MODES)}, got {self.resume!r}")
        if self.log_every < 1:
            raise ValueError(f"run.log_every must be >= 1, got {self.log_every}")
        if self.save_every < 0 or self.keep_last < 0:
            raise ValueError("run.save_every and run.keep_last must be >= 0")
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            # Checked with the config, before the run directory is touched, not at the first log line.
            raise ValueError(
                "run.tensorboard is true but the tensorboard package is not installed: "
                "pip install 'dist_kd[tensorboard]' (or tensorboard), or set run.tensorboard=false"
            )


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption) set a flag; the loop checkpoints and exits at the next step."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        logger.warning("received %s: saving a checkpoint and stopping after this step", signal.Signals(signum).name)
        self.requested = True

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def stop_agreed(local: bool, device: torch.device) -> bool:
    """True on every rank when any rank was asked to stop.

    Every rank must leave the loop at the same step, or the collective checkpoint save would hang.
    """
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    return bool(distributed.all_reduce_mean(flag).item() > 0)


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar over optimizer steps (shown on rank 0 only)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)
