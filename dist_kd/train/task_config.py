"""Run config of task distillation (``launch/task.py``): tasks, phase, losses, batching, evaluation.

The section names and the keys of the task-distillation config (docs/contracts.md) are part of the contract;
everything else here is an addition with a default. ``train``, ``deepspeed`` and ``run`` are the general
stage's sections (``train.epochs`` is the task stage's own addition).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from dist_kd.config import doc
from dist_kd.data.tasks import TaskSpec, resolve_task_spec
from dist_kd.models.fields import clear_task_labels, dropout_rate, ffn_width, set_dropout, set_fp32
from dist_kd.models.student import StudentConfig, student_config_from_teacher
from dist_kd.models.teacher import TeacherConfig
from dist_kd.objective import DistillConfig
from dist_kd.train.common import RunConfig, other_kind
from dist_kd.train.engine import DeepSpeedSection, TrainConfig

logger = logging.getLogger(__name__)

PHASES = ("prediction", "intermediate")
STUDENT_INITS = ("pretrained", "random", "teacher")
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_heads", "intermediate_size")


@dataclass
class TaskEntry:
    """One task of the multi-task student (a GLUE name picks up the registry's columns, labels and metric)."""

    name: str = doc("task name (also the head's name, and the name the soft-target store was made for)", "")
    type: str | None = doc("classification | regression (default: the GLUE registry's, else classification)", None)
    labels: list[str] | None = doc("label names in index order (classification)", None)
    metric: str | None = doc("accuracy | f1 | mcc | pearson | spearman (default: accuracy / pearson)", None)
    train: str | None = doc(
        "training data (file, datasets dir or augment output), trained on its hard labels; not read with soft_targets",
        None,
        path=True,
    )
    dev: str | None = doc("dev data, scored with the task metric after each epoch", None, path=True)
    soft_targets: str | None = doc(
        "soft-target store (launch/precompute.py): its rows are the training rows", None, path=True
    )
    teacher: str | None = doc(
        "fine-tuned teacher of this task for phase intermediate (default: teacher.path)", None, path=True
    )
    text_a: str | None = doc("column of the first text (default text_a, or the GLUE registry's)", None)
    text_b: str | None = doc("column of the second text; null for single texts", "text_b")
    label: str | None = doc("label column", "label")
    id_column: str | None = doc(
        "column with stable example ids (default example_id where the data has it, else <task>-<row>)", None
    )
    weight: float | None = doc("sampling weight (default: proportional to the task's training rows)", None)

    def __post_init__(self):
        if not self.name:
            raise ValueError("tasks[].name must be set")
        # The name keys the task's head (a module name: no '.') and names its outputs best/<name>/,
        # tasks/<name>/ and predictions/<name>.dev.jsonl (one path component).
        bad = [char for char in "./\\" if char in self.name]
        if bad:
            raise ValueError(
                f"task '{self.name}': a task name may not contain {' or '.join(repr(c) for c in bad)} (it names the "
                "task's head and its directories best/<name>/ and tasks/<name>/); use '-' or '_' instead"
            )
        import torch

        if hasattr(torch.nn.ModuleDict(), self.name):  # the heads' ModuleDict refused it mid-set-up (a KeyError)
            raise ValueError(
                f"task '{self.name}': the name is taken by torch's ModuleDict, which keys the task heads (one of its "
                f"attributes: type, eval, train, training, half, keys, ...); rename the task (e.g. '{self.name}_task')"
            )
        if not self.train and not self.soft_targets:
            raise ValueError(f"task '{self.name}': give train (hard labels) or soft_targets (a precompute store)")
        if self.train and self.soft_targets:  # a warning: configs (and run directories) of earlier releases have both
            logger.warning(
                "task '%s': train %s is not read: the soft-target store's rows (the texts it was precomputed on) are "
                "the training rows; give train or soft_targets, not both",
                self.name, self.train,
            )  # fmt: skip
        if self.weight is not None and self.weight <= 0:
            raise ValueError(f"task '{self.name}': weight must be > 0, got {self.weight}")
        self.spec()  # columns, type, labels and metric are checked now, before any file is read

    def spec(self) -> TaskSpec:
        """The task's :class:`TaskSpec` (columns, labels, metric)."""
        return resolve_task_spec(
            self.name,
            type=self.type,
            labels=self.labels,
            text_a=self.text_a,
            text_b=self.text_b,
            label=self.label,
            metric=self.metric,
            id_column=self.id_column,
        )


@dataclass
class TaskStudentConfig:
    """The student encoder."""

    path: str = doc("HF directory of the student encoder with tokenizer (the general stage's student/)", "", path=True)
    dropout: float | None = doc(
        "hidden and attention dropout (ModernBERT: also embedding and MLP dropout; null keeps the directory's)", None
    )
    head_dropout: float | None = doc(
        "dropout in the task heads (null: the architecture's default; MPNet's head has none of its own: it reads "
        "student.dropout)",
        None,
    )
    init: str = doc(
        "pretrained (path's weights) | random (path's architecture and tokenizer, new random weights: the "
        "baseline without general distillation) | teacher (cut from path's weights: layers g(m) of a uniform "
        "map and a consistent subset of units, as student.init=teacher in general distillation)",
        "pretrained",
    )
    num_layers: int | None = doc("init random | teacher: transformer layers (null: path's)", None)
    hidden_size: int | None = doc("init random | teacher: hidden width (null: path's)", None)
    num_heads: int | None = doc("init random | teacher: attention heads (null: path's)", None)
    intermediate_size: int | None = doc("init random | teacher: feed-forward width (null: path's)", None)

    def __post_init__(self):
        for name in ("dropout", "head_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"student.{name} must be in [0, 1), got {value}")
        if self.init not in STUDENT_INITS:
            raise ValueError(f"student.init must be one of {list(STUDENT_INITS)}, got {self.init!r}")
        for name in SHAPE_FIELDS:
            value = getattr(self, name)
            if value is not None and self.init == "pretrained":
                raise ValueError(
                    f"student.{name} changes the shape, which the pretrained weights of student.path fix; "
                    "set student.init=random or student.init=teacher to build a new student of that shape"
                )
            if value is not None and value < 1:
                raise ValueError(f"student.{name} must be >= 1, got {value}")

    def shape(self, source_config) -> dict[str, int]:
        """The student's shape: the given fields, the others from ``source_config`` (path's config)."""
        source = {
            "num_layers": source_config.num_hidden_layers,
            "hidden_size": source_config.hidden_size,
            "num_heads": source_config.num_attention_heads,
            "intermediate_size": ffn_width(source_config),
        }
        return {name: source[name] if getattr(self, name) is None else getattr(self, name) for name in SHAPE_FIELDS}

    def encoder_dropout(self, source_config) -> float:
        """The encoder's dropout: ``dropout``, or (null) the rate ``source_config`` (path's config) records."""
        return dropout_rate(source_config) if self.dropout is None else self.dropout

    def new_shape(self, source_config) -> StudentConfig | None:
        """``init`` random | teacher: the new student (shape, dropout, init); None for pretrained.

        Raises:
            ValueError: ``init: teacher`` with more layers than ``source_config`` has to copy from.
        """
        if self.init == "pretrained":
            return None
        shape = StudentConfig(
            **self.shape(source_config), dropout=self.encoder_dropout(source_config), init=self.init
        )  # fmt: skip
        if self.init == "teacher" and shape.num_layers > source_config.num_hidden_layers:
            raise ValueError(
                f"student.init=teacher: student.num_layers {shape.num_layers} exceeds the "
                f"{source_config.num_hidden_layers} layers of student.path"
            )
        return shape

    def encoder_config(self, source_config):
        """The HF config of the encoder the run trains and exports: path's own (pretrained) or a new shape
        built from it (random | teacher, layers taken by the uniform map), with the run's dropout, in fp32.
        ``dist-kd export`` rebuilds a task run's encoder from it, so a checkpoint exports as ``student/`` does."""
        shape = self.new_shape(source_config)
        if shape is not None:
            return student_config_from_teacher(source_config, shape)
        config = copy.deepcopy(source_config)
        set_dropout(config, self.encoder_dropout(source_config))
        set_fp32(config)
        clear_task_labels(config)
        return config


@dataclass
class TaskDistillConfig(DistillConfig):
    """The phase and its losses (``layer_map``, ``weights``, ``projection`` apply to phase intermediate)."""

    phase: str = doc("prediction (heads, soft/hard targets) | intermediate (layer losses, live teacher)", "prediction")
    soft_weight: float = doc("weight of the soft cross-entropy against the store's probabilities", 1.0)
    hard_weight: float = doc("weight of the hard-label loss on rows with a label (tasks with soft targets)", 0.0)

    def __post_init__(self):
        super().__post_init__()
        if self.phase not in PHASES:
            raise ValueError(f"distill.phase must be one of {list(PHASES)}, got {self.phase!r}")
        if self.soft_weight < 0 or self.hard_weight < 0:
            raise ValueError("distill.soft_weight and distill.hard_weight must be >= 0")
        if self.weights.sentence > 0:
            raise ValueError(
                "distill.weights.sentence is a term of general distillation (launch/general.py); a task run takes "
                "the sentence embeddings its student starts with: set it to 0"
            )
        if self.phase == "intermediate" and self.weights.pred > 0:
            raise ValueError(
                "distill.weights.pred must be 0 in phase intermediate (logits come from the store in phase prediction)"
            )
        if self.phase == "intermediate":
            self.weights.check_layer_terms(sentence=False)  # a term of general distillation only

    def other_phase_note(self) -> str | None:
        """The distill keys set away from their defaults that this phase does not read, said in one line (the
        trainer logs it; accepted, since one file may serve both phases, but they change nothing); None if none."""
        unread = _OTHER_PHASE_KEYS[self.phase]
        given = [f"distill.{field.name}" for field in dataclasses.fields(self) if field.name in unread
                 and getattr(self, field.name) != _default_of(field)]  # fmt: skip
        if not given:
            return None
        other = "intermediate" if self.phase == "prediction" else "prediction"
        return (
            f"{', '.join(given)}: read in phase {other} only; this run (phase {self.phase}) does not use "
            f"{'them' if len(given) > 1 else 'it'}"
        )


# The distill keys a phase does not read: phase prediction learns its heads from the store's probabilities and the
# labels; phase intermediate the layers, against a live teacher.
_OTHER_PHASE_KEYS = {
    "prediction": ("layer_map", "weights", "projection", "normalize", "attention", "relation_heads"),
    "intermediate": ("temperature", "soft_weight", "hard_weight"),
}


def _default_of(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


@dataclass
class TaskDataConfig:
    """Batching of task rows."""

    micro_batch_size: int = doc("rows per rank per micro-batch", 32)
    max_length: int = doc("truncate each row to this many pieces", 128)
    group_by_length: bool = doc("batch rows of similar length together (less padding; still random batches)", True)

    def __post_init__(self):
        if self.micro_batch_size < 1 or self.max_length < 2:
            raise ValueError("data.micro_batch_size must be >= 1 and data.max_length >= 2")


@dataclass
class EvalConfig:
    """Dev-set evaluation."""

    every: int | None = doc("optimizer steps between dev evaluations (null: after each epoch)", None)
    batch_size: int = doc(
        "rows per dev forward pass (phase intermediate's dev loss: data.micro_batch_size, as its training loss)", 128
    )

    def __post_init__(self):
        if self.every is not None and self.every < 1:
            raise ValueError(f"eval.every must be >= 1 or null, got {self.every}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class TaskTrainConfig(TrainConfig):
    """Optimisation settings; ``epochs`` (when set) decides the number of steps instead of ``max_steps``."""

    epochs: float | None = doc(
        "epochs to train (one epoch = as many rows as all training sets); overrides train.max_steps",
        None,
    )

    def __post_init__(self):
        super().__post_init__()
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0 or null, got {self.epochs}")


@dataclass
class TaskRunConfig(RunConfig):
    """The run directory, logging and checkpoints."""

    output_dir: str = doc(
        "run directory (config.yaml, metrics.jsonl, eval.json, checkpoints/, student/)", "runs/task", path=True
    )


@dataclass
class TaskConfig:
    """Task distillation: ``deepspeed launch/task.py --config FILE [a.b=c ...]``."""

    student: TaskStudentConfig = doc("the student encoder", default_factory=TaskStudentConfig)
    tasks: list[TaskEntry] = doc("the tasks (one head each)", default_factory=list)
    teacher: TeacherConfig = doc("phase intermediate: the default fine-tuned teacher", default_factory=TeacherConfig)
    distill: TaskDistillConfig = doc("phase and losses", default_factory=TaskDistillConfig)
    data: TaskDataConfig = doc("batching", default_factory=TaskDataConfig)
    eval: EvalConfig = doc("dev evaluation", default_factory=EvalConfig)
    train: TaskTrainConfig = doc("optimisation", default_factory=TaskTrainConfig)
    deepspeed: DeepSpeedSection = doc("DeepSpeed JSON", default_factory=DeepSpeedSection)
    run: TaskRunConfig = doc("run directory, logging, checkpoints", default_factory=TaskRunConfig)

    @staticmethod
    def other_kind(data: dict[str, Any]) -> str | None:
        """Why a loaded YAML is another command's config, or None (see :func:`dist_kd.config.load_config`)."""
        return other_kind(data, "task")

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("tasks: list at least one task ({name: ..., train: ... | soft_targets: ...})")
        # GLUE names are compared as resolved ('SST-2' is sst2): two entries of one task would share its head.
        names = [task.spec().name for task in self.tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            given = [task.name for task in self.tasks if task.spec().name in duplicates]
            raise ValueError(f"tasks: the names {duplicates} appear more than once (as {given})")
        stored = [task.name for task in self.tasks if task.soft_targets]
        both_zero = self.distill.soft_weight == 0 and self.distill.hard_weight == 0
        if self.distill.phase == "prediction" and both_zero and stored:  # hard-label tasks train at weight 1 anyway
            raise ValueError(
                f"distill.soft_weight and distill.hard_weight are both 0: the tasks with soft targets ({stored}) "
                "have nothing to learn from"
            )
        weighted = [task.name for task in self.tasks if task.weight is not None]
        if weighted and len(weighted) != len(self.tasks):
            raise ValueError(f"tasks: give a weight to every task or to none (only {weighted} have one)")
