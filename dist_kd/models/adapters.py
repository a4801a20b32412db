"""Attention adapters for encoders whose attention does not go through transformers' attention registry.

Most BERT-family encoders (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, ModernBERT) call the attention
function registered under ``config._attn_implementation``, and dist_kd's ``dist_kd`` entry captures their
raw scores (``capture.py``). Two families compute attention in their own code, with a term the registry's
signature has no room for:

- **MPNet** adds a relative position bias (one learnt scalar per head and relative-position bucket) to
  QK^T / sqrt(d) before the mask;
- **DeBERTa-v2/v3** adds disentangled terms to the content scores: content-to-position (the query against
  the relative-position keys) and position-to-content (the key against the relative-position queries),
  and scales all three by sqrt(d * k), k the number of terms.

For these, the adapter replaces the ``forward`` of each self-attention module of the loaded model with one
that computes the scores from the module's own projections and helpers, exactly as the stock forward does,
hands the scores (and Q, K, V) to the capture through the same attributes the registry path uses, and
finishes attention as the stock forward does. The raw scores TinyBERT's loss compares are then, as for
BERT, everything the softmax sees except the padding mask: for MPNet QK^T/sqrt(d) plus the position bias,
for DeBERTa content + c2p + p2c over sqrt(d * k).

Weights, state dict and config are untouched, so a student saved from an adapted model loads as a stock
model anywhere.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

_ADAPTED_ATTR = "_dist_kd_adapter"


def masked_softmax(scores_BHLL: torch.Tensor, mask: torch.Tensor | None, fill: float) -> torch.Tensor:
    """Softmax over the last axis after masking: ``mask`` boolean (True: attend) or additive (0 / large negative)."""
    if mask is None:
        return torch.softmax(scores_BHLL, dim=-1)
    if mask.dtype == torch.bool:
        return torch.softmax(scores_BHLL.masked_fill(~mask, fill), dim=-1)
    return torch.softmax(scores_BHLL + mask.to(scores_BHLL.dtype), dim=-1)


def deliver(module: nn.Module, scores_BHLL: torch.Tensor | None, qkv: tuple | None) -> None:
    """Hand a marked layer's raw scores and (query, key, value) to the capture's sinks (see capture.py)."""
    from dist_kd.models.capture import _LAYER_ATTR, _QKV_ATTR, _SINK_ATTR

    index = getattr(module, _LAYER_ATTR, None)
    if index is None:
        return
    sink = getattr(module, _SINK_ATTR, None)
    if sink is not None and scores_BHLL is not None:
        sink[index] = scores_BHLL
    qkv_sink = getattr(module, _QKV_ATTR, None)
    if qkv_sink is not None and qkv is not None:
        qkv_sink[index] = qkv


def _mpnet_forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
    """MPNetSelfAttention.forward with capture: scores = QK^T / sqrt(d) + position bias, then mask and softmax.

    Under ``attn_implementation="dist_kd"`` MPNetModel builds a boolean mask (the stock forward expects an
    additive one); both are accepted.
    """
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    query = self.q(hidden_states).view(shape).transpose(1, 2)
    key = self.k(hidden_states).view(shape).transpose(1, 2)
    value = self.v(hidden_states).view(shape).transpose(1, 2)
    scores_BHLL = torch.matmul(query, key.transpose(-1, -2)) / (self.attention_head_size**0.5)
    if position_bias is not None:
        scores_BHLL = scores_BHLL + position_bias
    deliver(self, scores_BHLL, (query, key, value))
    probs = masked_softmax(scores_BHLL, attention_mask, torch.finfo(scores_BHLL.dtype).min)
    context = torch.matmul(self.dropout(probs), value).permute(0, 2, 1, 3).contiguous()
    output = self.o(context.view(*context.shape[:-2], self.all_head_size))
    return (output, probs) if output_attentions else (output,)


def _deberta_v2_forward(
    self,
    hidden_states,
    attention_mask,
    output_attentions=False,
    query_states=None,
    relative_pos=None,
    rel_embeddings=None,
):
    """DisentangledSelfAttention.forward with capture: scores = (content + c2p + p2c) / sqrt(d * k)."""
    helpers = sys.modules[type(self).__module__]  # the model's own scaling helper, as its forward uses it
    heads = self.num_attention_heads
    query = self.transpose_for_scores(self.query_proj(hidden_states if query_states is None else query_states), heads)
    key = self.transpose_for_scores(self.key_proj(hidden_states), heads)
    value = self.transpose_for_scores(self.value_proj(hidden_states), heads)
    scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    scale = helpers.scaled_size_sqrt(query, scale_factor)
    scores = torch.bmm(query, key.transpose(-1, -2) / scale.to(dtype=query.dtype))
    if self.relative_attention:
        scores = scores + self.disentangled_attention_bias(
            query, key, relative_pos, self.pos_dropout(rel_embeddings), scale_factor
        )
    scores_BHLL = scores.view(-1, heads, scores.size(-2), scores.size(-1))

    def per_head(x):  # (B*H, L, d) -> (B, H, L, d)
        return x.view(-1, heads, x.size(-2), x.size(-1))

    deliver(self, scores_BHLL, (per_head(query), per_head(key), per_head(value)))
    probs = masked_softmax(scores_BHLL, attention_mask.bool(), torch.finfo(query.dtype).min)
    dropped = self.dropout(probs)
    context = torch.bmm(dropped.view(-1, dropped.size(-2), dropped.size(-1)), value)
    context = per_head(context).permute(0, 2, 1, 3).contiguous()
    context = context.view(*context.shape[:-2], -1)
    return (context, probs if output_attentions else None)


@dataclass(frozen=True)
class Adapter:
    """How dist_kd reads one architecture family's attention.

    Attributes:
        family: the name in messages and docs.
        attention_classes: the self-attention modules whose forward is replaced, as ``file.Class``: the last part
            of the class's module and its name (DeBERTa v1's attention has v2's class name and other weights).
        forward: the replacement forward (bound to each module).
        inner_rows: state-dict name fragments of linear layers whose output dimensions are attention-inner
            (query/key/value), for weight selection when the student has fewer heads than the teacher.
        inner_columns: fragments of linear layers whose input dimensions are attention-inner.
        per_head: fragments of parameters with one entry per head on their last axis (MPNet's position bias).
    """

    family: str
    attention_classes: tuple[str, ...]
    forward: Callable
    inner_rows: tuple[str, ...] = ()
    inner_columns: tuple[str, ...] = ()
    per_head: tuple[str, ...] = ()


ADAPTERS = (
    Adapter(
        "MPNet",
        ("modeling_mpnet.MPNetSelfAttention",),
        _mpnet_forward,
        inner_rows=("attention.attn.q.", "attention.attn.k.", "attention.attn.v."),
        inner_columns=("attention.attn.o.",),
        per_head=("relative_attention_bias.",),
    ),
    Adapter(
        "DeBERTa-v2/v3",
        ("modeling_deberta_v2.DisentangledSelfAttention",),
        _deberta_v2_forward,
        inner_rows=(
            "attention.self.query_proj.",
            "attention.self.key_proj.",
            "attention.self.value_proj.",
            "attention.self.pos_key_proj.",
            "attention.self.pos_query_proj.",
        ),
        inner_columns=("attention.output.dense.",),
    ),
)

# Registry-path encoders: BERT, RoBERTa, XLM-R, ELECTRA (attention.self.*), DistilBERT (q_lin, ...), ModernBERT
# (attn.Wqkv, attn.Wo).
REGISTRY_INNER_ROWS = (
    "attention.self.query.",
    "attention.self.key.",
    "attention.self.value.",
    "attention.q_lin.",
    "attention.k_lin.",
    "attention.v_lin.",
    "attn.Wqkv.",
)
REGISTRY_INNER_COLUMNS = ("attention.output.dense.", "attention.out_lin.", "attn.Wo.")
# Fused projections: name fragment -> the number of equal blocks stacked on their output (row) axis, each cut
# alike. ModernBERT's Wqkv stacks query, key and value; its gated MLP's Wi stacks the input and the gate.
FUSED_ROWS = {"attn.Wqkv.": 3, "mlp.Wi.": 2}


def _class_name(module: nn.Module) -> str:
    """``file.Class`` of a module's class, as :attr:`Adapter.attention_classes` names them."""
    kind = type(module)
    return f"{kind.__module__.rsplit('.', 1)[-1]}.{kind.__name__}"


def adapter_for(model: nn.Module) -> Adapter | None:
    """The adapter whose attention class occurs in ``model`` (None: its attention uses the registry)."""
    names = {_class_name(module) for module in model.modules()}
    return next((a for a in ADAPTERS if names.intersection(a.attention_classes)), None)


def install_adapter(model: nn.Module) -> Adapter | None:
    """Replace the forward of every self-attention module of an adapted family (idempotent).

    Returns:
        The adapter installed, or None when the model's attention goes through the registry.
    """
    adapter = adapter_for(model)
    if adapter is None:
        return None
    for module in model.modules():
        if _class_name(module) in adapter.attention_classes and getattr(module, _ADAPTED_ATTR, None) is None:
            module.forward = types.MethodType(adapter.forward, module)
            setattr(module, _ADAPTED_ATTR, adapter.family)
    return adapter


def selection_names(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(inner_rows, inner_columns, per_head)`` name fragments for weight selection of ``model``'s family."""
    adapter = adapter_for(model)
    if adapter is None:
        return REGISTRY_INNER_ROWS, REGISTRY_INNER_COLUMNS, ()
    return adapter.inner_rows, adapter.inner_columns, adapter.per_head
