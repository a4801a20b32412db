"""launch/augment.py finds its ranks as training does: ``srun -n 8 python launch/augment.py`` is 8 ranks of one
run, not 8 copies writing the same output."""

from __future__ import annotations

import pytest
import torch

from launch import augment as augment_cli

LAUNCHERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
             "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS", "SLURM_JOB_NODELIST")  # fmt: skip


def _clean(monkeypatch):
    for key in LAUNCHERS:
        monkeypatch.delenv(key, raising=False)


def test_srun_tasks_are_ranks_of_one_run(monkeypatch):
    _clean(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert augment_cli.launcher_env() == (3, 8, 3)
    assert augment_cli.rendezvous(8)  # srun's tasks meet at the job's master


def test_launcher_variables_and_a_slurm_array(monkeypatch):
    _clean(monkeypatch)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert augment_cli.launcher_env() == (1, 2, 0)
    assert not augment_cli.rendezvous(2)  # RANK / WORLD_SIZE alone: rank 0 polls the filesystem
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert augment_cli.rendezvous(2)
    _clean(monkeypatch)
    assert augment_cli.launcher_env() == (0, 1, 0) and not augment_cli.rendezvous(1)


def test_default_device_under_a_per_task_gpu_binding(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # SLURM's binding: task 5 of the node given GPU 5 alone
    monkeypatch.setenv("SLURM_LOCALID", "5")
    monkeypatch.setenv("SLURM_STEP_GPUS", "5")
    assert augment_cli.default_device(5) == "cuda:0"  # was cuda:5, an invalid device ordinal
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert augment_cli.default_device(5) == "cuda:5"


@pytest.mark.parametrize(
    ("script", "argv", "flag"),
    [
        (
            "precompute",
            ["--task", "t", "--data", "d", "--teachers", "x", "--output", "o", "--chunk-size", "0"],
            "--chunk-size",
        ),
        ("augment", ["--task", "t", "--data", "d", "--glove", "g", "--output", "o", "--n-a", "0"], "--n-a"),
        ("mlm_head", ["--encoder", "e", "--shards", "s", "--output", "o", "--top-k", "0"], "--top-k"),
    ],
)
def test_a_count_below_one_names_its_flag(script, argv, flag, capsys):
    """These said the field's Python name ("chunk_size must be >= 1"), not the flag the user typed."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    try:
        module = importlib.import_module(f"launch.{script}")
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert stopped.value.code == 2
    assert f"argument {flag}: expected a positive integer (>= 1), got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "said"), [("inf", "got inf"), ("nan", "got nan"), ("0", "number > 0, got 0"), ("x", "'x'")]
)
def test_precompute_refuses_a_temperature_that_is_not_a_positive_number_at_its_flag(value, said, capsys):
    """inf wrote rows of 1/C and a manifest that is not JSON (Infinity); nan failed after every teacher ran."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    try:
        module = importlib.import_module("launch.precompute")
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--task", "t", "--data", "d", "--teachers", "x", "--output", "o", "--temperature", value])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "argument --temperature: expected a" in error and said in error


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--encoding", "latin-2x", "unknown encoding 'latin-2x'"),  # was a LookupError traceback at the data
        ("--p-t", "1.5", "expected a probability in [0, 1], got '1.5'"),  # said "p_t must be ..."
        ("--p-t", "nan", "expected a probability in [0, 1], got 'nan'"),
        ("--max-seq-length", "2", "expected a length of at least 3 pieces (CLS, a word, SEP), got '2'"),
    ],
)
def test_augment_flags_out_of_range_are_named_by_their_flag(flag, value, said, capsys):
    argv = ["--task", "t", "--data", "d", "--mlm", "none", "--glove", "g", "--output", "o", flag, value]
    with pytest.raises(SystemExit) as stopped:
        augment_cli.main(argv)
    assert stopped.value.code == 2
    assert f"argument {flag}: {said}" in capsys.readouterr().err
    args = augment_cli.parse_args([*argv[:-2], "--encoding", "Latin-1", "--p-t", "0", "--max-seq-length", "3"])
    assert (args.encoding, args.p_t, args.max_seq_length) == ("Latin-1", 0.0, 3)
