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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_kd.cli import add_launcher_argument, bad_input, configure_logging, drop_launcher_variables  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="run config YAML (launch/configs/*.yaml)")
    parser.add_argument("--debug", action="store_true", help="one process, no launcher, no DataLoader workers")
    add_launcher_argument(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dist_kd import distributed
    from dist_kd.config import load_config
    from dist_kd.train.general import GeneralConfig, GeneralTrainer, summary_lines, write_summary

    overrides = list(args.overrides)
    if args.debug:
        # One process you can step through: no launcher variables, data read in the main process.
        drop_launcher_variables()
        overrides = ["data.num_workers=0", *overrides]
    trainer = None
    try:
        cfg = load_config(GeneralConfig, args.config, overrides)
        info = distributed.init_distributed()
        configure_logging(info.rank)
        trainer = GeneralTrainer(cfg, info)
        if not trainer.train():
            return 0  # preempted: a checkpoint is saved, the job can be requeued
        trainer.export()
        agreement = None
        if cfg.data.eval_shards:
            # Every rank runs it: under ZeRO-3 each forward gathers partitioned weights collectively.
            agreement = trainer.agreement(cfg.data.eval_shards, cfg.data.eval_batches)
        if info.is_main:
            lines = summary_lines(trainer, agreement)
            write_summary(trainer.run_dir, lines, agreement)
            print("\n".join(lines), flush=True)
        return 0
    except (ValueError, FileNotFoundError) as err:
        return bad_input(err)
    finally:
        if trainer is not None:
            trainer.close()
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
