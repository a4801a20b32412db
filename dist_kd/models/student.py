"""Students: construction from the teacher's config, initialisation, and projections to the teacher width.

A student is an HF encoder of the teacher's architecture with fewer/narrower layers (built from the
teacher's config with overrides) or any encoder from an HF directory. ``init: teacher`` copies the
embeddings and the mapped teacher layers g(1..M); it needs equal widths, since a 768-wide layer has no
meaningful copy in 312 dimensions.

The projections W_e (embeddings) and W_h (one per student layer, or one shared) map student states to
the teacher width for the hidden-state losses. They train with the student inside the engine but are
never part of the exported student: ``DistillStudent.student`` is what gets saved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_kd.config import doc
from dist_kd.models.capture import (
    ATTN_IMPLEMENTATION,
    EncoderFeatures,
    FeatureCapture,
    find_layer_list,
    register_attention,
)

INITS = ("random", "teacher")


@dataclass
class StudentConfig:
    """The student model (ignored shape fields when ``path`` is set)."""

    num_layers: int = doc("number of transformer layers M", 4)
    hidden_size: int = doc("hidden width d_S", 312)
    num_heads: int = doc("attention heads (must equal the teacher's for the attention loss)", 12)
    intermediate_size: int = doc("feed-forward width", 1200)
    dropout: float = doc("hidden and attention dropout", 0.1)
    init: str = doc("random | teacher (copy embeddings and the mapped teacher layers; needs equal widths)", "random")
    path: str | None = doc("start from this HF directory instead of building from the teacher's config", None)
    shared_projection: bool = doc("one W_h shared by all layers instead of one per layer", False)

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"student.init must be one of {list(INITS)}, got {self.init!r}")
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"student.{name} must be >= 1, got {getattr(self, name)}")
        if self.path is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"student.hidden_size {self.hidden_size} is not divisible by student.num_heads {self.num_heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"student.dropout must be in [0, 1), got {self.dropout}")


def student_config_from_teacher(teacher_config, cfg: StudentConfig):
    """The teacher's HF config with the student's shape overrides."""
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = cfg.num_layers
    config.hidden_size = cfg.hidden_size
    config.num_attention_heads = cfg.num_heads
    config.intermediate_size = cfg.intermediate_size
    config.hidden_dropout_prob = cfg.dropout
    config.attention_probs_dropout_prob = cfg.dropout
    for attr in ("_name_or_path", "architectures"):
        if hasattr(config, attr):
            setattr(config, attr, None if attr == "architectures" else "")
    return config


def check_heads(teacher_heads: int, student_heads: int) -> None:
    """The attention loss compares head by head, so the counts must match."""
    if teacher_heads != student_heads:
        raise ValueError(
            f"the attention loss needs equal head counts, but the teacher has {teacher_heads} heads and the student "
            f"{student_heads}; set student.num_heads={teacher_heads} or distill.weights.attn=0"
        )


def copy_from_teacher(student: nn.Module, teacher: nn.Module, mapping: list[int]) -> None:
    """Initialise the student's embeddings and layer m from the teacher's embeddings and layer g(m).

    Raises:
        ValueError: the widths differ, so there is nothing to copy into.
    """
    s_cfg, t_cfg = student.config, teacher.config
    for name in ("hidden_size", "intermediate_size", "num_attention_heads"):
        if getattr(s_cfg, name) != getattr(t_cfg, name):
            raise ValueError(
                f"student.init=teacher copies teacher layers, so the student's {name} ({getattr(s_cfg, name)}) must "
                f"equal the teacher's ({getattr(t_cfg, name)}); use student.init=random for a narrower student"
            )
    student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    _, _, s_layers = find_layer_list(student)
    _, _, t_layers = find_layer_list(teacher)
    for m, n in enumerate(mapping, start=1):
        s_layers[m - 1].load_state_dict(t_layers[n - 1].state_dict())


def build_student(
    cfg: StudentConfig, teacher_config, teacher_model: nn.Module | None = None, mapping: list[int] | None = None
) -> nn.Module:
    """Build the student encoder (fp32, train mode, ``dist_kd`` attention).

    Args:
        cfg: the student section of the run config.
        teacher_config: the teacher's HF config (before any truncation).
        teacher_model: the teacher encoder, needed for ``init: teacher``.
        mapping: g(1..M), needed for ``init: teacher``.
    """
    from transformers import AutoConfig, AutoModel

    register_attention()
    if cfg.path:
        from dist_kd.models.teacher import check_model_dir

        path = check_model_dir(cfg.path, "student.path")
        config = AutoConfig.from_pretrained(path)
        config.hidden_dropout_prob = cfg.dropout
        config.attention_probs_dropout_prob = cfg.dropout
        model = AutoModel.from_pretrained(path, config=config, attn_implementation=ATTN_IMPLEMENTATION)
    else:
        config = student_config_from_teacher(teacher_config, cfg)
        model = AutoModel.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
        if cfg.init == "teacher":
            if teacher_model is None or mapping is None:
                raise ValueError("student.init=teacher needs the teacher model and the layer mapping")
            copy_from_teacher(model, teacher_model, mapping)
    model = model.float()
    model.train()
    return model


class Projections(nn.Module):
    """W_e and W_h: linear maps from the student width to the teacher width.

    Args:
        student_width: d_S.
        teacher_width: d_T.
        num_layers: M, the number of student layers (one W_h each unless ``shared``).
        shared: one W_h for all layers.
    """

    def __init__(self, student_width: int, teacher_width: int, num_layers: int, shared: bool = False):
        super().__init__()
        self.embedding = nn.Linear(student_width, teacher_width)
        count = 1 if shared else num_layers
        self.layers = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in range(count))
        self.shared = shared

    def layer(self, m: int) -> nn.Linear:
        """W_h for student layer m (1-based)."""
        return self.layers[0 if self.shared else m - 1]


class DistillStudent(nn.Module):
    """What the DeepSpeed engine trains: the student encoder plus its projections (None when widths match).

    ``forward`` returns the student's features for the distillation losses; only ``student`` is exported.
    """

    def __init__(self, student: nn.Module, projections: Projections | None):
        super().__init__()
        self.student = student
        self.projections = projections
        self.capture = FeatureCapture(student, list(range(1, student.config.num_hidden_layers + 1)))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None = None
    ) -> EncoderFeatures:
        return self.capture(input_ids, attention_mask, token_type_ids=token_type_ids)

    def save_student(self, directory: str | Path) -> None:
        """Save only the student encoder (no projection weights) as an HF directory."""
        self.student.save_pretrained(directory)


def build_projections(
    student_width: int, teacher_width: int, num_layers: int, shared: bool = False, always: bool = False
):
    """Projections when the widths differ (or ``always``); None when states can be compared directly."""
    if student_width == teacher_width and not always:
        return None
    return Projections(student_width, teacher_width, num_layers, shared)
