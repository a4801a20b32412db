"""bench/zero_overhead.py --smoke: every variant runs, and each engine ran the ZeRO stage and settings its
row names (read back from the engine, not from the JSON the bench wrote). The figures are not checked."""

from __future__ import annotations

import json

from tests.e2e.conftest import run_script


def test_each_row_runs_the_zero_settings_it_names(tmp_path):
    proc = run_script("bench/zero_overhead.py", "--smoke", "--output", str(tmp_path / "rows.json"))
    rows = {row["variant"]: row for row in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    expected = {  # variant -> (stage, contiguous_gradients, overlap_comm)
        "ZeRO-0 (ds_configs/zero0.json)": 0,
        "ZeRO-1 (ds_configs/zero1.json)": 1,
        "ZeRO-2 (ds_configs/zero2.json)": (2, True, True),
        "ZeRO-2, contiguous_gradients off": (2, False, True),
        "ZeRO-2, overlap_comm off": (2, True, False),
        "ZeRO-2, both off": (2, False, False),
    }
    assert list(rows) == list(expected)
    for name, want in expected.items():
        row = rows[name]
        assert row["ms_per_step"] > 0, name
        if isinstance(want, tuple):
            assert (row["zero_stage"], row["contiguous_gradients"], row["overlap_comm"]) == want, name
        else:
            assert row["zero_stage"] == want, name
    assert rows["ZeRO-0 (ds_configs/zero0.json)"]["ratio"] == 1.0
    assert proc.stdout.count("\n| ZeRO-") == len(expected)
