"""Worker: distributed.any_rank (the stop check's agreement) on every rank; writes rank{r}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_kd import distributed


def main() -> None:
    out = Path(sys.argv[1])
    info = distributed.init_distributed(force_cpu=True)
    try:
        cases = {
            "none": distributed.any_rank(False),
            "only_last_rank": distributed.any_rank(info.rank == info.world_size - 1),
            "only_rank_0": distributed.any_rank(info.rank == 0),
            "all": distributed.any_rank(True),
        }
        (out / f"rank{info.rank}.json").write_text(json.dumps(cases))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
