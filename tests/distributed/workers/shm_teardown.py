"""Worker: a 2-rank CPU process group whose ranks are all on one node (LOCAL_SIZE set, as the deepspeed
launcher sets it) makes DeepSpeed's shared-memory all-reduce create one /dev/shm file per rank. Records
whether both files exist under the names ``shm_buffer_path`` gives and whether an all-reduce across them is
right, then tears the group down. Writes OUT/rank<r>.json."""

import json
import sys
from pathlib import Path

import torch

from dist_kd import distributed


def main() -> None:
    out = Path(sys.argv[1])
    info = distributed.init_distributed(force_cpu=True)
    import deepspeed.comm as ds_comm

    paths = [distributed.shm_buffer_path(r) for r in range(info.world_size)]
    before = [path.exists() for path in paths]
    values = torch.full((4,), float(info.rank + 1))
    ds_comm.inference_all_reduce(values)  # the op's own all-reduce, through the shared buffers
    summed = values.tolist() == [float(sum(range(1, info.world_size + 1)))] * 4
    distributed.teardown()
    record = {"paths": [str(p) for p in paths], "existed": before, "summed": summed}
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
