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

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dist_kd import distributed
from dist_kd.config import config_to_dict, doc, dump_config
from dist_kd.data.tokenizer import save_tokenizer
from dist_kd.io import atomic_dir, atomic_path, data_fingerprint, listed, weights_sha256
from dist_kd.model_card import encoder_load_snippet, model_card, write_model_card
from dist_kd.models.capture import check_encoder_config
from dist_kd.models.fields import ffn_width
from dist_kd.models.student import (
    DistillStudent,
    NotPostLayerNorm,
    Projections,
    StudentConfig,
    build_projections,
    build_student,
    calibrate_to_teacher,
    check_heads,
    student_config_from_teacher,
    unit_selection,
)
from dist_kd.models.teacher import DTYPES, Teacher, TeacherConfig, check_max_length, check_model_dir
from dist_kd.objective import DistillConfig, tinybert_objective
from dist_kd.quality import (
    HeldOutTexts,
    QualityConfig,
    QualityReport,
    collapse_reasons,
    last_states,
    pooling_name,
    pooling_note,
    reason_kind,
)
from dist_kd.sentence_modules import carry_sentence_modules, sentence_pooling
from dist_kd.train import checkpoint as ckpt
from dist_kd.train.common import (
    DivergenceGuard,
    LossWindow,
    RunConfig,
    StopSignal,
    other_kind,
    progress_bar,
    stop_agreed,
)
from dist_kd.train.engine import (
    DeepSpeedSection,
    EngineTrainer,
    TrainConfig,
    autocast_of,
    begin_compiled_step,
    build_ds_config,
    build_engine,
    check_batch,
    check_compile,
    compile_models,
    exported_weights,
    full_precision_weights,
    resolve_precision,
)
from dist_kd.train.metrics import MetricsLogger, estimate_mfu

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """The corpus stream."""

    shards: str = doc("directory of WebDataset shards with manifest.json (launch/prepare_corpus.py)", "", path=True)
    micro_batch_size: int = doc("sequences per rank per micro-batch", 32)
    num_workers: int = doc("DataLoader worker processes per rank", 2)
    shuffle: bool = doc("seeded shuffle of shard order and within a bounded buffer, new each epoch", True)
    shuffle_buffer: int = doc("sequences held in the shuffle buffer", 2048)
    skip_corrupt: bool = doc("skip corrupt shards with a warning instead of stopping", False)
    verify_checksums: bool = doc("compare every shard's sha256 with the manifest before training (reads all)", False)
    eval_shards: str | None = doc(
        "held-out shards: their sequences are the quality texts when eval.texts is null", None, path=True
    )
    eval_batches: int = doc(
        "quality texts from eval_shards: the first eval_batches x micro_batch_size sequences (all, where fewer)", 8
    )

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ValueError(f"data.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        for name in ("shuffle_buffer", "eval_batches"):  # read after the models are built: checked here
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")


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
    eval: QualityConfig = doc("quality signals on held-out text (spread, probe)", default_factory=QualityConfig)

    @staticmethod
    def other_kind(data: dict[str, Any]) -> str | None:
        """Why a loaded YAML is another command's config, or None (see :func:`dist_kd.config.load_config`)."""
        return other_kind(data, "general")

    def __post_init__(self):
        if self.distill.weights.pred > 0:
            raise ValueError("distill.weights.pred must be 0 in general distillation (there are no labels or logits)")
        self.distill.weights.check_layer_terms()


def _teacher_config(path: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(check_model_dir(path, "teacher.path"))
    check_encoder_config(config, f"teacher.path {path}")
    return config


def device_mask(host_mask: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The batch's attention mask on ``device``, or None when every token is real (a packed batch).

    None lets the models skip masking (SDPA without a mask, a plain softmax in the captured layers) and the
    losses take plain means; the values are those of the all-ones mask. Decided on the host-side tensor, so
    it costs no device sync.
    """
    return None if bool(host_mask.all()) else host_mask.to(device, non_blocking=True)


def data_settings_meta(cfg: GeneralConfig) -> dict[str, Any]:
    """The data settings a checkpoint's stream position was saved under, for its ``meta.json``.

    ``data.shuffle`` cannot change on resume: the epoch in progress is a permutation of the shards that only
    the same setting continues (the stream would refuse its state after DeepSpeed's load). The stream counts
    sequences and lays the rest of its epoch out afresh for another micro-batch size, shuffle buffer or number
    of DataLoader workers (``--debug`` reads with none), and ``train.grad_accum`` only groups its micro-batches
    into steps: those may change, with a warning (``changeable``,
    :func:`dist_kd.train.checkpoint.check_changeable`).
    """
    changeable: dict[str, Any] = {
        "data.micro_batch_size": cfg.data.micro_batch_size,
        "data.num_workers": cfg.data.num_workers,
        "train.grad_accum": cfg.train.grad_accum,
    }
    if cfg.data.shuffle:
        changeable["data.shuffle_buffer"] = cfg.data.shuffle_buffer
    return {"data.shuffle": cfg.data.shuffle, "changeable": changeable}


def _check_student_tokenizer(
    student_path: str, teacher_tokenizer: Any, teacher_path: str, student_config: Any = None
) -> None:
    """Refuse a student.path whose own vocabulary (token -> id) is not the teacher's: the student reads the
    teacher's token ids, so its pre-trained embedding rows would be looked up by another vocabulary's ids (and
    the export ships the teacher's tokenizer). Only the vocabulary counts (the embedding lookup); a student
    directory without a tokenizer, or with one that does not load, is taken as it is where its embedding table
    (``student_config.vocab_size``) holds every teacher token id: a smaller one failed with an IndexError
    inside torch at the first forward."""
    from dist_kd.data.tokenizer import load_tokenizer

    try:
        student = load_tokenizer(student_path).get_vocab()
    except (FileNotFoundError, ValueError):  # no tokenizer files there (check_tokenizer_dir), or none that loads
        rows, ids = getattr(student_config, "vocab_size", None), len(teacher_tokenizer)
        if isinstance(rows, int) and rows < ids:
            raise ValueError(
                f"student.path {student_path} has embeddings for {rows} token ids (config.json vocab_size) but "
                f"teacher.path {teacher_path}'s tokenizer gives ids up to {ids - 1}: the student reads the "
                "teacher's token ids, so start it from a model of the teacher's vocabulary (or leave student.path "
                "out: the student is cut from the teacher)"
            ) from None
        return
    teacher = teacher_tokenizer.get_vocab()
    if student != teacher:
        differ = sorted(token for token in set(student) | set(teacher) if student.get(token) != teacher.get(token))
        raise ValueError(
            f"student.path {student_path} has its own vocabulary ({len(student)} tokens; {len(differ)} with "
            f"another id or missing, e.g. {differ[0]!r}), not teacher.path {teacher_path}'s ({len(teacher)} "
            "tokens): the student reads the teacher's token ids, so start it from a model of the teacher's "
            "vocabulary (or leave student.path out: the student is cut from the teacher)"
        )


class GeneralTrainer(EngineTrainer):
    """General distillation on one rank.

    Args:
        cfg: the validated config.
        info: this process's place in the job (``distributed.init_distributed()``).
    """

    def _say_unread_student_keys(self, student_config) -> None:
        """A warning naming the student keys that ``student.path`` overrides: the directory fixes the shape and
        the weights (a 4 x 32 student was trained while config.yaml said 2 x 16, without a word)."""
        cfg = self.cfg.student
        defaults = StudentConfig()
        own = {
            "num_layers": student_config.num_hidden_layers,
            "hidden_size": student_config.hidden_size,
            "num_heads": student_config.num_attention_heads,
            "intermediate_size": ffn_width(student_config),
        }
        # Keys set (not at their defaults) to other values than the directory's
        unread = [f"student.{name}={getattr(cfg, name)} (its {value})" for name, value in own.items()
                  if getattr(cfg, name) not in (value, getattr(defaults, name))]  # fmt: skip
        if cfg.init != defaults.init:
            unread.append(f"student.init={cfg.init} (it starts from its own weights)")
        if unread and self.info.is_main:
            logger.warning("student.path %s fixes the student's shape and weights; not used: %s", cfg.path,
                           ", ".join(unread))  # fmt: skip

    def _set_up(self, cfg: GeneralConfig, info: distributed.DistInfo) -> None:
        from dist_kd.data.tokenizer import tokenizer_fingerprint

        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.train.seed)

        # --- validate every input before writing anything -------------------------------------------
        with distributed.shared_failure():  # the same bad input on every rank: one error line, not one per rank
            teacher_config, weights, resume_from, ds_config = self._validate(cfg, info)
        num_teacher_layers = teacher_config.num_hidden_layers

        # --- build ---------------------------------------------------------------------------------
        self.teacher = Teacher(
            cfg.teacher.path,
            dtype=cfg.teacher.dtype,
            device=info.device,
            max_layer=max(self.mapping),
            **cfg.distill.capture_layers(self.mapping, weights.attn),
        )
        student = build_student(cfg.student, teacher_config, self.teacher.model, self.mapping)
        if weights.attn > 0 and cfg.distill.attention == "raw_scores":
            check_heads(self.teacher.num_heads, student.config.num_attention_heads)
        projections = build_projections(
            student.config.hidden_size,
            self.teacher.hidden_size,
            student.config.num_hidden_layers,
            shared=cfg.student.shared_projection,
            always=cfg.distill.projection == "always",
            select=cfg.distill.projection == "select",
        )
        if cfg.student.shared_projection and not isinstance(projections, Projections) and info.is_main:
            logger.warning(
                "student.shared_projection is not used: distill.projection=%s learns no W_h here (%s)",
                cfg.distill.projection,
                "it selects teacher dimensions" if projections is not None else "the widths are equal",
            )
        # whether student.calibrate ran (False: skipped, a pre-LN teacher; a string: skipped for that reason; None:
        # not asked, or a resumed run's checkpoint says it): for the model card
        self.calibrated: bool | str | None = None
        if cfg.student.init == "teacher" and not cfg.student.path:
            selection = unit_selection(student.config, teacher_config)
            if isinstance(projections, Projections):
                projections.init_as_selection(selection.residual)
            if cfg.student.calibrate and resume_from is None:
                self._calibrate(student, selection.residual)
        self.model = DistillStudent(student, projections, cfg.distill.attention)
        compile_models([student, self.teacher.model], cfg.train, ds_config)
        self.engine = build_engine(self.model, cfg.train, ds_config)
        self.guard = DivergenceGuard(self.engine.module, self.run_dir, cfg.train)
        with distributed.shared_failure():  # a shard found damaged by one rank alone (a node's copy): every rank stops
            self.loader = self._build_loader(cfg.data.shards, shuffle=cfg.data.shuffle)
        self._check_ranks_skip_alike()
        self.step = 0
        self.tokens_seen = 0
        self.sequences_seen: int | None = 0
        self.step_lr: float | None = None  # the rate of the last optimizer step, for its log line
        self.empty_batches = 0  # this rank's micro-batches of fully masked rows (skip_corrupt), resumes included
        self._no_tokens_since = (0, 0)  # set as training starts
        self._collapsed: set[str] = set()  # the kinds of reason the last evaluation found (quality.reason_kind)
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
                "intermediate_size": ffn_width(student.config),  # DistilBERT's hidden_dim
                "layer_map": self.mapping,
            },
            # The teacher's weights (read by rank 0 alone): another teacher at the same path is not resumed, and
            # the same one moved elsewhere (staged to a job's local disk) is; checkpoints before it have the path.
            "teacher.sha256": distributed.on_main(lambda: weights_sha256(cfg.teacher.path)),
            # The sentence term's pooling follows the teacher's sentence-transformers modules: a teacher of the
            # same weights moved to a directory with other modules (or none) would change the term silently.
            **({"distill.sentence_pooling": pooling_name(self.pooling)} if weights.sentence > 0 else {}),
            "corpus": data_fingerprint(cfg.data.shards),  # another corpus in the same place is not resumed
            # What the student's ids mean; dist-kd export checks the tokenizer it ships against it.
            "tokenizer.sha256": tokenizer_fingerprint(self.tokenizer)["sha256"],
            **ckpt.settings_meta(cfg.train, ds_config, cfg.train.max_steps),
            **ckpt.merged_settings(data_settings_meta(cfg), cfg.distill.resume_meta(), self._model_settings_meta()),
        }
        if resume_from is not None:
            with distributed.shared_failure():  # every rank reads the same refusal: said once, not once per rank
                ckpt.check_resume(resume_from, self.meta, info.world_size)
        self.initial_quality: dict[str, float | None] | None = None
        if resume_from is not None:
            self._load(resume_from)  # every check passes before the run directory changes
        else:
            logger.info("new run in %s", self.run_dir.resolve())
        # --- the run directory: only now -------------------------------------------------------------
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(dump_config(cfg, absolute_paths=True))
        self.metrics = MetricsLogger(
            self.run_dir, enabled=info.is_main, report_to=cfg.run.trackers(), config=config_to_dict(cfg)
        )
        history = self.metrics.start_at(self.step if resume_from is not None else None)
        logged = [{k: v for k, v in r.items() if k == "loss" or k.startswith("loss_")} for r in history if "loss" in r]
        # the summary's first and last lines span the whole run, across resumes and reruns
        self.first_terms: dict[str, float] | None = logged[0] if logged else None
        self.last_terms: dict[str, float] | None = logged[-1] if logged else None
        self._teacher_quality: QualityReport | None = None
        self._last_quality: tuple[int, QualityReport] | None = None

    # --- set-up helpers ------------------------------------------------------------------------------

    def _validate(self, cfg: GeneralConfig, info: distributed.DistInfo):
        """Every input checked before anything is built or written; sets the set-up attributes it finds
        (mapping, pooling, global batch, precision, manifest, tokenizer, held-out texts).

        Returns:
            ``(teacher_config, weights, resume_from, ds_config)``.
        """
        from dist_kd.data.shards import read_manifest
        from dist_kd.data.tokenizer import check_tokenizer_matches, load_tokenizer

        teacher_config = _teacher_config(cfg.teacher.path)
        num_teacher_layers = teacher_config.num_hidden_layers
        num_student_layers = cfg.student.num_layers
        student_config = None  # a student built here copies the teacher's position embeddings
        if cfg.student.path:
            from transformers import AutoConfig

            student_config = AutoConfig.from_pretrained(check_model_dir(cfg.student.path, "student.path"))
            num_student_layers = student_config.num_hidden_layers
        self.mapping = cfg.distill.mapping(num_teacher_layers, num_student_layers)
        weights = cfg.distill.weights
        temperature = next(field.default for field in dataclasses.fields(cfg.distill) if field.name == "temperature")
        if cfg.distill.temperature != temperature and info.is_main:  # accepted (one file may serve both stages)
            logger.warning(
                "distill.temperature: read by the prediction term of task runs only; general distillation has no "
                "logits, so this run does not use it"
            )
        if student_config is not None:
            self._say_unread_student_keys(student_config)
        elif cfg.student.init == "teacher":  # a wider student is an error now, not after the teacher loads
            unit_selection(student_config_from_teacher(teacher_config, cfg.student, self.mapping), teacher_config)
        student_heads = student_config.num_attention_heads if student_config is not None else cfg.student.num_heads
        student_width = student_config.hidden_size if student_config is not None else cfg.student.hidden_size
        if weights.attn > 0 and cfg.distill.attention == "raw_scores":
            check_heads(teacher_config.num_attention_heads, student_heads)
        if weights.attn > 0:
            cfg.distill.check_relation_heads(teacher_config.hidden_size, student_width)
        # The sentence term pools as the teacher's sentence-transformers modules do (mean without them).
        self.pooling: tuple[str, ...] = ("mean_tokens",)
        if weights.sentence > 0:
            if cfg.distill.projection == "always" or (
                cfg.distill.projection == "auto" and student_width != teacher_config.hidden_size
            ):
                raise ValueError(
                    f"distill.weights.sentence needs the student's own dimensions held to the teacher's: with "
                    f"distill.projection={cfg.distill.projection} (a learnt W_h, student width {student_width}, "
                    f"teacher {teacher_config.hidden_size}) the student can keep a component common to all its "
                    "sentences in directions W_h maps to almost nothing, unseen by the term; set "
                    "distill.projection=select"
                )
            if cfg.distill.normalize == "variance" and cfg.data.micro_batch_size < 2:
                raise ValueError(
                    "distill.weights.sentence with distill.normalize=variance divides by the teacher's variance of "
                    "sentence embeddings across a micro-batch: data.micro_batch_size must be >= 2, got "
                    f"{cfg.data.micro_batch_size}"
                )
            found = sentence_pooling(cfg.teacher.path)
            self.pooling = found[0] if found else self.pooling
            logger.info(
                "the sentence term compares %s-pooled embeddings (%s)",
                pooling_name(self.pooling),
                "the teacher's sentence-transformers pooling"
                if found
                else "no sentence-transformers pooling of the teacher's to follow",
            )
        self.global_batch = check_batch(
            cfg.data.micro_batch_size, cfg.train.grad_accum, info.world_size, cfg.train.global_batch_size
        )
        self.precision = resolve_precision(cfg.train.precision, info.device)
        if not cfg.data.shards:
            raise ValueError("data.shards is not set; prepare a corpus with launch/prepare_corpus.py")
        self.manifest = read_manifest(cfg.data.shards)
        self.tokenizer = load_tokenizer(cfg.teacher.path)
        check_tokenizer_matches(self.manifest["tokenizer"], self.tokenizer, cfg.data.shards)
        if cfg.student.path:
            _check_student_tokenizer(cfg.student.path, self.tokenizer, cfg.teacher.path, student_config)
        # Sequences longer than the position embeddings fail at the first forward, deep inside the model.
        self._position_models = [(teacher_config, cfg.teacher.path)]
        if student_config is not None:
            self._position_models.append((student_config, cfg.student.path))
        self._check_seq_len(self.manifest, cfg.data.shards)
        self.heldout = self._heldout_texts()
        resume_from = ckpt.resume_point(self.run_dir, cfg.run.resume)
        ds_config = build_ds_config(
            cfg.deepspeed.config,
            cfg.data.micro_batch_size,
            cfg.train.grad_accum,
            info.world_size,
            self.precision,
            cfg.train.clip,
            ckpt.resumed_bf16_mode(cfg.train.bf16_mode, resume_from),
        )
        check_compile(cfg.train, ds_config)
        return teacher_config, weights, resume_from, ds_config

    def _check_seq_len(self, manifest: dict[str, Any], shards: str) -> None:
        """The corpus's sequences fit the teacher's (and a ``student.path`` student's) position embeddings."""
        flag = f"the seq_len of corpus {shards} (launch/prepare_corpus.py --seq-len)"
        for config, model_dir in self._position_models:
            check_max_length(config, manifest["seq_len"], model_dir, flag)

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
            verify_checksums=self.cfg.data.verify_checksums and shards == self.cfg.data.shards,
            pin_memory=self.info.device.type == "cuda",
        )

    def _check_ranks_skip_alike(self) -> None:
        """Every rank lays the epoch out over the shards it found undamaged at the start (``data.skip_corrupt``);
        ranks that found different ones (node-local copies of a corpus, a shard replaced while they started)
        read some sequences twice and others never, and ran different numbers of batches per epoch. Collective."""
        found = distributed.gather_objects(sorted(self.loader.skipped_shards))
        if all(names == found[0] for names in found):
            return
        ranks = "; ".join(f"rank {rank}: {listed(names, 3) or 'none'}" for rank, names in enumerate(found))
        raise distributed.said_by(ValueError(
            f"data.shards {self.cfg.data.shards}: the ranks found different corpus shards damaged ({ranks}), so "
            "they would not read the same corpus; every rank must see the same files: copy the corpus again where "
            "a rank found damage (or point data.shards at one shared copy)"
        ), 0)  # fmt: skip

    def _calibrate(self, student: torch.nn.Module, residual: torch.Tensor) -> None:
        """``student.calibrate``: the student's state statistics to the teacher's, on the corpus's first batches."""
        wanted, batches, read = self.cfg.student.calibration_batches, [], 0
        for batch in self._eval_loader(self.cfg.data.shards):
            read += 1
            # The rows of a shard found damaged (data.skip_corrupt) are fully masked: no statistics, and a corpus
            # whose first batches were all such calibrated the student to NaN weights.
            if batch["attention_mask"].any():
                batches.append({name: tensor.to(self.info.device) for name, tensor in batch.items()})
            if len(batches) == wanted or read >= 8 * wanted:
                break
        if not batches:
            self.calibrated = f"no token in the corpus's first {read} batches (damaged shards, data.skip_corrupt)"
            logger.warning("student.calibrate skipped: %s. The student starts as cut from the teacher",
                           self.calibrated)  # fmt: skip
            return
        selected = None if student.config.hidden_size == self.teacher.hidden_size else residual
        try:
            student.to(self.info.device)
            errors = calibrate_to_teacher(student, self.teacher.model, self.mapping, batches, selected)
        except NotPostLayerNorm as err:
            logger.warning(
                "student.calibrate skipped: %s. The student starts as cut from the teacher "
                "(student.calibrate=false starts it so without this check)",
                err,
            )
            self.calibrated = False
            return
        self.calibrated = True
        logger.info(
            "calibrated the student on %d sequences: relative MSE per state %s",
            sum(len(batch["input_ids"]) for batch in batches),
            " ".join(f"{error:.3f}" for error in errors),
        )

    def _heldout_texts(self) -> HeldOutTexts | None:
        """The texts quality is measured on: ``eval.texts``, else the held-out shards' sequences, else none."""
        if self.cfg.eval.texts:
            # Held-out texts of more pieces than the position embeddings would fail at the step-0 evaluation.
            for config, model_dir in self._position_models:
                check_max_length(config, self.cfg.eval.max_length, model_dir, "eval.max_length")
            heldout = HeldOutTexts.from_file(self.cfg.eval.texts, self.tokenizer, self.cfg.eval)
            heldout.use_pooling_of(self.cfg.teacher.path)  # the embeddings its students are exported with
            return heldout
        if not self.cfg.data.eval_shards:
            logger.warning("no held-out text (eval.texts, data.eval_shards): the student's quality is not measured")
            return None
        from dist_kd.data.shards import read_manifest
        from dist_kd.data.tokenizer import check_tokenizer_matches

        # Clear errors now, not after training: the held-out sequences are read as the teacher's token ids.
        manifest = read_manifest(self.cfg.data.eval_shards)
        check_tokenizer_matches(manifest["tokenizer"], self.tokenizer, self.cfg.data.eval_shards)
        self._check_seq_len(manifest, self.cfg.data.eval_shards)
        # The first eval_batches micro-batches' worth of sequences, in order, read one at a time: read in whole
        # micro-batches, the last partial one was dropped (46 sequences at 32 a batch gave 32 texts; at 64, an
        # error), and they are texts to measure, not batches to train on.
        loader = self._eval_loader(self.cfg.data.eval_shards, micro_batch_size=1)
        wanted = min(self.cfg.data.eval_batches * self.cfg.data.micro_batch_size, loader.num_batches_per_epoch)
        sequences, empty = [], 0
        for index, batch in enumerate(loader):
            if index >= wanted:  # one epoch at most: the stream starts the next one after it
                break
            sequence = batch["input_ids"][0][batch["attention_mask"][0].bool()].numpy()
            if len(sequence):
                sequences.append(sequence)
            else:  # a row of a shard found damaged while reading (data.skip_corrupt): no text
                empty += 1
        if empty:
            logger.warning("%d held-out sequences of data.eval_shards came from damaged shards: left out", empty)
        sequences = sequences[: self.cfg.eval.max_texts]  # as eval.texts' file is cut (it was ignored here)
        heldout = HeldOutTexts.from_sequences(
            sequences, self.tokenizer, self.cfg.data.eval_shards, self.cfg.eval.max_length
        )
        heldout.use_pooling_of(self.cfg.teacher.path)
        return heldout

    def _batches(self):
        """Micro-batches across epoch boundaries (iterating the stream yields the rest of one epoch)."""
        while True:
            yield from self.loader

    def _load(self, checkpoint: Path) -> None:
        state = ckpt.load_checkpoint(self.engine, checkpoint)
        self.load_state_dict(state)
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's trainer state (model and optimizer live in the DeepSpeed checkpoint)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "sequences_seen": self.sequences_seen,
            "calibrated": self.calibrated,
            "data": self.loader.state_dict(),
            "window": self._window.state_dict(),
            "initial_quality": self.initial_quality,
            # what the summary says of damaged shards (data.skip_corrupt) covers the whole run, resumes included
            "corrupt": {"empty_batches": self.empty_batches, "skipped_shards": dict(self.loader.skipped_shards)},
            "collapsed": sorted(self._collapsed),  # what the last evaluation warned of: not said again on resume
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        # checkpoints of earlier releases count no sequences (None: the card says steps x batch), nor calibration
        self.sequences_seen = state.get("sequences_seen")
        self.calibrated = state.get("calibrated", self.calibrated)
        self.loader.load_state_dict(state["data"])
        if "window" in state:
            self._window.load_state_dict(state["window"])
        self.initial_quality = state.get("initial_quality")
        self._collapsed = set(state.get("collapsed") or ())
        corrupt = state.get("corrupt") or {}  # checkpoints of earlier releases: counted from the resume
        self.empty_batches = corrupt.get("empty_batches", 0)
        for name, reason in (corrupt.get("skipped_shards") or {}).items():
            self.loader.skipped_shards.setdefault(name, reason)

    def save(self) -> Path:
        """A complete checkpoint of the current step (collective); never of diverged weights."""
        self.guard.before("its checkpoint", self.step)
        return ckpt.save_checkpoint(
            self.engine, self.run_dir / "checkpoints", self.step, self.state_dict(), self.meta, self.cfg.run.keep_last
        )

    # --- training --------------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward, losses and backward of one micro-batch (the engine steps at the accumulation boundary)."""
        begin_compiled_step(self.cfg.train)
        input_ids = batch["input_ids"].to(self.info.device, non_blocking=True)
        mask = device_mask(batch["attention_mask"], self.info.device)
        teacher_features = self.teacher.features(input_ids, mask)
        student_features = self.engine(input_ids, mask)
        with autocast_of(self.engine):  # the projections, as the engine's forward (a bf16 student)
            terms = tinybert_objective(
                student_features,
                teacher_features,
                self.mapping,
                mask,
                self.cfg.distill.weights,
                self.engine.module.projections,
                normalize=self.cfg.distill.normalize,
                attention=self.cfg.distill.attention,
                relation_heads=self.cfg.distill.relation_heads,
                pooling=self.pooling,
            )
        self.engine.backward(terms["loss"])
        self.step_lr = self.engine.get_lr()[0]  # the rate this step applies (the scheduler moves on in step())
        self.engine.step()
        return {name: value.detach() for name, value in terms.items()}

    def _model_settings_meta(self) -> dict[str, Any]:
        """Settings that change how the models run, not which parameters they have: a resume may change them,
        named in a warning (another teacher precision changes its targets; the student's dropout and the
        clipping change its updates)."""
        changeable = {"student.dropout": self.cfg.student.dropout, "train.clip": self.cfg.train.clip}
        return {"changeable": {**changeable, "teacher.dtype": self.teacher_dtype_name()}}

    def teacher_dtype_name(self) -> str:
        """The teacher's precision as resolved (fp16 asked on a CPU runs fp32), by its config name."""
        return next(name for name, dtype in DTYPES.items() if dtype == self.teacher.dtype)

    def train(self) -> bool:
        """Run until ``train.max_steps`` or a stop signal. Returns True when training finished."""
        cfg = self.cfg
        stop = StopSignal()
        batches = self._batches()
        if self.step == 0 and self.heldout is not None:
            self.initial_quality = self.quality_record()  # what the initialisation alone gives
            self.initial_quality["pooling"] = self.heldout.pooling_name  # a resume under other pooling drops it
            self.initial_quality["texts"] = self.heldout_key()  # and one on other texts or settings
        # The first window's tokens/s and the bar's rate count training only, not set-up or that evaluation.
        bar = progress_bar(
            cfg.train.max_steps, self.step, "general distillation", self.info.is_main and cfg.run.progress
        )
        # (the first epoch that counts whole, tokens_seen then): see _check_tokens_came. A resumed run's epoch
        # may have begun before the checkpoint, or be the rest of one laid out afresh: the next one counts.
        self._no_tokens_since = (self.loader.epoch + int(self.step > 0), self.tokens_seen)
        self._window.restart_clock()
        try:
            while self.step < cfg.train.max_steps:
                for _ in range(cfg.train.grad_accum):
                    batch = next(batches)
                    terms = self.train_step(batch)
                    mask = batch["attention_mask"]  # the host tensor: counting its tokens needs no device sync
                    tokens = int(mask.sum())
                    # Fully masked rows only (a shard found corrupt while reading, data.skip_corrupt): the
                    # batch trains on nothing, and its zero losses stay out of the logged means.
                    # Rows of such a shard are no sequence seen (the model card and samples_per_s count these).
                    rows = int((mask.sum(dim=1) > 0).sum()) if tokens < mask.numel() else mask.shape[0]
                    self._window.add(terms if tokens else {}, tokens=tokens, rows=rows)
                    if not tokens:
                        self.empty_batches += 1
                self.step += 1
                last = self.step == cfg.train.max_steps
                evaluate = self.heldout is not None and (
                    last or bool(cfg.eval.every and self.step % cfg.eval.every == 0)
                )
                if self.step % cfg.run.log_every == 0 or last or evaluate:
                    record = self._log(evaluate)
                    loss = f"{record['loss']:.4f}" if "loss" in record else "-"
                    bar.set_postfix(loss=loss, tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                bar.update(1)
                if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < cfg.train.max_steps:
                    with self._window.paused():  # tokens/s counts training only
                        self.save()
                if stop_agreed(stop.requested):
                    saved = self.save()
                    logger.warning("stopped at step %d with its checkpoint %s; run again with run.resume=auto to "
                                   "continue", self.step, saved)  # fmt: skip
                    return False
            if any(self._window.batches):
                # Resumed at its last step with the steps since its last line still open (stopped between log
                # lines, then ended there with train.max_steps): that step's line and evaluation were never
                # written, and the tokens of those steps were missing from the model card.
                self._log(self.heldout is not None)
            self.save()
            return True
        finally:
            # The DataLoader's workers shut down now: an error's traceback keeps this frame (and the iterator)
            # alive to the interpreter's exit, where the workers, which leave the first SIGTERM to the trainer,
            # were waited for forever (a diverged run printed its error and never exited).
            batches.close()
            bar.close()
            stop.restore()

    def _log(self, evaluate: bool) -> dict:
        window = self._window.reduce()  # one sync for every term
        values = dict(sorted(window.values.items()))
        self.tokens_seen += window.tokens
        if self.sequences_seen is not None:
            self.sequences_seen += window.rows
        elapsed = max(window.seconds, 1e-9)
        # No loss terms when every batch of the window, on every rank, was fully masked (data.skip_corrupt).
        loss = {"loss": values.pop("loss")} if "loss" in values else {}
        record = {
            "step": self.step,
            **loss,
            **{f"loss_{name}": value for name, value in values.items()},
            "lr": self.step_lr,  # the last step's rate; get_lr() after it is the next step's
            "tokens_per_s": window.tokens / elapsed,
            "samples_per_s": window.rows / elapsed,
            "tokens_seen": self.tokens_seen,
        }
        per_rank = record["tokens_per_s"] / self.info.world_size
        mfu = estimate_mfu(self.model, self.teacher, per_rank, self.info.device, self.manifest["seq_len"])
        if mfu is not None:
            record["mfu"] = mfu
        terms = {k: v for k, v in record.items() if k == "loss" or k.startswith("loss_")}
        if terms:
            if self.first_terms is None:
                self.first_terms = terms
            self.last_terms = terms
        self.guard.after_log(record)  # a diverged student stops here, its line and figures unwritten
        if evaluate:
            self.guard.before("the held-out evaluation", self.step)
            quality = self.quality_record()
            record.update({key: value for key, value in quality.items() if value is not None})
            self._window.restart_clock()  # the evaluation is not training time
        self.metrics.log(record)
        self._check_tokens_came()
        return record

    def _check_tokens_came(self) -> None:
        """Stop a run that a whole epoch gave no token (collective values: every rank stops at the same step).

        With ``data.skip_corrupt``, the rows of a shard found damaged while reading are fully masked and train
        on nothing; a corpus damaged throughout ran every step that way and exported an untrained student with
        exit 0 (its model card: "0 tokens"). The same corpus found bad at the start is refused already.
        """
        first_whole, tokens = self._no_tokens_since
        if self.tokens_seen != tokens:
            self._no_tokens_since = (self.loader.epoch + 1, self.tokens_seen)
        elif self.loader.epoch > first_whole:  # epoch first_whole went by from its start without a token
            skipped = sorted(self.loader.skipped_shards)
            names = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            # Every rank stops here (the counts are all ranks'); said once, by rank 0, naming the shards it skipped.
            raise distributed.said_by(ValueError(
                f"data.shards {self.cfg.data.shards}: a whole epoch gave no token to train on by step {self.step}: "
                f"every shard read was found corrupt (data.skip_corrupt skipped {len(skipped)} on rank 0: {names}); "
                "prepare the corpus again (dist-kd prepare-corpus) or point data.shards at an undamaged copy"
            ), 0)  # fmt: skip

    # --- quality ---------------------------------------------------------------------------------------

    def quality(self, model: torch.nn.Module, name: str) -> QualityReport:
        """Spread and probe of an encoder (``name``, for an error) on the held-out texts (every rank: ZeRO-3
        forwards are collective)."""
        cfg = self.cfg.eval
        return self.heldout.report(last_states(model), self.info.device, cfg.batch_size, cfg.folds, name)

    def teacher_quality(self) -> QualityReport:
        """The teacher's figures at layer g(M), the layer the student's last layer learns from (computed once)."""
        if self._teacher_quality is None:
            name = f"the teacher (teacher.path {self.cfg.teacher.path}, teacher.dtype {self.teacher_dtype_name()})"
            self._teacher_quality = self.quality(self.teacher.model, name)
        return self._teacher_quality

    def current_quality(self) -> QualityReport:
        """The student's figures at the current step (the last evaluation's when it was at this step)."""
        if self._last_quality is not None and self._last_quality[0] == self.step:
            return self._last_quality[1]
        return self.student_quality()  # e.g. a finished run started again

    def student_quality(self) -> QualityReport:
        """The student's figures with the fp32 weights its export writes, not a bf16/fp16 engine's rounded copy
        (:func:`dist_kd.train.engine.exported_weights`)."""
        student = self.engine.module.student
        with exported_weights(self.engine, student) as scoring:
            return self.quality(scoring, f"the student at step {self.step}")

    def heldout_key(self, as_typed: bool = False) -> str:
        """What the quality figures were measured on: the held-out texts' source and number, and the eval
        settings that change them (not eval.every or eval.batch_size). Paths are absolute: a resume that names
        the same file another way (config.yaml's absolute paths, ``./dev.jsonl``) is on the same texts.
        ``as_typed``: paths as given, the key of the releases before."""

        def where(path: Any) -> Any:
            return path if as_typed or not path else os.path.abspath(os.path.expanduser(str(path)))

        paths = {f.name for f in dataclasses.fields(self.cfg.eval) if f.metadata.get("path")}
        settings = {
            key: where(value) if key in paths else value
            for key, value in dataclasses.asdict(self.cfg.eval).items()
            if key not in ("every", "batch_size")
        }
        return json.dumps({"source": str(where(self.heldout.source)), "num_texts": len(self.heldout), **settings},
                          sort_keys=True)  # fmt: skip

    def quality_record(self) -> dict[str, float | str | None]:
        """The student's quality beside the teacher's, as ``eval_*`` metrics; warns when it looks collapsed.
        ``eval_texts`` tells the lines measured on one set of held-out texts and eval settings from those of
        another (a resume that changed them): the report plots the current set's alone."""
        student = self.student_quality()
        self._last_quality = (self.step, student)
        teacher = self.teacher_quality()
        ratio = None
        if student.probe is not None and teacher.probe:
            ratio = student.probe / teacher.probe
        if self.info.is_main:
            probe = "" if student.probe is None else f", probe {student.probe:.3f} (teacher {teacher.probe:.3f})"
            logger.info("step %d held-out quality: spread %.3f (teacher %.3f)%s", self.step, student.spread,
                        teacher.spread, probe)  # fmt: skip
        reasons = collapse_reasons(student, self.heldout.chance, teacher)
        # Said when the student becomes collapsed (or so for another reason) and when it stops being so, not at
        # every evaluation after.
        new = [reason for reason in reasons if reason_kind(reason) not in self._collapsed]
        if new and self.info.is_main:
            logger.warning("the student looks collapsed at step %d: %s", self.step, "; ".join(new))
        elif not reasons and self._collapsed and self.info.is_main:
            logger.info("the student no longer looks collapsed at step %d", self.step)
        self._collapsed = {reason_kind(reason) for reason in reasons}
        return {
            "eval_spread": student.spread,
            "eval_spread_teacher": teacher.spread,
            "eval_probe": student.probe,
            "eval_probe_teacher": teacher.probe,
            "eval_probe_ratio": ratio,
            "eval_texts": hashlib.sha256(self.heldout_key().encode()).hexdigest()[:12],
        }

    # --- export and summary ----------------------------------------------------------------------------

    def export(self) -> Path:
        """Save the student (no projections) with the teacher's tokenizer and a model card to ``run_dir/student``
        (collective)."""
        target = self.run_dir / "student"
        student = self.engine.module.student
        with full_precision_weights(self.engine, student), distributed.shared_failure():
            if self.info.is_main:
                with atomic_dir(target) as tmp:
                    student.save_pretrained(tmp)
                    save_tokenizer(self.tokenizer, tmp, student.config)
                    write_model_card(tmp, self.model_card())
                    carry_sentence_modules(
                        self.cfg.teacher.path, tmp, student.config.hidden_size, self.teacher.hidden_size
                    )
        distributed.barrier()
        return target

    def model_card(self, quality: dict | None = None) -> str:
        """The exported student's README.md: teacher, method, data, steps and, when measured, its quality."""
        cfg, student = self.cfg, self.meta["student"]
        teacher = self.meta["teacher"]
        weights = cfg.distill.weights
        attention = (
            "raw attention-score MSE"
            if cfg.distill.attention == "raw_scores"
            else f"MiniLMv2 attention-relation KL ({cfg.distill.relation_heads} relation heads)"
        )
        terms = [
            name
            for name, weight in (
                ("embedding MSE", weights.embd),
                ("hidden-state MSE", weights.hidden),
                (attention, weights.attn),
                ("sentence-embedding MSE", weights.sentence),
            )
            if weight > 0
        ]
        if isinstance(self.calibrated, str):
            calibration = f", not calibrated: {self.calibrated}"
        else:
            calibration = {True: ", calibrated", False: ", not calibrated: a pre-LN teacher", None: ""}[
                self.calibrated if self.calibrated is not None or not cfg.student.calibrate else True
            ]
        facts = {
            "teacher": f"{cfg.teacher.path} ({teacher['model_type']}, {teacher['num_layers']} layers x "
            f"{teacher['hidden_size']})",
            "student": f"{student['num_layers']} layers x {student['hidden_size']}, {student['num_heads']} heads, "
            f"FFN {student['intermediate_size']}",
            "method": f"TinyBERT general distillation: {', '.join(terms)} through the layer map g = {self.mapping}",
            "initialisation": cfg.student.path
            or cfg.student.init + (f" (weight selection{calibration})" if cfg.student.init == "teacher" else ""),
            "loss settings": f"weights {dataclasses.asdict(cfg.distill.weights)}, projection {cfg.distill.projection}, "
            f"normalize {cfg.distill.normalize}, attention {cfg.distill.attention}",
            "corpus": f"{cfg.data.shards} ({self.manifest['num_sequences']} sequences of {self.manifest['seq_len']} "
            "tokens)",
            "steps": f"{self.step}: "
            + (f"{self.sequences_seen}" if self.sequences_seen is not None else f"{self.step} x {self.global_batch}")
            + f" sequences, {self.tokens_seen} tokens, lr {cfg.train.lr}",
        }
        metrics = {}
        if quality:
            for name in quality.get("order", quality["rows"]):
                row = quality["rows"][name]
                metrics[f"{name}: spread"] = row["spread"]
                metrics[f"{name}: probe accuracy"] = row["probe"]
            metrics["held-out texts"] = f"{quality['num_texts']} of {quality['texts']}"
        return model_card(
            "dist_kd general-distilled student",
            "A smaller encoder distilled from the teacher below on unlabelled text, to be fine-tuned or "
            "task-distilled (launch/task.py). Spread is the mean cosine between sentence embeddings of held-out "
            f"texts (1 = collapsed); probe accuracy is a {cfg.eval.folds}-fold linear probe on its frozen embeddings.",
            facts,
            metrics,
            encoder_load_snippet(self.run_dir / "student"),
            pipeline_tag="feature-extraction",
        )

    def random_init_quality(self) -> QualityReport:
        """A randomly initialised student of the same shape on the same texts: what distillation must beat."""
        from transformers import AutoModel

        torch.manual_seed(self.cfg.train.seed + 1)
        random_student = AutoModel.from_config(self.engine.module.student.config).to(self.info.device)
        return self.quality(random_student, "a randomly initialised student")

    def _eval_loader(self, shards: str, micro_batch_size: int | None = None):
        from dist_kd.data.stream import build_corpus_loader

        return build_corpus_loader(
            shards,
            micro_batch_size=micro_batch_size or self.cfg.data.micro_batch_size,
            rank=0,
            world_size=1,
            num_workers=0,
            seed=0,
            shuffle=False,
            skip_corrupt=self.cfg.data.skip_corrupt,
        )


def quality_summary(trainer: GeneralTrainer) -> dict | None:
    """Teacher, initial student, final student and a random-init student on the held-out texts (collective).

    Returns:
        ``{"texts", "num_texts", "chance", "rows": {name: {"spread", "probe", "probe_ratio"}}, "order": [name,
        ...] (the table's row order; summary.json sorts keys), "collapsed"}``, or None without held-out text.
    """
    if trainer.heldout is None:
        return None
    teacher = trainer.teacher_quality()
    final = trainer.current_quality()
    reports = {"teacher": teacher}
    initial = trainer.initial_quality
    if initial is not None and initial.get("pooling", "mean") != trainer.heldout.pooling_name:
        # Measured before a resume under another pooling (a release that mean-pooled every teacher).
        logger.warning("the step-0 quality was measured with %s pooling, this run pools %s: left out of the summary",
                       initial.get("pooling", "mean"), trainer.heldout.pooling_name)  # fmt: skip
        initial = None
    if initial is not None and initial.get("texts", key := trainer.heldout_key()) not in (
        key,
        trainer.heldout_key(as_typed=True),  # recorded by a release before, with the paths as typed
    ):
        # Measured before a resume with other held-out texts or eval settings (a checkpoint of an earlier
        # release does not record them, and keeps its row).
        logger.warning("the step-0 quality was measured on other held-out texts or eval settings than this run's "
                       "(eval.*, data.eval_shards changed at the resume): left out of the summary")  # fmt: skip
        initial = None
    if initial is not None:
        reports["student at step 0"] = QualityReport(spread=initial["eval_spread"], probe=initial["eval_probe"])
    reports[f"student at step {trainer.step}"] = final
    reports["random init, same shape"] = trainer.random_init_quality()
    rows = {
        name: {
            "spread": report.spread,
            "probe": report.probe,
            "probe_ratio": report.probe / teacher.probe if report.probe is not None and teacher.probe else None,
        }
        for name, report in reports.items()
    }
    return {
        "texts": trainer.heldout.source,
        "num_texts": len(trainer.heldout),
        "num_classes": len(trainer.heldout.label_names) or None,
        "chance": trainer.heldout.chance,
        "pooling": trainer.heldout.pooling_name,
        "rows": rows,
        "order": list(rows),
        "collapsed": collapse_reasons(final, trainer.heldout.chance, teacher),
    }


def loss_cell(value: float) -> str:
    """A loss for the summary's 12-wide columns: 4 decimals, or 4 significant digits where those would not leave
    a space between the columns (a diverged run's 1.8e24 ran into the cell before it)."""
    text = f"{value:.4f}"
    return text if len(text) <= 11 else f"{value:.4g}"


def summary_lines(
    trainer: GeneralTrainer, quality: dict | None, ranks: list[tuple[dict[str, str], int]] | None = None
) -> list[str]:
    """The short report printed at the end of the main job."""
    lines = [f"student saved to {trainer.run_dir / 'student'} (load with transformers.AutoModel.from_pretrained)"]
    if trainer.first_terms and trainer.last_terms:
        lines.append(f"{'term':<14}{'first log':>12}{'last log':>12}")
        for name in trainer.first_terms:
            first, last = trainer.first_terms[name], trainer.last_terms.get(name, math.nan)
            lines.append(f"{name:<14}{loss_cell(first):>12}{loss_cell(last):>12}")
    if quality:
        probe = "no labels: no probe"
        if quality["num_classes"]:
            probe = f"probe: {trainer.cfg.eval.folds}-fold linear, {quality['num_classes']} classes, "
            probe += f"majority class {quality['chance']:.3f}"
        lines.append(f"quality on {quality['num_texts']} held-out texts ({quality['texts']}; {probe})")
        lines.append(f"spread = mean cosine between sentence embeddings{pooling_note(quality)} (1 = collapsed); "
                     "probe = accuracy")  # fmt: skip
        lines.append(f"{'model':<26}{'spread':>8}{'probe':>8}{'/teacher':>10}")

        def cell(value, width):
            return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"

        for name, row in quality["rows"].items():
            lines.append(f"{name:<26}{cell(row['spread'], 8)}{cell(row['probe'], 8)}{cell(row['probe_ratio'], 10)}")
        if quality["collapsed"]:
            lines.append("WARNING: the student looks collapsed: " + "; ".join(quality["collapsed"]))
    # Damage found while reading is seen by the rank that read the shard: every rank's (``ranks``: each rank's
    # skipped shards and empty micro-batches, in rank order; this rank's alone without it).
    ranks = ranks or [(trainer.loader.skipped_shards, trainer.empty_batches)]
    skipped = sorted({name for shards, _ in ranks for name in shards})
    if skipped:
        names = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        lines.append(f"skipped {len(skipped)} corrupt corpus shard(s) (data.skip_corrupt): {names}")
    empty = [count for _, count in ranks]
    if sum(empty):
        where = "" if len(ranks) == 1 else " (" + ", ".join(f"rank {r}: {n}" for r, n in enumerate(empty) if n) + ")"
        lines.append(
            f"{sum(empty)} micro-batch(es){where} held only rows of a corrupt shard and trained on nothing; they are "
            "left out of the logged losses"
        )
    return lines


def write_summary(run_dir: Path, lines: list[str], quality: dict | None) -> None:
    """``summary.json`` in the run directory (atomically)."""
    from dist_kd.io import write_json_atomic

    write_json_atomic(run_dir / "summary.json", {"lines": lines, "quality": quality})


def finish_general(trainer: GeneralTrainer, cfg: GeneralConfig, info) -> list[str]:
    """The end of a general run (collective): export the student, measure its quality beside the teacher's
    and a random init's, write summary.json, the model card and report.md.

    Returns:
        The summary lines (on the main rank; an empty list elsewhere).
    """
    trainer.export()
    # Every rank runs it: under ZeRO-3 each forward gathers partitioned weights collectively.
    quality = quality_summary(trainer)
    ranks = distributed.gather_objects((dict(trainer.loader.skipped_shards), trainer.empty_batches))
    if not info.is_main:
        return []
    from dist_kd.model_card import write_model_card
    from dist_kd.report import report_at_end

    lines = summary_lines(trainer, quality, ranks)
    write_summary(trainer.run_dir, lines, quality)
    if quality:
        write_model_card(trainer.run_dir / "student", trainer.model_card(quality))  # with the measured quality
    return [*lines, report_at_end(trainer.run_dir)]
