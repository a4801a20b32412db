"""Worker: launch/precompute.py whose rank 0 takes SLOW more seconds a chunk (a large teacher's chunk on a CPU),
so that rank 1 waits for it at the barrier; exits with precompute's exit code."""

from __future__ import annotations

import os
import sys
import time

import dist_kd.precompute as precompute
from launch.precompute import main

if __name__ == "__main__":
    compute = precompute._compute_chunk

    def slow(*args, **kwargs):
        if os.environ.get("RANK") == "0":
            time.sleep(float(os.environ["SLOW"]))
        return compute(*args, **kwargs)

    precompute._compute_chunk = slow
    sys.exit(main(sys.argv[1:]))
