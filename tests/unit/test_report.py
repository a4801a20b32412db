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
    # the median of ten speeds is the mean of the middle two
    assert "10 logged steps, 10 to 100; 51,200 tokens; median 1,055 tokens/s." in text
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


def test_a_damaged_eval_json_is_said_and_left_out(tmp_path, caplog):
    """A cut eval.json made the dev section vanish without a word; a task entry of null was an AttributeError."""
    import logging

    run = tmp_path / "task"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0, "lr": 1e-4}) + "\n")
    (run / "eval.json").write_text('{"tasks": {"topic": {"metric": "acc')
    with caplog.at_level(logging.WARNING, logger="dist_kd.report"):
        text = write_report(run).read_text()
    assert f"{run / 'eval.json'} is damaged" in caplog.text and "## Dev metrics" not in text
    (run / "eval.json").write_text(
        json.dumps({"tasks": {"topic": None, "share": {"metric": "pearson"}}, "history": []})
    )
    text = write_report(run).read_text()  # no traceback: the null entry is left out, the other listed
    assert "| share | pearson | n/a |" in text and "| topic |" not in text


def test_task_losses_of_another_shape_are_left_out_of_the_loss_plot(tmp_path):
    """A metrics.jsonl line whose task_loss was a list, a string or held a list (hand-edited, or another tool's)
    was a TypeError/IndexError traceback: no report at all."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "task"
    run.mkdir()
    odd = [["topic"], "topic", {"topic": [0.5]}, {"topic": None}]
    records = [{"step": 5 * (i + 1), "loss": 1.0, "task_loss": value} for i, value in enumerate(odd)]
    records.append({"step": 30, "loss": 0.5, "task_loss": {"topic": 0.4}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report(run).read_text()
    assert "5 logged steps, 5 to 30" in text
    assert (run / "loss.png").read_bytes()[:8] == PNG


def test_json_of_another_shape_is_said_and_its_section_left_out(tmp_path, caplog):
    """Valid JSON of another shape (a hand-edited or truncated-by-a-tool file) was a TypeError or KeyError
    traceback, and at the end of a run "report: not written ('num_texts')": the whole report lost over one
    section, naming neither the file nor the field."""
    import logging

    run = tmp_path / "run"
    _general_run(run)
    (run / "summary.json").write_text(json.dumps({"quality": {"rows": {}}}))  # no num_texts, no texts
    (run / "eval.json").write_text(json.dumps({"tasks": {"topic": {"metric": "accuracy"}}, "history": ["step 5"]}))
    with caplog.at_level(logging.WARNING, logger="dist_kd.report"):
        text = write_report(run).read_text()
    for name, error in (("summary.json", "KeyError: 'num_texts'"), ("eval.json", "AttributeError")):
        assert f"{run / name} does not hold what a dist_kd run writes there ({error}" in caplog.text, caplog.text
    assert "10 logged steps, 10 to 100" in text  # the rest of the report is there
    assert "## Quality" not in text and "## Dev metrics" not in text
    (run / "eval.json").write_text(json.dumps({"tasks": {"topic": {"metric": "accuracy"}}, "history": None}))
    assert "| topic | accuracy | n/a |" in write_report(run).read_text()  # no history yet: nothing to plot
    # Quality rows of another shape: the step-0 lookup ran outside the sections (AttributeError traceback).
    for rows in (["teacher"], 3):
        caplog.clear()
        (run / "summary.json").write_text(json.dumps({"quality": {"rows": rows}}))
        with caplog.at_level(logging.WARNING, logger="dist_kd.report"):
            assert "10 logged steps, 10 to 100" in write_report(run).read_text()
        assert f"{run / 'summary.json'} does not hold what a dist_kd run writes there" in caplog.text, rows


def test_finetune_report_has_a_row_and_a_loss_line_per_teacher(tmp_path, monkeypatch):
    """A fine-tuning directory logs K teachers whose steps each start again at 1: one table row per teacher
    (not the first teacher's first line against the last one's last), the dev metrics of report.json, and
    a loss plot line per teacher."""
    run = tmp_path / "teachers"
    run.mkdir()
    records = [{"teacher": k, "step": s, "loss": k / s, "lr": 1e-5, "samples_per_s": 100.0 * k}
               for k in (1, 2) for s in (10, 20, 30)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    finetune = {"metric": "accuracy", "task_type": "classification", "num_dev": 400,
                "teachers": [{"dir": "teacher-1", "dev": {"accuracy": 0.91}}, {"dir": "teacher-2",
                             "dev": {"accuracy": 0.93}}], "ensemble_dev": {"accuracy": 0.94}}  # fmt: skip
    (run / "report.json").write_text(json.dumps(finetune))
    text = write_report(run).read_text()
    assert "| teacher 1 | 10 to 30 | 0.1 | 0.03333 | 100 |" in text
    assert "| teacher 2 | 10 to 30 | 0.2 | 0.06667 | 200 |" in text
    assert "## Dev accuracy (400 rows)" in text and "| teacher-2 | 0.93 |" in text
    assert "| ensemble (mean of the teachers' probabilities) | 0.94 |" in text
    assert "logged steps, 10 to 30" not in text  # the single-run summary would mix the teachers
    matplotlib = pytest.importorskip("matplotlib")
    assert (run / "loss.png").read_bytes()[:8] == PNG and (run / "lr_throughput.png").read_bytes()[:8] == PNG
    import dist_kd.report as report

    drawn = _plotted_labels(monkeypatch, matplotlib)
    report._plots(run, records, {}, [])
    assert {"teacher 1 loss", "teacher 2 loss"} <= set(drawn)


def test_finetune_report_leaves_out_teachers_beyond_the_ensemble(tmp_path, monkeypatch):
    """A rerun with --num-teachers 2 after 3 leaves teacher-3 and its metrics.jsonl lines behind (with a warning):
    the report's table and plots are report.json's ensemble, and a line says what was left out."""
    run = tmp_path / "teachers"
    run.mkdir()
    records = [{"teacher": k, "step": s, "loss": k / s, "lr": 1e-5, "samples_per_s": 100.0 * k}
               for k in (1, 2, 3) for s in (10, 20)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    finetune = {"metric": "accuracy", "task_type": "classification", "num_dev": 400,
                "teachers": [{"dir": f"teacher-{k}", "dev": {"accuracy": 0.9}} for k in (1, 2)],
                "ensemble_dev": {"accuracy": 0.94}}  # fmt: skip
    (run / "report.json").write_text(json.dumps(finetune))
    matplotlib = pytest.importorskip("matplotlib")
    drawn = _plotted_labels(monkeypatch, matplotlib)
    text = write_report(run).read_text()
    assert "| teacher 1 | 10 to 20 |" in text and "| teacher 2 | 10 to 20 |" in text
    assert "| teacher 3 |" not in text and "teacher 3 loss" not in drawn and "teacher 1 loss" in drawn
    assert "metrics.jsonl also holds the lines of teacher-3, of an earlier run with more teachers" in text
    # Before report.json (a run still training its teachers), every teacher's lines are shown.
    (run / "report.json").unlink()
    assert "| teacher 3 | 10 to 20 |" in write_report(run).read_text()


def test_not_a_run_directory_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path} has no metrics.jsonl: not a dist_kd run directory\n"
    # Among several, the others still get their report (the first bad one stopped the rest), and the exit says.
    run = tmp_path / "run"
    _general_run(run)
    assert main([str(tmp_path / "missing"), str(run)]) == 2
    out, err = capsys.readouterr()
    assert out == f"wrote {run / 'report.md'}\n" and (run / "report.md").is_file()
    assert err == f"error: {tmp_path / 'missing'} has no metrics.jsonl: not a dist_kd run directory\n"


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


def test_a_dev_table_without_a_best_model_says_so_once():
    """An intermediate-phase task run keeps no best model: its row read "n/a (None)"."""
    from dist_kd.report import _dev_lines

    evaluations = {"topic": ("loss", None), "sentiment": ("accuracy", None)}
    tasks = {
        "topic": {"final": {"loss": 2.832}},
        "sentiment": {"final": {"accuracy": 0.5}, "best": {"accuracy": 0.75, "step": 4}},
    }
    lines = _dev_lines(evaluations, {"tasks": tasks})
    assert "| topic | loss | 2.832 | – |" in lines and "| sentiment | accuracy | 0.5 | 0.75 (4) |" in lines


def test_quality_plot_starts_at_the_step_0_measurement_of_the_summary(tmp_path, monkeypatch):
    """Step 0 is measured (summary.json's "student at step 0") but not logged: a run shorter than eval.every
    plotted a single point."""
    import dist_kd.report as report

    run = tmp_path / "run"
    _general_run(run)
    summary = json.loads((run / "summary.json").read_text())
    summary["quality"]["rows"]["student at step 0"] = {"spread": 0.7, "probe": 0.8, "probe_ratio": 0.8 / 0.94}
    (run / "summary.json").write_text(json.dumps(summary))
    seen = []
    monkeypatch.setattr(report, "_plots", lambda run_dir, records, evaluations, quality: seen.append(quality) or [])
    write_report(run)
    assert [(r["step"], r["eval_spread"], r["eval_probe"]) for r in seen[0]] == [(0, 0.7, 0.8), (50, 0.5, 0.9),
                                                                                (100, 0.5, 0.9)]  # fmt: skip


def test_evaluations_on_other_held_out_texts_before_a_resume_are_left_out_of_the_quality_plot(tmp_path, monkeypatch):
    """A run resumed with other eval.texts drew the lines of both sets of texts as one student line, against the
    teacher's figure on the last set alone."""
    import dist_kd.report as report

    run = tmp_path / "run"
    _general_run(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    extra = []
    for record in records:
        if "eval_spread" in record:
            record["eval_texts"] = "aaaa" if record["step"] == 50 else "bbbb"
    for step, spread in ((120, 0.4), (150, 0.3)):
        extra.append({"step": step, "loss": 0.05, "eval_spread": spread, "eval_spread_teacher": 0.1, "eval_probe": 0.8,
                      "eval_probe_teacher": 0.85, "eval_texts": "bbbb" if step == 150 else "aaaa"})  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + extra))
    seen = []
    monkeypatch.setattr(report, "_plots", lambda run_dir, records, evaluations, quality: seen.append(quality) or [])
    text = write_report(run).read_text()
    assert [(r["step"], r["eval_spread"]) for r in seen[0]] == [(100, 0.5), (150, 0.3)]
    assert ("2 held-out evaluation(s) in metrics.jsonl (steps 50 to 120) were measured on other held-out texts or "
            "eval settings") in text  # fmt: skip
    for record in records + extra:  # lines of a release that wrote no eval_texts: all kept, as before
        record.pop("eval_texts", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records + extra))
    assert "measured on other held-out texts" not in write_report(run).read_text()
    assert [r["step"] for r in seen[1]] == [50, 100, 120, 150]


def _plotted_labels(monkeypatch, matplotlib) -> list:
    """The label of every line the report draws from now on, in order."""
    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def plot(self, *args, **kwargs):
        drawn.append(kwargs.get("label"))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    return drawn
