"""``report.md`` and PNG plots for any run directory (general, task, finetune): ``dist-kd report RUN_DIR``.

It reads only what a run writes (``metrics.jsonl``, ``summary.json``, ``eval.json``; a fine-tuning
directory's ``report.json``), so it works on a run that is finished, still going or preempted, and it runs
at the end of every general and task run. Plots:

- ``loss.png``: the loss and each loss term over steps (log scale), per-task losses of a task run, and one
  line per teacher of a fine-tuning directory;
- ``lr_throughput.png``: learning rate and tokens (fine-tuning: samples) per second over steps;
- ``quality.png`` (general, with held-out text): spread and probe accuracy at step 0 (summary.json's) and at
  each evaluation, the teacher's as dashed lines;
- ``dev.png`` (task): each task's dev metric at each evaluation.

Without matplotlib the report is written without plots, and says so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_kd.io import atomic_path

logger = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The parsed lines of ``metrics.jsonl`` (damaged lines skipped, as a resume skips them)."""
    from dist_kd.train.metrics import MetricsLogger

    return MetricsLogger(run_dir, enabled=False).records()


def _read_json(path: Path) -> dict[str, Any] | None:
    """``path`` parsed, or None: absent (a run that has not written it yet), or damaged (said in a warning; the
    report leaves its section out)."""
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("%s is damaged (%s); the report leaves out what it holds", path, err)
        return None
    if not isinstance(loaded, dict):
        logger.warning("%s holds a %s, not an object; the report leaves out what it holds", path, type(loaded).__name__)
        return None
    return loaded


SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError)  # a JSON object of another shape


def _section(path: Path, build: Callable[[], Any], empty: Any) -> Any:
    """``build()``, or ``empty`` where ``path`` (valid JSON) does not hold what a dist_kd run writes there: said in
    a warning naming the file, and the report leaves that section out instead of failing whole."""
    try:
        return build()
    except SHAPE_ERRORS as err:
        logger.warning(
            "%s does not hold what a dist_kd run writes there (%s: %s); the report leaves out what it holds",
            path, type(err).__name__, err,
        )  # fmt: skip
        return empty


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def _plots(run_dir: Path, records, evaluations, quality_records) -> list[str]:
    """Write the PNGs; returns their file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def save(fig, name):
        with atomic_path(run_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    terms = sorted({k for r in records for k in r if k == "loss" or k.startswith("loss_")})
    # Each task's loss where a line holds it as a number (a hand-edited or foreign line may hold anything).
    task_losses = [(r["step"], name, value) for r in records if isinstance(r.get("task_loss"), dict)
                   for name, value in r["task_loss"].items() if isinstance(value, int | float)]  # fmt: skip
    task_names = sorted({name for _, name, _ in task_losses})
    runs = _by_teacher(records)  # a fine-tuning directory: each teacher's steps count from 1 again
    if terms:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, part in runs.items():
            for key in terms:
                name = f"{label} {key}".strip()
                ax.plot(*_series(part, key), label=name, linewidth=2 if key == "loss" else 1)
        for name in task_names:
            points = [(step, value) for step, task, value in task_losses if task == name]
            ax.plot([step for step, _ in points], [value for _, value in points], linestyle=":", label=f"task {name}")
        if all(v > 0 for key in terms for v in _series(records, key)[1]):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title("loss terms")
        ax.legend(fontsize=8)
        save(fig, "loss.png")
    if any("lr" in r for r in records):
        speed = "tokens_per_s" if any("tokens_per_s" in r for r in records) else "samples_per_s"
        fig, left = plt.subplots(figsize=(7, 4))
        right = left.twinx()
        for index, (label, part) in enumerate(runs.items()):
            style = ("-", "--", ":", "-.")[index % 4]  # the teachers of a fine-tuning directory apart
            left.plot(*_series(part, "lr"), color="tab:blue", linestyle=style, label=f"{label} lr".strip())
            right.plot(*_series(part, speed), color="tab:orange", linestyle=style)
        left.set_xlabel("step")
        left.set_ylabel("learning rate", color="tab:blue")
        right.set_ylabel(speed.replace("_per_s", " / s"), color="tab:orange")
        if len(runs) > 1:  # one line per teacher: say which is which
            for line, label in zip(right.get_lines(), runs, strict=True):
                line.set_label(f"{label} {speed.replace('_per_s', ' / s')}")
            left.legend(handles=left.get_lines() + right.get_lines(), fontsize=7)
        left.set_title("schedule and throughput")
        save(fig, "lr_throughput.png")
    if quality_records:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, color in (("spread", "tab:red"), ("probe", "tab:green")):
            steps, values = _series(quality_records, f"eval_{key}")
            ax.plot(steps, values, marker="o", color=color, label=f"student {key}")
            _, teacher = _series(quality_records, f"eval_{key}_teacher")
            if teacher:
                ax.axhline(teacher[-1], color=color, linestyle="--", label=f"teacher {key}")
        ax.set_xlabel("step")
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
        ax.set_title("held-out quality (spread: 1 = collapsed)")
        ax.legend(fontsize=8)
        save(fig, "quality.png")
    if evaluations:
        fig, ax = plt.subplots(figsize=(7, 4))
        for task, (metric, points) in evaluations.items():
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=f"{task} ({metric})")
        ax.set_xlabel("step")
        ax.set_title("dev metrics")
        ax.legend(fontsize=8)
        save(fig, "dev.png")
    return written


def current_texts(evaluations: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The held-out evaluations measured on the texts and settings of the last one (``eval_texts``), and the others
    (a resume on other texts: one line across both compared figures of different texts). Lines of a release
    that did not record ``eval_texts`` are kept: nothing tells them apart."""
    current = evaluations[-1].get("eval_texts") if evaluations else None
    if current is None:
        return evaluations, []
    other = [r for r in evaluations if r.get("eval_texts") not in (None, current)]
    return [r for r in evaluations if r.get("eval_texts") in (None, current)], other


def _by_teacher(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{"": records}``, or for a fine-tuning directory (lines carry ``teacher``) ``{"teacher k": its lines}``."""
    teachers = sorted({r["teacher"] for r in records if isinstance(r.get("teacher"), int)})
    if not teachers:
        return {"": records}
    return {f"teacher {k}": [r for r in records if r.get("teacher") == k] for k in teachers}


def _task_evaluations(eval_report: dict[str, Any] | None) -> dict[str, tuple[str, list[tuple[int, float]]]]:
    if not eval_report:
        return {}
    found = {}
    for task, entry in (eval_report.get("tasks") or {}).items():
        if not isinstance(entry, dict):  # a task whose entry was never written
            continue
        metric = entry.get("metric")
        points = [
            (h["step"], h["tasks"][task][metric])
            for h in eval_report.get("history") or []
            if isinstance((h.get("tasks", {}).get(task) or {}).get(metric), int | float)
        ]
        found[task] = (metric, points)
    return found


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return "n/a" if value is None else str(value)


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` and its plots; returns the report's path.

    Raises:
        FileNotFoundError: ``run_dir`` holds no ``metrics.jsonl`` (not a run directory).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a dist_kd run directory")
    records = read_metrics(run_dir)
    summary = _read_json(run_dir / "summary.json")
    eval_report = _read_json(run_dir / "eval.json")
    quality_records, other_texts = current_texts([r for r in records if "eval_spread" in r])
    # Step 0's measurement is summary.json's (metrics.jsonl's first line is after the first steps): without it a
    # run shorter than eval.every plotted one point.
    start = _section(run_dir / "summary.json",
                     lambda: (((summary or {}).get("quality") or {}).get("rows") or {}).get("student at step 0"),
                     None)  # fmt: skip
    if isinstance(start, dict) and not any(r.get("step") == 0 for r in quality_records):
        quality_records = [
            {"step": 0, "eval_spread": start.get("spread"), "eval_probe": start.get("probe")},
            *quality_records,
        ]
    evaluations = _section(run_dir / "eval.json", lambda: _task_evaluations(eval_report), {})
    finetune, left_out = None, []
    if "" not in _by_teacher(records):  # a fine-tuning directory: its ensemble is report.json's teachers
        finetune = _read_json(run_dir / "report.json")
        records, left_out = _section(run_dir / "report.json", lambda: _ensemble_records(records, finetune),
                                     (records, []))  # fmt: skip
    plots = _plots(run_dir, records, evaluations, quality_records)

    lines = [f"# Run report: {run_dir}", ""]
    runs = _by_teacher(records)
    if "" not in runs:  # fine-tuned teachers: one row each, then their dev metrics
        lines += _loss_lines(runs)
        if left_out:
            names = ", ".join(f"teacher-{k}" for k in left_out)
            lines += [f"metrics.jsonl also holds the lines of {names}, of an earlier run with more teachers: not in "
                      "this ensemble (report.json), left out here.", ""]  # fmt: skip
        lines += _section(run_dir / "report.json", lambda: _finetune_lines(finetune), [])
    elif records:
        first, last = records[0], records[-1]
        speeds = [r["tokens_per_s"] for r in records if isinstance(r.get("tokens_per_s"), int | float)]
        lines += [
            f"{len(records)} logged steps, {first['step']} to {last['step']}"
            + (f"; {last['tokens_seen']:,} tokens" if isinstance(last.get("tokens_seen"), int) else "")
            + (f"; median {statistics.median(speeds):,.0f} tokens/s" if speeds else "")
            + ".",
            "",
            "| term | first log | last log |",
            "| --- | --- | --- |",
        ]
        # Lines of windows that trained on nothing (fully masked batches, data.skip_corrupt) carry no loss.
        logged = [r for r in records if "loss" in r] or [last]
        terms = [k for k in logged[-1] if k == "loss" or k.startswith("loss_")]
        lines += [f"| {key} | {_fmt(logged[0].get(key))} | {_fmt(logged[-1].get(key))} |" for key in terms]
        lines.append("")
    lines += _section(run_dir / "summary.json", lambda: _quality_lines((summary or {}).get("quality")), [])
    lines += _section(run_dir / "eval.json", lambda: _dev_lines(evaluations, eval_report), [])
    if other_texts:
        steps = [r.get("step") for r in other_texts]
        lines += [f"{len(other_texts)} held-out evaluation(s) in metrics.jsonl (steps {steps[0]} to {steps[-1]}) were "
                  "measured on other held-out texts or eval settings, before a resume that changed them: left out of "
                  "quality.png.", ""]  # fmt: skip
    if plots:
        lines += ["## Plots", ""] + [f"![{name[:-4]}]({name})" for name in plots] + [""]
    elif importlib.util.find_spec("matplotlib") is None:
        lines += ["(No plots: install matplotlib, then run `dist-kd report RUN_DIR` again.)", ""]
    else:
        lines += ["(No plots yet: nothing logged to draw; `dist-kd report RUN_DIR` again once the run has logged.)", ""]
    path = run_dir / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def _quality_lines(quality: dict[str, Any] | None) -> list[str]:
    """summary.json's held-out quality table (none without it)."""
    lines: list[str] = []
    if quality:
        from dist_kd.quality import pooling_note

        lines += [
            f"## Quality on {quality['num_texts']} held-out texts ({quality['texts']})",
            "",
            f"spread = mean cosine between sentence embeddings{pooling_note(quality)} (1 = collapsed); probe = "
            "linear-probe accuracy",
            "",
            "| model | spread | probe | probe / teacher |",
            "| --- | --- | --- | --- |",
        ]
        for name in quality.get("order", quality["rows"]):
            row = quality["rows"][name]
            lines.append(f"| {name} | {_fmt(row['spread'])} | {_fmt(row['probe'])} | {_fmt(row['probe_ratio'])} |")
        lines.append("")
    return lines


def _dev_lines(evaluations: dict[str, Any], eval_report: dict[str, Any] | None) -> list[str]:
    """eval.json's final and best dev metrics per task (none without evaluations)."""
    lines: list[str] = []
    if evaluations and eval_report:
        lines += ["## Dev metrics", "", "| task | metric | final | best (step) |", "| --- | --- | --- | --- |"]
        for task, (metric, _) in evaluations.items():  # the tasks _task_evaluations could read
            entry = eval_report["tasks"][task]
            final = (entry.get("final") or {}).get(metric)
            best = entry.get("best") or {}
            # an intermediate-phase run keeps no best model: "n/a (None)" before
            best_cell = f"{_fmt(best.get(metric))} ({best.get('step')})" if best.get("step") is not None else "–"
            lines.append(f"| {task} | {metric} | {_fmt(final)} | {best_cell} |")
        lines.append("")
    return lines


def _ensemble_records(records: list[dict[str, Any]], finetune: dict[str, Any] | None) -> tuple[list, list[int]]:
    """A fine-tuning directory's lines of the teachers in report.json's ensemble, and the numbers of those left
    out (a rerun with fewer teachers leaves teacher-K+1.. and their lines behind). Without report.json (a run
    not finished), every line."""
    if not finetune or not finetune.get("teachers"):
        return records, []
    kept = {int(str(t["dir"]).removeprefix("teacher-")) for t in finetune["teachers"]}
    left_out = sorted({r["teacher"] for r in records if isinstance(r.get("teacher"), int)} - kept)
    return [r for r in records if r.get("teacher") not in left_out], left_out


def _loss_lines(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Each fine-tuned teacher's logged loss and speed."""
    lines = [
        "| teacher | logged steps | first loss | last loss | median samples/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, part in runs.items():
        speeds = [r["samples_per_s"] for r in part if isinstance(r.get("samples_per_s"), int | float)]
        median = f"{statistics.median(speeds):,.0f}" if speeds else "-"
        lines.append(f"| {label} | {part[0]['step']} to {part[-1]['step']} | {_fmt(part[0].get('loss'))} | "
                     f"{_fmt(part[-1].get('loss'))} | {median} |")  # fmt: skip
    lines.append("")
    return lines


def _finetune_lines(finetune: dict[str, Any] | None) -> list[str]:
    """report.json's dev metrics of each teacher and of their ensemble (none without it)."""
    lines: list[str] = []
    if finetune and finetune.get("teachers"):
        metric = finetune.get("metric")
        lines += [f"## Dev {metric} ({finetune.get('num_dev')} rows)", "", "| model | " + str(metric) + " |",
                  "| --- | --- |"]  # fmt: skip
        for teacher in finetune["teachers"]:
            lines.append(f"| {teacher.get('dir')} | {_fmt((teacher.get('dev') or {}).get(metric))} |")
        averaged = "outputs" if finetune.get("task_type") == "regression" else "probabilities"
        lines += [f"| ensemble (mean of the teachers' {averaged}) | "
                  f"{_fmt((finetune.get('ensemble_dev') or {}).get(metric))} |", ""]  # fmt: skip
    return lines


def report_at_end(run_dir: str | Path) -> str:
    """The end-of-run report; a failure to plot never fails the run (returns the line to print)."""
    import logging

    try:
        return f"report: {write_report(run_dir)}"
    except Exception as err:  # noqa: BLE001 - the run's outputs are written; the report is a convenience
        logging.getLogger(__name__).warning("could not write the run report: %s", err)
        return f"report: not written ({err})"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from dist_kd.cli import bad_input

    parser = argparse.ArgumentParser(description="report.md and PNG plots of a run directory")
    parser.add_argument("run_dirs", nargs="+", help="run directories (general, task or finetune)")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:  # one bad directory does not cost the others their report
        try:
            print(f"wrote {write_report(run_dir)}")
        except OSError as err:  # FileNotFoundError: not a run directory; others: a report it cannot write
            status = bad_input(err)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
