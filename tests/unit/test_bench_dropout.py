"""bench/dropout.py runs its rows end to end on a tiny model (the figures it prints are not checked: a bench)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "dropout.py"


def test_bench_dropout_prints_a_row_per_model(tiny_bert_dir):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", str(tiny_bert_dir), "--steps", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (.+?) \| (\d+) \| (\d+) \| ([\d.]+)x \|$", result.stdout, flags=re.MULTILINE)
    assert [name for name, *_ in rows] == [
        "3x192 student, 32 x 128",
        "3x192 student, 32 x 40",
        "fine-tuning the base, 16 x 128",
    ]
