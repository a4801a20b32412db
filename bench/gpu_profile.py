"""Where the time of dist_kd's general-distillation step goes on a GPU: each phase timed on its own, then a
torch.profiler trace of whole steps.

    python bench/gpu_profile.py --output OUT            # on a CUDA machine (bench/gpu_suite.sh's set-up), ~2 min
    python bench/gpu_profile.py --output OUT --smoke    # tiny shapes on the CPU (a dry run)

The suite (bench/gpu_suite.py) measures whole steps; this splits one: the teacher's forward, the student's
forward, the loss, the backward and the optimizer step, each between two device synchronisations (so their
sum exceeds a step's time by the overlap that synchronising removes), for the suite's BERT-base teacher and
4L-312 / 6L-768 students at seq 128, ZeRO-0 with an fp16 teacher (the suite's first rows), the bf16 student
under each ``train.bf16_mode`` (autocast, the default at ZeRO-0, and DeepSpeed's bf16 optimizer) and, with
autocast, under ``train.compile`` (its warm-up steps compile). Then a profiler
trace of a few steps of the default gives the operators with the most device time and the most host time. Writes
OUT/gpu_profile.json and OUT/gpu_profile.md; prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import general as bench  # noqa: E402
import gpu_suite  # noqa: E402

from dist_kd import distributed  # noqa: E402
from dist_kd.layer_map import layer_map  # noqa: E402
from dist_kd.models.student import StudentConfig  # noqa: E402
from dist_kd.objective import LossWeights, tinybert_objective  # noqa: E402
from dist_kd.train.engine import autocast_of  # noqa: E402
from dist_kd.train.general import device_mask  # noqa: E402

PHASES = ("teacher forward", "student forward", "loss", "backward", "optimizer step")
# (train.bf16_mode, train.compile): each phase timed under each (ZeRO-0's auto is autocast); the first is traced
MODES = (("autocast", False), ("deepspeed", False), ("autocast", True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def phase_times(parts: dict, batches: list[dict], warmup: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each phase over ``batches`` (after ``warmup`` whole steps)."""
    teacher, engine, mapping, weights = parts["teacher"], parts["engine"], parts["mapping"], parts["weights"]
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    for index, batch in enumerate(batches):
        clock = {}
        _sync(device)
        began = time.perf_counter()
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        mask = device_mask(batch["attention_mask"], device)
        teacher_features = teacher.features(input_ids, mask)
        _sync(device)
        clock["teacher forward"] = time.perf_counter()
        student_features = engine(input_ids, mask)
        _sync(device)
        clock["student forward"] = time.perf_counter()
        with autocast_of(engine):  # as GeneralTrainer.train_step
            terms = tinybert_objective(student_features, teacher_features, mapping, mask, weights,
                                       engine.module.projections)  # fmt: skip
        _sync(device)
        clock["loss"] = time.perf_counter()
        engine.backward(terms["loss"])
        _sync(device)
        clock["backward"] = time.perf_counter()
        engine.step()
        _sync(device)
        clock["optimizer step"] = time.perf_counter()
        if index >= warmup:
            previous = began
            for name in PHASES:
                times[name].append((clock[name] - previous) * 1000)
                previous = clock[name]
    return {name: statistics.median(values) for name, values in times.items()}  # 10 steps: the mean of the middle two


def build_parts(
    teacher_path: Path,
    student_cfg: StudentConfig,
    mapping: list[int],
    batch: int,
    info,
    bf16_mode: str = "autocast",
    compiled: bool = False,
) -> dict:
    """The objects of bench/general.py's dist_kd step (ZeRO-0, fp16 teacher), kept apart to time each phase;
    ``bf16_mode`` is ``train.bf16_mode`` (for the GPU's bf16 student), ``compiled`` ``train.compile``."""
    from transformers import AutoConfig

    from dist_kd.models.student import build_projections, build_student
    from dist_kd.models.teacher import Teacher
    from dist_kd.train.engine import TrainConfig, build_ds_config, build_engine, compile_models, resolve_precision

    teacher_config = AutoConfig.from_pretrained(teacher_path)
    teacher = Teacher(teacher_path, dtype="fp16", device=info.device, score_layers=mapping, max_layer=max(mapping))
    student = build_student(student_cfg, teacher_config)
    projections = build_projections(student.config.hidden_size, teacher.hidden_size, student.config.num_hidden_layers)
    train_cfg = TrainConfig(max_steps=bench.SCHEDULE_STEPS, bf16_mode=bf16_mode, compile=compiled)
    precision = resolve_precision(train_cfg.precision, info.device)
    zero = str(gpu_suite.REPO / "ds_configs" / "zero0.json")
    ds_config = build_ds_config(zero, batch, 1, info.world_size, precision, train_cfg.clip, bf16_mode)
    compile_models([student, teacher.model], train_cfg, ds_config)  # as GeneralTrainer does
    engine = build_engine(bench.DistillStudent(student, projections), train_cfg, ds_config)
    weights = LossWeights(embd=1.0, hidden=1.0, attn=1.0, pred=0.0)
    return {"teacher": teacher, "engine": engine, "mapping": mapping, "weights": weights}


def profile_steps(parts: dict, batches: list[dict], device: torch.device, top: int) -> dict[str, list[dict]]:
    """The ``top`` operators by device (self) time and by host (self) time over ``batches`` whole steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    teacher, engine, mapping, weights = parts["teacher"], parts["engine"], parts["mapping"], parts["weights"]
    with profile(activities=activities) as trace:
        for batch in batches:
            input_ids = batch["input_ids"].to(device, non_blocking=True)
            mask = device_mask(batch["attention_mask"], device)
            teacher_features = teacher.features(input_ids, mask)
            student_features = engine(input_ids, mask)
            with autocast_of(engine):
                terms = tinybert_objective(student_features, teacher_features, mapping, mask, weights,
                                           engine.module.projections)  # fmt: skip
            engine.backward(terms["loss"])
            engine.step()
        _sync(device)
    events = trace.key_averages()
    steps = len(batches)

    def rows(key: str) -> list[dict]:
        ordered = sorted(events, key=lambda event: getattr(event, key, 0.0), reverse=True)[:top]
        return [{"op": event.key, "calls_per_step": event.count / steps,
                 "device_ms_per_step": getattr(event, "self_device_time_total", 0.0) / 1000 / steps,
                 "host_ms_per_step": event.self_cpu_time_total / 1000 / steps} for event in ordered]  # fmt: skip

    return {"by_device_time": rows("self_device_time_total") if device.type == "cuda" else [],
            "by_host_time": rows("self_cpu_time_total")}  # fmt: skip


def markdown(report: dict) -> str:
    lines = [f"# dist_kd's step, phase by phase: {report['device']}", "", f"torch {report['torch']}; "
             "each phase between two device synchronisations (median ms per step)", "",
             "| student | seq | micro-batch | train.bf16_mode (weights), train.compile | " + " | ".join(PHASES)
             + " | sum | tokens/s at the sum |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in PHASES) + " | --- | --- |"]  # fmt: skip
    for row in report["rows"]:
        total = sum(row["phases_ms"].values())
        cells = " | ".join(f"{row['phases_ms'][name]:.1f}" for name in PHASES)
        tokens = row["seq_len"] * row["micro_batch"] / (total / 1000)
        mode = f"{row.get('bf16_mode', 'deepspeed')} ({row.get('weights', '?')})"
        mode += ", compiled" if row.get("compiled") else ""
        lines.append(f"| {row['student']} | {row['seq_len']} | {row['micro_batch']} | {mode} | {cells} | "
                     f"{total:.1f} | {tokens:,.0f} |")  # fmt: skip
    for row in report["rows"]:
        for key in ("by_device_time", "by_host_time"):
            if not row["profile"] or not row["profile"][key]:
                continue
            lines += ["", f"## {row['student']}: operators {key.replace('_', ' ')} (per step)", "",
                      "| op | calls | device ms | host ms |", "| --- | --- | --- | --- |"]  # fmt: skip
            lines += [f"| {op['op'][:60]} | {op['calls_per_step']:.0f} | {op['device_ms_per_step']:.2f} | "
                      f"{op['host_ms_per_step']:.2f} |" for op in row["profile"][key]]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory for gpu_profile.json and gpu_profile.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the same code paths")
    parser.add_argument("--top", type=int, default=15, help="operators listed per table")
    args = parser.parse_args(argv)
    if not gpu_suite.set_up_process(args.smoke, "the profile"):
        return 2
    plan = gpu_suite.SMOKE if args.smoke else gpu_suite.FULL
    seq_len, batch = plan.lengths[0]
    steps, warmup = (3, 1) if args.smoke else (15, 5)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
                    "rows": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        from transformers import AutoTokenizer

        from dist_kd.testing import build_tiny_bert, tiny_vocab

        vocab = plan.vocab or len(tiny_vocab())
        teacher_path = build_tiny_bert(Path(scratch) / "teacher", seed=0, num_layers=plan.teacher.layers,
                                       hidden_size=plan.teacher.hidden, num_heads=plan.teacher.heads,
                                       intermediate_size=plan.teacher.ffn, vocab_size=vocab,
                                       max_position_embeddings=512)  # fmt: skip
        info = distributed.init_distributed(force_cpu=args.smoke)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        try:
            tokenizer = AutoTokenizer.from_pretrained(teacher_path)
            data = gpu_suite.batches_for(tokenizer, vocab, seq_len, batch, steps, seed=0)
            for shape in plan.students:
                student_cfg = StudentConfig(num_layers=shape.layers, hidden_size=shape.hidden,
                                            num_heads=shape.heads, intermediate_size=shape.ffn)  # fmt: skip
                mapping = layer_map(plan.teacher.layers, shape.layers, "uniform")
                for mode, compiled in MODES:  # the default first; the trace of the default only
                    torch.manual_seed(0)
                    parts = build_parts(teacher_path, student_cfg, mapping, batch, info, mode, compiled)
                    try:
                        phases = phase_times(parts, data, warmup, info.device)  # the warm-up steps compile
                        traced = (mode, compiled) == MODES[0]
                        profiled = profile_steps(parts, data[:3], info.device, args.top) if traced else None
                        precision = parts["engine"].module.student.dtype
                    finally:
                        bench.release_engine(parts["engine"])
                    report["rows"].append({"student": shape.name, "seq_len": seq_len, "micro_batch": batch,
                                           "bf16_mode": mode, "compiled": compiled,
                                           "weights": str(precision).removeprefix("torch."),
                                           "phases_ms": phases, "profile": profiled})  # fmt: skip
                    (output / "gpu_profile.json").write_text(json.dumps(report, indent=1))
        finally:
            distributed.teardown()
    text = markdown(report)
    (output / "gpu_profile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
