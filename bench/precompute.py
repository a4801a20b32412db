"""Precompute throughput and store size: examples/s through K teachers and bytes per example on disk.

    python bench/precompute.py                                    # 3 small BERT teachers built here, CPU
    python bench/precompute.py --num-examples 20000 --device cuda --dtype fp16
    python bench/precompute.py --teachers DIR1 DIR2 DIR3 --device cuda   # real fine-tuned teachers

Runs the library's precompute (one process) twice, without and with ``--keep-teacher-logits``, on pseudo-
English sentences of 3-60 words (half of them sentence pairs) and prints:

- examples/s end to end (tokenising, K forward passes, chunk files, merge, manifest) and over the teacher
  passes alone;
- bytes per example of the final store (texts included; Parquet compresses the texts, not the floats);
- the share of padding tokens in the teacher batches with length buckets against batches in input order
  (what bucketing saves in forward-pass work).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_kd.data.tasks import resolve_task_spec
from dist_kd.precompute import PrecomputeConfig, TeacherEnsemble, precompute_soft_targets
from dist_kd.predict import length_batches
from dist_kd.testing import build_tiny_bert, random_sentences


def build_teachers(root: Path, num: int, layers: int, hidden: int, labels: list[str]) -> list[str]:
    maps = {"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)}}
    return [
        str(build_tiny_bert(root / f"teacher-{k}", seed=k, model_class="BertForSequenceClassification",
                            num_layers=layers, hidden_size=hidden, num_heads=4, intermediate_size=4 * hidden,
                            max_position_embeddings=512, num_labels=len(labels), **maps))
        for k in range(num)
    ]  # fmt: skip


def padding_share(lengths: list[int], batch_size: int, bucketed: bool) -> float:
    order = length_batches(lengths, batch_size) if bucketed else np.array_split(
        np.arange(len(lengths)), range(batch_size, len(lengths), batch_size))  # fmt: skip
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in order)
    return 1.0 - sum(lengths) / padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=None, help="real teacher dirs (default: build small ones)")
    parser.add_argument("--num-teachers", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--num-examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():  # an assertion deep in torch otherwise
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    import transformers

    transformers.logging.set_verbosity_error()
    # the synthetic rows mix pairs and single texts on purpose (both length profiles): not a data problem here
    logging.getLogger("dist_kd.data.tasks").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.teachers:
            from transformers import AutoConfig

            id2label = AutoConfig.from_pretrained(args.teachers[0]).id2label
            labels = [id2label[i] for i in range(len(id2label))]
            teachers = args.teachers
        else:
            labels = ["business", "entertainment", "politics", "sport", "tech"]
            teachers = build_teachers(root, args.num_teachers, args.layers, args.hidden, labels)
        firsts = random_sentences(args.num_examples, seed=1, min_words=3, max_words=60)
        seconds = random_sentences(args.num_examples, seed=2, min_words=3, max_words=30)
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps({"a": a, "b": b if i % 2 else None, "y": labels[i % len(labels)]}) + "\n"
                                for i, (a, b) in enumerate(zip(firsts, seconds))))  # fmt: skip
        spec = resolve_task_spec("bench", labels=labels, text_a="a", text_b="b", label="y")
        device = torch.device(args.device)

        print(f"device {device}, {len(teachers)} teachers, {args.num_examples} examples, batch {args.batch_size}, "
              f"max_length {args.max_length}, dtype {args.dtype}, torch threads {torch.get_num_threads()}")  # fmt: skip
        for keep in (False, True):
            config = PrecomputeConfig(
                teachers=teachers,
                keep_teacher_logits=keep,
                batch_size=args.batch_size,
                max_length=args.max_length,
                dtype=args.dtype,
                chunk_size=args.chunk_size,
            )
            out = root / f"store-{keep}"
            started = time.perf_counter()
            result = precompute_soft_targets(spec, data, out, config, device=device, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            total = time.perf_counter() - started
            size = sum(path.stat().st_size for path in out.glob("part-*.parquet"))
            print(f"keep_teacher_logits={keep!s:5}: {args.num_examples / total:9.1f} examples/s end to end, "
                  f"{result.computed_examples / result.teacher_seconds:9.1f} examples/s in teacher passes, "
                  f"{size / args.num_examples:7.1f} bytes/example ({size / 1e6:.2f} MB)")  # fmt: skip

        ensemble = TeacherEnsemble(teachers[:1], "fp32", torch.device("cpu"), args.max_length, args.batch_size)
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        lengths = ensemble.encode([r["a"] for r in rows], [r["b"] for r in rows]).lengths.tolist()
        print(f"padding tokens per batch: {padding_share(lengths, args.batch_size, True):.1%} with length buckets, "
              f"{padding_share(lengths, args.batch_size, False):.1%} in input order "
              f"(mean length {np.mean(lengths):.1f} pieces)")  # fmt: skip


if __name__ == "__main__":
    main()
