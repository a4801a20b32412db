"""Helpers of the real end-to-end example (launch/example.sh): task files from the assets, and the report.

    python launch/example.py data --output data/example
    python launch/example.py corpus-files --exclude data/example/topic_dev.jsonl --output data/quickstart/files.txt
    python launch/example.py report --teachers topic=runs/example/teachers-topic ... \
        --students "student (distilled)=runs/example/student-kd" ... --output runs/example/report.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if (Path(__file__).resolve().parents[1] / "dist_kd" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        if "=" not in value:
            raise ValueError(f"{flag} takes NAME=PATH, got {value!r}")
        name, path = value.split("=", 1)
        pairs[name] = path
    return pairs


def main(argv: list[str] | None = None) -> int:
    from dist_kd.example import (
        asset_paths,
        bbc_corpus_files,
        comparison,
        comparison_lines,
        prepare_example_data,
        read_timings,
        timing_lines,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    data = commands.add_parser("data", help="write topic_/sentiment_ train/dev JSONL files")
    data.add_argument("--output", required=True)
    data.add_argument("--topic-sizes", type=int, nargs=2, default=[1000, 400], metavar=("TRAIN", "DEV"))
    data.add_argument("--sentiment-sizes", type=int, nargs=2, default=[3000, 1000], metavar=("TRAIN", "DEV"))
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
            from dist_kd.io import atomic_path

            paths = bbc_corpus_files(asset_paths()["bbc"], args.exclude)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(Path(args.output)) as tmp:
                tmp.write_text("".join(f"{path}\n" for path in paths))
            print(f"{len(paths)} BBC articles -> {args.output}")
            return 0
        teachers = {task: Path(path) / "report.json" for task, path in _pairs(args.teachers, "--teachers").items()}
        table = comparison(teachers, _pairs(args.students, "--students"))
        lines = comparison_lines(table)
        if args.timings:
            table["timings"] = read_timings(args.timings)
            lines += timing_lines(table["timings"])
        print("\n".join(lines))
        if args.output:
            from dist_kd.io import atomic_path, write_json_atomic

            output = Path(args.output)
            output.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(output) as tmp:
                tmp.write_text("\n".join(lines) + "\n")
            write_json_atomic(output.with_suffix(".json"), table)
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
