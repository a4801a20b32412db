"""Worker: a process group, a transformers model class loaded for the first time after it started (its import
chain reaches torch.distributed.nn.functional, whose defaults would capture the group), then the group's end.
Records the names of this process's gloo threads after the start and after the end: the group's worker
threads must be gone, or one may release a finished collective during the interpreter's shutdown and abort
the process. Writes OUT/rank<r>.json. Modes:

- ``init_distributed``: dist_kd starts the group; ``teardown``.
- ``init_process_group``: torch's own start in a process that imported ``dist_kd.distributed`` first (as
  launch/augment.py does); ``teardown``.
- ``started_elsewhere``: torch's own start before dist_kd is imported, and DeepSpeed's comm module and
  torch.distributed.nn.functional imported after it (both capture the group); ``teardown``.
- ``api_exit``: dist_kd starts the group and the script ends without a teardown (a Python API script); the
  record is written at exit, after dist_kd's exit handler.
- ``start_again``: as ``init_distributed``, then ``init_distributed`` once more: the error it raises is
  recorded (``again``).
"""

import atexit
import datetime
import json
import os
import sys
from pathlib import Path


def gloo_threads() -> list[str]:
    """Names of this process's threads that torch's gloo backend started."""
    names = [Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task")]
    return sorted(name for name in names if "gloo" in name)


def main() -> None:
    out, how = Path(sys.argv[1]), sys.argv[2]
    record = {}

    def write() -> None:
        record["after_end"] = gloo_threads()
        (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))

    if how == "api_exit":
        atexit.register(write)  # registered first, so it runs after dist_kd's own exit handler
    if how == "started_elsewhere":
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        import deepspeed.comm.torch  # noqa: F401
        import torch.distributed.nn.functional  # noqa: F401
    from dist_kd import distributed

    if how in ("init_distributed", "api_exit", "start_again"):
        distributed.init_distributed(force_cpu=True)
    elif how == "init_process_group":
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    record["started"] = gloo_threads()
    from transformers import BertConfig, BertModel  # the first load of a model class, after the group started

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    distributed.barrier()
    if how == "api_exit":
        return
    distributed.teardown()
    if how == "start_again":
        try:
            distributed.init_distributed(force_cpu=True)
            record["again"] = "started"
        except ValueError as err:
            record["again"] = str(err)
    write()


if __name__ == "__main__":
    main()
