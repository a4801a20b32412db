"""The masked state losses, forward + backward: the library's contraction against masking by multiplication.

    python bench/losses.py                              # 16 x 12 heads x 128 x 128 scores, a few padded rows
    python bench/losses.py --batch 32 --seq-len 512 --device cuda

``attention_mse`` with a mask sums ``m_bi m_bj (S - T)^2`` as one ``einsum`` contraction; the plain way builds
the (B, 1, L, L) pair mask and multiplies. With no mask (a packed batch) the library takes a plain mean.
Each variant's steps are interleaved and timed one by one (median); the values agree (printed). Prints only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dist_kd.losses import attention_mse


def by_multiplication(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    pair = (m[:, :, None] * m[:, None, :])[:, None]
    return ((student.float() - teacher.float()).square() * pair).sum() / (pair.sum() * student.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--padded-rows", type=int, default=4, help="rows whose last quarter is padding")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():  # an assertion deep in torch otherwise
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    torch.manual_seed(0)
    device = torch.device(args.device)
    shape = (args.batch, args.heads, args.seq_len, args.seq_len)
    student = torch.randn(shape, device=device, requires_grad=True)
    teacher = torch.randn(shape, device=device)
    mask = torch.ones(args.batch, args.seq_len, device=device)
    mask[: args.padded_rows, -args.seq_len // 4 :] = 0
    variants = {
        "multiplication (pair mask)": lambda: by_multiplication(student, teacher, mask),
        "dist_kd (contraction)": lambda: attention_mse(student, teacher, mask),
        "dist_kd, no mask (packed)": lambda: attention_mse(student, teacher, None),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    values = {}
    for step in range(args.steps + 3):
        for name, loss in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            value = loss()
            value.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 3:
                seconds[name].append(time.perf_counter() - started)
            values[name] = float(value.detach())
            student.grad = None
    base = float(np.median(seconds["multiplication (pair mask)"]))
    print(f"scores {shape} on {device}, {torch.get_num_threads()} threads, {args.padded_rows} padded rows")
    for name, times in seconds.items():
        median = float(np.median(times))
        print(f"{name:<30}{1000 * median:>9.2f} ms  {base / median:>5.2f}x  loss {values[name]:.6f}")


if __name__ == "__main__":
    main()
