"""Worker: a DeepSpeed engine saves a whole checkpoint, then a second save whose write of one file fails on one
rank (ENOSPC, inside DeepSpeed's save_checkpoint). Writes OUT/rank<r>.json with what the second save raised on
this rank and the loss of a step after it (the ranks still in step)."""

import errno
import json
import sys
from pathlib import Path

import torch

from dist_kd import distributed
from dist_kd.train import checkpoint as ckpt
from dist_kd.train.engine import TrainConfig, build_ds_config, build_engine


def step(engine) -> float:
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(engine.global_steps))
    loss = (engine(x) - 1).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return float(loss)


def main(out_dir: str, ds_json: str, failing_rank: str, file_part: str) -> None:
    info = distributed.init_distributed(force_cpu=True)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
        engine = build_engine(model, TrainConfig(max_steps=10, lr=1e-2, warmup_ratio=0.0),
                              build_ds_config(ds_json, 2, 1, info.world_size, "fp32", 1.0))  # fmt: skip
        checkpoints = Path(out_dir) / "checkpoints"
        step(engine)
        ckpt.save_checkpoint(engine, checkpoints, 1, {"position": 1}, {"run": "x"}, keep_last=0)
        step(engine)
        real_save = torch.save

        def failing_save(obj, path, *args, **kwargs):
            if info.rank == int(failing_rank) and file_part in str(path):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real_save(obj, path, *args, **kwargs)

        torch.save = failing_save
        try:
            ckpt.save_checkpoint(engine, checkpoints, 2, {"position": 2}, {"run": "x"}, keep_last=0)
            outcome = "saved"
        except ckpt.CheckpointSaveError as err:
            outcome = f"CheckpointSaveError disk_full={err.disk_full}"
        finally:
            torch.save = real_save
        after = step(engine)  # a collective step: both ranks are still in step
        (Path(out_dir) / f"rank{info.rank}.json").write_text(json.dumps({"outcome": outcome, "after": after}))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
