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
        ("dist_kd.export", ["--checkpoint", "RUN", "--output", "OUT"], "RUN is not a complete dist_kd checkpoint"),
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
