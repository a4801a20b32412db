"""The scaling model of docs/performance.md: general distillation at 8, 64 and 512 GPUs.

    python bench/scaling.py                                   # the limits, with per-GPU tokens/s left open
    python bench/scaling.py --suite OUT/gpu_suite.json        # and the throughput, from a GPU suite's figures
    python bench/scaling.py --loader-sequences-per-s 2400 --workers 6 --nvlink-gb-s 360 --network-gb-s 45

Per optimizer step, data parallel (ZeRO 0-2: every rank holds the whole student), each rank:

- computes ``micro_batch x seq_len x grad_accum`` tokens at the per-GPU rate T1 (measured by the suite, one
  GPU, no communication);
- sends and receives ``2 (N - 1) / N x G`` bytes for the gradients, G = parameters x bytes per gradient
  (a ring all-reduce; ZeRO-2's reduce-scatter plus its all-gather of the updated parameters move the same);
- is fed by ``workers`` DataLoader processes, each reading ``--loader-sequences-per-s`` (bench/corpus.py).

Inside one node the ring runs over NVLink (``--nvlink-gb-s``, bus bandwidth per GPU); across nodes its
slowest link is each GPU's share of the network (``--network-gb-s``). The step takes between
``max(compute, all-reduce)`` (all-reduce fully overlapped with the backward, as DeepSpeed buckets it) and
their sum (no overlap). From these follow, per student:

- the bytes each GPU all-reduces per optimizer step (exact, from the parameter count);
- the per-GPU tokens/s above which the all-reduce, or the data loader, becomes the limit (a threshold, not a
  measurement);
- with a suite's measured T1: tokens/s at each scale and the time for TinyBERT's general-distillation budget
  (about 2.25 B tokens), as a range between full overlap and none.

Bandwidths are inputs (defaults: the spec sheets' H100 SXM NVLink 450 GB/s at 80 % bus efficiency, and one
400 Gb/s NIC per GPU at 90 %); change them to your cluster's measured ``nccl-tests`` bus bandwidth. Prints
only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

STUDENTS = {  # name: (layers, hidden, heads, ffn), the suite's shapes
    "4L-312": (4, 312, 12, 1200),
    "6L-768": (6, 768, 12, 3072),
}
TEACHER_HIDDEN = 768  # BERT-base: the width W_e/W_h project to
VOCAB = 30522
TINYBERT_TOKENS = 2.25e9
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Link:
    nvlink_bytes_s: float
    network_bytes_s: float

    def bus_bytes_s(self, gpus: int) -> float:
        """The ring's slowest per-GPU bandwidth: NVLink inside a node, the network across nodes."""
        return self.nvlink_bytes_s if gpus <= GPUS_PER_NODE else self.network_bytes_s


def student_parameters(layers: int, hidden: int, heads: int, ffn: int, vocab: int = VOCAB) -> int:
    """Trainable parameters of the BERT-shaped student (no pooler) plus the projections W_e, W_h (one per
    layer and the embeddings, teacher width 768), counted from a model built on the meta device."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn)  # fmt: skip
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    encoder = sum(p.numel() for p in model.parameters())
    projections = 0 if hidden == TEACHER_HIDDEN else (layers + 1) * (hidden * TEACHER_HIDDEN + TEACHER_HIDDEN)
    return encoder + projections


def allreduce_bytes(parameters: int, gpus: int, bytes_per_gradient: int) -> float:
    """Bytes each rank sends (and receives) per optimizer step in a ring all-reduce of the gradients."""
    return 2 * (gpus - 1) / gpus * parameters * bytes_per_gradient


def suite_rates(path: Path, seq_len: int, micro_batch: int) -> dict[str, float]:
    """Per-student tokens/s of the suite's fastest dist_kd row at ``seq_len`` and ``micro_batch`` (the step
    the all-reduce is set against)."""
    report = json.loads(path.read_text())
    rates: dict[str, float] = {}
    for row in report["rows"]:
        same_step = row["seq_len"] == seq_len and row["micro_batch"] == micro_batch
        if same_step and row["row"].startswith("dist_kd") and row["tokens_per_s"]:
            rates[row["student"]] = max(rates.get(row["student"], 0.0), row["tokens_per_s"])
    return rates


def hours(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", type=Path, help="gpu_suite.json of bench/gpu_suite.sh: the measured T1")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=128, help="sequences per rank per micro-step")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    parser.add_argument("--bytes-per-gradient", type=int, default=2, help="2: bf16/fp16 gradients; 4: fp32")
    parser.add_argument("--nvlink-gb-s", type=float, default=450 * 0.8, help="NVLink bus bandwidth per GPU")
    parser.add_argument(
        "--network-gb-s", type=float, default=400 / 8 * 0.9,
        help="network bandwidth per GPU (default: one 400 Gb/s NIC for the ring, the pessimistic end)",
    )  # fmt: skip
    parser.add_argument(
        "--loader-sequences-per-s", type=float, default=None, help="one DataLoader worker's rate (bench/corpus.py)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per GPU (data.num_workers)")
    args = parser.parse_args(argv)
    if args.suite is not None and not args.suite.is_file():
        parser.error(f"--suite {args.suite} does not exist (bash bench/gpu_suite.sh OUT writes OUT/gpu_suite.json)")

    link = Link(args.nvlink_gb_s * 1e9, args.network_gb_s * 1e9)
    tokens_per_step = args.micro_batch * args.seq_len * args.grad_accum
    rates = suite_rates(args.suite, args.seq_len, args.micro_batch) if args.suite else {}
    print(f"seq {args.seq_len}, {args.micro_batch} sequences per rank per micro-step, grad_accum {args.grad_accum}: "
          f"{tokens_per_step:,} tokens per rank per optimizer step; gradients {args.bytes_per_gradient} bytes; "
          f"NVLink {args.nvlink_gb_s:.0f} GB/s (<= {GPUS_PER_NODE} GPUs), network {args.network_gb_s:.0f} GB/s "
          "per GPU")  # fmt: skip
    loader_limit = float("inf")
    if args.loader_sequences_per_s:
        loader_limit = args.loader_sequences_per_s * args.workers * args.seq_len
        print(f"data loader: {args.workers} workers x {args.loader_sequences_per_s:,.0f} sequences/s = "
              f"{loader_limit:,.0f} tokens/s per GPU before it becomes the limit (at any scale: each rank has "
              "its own workers)")  # fmt: skip
    for name, shape in STUDENTS.items():
        parameters = student_parameters(*shape)
        print(f"\n{name}: {parameters / 1e6:.1f} M trainable parameters (student + projections)")
        rate = rates.get(name)
        print("| GPUs | all-reduce per step | its time | network-bound above | tokens/s (overlap .. none) | "
              "2.25 B tokens |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |")
        for gpus in args.gpus:
            sent = allreduce_bytes(parameters, gpus, args.bytes_per_gradient)
            comm_s = sent / link.bus_bytes_s(gpus)
            threshold = tokens_per_step / comm_s if comm_s else float("inf")
            if rate:
                # The workers prefetch while the GPU computes: a rank runs at the slower of the two.
                compute_s = tokens_per_step / min(rate, loader_limit)
                best = gpus * tokens_per_step / max(compute_s, comm_s)
                worst = gpus * tokens_per_step / (compute_s + comm_s)
                throughput = f"{best / 1e6:.1f} M .. {worst / 1e6:.1f} M"
                if loader_limit < rate:
                    throughput += " (loader-bound)"
                budget = f"{hours(TINYBERT_TOKENS / best)} .. {hours(TINYBERT_TOKENS / worst)}"
            else:
                throughput = budget = "not measured (needs the suite's T1)"
            print(f"| {gpus} | {sent / 1e6:.0f} MB | {comm_s * 1e3:.2f} ms | {threshold / 1e6:.2f} M tokens/s per GPU "
                  f"| {throughput} | {budget} |")  # fmt: skip
    if not rates and args.suite:
        shapes = ", ".join(STUDENTS)
        print(
            f"\nper-GPU tokens/s: {args.suite} has no dist_kd row of {shapes} at seq {args.seq_len} x micro-batch "
            f"{args.micro_batch}: give the --seq-len and --micro-batch of its rows (a --smoke suite has these "
            "students only with --full-shapes)"
        )
    elif not rates:
        print("\nper-GPU tokens/s: not measured here; run bash bench/gpu_suite.sh OUT on a GPU and pass --suite "
              "OUT/gpu_suite.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
