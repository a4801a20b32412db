"""Worker: a 2-rank CPU process group whose ranks are all on one node (LOCAL_SIZE set, as the deepspeed
launcher sets it) makes DeepSpeed's shared-memory all-reduce create one /dev/shm file per rank and map every
rank's. Records, right after ``init_distributed``, which of the names ``shm_buffer_path`` gives this process
has mapped (``/proc/self/maps``) and whether the kernel marks each mapping deleted (unlinked), whether the
files still exist, and whether an all-reduce through the mappings is right; then tears the group down.
With ``--kill`` rank 0 SIGKILLs itself after the all-reduce instead (a preempted job). Writes OUT/rank<r>.json."""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from dist_kd import distributed


def mapped(path: Path) -> dict[str, bool]:
    """Whether ``path`` is mapped into this process, and whether the mapping's file has been unlinked."""
    lines = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]
    return {"mapped": bool(lines), "deleted": bool(lines) and all(line.endswith("(deleted)") for line in lines)}


def main() -> None:
    out, kill = Path(sys.argv[1]), "--kill" in sys.argv[2:]
    info = distributed.init_distributed(force_cpu=True)
    distributed.barrier()  # every rank past its own unlink (inside init_distributed) before any looks
    import deepspeed.comm as ds_comm

    paths = [distributed.shm_buffer_path(r) for r in range(info.world_size)]
    maps = [mapped(path) for path in paths]
    exist = [path.exists() for path in paths]
    values = torch.full((4,), float(info.rank + 1))
    ds_comm.inference_all_reduce(values)  # the op's own all-reduce, through the shared buffers
    summed = values.tolist() == [float(sum(range(1, info.world_size + 1)))] * 4
    record = {"paths": [str(p) for p in paths], "maps": maps, "exist": exist, "summed": summed}
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))
    if kill:
        distributed.barrier()  # both records written
        if info.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return  # rank 1 exits without a teardown; torchrun then reports rank 0's kill
    distributed.teardown()


if __name__ == "__main__":
    main()
