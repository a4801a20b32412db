"""Worker: two engines side by side on CPU ranks; ``release_engine`` frees the first (no reference to it or
its parameters survives) while the second goes on training, then frees the second. The model's last bias has
one element, so under ZeRO-3 on 2 ranks one rank's partition of it is all padding: the fp32 masters must still
start as the weights were built. Writes OUT/rank<r>.json."""

import gc
import json
import sys
import weakref
from pathlib import Path

import torch

from dist_kd import distributed
from dist_kd.train.engine import TrainConfig, build_ds_config, build_engine, full_precision_weights, release_engine


def build(ds_json: str, precision: str, world_size: int):
    """The engine, and whether its exported (fp32 master) weights before any step are the weights as built."""
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    built = [p.detach().clone() for p in model.parameters()]
    engine = build_engine(model, TrainConfig(max_steps=10, lr=1e-2, warmup_ratio=0.0),
                          build_ds_config(ds_json, 2, 1, world_size, precision, 1.0))  # fmt: skip
    with full_precision_weights(engine, engine.module) as module:
        exact = all(torch.equal(p.detach().cpu(), b) for p, b in zip(module.parameters(), built, strict=True))
    return engine, exact


def step(engine, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 32, generator=generator).to(engine.device, next(engine.module.parameters()).dtype)
    loss = (engine(x).float() - 1).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return float(loss)


def references(engine) -> list[weakref.ref]:
    return [weakref.ref(engine), weakref.ref(engine.module), *map(weakref.ref, engine.module.parameters())]


def main(out_dir: str, ds_json: str, precision: str) -> None:
    info = distributed.init_distributed(force_cpu=True)
    try:
        torch.manual_seed(0)
        (first, first_exact), (second, second_exact) = (build(ds_json, precision, info.world_size) for _ in "12")
        for _ in range(2):  # two steps: ZeRO-3's coordinator memoizes from its second step on
            step(first, 0)
            step(second, 0)
        first_refs = references(first)
        release_engine(first)
        del first
        gc.collect()
        first_freed = all(ref() is None for ref in first_refs)
        losses = [step(second, 1) for _ in range(4)]  # one batch, so training must lower its loss
        second_refs = references(second)
        release_engine(second)
        del second
        gc.collect()
        result = {
            "seeded_exactly": first_exact and second_exact,
            "first_freed": first_freed,
            "second_losses": losses,
            "second_freed": all(ref() is None for ref in second_refs),
        }
        (Path(out_dir) / f"rank{info.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
