"""Worker: train student + projections a few steps in a bf16/fp16/fp32 (or bf16-autocast) DeepSpeed engine on CPU
ranks, save a checkpoint, and write what an export sees inside ``full_precision_weights`` (OUT/exported.pt,
rank 0) beside the module's own weights (OUT/module.pt), the student's forward inside ``exported_weights`` and
outside it (OUT/forward.pt), and whether the module came back unchanged (OUT/rank<r>.json)."""

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
from dist_kd.train.engine import (
    TrainConfig,
    build_ds_config,
    build_engine,
    exported_weights,
    full_precision_weights,
    gathered_parameters,
)


def main(teacher_dir: str, out_dir: str, ds_json: str, precision: str, device: str = "cpu") -> None:
    info = distributed.init_distributed(force_cpu=device == "cpu")
    out = Path(out_dir)
    try:
        torch.manual_seed(0)
        mapping = layer_map(4, 2)
        teacher = Teacher(teacher_dir, dtype="fp32", device=info.device, score_layers=mapping, max_layer=max(mapping))
        cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, dropout=0.0)
        model = DistillStudent(build_student(cfg, teacher.config), build_projections(16, 32, 2))
        train = TrainConfig(max_steps=10, lr=1e-2, warmup_ratio=0.0)
        initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        # "bf16" is DeepSpeed's bf16 optimizer (bf16 module, fp32 masters); "bf16-autocast" train.bf16_mode's default
        mode = "autocast" if precision.endswith("-autocast") else "deepspeed"
        ds_config = build_ds_config(ds_json, 2, 1, info.world_size, precision.removesuffix("-autocast"), 1.0, mode)
        engine = build_engine(model, train, ds_config)
        with full_precision_weights(engine, engine.module) as module:
            at_start = {n: p.detach().cpu().clone() for n, p in module.named_parameters()}
        if info.is_main:
            torch.save({"initial": initial, "at_start": at_start}, out / "start.pt")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        enc = tokenizer(random_sentences(2, seed=100 + info.rank), padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"].to(info.device), enc["attention_mask"].to(info.device)
        for _ in range(4):
            terms = tinybert_objective(engine(ids, mask), teacher.features(ids, mask), mapping, mask, LossWeights(),
                                       engine.module.projections)  # fmt: skip
            engine.backward(terms["loss"])
            engine.step()
        engine.save_checkpoint(str(out / "checkpoints"), tag="step-00000004")
        names = [name for name, _ in engine.module.named_parameters()]
        with gathered_parameters(engine, list(engine.module.parameters())):
            before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        with full_precision_weights(engine, engine.module) as module:
            exported = {n: p.detach().clone() for n, p in module.named_parameters()}
        # Dev scores and quality figures: the forward of the exported weights (ZeRO 0-2), beside the module's own
        student = engine.module.student
        with torch.no_grad():
            with exported_weights(engine, student) as scoring:
                scored = scoring(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
            as_is = student(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
        twin = getattr(engine, "dist_kd_scoring_twin", None)
        twin_after = None if twin is None else next(twin.parameters()).device.type
        with gathered_parameters(engine, list(engine.module.parameters())):
            after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        restored = all(after[n].dtype == before[n].dtype and torch.equal(after[n], before[n]) for n in names)
        if info.is_main:
            torch.save({n: t.cpu() for n, t in exported.items()}, out / "exported.pt")
            torch.save({n: t.cpu() for n, t in before.items()}, out / "module.pt")
            torch.save({"input_ids": ids.cpu(), "attention_mask": mask.cpu(), "scored": scored, "as_is": as_is,
                        "twin_after": twin_after},
                       out / "forward.pt")  # fmt: skip
            student.config.save_pretrained(out / "student_config")
        (out / f"rank{info.rank}.json").write_text(json.dumps({"restored": restored, "world_size": info.world_size}))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
