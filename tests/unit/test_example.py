"""The real example's data preparation and report, on small files laid out like the assets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from launch.example import (
    TOPIC_LABELS,
    bbc_examples,
    comparison,
    comparison_lines,
    prepare_example_data,
    stratified_split,
    tweet_examples,
)


@pytest.fixture
def assets(tmp_path):
    bbc = tmp_path / "bbc"
    for k, label in enumerate(TOPIC_LABELS):
        (bbc / label).mkdir(parents=True)
        for i in range(4 + k):
            (bbc / label / f"{i:03d}.txt").write_bytes(
                f"Title {label} {i}\n\nBody  text\nof {label}.\xa3".encode("latin-1")
            )
    tweets = tmp_path / "tweets.csv"
    lines = ["sentiment,confidence,text"]
    for i in range(30):
        lines.append(f'{["negative", "neutral", "positive"][i % 3]},0.9,"tweet {i}, with a comma\nand a newline"')
    tweets.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return bbc, tweets


def test_readers_keep_every_document_with_its_label(assets):
    bbc, tweets = assets
    rows = bbc_examples(bbc)
    assert len(rows) == sum(4 + k for k in range(5))
    assert rows[0] == {
        "example_id": "business/000",
        "text": "Title business 0 Body text of business.\ufffd",
        "label": "business",
    }
    tweet_rows = tweet_examples(tweets)
    assert len(tweet_rows) == 30 and tweet_rows[1]["text"] == "tweet 1, with a comma and a newline"
    assert Counter(r["label"] for r in tweet_rows) == {"negative": 10, "neutral": 10, "positive": 10}


def test_stratified_split_is_seeded_disjoint_and_keeps_label_shares():
    rows = [{"example_id": str(i), "label": "a" if i < 60 else "b"} for i in range(100)]
    train, dev = stratified_split(rows, 50, 20, seed=3)
    assert (train, dev) == stratified_split(rows, 50, 20, seed=3)
    assert train != stratified_split(rows, 50, 20, seed=4)[0]
    assert not {r["example_id"] for r in train} & {r["example_id"] for r in dev}
    assert Counter(r["label"] for r in dev) == {"a": 12, "b": 8}
    assert Counter(r["label"] for r in train) == {"a": 30, "b": 20}
    with pytest.raises(ValueError, match="there are 100"):
        stratified_split(rows, 90, 20, seed=0)
    five = [{"example_id": str(i), "label": "abcde"[i % 5]} for i in range(100)]  # 1 row of 5 classes rounds to 0
    with pytest.raises(ValueError, match=r"1 train \+ 1 dev rows over 5 classes give an empty split"):
        stratified_split(five, 1, 1, seed=0)


def test_prepare_writes_four_task_files(assets, tmp_path):
    bbc, tweets = assets
    counts = prepare_example_data(tmp_path / "out", topic_sizes=(20, 5), sentiment_sizes=(12, 6), bbc_dir=bbc,
                                  tweets_csv=tweets)  # fmt: skip
    assert counts == {"topic_train": 20, "topic_dev": 5, "sentiment_train": 12, "sentiment_dev": 6}
    first = json.loads((tmp_path / "out" / "topic_train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"example_id", "text", "label"}


def test_comparison_puts_teachers_ensemble_and_students_side_by_side(tmp_path):
    report = {
        "metric": "accuracy",
        "teachers": [{"dir": "teacher-1", "dev": {"accuracy": 0.9}}, {"dir": "teacher-2", "dev": {"accuracy": 0.8}}],
        "ensemble_dev": {"accuracy": 0.95},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval.json").write_text(
        json.dumps({"tasks": {"topic": {"metric": "accuracy", "final": {"accuracy": 0.93}}}})
    )
    table = comparison({"topic": tmp_path / "report.json"}, {"student": run})
    topic = table["tasks"]["topic"]
    assert topic["best_teacher"] == 0.9 and topic["mean_teacher"] == pytest.approx(0.85)
    assert topic["rows"] == [
        ["teacher teacher-1", 0.9, 1.0],
        ["teacher teacher-2", 0.8, pytest.approx(0.8 / 0.9)],
        ["ensemble of 2 (mean softmax)", 0.95, pytest.approx(0.95 / 0.9)],
        ["student", 0.93, pytest.approx(0.93 / 0.9)],
    ]
    assert "| student | 0.9300 | 1.0333 |" in comparison_lines(table)


def test_corpus_files_leave_out_the_dev_articles(assets, tmp_path):
    from launch.example import bbc_corpus_files

    bbc, _ = assets
    every = bbc_corpus_files(bbc)
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"example_id": f"{every[0].parent.name}/{every[0].stem}", "text": "t", "label": "x"}))
    kept = bbc_corpus_files(bbc, dev)
    assert kept == every[1:]


def test_timings_add_up_repeated_parts_and_reject_bad_lines(tmp_path):
    from launch.example import read_timings, timing_lines

    path = tmp_path / "timings.txt"
    path.write_text("teachers_topic 120\nquickstart 300\n\nteachers_topic 60\n")
    timings = read_timings(path)
    assert timings == {"teachers_topic": 180.0, "quickstart": 300.0}
    lines = timing_lines(timings)
    assert "| teachers_topic | 3.0 |" in lines and "| total | 8.0 |" in lines
    # Parts run side by side: the invocation's wall time is the total, the parts' sum is shown beside it.
    path.write_text("quickstart 300\nstudent_a 240\nstudent_b 240\nwall 720\n")
    lines = timing_lines(read_timings(path))
    assert "| total | 12.0 |" in lines and "| sum of the parts (some ran side by side) | 13.0 |" in lines
    assert not any(line.startswith("| wall") for line in lines)
    path.write_text("quickstart five minutes\n")
    with pytest.raises(ValueError, match="line 1 is not 'NAME SECONDS'"):
        read_timings(path)


def test_report_embeds_the_dev_curves_of_every_student(tmp_path):
    """launch/example.py report --output: the comparison table, a dev-curve plot and links to each run's report."""
    import json

    from launch.example import main

    teachers = tmp_path / "teachers"
    teachers.mkdir()
    (teachers / "report.json").write_text(json.dumps({
        "metric": "accuracy", "teachers": [{"dir": "teacher-1", "dev": {"accuracy": 0.8}}],
        "ensemble_dev": {"accuracy": 0.82},
    }))  # fmt: skip
    runs = {}
    for name, values in (("a", [0.5, 0.7]), ("b", [0.6, 0.78])):
        run = tmp_path / name
        run.mkdir()
        history = [
            {"step": 10 * (i + 1), "epoch": i + 1.0, "tasks": {"t": {"accuracy": v}}} for i, v in enumerate(values)
        ]
        final = {"accuracy": values[-1]}
        (run / "eval.json").write_text(
            json.dumps({"history": history, "tasks": {"t": {"metric": "accuracy", "final": final}}})
        )
        (run / "report.md").write_text("# run\n")
        runs[name] = run
    output = tmp_path / "out" / "report.md"
    students = [f"{name}={run}" for name, run in runs.items()]
    assert main(["report", "--teachers", f"t={teachers}", "--students", *students, "--output", str(output)]) == 0
    text = output.read_text()
    assert "| b | 0.7800 | 0.9750 |" in text
    assert "![dev curves](dev_curves.png)" in text and (output.parent / "dev_curves.png").stat().st_size > 1000
    assert "- a: [report](../a/report.md)" in text


def test_example_sh_answers_help_and_refuses_unknown_options_before_any_work(tmp_path):
    """--help (or a mistyped --jobs=2) fell through to the overrides: the whole pipeline ran (setup, quickstart,
    teachers, stores: about 20 minutes on a CPU) before each task.py run refused them."""
    import subprocess

    script = Path(__file__).resolve().parents[2] / "launch" / "example.sh"
    shown = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "bash launch/example.sh [--all] [--jobs N] [key=value ...]" in shown.stdout
    assert "set -euo" not in shown.stdout
    for option in ("--jobs=2", "-x"):
        refused = subprocess.run(["bash", str(script), option], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and f"error: unknown option '{option}'" in refused.stderr
    # an option after an override reached every task.py run (or task.py's usage), after the whole set-up
    refused = subprocess.run(["bash", str(script), "train.epochs=1", "--all"], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "error: option '--all' after a key=value override" in refused.stderr
