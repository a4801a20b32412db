"""metrics.jsonl writing and truncation on resume, the TensorBoard option, and the FLOP count behind MFU."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dist_kd.train.common import RunConfig
from dist_kd.train.metrics import (
    MetricsLogger,
    count_parameters,
    distill_flops_per_token,
    estimate_mfu,
    matmul_parameters,
)


def _steps(path):
    return [json.loads(line)["step"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_lines_and_truncation_after_a_resumed_step(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in (10, 20, 30):
        logger.log({"step": step, "loss": 1.0 / step})
    kept = logger.start_at(20)
    assert [record["step"] for record in kept] == [10, 20] and kept[0]["loss"] == 0.1
    logger.log({"step": 30, "loss": 0.5})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 30] and lines[-1]["loss"] == 0.5
    MetricsLogger(tmp_path / "other", enabled=False).log({"step": 1, "loss": 1.0})  # not rank 0: nothing written
    assert not (tmp_path / "other").exists()


def test_a_start_from_scratch_drops_every_earlier_line(tmp_path):
    """Killed before the first checkpoint and run again: the rerun starts at step 0, so nothing is kept."""
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in (0, 10, 20):
        logger.log({"step": step, "loss": 1.0})
    assert MetricsLogger(tmp_path, enabled=True).start_at(None) == []
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    MetricsLogger(tmp_path, enabled=True).log({"step": 0, "loss": 2.0})
    assert _steps(tmp_path) == [0]


def test_a_cut_off_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.9}\n{"step": 30, "lo')  # a full disk
    logger = MetricsLogger(tmp_path, enabled=True)
    with caplog.at_level("WARNING"):
        kept = logger.start_at(30)
    assert [record["step"] for record in kept] == [10, 20]
    assert f"{path} line 3 is damaged" in caplog.text
    logger.log({"step": 30, "loss": 0.8})
    assert _steps(tmp_path) == [10, 20, 30]
    path.write_text('{"step": 10}\n[1, 2]\n{"step": "x"}\n\n{"step": 20}\n')  # parses, but is no record
    assert [record["step"] for record in MetricsLogger(tmp_path, enabled=True).records()] == [10, 20]


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(
        ValueError, match=r"includes tensorboard .* pip install 'dist_kd\[tensorboard\]'.*run.tensorboard=false"
    ):
        RunConfig(tensorboard=True)
    with pytest.raises(ValueError, match=r"run.report_to includes tensorboard"):
        RunConfig(report_to=["tensorboard"])
    with pytest.raises(ValueError, match=r"unknown tracker 'comet'; one of \['tensorboard', 'wandb', 'mlflow'\]"):
        RunConfig(report_to=["comet"])
    RunConfig(tensorboard=False)


def test_tensorboard_scalars_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, enabled=True, report_to=RunConfig(tensorboard=True).trackers())
    logger.log({"step": 5, "loss": 2.5, "loss_attn": 2.0, "note": "text is skipped"})
    logger.log({"step": 10, "loss": 1.5, "loss_attn": 1.0})
    logger.scalars({"dev/topic/accuracy": 0.75, "dev/topic/predicted_classes": 3}, 10)  # the task stage's dev metrics
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "loss_attn", "dev/topic/accuracy", "dev/topic/predicted_classes"}
    assert [(e.step, e.value) for e in events.Scalars("dev/topic/accuracy")] == [(10, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(5, 2.5), (10, 1.5)]


def test_tensorboard_hides_the_points_a_resumed_run_logs_again(tmp_path):
    """Killed at step 7 with its last checkpoint at step 4: metrics.jsonl goes back to step 4, and the resumed run
    logs 5-7 again. TensorBoard showed both processes' 5-7 (a line that zig-zags back); a run from scratch in the
    same directory drew over the old run's points."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(start, steps, offset):
        logger = MetricsLogger(tmp_path, enabled=True, report_to=["tensorboard"])
        logger.start_at(start)
        for step in steps:
            logger.log({"step": step, "loss": offset + step})
        logger.close()

    def points():
        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("loss")]

    run(None, range(1, 8), 0.0)
    run(4, range(5, 11), 100.0)
    assert points() == [(s, float(s)) for s in range(1, 5)] + [(s, 100.0 + s) for s in range(5, 11)]
    assert _steps(tmp_path) == list(range(1, 11))
    run(None, range(1, 4), 200.0)  # from scratch: only the new run's points
    assert points() == [(s, 200.0 + s) for s in range(1, 4)]


class _FakeWandbRun:
    def __init__(self, calls, **kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def log(self, values, step):
        self.calls.append(("log", step, dict(values)))

    def finish(self):
        self.calls.append(("finish",))


def _fake_trackers(monkeypatch, calls):
    """wandb and mlflow stand-ins recording their calls (neither is installed in CI)."""
    import sys
    import types
    from types import SimpleNamespace

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: _FakeWandbRun(calls, **kwargs)
    mlflow = types.ModuleType("mlflow")

    def start_run(run_id=None, run_name=None):
        calls.append(("start_run", run_id, run_name))
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id or "mlflow-run-1"))

    mlflow.start_run = start_run
    mlflow.log_params = lambda params: calls.append(("log_params", dict(params)))
    mlflow.log_metrics = lambda values, step: calls.append(("log_metrics", step, dict(values)))
    mlflow.end_run = lambda: calls.append(("end_run",))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)


def test_wandb_and_mlflow_get_every_number_and_a_resumed_run_continues_the_same_tracked_run(tmp_path, monkeypatch):
    calls = []
    _fake_trackers(monkeypatch, calls)
    config = {"train": {"lr": 0.001, "seed": 3}, "distill": {"layer_map": [1, 2]}}
    logger = MetricsLogger(tmp_path, enabled=True, report_to=["wandb", "mlflow"], config=config)
    logger.log({"step": 10, "loss": 1.5, "lr": 0.001, "note": "text", "flag": True})
    logger.scalars({"dev/topic/accuracy": 0.8}, 10)
    logger.close()
    (wandb_init,) = [c for c in calls if c[0] == "init"]
    assert wandb_init[1]["resume"] == "allow" and wandb_init[1]["config"] == config
    assert ("log", 10, {"loss": 1.5, "lr": 0.001}) in calls and ("log", 10, {"dev/topic/accuracy": 0.8}) in calls
    assert ("start_run", None, tmp_path.name) in calls
    assert ("log_params", {"train.lr": 0.001, "train.seed": 3, "distill.layer_map": "[1, 2]"}) in calls
    assert ("log_metrics", 10, {"loss": 1.5, "lr": 0.001}) in calls
    assert calls[-2:] == [("finish",), ("end_run",)]
    # A task run's line: per-task losses and batches and the dev figures are nested; they were left out.
    calls.clear()
    logger = MetricsLogger(tmp_path, enabled=True, report_to=["wandb"], config=config)
    logger.log({"step": 12, "loss": 1.0, "task_loss": {"topic": 0.5, "share": 1.5}, "task_batches": {"topic": 2},
                "dev": {"topic": {"accuracy": 0.75, "predicted_classes": 3}}})  # fmt: skip
    wanted = {"loss": 1.0, "task_loss/topic": 0.5, "task_loss/share": 1.5, "task_batches/topic": 2,
              "dev/topic/accuracy": 0.75, "dev/topic/predicted_classes": 3}  # fmt: skip
    assert ("log", 12, wanted) in calls
    logger.close()
    calls.clear()
    resumed = MetricsLogger(tmp_path, enabled=True, report_to=["wandb", "mlflow"], config=config)
    resumed.start_at(12)  # a resume
    resumed.close()
    assert [c for c in calls if c[0] == "init"][0][1]["id"] == wandb_init[1]["id"]
    assert ("start_run", "mlflow-run-1", None) in calls and not [c for c in calls if c[0] == "log_params"]
    calls.clear()
    MetricsLogger(tmp_path, enabled=False, report_to=["wandb", "mlflow"], config=config).log({"step": 1, "loss": 1.0})
    assert calls == []  # other ranks track nothing


def test_figures_for_a_logged_step_join_its_line(tmp_path, monkeypatch):
    """A run resumed at its last step evaluates it: the dev figures went to a second line of that step."""
    calls = []
    _fake_trackers(monkeypatch, calls)
    logger = MetricsLogger(tmp_path, enabled=True, report_to=["wandb"])
    logger.log({"step": 4, "loss": 2.0})
    logger.log({"step": 8, "loss": 1.0})
    logger.add_to_step({"step": 8, "dev": {"topic": {"accuracy": 0.5}}})
    logger.add_to_step({"step": 9, "dev": {"topic": {"accuracy": 0.6}}})  # no line of step 9: a line of its own
    assert logger.records() == [{"step": 4, "loss": 2.0}, {"step": 8, "loss": 1.0, "dev": {"topic": {"accuracy": 0.5}}},
                                {"step": 9, "dev": {"topic": {"accuracy": 0.6}}}]  # fmt: skip
    assert ("log", 8, {"dev/topic/accuracy": 0.5}) in calls  # the trackers get the new figures alone
    logger.close()
    MetricsLogger(tmp_path, enabled=False).add_to_step({"step": 9, "dev": {}})  # other ranks write nothing
    assert len(logger.records()) == 3


def test_matmul_parameters_count_linear_weights_not_embeddings(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir)
    config = model.config
    width, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_layer = 4 * width * width + 2 * width * ffn  # Q, K, V, output; FFN in and out
    assert matmul_parameters(model) == layers * per_layer  # not the pooler, which runs on one token per sequence
    assert count_parameters(model) > matmul_parameters(model) + config.vocab_size * width - 1


def test_zero3_partitioned_weights_count_at_full_size():
    layer = torch.nn.Linear(8, 4)
    # What ZeRO-3 leaves on a rank: an empty local tensor, the full size in ds_numel.
    layer.weight = torch.nn.Parameter(torch.empty(0))
    layer.weight.ds_numel = 32
    layer.bias = torch.nn.Parameter(torch.empty(0))
    layer.bias.ds_numel = 4
    assert matmul_parameters(layer) == 32 and count_parameters(layer) == 36


def test_mfu_is_none_on_cpu():
    assert estimate_mfu(torch.nn.Linear(2, 2), None, 1e6, torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
    ],
)
def test_mfu_on_a_known_gpu_follows_the_formula(monkeypatch, name, peak):
    from dist_kd.train import metrics

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: name)  # no GPU needed to check the arithmetic
    student, teacher_model = torch.nn.Linear(10, 20), torch.nn.Linear(30, 40)
    teacher = type("Teacher", (), {"model": teacher_model})()
    expected = (6 * 200 + 2 * 1200) * 1e6 / metrics.PEAK_FLOPS[peak]
    assert estimate_mfu(student, teacher, 1e6, torch.device("cuda")) == pytest.approx(expected)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Some Future GPU")
    assert estimate_mfu(student, teacher, 1e6, torch.device("cuda")) is None


def test_attention_products_are_counted_per_token_and_layer_given_the_sequence_length(tiny_bert_dir):
    """Against FLOPs counted by hand for the two L x L products: Q K^T is L x L dot products of width d (2 d L^2
    FLOPs per layer and sequence) and so is their sum of V; per token that is 4 d L per layer."""
    from transformers import AutoModel

    teacher = type("Teacher", (), {"model": AutoModel.from_pretrained(tiny_bert_dir)})()
    student = type("Student", (torch.nn.Module,), {})()
    student.student = AutoModel.from_pretrained(tiny_bert_dir)
    weights = distill_flops_per_token(student, teacher)
    assert weights == 8 * matmul_parameters(teacher.model)  # 6 + 2 per weight, nothing for attention
    config, length = teacher.model.config, 64
    per_sequence_and_layer = 2 * (2 * config.hidden_size * length * length)
    attention = (3 + 1) * config.num_hidden_layers * per_sequence_and_layer / length  # student trains, teacher runs
    assert distill_flops_per_token(student, teacher, length) == pytest.approx(weights + attention)


def test_a_paused_stretch_is_not_the_windows_training_time(monkeypatch):
    """An evaluation or a save inside a window leaves out its own time only, wherever in the window it falls."""
    from dist_kd.train import common

    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    window = common.LossWindow(torch.device("cpu"))
    now[0] += 2.0  # training
    window.add({"loss": torch.tensor(1.0)}, tokens=10, rows=1)
    with window.paused():
        now[0] += 30.0  # an evaluation
    now[0] += 1.0  # training
    window.add({"loss": torch.tensor(3.0)}, tokens=10, rows=1)
    stats = window.reduce()
    assert stats.seconds == pytest.approx(3.0) and stats.tokens == 20 and stats.values["loss"] == pytest.approx(2.0)
