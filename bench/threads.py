"""On a small CPU: one training job on every core, or two jobs side by side with half the cores each?

    python bench/threads.py                 # the example's models (launch/example.sh), 2 cores
    python bench/threads.py --base PATH --steps 8

The rows are bench/dropout.py's training steps (forward, cross-entropy, backward, AdamW; dist_kd's dropout):
the example's 3 x 192 student at 32 x 128 and 32 x 40, and fine-tuning ``--base`` (a MiniLM teacher, or a
teacher-size student) at 16 x 128 and 16 x 32. For each row it prints the median step time with 1 thread and
with 2 threads (alternating step by step in one process), then the 1-thread time while a second process runs
the same steps at once (the two contend for caches and memory bandwidth), and the throughput of two such jobs
against one 2-thread job: above 1.0x, running two jobs side by side finishes a set of runs sooner.
launch/example.sh runs its small students two at a time on these figures. Prints only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dropout import classifier, default_base, small_student, step_fn  # noqa: E402

ROWS = [("3x192 student", 32, 128), ("3x192 student", 32, 40), ("fine-tuning the base", 16, 128),
        ("fine-tuning the base", 16, 32)]  # fmt: skip


def build(base: str, name: str) -> tuple[torch.nn.Module, bool]:
    return (small_student(base), True) if name.startswith("3x192") else (classifier(base), False)


def median_ms(step, steps: int, thread_counts: tuple[int, ...]) -> dict[int, float]:
    """Median ms per step for each thread count, alternating the counts step by step (two warm-up rounds)."""
    times: dict[int, list[float]] = {threads: [] for threads in thread_counts}
    for index in range(steps + 2):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            step()
            if index >= 2:
                times[threads].append(time.perf_counter() - start)
    return {threads: float(np.median(values)) * 1e3 for threads, values in times.items()}


def one_thread(base: str, steps: int, vocab_size: int) -> list[float]:
    """Every row's median ms on 1 thread (what each of two side-by-side processes runs)."""
    out = []
    for name, batch, seq_len in ROWS:
        model, multitask = build(base, name)
        out.append(median_ms(step_fn(model, batch, seq_len, multitask, vocab_size), steps, (1,))[1])
        print(f"row {len(out) - 1} {out[-1]:.1f}", flush=True)
    return out


def side_by_side(base: str, steps: int) -> list[list[float]]:
    """Two processes running :func:`one_thread` at once; each one's row times."""
    cmd = [sys.executable, __file__, "--base", base, "--steps", str(steps), "--worker"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"a side-by-side worker failed (exit code {proc.returncode})")
        results.append([float(line.split()[2]) for line in out.splitlines() if line.startswith("row ")])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="teacher checkpoint (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row and mode")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = args.base or default_base()
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(base).vocab_size
    if args.worker:
        one_thread(base, args.steps, vocab_size)
        return
    alone = []
    for name, batch, seq_len in ROWS:
        model, multitask = build(base, name)
        alone.append(median_ms(step_fn(model, batch, seq_len, multitask, vocab_size), args.steps, (1, 2)))
    pair = side_by_side(base, args.steps)
    print(f"median ms per step, {args.steps} steps per mode")
    print("| model, batch | 1 thread | 2 threads | 2 / 1 thread | 1 thread, 2 side by side | two jobs / one |")
    print("| --- | --- | --- | --- | --- | --- |")
    for index, (name, batch, seq_len) in enumerate(ROWS):
        one, two = alone[index][1], alone[index][2]
        beside = [times[index] for times in pair]
        # Two side-by-side jobs make 2 steps per max(beside); one 2-thread job makes 1 step per `two`.
        gain = 2 * two / max(beside)
        print(f"| {name}, {batch} x {seq_len} | {one:.0f} | {two:.0f} | {one / two:.2f}x | "
              f"{min(beside):.0f}-{max(beside):.0f} | {gain:.2f}x |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
