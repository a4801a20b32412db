"""General distillation (TinyBERT stage 1): a frozen teacher teaches a smaller student on a sharded corpus.

    deepspeed --num_gpus 8 launch/general.py --config launch/configs/tinybert_4l_312.yaml [key=value ...]
    deepspeed --hostfile hosts launch/general.py --config ... deepspeed.config=ds_configs/zero3.json
    python launch/general.py --debug --config launch/configs/quickstart.yaml teacher.path=DIR   # one process
    sbatch launch/slurm/general.sbatch launch/configs/tinybert_4l_312.yaml       # SLURM, multi-node

``key=value`` arguments override the YAML (e.g. ``train.max_steps=100 run.output_dir=runs/try``).
A run directory with checkpoints is resumed (``run.resume: auto``); SIGTERM/SIGUSR1 checkpoint and stop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if (Path(__file__).resolve().parents[1] / "dist_kd" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_kd.cli import catch_stop_signals, config_job_parser, run_config_job  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dist_kd.train.general import GeneralConfig

    return config_job_parser(
        __doc__.split("\n\n")[0],
        config_help="run config YAML (launch/configs/*.yaml)",
        debug_help="one process, no launcher, no DataLoader workers",
        config_class=GeneralConfig,
    ).parse_intermixed_args(argv)  # key=value after a flag too (parse_args refused the second block)


def main(argv: list[str] | None = None) -> int:
    with catch_stop_signals():  # a preemption while torch and DeepSpeed import: a checkpoint at the first step
        from dist_kd.train.general import GeneralConfig, GeneralTrainer, finish_general

        # --debug reads data in the main process too, so that one process can be stepped through.
        return run_config_job(parse_args(argv), GeneralConfig, GeneralTrainer, finish_general, ["data.num_workers=0"])


if __name__ == "__main__":
    sys.exit(main())
