"""Augment a task's training data with TinyBERT's algorithm (docs/augment.md).

One process:

    python launch/augment.py --task sst2 --data glue/SST-2/train.tsv --mlm models/bert-base-uncased-mlm \
        --glove glove/glove.6B.300d.txt --output data/sst2-aug

Split across ranks (each rank augments a contiguous share and writes output/parts/part-R-of-W.parquet;
rank 0 merges them into output/augmented.parquet, the same file a single process writes):

    deepspeed --num_gpus 2 launch/augment.py --task sst2 ...        # or
    torchrun --nproc_per_node 2 launch/augment.py --task sst2 ...   # or, in a SLURM job,
    srun -n 8 python launch/augment.py --task sst2 ...

Custom task: --task topic --labels business,sport,tech --text-a text --label category.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

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
from dist_kd.data import augment as aug

logger = logging.getLogger("dist_kd.augment")


def launcher_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as training finds them (``distributed.discover_environment``: deepspeed /
    torchrun's RANK / WORLD_SIZE, else srun's SLURM_PROCID / SLURM_NTASKS); (0, 1, 0) without a launcher."""
    found = distributed.discover_environment()
    return int(found["RANK"]), int(found["WORLD_SIZE"]), int(found["LOCAL_RANK"])


def rendezvous(world_size: int) -> bool:
    """Whether the ranks meet at a gloo barrier: a launcher gave MASTER_ADDR, or srun started them (the master
    is the job's first node). RANK / WORLD_SIZE alone (a SLURM array) poll the filesystem instead."""
    return world_size > 1 and ("MASTER_ADDR" in os.environ or not ("RANK" in os.environ and "WORLD_SIZE" in os.environ))


def default_device(local_rank: int) -> str:
    """``cuda:N`` for this rank's GPU (one of its own under a per-task GPU binding), else ``cpu``."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{distributed.device_index(local_rank, torch.cuda.device_count(), os.environ)}"


def _checked(text: str, convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str) -> Any:
    """A flag's value as ``convert`` reads it, where ``accept`` takes it; else argparse's error naming the flag."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not accept(value):  # nan fails every comparison
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _words_read(text: str) -> int | None:
    if text.lower() == "all":
        return None
    return _checked(text, int, lambda value: value >= 1, "a number of words >= 1 or 'all'")


def _encoding(text: str) -> str:
    """A codec Python knows (an unknown one was a LookupError traceback when the data was opened)."""
    import codecs

    try:
        codecs.lookup(text)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r} (e.g. utf-8, latin-1, cp1252)") from None
    return text


def _probability(text: str) -> float:
    return _checked(text, float, lambda value: 0 <= value <= 1, "a probability in [0, 1]")


def _seq_length(text: str) -> int:
    return _checked(text, int, lambda value: value >= 3, "a length of at least 3 pieces (CLS, a word, SEP)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    defaults = aug.AugmentConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="TSV / CSV / JSONL / Parquet file or datasets directory")
    parser.add_argument(
        "--mlm", required=True, help="HF *ForMaskedLM directory (model + tokenizer), or 'none' for GloVe only"
    )
    parser.add_argument("--glove", required=True, help="GloVe text file, .npy (+ --glove-vocab) or directory")
    parser.add_argument("--glove-vocab", default=None, help="vocabulary of a .npy: .txt lines or .parquet 'index'")
    parser.add_argument("--glove-dim", type=int, default=None, help="expected vector dimension (checked)")
    parser.add_argument(
        "--glove-max-words",
        type=_words_read,
        default=defaults.glove_max_words,
        help=f"GloVe words read, the file's first (most frequent) N; 'all' reads every word (default "
        f"{defaults.glove_max_words}, as TinyBERT's code)",
    )
    parser.add_argument("--output", required=True, help="output directory (augmented.parquet)")
    add_task_arguments(parser, unlabeled=True)
    parser.add_argument("--split", default=None, help="split of a DatasetDict directory")
    parser.add_argument("--encoding", type=_encoding, default="utf-8", help="text encoding of TSV / CSV / JSONL files")
    parser.add_argument("--p-t", type=_probability, default=defaults.p_t, help="replacement probability per word")
    parser.add_argument("--n-a", type=positive_int, default=defaults.n_a, help="augmented copies per example")
    parser.add_argument("--k", type=positive_int, default=defaults.k, help="candidates per word")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--stop-words",
        choices=sorted(aug.STOP_WORD_LISTS),
        default=defaults.stop_words,
        help="words never replaced: tinybert, the English stop words TinyBERT's code keeps (pronouns, articles, "
        "auxiliaries, prepositions, not/no/nor); none replaces every word of letters (default %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="masked sequences per pass"
    )
    parser.add_argument("--max-seq-length", type=_seq_length, default=None, help="masked-LM context in pieces")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    parser.add_argument("--wait-timeout", type=float, default=24 * 3600.0, help="seconds rank 0 waits for parts")
    parser.add_argument("--debug", action="store_true", help="one process, ignore launcher variables, debug logs")
    add_log_level_argument(parser)
    add_launcher_argument(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse -> build -> run; rank 0 merges the parts. Returns the exit code (2 for bad input, said once when
    every rank has it)."""
    import torch.distributed as dist

    args = parse_args(argv)
    rank, world_size, local_rank = (0, 1, 0) if args.debug else launcher_env()
    configure_logging(rank, debug=args.debug, level=args.log_level)
    use_group = rendezvous(world_size) and not args.debug

    def body() -> int:
        if use_group:
            # gloo: the group only orders file writes and shares errors, and works with or without GPUs.
            os.environ.update({k: v for k, v in distributed.discover_environment().items() if k.startswith("MASTER_")})
            timeout = datetime.timedelta(seconds=args.wait_timeout)
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
        with distributed.shared_failure():
            spec = task_spec_from_args(args)
            config = aug.AugmentConfig(
                p_t=args.p_t,
                n_a=args.n_a,
                k=args.k,
                seed=args.seed,
                batch_size=args.batch_size,
                max_seq_length=args.max_seq_length,
                glove_max_words=args.glove_max_words,
                stop_words=args.stop_words,
            )
        aug.augment_task(
            spec,
            args.data,
            args.output,
            args.glove,
            config,
            mlm_dir=None if args.mlm.lower() == "none" else args.mlm,
            glove_vocab=args.glove_vocab,
            glove_dim=args.glove_dim,
            device=args.device or default_device(local_rank),
            rank=rank,
            world_size=world_size,
            barrier=dist.barrier if use_group else None,
            encoding=args.encoding,
            split=args.split,
            wait_timeout=args.wait_timeout,
        )
        return 0

    return run_in_process_group(body)  # bad input: ValueError, or OSError for an output it cannot write


if __name__ == "__main__":
    sys.exit(main())
