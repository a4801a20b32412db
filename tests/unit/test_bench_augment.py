"""bench/augment.py's own check: the one-word baseline gives the library's outputs (the figures are not
checked: a bench). Its baseline read stop words as replaceable, so the check printed False on every run and
the speed-up was measured against more masked-LM passes than the library makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "augment.py"


def test_bench_augment_baseline_gives_the_librarys_outputs():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--num-examples", "4", "--baseline-examples", "2", "--n-a", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "outputs identical on the shared examples: True" in result.stdout, result.stdout
