"""2-rank worker: forward/backward/step of the TinyBERT objective under a ZeRO-2 DeepSpeed engine.

Each rank holds a frozen teacher outside the engine and trains student + projections inside it, on a
different batch per rank. Writes what the test checks to OUT/rank<r>.json.
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
from dist_kd.train.engine import TrainConfig, build_ds_config, build_engine


def main(teacher_dir: str, out_dir: str, ds_json: str) -> None:
    info = distributed.init_distributed(force_cpu=True)
    try:
        torch.manual_seed(0)
        mapping = layer_map(4, 2)
        teacher = Teacher(teacher_dir, dtype="fp32", score_layers=mapping, max_layer=max(mapping))
        teacher_before = [p.clone() for p in teacher.model.parameters()]
        cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, dropout=0.0)
        model = DistillStudent(build_student(cfg, teacher.config), build_projections(16, 32, 2))
        train = TrainConfig(max_steps=10, lr=1e-2, warmup_ratio=0.0)
        ds_config = build_ds_config(ds_json, 2, 1, info.world_size, "fp32", 1.0)
        engine = build_engine(model, train, ds_config)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        texts = random_sentences(2, seed=100 + info.rank)
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        losses = []
        for _ in range(6):
            features = engine(ids, mask)
            terms = tinybert_objective(
                features, teacher.features(ids, mask), mapping, mask, LossWeights(), engine.module.projections
            )
            engine.backward(terms["loss"])
            engine.step()
            losses.append({k: v.item() for k, v in terms.items()})
        checksum = sum(p.detach().double().sum().item() for p in engine.module.parameters())
        teacher_unchanged = all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.model.parameters()))
        result = {
            "rank": info.rank,
            "world_size": info.world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "losses": losses,
            "checksum": checksum,
            "teacher_unchanged": teacher_unchanged,
            "teacher_in_engine": any(p is q for p in teacher.model.parameters() for q in engine.module.parameters()),
        }
        Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
