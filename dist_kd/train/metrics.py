"""Metrics: ``metrics.jsonl`` (the run-directory contract), optional TensorBoard, and an MFU estimate.

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
from pathlib import Path
from typing import Any

import torch

from dist_kd.io import atomic_path

logger = logging.getLogger(__name__)

# Dense bf16/fp16 tensor-core peaks (FLOP/s) by device-name fragment, for the MFU estimate.
# First match wins, so the PCIe H100 (lower clocks) comes before the SXM part's plain "H100".
PEAK_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "V100": 125e12,
}


class MetricsLogger:
    """Appends JSON lines to ``run_dir/metrics.jsonl`` (and TensorBoard scalars when asked)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, record["step"])

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Extra TensorBoard scalars at ``step`` (e.g. ``dev/<task>/<metric>``); metrics.jsonl is not touched."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, int | float):
                self.writer.add_scalar(key, value, step)

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
        """Keep only the lines of steps up to ``step`` (None: a run from scratch keeps none), atomically.

        Returns:
            The kept records (the run's history before this process), on the writing rank; [] elsewhere.
        """
        if not self.enabled or not self.path.exists():
            return []
        kept = [record for record in self.records() if step is not None and record["step"] <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        return kept

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def count_parameters(module: torch.nn.Module) -> int:
    """All parameters, at full size also under ZeRO-3 (whose partitioned parameters keep ``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def matmul_parameters(module: torch.nn.Module) -> int:
    """Weights that enter a matrix product once per token: every ``nn.Linear`` weight (ZeRO-3 aware).

    Embedding tables are lookups, not products, and are left out, as in the usual 6N estimate; for a small
    student they are most of its parameters (all-MiniLM-L6-v2: 11.7M of 22.7M), so counting them would
    roughly double the FLOPs claimed.
    """
    return sum(
        getattr(layer.weight, "ds_numel", layer.weight.numel())
        for layer in module.modules()
        if isinstance(layer, torch.nn.Linear)
    )


def estimate_mfu(
    model: torch.nn.Module, teacher: Any, tokens_per_s_per_rank: float, device: torch.device
) -> float | None:
    """Model FLOPs utilisation of one GPU: (6 x student + 2 x teacher matmul weights) FLOPs per token.

    The student (with its projections) trains: forward and backward, 6 FLOPs per weight and token; the
    frozen teacher runs forward only, 2. Only the teacher layers that run are counted (the model is already
    truncated above the highest mapped layer). Attention's L^2 terms are left out (small at L = 128 against
    the matrix products), so this slightly understates the work done. None on a CPU or an unknown GPU.
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    if peak is None:
        return None
    flops_per_token = 6 * matmul_parameters(model) + 2 * matmul_parameters(teacher.model)
    return flops_per_token * tokens_per_s_per_rank / peak
