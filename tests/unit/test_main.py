"""``dist-kd`` / ``python -m dist_kd``: the command name comes first, whatever a launcher puts before it."""

from __future__ import annotations

import pytest
import yaml

from dist_kd.main import main


def test_deepspeed_modules_local_rank_before_the_command_is_dropped(capsys):
    """`deepspeed --module dist_kd general ...` runs `python -m dist_kd --local_rank=N general ...`: that was
    'error: unknown command' on every rank."""
    for launcher in (["--local_rank=1"], ["--local_rank", "1"], ["--local-rank=0"], []):
        argv = [*launcher, "general", "--print-config", "--config", "launch/configs/quickstart.yaml", "train.lr=0.5"]
        assert main(argv) == 0, capsys.readouterr().err
        assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 0.5
    assert main(["--local_rank=1", "bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "args", "said"),
    [
        ("dist_kd.report", ["RUN"], "RUN has no metrics.jsonl: not a dist_kd run directory"),
        ("dist_kd.export", ["--checkpoint", "RUN", "--output", "OUT"], "checkpoint RUN does not exist"),
    ],
)
def test_the_documented_python_dash_m_forms_run_their_command(tmp_path, module, args, said):
    """docs/contracts.md gives `python -m dist_kd.export` and `python -m dist_kd.report`: both modules lacked a
    __main__ block, so each ran nothing and exited 0."""
    import subprocess
    import sys

    args = [arg.replace("RUN", str(tmp_path / "run")).replace("OUT", str(tmp_path / "out")) for arg in args]
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and said.replace("RUN", str(tmp_path / "run")) in proc.stderr, proc.stderr


def test_version_names_dist_kd_python_and_the_packages_a_run_depends_on(capsys):
    """For a bug report: `dist-kd --version` was "unknown command '--version'"."""
    import platform
    from importlib import metadata

    import dist_kd

    for flag in ("--version", "-V"):
        assert main([flag]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[:2] == [f"dist_kd {dist_kd.__version__}", f"python {platform.python_version()}"]
        assert f"torch {metadata.version('torch')}" in lines and f"deepspeed {metadata.version('deepspeed')}" in lines
    assert dist_kd.__version__ == metadata.version("dist_kd")  # the package's own and its installed metadata agree


def test_output_into_a_pipe_whose_reader_left_ends_without_a_traceback():
    """`dist-kd | head -3` printed a BrokenPipeError traceback when head had left before the usage was written."""
    import os
    import subprocess
    import sys

    for argv in (["--help"], ["--version"]):
        read, write = os.pipe()
        os.close(read)  # the reader has gone: every write meets a closed pipe
        proc = subprocess.run([sys.executable, "-m", "dist_kd", *argv], stdout=write, stderr=subprocess.PIPE,
                              timeout=120)  # fmt: skip
        os.close(write)
        err = proc.stderr.decode()
        assert proc.returncode == 141 and "Traceback" not in err and "Exception ignored" not in err, err


def test_every_subcommand_has_its_function_in_the_api_and_docs_api_md_lists_them():
    """docs/api.md says every subcommand can be called through dist_kd.api; evaluate and mlm-head could not."""
    import re
    from pathlib import Path

    from dist_kd import api
    from dist_kd.main import COMMANDS

    docs = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    listed = set(re.findall(r"^\| `api\.(\w+)\(", docs, flags=re.MULTILINE))
    functions = {name for name in api.__all__ if callable(getattr(api, name)) and name[0].islower()}
    assert listed == functions - {"load_run_config", "run_training"}  # what general and task are built on
    by_command = {"prepare-corpus": "prepare_corpus", "general": "general", "augment": "augment_task",
                  "finetune": "finetune_teachers", "precompute": "precompute_soft_targets", "task": "task",
                  "evaluate": "evaluate_classifier", "mlm-head": "fit_mlm_head", "export": "export_checkpoint",
                  "report": "write_report"}  # fmt: skip
    assert set(by_command) == set(COMMANDS) and set(by_command.values()) <= functions
