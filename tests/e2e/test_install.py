"""`pip install .` (not editable) gives a working tool: the package, its configs and DeepSpeed JSONs, and the
`dist-kd` command run the tiny pipeline from a directory outside the checkout, also under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO

TINY = [
    "student.num_layers=2", "student.hidden_size=16", "student.num_heads=4", "student.intermediate_size=32",
    "train.max_steps=4", "eval.texts=null", "data.micro_batch_size=4", "run.log_every=2",
]  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return target


def _run(args, cwd, target, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_installed_package_runs_the_pipeline_outside_the_checkout(installed, tiny_bert_dir, tmp_path):
    from dist_kd.testing import random_sentences

    work = tmp_path / "elsewhere"  # no launch/, ds_configs/ or dist_kd/ here
    work.mkdir()
    (work / "text.txt").write_text("\n\n".join(random_sentences(300, seed=3)))
    where = _run([sys.executable, "-c", "import dist_kd; print(dist_kd.__file__)"], work, installed).stdout
    assert where.strip().startswith(str(installed)), where
    command = [str(installed / "bin" / "dist-kd")]
    assert "prepare-corpus" in _run([*command, "--help"], work, installed).stdout
    _run([*command, "prepare-corpus", "--input", "text.txt", "--tokenizer", str(tiny_bert_dir), "--output",
          "shards", "--seq-len", "32"], work, installed)  # fmt: skip
    # the default config and its ds_configs/zero2.json resolve to the copies in the package
    general = [*command, "general", "--debug", "--config", "launch/configs/quickstart.yaml",
               f"teacher.path={tiny_bert_dir}", "data.shards=shards", "run.output_dir=run", *TINY]  # fmt: skip
    proc = _run(general, work, installed)
    assert "student saved to" in proc.stdout and (work / "run" / "student" / "model.safetensors").is_file()
    # python -m dist_kd under torchrun, 2 ranks
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731", "-m",
          "dist_kd", "general", "--config", "launch/configs/quickstart.yaml", f"teacher.path={tiny_bert_dir}",
          "data.shards=shards", "run.output_dir=run2", "data.num_workers=0", *TINY], work, installed)  # fmt: skip
    assert (work / "run2" / "checkpoints" / "step-00000004" / "rank00001.pt").is_file()


def test_installed_package_ships_the_slurm_scripts_where_task_sbatch_looks(installed, tmp_path):
    """task.sbatch submitted outside a checkout runs the installed general.sbatch, found through shipped_file."""
    find = "from dist_kd.config import shipped_file; print(shipped_file('launch/slurm/general.sbatch'))"
    found = _run([sys.executable, "-c", find], tmp_path, installed).stdout.strip()
    assert found == str(installed / "dist_kd" / "launch" / "slurm" / "general.sbatch"), found
    assert (installed / "dist_kd" / "launch" / "slurm" / "task.sbatch").is_file()
