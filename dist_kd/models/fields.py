"""The settings dist_kd writes into an HF config, under each family's own names.

BERT, RoBERTa, XLM-R, ELECTRA, MPNet and DeBERTa call the feed-forward width ``intermediate_size`` and the
dropout rates ``hidden_dropout_prob`` / ``attention_probs_dropout_prob``; DistilBERT calls them
``hidden_dim`` and ``dropout`` / ``attention_dropout``; ModernBERT has ``intermediate_size`` and three rates,
``embedding_dropout``, ``attention_dropout`` and ``mlp_dropout``. Setting BERT's names on another family's
config only adds attributes its model never reads: the setting is silently lost and the saved config.json
carries numbers that describe nothing. Task-head dropout (``classifier_dropout``, DistilBERT's
``seq_classif_dropout``, DeBERTa's ``cls_dropout`` and ``pooler_dropout``) is not among these:
``dist_kd.models.heads.set_head_dropout`` sets it, for task heads and fine-tuned teachers alike.
"""

from __future__ import annotations

import torch

FFN_FIELDS = {"distilbert": "hidden_dim"}
DROPOUT_FIELDS = {
    "distilbert": ("dropout", "attention_dropout"),
    "modernbert": ("mlp_dropout", "attention_dropout", "embedding_dropout"),
}
BERT_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def _model_type(config) -> str:
    return getattr(config, "model_type", "") or ""


def ffn_field(config) -> str:
    """The name of ``config``'s feed-forward width.

    Raises:
        ValueError: the config has no such field (an architecture whose feed-forward width dist_kd cannot set).
    """
    name = FFN_FIELDS.get(_model_type(config), "intermediate_size")
    if not isinstance(getattr(config, name, None), int):
        raise ValueError(
            f"{type(config).__name__} (model_type {_model_type(config)!r}): its config.json has no feed-forward "
            f"width {name}, so dist_kd cannot read or set the student's intermediate_size for it"
        )
    return name


def ffn_width(config) -> int:
    """The feed-forward width of ``config`` (``intermediate_size``, DistilBERT's ``hidden_dim``)."""
    return getattr(config, ffn_field(config))


def set_ffn_width(config, width: int) -> None:
    """Set the feed-forward width of ``config`` under its family's name."""
    setattr(config, ffn_field(config), width)


def dropout_fields(config) -> tuple[str, ...]:
    """The names of ``config``'s encoder dropout rates, the main (hidden or MLP) one first.

    Raises:
        ValueError: the config has none of its family's dropout fields.
    """
    names = DROPOUT_FIELDS.get(_model_type(config), BERT_DROPOUT_FIELDS)
    found = tuple(name for name in names if isinstance(getattr(config, name, None), (int, float)))
    if not found:
        raise ValueError(
            f"{type(config).__name__} (model_type {_model_type(config)!r}): its config.json has none of the "
            f"dropout fields {list(names)}, so dist_kd cannot set the encoder's dropout"
        )
    return found


def dropout_rate(config) -> float:
    """The encoder's main dropout rate as ``config`` records it (what ``student.dropout: null`` keeps)."""
    return float(getattr(config, dropout_fields(config)[0]))


def set_dropout(config, rate: float) -> None:
    """Set every encoder dropout rate of ``config`` (hidden, attention and, where the family has them, MLP
    and embedding dropout) to ``rate``."""
    for name in dropout_fields(config):
        setattr(config, name, rate)


def clear_task_labels(config) -> None:
    """Give an encoder's config the label fields of a model with no task (transformers' defaults): a student
    made from a fine-tuned classifier (``student.path``, or a classifier teacher's config) carried its
    ``id2label`` into the exported encoder, which a later ``AutoModelForSequenceClassification`` read as that
    task's labels."""
    config.id2label = {0: "LABEL_0", 1: "LABEL_1"}
    config.label2id = {"LABEL_0": 0, "LABEL_1": 1}
    config.problem_type = None
    if getattr(config, "finetuning_task", None) is not None:
        config.finetuning_task = None


def set_fp32(config) -> None:
    """Record fp32 as ``config``'s dtype.

    transformers builds ``from_config`` models in ``config.dtype`` and ``save_pretrained`` writes it, so a
    source directory saved in fp16 would otherwise give fp16 task heads beside an fp32 encoder (a dtype
    error in the first forward) and fp16-labelled exports; dist_kd trains and exports in fp32 whatever its
    sources were stored in.
    """
    config.dtype = torch.float32
