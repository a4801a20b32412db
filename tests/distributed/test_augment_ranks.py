"""launch/augment.py on 2 ranks writes the same file as on 1: under torchrun (gloo barrier) and with bare
RANK/WORLD_SIZE variables (filesystem polling, e.g. a SLURM array); an error is said once, by the rank that had
it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.distributed.conftest import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "launch" / "augment.py")
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)


def _check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        pytest.fail(f"exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dist_kd.testing import build_tiny_bert, random_sentences

    root = tmp_path_factory.mktemp("augment_ranks")
    mlm = build_tiny_bert(root / "mlm", seed=0, model_class="BertForMaskedLM", num_layers=2)
    words = ["played", "goals", "markets", "quickly", "happiness", "team", "the"]
    glove = root / "glove.txt"
    glove.write_text("".join(f"{w} " + " ".join(str((i * 7 + j * 3) % 5 - 2) for j in range(6)) + "\n" for i, w in
                             enumerate(words)))  # fmt: skip
    texts_a, texts_b = random_sentences(9, seed=1, max_words=12), random_sentences(9, seed=2, max_words=12)
    data = root / "pairs.tsv"
    data.write_text("s1\ts2\ty\n" + "".join(f"{a}\t{b}\t{'yes' if i % 2 else 'no'}\n" for i, (a, b) in
                                             enumerate(zip(texts_a, texts_b))))  # fmt: skip
    args = [
        "--task", "pairs", "--labels", "no,yes", "--text-a", "s1", "--text-b", "s2", "--label", "y",
        "--data", str(data), "--mlm", str(mlm), "--glove", str(glove), "--n-a", "3", "--k", "4", "--batch-size", "5",
    ]  # fmt: skip
    single = root / "single"
    _check(subprocess.run([sys.executable, SCRIPT, *args, "--output", str(single), "--debug"], env=ENV,
                          capture_output=True, text=True, timeout=120))  # fmt: skip
    return args, pq.read_table(single / "augmented.parquet")


def _assert_same(output: Path, reference) -> None:
    table = pq.read_table(output / "augmented.parquet")
    assert table.num_rows == 9 * 4
    assert table.equals(reference)
    assert table.schema.metadata == reference.schema.metadata  # parameters, model sha, data sha: rank-free
    assert not (output / "parts").exists()


def test_two_ranks_under_torchrun_match_one(inputs, tmp_path):
    args, reference = inputs
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        SCRIPT, *args, "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    _check(subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180))
    _assert_same(tmp_path / "out", reference)


def test_two_ranks_without_process_group_poll_for_parts(inputs, tmp_path):
    args, reference = inputs
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, *args, "--output", str(tmp_path / "out")],
            env=dict(ENV, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)
    ]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=180)
        _check(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    _assert_same(tmp_path / "out", reference)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_an_error_every_rank_has_is_said_once(inputs, tmp_path, ranks):
    """Every rank refused the same data, and each printed the same line."""
    args, _ = inputs
    bad = [arg if arg != "no,yes" else "no,maybe" for arg in args]  # the data's 'yes' is no label of the task
    proc = ranks(SCRIPT, *bad, "--output", str(tmp_path / "x"), timeout=180, check=False)
    assert proc.returncode != 0
    assert len(_errors(proc)) == 1 and "unknown label 'yes'" in _errors(proc)[0], proc.stderr[-3000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "mode, said", [("setup", "GloVe /node2/glove.txt is gone"), ("metadata", "/node2/data: Input/output error")]
)
def test_an_error_of_one_rank_stops_every_rank_before_augmenting(inputs, tmp_path, mode, said, ranks):
    """Rank 1 cannot read its GloVe file, or its data when the run key is made: it says so, and rank 0 stops
    there too instead of augmenting its share for a set that cannot be merged."""
    args, _ = inputs
    env = {"MODE": mode, "PYTHONPATH": str(ROOT)}
    proc = ranks("augment_one_rank.py", *args, "--output", str(tmp_path / "x"), timeout=180, env=env, check=False)
    assert proc.returncode != 0
    assert _errors(proc) == [f"error: [rank 1] {said}"], proc.stderr[-4000:]
    assert "augmenting examples" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_rank_0_alone_hashes_the_masked_lm_and_the_data(inputs, tmp_path, ranks):
    args, reference = inputs
    ranks("augment_one_rank.py", *args, "--output", str(tmp_path / "out"), timeout=180,
          env={"MODE": "hash", "PYTHONPATH": str(ROOT)})  # fmt: skip
    _assert_same(tmp_path / "out", reference)
