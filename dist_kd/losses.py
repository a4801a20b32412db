"""Distillation losses as pure tensor functions (no modules held, no globals).

All reductions accumulate in fp32 whatever the input dtype: teachers run in fp16/bf16, and a squared
error summed over B*H*L*L half-precision elements loses most of its mantissa. Under a caller's
``torch.autocast`` (a bf16 student's loss, ``train.bf16_mode=autocast``) only the projection runs in half
precision; the contractions are taken out of autocast, which would otherwise run them in bf16. Padding is excluded
through explicit masks, so a batch's loss does not depend on how much padding it carries.

Shapes use suffixes: B batch, H heads, L sequence length, D width, C classes, K teachers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _mask_BL(mask: torch.Tensor | None, like_BL: torch.Size, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(like_BL, dtype=torch.float32, device=device)
    if mask.shape != like_BL:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {tuple(like_BL)} (B, L)")
    return mask.to(device=device, dtype=torch.float32)


def _exact(tensor: torch.Tensor):
    """A context in which autocast is off for ``tensor``'s device: einsum and matmul run in their inputs' fp32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _pair_weights(mask_BL: torch.Tensor, pair_mask: torch.Tensor | None, like_BHLL: torch.Size) -> torch.Tensor | None:
    """``(B, 1, L, L)`` fp32: 1 where both tokens are real and ``pair_mask`` allows the pair (None: no pair mask)."""
    if pair_mask is None:
        return None
    batch, _, length, _ = like_BHLL
    if pair_mask.shape != (batch, 1, length, length):
        raise ValueError(f"pair_mask has shape {tuple(pair_mask.shape)}, expected {(batch, 1, length, length)}")
    return pair_mask.to(torch.float32) * (mask_BL[:, :, None] * mask_BL[:, None, :])[:, None]


def attention_mse(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pair_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between unnormalized attention scores (QK^T / sqrt(d), before mask and softmax).

    Args:
        student_scores: ``(B, H, L, L)``.
        teacher_scores: ``(B, H, L, L)``, same head count (TinyBERT compares head by head).
        attention_mask: ``(B, L)``, 1 for real tokens, 0 for padding; None means all real.
        pair_mask: ``(B, 1, L, L)`` boolean, the pairs the layers' softmax sees (a sliding window); None: all.

    Returns:
        Scalar fp32: mean over (b, h, i, j) where tokens i and j are both real (and ``pair_mask`` allows the
        pair). This equals ``1/H * sum_h MSE(A_S_h, A_T_h)`` of the paper restricted to real token pairs.
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"attention score shapes differ: student {tuple(student_scores.shape)} vs teacher "
            f"{tuple(teacher_scores.shape)}; (B, H, L, L) must match, including the head count"
        )
    batch, heads, length, _ = student_scores.shape
    if attention_mask is None and pair_mask is None:  # every pair real: a plain mean
        return F.mse_loss(student_scores.float(), teacher_scores.float())
    squared_BHLL = F.mse_loss(student_scores.float(), teacher_scores.float(), reduction="none")
    mask_BL = _mask_BL(attention_mask, torch.Size((batch, length)), student_scores.device)
    pairs_B1LL = _pair_weights(mask_BL, pair_mask, student_scores.shape)
    if pairs_B1LL is not None:
        with _exact(squared_BHLL):
            total = (squared_BHLL * pairs_B1LL).sum()
        return total / (pairs_B1LL.sum() * heads).clamp_min(1.0)
    # sum over (b, h, i, j) of m_bi m_bj d^2 as one contraction: no (B, 1, L, L) pair mask is built, and the
    # backward is one broadcast product (a measured 2-4x over masking by multiplication on a CPU).
    with _exact(squared_BHLL):
        total = torch.einsum("bhij,bi,bj->", squared_BHLL, mask_BL, mask_BL)
    count = mask_BL.sum(dim=1).square().sum() * heads
    return total / count.clamp_min(1.0)


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor | None,
    projection: torch.nn.Module | None = None,
) -> torch.Tensor:
    """MSE between student states (projected to the teacher's width) and teacher states.

    Args:
        student_hidden: ``(B, L, D_S)``.
        teacher_hidden: ``(B, L, D_T)``.
        attention_mask: ``(B, L)``, 1 for real tokens; None means all real.
        projection: ``nn.Linear(D_S, D_T)`` (W_e or W_h) or None when the widths already match.

    Returns:
        Scalar fp32: mean over real tokens and the D_T features.
    """
    if projection is not None:
        student_hidden = projection(student_hidden.to(next(projection.parameters()).dtype))
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"hidden shapes differ: student {tuple(student_hidden.shape)} vs teacher {tuple(teacher_hidden.shape)}; "
            "a projection from the student to the teacher width is needed"
        )
    batch, length, width = teacher_hidden.shape
    if attention_mask is None:
        return F.mse_loss(student_hidden.float(), teacher_hidden.float())
    squared_BLD = F.mse_loss(student_hidden.float(), teacher_hidden.float(), reduction="none")
    mask_BL = _mask_BL(attention_mask, torch.Size((batch, length)), student_hidden.device)
    with _exact(squared_BLD):
        total = torch.einsum("bld,bl->", squared_BLD, mask_BL)
    return total / (mask_BL.sum() * width).clamp_min(1.0)


def hidden_variance(hidden_BLD: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Variance of states over the real tokens, averaged over features: the MSE of the best constant guess.

    Args:
        hidden_BLD: ``(B, L, D)``.
        attention_mask: ``(B, L)``, 1 for real tokens; None means all real.

    Returns:
        Scalar fp32 ``mean_d Var_{real tokens}(h_d)``; dividing :func:`hidden_mse` by the teacher's value
        gives the fraction of the teacher's variation the student misses, whatever the layer's scale.
    """
    batch, length, _ = hidden_BLD.shape
    mask_BL = _mask_BL(attention_mask, torch.Size((batch, length)), hidden_BLD.device)
    weight = mask_BL[:, :, None]
    count = mask_BL.sum().clamp_min(1.0)
    values = hidden_BLD.float()
    mean_D = (values * weight).sum((0, 1)) / count
    return ((values - mean_D).square() * weight).sum() / (count * hidden_BLD.shape[-1])


def score_variance(
    scores_BHLL: torch.Tensor, attention_mask: torch.Tensor | None, pair_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Variance of attention scores over the real (query, key) pairs of each head, averaged over heads.

    Args:
        scores_BHLL: ``(B, H, L, L)``.
        attention_mask: ``(B, L)``, 1 for real tokens; None means all real.
        pair_mask: as in :func:`attention_mse`.

    Returns:
        Scalar fp32, the :func:`attention_mse` of predicting each head's mean score everywhere.
    """
    batch, heads, length, _ = scores_BHLL.shape
    mask_BL = _mask_BL(attention_mask, torch.Size((batch, length)), scores_BHLL.device)
    pair_B1LL = _pair_weights(mask_BL, pair_mask, scores_BHLL.shape)
    if pair_B1LL is None:
        pair_B1LL = (mask_BL[:, :, None] * mask_BL[:, None, :])[:, None]
    count = pair_B1LL.sum().clamp_min(1.0)
    values = scores_BHLL.float()
    mean_H = (values * pair_B1LL).sum((0, 2, 3)) / count
    return ((values - mean_H[None, :, None, None]).square() * pair_B1LL).sum() / (count * heads)


def _relation_log_probs(x_BHLd: torch.Tensor, key_mask_BL: torch.Tensor, num_relation_heads: int) -> torch.Tensor:
    """log softmax of scaled dot products of ``x`` with itself, re-split into ``num_relation_heads`` heads.

    The layer's heads are concatenated to ``(B, L, H * d)`` and split again into R relation heads of width
    ``H * d / R``, so teacher and student relations have the same shape whatever their head counts.
    """
    batch, heads, length, width = x_BHLd.shape
    total = heads * width
    if total % num_relation_heads:
        raise ValueError(
            f"distill.relation_heads {num_relation_heads} does not divide the attention width {total} "
            f"({heads} heads x {width}); choose a divisor of both the teacher's and the student's width"
        )
    part = total // num_relation_heads
    x_BRLp = x_BHLd.float().transpose(1, 2).reshape(batch, length, num_relation_heads, part).transpose(1, 2)
    with _exact(x_BRLp):
        logits_BRLL = torch.matmul(x_BRLp, x_BRLp.transpose(-1, -2)) / part**0.5
    keys_B11L = key_mask_BL[:, None, None, :].bool()
    logits_BRLL = logits_BRLL.masked_fill(~keys_B11L, torch.finfo(torch.float32).min)
    return torch.log_softmax(logits_BRLL, dim=-1)


def relation_kl(
    student_BHLd: torch.Tensor,
    teacher_BHLd: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_relation_heads: int,
) -> torch.Tensor:
    """MiniLMv2's self-attention relation loss for one of query, key or value.

    ``KL(R_teacher || R_student)`` with ``R = softmax(X_r X_r^T / sqrt(d_r))`` per relation head r, averaged over
    relation heads and real query tokens; padded tokens are neither queries nor keys. Teacher and student may
    differ in head count and width (each must be divisible by ``num_relation_heads``), not in length.

    Args:
        student_BHLd: the student's queries (or keys, values), ``(B, H_s, L, d_s)``.
        teacher_BHLd: the teacher's, ``(B, H_t, L, d_t)``.
        attention_mask: ``(B, L)``, 1 for real tokens (None: all real).
        num_relation_heads: R.
    """
    if student_BHLd.shape[0] != teacher_BHLd.shape[0] or student_BHLd.shape[2] != teacher_BHLd.shape[2]:
        raise ValueError(
            f"relation loss: student {tuple(student_BHLd.shape)} and teacher {tuple(teacher_BHLd.shape)} differ in "
            "batch or length"
        )
    batch, _, length, _ = student_BHLd.shape
    mask_BL = _mask_BL(attention_mask, torch.Size((batch, length)), student_BHLd.device)
    log_t = _relation_log_probs(teacher_BHLd.detach().to(student_BHLd.device), mask_BL, num_relation_heads)
    log_s = _relation_log_probs(student_BHLd, mask_BL, num_relation_heads)
    keys_B11L = mask_BL[:, None, None, :]
    kl_BRL = (log_t.exp() * (log_t - log_s) * keys_B11L).sum(-1)  # masked keys carry no teacher mass
    queries_B1L = mask_BL[:, None, :]
    return (kl_BRL * queries_B1L).sum() / (queries_B1L.sum() * num_relation_heads).clamp_min(1.0)


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Cross-entropy against soft targets: mean over the batch of ``-sum_c Q_c log softmax(z_S / t)_c``.

    Args:
        student_logits: ``(B, C)``.
        teacher_probs: ``(B, C)`` target distribution Q (already at temperature t, e.g. from
            ``ensemble_probs(teacher_logits, t)``).
        temperature: t, applied to the student logits.

    Returns:
        Scalar fp32.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher probabilities {tuple(teacher_probs.shape)} "
            "differ; (B, C) must match (same number and order of labels)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(teacher_probs.float() * log_probs).sum(dim=-1).mean()


def ensemble_probs(teacher_logits: Sequence[torch.Tensor] | torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft targets of an ensemble: the mean of the K teachers' softmaxes at temperature t.

    Args:
        teacher_logits: a list of K ``(B, C)`` tensors or a ``(K, B, C)`` tensor.
        temperature: t, applied to every teacher's logits.

    Returns:
        ``(B, C)`` fp32 probabilities (rows sum to 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits_KBC = torch.stack(list(teacher_logits)) if not torch.is_tensor(teacher_logits) else teacher_logits
    if logits_KBC.dim() != 3:
        raise ValueError(f"teacher logits must be K x (B, C), got shape {tuple(logits_KBC.shape)}")
    return F.softmax(logits_KBC.float() / temperature, dim=-1).mean(dim=0)


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, task_type: str = "classification") -> torch.Tensor:
    """The usual supervised loss: cross-entropy for classification, MSE for regression.

    Args:
        logits: ``(B, C)`` for classification, ``(B,)`` or ``(B, 1)`` for regression.
        labels: ``(B,)`` class indices, or float targets for regression.
        task_type: ``classification`` or ``regression``.

    Returns:
        Scalar fp32, mean over the batch.
    """
    if task_type == "classification":
        return F.cross_entropy(logits.float(), labels.long())
    if task_type == "regression":
        return F.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1))
    raise ValueError(f"task type must be 'classification' or 'regression', got {task_type!r}")


def prediction_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor | None,
    labels: torch.Tensor | None,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    temperature: float = 1.0,
    task_type: str = "classification",
    label_mask: torch.Tensor | None = None,
    hard_rows: float | None = None,
) -> dict[str, torch.Tensor]:
    """Soft/hard mixed prediction-layer loss: ``soft_weight * CE(Q, z_S/t) + hard_weight * hard(z_S, y)``.

    For regression the "soft target" is the teacher's (ensemble mean) prediction, compared by MSE.

    Args:
        student_logits: ``(B, C)``.
        teacher_probs: ``(B, C)`` soft targets, or None when the task has no teacher.
        labels: ``(B,)`` hard labels, or None (augmented rows carry none).
        soft_weight: weight of the soft term (ignored when ``teacher_probs`` is None).
        hard_weight: weight of the hard term (ignored when ``labels`` is None).
        temperature: t for the soft term.
        task_type: ``classification`` or ``regression``.
        label_mask: ``(B,)`` bool, True where ``labels`` holds a label (a batch mixing original and augmented
            rows); the hard term covers those rows only. None: all rows.
        hard_rows: what the hard term's sum over labelled rows is divided by; None: the number of labelled
            rows here (a plain mean). Data-parallel training passes the whole micro-batch's labelled count
            over the world size: the ranks' gradients are averaged, so the hard term is then the mean over
            every labelled row of the micro-batch, whichever rank holds them.

    Returns:
        ``{"loss": total, "soft": ..., "hard": ...}``: ``soft`` when used; ``hard`` whenever ``labels`` and
        ``hard_weight`` are given, 0 (still a graph through the logits) when no row here has a label, so
        that every rank returns the same terms.
    """
    terms: dict[str, torch.Tensor] = {}
    if teacher_probs is not None and soft_weight:
        if task_type == "regression":
            terms["soft"] = F.mse_loss(student_logits.float().reshape(-1), teacher_probs.float().reshape(-1))
        else:
            terms["soft"] = soft_cross_entropy(student_logits, teacher_probs, temperature)
    if labels is not None and hard_weight:
        if label_mask is None:
            label_mask = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        rows = label_mask.nonzero().squeeze(1)
        denominator = float(rows.numel()) if hard_rows is None else float(hard_rows)
        if rows.numel() and denominator > 0:
            mean = hard_label_loss(student_logits.index_select(0, rows), labels.index_select(0, rows), task_type)
            terms["hard"] = mean * (rows.numel() / denominator)
        else:
            # No labelled row here: a zero that still reaches every logit, so the backward pass (and a
            # data-parallel gradient reduction) runs as on any other batch.
            terms["hard"] = student_logits.float().sum() * 0.0
    if not terms:
        raise ValueError("prediction_loss needs soft targets with soft_weight > 0 or labels with hard_weight > 0")
    weights = {"soft": soft_weight, "hard": hard_weight}
    terms["loss"] = sum(weights[name] * value for name, value in terms.items())
    return terms
