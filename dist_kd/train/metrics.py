"""Metrics: ``metrics.jsonl`` (the run-directory contract), optional trackers (TensorBoard, W&B, MLflow), MFU.

Only rank 0 writes. Each line is one JSON object per logged step with ``step``, ``loss``, each term as
``loss_<name>``, ``lr`` and throughput. When a run starts, lines past the step it starts from are dropped
(the checkpoint's step on resume, every line on a start from scratch, e.g. after a kill before the first
checkpoint): they are logged again as the run replays those steps, so the file never holds a step twice. A
line that does not parse (cut off by a full disk or a kill mid-write) is dropped with a warning naming the
file and line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dist_kd.io import atomic_path

logger = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment, for the MFU estimate.
# First match wins, so the PCIe and NVL parts (lower clocks) come before the SXM parts' plain names.
PEAK_FLOPS = {
    "H200 NVL": 835e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
}


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a record; nested ones (a task run's ``task_loss``, ``dev``) as ``task_loss/<task>``."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif (prefix or key != "step") and isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


class TensorBoardTracker:
    """Scalars in ``run_dir/tensorboard`` (event files; a resumed run appends to the same directory).

    ``purge_from``: the first step this process logs again (a resumed run: the step after its checkpoint; a run
    from scratch: 0). TensorBoard hides the earlier processes' points from there on, as metrics.jsonl drops
    those lines; without it a run stopped between checkpoints drew the steps after its checkpoint twice.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any] | None, purge_from: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge_from)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def _run_id(run_dir: Path, tracker: str, make: Any) -> str:
    """The tracker's id of this run directory, kept in ``run_dir/.<tracker>_run_id``: a resumed run continues
    the same tracked run instead of starting a new one."""
    path = Path(run_dir) / f".{tracker}_run_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = make()
    with atomic_path(path) as tmp:
        tmp.write_text(run_id + "\n")
    return run_id


class WandbTracker:
    """Weights & Biases: one wandb run per run directory (project and entity from WANDB_PROJECT/WANDB_ENTITY).

    A wandb run takes no step below its last one: after a resume, the steps between the checkpoint and the
    stop keep the stopped process's points (metrics.jsonl holds the resumed run's)."""

    def __init__(self, run_dir: Path, config: dict[str, Any] | None, purge_from: int | None = None):
        import uuid

        import wandb

        run_id = _run_id(run_dir, "wandb", lambda: uuid.uuid4().hex[:16])
        self.run = wandb.init(
            id=run_id, resume="allow", name=Path(run_dir).resolve().name, dir=str(run_dir), config=config or {}
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """MLflow: one MLflow run per run directory (tracking URI and experiment from MLFLOW_TRACKING_URI and
    MLFLOW_EXPERIMENT_NAME); the config's keys become parameters. After a resume, the steps between the
    checkpoint and the stop hold two values each (MLflow keeps every point logged)."""

    def __init__(self, run_dir: Path, config: dict[str, Any] | None, purge_from: int | None = None):
        import mlflow

        self.mlflow = mlflow
        path = Path(run_dir) / ".mlflow_run_id"
        known = path.read_text().strip() if path.is_file() else None
        run = mlflow.start_run(run_id=known) if known else mlflow.start_run(run_name=Path(run_dir).resolve().name)
        if not known:
            _run_id(run_dir, "mlflow", lambda: run.info.run_id)
            mlflow.log_params(_flatten(config or {}))

    def log(self, values: dict[str, float], step: int) -> None:
        # MLflow keys allow letters, digits and _-./ space; metric names here use those already.
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists as their string form)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            plain = isinstance(value, str | int | float | bool) or value is None
            out[f"{prefix}{key}"] = value if plain else str(value)
    return out


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class MetricsLogger:
    """Appends JSON lines to ``run_dir/metrics.jsonl`` and sends the numbers to the trackers of
    ``run.report_to`` (tensorboard, wandb, mlflow).

    Args:
        run_dir: the run directory.
        enabled: whether this process writes (rank 0).
        report_to: tracker names (``RunConfig.trackers()``).
        config: the resolved run config (wandb's config, MLflow's parameters).
    """

    def __init__(
        self, run_dir: Path, enabled: bool, report_to: Sequence[str] = (), config: dict[str, Any] | None = None
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.config = config
        for name in report_to:
            if name not in TRACKER_CLASSES:
                raise ValueError(f"run.report_to: unknown tracker {name!r}; one of {list(TRACKER_CLASSES)}")
        self.report_to = list(report_to) if enabled else []
        self.trackers: list[Any] | None = None  # opened by start_at (which knows the resumed step) or a first log

    def _open_trackers(self, purge_from: int | None) -> list[Any]:
        if self.trackers is None:
            self.trackers = [TRACKER_CLASSES[name](self.run_dir, self.config, purge_from) for name in self.report_to]
        return self.trackers

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.scalars(record, record["step"])

    def add_to_step(self, record: dict[str, Any]) -> None:
        """``record``'s fields into the last line when that line is of ``record["step"]`` (rewritten atomically),
        else a new line: a run resumed at its last step evaluates that step, whose training line the stopped
        process wrote, and two lines of one step broke "one line per step"."""
        if not self.enabled:
            return
        records = self.records()
        if not records or records[-1]["step"] != record["step"]:
            self.log(record)
            return
        records[-1].update(record)
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(line) + "\n" for line in records))
        self.scalars(record, record["step"])

    def scalars(self, values: dict[str, Any], step: int) -> None:
        """Numbers for the trackers only (e.g. ``dev/<task>/<metric>``); metrics.jsonl is not touched."""
        numbers = _numbers(values)
        if numbers:
            for tracker in self._open_trackers(None):
                tracker.log(numbers, step)

    def records(self) -> list[dict[str, Any]]:
        """The lines logged so far, parsed; a line that does not parse is skipped with a warning."""
        if not self.path.exists():
            return []
        records = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("not an object with an integer 'step'")
            except ValueError as err:
                logger.warning("%s line %d is damaged (%s); dropping it: %.80r", self.path, number, err, line)
                continue
            records.append(record)
        return records

    def start_at(self, step: int | None) -> list[dict[str, Any]]:
        """Keep only the lines of steps up to ``step`` (None: a run from scratch keeps none), atomically, and
        open the trackers, TensorBoard's hiding its points past ``step`` too.

        Returns:
            The kept records (the run's history before this process), on the writing rank; [] elsewhere.
        """
        kept = self.keep(lambda record: step is not None and record["step"] <= step)
        self._open_trackers(0 if step is None else step + 1)
        return kept

    def keep(self, wanted: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """Rewrite ``metrics.jsonl`` atomically with only the records ``wanted`` accepts (damaged lines go too).

        Returns:
            The kept records, on the writing rank; [] elsewhere.
        """
        if not self.enabled or not self.path.exists():
            return []
        kept = [record for record in self.records() if wanted(record)]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        return kept

    def close(self) -> None:
        for tracker in self.trackers or []:
            tracker.close()
        self.trackers = []


def count_parameters(module: torch.nn.Module) -> int:
    """All parameters, at full size also under ZeRO-3 (whose partitioned parameters keep ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def matmul_parameters(module: torch.nn.Module) -> int:
    """Weights that enter a matrix product once per token: every ``nn.Linear`` weight (ZeRO-3 aware).

    Embedding tables are lookups, not products, and are left out, as in the usual 6N estimate; for a small
    student they are most of its parameters (all-MiniLM-L6-v2: 11.7M of 22.7M), so counting them would
    roughly double the FLOPs claimed. So is the pooler, which runs on one token of each sequence (and gets no
    gradient in general distillation): counted per token, it put the MFU 0.8-1.9 % too high.
    """
    return sum(
        getattr(layer.weight, "ds_numel", layer.weight.numel())
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) and "pooler" not in name.split(".")
    )


def attention_flops_per_token(config: Any, seq_len: int) -> int:
    """Forward FLOPs per token of attention's two ``seq_len`` x ``seq_len`` products in every layer: the scores
    (Q K^T) and their weighted sum of V, 2 x 2 x seq_len x width each layer. The weights' 6N / 2N leave them
    out: for BERT-base they add 3 % at seq 128 and 11 % at 512, for a 4L-312 student 7 % and 28 %."""
    return 4 * seq_len * config.hidden_size * config.num_hidden_layers


def distill_flops_per_token(model: torch.nn.Module, teacher: Any, seq_len: int | None = None) -> float:
    """FLOPs per token of one general-distillation step: 6 per trained matmul weight (the student and its
    projections: forward and backward), 2 per teacher weight that runs (forward only; the teacher is already
    truncated above the highest mapped layer) and, given ``seq_len``, attention's products the same way (3x
    :func:`attention_flops_per_token` for the student, 1x for the teacher)."""
    flops = 6 * matmul_parameters(model) + 2 * matmul_parameters(teacher.model)
    if seq_len:
        student = getattr(model, "student", model)
        flops += 3 * attention_flops_per_token(student.config, seq_len)
        flops += attention_flops_per_token(teacher.model.config, seq_len)
    return flops


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from :data:`PEAK_FLOPS`; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def estimate_mfu(
    model: torch.nn.Module, teacher: Any, tokens_per_s_per_rank: float, device: torch.device, seq_len: int | None = None
) -> float | None:
    """Model FLOPs utilisation of one GPU: :func:`distill_flops_per_token` x tokens/s over the device's dense
    bf16 peak. None on a CPU or an unknown GPU."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return distill_flops_per_token(model, teacher, seq_len) * tokens_per_s_per_rank / peak
