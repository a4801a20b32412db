"""Task distillation: a multi-task student (MT-DNN-KD) or TinyBERT's task stage, from soft-target stores.

    deepspeed --num_gpus 8 launch/task.py --config launch/configs/task_example.yaml [key=value ...]
    python launch/task.py --debug --config CONFIG                     # one process, no launcher
    python launch/task.py --config CONFIG distill.phase=intermediate teacher.path=DIR   # TinyBERT phase 1

``key=value`` arguments override the YAML (e.g. ``train.epochs=3 run.output_dir=runs/try``). The run
directory gets ``eval.json`` (dev metrics per task: latest, best, history), ``best/<task>/`` and
``tasks/<task>/`` (HF classifiers), ``student/`` (the shared encoder), ``predictions/``, ``metrics.jsonl``
and ``checkpoints/``; ``run.resume: auto`` continues a stopped run, SIGTERM/SIGUSR1 checkpoint and stop.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if (Path(__file__).resolve().parents[1] / "dist_kd" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_kd.cli import catch_stop_signals, config_job_parser, run_config_job  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dist_kd.train.task_config import TaskConfig

    return config_job_parser(
        __doc__.split("\n\n")[0],
        config_help="run config YAML (launch/configs/task_*.yaml)",
        debug_help="one process, no launcher",
        config_class=TaskConfig,
    ).parse_intermixed_args(argv)  # key=value after a flag too (parse_args refused the second block)


def main(argv: list[str] | None = None) -> int:
    with catch_stop_signals():  # a preemption while torch and DeepSpeed import: a checkpoint at the first step
        from dist_kd.train.task import TaskTrainer, finish_task
        from dist_kd.train.task_config import TaskConfig

        return run_config_job(parse_args(argv), TaskConfig, TaskTrainer, finish_task)


if __name__ == "__main__":
    sys.exit(main())
