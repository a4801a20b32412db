"""What each ZeRO stage, and each ZeRO-2 setting, adds to one rank's training step, against ZeRO-0.

    python bench/zero_overhead.py                                  # 4L-312 student, 1 x 8 tokens, CPU
    python bench/zero_overhead.py --student 6L-768
    python bench/zero_overhead.py --student 3L-192 --batch-size 16 --seq-len 128   # the quickstart's shape
    python bench/zero_overhead.py --device cuda --batch-size 128 --seq-len 128     # one GPU

Every variant is bench/general.py's dist_kd step (``build_dist_kd_step``: the library's Teacher, the student
and its projections in a DeepSpeed engine, ``engine.backward`` and ``engine.step``) on the same batches,
with only the DeepSpeed JSON changed: ZeRO-0, ZeRO-1 and ZeRO-2 as shipped (``ds_configs/``), and ZeRO-2
with ``contiguous_gradients`` and/or ``overlap_comm`` off. The variants' timed steps are interleaved in one
process (``time_interleaved``), so the ratios to ZeRO-0 hold on a busy machine.

With the default tiny micro-batch (1 x 8 tokens) and a tiny teacher, the models' arithmetic is small and
what is left is each stage's own work per step: its gradient hooks, the copies into its gradient buckets,
the flat fp32 partition and the copy back into the weights, its norm and overflow checks. On a GPU those
are kernel launches and host syncs, the part of a 128 x 128 step that ZeRO-2 adds on one GPU
(docs/performance.md); this measures them on any machine. With one rank ZeRO shards nothing, so all of it
is overhead. Prints a table (and ``--output`` JSON); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import general as bench  # noqa: E402
from gpu_suite import batches_for, zero2_variant  # noqa: E402

from dist_kd import distributed  # noqa: E402
from dist_kd.layer_map import layer_map  # noqa: E402
from dist_kd.models.student import StudentConfig  # noqa: E402
from dist_kd.objective import LossWeights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STUDENTS = {  # name -> (layers, hidden, heads, FFN)
    "2L-24": (2, 24, 12, 48),  # --smoke
    "3L-192": (3, 192, 12, 768),
    "4L-312": (4, 312, 12, 1200),
    "6L-768": (6, 768, 12, 3072),
}
ZERO2_SETTINGS = {  # row -> zero_optimization keys over ds_configs/zero2.json
    "ZeRO-2, contiguous_gradients off": {"contiguous_gradients": False},
    "ZeRO-2, overlap_comm off": {"overlap_comm": False},
    "ZeRO-2, both off": {"contiguous_gradients": False, "overlap_comm": False},
}


def variants(directory: Path) -> dict[str, Path]:
    """Row name -> DeepSpeed JSON: the shipped stages 0-2, and ZeRO-2 with the settings above (written here)."""
    out = {
        f"ZeRO-{stage} (ds_configs/zero{stage}.json)": REPO / "ds_configs" / f"zero{stage}.json" for stage in (0, 1, 2)
    }
    for index, (name, keys) in enumerate(ZERO2_SETTINGS.items()):
        out[name] = zero2_variant(directory / f"zero2-{index}.json", **keys)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", choices=sorted(STUDENTS), default="4L-312")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--bf16-mode", default="autocast", choices=("autocast", "deepspeed", "auto"),
                        help="train.bf16_mode of a bf16 student (a GPU's), the same for every row so that the "
                        "rows differ in ZeRO alone (auto would pick autocast at ZeRO-0 and DeepSpeed's bf16 "
                        "optimizer at ZeRO 1-2)")  # fmt: skip
    parser.add_argument("--output", help="also write the rows to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a 2-layer, 24-wide student and 2 steps (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.student, args.steps, args.warmup = "2L-24", 2, 1
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    layers, hidden, heads, ffn = STUDENTS[args.student]
    student = StudentConfig(num_layers=layers, hidden_size=hidden, num_heads=heads, intermediate_size=ffn)
    weights = LossWeights(embd=1.0, hidden=1.0, attn=1.0, pred=0.0)
    with tempfile.TemporaryDirectory() as scratch:
        from transformers import AutoTokenizer

        from dist_kd.testing import build_tiny_bert

        # A teacher as small as the student's heads allow: the step's arithmetic is the student's.
        teacher = build_tiny_bert(Path(scratch) / "teacher", seed=0, num_layers=layers, hidden_size=2 * heads,
                                  num_heads=heads, intermediate_size=4 * heads,
                                  max_position_embeddings=max(512, args.seq_len))  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(teacher)
        info = distributed.init_distributed(force_cpu=args.device == "cpu")
        try:
            batches = batches_for(tokenizer, len(tokenizer), args.seq_len, args.batch_size, args.steps, seed=0)
            steps, built = [], []
            for name, config in variants(Path(scratch)).items():
                torch.manual_seed(0)
                step, figures = bench.build_dist_kd_step(teacher, student, layer_map(layers, layers, "uniform"),
                                                         weights, "fp16", str(config), args.batch_size, info,
                                                         seq_len=args.seq_len, bf16_mode=args.bf16_mode)  # fmt: skip
                steps.append((name, step, batches))
                built.append(figures)
            rows = bench.time_interleaved(steps, args.warmup, info.device)
            for figures in built:
                figures["release"]()
        finally:
            distributed.teardown()
    base = statistics.median(rows[0].step_seconds)
    report = {
        "student": args.student,
        "micro_batch": args.batch_size,
        "seq_len": args.seq_len,
        "device": str(info.device),
        "threads": torch.get_num_threads(),
        "rows": [],
    }
    print(f"{args.student} student, {args.batch_size} x {args.seq_len}, {info.device}, {torch.get_num_threads()} "
          f"threads; median of {args.steps} interleaved steps")  # fmt: skip
    print("| variant | student | ms/step | / ZeRO-0 | added ms |\n| --- | --- | --- | --- | --- |")
    for row, figures in zip(rows, built, strict=True):
        median = statistics.median(row.step_seconds)
        engine = {"zero_stage": figures["zero_stage"], **figures["zero_settings"], "precision": figures["precision"]}
        report["rows"].append({"variant": row.name, "ms_per_step": 1000 * median, "ratio": median / base} | engine)
        print(f"| {row.name} | {figures['precision']} | {1000 * median:.2f} | {median / base:.2f}x | "
              f"{1000 * (median - base):+.2f} |")  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
