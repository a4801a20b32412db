"""The end-of-run summary a general run prints, and what the Python API's RunResult reads of it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from dist_kd.api import RunResult
from dist_kd.train.general import summary_lines


def test_the_loss_table_keeps_its_columns_apart_for_any_value(tmp_path):
    """A diverged run's 1.8e24 was written as 24 digits and ran into the first log's cell: "0.24471819423841...".
    Each row must split back into its name and two numbers equal to the logged ones (to the digits shown)."""
    first = {"loss": 7.2571, "loss_embd": 0.2447, "loss_attn": -3.5, "loss_hidden": 123456.78901}
    last = {"loss": 1.8194238411529964e24, "loss_embd": 3.0e-9, "loss_attn": -9.87654321e12, "loss_hidden": math.nan}
    trainer = SimpleNamespace(run_dir=tmp_path, first_terms=first, last_terms=last, loader=SimpleNamespace(
        skipped_shards={}), empty_batches=0)  # fmt: skip
    lines = summary_lines(trainer, None)
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == set(first)
    for name, line in rows.items():
        assert len(line) == 14 + 12 + 12, line
        fields = line.split()
        assert len(fields) == 3, line
        for shown, value in zip(fields[1:], (first[name], last[name]), strict=True):
            if math.isnan(value):
                assert shown == "nan"
            else:
                assert math.isclose(float(shown), value, rel_tol=1e-3, abs_tol=5e-5), (shown, value)
    assert rows["loss"].split()[1] == "7.2571"  # ordinary values keep their 4 decimals


def test_a_stopped_runs_result_has_no_summary(tmp_path):
    """A finished run continued with more steps and stopped by a signal kept the earlier segment's summary.json
    on disk: RunResult.summary returned it as if it were this run's ("None before the end")."""
    (tmp_path / "summary.json").write_text(json.dumps({"lines": ["student at step 2"], "quality": None}))
    assert RunResult(tmp_path, completed=False).summary is None
    assert RunResult(tmp_path, completed=True).summary == {"lines": ["student at step 2"], "quality": None}
    assert RunResult(tmp_path / "none", completed=True).summary is None
