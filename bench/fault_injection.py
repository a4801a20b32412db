"""Fault injection: kill general distillation at random moments, rerun until it finishes, compare with an
uninterrupted run.

Each trial starts a fresh run directory and repeats: start the run, wait until metrics.jsonl reaches a
random step (or a random moment), send SIGKILL or SIGTERM to the whole job, until a rerun finishes. The
finished run must equal the uninterrupted one: every step logged once, the same loss terms, lr and tokens,
and the same student weights. Kills land anywhere, also during checkpoint saves (save_every is small).

    python bench/fault_injection.py --trials 20                 # 1 process (debug mode)
    python bench/fault_injection.py --trials 10 --ranks 2       # deepspeed launcher, 2 CPU ranks, ZeRO-2

Prints one line per trial and a summary; exits 1 if any trial differs. A tiny teacher and corpus are built
in a temporary directory (dist_kd.testing), so the figures measure the machinery, not a model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 40
TERMS = ("loss", "loss_embd", "loss_hidden", "loss_attn", "lr")


def build_inputs(root: Path) -> tuple[Path, Path]:
    """A tiny teacher and a corpus of random sentences in its tokenizer."""
    sys.path.insert(0, str(REPO))
    from dist_kd.data.corpus import prepare_corpus
    from dist_kd.testing import build_tiny_bert, random_sentences

    teacher = build_tiny_bert(root / "teacher", seed=0)
    (root / "text.txt").write_text("\n\n".join(random_sentences(600, seed=3)))
    prepare_corpus([root / "text.txt"], teacher, root / "shards", seq_len=32, shard_size=64, num_workers=0,
                   progress=False)  # fmt: skip
    return teacher, root / "shards"


def command(teacher: Path, shards: Path, out: Path, ranks: int, port: int) -> list[str]:
    config = [
        "--config", "launch/configs/quickstart.yaml", f"teacher.path={teacher}", f"data.shards={shards}",
        f"run.output_dir={out}", "student.num_layers=2", "student.hidden_size=16", "student.num_heads=4",
        "student.intermediate_size=32", "student.dropout=0.1", "data.micro_batch_size=4", "train.lr=3e-3",
        f"train.max_steps={STEPS}", "run.log_every=1", "run.save_every=3", "run.keep_last=2", "eval.texts=null",
        "run.progress=false",
    ]  # fmt: skip
    if ranks == 1:
        return [sys.executable, "launch/general.py", "--debug", *config]
    return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), "launch/general.py", *config,
            "deepspeed.config=ds_configs/zero2.json", "data.num_workers=1"]  # fmt: skip


def environment() -> dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1")  # fmt: skip


def run_once(cmd: list[str], metrics: Path, kill_at: int | None, sig: int, timeout: float) -> tuple[int, bool]:
    """Run ``cmd``; with ``kill_at``, signal its process group once metrics.jsonl has that many lines.

    Returns:
        (exit code, whether the signal was sent).
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    sent = False
    deadline = time.time() + timeout
    while kill_at is not None and proc.poll() is None and time.time() < deadline:
        try:
            lines = len(metrics.read_text().splitlines())
        except FileNotFoundError:
            lines = 0
        if lines >= kill_at:
            time.sleep(random.uniform(0, 0.3))  # anywhere in the step: mid-save included
            try:
                os.killpg(proc.pid, sig)
                sent = True
            except ProcessLookupError:
                pass
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=timeout)
    with_group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in with_group:
        os.kill(int(pid), signal.SIGKILL)
    if proc.returncode != 0 and not sent:
        print(stderr[-3000:], file=sys.stderr)  # failed by itself: show why
    return proc.returncode, sent


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compare(expected: Path, got: Path) -> tuple[bool, float, str]:
    """(equal, largest relative difference of a logged term, what differs)."""
    from safetensors.torch import load_file

    a, b = records(expected), records(got)
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return False, float("inf"), f"steps {[r['step'] for r in b][:8]}... vs {[r['step'] for r in a][:8]}..."
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x["tokens_seen"] != y["tokens_seen"]:
            return False, float("inf"), f"tokens_seen at step {x['step']}"
        for key in TERMS:
            worst = max(worst, abs(x[key] - y[key]) / max(abs(x[key]), 1e-12))
    left, right = (
        load_file(expected / "student" / "model.safetensors"),
        load_file(got / "student" / "model.safetensors"),
    )
    weights = max(float((left[k] - right[k]).abs().max()) for k in left)
    equal = worst <= 1e-6 and weights <= 1e-6
    return equal, worst, f"largest weight difference {weights:.2e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=1, choices=[1, 2])
    parser.add_argument("--kills", type=int, default=2, help="most kills per trial (each trial draws 1..kills)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    root = Path(args.work or tempfile.mkdtemp(prefix="dist_kd_faults_"))
    root.mkdir(parents=True, exist_ok=True)
    teacher, shards = build_inputs(root)
    port = 29700 + random.randrange(200)
    started = time.time()
    baseline = root / "straight"
    code, _ = run_once(command(teacher, shards, baseline, args.ranks, port), baseline / "metrics.jsonl", None, 0,
                       args.timeout)  # fmt: skip
    if code != 0:
        print(f"the uninterrupted run failed (exit {code})")
        return 1
    per_run = time.time() - started
    print(f"uninterrupted run: {STEPS} steps on {args.ranks} rank(s) in {per_run:.0f} s")
    failures, total_kills = 0, 0
    for trial in range(args.trials):
        out = root / f"trial-{trial:03d}"
        cmd = command(teacher, shards, out, args.ranks, port + 1 + trial % 50)
        plan = []
        for _ in range(random.randint(1, args.kills)):
            plan.append((random.randint(1, STEPS - 1), random.choice([signal.SIGKILL, signal.SIGTERM])))
        log = []
        for kill_at, sig in plan:
            if (out / "student" / "config.json").exists():
                break
            code, sent = run_once(cmd, out / "metrics.jsonl", kill_at, sig, args.timeout)
            total_kills += sent
            log.append(f"{signal.Signals(sig).name}@{kill_at}{'' if sent else '(finished first)'}")
        reruns = 0
        while not (out / "student" / "config.json").exists() and reruns < 3:
            code, _ = run_once(cmd, out / "metrics.jsonl", None, 0, args.timeout)
            reruns += 1
        if not (out / "student" / "config.json").exists():
            failures += 1
            print(f"trial {trial}: {' '.join(log)}: did not finish (exit {code})")
            continue
        equal, worst, detail = compare(baseline, out)
        failures += not equal
        print(f"trial {trial}: {' '.join(log)}: {'identical' if equal else 'DIFFERENT'} "
              f"(largest relative loss/lr difference {worst:.1e}, {detail})")  # fmt: skip
    print(f"{args.trials - failures}/{args.trials} trials identical to the uninterrupted run after {total_kills} "
          f"kills ({args.ranks} rank(s), {(time.time() - started) / 60:.1f} min)")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
