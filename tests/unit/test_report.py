"""Run reports: tables from what the run wrote (independent of the trainer), valid PNG plots, a clear error for
a directory that is not a run."""

from __future__ import annotations

import json

import pytest

from dist_kd.report import main, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _general_run(run_dir):
    run_dir.mkdir()
    lines = []
    for step in range(10, 101, 10):
        record = {"step": step, "loss": 10.0 / step, "loss_attn": 6.0 / step, "loss_hidden": 4.0 / step,
                  "lr": 1e-4, "tokens_per_s": 1000.0 + step, "tokens_seen": step * 512}  # fmt: skip
        if step % 50 == 0:
            record.update(eval_spread=0.5, eval_spread_teacher=0.07, eval_probe=0.9, eval_probe_teacher=0.94)
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 110, "lo')  # a cut-off last line
    quality = {"texts": "dev.jsonl", "num_texts": 400, "order": ["teacher", "student at step 100"],
               "rows": {"student at step 100": {"spread": 0.5, "probe": 0.9, "probe_ratio": 0.9 / 0.94},
                        "teacher": {"spread": 0.07, "probe": 0.94, "probe_ratio": 1.0}}}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps({"lines": [], "quality": quality}))


def test_general_run_report_tables_and_plots(tmp_path):
    run = tmp_path / "run"
    _general_run(run)
    text = write_report(run).read_text()
    assert "10 logged steps, 10 to 100; 51,200 tokens; median 1,060 tokens/s." in text
    assert "| loss | 1 | 0.1 |" in text and "| loss_attn | 0.6 | 0.06 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| teacher") or line.startswith("| student")]
    assert rows == ["| teacher | 0.07 | 0.94 | 1 |", "| student at step 100 | 0.5 | 0.9 | 0.9574 |"]
    pytest.importorskip("matplotlib")
    for name in ("loss.png", "lr_throughput.png", "quality.png"):
        assert (run / name).read_bytes()[:8] == PNG and f"![{name[:-4]}]({name})" in text


def test_task_run_report_has_dev_metrics(tmp_path):
    run = tmp_path / "task"
    run.mkdir()
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "tokens_per_s": 500.0, "task_loss": {"topic": 1.0 / s}}
               for s in (5, 10)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    history = [{"step": 5, "tasks": {"topic": {"accuracy": 0.7}}}, {"step": 10, "tasks": {"topic": {"accuracy": 0.8}}}]
    report = {"tasks": {"topic": {"metric": "accuracy", "final": {"accuracy": 0.8}, "best": {"step": 10,
              "accuracy": 0.8}}}, "history": history}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(report))
    text = write_report(run).read_text()
    assert "| topic | accuracy | 0.8 | 0.8 (10) |" in text
    if pytest.importorskip("matplotlib"):
        assert (run / "dev.png").read_bytes()[:8] == PNG


def test_not_a_run_directory_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} has no metrics.jsonl: not a dist_kd run directory\n"


def test_a_run_with_nothing_to_plot_says_so_not_to_install_matplotlib(tmp_path, monkeypatch):
    """A run that has logged nothing yet was told to install matplotlib, which was installed."""
    import importlib.util

    from dist_kd import report

    (tmp_path / "metrics.jsonl").write_text("")
    assert importlib.util.find_spec("matplotlib") is not None  # installed with dist_kd's dev extra
    text = write_report(tmp_path).read_text()
    assert "No plots yet: nothing logged to draw" in text and "install matplotlib" not in text
    real = importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    assert "No plots: install matplotlib" in write_report(tmp_path).read_text()
