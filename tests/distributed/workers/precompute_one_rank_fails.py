"""Worker: launch/precompute.py with a failure on rank 1 only (FAIL_AT=setup: a teacher missing on that node;
FAIL_AT=chunk: its first chunk breaks mid-run); exits with precompute's exit code."""

from __future__ import annotations

import os
import sys

import dist_kd.precompute as precompute
from dist_kd.testing import fail_on_rank
from launch.precompute import main

if __name__ == "__main__":
    if os.environ["FAIL_AT"] == "setup":
        error = FileNotFoundError("teacher directory /node2/t1 does not exist")
        precompute.check_teachers = fail_on_rank(precompute.check_teachers, error)
    else:
        precompute._compute_chunk = fail_on_rank(precompute._compute_chunk, ValueError("chunk 1 broke"))
    sys.exit(main(sys.argv[1:]))
