"""The combined TinyBERT objective over captured features.

``L = w_embd * L_embd + w_hidden * sum_m L_hidn(m) + w_attn * sum_m L_attn(m) + w_pred * L_pred + w_sent * L_sent``

The per-layer terms are summed over the M student layers, as in the paper (``L = sum_m lambda_m L(m)``)
and the reference implementation. Terms whose weight is 0 are not computed at all (general
distillation has no prediction loss; a prediction-only task stage needs no attention scores).

``normalize: variance`` divides each layer's MSE by the teacher's variance at that layer in the batch
(``hidden_variance`` / ``score_variance``, no gradient), so each term is the share of the teacher's variation
the student misses. With raw MSE a layer's weight in the sum is its scale: all-MiniLM-L6-v2's last layer
has a fifth of the variance of its middle layers and its raw scores dwarf every state term, so a student's
last layer (the one every downstream use reads) gets almost no signal and collapses (docs/quality.md).

``L_sent`` (not TinyBERT's; weight 0 by default) is the MSE between sentence embeddings: the student's last
layer and the teacher's layer g(M), each pooled over the real tokens of a row as the teacher's
sentence-transformers modules pool (mean without them), the student's states compared as the hidden-state term
compares them. Token-level terms leave the pooled embeddings of a small student far from the teacher's: most of
their variation across texts is lost, and what is left is one vector common to all (docs/quality.md). With
``normalize: variance`` it is divided by the teacher's variance of pooled embeddings across the rows of the
micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dist_kd.config import doc
from dist_kd.layer_map import layer_map as build_layer_map
from dist_kd.losses import (
    attention_mse,
    hidden_mse,
    hidden_variance,
    relation_kl,
    score_variance,
    soft_cross_entropy,
)
from dist_kd.models.capture import EncoderFeatures
from dist_kd.models.student import Projections, SelectedDimensions
from dist_kd.quality import sentence_pool

TERMS = ("embd", "hidden", "attn", "pred", "sentence")
NORMALIZATIONS = ("none", "variance")
ATTENTION_LOSSES = ("raw_scores", "relations")


@dataclass
class LossWeights:
    """Weight of each loss term."""

    embd: float = doc("embedding-layer loss weight", 1.0)
    hidden: float = doc("hidden-state loss weight (summed over student layers)", 1.0)
    attn: float = doc("raw attention-score loss weight (summed over student layers)", 1.0)
    pred: float = doc("prediction-layer soft cross-entropy weight (0 in general distillation)", 0.0)
    sentence: float = doc(
        "sentence-embedding loss weight (general distillation only): MSE of the student's pooled last layer "
        "against the teacher's pooled layer g(M), pooled as the teacher's sentence-transformers modules pool "
        "(mean without them); with normalize=variance over the teacher's variance of pooled embeddings across "
        "the micro-batch (needs data.micro_batch_size >= 2)",
        0.0,
    )

    def __post_init__(self):
        for name in TERMS:
            if getattr(self, name) < 0:
                raise ValueError(f"distill.weights.{name} must be >= 0, got {getattr(self, name)}")

    def check_layer_terms(self, sentence: bool = True) -> None:
        """Raise unless some term of the layer losses (all but ``pred``; ``sentence`` where the stage has it) has a
        weight: checked with the config, before a run writes anything (the objective said it at the first step)."""
        layer_terms = [name for name in TERMS if name != "pred" and (sentence or name != "sentence")]
        if not any(getattr(self, name) > 0 for name in layer_terms):
            raise ValueError(
                f"every layer-loss weight ({', '.join(f'distill.weights.{name}' for name in layer_terms)}) is 0: "
                "nothing to learn from; give one a weight > 0"
            )


@dataclass
class DistillConfig:
    """How the student learns from the teacher."""

    layer_map: str | list[int] = doc("uniform | top | bottom | an explicit list of teacher layers", "uniform")
    temperature: float = doc("softmax temperature t for the prediction loss (student and teacher alike)", 1.0)
    weights: LossWeights = doc("loss term weights", default_factory=LossWeights)
    projection: str = doc(
        "auto (learnt W_e/W_h when widths differ) | always (learnt, even at equal widths) | select (no learnt "
        "map: student dimension k against a fixed, evenly spaced teacher dimension)",
        "auto",
    )
    normalize: str = doc(
        "none (TinyBERT's raw MSE per layer) | variance (each layer's MSE over the teacher's variance there)", "none"
    )
    attention: str = doc(
        "raw_scores (TinyBERT: MSE of QK^T/sqrt(d) head by head; equal head counts) | relations (MiniLMv2: KL of "
        "query-query, key-key and value-value relations in relation_heads heads, which must divide both widths; "
        "any head counts)",
        "raw_scores",
    )
    relation_heads: int = doc("relation heads of distill.attention=relations (must divide both widths)", 12)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")
        if isinstance(self.layer_map, str) and self.layer_map not in ("uniform", "top", "bottom"):
            raise ValueError(f"distill.layer_map must be uniform | top | bottom | a list, got {self.layer_map!r}")
        if self.projection not in ("auto", "always", "select"):
            raise ValueError(f"distill.projection must be auto | always | select, got {self.projection!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"distill.normalize must be one of {list(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.attention not in ATTENTION_LOSSES:
            raise ValueError(f"distill.attention must be one of {list(ATTENTION_LOSSES)}, got {self.attention!r}")
        if self.relation_heads < 1:
            raise ValueError(f"distill.relation_heads must be >= 1, got {self.relation_heads}")

    def resume_meta(self, layer_losses: bool = True) -> dict[str, Any]:
        """The objective's settings for a checkpoint's ``meta.json``.

        ``distill.projection`` decides which parameters the model has (a learnt W_e/W_h or none): another one
        does not load, so it is a top-level key, refused on resume. The rest (term weights, temperature,
        normalization, attention loss) change only the loss from the checkpoint's step on: ``changeable``,
        named in a warning (:func:`dist_kd.train.checkpoint.check_changeable`).

        Args:
            layer_losses: the run learns through layer losses (general; task phase intermediate).
        """
        changeable: dict[str, Any] = {f"distill.weights.{term}": getattr(self.weights, term) for term in TERMS}
        changeable["distill.temperature"] = self.temperature
        if not layer_losses:
            return {"changeable": changeable}
        changeable.update({"distill.normalize": self.normalize, "distill.attention": self.attention})
        if self.attention == "relations":
            changeable["distill.relation_heads"] = self.relation_heads
        return {"distill.projection": self.projection, "changeable": changeable}

    def check_relation_heads(self, teacher_width: int, student_width: int) -> None:
        """With ``attention: relations``, ``relation_heads`` must divide both attention widths."""
        if self.attention != "relations":
            return
        for who, width in (("teacher", teacher_width), ("student", student_width)):
            if width % self.relation_heads:
                raise ValueError(
                    f"distill.relation_heads {self.relation_heads} does not divide the {who}'s width {width} "
                    f"(teacher {teacher_width}, student {student_width}); choose a common divisor"
                )

    def capture_layers(self, mapping: list[int], attn_weight: float) -> dict[str, list[int]]:
        """Which teacher layers to capture: raw scores or attention inputs of the mapped layers."""
        if attn_weight <= 0:
            return {"score_layers": [], "qkv_layers": []}
        if self.attention == "relations":
            return {"score_layers": [], "qkv_layers": list(mapping)}
        return {"score_layers": list(mapping), "qkv_layers": []}

    def mapping(self, num_teacher_layers: int, num_student_layers: int) -> list[int]:
        """g(1..M) for this config."""
        return build_layer_map(num_teacher_layers, num_student_layers, self.layer_map)


def sentence_term(
    student_BLD: torch.Tensor,
    teacher_BLD: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pooling: tuple[str, ...],
    relative: bool,
) -> torch.Tensor:
    """The sentence term: MSE between the rows' pooled embeddings, over the rows with a real token.

    A row without one (a corrupt shard's, under ``data.skip_corrupt``) has no sentence: it is left out, where
    CLS or last-token pooling would read padding. ``relative`` divides by the teacher's variance of pooled
    embeddings across those rows; with fewer than 2 of them there is none, and the term is 0 (it keeps the
    graph). Rows are weighted rather than selected, so nothing waits for the device.

    Args:
        student_BLD: the student's states as the hidden-state term compares them, ``(B, L, D)``.
        teacher_BLD: the teacher's, ``(B, L, D)``.
        attention_mask: ``(B, L)``, 1 for real tokens; None means all real.
        pooling: sentence-transformers' pooling modes, concatenated (:func:`dist_kd.quality.sentence_pool`).
        relative: divide by the teacher's variance across rows (``normalize: variance``).

    Returns:
        Scalar fp32.
    """
    if attention_mask is None:
        attention_mask = torch.ones(teacher_BLD.shape[:2], device=teacher_BLD.device)
    student_BE, teacher_BE = (sentence_pool(states, attention_mask, pooling) for states in (student_BLD, teacher_BLD))
    rows_B = (attention_mask.to(teacher_BE.device).sum(1) > 0).float()
    count = rows_B.sum()
    per_row = count.clamp_min(1.0)
    error = (rows_B * (student_BE - teacher_BE).square().mean(1)).sum() / per_row
    if not relative:
        return error
    centre_E = (rows_B[:, None] * teacher_BE).sum(0) / per_row
    variance = (rows_B[:, None] * (teacher_BE - centre_E).square()).sum(0).mean() / per_row
    return (count >= 2).float() * error / variance.clamp_min(1e-12)


def tinybert_objective(
    student: EncoderFeatures,
    teacher: EncoderFeatures,
    mapping: list[int],
    attention_mask: torch.Tensor | None,
    weights: LossWeights,
    projections: Projections | SelectedDimensions | None = None,
    student_logits: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    normalize: str = "none",
    attention: str = "raw_scores",
    relation_heads: int = 12,
    pooling: tuple[str, ...] = ("mean_tokens",),
) -> dict[str, torch.Tensor]:
    """Weighted TinyBERT loss and each of its terms.

    Args:
        student: student features (all M layers' hidden states and scores).
        teacher: teacher features (at least the mapped layers).
        mapping: g(1..M), 1-based teacher layers.
        attention_mask: ``(B, L)``, 1 for real tokens.
        weights: per-term weights; a 0 weight skips the term.
        projections: W_e/W_h, the fixed selected teacher dimensions, or None when the widths match.
        student_logits: ``(B, C)`` for the prediction loss.
        teacher_logits: ``(B, C)`` for the prediction loss; softmax at ``temperature`` gives the targets.
        temperature: t, applied to student and teacher logits alike.
        normalize: ``none`` | ``variance`` (each layer term divided by the teacher's variance there).
        attention: ``raw_scores`` (TinyBERT) | ``relations`` (MiniLMv2: sum over Q, K, V of the relation KL).
        relation_heads: R of the relation loss.
        pooling: how the sentence term pools a row's states (sentence-transformers' pooling modes,
            concatenated; :func:`dist_kd.quality.sentence_pool`).

    Returns:
        ``{"loss": total, "embd": ..., "hidden": ..., "attn": ..., "pred": ..., "sentence": ...}`` (fp32
        scalars; only the terms with a positive weight).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    relative = normalize == "variance"

    def state_term(m, student_BLD, teacher_BLD):
        if projections is not None:
            student_BLD, teacher_BLD = projections.compare(m, student_BLD, teacher_BLD)
        loss = hidden_mse(student_BLD, teacher_BLD, attention_mask)
        return loss / hidden_variance(teacher_BLD, attention_mask).clamp_min(1e-12) if relative else loss

    def score_term(m, n):
        # pairs outside a sliding window (of the student's layer or the teacher's) reach no softmax: left out
        windows = [mask for mask in (student.score_masks.get(m), teacher.score_masks.get(n)) if mask is not None]
        pairs = windows[0] if len(windows) == 1 else (windows[0] & windows[1]) if windows else None
        student_BHLL, teacher_BHLL = student.scores[m], teacher.scores[n]
        loss = attention_mse(student_BHLL, teacher_BHLL, attention_mask, pairs)
        return loss / score_variance(teacher_BHLL, attention_mask, pairs).clamp_min(1e-12) if relative else loss

    terms: dict[str, torch.Tensor] = {}
    if weights.embd > 0:
        terms["embd"] = state_term(0, student.embeddings, teacher.embeddings)
    if weights.hidden > 0:
        terms["hidden"] = sum(
            state_term(m, student.hidden[m], teacher.hidden[n]) for m, n in enumerate(mapping, start=1)
        )
    if weights.attn > 0:
        if attention == "relations":
            terms["attn"] = sum(
                relation_kl(s, t, attention_mask, relation_heads)
                for m, n in enumerate(mapping, start=1)
                for s, t in zip(student.qkv[m], teacher.qkv[n], strict=True)
            )
        else:
            terms["attn"] = sum(score_term(m, n) for m, n in enumerate(mapping, start=1))
    if weights.sentence > 0:
        last = len(mapping)
        student_BLD, teacher_BLD = student.hidden[last], teacher.hidden[mapping[-1]]
        if projections is not None:
            student_BLD, teacher_BLD = projections.compare(last, student_BLD, teacher_BLD)
        terms["sentence"] = sentence_term(student_BLD, teacher_BLD, attention_mask, pooling, relative)
    if weights.pred > 0:
        if student_logits is None or teacher_logits is None:
            raise ValueError("distill.weights.pred > 0 needs student and teacher logits")
        teacher_probs = torch.softmax(teacher_logits.float() / temperature, dim=-1)
        terms["pred"] = soft_cross_entropy(student_logits, teacher_probs, temperature)
    if not terms:
        raise ValueError("every distill.weights entry is 0: nothing to learn from")
    terms["loss"] = sum(getattr(weights, name) * value for name, value in terms.items())
    return terms
