"""Task-file parsing: pyarrow.csv / pyarrow.json (what dist_kd reads task files with) against the csv and json
modules line by line (its fallback for files pyarrow refuses), on the same files, in one process.

    python bench/task_files.py                    # 200,000 rows of CSV, TSV and JSONL
    python bench/task_files.py --rows 1000000 --repeats 5

Prints, per format, the best-of-N seconds of each reader, the ratio, and whether both gave the same table.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

from dist_kd.data import tasks
from dist_kd.data.tasks import resolve_task_spec
from dist_kd.testing import random_sentences


def best_of(repeats: int, read) -> tuple[float, object]:
    times, table = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        table = read()
        times.append(time.perf_counter() - start)
    return min(times), table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = resolve_task_spec("bench", labels=["a", "b", "c"], text_a="text")
    sentences = random_sentences(args.rows, seed=0, min_words=5, max_words=40)
    rows = [
        {"text": text.replace('"', "'") + ', said "someone"', "label": "abc"[i % 3]} for i, text in enumerate(sentences)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with open(root / "data.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows([row["text"], row["label"]] for row in rows)
        (root / "data.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
        (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{args.rows} rows, best of {args.repeats}")
        print(f"{'format':<8}{'pyarrow s':>12}{'line by line s':>16}{'ratio':>8}  same table")
        for fmt in ("csv", "tsv", "jsonl"):
            path = root / f"data.{fmt}"
            if fmt == "jsonl":
                fast, slow = (
                    (lambda p=path: tasks._read_jsonl(p, "utf-8")),
                    (lambda p=path: tasks._read_jsonl_python(p, "utf-8")),
                )
            else:
                fast = lambda p=path, f=fmt: tasks._read_delimited(p, f, spec, "utf-8")  # noqa: E731
                slow = lambda p=path, f=fmt: tasks._read_delimited_python(p, f, spec, "utf-8")  # noqa: E731
            fast_s, fast_table = best_of(args.repeats, fast)
            slow_s, slow_table = best_of(args.repeats, slow)
            print(f"{fmt:<8}{fast_s:>12.3f}{slow_s:>16.3f}{slow_s / fast_s:>7.1f}x  {fast_table.equals(slow_table)}")


if __name__ == "__main__":
    main()
