"""Run K fine-tuned teachers over task data once and write the soft-target store (docs/precompute.md).

    deepspeed launch/precompute.py --task sst2 --data data/sst2-aug --teachers runs/sst2-teachers/teacher-1 \
        runs/sst2-teachers/teacher-2 runs/sst2-teachers/teacher-3 --output data/sst2-soft [--temperature 1.0] \
        [--keep-teacher-logits] [--batch-size 64] [--max-length 128] [--dtype fp16] [--reuse STORE ...]

The same arguments work with ``python launch/precompute.py`` (one process; ``--debug`` also ignores launcher
variables the shell exported) and ``torchrun --nproc_per_node N launch/precompute.py``. Custom task: ``--task topic
--labels business,sport,tech --text-a text --label category``. ``--reuse data/sst2-soft-orig`` takes the targets of
rows already in an earlier store of the same teachers (an augmented set repeats its original rows) instead of
running the teachers on them. Re-running the same command after a crash resumes from the finished chunks. Data
without the label column gives a store without labels (a warning names the columns found); a column named with
``--label`` must exist. Bad input exits with code 2 and one ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dist_kd import distributed
from dist_kd.cli import (
    add_launcher_argument,
    add_log_level_argument,
    add_task_arguments,
    configure_logging,
    drop_launcher_variables,
    positive_float,
    positive_int,
    run_in_process_group,
    task_spec_from_args,
)
from dist_kd.precompute import PrecomputeConfig, precompute_soft_targets

logger = logging.getLogger("dist_kd.precompute")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    defaults = PrecomputeConfig(teachers=["-"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="TSV / CSV / JSONL / Parquet file, datasets or augment dir")
    parser.add_argument("--teachers", required=True, nargs="+", help="HF *ForSequenceClassification directories")
    parser.add_argument("--output", required=True, help="soft-target store directory")
    parser.add_argument("--temperature", type=positive_float, default=defaults.temperature)
    parser.add_argument("--keep-teacher-logits", action="store_true", help="also store K x C raw logits per row")
    add_task_arguments(parser, unlabeled=True)
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=positive_int, default=defaults.max_length)
    parser.add_argument("--dtype", default=defaults.dtype, help="fp16 | bf16 | fp32 (fp16 runs as fp32 on a CPU)")
    parser.add_argument(
        "--chunk-size", type=positive_int, default=defaults.chunk_size, help="examples per resumable chunk"
    )
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=[],
        metavar="STORE",
        help="earlier stores of these teachers: rows with the same texts are copied, not recomputed",
    )
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="one process, ignore launcher variables, debug logs")
    parser.add_argument(
        "--wait-timeout",
        type=positive_float,
        default=24 * 3600.0,
        help="seconds a rank waits for the others (a rank's last chunk, rank 0's merge) before the run fails",
    )
    add_log_level_argument(parser)
    add_launcher_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse -> build -> run; returns the exit code."""
    args = parse_args(argv)
    if args.debug:
        drop_launcher_variables()

    def body() -> int:
        # The other ranks wait while one computes its last chunk, or rank 0 merges: DeepSpeed's 10 minutes ended a
        # run (and every rerun, dealt the same chunk) where one chunk of a large teacher took longer.
        info = distributed.init_distributed(force_cpu=args.cpu, timeout_s=args.wait_timeout)
        configure_logging(info.rank, debug=args.debug, level=args.log_level)
        with distributed.shared_failure():  # the same refusal on every rank: said once
            spec = task_spec_from_args(args)
            config = PrecomputeConfig(
                teachers=args.teachers,
                temperature=args.temperature,
                keep_teacher_logits=args.keep_teacher_logits,
                batch_size=args.batch_size,
                max_length=args.max_length,
                dtype=args.dtype,
                chunk_size=args.chunk_size,
                reuse=args.reuse,
            )
        result = precompute_soft_targets(
            spec, args.data, args.output, config, progress=not args.no_progress, require_label_column=args.label_given
        )
        if info.is_main:
            logger.info("soft-target store %s: %d rows", result.directory, result.num_rows)
        return 0

    return run_in_process_group(body)  # bad input: ValueError, or OSError for an output it cannot write


if __name__ == "__main__":
    sys.exit(main())
