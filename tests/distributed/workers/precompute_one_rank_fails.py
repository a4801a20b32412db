"""Worker: launch/precompute.py with a failure on rank 1 only (FAIL_AT=setup: a teacher missing on that node;
FAIL_AT=chunk: its first chunk breaks mid-run); exits with precompute's exit code."""

from __future__ import annotations

import os
import sys

import dist_kd.precompute as precompute
from launch.precompute import main


def _fail_on_rank_1(function, error: Exception):
    def patched(*args, **kwargs):
        if os.environ.get("RANK") == "1":
            raise error
        return function(*args, **kwargs)

    return patched


if __name__ == "__main__":
    if os.environ["FAIL_AT"] == "setup":
        error = FileNotFoundError("teacher directory /node2/t1 does not exist")
        precompute.check_teachers = _fail_on_rank_1(precompute.check_teachers, error)
    else:
        precompute._compute_chunk = _fail_on_rank_1(precompute._compute_chunk, ValueError("chunk 1 broke"))
    sys.exit(main(sys.argv[1:]))
