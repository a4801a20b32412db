"""launch/precompute.py on 2 ranks (torchrun, gloo) writes the same store, byte for byte, as on 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.conftest import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "launch" / "precompute.py")
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)
LABELS = ["business", "sport", "tech"]
NUM_ROWS = 13


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240, cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from dist_kd.testing import build_tiny_bert, random_sentences

    root = tmp_path_factory.mktemp("precompute_ranks")
    label_maps = {"id2label": dict(enumerate(LABELS)), "label2id": {name: i for i, name in enumerate(LABELS)}}
    teachers = [
        str(build_tiny_bert(root / f"t{k}", seed=k, model_class="BertForSequenceClassification", num_layers=1,
                            num_labels=3, **label_maps))
        for k in (1, 2)
    ]  # fmt: skip
    texts = random_sentences(NUM_ROWS, seed=11, max_words=30)
    data = root / "news.csv"
    data.write_text("body,category\n" + "".join(f"{t},{LABELS[i % 3]}\n" for i, t in enumerate(texts)))
    args = [
        "--task", "news", "--labels", ",".join(LABELS), "--text-a", "body", "--label", "category",
        "--data", str(data), "--teachers", *teachers, "--chunk-size", "3", "--batch-size", "2",
        "--keep-teacher-logits", "--temperature", "2", "--no-progress",
    ]  # fmt: skip
    single = root / "single"
    _run([sys.executable, SCRIPT, *args, "--output", str(single)])
    return args, single


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_two_ranks_write_the_same_store_as_one(inputs, tmp_path):
    from dist_kd.data.soft_targets import load_soft_targets

    args, single = inputs
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           SCRIPT, *args, "--output", str(out)]  # fmt: skip
    proc = _run(cmd)
    assert "5 to compute on 2 rank(s)" in proc.stderr
    loaded = load_soft_targets(out, expected_labels=LABELS, task="news")
    assert loaded.table.column("example_id").to_pylist() == [f"news-{i}" for i in range(NUM_ROWS)]  # all, in order
    assert loaded.teacher_logits().shape == (NUM_ROWS, 2, 3)
    assert _files(out) == _files(single)  # 5 chunks dealt 3/2 to the ranks; merged bytes do not depend on it


def test_bad_input_exits_2_with_one_error_line(inputs, tmp_path):
    args, _ = inputs
    bad = [a if a != ",".join(LABELS) else "tech,sport,politics" for a in args]
    proc = _run([sys.executable, SCRIPT, *bad, "--output", str(tmp_path / "x")], check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "a different label set" in lines[0]
    assert not (tmp_path / "x").exists()


def _two_ranks(script: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           script, *args]  # fmt: skip
    # 150 s: far below the process group's 10-minute timeout, which a rank waiting for the other would reach
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=150, cwd=ROOT)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_an_error_every_rank_has_is_said_once(inputs, tmp_path):
    args, single = inputs
    bad = [a if a != ",".join(LABELS) else "tech,sport,politics" for a in args]
    proc = _two_ranks(SCRIPT, [*bad, "--output", str(tmp_path / "x")])
    assert proc.returncode != 0
    assert len(_errors(proc)) == 1 and "a different label set" in _errors(proc)[0], proc.stderr[-3000:]
    # rank 0's refusal (an output holding a store made with other parameters), told to every rank
    other = [a if a != "2" else "3" for a in args]  # --temperature 3
    copy = tmp_path / "copy"
    shutil.copytree(single, copy)
    proc = _two_ranks(SCRIPT, [*other, "--output", str(copy)])
    assert proc.returncode != 0 and len(_errors(proc)) == 1, proc.stderr[-3000:]
    assert "computed with other parameters (temperature" in _errors(proc)[0] and _files(copy) == _files(
        single
    )  # left as it was


def test_an_output_another_run_writes_is_refused_once_and_left_as_it_was(inputs, tmp_path):
    """The run lock's refusal was raised by every rank as its own: one line per rank."""
    from dist_kd.train.runlock import RunLock

    args, _ = inputs
    out = tmp_path / "busy"
    with RunLock(out, flag="--output"):  # a live run of this process holds it
        proc = _two_ranks(SCRIPT, [*args, "--output", str(out)])
        assert proc.returncode != 0 and len(_errors(proc)) == 1, proc.stderr[-3000:]
        assert _errors(proc)[0].startswith(f"error: --output {out} is in use by another run")
        assert sorted(path.name for path in out.iterdir()) == [".dist_kd.lock"]


@pytest.mark.parametrize("fail_at", ["setup", "chunk"])
def test_a_failure_on_one_rank_is_said_by_that_rank_and_ends_the_job(inputs, tmp_path, fail_at):
    """Rank 1 alone fails. It used to print nothing (only rank 0 printed errors) and then wait at the final
    barrier while rank 0 waited in a collective, both until the 10-minute timeout. Now rank 1 says why; at
    set-up every rank stops there, mid-run rank 1 leaves at once and the launcher stops rank 0."""
    args, _ = inputs
    worker = str(Path(__file__).parent / "workers" / "precompute_one_rank_fails.py")
    env = {"FAIL_AT": fail_at, "PYTHONPATH": str(ROOT)}
    proc = _two_ranks(worker, [*args, "--output", str(tmp_path / "x")], env)
    assert proc.returncode != 0
    expected = "does not exist" if fail_at == "setup" else "chunk 1 broke"
    said = [line for line in _errors(proc) if expected in line]
    assert said and all(line.startswith("error: [rank 1] ") for line in said), proc.stderr[-4000:]
    if fail_at == "setup":  # every rank learnt of it at the same point: one line, and nothing written
        assert len(_errors(proc)) == 1, proc.stderr[-4000:]
        assert not (tmp_path / "x").exists()


def test_the_ranks_wait_for_each_other_as_long_as_wait_timeout_says(inputs, tmp_path):
    """The group had DeepSpeed's 10 minutes: rank 1, done with its chunks, failed at the barrier while rank 0
    computed one more (a large teacher's chunk on a CPU takes longer), and every rerun, dealt the same chunk, did
    too. --wait-timeout (24 h by default) is the group's timeout: here 15 s, against rank 0's 3 x 12 s."""
    args, _ = inputs
    worker = str(Path(__file__).parent / "workers" / "precompute_slow_rank.py")
    env = {"SLOW": "12", "PYTHONPATH": str(ROOT)}
    proc = _two_ranks(worker, [*args, "--output", str(tmp_path / "x"), "--wait-timeout", "15"], env)
    assert proc.returncode != 0, proc.stderr[-4000:]
    said = [line for line in _errors(proc) if "waited for the other ranks past the process group's timeout" in line]
    assert said and "15000ms" in said[0] and "--wait-timeout" in said[0], proc.stderr[-4000:]


def test_manifest_describes_the_run(inputs):
    _, single = inputs
    manifest = json.loads((single / ".manifest.json").read_text())
    assert manifest["num_rows"] == NUM_ROWS
    assert manifest["metadata"]["label_names"] == LABELS
    assert manifest["metadata"]["temperature"] == 2.0
    assert len(manifest["metadata"]["teachers"]) == 2


def test_two_ranks_reuse_an_earlier_store_through_the_flag(inputs, tmp_path):
    """``--reuse``: every row of the data is in the single-process store, so no rank runs a teacher."""
    from dist_kd.data.soft_targets import load_soft_targets

    args, single = inputs
    out = tmp_path / "reusing"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           SCRIPT, *args, "--reuse", str(single), "--output", str(out)]  # fmt: skip
    proc = _run(cmd)
    assert "examples from the reused stores, 0 through the teachers" in proc.stderr
    reused, computed = load_soft_targets(out), load_soft_targets(single)
    assert reused.table.column("example_id").to_pylist() == computed.table.column("example_id").to_pylist()
    assert reused.soft_probs().tolist() == computed.soft_probs().tolist()
    assert reused.teacher_logits().tolist() == computed.teacher_logits().tolist()
    assert reused.metadata.extra["reused_from"][0]["num_rows"] == NUM_ROWS
