"""``dist-kd``: one command for every stage, installed with the package.

    dist-kd general --config launch/configs/quickstart.yaml teacher.path=DIR
    dist-kd task --config CONFIG
    torchrun --nproc_per_node 8 -m dist_kd general --config CONFIG          # python -m dist_kd works too
    deepspeed --num_gpus 8 --module dist_kd general --config CONFIG

Each subcommand is the matching ``launch/<stage>.py`` script with the same flags (``dist-kd general --help``).
Config and DeepSpeed JSON paths such as ``launch/configs/quickstart.yaml`` and ``ds_configs/zero2.json``
resolve to the copies shipped in the package when they do not exist where the command runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

COMMANDS = {
    "prepare-corpus": ("prepare_corpus", "shard raw text into WebDataset shards with a tokenizer"),
    "general": ("general", "general distillation (TinyBERT stage 1) on a sharded corpus"),
    "augment": ("augment", "TinyBERT data augmentation of a task's training set"),
    "finetune": ("finetune", "fine-tune the teachers of an ensemble"),
    "precompute": ("precompute", "write an ensemble's soft targets to a Parquet store"),
    "task": ("task", "task distillation: multi-task, soft targets, TinyBERT phases"),
    "evaluate": ("evaluate", "score an exported classifier on a task file"),
    "mlm-head": ("mlm_head", "fit a masked-LM head on a frozen encoder (for augmentation)"),
    "export": ("dist_kd.export", "a checkpoint's student encoder as a Hugging Face directory"),
    "report": ("dist_kd.report", "report.md and PNG plots of run directories"),
}


def _load(module_name: str):
    """``dist_kd.launch.<name>`` when installed; the checkout's ``launch/<name>.py`` otherwise."""
    if "." in module_name:  # a library module
        return importlib.import_module(module_name)
    try:
        return importlib.import_module(f"dist_kd.launch.{module_name}")
    except ModuleNotFoundError:
        path = Path(__file__).resolve().parents[1] / "launch" / f"{module_name}.py"
        spec = importlib.util.spec_from_file_location(f"dist_kd_launch_{module_name}", path)
        if spec is None or not path.is_file():
            raise
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


VERSIONED = ("torch", "deepspeed", "transformers", "datasets", "webdataset", "pyarrow", "tokenizers")


def versions() -> str:
    """``dist-kd --version``: dist_kd's version and those of Python and the packages a run depends on, in one
    line each, for a bug report (read from the installed metadata: nothing is imported)."""
    import platform
    from importlib import metadata

    from dist_kd import __version__

    lines = [f"dist_kd {__version__}", f"python {platform.python_version()}"]
    for name in VERSIONED:
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name} not installed")
    return "\n".join(lines)


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: dist-kd COMMAND [flags ...]   (dist-kd COMMAND --help for its flags; dist-kd --version)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def _drop_launcher_rank(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` (or ``--local_rank N``) that ``deepspeed --module dist_kd`` puts
    before the command; LOCAL_RANK in the environment carries the same value."""
    if argv and argv[0].startswith(("--local_rank=", "--local-rank=")):
        return argv[1:]
    if len(argv) > 1 and argv[0] in ("--local_rank", "--local-rank"):
        return argv[2:]
    return argv


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:  # stdout's reader left (`dist-kd general --help | head`): a traceback said nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would raise again
        return 141  # as a shell's 128 + SIGPIPE


def _run(argv: list[str] | None) -> int:
    argv = _drop_launcher_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(versions())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = _load(COMMANDS[name][0])
    sys.argv = [f"dist-kd {name}", *rest]  # argparse's prog in help and errors
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
