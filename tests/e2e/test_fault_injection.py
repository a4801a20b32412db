"""The fault-injection script with a small N: random SIGKILL/SIGTERM, reruns, and the result identical to an
uninterrupted run (bench/fault_injection.py; the docs give the figures for a large N)."""

from __future__ import annotations

import re

from tests.e2e.conftest import run_script


def test_random_kills_end_identical_to_an_uninterrupted_run(tmp_path):
    proc = run_script("bench/fault_injection.py", "--trials", "2", "--kills", "2", "--seed", "3",
                      "--work", str(tmp_path), timeout=900)  # fmt: skip
    assert re.search(r"^2/2 trials identical to the uninterrupted run after [1-4] kills", proc.stdout, re.M), (
        proc.stdout
    )
    assert proc.stdout.count(": identical (") == 2
