"""Worker: the same student, batches and steps on a ZeRO-0 engine in each precision mode, from the same weights.

Modes: ``fp32``; ``fp32-deepspeed-clip`` (fp32 with DeepSpeed's own per-tensor gradient clipping, which
build_engine replaces by torch's clip_grad_norm_); ``bf16-autocast`` (train.bf16_mode=autocast, the default);
``bf16-deepspeed`` (DeepSpeed's bf16 optimizer). Rank 0 writes OUT/modes.json: per mode the losses of every
step (and for fp32 the gradient norms before clipping), the module's parameter dtypes, the dtype of the
captured attention scores, the optimizer's class, the step counts its AdamW held before training and whether
build_engine replaced DeepSpeed's clipping; and
each rank its exported (fp32) weights to OUT/<mode>-rank<r>.pt.
"""

import json
import sys
from pathlib import Path

import torch

from dist_kd import distributed
from dist_kd.layer_map import layer_map
from dist_kd.models.student import DistillStudent, StudentConfig, build_projections, build_student
from dist_kd.models.teacher import Teacher
from dist_kd.objective import LossWeights, tinybert_objective
from dist_kd.testing import random_sentences
from dist_kd.train.engine import TrainConfig, build_ds_config, build_engine, full_precision_weights, release_engine

MODES = ("fp32", "fp32-deepspeed-clip", "bf16-autocast", "bf16-deepspeed")
STEPS = 6


def run(mode: str, teacher: Teacher, mapping, batches, info) -> dict:
    torch.manual_seed(0)
    cfg = StudentConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0)
    model = DistillStudent(build_student(cfg, teacher.config), build_projections(32, 32, 2))
    precision, _, variant = mode.partition("-")
    bf16_mode = "deepspeed" if variant == "deepspeed" else "autocast"
    train = TrainConfig(max_steps=10, lr=5e-3, warmup_ratio=0.0, clip=0.5, bf16_mode=bf16_mode)
    ds_config = build_ds_config("ds_configs/zero0.json", 2, 1, info.world_size, precision, train.clip, bf16_mode)
    engine = build_engine(model, train, ds_config)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # AdamW, inside DeepSpeed's bf16 optimizer
    steps_before = sorted({float(state["step"]) for state in inner.state.values() if "step" in state})
    norms: list[float] = []
    overridden = "clip_fp32_gradients" in vars(engine)  # build_engine's clipping in place of DeepSpeed's
    if variant == "deepspeed-clip":
        del engine.clip_fp32_gradients  # DeepSpeed's own method of the class again
    elif precision == "fp32":
        clip = engine.clip_fp32_gradients
        engine.clip_fp32_gradients = lambda: norms.append(float(clip()))  # the norms before clipping
    losses, score_dtype = [], None
    for ids, mask in batches:
        features = engine(ids, mask)
        score_dtype = str(next(iter(features.scores.values())).dtype)
        terms = tinybert_objective(features, teacher.features(ids, mask), mapping, mask, LossWeights(),
                                   engine.module.projections)  # fmt: skip
        engine.backward(terms["loss"])
        engine.step()
        losses.append(terms["loss"].item())
    with full_precision_weights(engine, engine.module) as module:
        weights = {name: p.detach().clone() for name, p in module.named_parameters()}
    result = {
        "losses": losses,
        "grad_norms": norms,
        "adam_steps_before_training": steps_before,
        "clip_overridden": overridden,
        "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
        "score_dtype": score_dtype,
        "optimizer": f"{type(engine.optimizer).__module__}.{type(engine.optimizer).__name__}",
    }
    release_engine(engine)
    return result, weights


def main(teacher_dir: str, out_dir: str) -> None:
    info = distributed.init_distributed(force_cpu=True)
    out = Path(out_dir)
    try:
        mapping = layer_map(4, 2)
        teacher = Teacher(teacher_dir, dtype="fp32", device=info.device, score_layers=mapping, max_layer=max(mapping))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        batches = []
        for step in range(STEPS):  # each rank its own batches, so the gradients are averaged over different data
            enc = tokenizer(random_sentences(2, seed=1000 * step + info.rank), padding=True, return_tensors="pt")
            batches.append((enc["input_ids"], enc["attention_mask"]))
        report = {}
        for mode in MODES:
            report[mode], weights = run(mode, teacher, mapping, batches, info)
            torch.save(weights, out / f"{mode}-rank{info.rank}.pt")  # ZeRO-0: every rank holds the same
        if info.is_main:
            (out / "modes.json").write_text(json.dumps(report, indent=1))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
