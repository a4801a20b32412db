"""``dist-kd`` / ``python -m dist_kd``: the command name comes first, whatever a launcher puts before it."""

from __future__ import annotations

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
