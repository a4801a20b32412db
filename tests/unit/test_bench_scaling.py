"""bench/scaling.py's arithmetic: the ring all-reduce volume and the parameter count it is built on."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_ring_allreduce_volume(scaling):
    # 2 ranks exchange half of the gradient each way twice (reduce-scatter + all-gather): exactly G
    assert scaling.allreduce_bytes(1000, 2, 2) == pytest.approx(2000)
    assert scaling.allreduce_bytes(1000, 1, 2) == 0
    assert scaling.allreduce_bytes(1000, 8, 4) == pytest.approx(2 * 7 / 8 * 4000)


def test_parameter_count_matches_a_built_student(scaling):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    model = BertModel(config, add_pooling_layer=False)
    projections = torch.nn.ModuleList(torch.nn.Linear(24, scaling.TEACHER_HIDDEN) for _ in range(3))
    expected = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in projections.parameters())
    assert scaling.student_parameters(2, 24, 4, 48, vocab=100) == expected


def test_throughput_and_budget_from_a_suite(scaling, tmp_path, capsys):
    """With a measured T1 and no communication cost (1 GPU), tokens/s is T1 and the budget is 2.25e9 / T1."""
    suite = tmp_path / "gpu_suite.json"
    row = {"student": "4L-312", "seq_len": 128, "micro_batch": 128, "row": "dist_kd ZeRO-0, fp16 teacher",
           "tokens_per_s": 2.0e6}  # fmt: skip
    rows = [
        row,
        row | {"row": "naive (fp32 eager, every layer)", "tokens_per_s": 9.0e6},
        row | {"micro_batch": 1024, "tokens_per_s": 5.0e6},
    ]  # another step size: another all-reduce ratio
    suite.write_text(json.dumps({"rows": rows}))
    assert scaling.suite_rates(suite, 128, 128) == {"4L-312": 2.0e6}
    assert scaling.suite_rates(suite, 128, 1024) == {"4L-312": 5.0e6}
    scaling.main(["--suite", str(suite), "--gpus", "1"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("| 1 |"))
    assert "2.0 M .. 2.0 M" in line and f"{scaling.TINYBERT_TOKENS / 2.0e6 / 60:.0f} min" in line
    # A suite without a row at these shapes (a --smoke one) is said to be so, not "not measured here; pass --suite"
    scaling.main(["--suite", str(suite), "--gpus", "1", "--micro-batch", "64"])
    assert f"{suite} has no dist_kd row of 4L-312, 6L-768 at seq 128 x micro-batch 64" in capsys.readouterr().out
    # A data loader slower than the GPU sets the rate: it printed its limit and left the figures at T1.
    scaling.main(["--suite", str(suite), "--gpus", "8", "--loader-sequences-per-s", "100", "--workers", "2"])
    out = capsys.readouterr().out
    assert "25,600 tokens/s per GPU before it becomes the limit" in out
    line = next(line for line in out.splitlines() if line.startswith("| 8 |"))
    assert "0.2 M .. 0.2 M (loader-bound)" in line, line  # 8 x 25,600 = 204,800, the all-reduce beside it small
    assert f"{scaling.TINYBERT_TOKENS / (8 * 25600) / 3600:.1f} h" in line
    with pytest.raises(SystemExit):  # a missing file: a usage error, not a FileNotFoundError traceback
        scaling.main(["--suite", str(tmp_path / "missing.json")])
    assert "missing.json does not exist" in capsys.readouterr().err
