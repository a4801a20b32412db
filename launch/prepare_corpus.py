r"""Tokenise raw text into WebDataset corpus shards for general distillation.

    python launch/prepare_corpus.py --input data/wiki/ data/books.jsonl --tokenizer models/teacher \
        --output corpus/wiki-128 --seq-len 128 [--shard-size 10000] [--num-workers 8] \
        [--packing pack|document] [--txt-document paragraph|line|file] [--text-column text] \
        [--encoding-errors strict|replace|ignore] [--overwrite]

Writes ``shard-NNNNNN.tar`` files and ``manifest.json`` (format and details: docs/corpus.md)
and prints a summary. The logic lives in ``dist_kd.data.corpus``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dist_kd.cli import ExitOnSignal, add_log_level_argument, bad_input, configure_logging
from dist_kd.data.corpus import ENCODING_ERRORS, PACKINGS, TXT_DOCUMENT_MODES, TokenizerWorkerDied, prepare_corpus
from dist_kd.io import usable_cores


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        nargs="+",
        action="extend",  # --input a.txt --input b.txt reads both (the last alone, before)
        required=True,
        help="files or directories (.txt, .txt.gz, .jsonl, .parquet, .arrow, datasets dirs saved with save_to_disk)",
    )
    parser.add_argument("--tokenizer", required=True, help="the teacher's (fast) tokenizer directory")
    parser.add_argument("--output", required=True, help="corpus directory to write")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, [CLS] and [SEP] included")
    parser.add_argument("--shard-size", type=int, default=10_000, help="sequences per shard")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=max(1, usable_cores() - 1),
        help="tokeniser processes (0: in this process; default: the cores this process may use, less one)",
    )
    parser.add_argument(
        "--packing",
        choices=PACKINGS,
        default="pack",
        help="pack: full sequences across documents; document: one (truncated) document per sequence",
    )
    parser.add_argument(
        "--txt-document",
        choices=TXT_DOCUMENT_MODES,
        default="paragraph",
        help="a document in .txt files: a blank-line-separated paragraph, a line, or the whole file",
    )
    parser.add_argument("--text-column", default="text", help="JSONL field / table column holding the text")
    parser.add_argument(
        "--encoding-errors",
        choices=ENCODING_ERRORS,
        default="strict",
        help="non-UTF-8 bytes in text files and table columns: strict (an error naming the file), replace or ignore",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="one process (--num-workers 0), debug logs")
    add_log_level_argument(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, write the corpus, print the summary; returns the exit code (2: bad input)."""
    args = parse_args(argv)
    if args.debug:
        args.num_workers = 0
    configure_logging(0, debug=args.debug, level=args.log_level)
    # SIGTERM (scancel, a time limit, timeout) ends the run through its cleanup: an --overwrite run's hidden
    # copy of the new corpus is removed, and a corpus being replaced stays as it was unless the new one was
    # complete and already swapped in.
    try:
        with ExitOnSignal("prepare-corpus stops; a corpus being replaced stays as it was until the new one is whole"):
            summary = prepare_corpus(
                args.input,
                args.tokenizer,
                args.output,
                seq_len=args.seq_len,
                shard_size=args.shard_size,
                num_workers=args.num_workers,
                packing=args.packing,
                txt_document=args.txt_document,
                text_column=args.text_column,
                encoding_errors=args.encoding_errors,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except TokenizerWorkerDied as err:  # not the input's fault: said in one line all the same, exit 1
        bad_input(err)
        return 1
    except (ValueError, OSError) as err:  # OSError: FileExistsError, an output it cannot write
        return bad_input(err)
    print(f"wrote {args.output}: {summary.format()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
