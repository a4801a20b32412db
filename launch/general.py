"""General distillation (TinyBERT stage 1): a frozen teacher teaches a smaller student on a sharded corpus.

    deepspeed --num_gpus 8 launch/general.py --config launch/configs/tinybert_4l_312.yaml [key=value ...]
    deepspeed --hostfile hosts launch/general.py --config ... deepspeed.config=ds_configs/zero3.json
    python launch/general.py --debug --config launch/configs/quickstart.yaml     # one process, no launcher
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

from dist_kd.cli import config_job_parser, run_config_job  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dist_kd.train.general import GeneralConfig

    return config_job_parser(
        __doc__.split("\n\n")[0],
        config_help="run config YAML (launch/configs/*.yaml)",
        debug_help="one process, no launcher, no DataLoader workers",
        config_class=GeneralConfig,
    ).parse_args(argv)


def finish(trainer, cfg, info) -> None:
    """Export the student, measure its quality beside the teacher's and a random init's, print the summary."""
    from dist_kd.train.general import quality_summary, summary_lines, write_summary

    trainer.export()
    # Every rank runs it: under ZeRO-3 each forward gathers partitioned weights collectively.
    quality = quality_summary(trainer)
    if info.is_main:
        from dist_kd.model_card import write_model_card

        lines = summary_lines(trainer, quality)
        write_summary(trainer.run_dir, lines, quality)
        if quality:
            write_model_card(trainer.run_dir / "student", trainer.model_card(quality))  # with the measured quality
        from dist_kd.report import report_at_end

        print("\n".join([*lines, report_at_end(trainer.run_dir)]), flush=True)


def main(argv: list[str] | None = None) -> int:
    from dist_kd.train.general import GeneralConfig, GeneralTrainer

    # --debug reads data in the main process too, so that one process can be stepped through.
    return run_config_job(parse_args(argv), GeneralConfig, GeneralTrainer, finish, ["data.num_workers=0"])


if __name__ == "__main__":
    sys.exit(main())
