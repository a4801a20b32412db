"""Worker: a process group started (``init_distributed``, or torch's own ``init_process_group`` in a process that
imported ``dist_kd.distributed``, as launch/augment.py does), then a transformers model class loaded for the
first time (its import chain reaches torch.distributed.nn.functional), then ``teardown``. Records the names of
this process's gloo threads after the start and after the teardown: the group's worker threads must be gone,
or one may release a finished collective during the interpreter's shutdown and abort the process. Writes
OUT/rank<r>.json."""

import datetime
import json
import os
import sys
from pathlib import Path

from dist_kd import distributed


def gloo_threads() -> list[str]:
    """Names of this process's threads that torch's gloo backend started."""
    names = [Path(f"/proc/self/task/{task}/comm").read_text().strip() for task in os.listdir("/proc/self/task")]
    return sorted(name for name in names if "gloo" in name)


def main() -> None:
    out, how = Path(sys.argv[1]), sys.argv[2]
    if how == "init_distributed":
        rank = distributed.init_distributed(force_cpu=True).rank
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        rank = dist.get_rank()
    started = gloo_threads()
    from transformers import BertConfig, BertModel  # the first load of a model class, after the group started

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    distributed.barrier()
    distributed.teardown()
    record = {"started": started, "after_teardown": gloo_threads()}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
