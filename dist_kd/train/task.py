"""Task distillation: the multi-task MT-DNN-KD student and TinyBERT's task stage, on a DeepSpeed engine.

One ``TaskTrainer`` per rank, selected by ``distill.phase``:

- ``prediction`` (MT-DNN-KD, and TinyBERT's second task phase): a shared encoder with one head per task.
  Each micro-batch comes from one task. A task with a soft-target store (``launch/precompute.py``) trains on
  the store's rows (augmented ones included) against the ensemble's probabilities,
  ``soft_weight * CE(Q, softmax(z/t)) + hard_weight * CE(y, z)`` (the hard term on rows that have a label);
  a task without one trains on its hard labels. No teacher is loaded: the store carries the texts and the
  targets, and the teacher directories it names are never opened.
- ``intermediate`` (TinyBERT's first task phase): the general stage's losses (embeddings, hidden states,
  raw attention scores through g(m)) against a live, frozen, fine-tuned teacher per task, on the task's
  (augmented) rows; the student encoder (no heads) is exported for the prediction phase.

Sampling is MT-DNN's: the task of micro-batch i is drawn with probability proportional to its training
rows (or to the configured ``weight``) from an RNG seeded by (seed, i), so every rank draws the same task
and a resumed run draws the same sequence. Within a task, rows follow a seeded permutation per epoch of
that task; each micro-batch takes the next ``micro_batch_size x world_size`` rows and each rank its slice,
so the state to save is one counter per task (plus the micro-batch counter), valid for any world size.

One *epoch* is as many rows as all training sets together; dev sets are scored after each epoch (or every
``eval.every`` steps) and at the end: in phase prediction with each task's metric, the best step per task
exported as an HF ``*ForSequenceClassification`` directory under ``best/``; in phase intermediate by the
layer losses on the dev rows, with no heads to export.

Every input is validated before anything is written to the run directory, as in the general stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_kd import distributed
from dist_kd.config import config_to_dict, dump_config
from dist_kd.data.encode import pad_id_of, pad_rows, uses_token_types
from dist_kd.data.multitask import TaskData, TaskSampler, load_task_data
from dist_kd.data.tokenizer import save_tokenizer
from dist_kd.evaluate import compute_metrics, predicted_classes
from dist_kd.io import atomic_dir, atomic_path, data_fingerprint, weights_sha256, write_json_atomic
from dist_kd.losses import prediction_loss
from dist_kd.model_card import classifier_load_snippet, encoder_load_snippet, model_card, write_model_card
from dist_kd.models.capture import check_encoder_config
from dist_kd.models.fields import ffn_width
from dist_kd.models.student import StudentConfig, unit_selection
from dist_kd.models.teacher import check_max_length, check_model_dir
from dist_kd.objective import tinybert_objective
from dist_kd.predict import TASK_RECORD, batched_logits, length_batches, task_record, write_predictions
from dist_kd.sentence_modules import carry_sentence_modules
from dist_kd.train import checkpoint as ckpt
from dist_kd.train.common import DivergenceGuard, LossWindow, StopSignal, progress_bar, stop_agreed
from dist_kd.train.engine import (
    EngineTrainer,
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
from dist_kd.train.metrics import MetricsLogger
from dist_kd.train.task_config import TaskConfig

BEST_RECORD = "best.json"  # in best/<task>/: the step and dev metrics of the export

logger = logging.getLogger(__name__)


def data_settings_meta(cfg: TaskConfig, weights: list[float]) -> dict[str, Any]:
    """The data settings a checkpoint's sampler state was saved under, for its ``meta.json``.

    The sampler keeps one row counter per task into a seeded order of that task's epoch. With
    ``data.group_by_length`` that order groups rows by their length into micro-batches of
    ``data.micro_batch_size`` rows, so it changes with either setting or with ``data.max_length`` (the
    lengths): the counters would point into another order, and rows of the epoch in progress would come twice
    or not at all. Those are refused on resume (top-level keys). Without grouping the order is a plain
    permutation: the micro-batch size and ``max_length`` may change, and so may ``train.grad_accum`` and the
    tasks' sampling weights (which task each later micro-batch comes from), each with a warning
    (``changeable``, :func:`dist_kd.train.checkpoint.check_changeable`).

    Args:
        weights: the sampling weight of each task as used (configured, or the task's training rows).
    """
    grouping = {"data.micro_batch_size": cfg.data.micro_batch_size, "data.max_length": cfg.data.max_length}
    changeable: dict[str, Any] = {} if cfg.data.group_by_length else dict(grouping)
    changeable.update({"train.grad_accum": cfg.train.grad_accum, "tasks[].weight": [float(w) for w in weights]})
    return {
        "data.group_by_length": cfg.data.group_by_length,
        **(grouping if cfg.data.group_by_length else {}),
        "changeable": changeable,
    }


def objective_meta(cfg: TaskConfig, phase: str) -> dict[str, Any]:
    """The task objective's settings for a checkpoint's ``meta.json`` (:meth:`DistillConfig.resume_meta`; in
    phase prediction also the soft and hard weights, which may change with a warning)."""
    meta = cfg.distill.resume_meta(layer_losses=phase == "intermediate")
    # They change how the student runs and steps, not which parameters it has (nor the teachers' dtype, which
    # phase intermediate's targets depend on, a change of it named too).
    meta["changeable"].update({"student.dropout": cfg.student.dropout, "student.head_dropout": cfg.student.head_dropout,
                               "train.clip": cfg.train.clip})  # fmt: skip
    if phase == "intermediate":
        meta["changeable"]["teacher.dtype"] = cfg.teacher.dtype
    if phase == "prediction":
        meta["changeable"].update({"distill.soft_weight": cfg.distill.soft_weight,
                                   "distill.hard_weight": cfg.distill.hard_weight})  # fmt: skip
    return meta


class TaskTrainer(EngineTrainer):
    """Task distillation on one rank.

    Args:
        cfg: the validated config.
        info: this process's place in the job (``distributed.init_distributed()``).
    """

    def _set_up(self, cfg: TaskConfig, info: distributed.DistInfo) -> None:
        from transformers import AutoConfig

        from dist_kd.data.tokenizer import load_tokenizer, tokenizer_fingerprint

        self.cfg, self.info = cfg, info
        self.phase = cfg.distill.phase
        note = cfg.distill.other_phase_note()
        if note is not None:
            logger.warning(note)
        self.run_dir = Path(cfg.run.output_dir)
        torch.manual_seed(cfg.train.seed)

        # --- validate every input before writing anything -------------------------------------------
        student_dir = check_model_dir(cfg.student.path, "student.path")
        self.source_config = AutoConfig.from_pretrained(student_dir)
        check_encoder_config(self.source_config, f"student.path {student_dir}")
        self.student_shape = cfg.student.new_shape(self.source_config)
        self.student_config = cfg.student.encoder_config(self.source_config)
        if self.student_shape is not None:
            if self.student_shape.init == "teacher":
                unit_selection(self.student_config, self.source_config)  # a wider student is an error now
        try:
            self.tokenizer = load_tokenizer(student_dir)
        except (OSError, TypeError, ValueError) as err:
            raise ValueError(f"student.path {student_dir} has no usable tokenizer ({err})") from None
        check_max_length(self.student_config, cfg.data.max_length, student_dir, "data.max_length")
        self.global_batch = check_batch(
            cfg.data.micro_batch_size, cfg.train.grad_accum, info.world_size, cfg.train.global_batch_size
        )
        self.precision = resolve_precision(cfg.train.precision, info.device)
        resume_from = ckpt.resume_point(self.run_dir, cfg.run.resume)
        ds_config = build_ds_config(  # before the data and teachers load: a bad JSON costs nothing
            cfg.deepspeed.config, cfg.data.micro_batch_size, cfg.train.grad_accum, info.world_size, self.precision,
            cfg.train.clip, ckpt.resumed_bf16_mode(cfg.train.bf16_mode, resume_from),
        )  # fmt: skip
        check_compile(cfg.train, ds_config)
        self.tasks = [
            load_task_data(
                entry.spec(), train=entry.train, soft_targets=entry.soft_targets, dev=entry.dev,
                tokenizer=self.tokenizer, max_length=cfg.data.max_length, need_labels=self.phase == "prediction",
                teacher=entry.teacher or cfg.teacher.path or None,
                temperature=cfg.distill.temperature if self.phase == "prediction" else None,
                hard_weight=cfg.distill.hard_weight if self.phase == "prediction" else 0.0,
            )
            for entry in cfg.tasks
        ]  # fmt: skip
        if self.phase == "intermediate":
            for task in self.tasks:
                if not task.teacher:
                    raise ValueError(
                        f"task '{task.spec.name}': phase intermediate needs a teacher (tasks[].teacher or teacher.path)"
                    )
        self.names = [task.spec.name for task in self.tasks]
        self.pad_id = pad_id_of(self.tokenizer)
        self.use_token_types = uses_token_types(self.tokenizer, self.student_config)
        self.rows_per_step = cfg.data.micro_batch_size * info.world_size * cfg.train.grad_accum
        self.steps_per_epoch = max(1, math.ceil(sum(task.num_rows for task in self.tasks) / self.rows_per_step))
        weights = [entry.weight for entry in cfg.tasks]  # every task has one, or none has (checked)
        if weights[0] is None:
            weights = [float(task.num_rows) for task in self.tasks]
        self.sampler = TaskSampler(
            [task.num_rows for task in self.tasks],
            weights,
            cfg.train.seed,
            cfg.data.micro_batch_size * info.world_size,
            lengths=[task.rows.lengths for task in self.tasks] if cfg.data.group_by_length else None,
            group_rows=cfg.data.micro_batch_size,
        )
        self.teachers = self._load_teachers() if self.phase == "intermediate" else {}
        self.epochs_at = self._epochs_origin(resume_from)
        self.max_steps = cfg.train.max_steps
        if cfg.train.epochs:
            origin, left = self.epochs_at, cfg.train.epochs - self.epochs_at["epoch"]
            self.max_steps = max(1, origin["step"] + math.ceil(left * self.steps_per_epoch))
            # A finished run started again, whose last (old) step went past train.epochs by less than one step.
            if self.max_steps < origin["step"] and -left < self._epoch_slack and ckpt.finished(resume_from):
                self.max_steps = origin["step"]

        # --- build ---------------------------------------------------------------------------------
        self.model = self._build_model(student_dir)
        encoder = self.model.student if self.phase == "intermediate" else self.model.encoder  # DistillStudent or heads
        compile_models([encoder, *(teacher.model for teacher in self.teachers.values())], cfg.train, ds_config)
        train_cfg = dataclasses.replace(cfg.train, max_steps=self.max_steps)
        self.engine = build_engine(self.model, train_cfg, ds_config)
        self.guard = DivergenceGuard(self.engine.module, self.run_dir, cfg.train)
        self.step = 0
        self.tokens_seen = 0
        self.step_lr: float | None = None  # the rate of the last optimizer step, for its log line
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}
        # Digests of the data (stores or files) and the dev sets, read by rank 0 alone. The dev sets: eval.json and
        # best/ hold the earlier evaluations, which another dev set would mix with the new ones (and best/ pick
        # across the two). One key per task, so the error names the task: by its resolved name ('MRPC' and
        # 'mrpc' are one task), and None for a task without one (a dev set added or dropped on resume left the
        # earlier best/ and dev predictions beside the new exports).
        data_digests = distributed.on_main(
            lambda: {
                "data": {t.spec.name: data_fingerprint(t.source) for t in self.tasks},
                **{
                    f"tasks[{task.spec.name}].dev": data_fingerprint(entry.dev) if entry.dev else None
                    for task, entry in zip(self.tasks, cfg.tasks, strict=True)
                },
            }
        )
        self.meta = {
            "phase": self.phase,
            "student": {
                "model_type": self.student_config.model_type,
                "num_layers": self.student_config.num_hidden_layers,
                "hidden_size": self.student_config.hidden_size,
                "num_heads": self.student_config.num_attention_heads,
            },
            "tasks": [
                {"name": t.spec.name, "type": t.spec.type, "labels": t.spec.labels, "rows": t.num_rows}
                for t in self.tasks
            ],
            # best/ holds the step the metric picked: another metric would judge its later scores against a best
            # it did not pick (and the steps it would have picked are gone). Top-level keys, as the dev digests.
            **{f"tasks[{t.spec.name}].metric": t.spec.metric for t in self.tasks},
            # Top-level keys, which a checkpoint written before them lacks and is not compared on: the student
            # dict above is compared as a whole. Either would otherwise fail mid-load with a size mismatch.
            "student.intermediate_size": ffn_width(self.student_config),
            "student.vocab_size": self.student_config.vocab_size,
            # What the student's ids mean; dist-kd export checks the tokenizer it ships against it.
            "tokenizer.sha256": tokenizer_fingerprint(self.tokenizer)["sha256"],
            # Which tasks train on sentence pairs: dist-kd export --task writes it into the classifier's task.json.
            "tasks.pairs": {t.spec.name: t.pairs for t in self.tasks},
            **data_digests,
            **ckpt.settings_meta(cfg.train, ds_config, self.max_steps),
            **ckpt.merged_settings(data_settings_meta(cfg, weights), objective_meta(cfg, self.phase)),
        }
        if self.phase == "intermediate":  # what the projections and layer losses were learnt against
            self.meta.update({f"tasks[{name}].teacher": teacher for name, teacher in self.teacher_meta.items()})
            # A teacher retrained in place (same path and shape, new weights): its own key, which checkpoints of
            # earlier releases lack (and are not compared on), so that their teacher dicts above still match.
            self.meta.update(
                {f"tasks[{t.spec.name}].teacher.sha256": self.teacher_sha256[t.teacher] for t in self.tasks}
            )
            self.meta["distill.layer_map"] = self.mapping
        if resume_from is not None:
            with distributed.shared_failure():  # every rank reads the same refusal: said once, not once per rank
                ckpt.check_resume(resume_from, self.meta, info.world_size)
            if self._epochs_note:
                logger.warning("%s", self._epochs_note)
        self._window = LossWindow(info.device, self.names)
        if resume_from is not None:  # every check passes before the run directory changes
            state = ckpt.load_checkpoint(self.engine, resume_from)
            self.load_state_dict(state)
            logger.info("resumed from %s at step %d", resume_from, self.step)
        else:
            logger.info("new run in %s", self.run_dir.resolve())
        # --- the run directory: only now -------------------------------------------------------------
        self._reconcile_best(resume_from is not None)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.run_dir / "config.yaml") as tmp:
                tmp.write_text(dump_config(dataclasses.replace(cfg, train=train_cfg), absolute_paths=True))
            if (self.run_dir / "eval.json").is_file():  # the stopped process's later evaluations are not this run's
                write_json_atomic(self.run_dir / "eval.json", self.eval_report())
        self.metrics = MetricsLogger(
            self.run_dir, enabled=info.is_main, report_to=cfg.run.trackers(), config=config_to_dict(cfg)
        )
        self.metrics.start_at(self.step if resume_from is not None else None)
        self._dev_cache: dict[str, tuple[int, np.ndarray]] = {}
        self._saved_step: int | None = self.step if resume_from is not None else None
        logger.info(
            "phase %s: %s; %d steps (%d per epoch)",
            self.phase,
            ", ".join(f"{t.spec.name} {t.num_rows} rows ({t.source})" for t in self.tasks),
            self.max_steps,
            self.steps_per_epoch,
        )

    # --- set-up helpers ------------------------------------------------------------------------------

    def _epochs_origin(self, resume_from: Path | None) -> dict[str, Any]:
        """Where this run counts its epochs from: ``{"step", "epoch", "rows_per_step"}``, the epoch at
        ``step`` and the rows each step took since; the epoch at a later step is that epoch plus the steps since,
        over :attr:`steps_per_epoch`. A new run counts from step 0. A resume keeps its checkpoint's origin,
        unless the rows per step changed (``train.grad_accum``, ``data.micro_batch_size``, or the world size
        under ZeRO 0, which a resume may change): counted in the new steps from the start, ``train.epochs``
        would train other than its epochs of rows (fewer, or be refused as past the end). Then the epochs done
        are counted in the old steps, and the rest in the new ones from the checkpoint's step."""
        self._epochs_note: str | None = None
        self._epoch_slack = 0.0  # one step of the checkpoint's rows per step, in epochs, where they changed
        origin = {"step": 0, "epoch": 0.0, "rows_per_step": self.rows_per_step}
        if resume_from is None:
            return origin
        state = ckpt.saved_trainer_state(resume_from)
        step = int(state["step"])
        rows = sum(state["sampler"]["positions"])  # rows drawn, all tasks and epochs, every rank
        # A checkpoint of an earlier release: its rows per step from the rows it drew (one geometry, or that
        # run's epochs were already counted in the wrong steps).
        saved = state.get("epochs_at") or {"step": 0, "epoch": 0.0, "rows_per_step": rows // step if step else 0}
        if saved["rows_per_step"] in (0, self.rows_per_step):
            return {**saved, "rows_per_step": self.rows_per_step}
        total = sum(task.num_rows for task in self.tasks)
        before = max(1, math.ceil(total / saved["rows_per_step"]))
        epoch = saved["epoch"] + (step - saved["step"]) / before
        self._epoch_slack = 1.0 / before + 1e-9
        if self.cfg.train.epochs:  # said once the resume passed its checks
            self._epochs_note = (
                f"resuming at step {step}, epoch {epoch:.4f}, with {self.rows_per_step} rows a step "
                f"({saved['rows_per_step']} before): the epochs left of train.epochs={self.cfg.train.epochs:g} go "
                f"in steps of {self.rows_per_step} rows"
            )
        return {"step": step, "epoch": epoch, "rows_per_step": self.rows_per_step}

    def epoch_at(self, step: int) -> float:
        """Epochs trained by the end of ``step``."""
        return self.epochs_at["epoch"] + (step - self.epochs_at["step"]) / self.steps_per_epoch

    def _evaluation_due(self) -> bool:
        """Every ``eval.every`` steps, else at the end of each epoch (and, in :meth:`train`, at the last step)."""
        if self.cfg.eval.every:
            return self.step % self.cfg.eval.every == 0
        return math.floor(self.epoch_at(self.step) + 1e-9) > math.floor(self.epoch_at(self.step - 1) + 1e-9)

    def _load_teachers(self) -> dict[str, Any]:
        """Phase intermediate: one frozen teacher per distinct directory, checked against the student."""
        from dist_kd.data.tokenizer import tokenizer_fingerprint
        from dist_kd.models.student import check_heads
        from dist_kd.models.teacher import Teacher

        teachers: dict[str, Any] = {}
        shapes = set()
        self.teacher_meta: dict[str, dict[str, Any]] = {}  # per task, for the checkpoints' meta.json
        student_tokens = tokenizer_fingerprint(self.tokenizer)
        for task in self.tasks:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(check_model_dir(task.teacher, f"task '{task.spec.name}' teacher"))
            # The teacher reads the student's batches: longer ones than its positions failed mid-training.
            check_max_length(config, self.cfg.data.max_length, task.teacher, "data.max_length")
            self.teacher_meta[task.spec.name] = {
                "path": str(Path(task.teacher).resolve()),
                "model_type": config.model_type,
                "num_layers": config.num_hidden_layers,
                "hidden_size": config.hidden_size,
                "num_heads": config.num_attention_heads,
            }
            if task.teacher in teachers:
                continue
            shapes.add((config.num_hidden_layers, config.hidden_size, config.num_attention_heads))
            if len(shapes) > 1:
                raise ValueError(
                    "phase intermediate: the tasks' teachers differ in shape (layers, hidden, heads) "
                    f"{sorted(shapes)}; they share the student's projections, so give teachers of one shape"
                )
            teacher_tokens = _teacher_tokenizer(task.teacher)
            if student_tokens["sha256"] != teacher_tokens["sha256"]:
                raise ValueError(
                    f"task '{task.spec.name}': teacher {task.teacher} tokenizes with {teacher_tokens['name_or_path']} "
                    f"(sha256 {teacher_tokens['sha256'][:16]}) but the student with {student_tokens['name_or_path']} "
                    f"(sha256 {student_tokens['sha256'][:16]}); phase intermediate feeds both the same token ids"
                )
            self.mapping = self.cfg.distill.mapping(config.num_hidden_layers, self.student_config.num_hidden_layers)
            if self.cfg.distill.weights.attn > 0 and self.cfg.distill.attention == "raw_scores":
                # a pretrained student.path fixes the shape: another head count is a student cut from it (where it
                # has more heads than asked) or built anew
                heads, wanted = self.student_config.num_attention_heads, config.num_attention_heads
                cut = "student.init=teacher (or random)" if heads > wanted else "student.init=random"
                reshape = f"{cut} and " if self.student_shape is None else ""
                check_heads(config.num_attention_heads, self.student_config.num_attention_heads, reshape)
            if self.cfg.distill.weights.attn > 0:
                self.cfg.distill.check_relation_heads(config.hidden_size, self.student_config.hidden_size)
            teachers[task.teacher] = Teacher(
                task.teacher,
                dtype=self.cfg.teacher.dtype,
                device=self.info.device,
                max_layer=max(self.mapping),
                **self.cfg.distill.capture_layers(self.mapping, self.cfg.distill.weights.attn),
            )
        # Per teacher directory, its weights' digest: read by rank 0 alone, not once per rank.
        self.teacher_sha256: dict[str, str] = distributed.on_main(
            lambda: {path: weights_sha256(path) for path in teachers}
        )
        return teachers

    def _build_model(self, student_dir: Path) -> torch.nn.Module:
        from dist_kd.models.dropout import install_fast_dropout
        from dist_kd.models.heads import MultiTaskStudent
        from dist_kd.models.student import DistillStudent, Projections, build_projections, build_student

        dropout = self.cfg.student.encoder_dropout(self.source_config)
        source = None  # the model a student of a new shape is cut from (init: teacher)
        if self.student_shape is None:
            encoder = build_student(StudentConfig(path=str(student_dir), dropout=dropout), self.student_config)
        else:
            mapping = None
            if self.student_shape.init == "teacher":
                from transformers import AutoModel

                from dist_kd.layer_map import layer_map
                from dist_kd.models.teacher import load_pretrained

                source, _ = load_pretrained(AutoModel, student_dir, "student.path")
                mapping = layer_map(self.source_config.num_hidden_layers, self.student_shape.num_layers)
            encoder = build_student(self.student_shape, self.source_config, source, mapping, "student.path")
        if self.phase == "intermediate":
            teacher = next(iter(self.teachers.values()))
            projections = build_projections(
                encoder.config.hidden_size,
                teacher.hidden_size,
                encoder.config.num_hidden_layers,
                always=self.cfg.distill.projection == "always",
                select=self.cfg.distill.projection == "select",
            )
            if source is not None and isinstance(projections, Projections):
                _start_as_cut(projections, encoder.config, self.source_config, teacher.hidden_size)
            return DistillStudent(encoder, projections, self.cfg.distill.attention)
        tasks = {t.spec.name: (t.spec.num_labels, t.spec.labels if t.spec.type == "classification" else None)
                 for t in self.tasks}  # fmt: skip
        model = MultiTaskStudent(encoder, tasks, dropout=self.cfg.student.head_dropout)
        install_fast_dropout(model)  # the heads' dropout (the encoder's has it from build_student)
        return model

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's trainer state (model and optimizer live in the DeepSpeed checkpoint)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "sampler": self.sampler.state_dict(),
            "history": self.history,
            "best": self.best,
            "window": self._window.state_dict(),
            "epochs_at": self.epochs_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.sampler.load_state_dict(state["sampler"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        if "window" in state:
            self._window.load_state_dict(state["window"])

    def save(self) -> Path:
        """A complete checkpoint of the current step (collective); never of diverged weights."""
        self.guard.before("its checkpoint", self.step)
        self._saved_step = self.step
        return ckpt.save_checkpoint(
            self.engine, self.run_dir / "checkpoints", self.step, self.state_dict(), self.meta, self.cfg.run.keep_last
        )

    # --- training --------------------------------------------------------------------------------------

    def _batch(self, task: TaskData, rows: np.ndarray) -> dict[str, torch.Tensor]:
        batch = pad_rows(task.rows, rows, self.pad_id)
        if not self.use_token_types and self.phase != "intermediate":  # a teacher decides for itself
            batch.pop("token_type_ids")
        return {name: tensor.to(self.info.device, non_blocking=True) for name, tensor in batch.items()}

    def _layer_terms(self, task: TaskData, batch: dict, student: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Phase intermediate's layer losses of ``student`` (the engine, or its module in evaluation) against the
        task's teacher. The segment ids go to the student where it has a second segment embedding, and to the
        teacher, which drops them where it has none (Teacher.takes_segments)."""
        teacher = self.teachers[task.teacher]
        mask, types = batch["attention_mask"], batch.get("token_type_ids")
        teacher_features = teacher.features(batch["input_ids"], mask, types)
        student_features = student(batch["input_ids"], mask, types if self.use_token_types else None)
        with autocast_of(self.engine):  # the projections, as the engine's forward (a bf16 student)
            return tinybert_objective(
                student_features, teacher_features, self.mapping, mask, self.cfg.distill.weights,
                self.engine.module.projections, normalize=self.cfg.distill.normalize,
                attention=self.cfg.distill.attention, relation_heads=self.cfg.distill.relation_heads,
            )  # fmt: skip

    def _rank_rows(self, rows: np.ndarray) -> np.ndarray:
        """This rank's slice of a micro-batch's rows (every rank draws the same micro-batch)."""
        size = self.cfg.data.micro_batch_size
        return rows[self.info.rank * size : (self.info.rank + 1) * size]

    def train_step(self, task_index: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Forward, losses and backward of this rank's slice of one micro-batch (the engine steps at the
        accumulation boundary). Returns the loss terms (detached)."""
        begin_compiled_step(self.cfg.train)
        task = self.tasks[task_index]
        mine = self._rank_rows(rows)
        batch = self._batch(task, mine)
        if self.phase == "intermediate":
            terms = self._layer_terms(task, batch, self.engine)
        else:
            # The hard term averages over the whole micro-batch's labelled rows, not each rank's own.
            hard_rows = float(task.has_label[rows].sum()) / self.info.world_size
            terms = self._prediction_terms(task, mine, batch, hard_rows)
        self.engine.backward(terms["loss"])
        self.step_lr = self.engine.get_lr()[0]  # the rate this step applies (the scheduler moves on in step())
        self.engine.step()
        return {name: value.detach() for name, value in terms.items()}

    def _prediction_terms(
        self, task: TaskData, rows: np.ndarray, batch: dict, hard_rows: float
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg.distill
        logits = self.engine(task.spec.name, **batch)
        device = logits.device
        soft = None if task.soft is None else torch.from_numpy(task.soft[rows]).to(device)
        return prediction_loss(
            logits,
            soft,
            torch.from_numpy(task.labels[rows]).to(device),
            soft_weight=cfg.soft_weight,
            hard_weight=cfg.hard_weight if task.soft is not None else 1.0,  # a task without a teacher: hard labels
            temperature=cfg.temperature,
            task_type=task.spec.type,
            label_mask=torch.from_numpy(task.has_label[rows]).to(device),
            hard_rows=hard_rows,
        )

    def train(self) -> bool:
        """Run until the last step or a stop signal. Returns True when training finished."""
        cfg = self.cfg
        stop = StopSignal()
        bar = progress_bar(self.max_steps, self.step, f"task distillation ({self.phase})", self.info.is_main
                           and cfg.run.progress)  # fmt: skip
        self._window.restart_clock()  # set-up (and a resume's loading) is not training time
        try:
            while self.step < self.max_steps:
                for _ in range(cfg.train.grad_accum):
                    task_index, rows = self.sampler.next()
                    terms = self.train_step(task_index, rows)
                    mine = self._rank_rows(rows)
                    tokens = int(self.tasks[task_index].rows.lengths[mine].sum())
                    self._window.add(terms, tokens, len(mine), group=self.names[task_index])
                self.step += 1
                dev = None
                if self._evaluation_due() or self.step == self.max_steps:
                    with self._window.paused():  # tokens/s counts training only
                        self.guard.before("the dev evaluation", self.step)  # best/ never takes diverged weights
                        dev = self.evaluate()
                # An evaluation step always gets a line: it carries the dev figures (as the general stage's
                # carries its quality figures).
                if self.step % cfg.run.log_every == 0 or self.step == self.max_steps or dev:
                    record = self._log(dev)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                bar.update(1)
                if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < self.max_steps:
                    with self._window.paused():
                        self.save()
                if stop_agreed(stop.requested):
                    saved = self.save()
                    logger.warning("stopped at step %d with its checkpoint %s; run again with run.resume=auto to "
                                   "continue", self.step, saved)  # fmt: skip
                    return False
            last = self.history[-1]["step"] if self.history else None
            if last != self.step and any(task.dev_rows is not None for task in self.tasks):
                # A run resumed at its last step (train.max_steps set to its checkpoint's) trains nothing, so the
                # loop's evaluation at max_steps never ran: eval.json and the model cards kept an earlier step's.
                self.guard.before("the dev evaluation", self.step)
                dev = self.evaluate()
                if dev:  # the step's line (the stopped process's, where it logged it) gets the dev figures
                    self.metrics.add_to_step({"step": self.step, "dev": dev})
            if self._saved_step != self.step:  # a finished run started again has nothing new to save
                self.save()
            return True
        finally:
            bar.close()
            stop.restore()

    def _log(self, dev: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
        """One ``metrics.jsonl`` line of the window since the last; ``dev``: this step's dev figures per task."""
        window = self._window.reduce()
        values, counts, elapsed = window.values, window.batches, max(window.seconds, 1e-9)
        self.tokens_seen += window.tokens
        task_losses = {name[len("task/") :]: value for name, value in values.items() if name.startswith("task/")}
        record = {
            "step": self.step,
            "loss": values["loss"],
            **{f"loss_{name}": value for name, value in values.items() if name != "loss" and "/" not in name},
            "lr": self.step_lr,  # the last step's rate; get_lr() after it is the next step's
            "tokens_per_s": window.tokens / elapsed,
            "samples_per_s": window.rows / elapsed,
            "tokens_seen": self.tokens_seen,
            "task_loss": task_losses,
            "task_batches": {name[len("task/") :]: count for name, count in counts.items() if name.startswith("task/")},
        }
        if dev:
            record["dev"] = dev
        self.guard.after_log(record)  # a diverged student stops here, its line unwritten
        self.metrics.log(record)
        return record

    # --- evaluation and export ------------------------------------------------------------------------------

    @torch.no_grad()
    def dev_logits(self, task: TaskData) -> np.ndarray:
        """``(N, C)`` logits of the current student on ``task``'s dev set (every rank runs every batch: under
        ZeRO-3 each forward gathers partitioned weights collectively). The weights are the fp32 ones the exports
        write, not a bf16/fp16 engine's rounded copy (:func:`dist_kd.train.engine.exported_weights`),
        so eval.json, best/ and the dev predictions are those of the exported classifier."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            with exported_weights(self.engine, module) as scoring:
                return batched_logits(lambda batch: scoring(task.spec.name, **batch), task.dev_rows, self.pad_id,
                                      self.cfg.eval.batch_size, self.info.device, self.use_token_types)  # fmt: skip
        finally:
            module.train(was_training)

    @torch.no_grad()
    def dev_losses(self, task: TaskData) -> dict[str, float]:
        """Phase intermediate: the layer losses against the task's teacher on its dev set (mean per row).

        The dev set goes in batches of ``data.micro_batch_size`` rows, as the training loss does: each term is a
        mean over a batch's real tokens (pairs), divided by the teacher's variance there under ``normalize:
        variance``, so the figure depends on the batch size; that of training makes it compare with the training
        loss, and keeps it the same for any ``eval.batch_size``."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        sums: dict[str, float] = {}
        try:
            for rows in length_batches(task.dev_rows.lengths, self.cfg.data.micro_batch_size):
                batch = {
                    name: tensor.to(self.info.device)
                    for name, tensor in pad_rows(task.dev_rows, rows, self.pad_id).items()
                }
                terms = self._layer_terms(task, batch, module)
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + value.item() * len(rows)
        finally:
            module.train(was_training)
        count = len(task.dev_rows)
        return {("loss" if name == "loss" else f"loss_{name}"): value / count for name, value in sums.items()}

    def headline(self, name: str) -> str:
        """The figure task ``name`` is judged by: its metric, or the dev loss in phase intermediate."""
        if self.phase == "intermediate":
            return "loss"
        return next(task.spec.metric for task in self.tasks if task.spec.name == name)

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Score every task's dev set, record it in ``eval.json`` and export a task's new best (collective)."""
        results: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            if task.dev_rows is None:
                continue
            if self.phase == "intermediate":
                results[task.spec.name] = self.dev_losses(task)
                continue
            logits = self.dev_logits(task)
            self._dev_cache[task.spec.name] = (self.step, logits)
            labels = np.asarray(task.dev_table.column("label").to_pylist())
            metrics = compute_metrics(task.spec.type, task.spec.metric, logits, labels, task.spec.num_labels)
            if task.spec.type == "classification":
                metrics["predicted_classes"] = predicted_classes(logits)
            # Rank 0's numbers decide, so that every rank takes the same export branch (it is collective).
            results[task.spec.name] = metrics = distributed.broadcast_object(metrics)
            best = self.best.get(task.spec.name)
            if best is None or metrics[task.spec.metric] > best[task.spec.metric]:
                self.best[task.spec.name] = {"step": self.step, **metrics}
                self._export_task(task, self.run_dir / "best" / task.spec.name, logits, metrics, best=True)
        if not results:
            return results
        self.history.append({"step": self.step, "epoch": round(self.epoch_at(self.step), 4), "tasks": results})
        if self.info.is_main:
            self._warn_single_class()
            write_json_atomic(self.run_dir / "eval.json", self.eval_report())  # the trackers get them with the line
            summary = ", ".join(
                f"{name} {self.headline(name)}={values[self.headline(name)]:.4f}" for name, values in results.items()
            )
            logger.info("step %d dev: %s", self.step, summary)
        return results

    def _warn_single_class(self) -> None:
        """A task whose dev predictions were all one class at the last two evaluations is not being learnt."""
        if len(self.history) < 2:
            return
        previous, latest = self.history[-2], self.history[-1]
        for name, metrics in latest["tasks"].items():
            before = previous["tasks"].get(name, {})
            if metrics.get("predicted_classes") == 1 and before.get("predicted_classes") == 1:
                logger.warning(
                    "task '%s': every dev prediction fell into one class at steps %d and %d; the head is not "
                    "learning the task (try a lower train.lr, or check the student's init and the targets)",
                    name, previous["step"], latest["step"],
                )  # fmt: skip

    def eval_report(self) -> dict[str, Any]:
        """What ``eval.json`` holds: the latest and best dev figures per task, and every evaluation."""
        latest = self.history[-1] if self.history else {"step": None, "tasks": {}}
        tasks = {
            task.spec.name: {
                "metric": self.headline(task.spec.name),
                "num_dev": len(task.dev_rows),
                "final": latest["tasks"].get(task.spec.name),
                "best": self.best.get(task.spec.name),
            }
            for task in self.tasks
            if task.dev_rows is not None
        }
        return {"phase": self.phase, "step": latest["step"], "tasks": tasks, "history": self.history}

    def _reconcile_best(self, resumed: bool) -> None:
        """Make ``best/<task>/`` and the best the run starts with agree (collective; rank 0 decides).

        An evaluation exports a new best at once, but the checkpoint that records it comes later: a run killed
        in between (or resumed from an older checkpoint, its newest one damaged) left ``best/<task>/`` holding a
        model that ``eval.json`` and the summary did not know, and kept it whatever the resumed run scored.
        Resumed: the export that is there (usually one made after the checkpoint) is a model this run trained
        and scored, so it is the task's best, as its ``best.json`` says (only a better evaluation replaces it).
        From scratch: the directory is an earlier run's and goes, as metrics.jsonl's lines do. A
        ``best/<task>/`` of an earlier release (no best.json) is left as it is.
        """
        decided: dict[str, Any] = {"adopt": {}, "remove": []}
        if self.info.is_main:
            for task in self.tasks:
                name = task.spec.name
                try:
                    record = json.loads((self.run_dir / "best" / name / BEST_RECORD).read_text())
                    step, metrics = int(record["step"]), dict(record["metrics"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                kept = self.best.get(name)
                if kept is not None and kept.get("step") == step:
                    continue
                if resumed:
                    decided["adopt"][name] = {"step": step, **metrics}
                else:
                    decided["remove"].append(name)
        decided = distributed.broadcast_object(decided)
        for name, best in decided["adopt"].items():
            logger.warning(
                "task '%s': best/%s holds the classifier of step %d, not the checkpoint's best (this run resumes from "
                "step %d); it stays the task's best until an evaluation beats its %s",
                name, name, best["step"], self.step, self.headline(name),
            )  # fmt: skip
            self.best[name] = best
        if self.info.is_main:
            for name in decided["remove"]:
                logger.warning("task '%s': removing best/%s, an earlier run's export", name, name)
                shutil.rmtree(self.run_dir / "best" / name, ignore_errors=True)
            if not resumed:
                self._remove_other_tasks_outputs()

    def _remove_other_tasks_outputs(self) -> None:
        """From scratch: remove the outputs an earlier run in this directory left for tasks this run does not
        have (its best/, tasks/ and dev predictions; only what dist_kd writes there), which stayed beside this
        run's while eval.json named this run's tasks alone."""
        ours = {task.spec.name for task in self.tasks}
        scored = {task.spec.name for task in self.tasks if task.dev_rows is not None}
        found = [path for path in (self.run_dir / "best").glob("*") if (path / BEST_RECORD).is_file()]
        found += [path for path in (self.run_dir / "tasks").glob("*") if (path / TASK_RECORD).is_file()]
        earlier = {path.name for path in found}  # the tasks an earlier dist_kd run exported
        # Their dev predictions too (a file of another name is the user's), and those of a task this run trains
        # without a dev set: it writes none, and the earlier model's would sit beside its tasks/<name>/.
        found += [
            path
            for name in sorted(earlier - scored)
            if (path := self.run_dir / "predictions" / f"{name}.dev.jsonl").is_file()
        ]
        for path in sorted(found):
            name = path.name[: -len(".dev.jsonl")] if path.suffix == ".jsonl" else path.name
            if name in ours and path.suffix != ".jsonl":
                continue  # this run's own task: its best/ was settled above, its tasks/ is replaced at the end
            logger.warning("removing %s: an earlier run's output for task '%s', which this run %s", path, name,
                           "trains without a dev set" if name in ours else "does not train")  # fmt: skip
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _export_task(
        self,
        task: TaskData,
        target: Path,
        dev_logits: np.ndarray | None,
        metrics: dict | None = None,
        best: bool = False,
    ) -> None:
        """``target``: the task's HF classifier + tokenizer (+ dev predictions), atomically (collective). A
        ``best`` export also holds ``best.json`` (its step and dev metrics; see :meth:`_reconcile_best`)."""
        module = self.engine.module
        with full_precision_weights(self.engine, module), distributed.shared_failure():
            if self.info.is_main:
                with atomic_dir(target) as tmp:
                    module.export_task(task.spec.name, tmp, self.tokenizer)
                    write_json_atomic(tmp / TASK_RECORD, task_record(task.spec, task.pairs, self.cfg.data.max_length))
                    write_model_card(tmp, self.model_card(task, metrics, target))
                    if dev_logits is not None:
                        write_predictions(tmp / "dev_predictions.jsonl", task.spec, task.dev_table, dev_logits)
                    if best:
                        write_json_atomic(tmp / BEST_RECORD, {"step": self.step, "metrics": metrics})
        distributed.barrier()

    def export(self) -> dict[str, Path]:
        """The final student (collective): ``student/`` (the shared encoder with tokenizer) and, in phase
        prediction, ``tasks/<name>/`` per task (an HF classifier) with ``predictions/<name>.dev.jsonl``."""
        module = self.engine.module
        encoder = module.student if self.phase == "intermediate" else module.encoder
        exported = {"student": self.run_dir / "student"}
        with full_precision_weights(self.engine, encoder), distributed.shared_failure():
            if self.info.is_main:
                with atomic_dir(exported["student"]) as tmp:
                    encoder.save_pretrained(tmp)
                    save_tokenizer(self.tokenizer, tmp, encoder.config)
                    write_model_card(tmp, self.model_card(None))
                    if self.cfg.student.init != "random":  # the pooling the starting encoder was made for
                        width = encoder.config.hidden_size
                        carry_sentence_modules(self.cfg.student.path, tmp, width, self.source_config.hidden_size)
        distributed.barrier()
        if self.phase == "intermediate":
            return exported
        for task in self.tasks:
            target = self.run_dir / "tasks" / task.spec.name
            self._export_task(task, target, None)
            exported[task.spec.name] = target
            if task.dev_rows is None:
                continue
            step, logits = self._dev_cache.get(task.spec.name, (None, None))
            if step != self.step:
                logits = self.dev_logits(task)
            with distributed.shared_failure():
                if self.info.is_main:
                    predictions = self.run_dir / "predictions" / f"{task.spec.name}.dev.jsonl"
                    write_predictions(predictions, task.spec, task.dev_table, logits)
        return exported

    def model_card(self, task: TaskData | None, metrics: dict | None = None, directory: Path | None = None) -> str:
        """README.md of an export: ``task``'s classifier (``metrics``: its dev figures, default the latest
        evaluation's; ``directory``: where it is exported, default ``tasks/<name>``), or (None) the shared
        encoder."""
        cfg = self.cfg
        recipe = {
            "intermediate": "TinyBERT task distillation, intermediate phase: embedding, hidden-state and attention "
            "losses against each task's fine-tuned teacher",
            "prediction": "multi-task distillation (MT-DNN-KD): a shared encoder with one head per task, each task "
            "learning its ensemble's soft targets where a store is given, its hard labels otherwise",
        }[self.phase]
        facts = {
            "method": recipe,
            "student start": f"{cfg.student.path} (init {cfg.student.init})",
            "tasks": ", ".join(f"{t.spec.name} ({t.num_rows} rows from {t.source})" for t in self.tasks),
            "steps": f"{self.step} x {self.global_batch} rows, lr {cfg.train.lr}",
        }
        if self.phase == "prediction":
            # a task without a soft-target store trains on its hard labels alone (weight 1), whatever the weights
            hard_only = [t.spec.name for t in self.tasks if t.soft is None]
            soft = [t.spec.name for t in self.tasks if t.soft is not None]
            facts["soft / hard weight"] = "; ".join(
                ([f"{cfg.distill.soft_weight} / {cfg.distill.hard_weight}, temperature {cfg.distill.temperature} "
                  f"({', '.join(soft)})"] if soft else [])
                + ([f"hard labels alone ({', '.join(hard_only)}: no soft targets)"] if hard_only else [])
            )  # fmt: skip
        latest = dict(self.history[-1]["tasks"]) if self.history else {}
        if task is not None and metrics is not None:
            latest[task.spec.name] = metrics
        names = [task.spec.name] if task is not None else self.names
        dev = {
            f"{name} dev {metric} (step {self.step})": value
            for name in names
            for metric, value in (latest.get(name) or {}).items()
            if isinstance(value, float)
        }
        if task is None:
            title, load, tag = (
                "dist_kd task-distilled shared encoder",
                encoder_load_snippet(self.run_dir / "student"),
                None,
            )
            summary = "The encoder every task head shares; the heads are exported under tasks/<name>/."
        else:
            title = f"dist_kd student for {task.spec.name}"
            directory = directory or self.run_dir / "tasks" / task.spec.name  # best/<name> loads itself
            load, tag = classifier_load_snippet(directory, task.pairs), "text-classification"
            summary = (
                f"A classifier for {task.spec.name} (labels: {', '.join(task.spec.labels)})."
                if task.spec.type == "classification"
                else f"A regression head for {task.spec.name}: one output, the predicted score."
            )
        return model_card(title, summary, facts, dev, load, tag)


def _teacher_tokenizer(path: str) -> dict[str, Any]:
    from dist_kd.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    try:
        return tokenizer_fingerprint(load_tokenizer(path))
    except (OSError, TypeError) as err:
        raise ValueError(f"teacher {path}: no usable tokenizer in the directory ({err})") from None


def task_summary_lines(trainer: TaskTrainer, exported: dict[str, Path]) -> list[str]:
    """Where the outputs are and each task's dev figure (final and best)."""
    lines = [f"shared encoder saved to {exported['student']}"]
    report = trainer.eval_report()
    for name, entry in report["tasks"].items():
        final, best = entry["final"] or {}, entry["best"]
        line = f"  {name:<16} dev {entry['metric']} {final.get(entry['metric'], float('nan')):.4f} (final)"
        if best is not None:
            line += f", {best[entry['metric']]:.4f} (best, step {best['step']}, {trainer.run_dir / 'best' / name})"
        lines.append(line)
    for name, path in exported.items():
        if name != "student":
            lines.append(f"  {name:<16} classifier saved to {path} (AutoModelForSequenceClassification)")
    return lines


def finish_task(trainer: TaskTrainer, cfg, info) -> list[str]:
    """The end of a task run (collective): export the shared encoder and the per-task classifiers, write
    report.md.

    Returns:
        The summary lines: where the outputs are and the dev figures (main rank; an empty list elsewhere).
    """
    exported = trainer.export()
    if not info.is_main:
        return []
    from dist_kd.report import report_at_end

    return [*task_summary_lines(trainer, exported), report_at_end(trainer.run_dir)]


def _start_as_cut(projections, student_config, source_config, teacher_width: int) -> None:
    """W_e and W_h of a student cut from ``student.path`` (``init: teacher``) start as the transpose of the
    units it kept, as general distillation starts them, where the teacher's states are as wide as the source's
    (the fine-tuned teacher itself, or a model of its width): random maps sent random gradients into a student
    that sits close to its source (a step-0 loss 3.2x the cut's). Of another width there is no correspondence."""
    from dist_kd.models.student import unit_selection

    if source_config.hidden_size == teacher_width:
        projections.init_as_selection(unit_selection(student_config, source_config).residual)
