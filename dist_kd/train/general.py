"""General distillation (TinyBERT stage 1) on a DeepSpeed engine.

One ``GeneralTrainer`` per rank. The frozen teacher runs outside the engine on the same device (ZeRO
never partitions it); the engine holds the student and its projections. An optimizer step is
``train.grad_accum`` micro-batches; DeepSpeed accumulates and steps at the boundary.

Everything that can be wrong with the inputs (config keys, teacher directory, student shape, batch
settings, corpus tokenizer, a run directory that belongs to another run) is checked in ``__init__``
before anything is written to the run directory, so a bad command never damages an existing run.

Host syncs (``.item()``) happen only at log steps; loss terms are accumulated as tensors in between.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_kd import distributed
from dist_kd.config import doc, dump_config
from dist_kd.io import atomic_dir, atomic_path
from dist_kd.models.student import DistillStudent, StudentConfig, build_projections, build_student, check_heads
from dist_kd.models.teacher import Teacher, TeacherConfig, check_model_dir
from dist_kd.objective import DistillConfig, tinybert_objective
from dist_kd.train import checkpoint as ckpt
from dist_kd.train.common import LossWindow, RunConfig, StopSignal, progress_bar, stop_agreed
from dist_kd.train.engine import (
    DeepSpeedSection,
    TrainConfig,
    build_ds_config,
    build_engine,
    check_batch,
    gathered_parameters,
    resolve_precision,
)
from dist_kd.train.metrics import MetricsLogger, estimate_mfu

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The corpus stream."""

    shards: str = doc("directory of WebDataset shards with manifest.json (launch/prepare_corpus.py)", "")
    micro_batch_size: int = doc("sequences per rank per micro-batch", 32)
    num_workers: int = doc("DataLoader worker processes per rank", 2)
    shuffle: bool = doc("seeded shuffle of shard order and within a bounded buffer, new each epoch", True)
    shuffle_buffer: int = doc("sequences held in the shuffle buffer", 2048)
    skip_corrupt: bool = doc("skip corrupt shards with a warning instead of stopping", False)
    eval_shards: str | None = doc("held-out shards for the end-of-run agreement summary", None)
    eval_batches: int = doc("batches of eval_shards used for the summary", 8)

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class GeneralConfig:
    """General distillation: ``deepspeed launch/general.py --config FILE [a.b=c ...]``."""

    teacher: TeacherConfig = doc("the frozen teacher", default_factory=TeacherConfig)
    student: StudentConfig = doc("the student", default_factory=StudentConfig)
    distill: DistillConfig = doc("losses and layer mapping", default_factory=DistillConfig)
    data: DataConfig = doc("the corpus", default_factory=DataConfig)
    train: TrainConfig = doc("optimisation", default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = doc("DeepSpeed JSON", default_factory=DeepSpeedSection)
    run: RunConfig = doc("run directory, logging, checkpoints", default_factory=RunConfig)

    def __post_init__(self):
        if self.distill.weights.pred > 0:
            raise ValueError("distill.weights.pred must be 0 in general distillation (there are no labels or logits)")


def _teacher_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(check_model_dir(path, "teacher.path"))


class GeneralTrainer:
    """General distillation on one rank.

    Args:
        cfg: the validated config.
        info: this process's place in the job (``distributed.init_distributed()``).
    """

    def __init__(self, cfg: GeneralConfig, info: distributed.DistInfo):
        from dist_kd.data.corpus import check_tokenizer_matches, load_tokenizer, read_manifest

        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.train.seed)

        # --- validate every input before writing anything -------------------------------------------
        teacher_config = _teacher_config(cfg.teacher.path)
        num_teacher_layers = teacher_config.num_hidden_layers
        num_student_layers = cfg.student.num_layers
        if cfg.student.path:
            from transformers import AutoConfig

            num_student_layers = AutoConfig.from_pretrained(
                check_model_dir(cfg.student.path, "student.path")
            ).num_hidden_layers
        self.mapping = cfg.distill.mapping(num_teacher_layers, num_student_layers)
        weights = cfg.distill.weights
        if weights.attn > 0 and not cfg.student.path:
            check_heads(teacher_config.num_attention_heads, cfg.student.num_heads)
        self.global_batch = check_batch(
            cfg.data.micro_batch_size, cfg.train.grad_accum, info.world_size, cfg.train.global_batch_size
        )
        self.precision = resolve_precision(cfg.train.precision, info.device)
        ds_config = build_ds_config(
            cfg.deepspeed.config,
            cfg.data.micro_batch_size,
            cfg.train.grad_accum,
            info.world_size,
            self.precision,
            cfg.train.clip,
        )
        if not cfg.data.shards:
            raise ValueError("data.shards is not set; prepare a corpus with launch/prepare_corpus.py")
        self.manifest = read_manifest(cfg.data.shards)
        self.tokenizer = load_tokenizer(cfg.teacher.path)
        check_tokenizer_matches(self.manifest["tokenizer"], self.tokenizer, cfg.data.shards)
        resume_from = ckpt.resume_point(self.run_dir, cfg.run.resume)

        # --- build ---------------------------------------------------------------------------------
        self.teacher = Teacher(
            cfg.teacher.path,
            dtype=cfg.teacher.dtype,
            device=info.device,
            score_layers=self.mapping if weights.attn > 0 else [],
            max_layer=max(self.mapping),
        )
        student = build_student(cfg.student, teacher_config, self.teacher.model, self.mapping)
        if weights.attn > 0:
            check_heads(self.teacher.num_heads, student.config.num_attention_heads)
        projections = build_projections(
            student.config.hidden_size,
            self.teacher.hidden_size,
            student.config.num_hidden_layers,
            shared=cfg.student.shared_projection,
            always=cfg.distill.projection == "always",
        )
        self.model = DistillStudent(student, projections)
        self.engine = build_engine(self.model, cfg.train, ds_config)
        self.loader = self._build_loader(cfg.data.shards, shuffle=cfg.data.shuffle)
        self.step = 0
        self.tokens_seen = 0
        self._window = LossWindow(info.device)
        self.meta = {
            "teacher": {
                "path": str(Path(cfg.teacher.path).resolve()),
                "model_type": teacher_config.model_type,
                "num_layers": num_teacher_layers,
                "hidden_size": teacher_config.hidden_size,
                "num_heads": teacher_config.num_attention_heads,
                "vocab_size": teacher_config.vocab_size,
            },
            "student": {
                "num_layers": student.config.num_hidden_layers,
                "hidden_size": student.config.hidden_size,
                "num_heads": student.config.num_attention_heads,
                "intermediate_size": student.config.intermediate_size,
                "layer_map": self.mapping,
            },
        }
        if resume_from is not None:
            ckpt.check_compatible(ckpt.read_meta(resume_from), self.meta, resume_from)
        # --- the run directory: only now -------------------------------------------------------------
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(dump_config(cfg))
        self.metrics = MetricsLogger(self.run_dir, enabled=info.is_main, tensorboard=cfg.run.tensorboard)
        if resume_from is not None:
            self._load(resume_from)
        self.first_terms: dict[str, float] | None = None
        self.last_terms: dict[str, float] | None = None

    # --- set-up helpers ------------------------------------------------------------------------------

    def _build_loader(self, shards: str, shuffle: bool):
        from dist_kd.data.stream import build_corpus_loader

        return build_corpus_loader(
            shards,
            micro_batch_size=self.cfg.data.micro_batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
            num_workers=self.cfg.data.num_workers,
            seed=self.cfg.train.seed,
            shuffle=shuffle,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            skip_corrupt=self.cfg.data.skip_corrupt,
            pin_memory=self.info.device.type == "cuda",
        )

    def _batches(self):
        """Micro-batches across epoch boundaries (iterating the stream yields the rest of one epoch)."""
        while True:
            yield from self.loader

    def _load(self, checkpoint: Path) -> None:
        state = ckpt.load_checkpoint(self.engine, checkpoint)
        self.load_state_dict(state)
        self.metrics.truncate_after(self.step)
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's trainer state (model and optimizer live in the DeepSpeed checkpoint)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.loader.state_dict(),
            "window": self._window.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.loader.load_state_dict(state["data"])
        if "window" in state:
            self._window.load_state_dict(state["window"])

    def save(self) -> Path:
        """A complete checkpoint of the current step (collective)."""
        return ckpt.save_checkpoint(
            self.engine, self.run_dir / "checkpoints", self.step, self.state_dict(), self.meta, self.cfg.run.keep_last
        )

    # --- training --------------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward, losses and backward of one micro-batch (the engine steps at the accumulation boundary)."""
        input_ids = batch["input_ids"].to(self.info.device, non_blocking=True)
        mask = batch["attention_mask"].to(self.info.device, non_blocking=True)
        teacher_features = self.teacher.features(input_ids, mask)
        student_features = self.engine(input_ids, mask)
        terms = tinybert_objective(
            student_features,
            teacher_features,
            self.mapping,
            mask,
            self.cfg.distill.weights,
            self.engine.module.projections,
        )
        self.engine.backward(terms["loss"])
        self.engine.step()
        return {name: value.detach() for name, value in terms.items()}

    def train(self) -> bool:
        """Run until ``train.max_steps`` or a stop signal. Returns True when training finished."""
        cfg = self.cfg
        stop = StopSignal()
        bar = progress_bar(
            cfg.train.max_steps, self.step, "general distillation", self.info.is_main and cfg.run.progress
        )
        batches = self._batches()
        try:
            while self.step < cfg.train.max_steps:
                for _ in range(cfg.train.grad_accum):
                    batch = next(batches)
                    terms = self.train_step(batch)
                    mask = batch["attention_mask"]
                    self._window.add(terms, tokens=mask.sum(), rows=mask.shape[0])
                self.step += 1
                if self.step % cfg.run.log_every == 0 or self.step == cfg.train.max_steps:
                    record = self._log()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < cfg.train.max_steps:
                    self.save()
                if stop_agreed(stop.requested, self.info.device):
                    self.save()
                    logger.warning("stopped at step %d; run again with run.resume=auto to continue", self.step)
                    return False
            self.save()
            return True
        finally:
            bar.close()
            stop.restore()

    def _log(self) -> dict:
        window = self._window.reduce()  # one sync for every term
        values = dict(sorted(window.values.items()))
        self.tokens_seen += window.tokens
        elapsed = max(window.seconds, 1e-9)
        record = {
            "step": self.step,
            "loss": values.pop("loss"),
            **{f"loss_{name}": value for name, value in values.items()},
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": window.tokens / elapsed,
            "samples_per_s": window.rows / elapsed,
            "tokens_seen": self.tokens_seen,
        }
        mfu = estimate_mfu(self.model, self.teacher, record["tokens_per_s"] / self.info.world_size, self.info.device)
        if mfu is not None:
            record["mfu"] = mfu
        terms = {k: v for k, v in record.items() if k == "loss" or k.startswith("loss_")}
        if self.first_terms is None:
            self.first_terms = terms
        self.last_terms = terms
        self.metrics.log(record)
        return record

    # --- export and summary ----------------------------------------------------------------------------

    def export(self) -> Path:
        """Save the student (no projections) with the teacher's tokenizer to ``run_dir/student`` (collective)."""
        target = self.run_dir / "student"
        student = self.engine.module.student
        gather = gathered_parameters(self.engine, list(student.parameters()))
        with gather:
            if self.info.is_main:
                with atomic_dir(target) as tmp:
                    student.save_pretrained(tmp)
                    self.tokenizer.save_pretrained(tmp)
        distributed.barrier()
        return target

    @torch.no_grad()
    def agreement(self, shards: str, num_batches: int) -> dict[str, float]:
        """Cosine similarity between the student's last layer (through its projection) and the teacher's
        layer g(M) on held-out sequences, for this student and a randomly initialised one of the same shape."""
        from transformers import AutoModel

        loader = self._eval_loader(shards)
        trained = self.engine.module
        torch.manual_seed(self.cfg.train.seed + 1)
        random_student = AutoModel.from_config(trained.student.config).to(self.info.device)
        random_projections = None
        if trained.projections is not None:
            random_projections = build_projections(
                random_student.config.hidden_size, self.teacher.hidden_size, random_student.config.num_hidden_layers
            )
        trained = self.engine.module
        candidates = {
            "student": (trained.student, trained.projections),
            "random_student": (random_student, random_projections),
        }
        last = len(self.mapping)
        sums = dict.fromkeys(candidates, 0.0)
        count = 0
        for index, batch in enumerate(loader):
            if index >= num_batches:
                break
            ids = batch["input_ids"].to(self.info.device)
            mask = batch["attention_mask"].to(self.info.device)
            target = self.teacher.features(ids, mask).hidden[self.mapping[-1]].float()
            real = mask.bool()
            for name, (model, projections) in candidates.items():
                was_training = model.training
                model.eval()
                hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[last]
                if projections is not None:
                    layer = projections.layer(last).to(self.info.device)
                    hidden = layer(hidden.to(layer.weight.dtype))
                cosine = torch.nn.functional.cosine_similarity(hidden.float()[real], target[real], dim=-1)
                sums[name] += cosine.sum().item()
                model.train(was_training)
            count += int(real.sum())
        return {name: total / max(count, 1) for name, total in sums.items()}

    def _eval_loader(self, shards: str):
        from dist_kd.data.stream import build_corpus_loader

        return build_corpus_loader(
            shards,
            micro_batch_size=self.cfg.data.micro_batch_size,
            rank=0,
            world_size=1,
            num_workers=0,
            seed=0,
            shuffle=False,
        )

    def close(self) -> None:
        self.metrics.close()


def summary_lines(trainer: GeneralTrainer, agreement: dict[str, float] | None) -> list[str]:
    """The short report printed at the end of the main job."""
    lines = [f"student saved to {trainer.run_dir / 'student'} (load with transformers.AutoModel.from_pretrained)"]
    if trainer.first_terms and trainer.last_terms:
        lines.append(f"{'term':<14}{'first log':>12}{'last log':>12}")
        for name in trainer.first_terms:
            lines.append(f"{name:<14}{trainer.first_terms[name]:>12.4f}{trainer.last_terms.get(name, math.nan):>12.4f}")
    if agreement:
        lines.append(
            "agreement with the teacher on held-out text (cosine of last-layer states, mapped to teacher width): "
            f"distilled student {agreement['student']:.3f} vs random student {agreement['random_student']:.3f}"
        )
    skipped = trainer.loader.skipped_shards  # this rank's view: damage found while reading is seen per rank
    if skipped:
        names = ", ".join(sorted(skipped)[:5]) + (" ..." if len(skipped) > 5 else "")
        lines.append(f"skipped {len(skipped)} corrupt corpus shard(s) (data.skip_corrupt): {names}")
    return lines


def write_summary(run_dir: Path, lines: list[str], agreement: dict[str, float] | None) -> None:
    """``summary.json`` in the run directory (atomically)."""
    from dist_kd.io import write_json_atomic

    write_json_atomic(run_dir / "summary.json", {"lines": lines, "agreement": agreement})
