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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_kd.cli import add_launcher_argument, bad_input, configure_logging, drop_launcher_variables  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (launch/configs/task_*.yaml)")
    parser.add_argument("--debug", action="store_true", help="one process, no launcher")
    add_launcher_argument(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser.parse_args(argv)


def summary_lines(trainer, exported: dict[str, Path]) -> list[str]:
    """Where the outputs are and each task's dev figure (final and best)."""
    lines = [f"shared encoder saved to {exported['student']}"]
    report = trainer.eval_report()
    for name, entry in report["tasks"].items():
        final, best = entry["final"] or {}, entry["best"]
        line = f"  {name:<16} dev {entry['metric']} {final.get(entry['metric'], float('nan')):.4f} (final)"
        if best is not None:
            line += f", {best[entry['metric']]:.4f} (best, step {best['step']}, {trainer.run_dir / 'best' / name})"
        lines.append(line)
    for name, path in exported.items():
        if name != "student":
            lines.append(f"  {name:<16} classifier saved to {path} (AutoModelForSequenceClassification)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dist_kd import distributed
    from dist_kd.config import load_config
    from dist_kd.train.task import TaskTrainer
    from dist_kd.train.task_config import TaskConfig

    if args.debug:
        drop_launcher_variables()
    trainer = None
    try:
        cfg = load_config(TaskConfig, args.config, args.overrides)
        info = distributed.init_distributed()
        configure_logging(info.rank)
        trainer = TaskTrainer(cfg, info)
        if not trainer.train():
            return 0  # preempted: a checkpoint is saved, the job can be requeued
        exported = trainer.export()
        if info.is_main:
            print("\n".join(summary_lines(trainer, exported)), flush=True)
        return 0
    except (ValueError, FileNotFoundError) as err:
        return bad_input(err)
    finally:
        if trainer is not None:
            trainer.close()
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
