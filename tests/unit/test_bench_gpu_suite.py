"""bench/gpu_suite.py's bookkeeping: every unit of work is written out as soon as it ends, a failing unit
leaves a row that says why and the next unit still runs, and units past the time budget are skipped and
recorded, so a device run cut short still returns every row it measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite_module():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports bench/general.py as ``general``
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu_suite", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


HEADER = {"device": "test", "torch": "x", "teacher": {}, "smoke": True}


def _rows(output: Path) -> list[dict]:
    return json.loads((output / "gpu_suite.json").read_text())["rows"]


def test_each_unit_is_written_at_once_and_a_failure_costs_only_its_own_row(suite_module, tmp_path):
    m = suite_module
    suite = m.Suite(tmp_path, HEADER, budget_s=None)
    seen_on_disk = []

    def good(name, value):
        seen_on_disk.append(len(_rows(tmp_path)) if (tmp_path / "gpu_suite.json").exists() else 0)
        return [m.Result("s", 8, 2, name, tokens_per_s=value, ms_per_step=1.0)]

    def bad():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    suite.run(m.Result("s", 8, 2, "first"), lambda: good("first", 10.0))
    suite.run(m.Result("s", 8, 2, "broken"), bad)
    suite.run(m.Result("s", 8, 2, "third"), lambda: good("third", 30.0))
    rows = _rows(tmp_path)
    assert seen_on_disk == [0, 2]  # the third unit found the first two rows already on disk
    assert [r["row"] for r in rows] == ["first", "broken", "third"]
    assert rows[1]["tokens_per_s"] is None and rows[1]["note"].startswith("failed: RuntimeError: CUDA error")
    assert rows[2]["tokens_per_s"] == 30.0
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| s | 8 | 2 | broken | - | - | - | - | failed: RuntimeError" in table
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_units_past_the_budget_are_recorded_as_skipped_not_run(suite_module, tmp_path):
    m = suite_module
    suite = m.Suite(tmp_path, HEADER, budget_s=0.0)
    ran = []
    suite.run(m.Result("s", 8, 2, "late"), lambda: ran.append(1) or [])
    assert not ran
    (row,) = _rows(tmp_path)
    assert row["row"] == "late" and row["note"] == "skipped: the 0 s budget was spent"
    assert "(budget 0 s)" in (tmp_path / "gpu_suite.md").read_text()
