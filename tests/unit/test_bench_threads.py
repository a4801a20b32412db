"""bench/threads.py runs its rows end to end on a tiny model (the figures it prints are not checked: a bench)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "threads.py"
NUMBER = r"([\d.]+)"


@pytest.mark.slow  # half a minute of real-size steps; the bench's figures are not checked anyway
def test_bench_threads_prints_a_row_per_model(tiny_bert_dir):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(tiny_bert_dir), "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pattern = rf"^\| (.+?) \| (\d+) \| (\d+) \| {NUMBER}x \| (\d+)-(\d+) \| {NUMBER}x \|$"
    rows = re.findall(pattern, result.stdout, flags=re.MULTILINE)
    assert [row[0] for row in rows] == [
        "3x192 student, 32 x 128",
        "3x192 student, 32 x 40",
        "fine-tuning the base, 16 x 128",
        "fine-tuning the base, 16 x 32",
    ]
    for _, _one, _two, scaling, low, high, gain in rows:
        assert float(scaling) > 0 and float(gain) > 0 and int(low) <= int(high)
