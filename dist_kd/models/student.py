"""Students: construction from the teacher's config, initialisation, and projections to the teacher width.

A student is an HF encoder of the teacher's architecture with fewer/narrower layers (built from the
teacher's config with overrides) or any encoder from an HF directory. ``init: teacher`` starts it from the
teacher: embeddings, pooler and the mapped teacher layers g(1..M), copied where widths match and cut to a
consistent subset of the teacher's units where the student is narrower (weight selection). A narrow student
trained from random init on a small budget learns to match the teacher's mean state and little else; one
cut from the teacher starts with sentence embeddings that already separate topics (docs/quality.md).

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
from dist_kd.models.adapters import FUSED_ROWS, install_adapter
from dist_kd.models.capture import (
    ATTN_IMPLEMENTATION,
    SUPPORTED_ENCODERS,
    EncoderFeatures,
    FeatureCapture,
    find_layer_list,
    register_attention,
)
from dist_kd.models.dropout import install_fast_dropout
from dist_kd.models.fields import clear_task_labels, ffn_width, set_dropout, set_ffn_width, set_fp32

INITS = ("random", "teacher")


@dataclass
class StudentConfig:
    """The student model (ignored shape fields when ``path`` is set)."""

    num_layers: int = doc("number of transformer layers M", 4)
    hidden_size: int = doc("hidden width d_S", 312)
    num_heads: int = doc("attention heads (distill.attention raw_scores needs the teacher's count; relations any)", 12)
    intermediate_size: int = doc("feed-forward width (DistilBERT's hidden_dim)", 1200)
    dropout: float = doc("hidden and attention dropout (ModernBERT: also embedding and MLP dropout)", 0.1)
    init: str = doc(
        "random | teacher (embeddings, pooler and the mapped layers g(m) from the teacher; a narrower student "
        "takes a consistent subset of the teacher's units)",
        "random",
    )
    path: str | None = doc(
        "start from this HF directory instead of building from the teacher's config", None, path=True
    )
    shared_projection: bool = doc(
        "one W_h shared by all layers instead of one per layer (only where W_h is learnt: distill.projection "
        "auto at other widths, or always)",
        False,
    )
    calibrate: bool = doc(
        "with init teacher: match each state dimension's mean and std to the teacher's on a few corpus batches "
        "(post-LN encoders; a pre-LN one, e.g. ModernBERT, starts as cut, with a warning)",
        True,
    )
    calibration_batches: int = doc("micro-batches of the corpus used by student.calibrate", 8)

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
        if self.calibration_batches < 1:
            raise ValueError(f"student.calibration_batches must be >= 1, got {self.calibration_batches}")


def student_config_from_teacher(teacher_config, cfg: StudentConfig, mapping: list[int] | None = None):
    """The teacher's HF config with the student's shape overrides (fp32, the family's own field names).

    Args:
        teacher_config: the teacher's HF config.
        cfg: the student's shape and dropout.
        mapping: g(1..M). A family with per-layer settings (ModernBERT's ``layer_types``: full or sliding-window
            attention) gives student layer m the setting of teacher layer g(m), whose weights ``init: teacher``
            copies and whose states the losses hold it to; None: the uniform map's layers.
    """
    from dist_kd.layer_map import layer_map

    config = copy.deepcopy(teacher_config)
    for attr in ("pooler_hidden_size", "embedding_size"):  # DeBERTa's: the hidden width unless set otherwise
        if getattr(config, attr, None) == teacher_config.hidden_size:
            setattr(config, attr, cfg.hidden_size)
    layer_types = getattr(teacher_config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == teacher_config.num_hidden_layers:
        # One entry per layer; a copy of the teacher's fails config validation at save_pretrained.
        if mapping is None:
            mapping = layer_map(teacher_config.num_hidden_layers, cfg.num_layers)
        config.layer_types = [layer_types[g - 1] for g in mapping]
    try:
        config.num_hidden_layers = cfg.num_layers
    except NotImplementedError:  # Funnel's depth is its blocks': not a stack of layers to pick from
        raise ValueError(
            f"a {type(config).__name__} ({config.model_type}) does not take another number of layers: "
            f"{SUPPORTED_ENCODERS}"
        ) from None
    config.hidden_size = cfg.hidden_size
    config.num_attention_heads = cfg.num_heads
    for attr in ("attention_head_size", "head_dim"):  # DeBERTa-v2's (xlarge, xxlarge) reads it before the width
        if vars(config).get(attr) is not None:  # set in config.json, not a property of the class
            setattr(config, attr, cfg.hidden_size // cfg.num_heads)
    set_ffn_width(config, cfg.intermediate_size)
    set_dropout(config, cfg.dropout)
    set_fp32(config)
    clear_task_labels(config)
    for attr in ("_name_or_path", "architectures"):
        if hasattr(config, attr):
            setattr(config, attr, None if attr == "architectures" else "")
    return config


def check_heads(teacher_heads: int, student_heads: int, reshape: str = "") -> None:
    """The attention loss compares head by head, so the counts must match. ``reshape``: the settings that give
    the student another head count where ``student.num_heads`` alone does not (a task run's pretrained
    student.path fixes its shape)."""
    if teacher_heads != student_heads:
        raise ValueError(
            f"the attention loss needs equal head counts, but the teacher has {teacher_heads} heads and the student "
            f"{student_heads}; set {reshape}student.num_heads={teacher_heads}, distill.attention=relations (any head "
            "count) or distill.weights.attn=0"
        )


def evenly_spaced(total: int, count: int) -> torch.Tensor:
    """``count`` of ``range(total)`` spread evenly, first one included: ``floor(k * total / count)``."""
    if not 1 <= count <= total:
        raise ValueError(f"cannot select {count} of {total} units")
    return torch.tensor([k * total // count for k in range(count)], dtype=torch.long)


@dataclass
class UnitSelection:
    """Which teacher units each student unit takes over (weight selection).

    Attributes:
        residual: teacher hidden dimensions kept, one per student hidden dimension (the same set in every
            matrix that reads or writes the residual stream, so the layers stay consistent).
        inner: teacher query/key/value dimensions kept (whole heads chosen evenly, then evenly within each).
        ffn: teacher feed-forward units kept.
    """

    residual: torch.Tensor
    inner: torch.Tensor
    ffn: torch.Tensor


def unit_selection(student_config, teacher_config) -> UnitSelection:
    """The consistent subsets of teacher units for a student no wider than its teacher.

    Raises:
        ValueError: a student dimension exceeds the teacher's (there is nothing to select it from).
    """
    shape = {
        "hidden_size": (student_config.hidden_size, teacher_config.hidden_size),
        "intermediate_size": (ffn_width(student_config), ffn_width(teacher_config)),
        "num_attention_heads": (student_config.num_attention_heads, teacher_config.num_attention_heads),
    }
    for name, (s_value, t_value) in shape.items():
        if s_value > t_value:
            raise ValueError(
                f"student.init=teacher takes the student's units from the teacher's, so the student's {name} "
                f"({s_value}) must not exceed the teacher's ({t_value}); use student.init=random for a wider student"
            )
    (s_heads, t_heads) = shape["num_attention_heads"]
    s_head_dim = student_config.hidden_size // s_heads
    t_head_dim = teacher_config.hidden_size // t_heads
    if s_head_dim > t_head_dim:
        raise ValueError(
            f"student.init=teacher: the student's heads are {s_head_dim} wide, wider than the teacher's "
            f"{t_head_dim}; use more student heads or student.init=random"
        )
    within = evenly_spaced(t_head_dim, s_head_dim)
    inner = torch.cat([head * t_head_dim + within for head in evenly_spaced(t_heads, s_heads).tolist()])
    return UnitSelection(
        residual=evenly_spaced(teacher_config.hidden_size, student_config.hidden_size),
        inner=inner,
        ffn=evenly_spaced(ffn_width(teacher_config), ffn_width(student_config)),
    )


def _layer_prefix(model: nn.Module) -> str:
    """State-dict prefix of the encoder's transformer layers (``encoder.layer.`` in BERT)."""
    _, _, layers = find_layer_list(model)
    name = next(name for name, module in model.named_modules() if module is layers)
    return f"{name}."


def init_from_teacher(
    student: nn.Module, teacher: nn.Module, mapping: list[int], source_name: str = "the teacher"
) -> UnitSelection:
    """Initialise the student from the teacher: embeddings, pooler and student layer m from teacher layer g(m).

    Where the student is narrower (hidden, feed-forward or head width, head count), every teacher matrix
    is cut to a consistent subset of its units (weight selection, Xu et al. 2023): the same residual
    dimensions everywhere, whole heads and evenly spaced dimensions within each head, evenly spaced
    feed-forward units; a fused projection (ModernBERT's Wqkv, its gated MLP's Wi) is cut block by block alike.
    Keeping evenly spaced dimensions of a head keeps rotary position pairs (i, i + d/2) together at their
    frequencies when the teacher's head width is a multiple of the student's. Nothing is rescaled: LayerNorm
    re-normalises the kept dimensions, and measured on all-MiniLM-L6-v2 -> 3 x 192, rescaling the cut sums
    made every layer's states less like the teacher's.
    With equal widths this is an exact copy of the mapped layers.

    Returns:
        The selection used (the projections W_e/W_h start as its transpose).

    Raises:
        ValueError: the student is wider than the teacher somewhere, its parameters do not match the
            teacher's names (another architecture), or its shape leaves out a teacher module outside the layers
            (ELECTRA's embeddings_project where the student is as wide as the embeddings).
    """
    from dist_kd.models.adapters import selection_names

    selection = unit_selection(student.config, teacher.config)
    s_heads, t_heads = student.config.num_attention_heads, teacher.config.num_attention_heads
    heads_differ = s_heads != t_heads
    # Linear layers whose output (rows) or input (columns) dimensions are attention-inner rather than residual
    # ones matter only when the student has fewer heads; otherwise the inner and residual subsets coincide.
    inner_rows, inner_columns, per_head = selection_names(teacher)
    s_prefix, t_prefix = _layer_prefix(student), _layer_prefix(teacher)
    t_state = teacher.state_dict()
    s_hidden, t_hidden = student.config.hidden_size, teacher.config.hidden_size
    s_ffn, t_ffn = ffn_width(student.config), ffn_width(teacher.config)
    new_state = {}
    for name, value in student.state_dict().items():
        t_name = name
        if name.startswith(s_prefix):
            index, rest = name[len(s_prefix) :].split(".", 1)
            t_name = f"{t_prefix}{mapping[int(index)] - 1}.{rest}"
        if t_name not in t_state:
            raise ValueError(f"student.init=teacher: the teacher has no parameter {t_name} for the student's {name}")
        source = t_state[t_name]
        for axis, (s_size, t_size) in enumerate(zip(value.shape, source.shape)):
            if s_size == t_size:
                continue
            inner = heads_differ and any(key in name for key in (inner_columns if axis else inner_rows))
            # A fused projection stacks equal blocks on its rows (query, key, value): each block is cut alike.
            blocks = next((n for key, n in FUSED_ROWS.items() if key in name), 1) if axis == 0 else 1
            if s_size % blocks or t_size % blocks:
                blocks = 1
            s_unit, t_unit = s_size // blocks, t_size // blocks
            if (s_unit, t_unit) == (s_heads, t_heads) and any(key in name for key in per_head):
                keep = evenly_spaced(t_heads, s_heads)  # the heads the inner selection keeps
            elif (s_unit, t_unit) == (s_hidden, t_hidden):
                keep = selection.inner if inner else selection.residual
            elif (s_unit, t_unit) == (s_ffn, t_ffn):
                keep = selection.ffn
            else:
                raise ValueError(
                    f"student.init=teacher: cannot select the teacher's {t_name} {tuple(source.shape)} down to "
                    f"{tuple(value.shape)} (axis {axis} is neither the hidden nor the feed-forward width)"
                )
            keep = torch.cat([block * t_unit + keep for block in range(blocks)])
            source = source.index_select(axis, keep.to(source.device))
        new_state[name] = source.to(value.dtype)
    student.load_state_dict(new_state)
    # Outside the layers the student's modules are the teacher's, except where its shape removes one: ELECTRA
    # builds no embeddings_project (DeBERTa-v2 no embeddings.embed_proj) when embedding_size equals the student's
    # hidden_size.
    dropped = sorted(key for key in t_state if not key.startswith(t_prefix) and key not in new_state)
    if dropped:
        hint = (
            f"give it a hidden_size other than {source_name}'s embedding_size ({teacher.config.embedding_size}), "
            if any("embeddings_project" in key or "embed_proj" in key for key in dropped)  # ELECTRA, DeBERTa-v2
            else ""
        )
        raise ValueError(
            f"student.init=teacher: the student's shape leaves out {source_name}'s {', '.join(dropped)}, so the cut "
            f"would compute something else there; {hint}or use student.init=random"
        )
    return selection


def _output_layer_norm(module: nn.Module) -> nn.Module | None:
    """The last LayerNorm registered in ``module`` (in post-LN encoders, the one that produces its output)."""
    norms = [child for child in module.modules() if isinstance(child, nn.LayerNorm)]
    return norms[-1] if norms else None


def _output_maps(student: nn.Module) -> list[nn.Module | None]:
    """The module whose output is each state of ``student``: the output LayerNorm of the embeddings and of each
    layer, or (ELECTRA with embeddings narrower than its layers) the linear map that projects the embeddings up."""
    _, _, layers = find_layer_list(student)
    project = getattr(student, "embeddings_project", None)
    embeddings = getattr(student, "embeddings", None)
    if not isinstance(project, nn.Linear) and not isinstance(embeddings, nn.Module):
        # EuroBERT (embed_tokens, pre-LN layers): no embeddings module whose output LayerNorm gives state 0
        raise NotPostLayerNorm(f"{type(student).__name__} has no embeddings module with an output LayerNorm")
    first = project if isinstance(project, nn.Linear) else _output_layer_norm(embeddings)
    maps = [first, *(_output_layer_norm(layer) for layer in layers)]
    conv = getattr(getattr(student, "encoder", None), "conv", None)
    if isinstance(conv, nn.Module) and len(maps) > 1:  # DeBERTa-v2 (xlarge, xxlarge): a convolution after layer 1
        maps[1] = _output_layer_norm(conv)  # whose LayerNorm gives state 1
    return maps


def _keep_output(store: dict):
    def hook(module, inputs, output):
        store["out"] = output

    return hook


class NotPostLayerNorm(ValueError):
    """The student's states are not LayerNorm outputs (a pre-LN encoder): ``student.calibrate`` cannot apply."""


def _check_post_layer_norm(student: nn.Module, norms: list[nn.Module | None], batch: dict) -> None:
    """Raise :class:`NotPostLayerNorm` unless every state of ``student`` on ``batch`` is the output of ``norms[i]``
    (a LayerNorm or linear map with a bias, whose weight and bias can take a per-dimension scale and shift)."""
    outputs: list[dict[str, torch.Tensor]] = [{} for _ in norms]
    handles = [norm.register_forward_hook(_keep_output(out)) for norm, out in zip(norms, outputs) if norm is not None]
    try:
        states = student(**batch, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    mask = batch.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones(states[0].shape[:2], dtype=torch.bool)
    for index, (norm, out) in enumerate(zip(norms, outputs, strict=True)):
        # At real tokens: DeBERTa zeroes the padding after its LayerNorms
        same = "out" in out and torch.equal(out["out"][real], states[index][real])
        if norm is None or not same or norm.bias is None:
            raise NotPostLayerNorm(
                f"state {index} of {type(student).__name__} is not the output of a LayerNorm with a gain and a "
                "bias (a pre-LN encoder such as ModernBERT has none there), so its statistics cannot be set "
                "through them"
            )


@torch.no_grad()
def calibrate_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    mapping: list[int],
    batches: list[dict[str, torch.Tensor]],
    residual: torch.Tensor | None = None,
) -> list[float]:
    """Match the mean and standard deviation of every student state dimension to the teacher's.

    A student cut from the teacher runs teacher layer g(m) on the output of student layer m-1, not on
    what that layer saw in the teacher, so its states drift in scale and gather a large component shared by
    every token; Adam, moving each weight by about the learning rate per step, needs thousands of steps to
    undo that. For the embeddings and each layer m, in order, this rescales the output LayerNorm's gain (or,
    for ELECTRA's projected embeddings, the projection's rows) and shifts its bias so that, on ``batches``,
    each dimension of the student's state has the mean and standard deviation of its teacher dimension
    (layer g(m), dimension ``residual[k]``): the same correction as re-estimating normalisation statistics
    after pruning.

    Args:
        student: the student encoder (post-LN: every layer ends in a LayerNorm).
        teacher: the teacher encoder (at least g(M) layers).
        mapping: g(1..M).
        batches: ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) batches on the models' device.
        residual: the teacher dimension of each student dimension (None: the widths are equal).

    Returns:
        The relative MSE (MSE over the teacher's variance) of each state, embeddings first, after calibration.

    Raises:
        NotPostLayerNorm: a state is not the output of a LayerNorm (a pre-LN encoder such as ModernBERT);
            checked on the first batch before any weight changes.
        ValueError: ``batches`` hold fewer than 2 real tokens.
    """
    real_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    if real_tokens < 2:  # the statistics of fewer tokens are NaN: the student's gains and biases became NaN
        raise ValueError(f"calibration needs at least 2 real tokens in its batches, got {real_tokens}")
    norms = _output_maps(student)
    was_training = student.training
    student.eval()  # the statistics of the states without dropout, as the teacher's (frozen, in eval mode)
    errors = []
    try:
        _check_post_layer_norm(student, norms, batches[0])
        teacher_states = []
        for batch in batches:
            states = teacher(**batch, output_hidden_states=True).hidden_states
            teacher_states.append([states[n].float() for n in [0, *mapping]])
        for index, norm in enumerate(norms):
            student_rows, teacher_rows = [], []
            for batch, targets in zip(batches, teacher_states, strict=True):
                real = batch["attention_mask"].bool()
                states = student(**batch, output_hidden_states=True).hidden_states[index]
                student_rows.append(states.float()[real])
                target = targets[index][real]
                teacher_rows.append(target if residual is None else target.index_select(-1, residual.to(target.device)))
            s_rows, t_rows = torch.cat(student_rows), torch.cat(teacher_rows)
            scale = t_rows.std(0) / s_rows.std(0).clamp_min(1e-6)
            # a LayerNorm's gain (D,) or a linear map's rows (D, in): output dimension d scaled by scale[d]
            norm.weight.mul_(scale.view(-1, *[1] * (norm.weight.dim() - 1)).to(norm.weight.dtype))
            norm.bias.copy_((scale * (norm.bias.float() - s_rows.mean(0)) + t_rows.mean(0)).to(norm.bias.dtype))
            corrected = (s_rows - s_rows.mean(0)) * scale + t_rows.mean(0)
            errors.append(float((corrected - t_rows).square().mean() / t_rows.var(0, unbiased=False).mean()))
    finally:
        student.train(was_training)
    return errors


def build_student(
    cfg: StudentConfig,
    teacher_config,
    teacher_model: nn.Module | None = None,
    mapping: list[int] | None = None,
    source_name: str = "the teacher",
) -> nn.Module:
    """Build the student encoder (fp32, train mode, ``dist_kd`` attention).

    Args:
        cfg: the student section of the run config.
        teacher_config: the teacher's HF config (before any truncation).
        teacher_model: the teacher encoder, needed for ``init: teacher``.
        mapping: g(1..M), needed for ``init: teacher`` (and read for per-layer settings such as ModernBERT's
            ``layer_types``; None: the uniform map's).
        source_name: what ``teacher_model`` is, in messages (a task run cuts its student from ``student.path``).
    """
    from transformers import AutoConfig, AutoModel

    register_attention()
    if cfg.path:
        from dist_kd.models.teacher import check_model_dir, load_pretrained

        path = check_model_dir(cfg.path, "student.path")
        config = AutoConfig.from_pretrained(path)
        set_dropout(config, cfg.dropout)
        clear_task_labels(config)
        model, _ = load_pretrained(
            AutoModel, path, "student.path", config=config, attn_implementation=ATTN_IMPLEMENTATION
        )
    else:
        config = student_config_from_teacher(teacher_config, cfg, mapping)
        model = AutoModel.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
        if cfg.init == "teacher":
            if teacher_model is None or mapping is None:
                raise ValueError("student.init=teacher needs the teacher model and the layer mapping")
            init_from_teacher(model, teacher_model, mapping, source_name)
    install_adapter(model)
    install_fast_dropout(model)
    model = model.float()
    set_fp32(model.config)  # a student.path saved in fp16 says so in its config; heads and exports read it
    model.train()
    return model


class Projections(nn.Module):
    """W_e and W_h: linear maps from the student width to the teacher width.

    Args:
        student_width: d_S.
        teacher_width: d_T.
        num_layers: M, the number of student layers (one W_h each unless ``shared``).
        shared: one W_h for all layers.
        bias: give each map a bias. Without one, a constant the student adds to every state reaches the
            loss (W c) instead of being cancelled by the bias, so the student cannot drift into a large common
            component that the loss never sees (docs/quality.md).
    """

    def __init__(
        self, student_width: int, teacher_width: int, num_layers: int, shared: bool = False, bias: bool = True
    ):
        super().__init__()
        self.embedding = nn.Linear(student_width, teacher_width, bias=bias)
        count = 1 if shared else num_layers
        self.layers = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=bias) for _ in range(count))
        self.shared = shared

    def layer(self, m: int) -> nn.Linear:
        """W_h for student layer m (1-based)."""
        return self.layers[0 if self.shared else m - 1]

    def compare(self, m: int, student_BLD: torch.Tensor, teacher_BLD: torch.Tensor):
        """The pair the state loss of layer m (0: embeddings) compares: W student, teacher."""
        linear = self.embedding if m == 0 else self.layer(m)
        return linear(student_BLD.to(linear.weight.dtype)), teacher_BLD

    @torch.no_grad()
    def init_as_selection(self, residual: torch.Tensor) -> None:
        """Start every projection as the transpose of the weight selection: student dimension k goes back to
        teacher dimension ``residual[k]``, the other teacher dimensions start at 0 (and are learnt).

        A randomly initialised W_h would send random gradients into a student that already sits close to
        the teacher on the kept dimensions.
        """
        for linear in (self.embedding, *self.layers):
            linear.weight.zero_()
            linear.bias.zero_()
            linear.weight[residual.to(linear.weight.device), torch.arange(len(residual))] = 1.0


class SelectedDimensions(nn.Module):
    """``distill.projection: select``: no learnt map; student dimension k is compared with teacher dimension
    ``residual[k]`` (the weight-selection subset), in every layer.

    A learnt W_h lets the student hide a large common component in directions W_h maps to almost nothing:
    the loss never sees it, and the student's sentence embeddings collapse onto it (docs/quality.md). Tied
    to fixed teacher dimensions, every direction of the student's states is held to the teacher's.

    Args:
        residual: ``(d_S,)`` teacher dimensions, one per student dimension.
    """

    def __init__(self, residual: torch.Tensor):
        super().__init__()
        self.register_buffer("residual", residual.clone().long(), persistent=False)

    def compare(self, m: int, student_BLD: torch.Tensor, teacher_BLD: torch.Tensor):
        """The pair the state loss of layer m compares: the student, the teacher's selected dimensions."""
        return student_BLD, teacher_BLD.index_select(-1, self.residual.to(teacher_BLD.device))


class DistillStudent(nn.Module):
    """What the DeepSpeed engine trains: the student encoder plus its projections (None when widths match).

    ``forward`` returns the student's features for the distillation losses; only ``student`` is exported.
    """

    def __init__(
        self, student: nn.Module, projections: Projections | SelectedDimensions | None, attention: str = "raw_scores"
    ):
        super().__init__()
        self.student = student
        self.projections = projections
        layers = list(range(1, student.config.num_hidden_layers + 1))
        relations = attention == "relations"  # the relation loss reads Q, K, V instead of raw scores
        self.capture = FeatureCapture(student, [] if relations else layers, layers if relations else [])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None = None
    ) -> EncoderFeatures:
        return self.capture(input_ids, attention_mask, token_type_ids=token_type_ids)

    def save_student(self, directory: str | Path) -> None:
        """Save only the student encoder (no projection weights) as an HF directory."""
        self.student.save_pretrained(directory)


def build_projections(
    student_width: int,
    teacher_width: int,
    num_layers: int,
    shared: bool = False,
    always: bool = False,
    select: bool = False,
) -> Projections | SelectedDimensions | None:
    """How student states meet teacher states in the state losses.

    Returns:
        None when the widths match (and not ``always``): states are compared directly. Otherwise learnt
        projections W_e/W_h, or with ``select`` the fixed :class:`SelectedDimensions` (evenly spaced teacher
        dimensions, the subset ``student.init: teacher`` copies).
    """
    if student_width == teacher_width and not always:
        return None
    if select:
        if student_width > teacher_width:
            raise ValueError(
                f"distill.projection=select compares each student dimension with one teacher dimension, so the "
                f"student ({student_width}) must not be wider than the teacher ({teacher_width})"
            )
        return SelectedDimensions(evenly_spaced(teacher_width, student_width))
    return Projections(student_width, teacher_width, num_layers, shared)
