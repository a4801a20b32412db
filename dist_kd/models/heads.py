"""The multi-task student of MT-DNN: one shared encoder, one small head per task.

Each task head is taken from the architecture's own ``*ForSequenceClassification`` model, built for the
task's label count, so that a task's student exports as a stock classifier directory (the shared encoder
plus that task's head) that anyone can load with ``AutoModelForSequenceClassification`` and that computes
exactly the logits it computed in training. Five head shapes cover the BERT family:

- ``pooled`` (BERT): ``classifier`` is a linear layer on the dropout of the encoder's pooler output;
- ``sequence`` (RoBERTa, XLM-R, ELECTRA, MPNet): ``classifier`` is a module that reads the sequence output
  itself (it takes the first token through dense + tanh + linear);
- ``context`` (DeBERTa-v2/v3): the classifier model's own ``pooler`` (first token, dense, activation) on the
  sequence output, then dropout and a linear ``classifier``; the pooler belongs to the head;
- ``pre_classifier`` (DistilBERT): the first token through ``pre_classifier`` (linear), ReLU and dropout, then
  a linear ``classifier``;
- ``prediction_head`` (ModernBERT): the first token or the mean of the real tokens (the config's
  ``classifier_pooling``) through the classifier model's ``head`` (dense, activation, LayerNorm), dropout and a
  linear ``classifier``.

Other layouts are refused with a clear error rather than trained with a head that would not export.
Regression tasks have one output.
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from dist_kd.data.tokenizer import save_tokenizer

logger = logging.getLogger(__name__)
HEAD_STYLES = ("pooled", "sequence", "context", "pre_classifier", "prediction_head")


def _task_config(encoder_config, num_outputs: int, labels: list[str] | None):
    """The encoder's config with the task's label maps (what the exported classifier carries), in fp32."""
    from dist_kd.models.fields import set_fp32

    config = copy.deepcopy(encoder_config)
    set_fp32(config)  # the heads are built in config.dtype, and train beside an fp32 encoder
    config.num_labels = num_outputs
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: index for index, name in enumerate(labels)}
        config.problem_type = "single_label_classification"
    else:
        config.id2label = {0: "score"}
        config.label2id = {"score": 0}
        config.problem_type = "regression"
    config.architectures = None
    return config


HEAD_DROPOUT_FIELDS = {"distilbert": ("seq_classif_dropout",), "deberta-v2": ("cls_dropout", "pooler_dropout")}


def set_head_dropout(config, rate: float) -> None:
    """The task head's dropout under its family's names (DistilBERT's ``seq_classif_dropout``; DeBERTa's
    ``cls_dropout`` and its context pooler's ``pooler_dropout``; ``classifier_dropout`` elsewhere). MPNet's head
    has none of its own: it reads the encoder's ``hidden_dropout_prob``, which this leaves alone."""
    for name in HEAD_DROPOUT_FIELDS.get(config.model_type, ("classifier_dropout",)):
        setattr(config, name, rate)


@functools.cache
def _note_mpnet_head_dropout() -> None:
    logger.warning(
        "student.head_dropout: MPNet's classification head has no dropout of its own (it reads the encoder's "
        "hidden_dropout_prob, which student.dropout sets), so it does not change it"
    )


def _classifier_model(config):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(config)


class TaskHead(nn.Module):
    """One task's head, as the architecture's sequence classifier defines it.

    Args:
        encoder: the shared encoder (read for its config and to check it has a pooler where needed).
        num_outputs: classes, or 1 for regression.
        labels: label names in index order, or None for regression.
        dropout: the head's dropout rate (None: the encoder's ``classifier_dropout`` or hidden dropout).

    Raises:
        ValueError: the architecture's classifier is neither of the two supported shapes.
    """

    def __init__(self, encoder: nn.Module, num_outputs: int, labels: list[str] | None, dropout: float | None = None):
        super().__init__()
        config = _task_config(encoder.config, num_outputs, labels)
        if dropout is not None:
            set_head_dropout(config, dropout)
            if config.model_type == "mpnet":
                _note_mpnet_head_dropout()
        model = _classifier_model(config)
        self.model_type = type(model).__name__
        classifier = getattr(model, "classifier", None)
        linear = isinstance(classifier, nn.Linear)
        self.pooling = "cls"
        if linear and getattr(encoder, "pooler", None) is not None:
            self.style = "pooled"
            self.dropout = getattr(model, "dropout", None) or nn.Identity()
        elif isinstance(classifier, nn.Module) and not linear:
            self.style = "sequence"
            self.dropout = nn.Identity()
        elif linear and isinstance(getattr(model, "pooler", None), nn.Module):
            self.style = "context"
            self.pooler = model.pooler
            self.dropout = getattr(model, "dropout", None) or nn.Identity()
        elif linear and isinstance(getattr(model, "pre_classifier", None), nn.Linear):
            self.style = "pre_classifier"
            self.pre_classifier = model.pre_classifier
            self.dropout = model.dropout
        elif linear and isinstance(getattr(model, "head", None), nn.Module) and hasattr(model, "drop"):
            self.style = "prediction_head"
            self.head = model.head
            self.dropout = model.drop
            self.pooling = config.classifier_pooling
            if self.pooling not in ("cls", "mean"):
                raise ValueError(
                    f"{self.model_type}: classifier_pooling {self.pooling!r} in the encoder's config.json; dist_kd's "
                    "task heads pool with 'cls' or 'mean'"
                )
        else:
            raise ValueError(
                f"{self.model_type}: dist_kd's task heads support BERT-style classifiers (a linear layer on the "
                "pooler output), RoBERTa-style ones (a head module on the sequence output), DeBERTa-style ones "
                "(the classifier's own pooler on the sequence output), DistilBERT's (a pre-classifier on the first "
                "token) and ModernBERT's (a prediction head on the pooled tokens); this architecture has none of them"
            )
        self.classifier = classifier
        self.num_outputs = num_outputs
        self.labels = labels
        self.dropout_rate = dropout  # the exported classifier's classifier_dropout (None: the config's own)

    @property
    def parts(self) -> tuple[str, ...]:
        """The classifier model's modules this head holds (under the same names), for the export."""
        extra = {"context": "pooler", "pre_classifier": "pre_classifier", "prediction_head": "head"}.get(self.style)
        return ("classifier",) if extra is None else (extra, "classifier")

    def forward(self, outputs, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C)`` logits from the encoder's outputs (``attention_mask`` ``(B, L)``: for mean pooling)."""
        if self.style == "pooled":
            return self.classifier(self.dropout(outputs.pooler_output))
        if self.style == "context":
            return self.classifier(self.dropout(self.pooler(outputs.last_hidden_state)))
        if self.style == "pre_classifier":
            first = self.pre_classifier(outputs.last_hidden_state[:, 0])
            return self.classifier(self.dropout(torch.relu(first)))
        if self.style == "prediction_head":
            states = outputs.last_hidden_state
            if self.pooling == "mean":
                real = (
                    torch.ones(states.shape[:2], dtype=states.dtype, device=states.device)
                    if attention_mask is None
                    else attention_mask.to(states.dtype)
                )
                pooled = (states * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)
            else:
                pooled = states[:, 0]
            return self.classifier(self.dropout(self.head(pooled)))
        return self.classifier(outputs.last_hidden_state)


class MultiTaskStudent(nn.Module):
    """Shared encoder + per-task heads.

    Args:
        encoder: an HF encoder (e.g. the general-distilled student loaded with ``AutoModel``).
        tasks: task name -> (number of outputs, label names or None for regression).
        dropout: head dropout (None: as the architecture's classifier sets it).
    """

    def __init__(
        self, encoder: nn.Module, tasks: dict[str, tuple[int, list[str] | None]], dropout: float | None = None
    ):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(
            {name: TaskHead(encoder, outputs, labels, dropout) for name, (outputs, labels) in tasks.items()}
        )

    def forward(
        self,
        task: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, C)`` of ``task``.

        In training, every other head also runs (in eval mode, on detached inputs) and adds 0 times its logits'
        sum: each head then gets a gradient on every step, zero for the idle ones, as ZeRO 0-2 give them anyway.
        ZeRO-3 hands the optimizer its whole gradient buffer, in which a head that took no part in the step kept
        its last gradient: that head was stepped again with it on every step its task was not drawn.
        """
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        logits = self.heads[task](outputs, attention_mask)
        if self.training and len(self.heads) > 1:
            logits = logits + (0.0 * self._idle_heads(task, outputs, attention_mask)).to(logits.dtype)
        return logits

    def _idle_heads(self, task: str, outputs, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sum of every other head's logits on the detached encoder outputs (eval mode: no dropout draws,
        so the random stream, and with it a run's dropout masks, stays that of the active head alone)."""
        pooled = getattr(outputs, "pooler_output", None)
        detached = SimpleNamespace(
            last_hidden_state=outputs.last_hidden_state.detach(),
            pooler_output=None if pooled is None else pooled.detach(),
        )
        total = outputs.last_hidden_state.new_zeros(())
        for name, head in self.heads.items():
            if name != task:
                head.train(False)
                try:  # a diverged head (inf or NaN) must not turn the active task's logits into NaN (0 x inf)
                    logits = head(detached, attention_mask).float().sum()
                    total = total + torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
                finally:
                    head.train(True)
        return total

    def task_model(self, task: str) -> nn.Module:
        """A stand-alone HF ``*ForSequenceClassification`` for ``task`` holding copies of the current weights."""
        head = self.heads[task]
        config = _task_config(self.encoder.config, head.num_outputs, head.labels)
        if head.dropout_rate is not None:  # as trained, for whoever fine-tunes the export further
            set_head_dropout(config, head.dropout_rate)
        # Its random initialisation, overwritten below, must not draw from the global CPU generator, which
        # draws the dropout masks of a CPU run: each best/ export mid-run moved every later mask, so that
        # eval.every changed the model trained, and a resume that kept a best/ of the lost steps was not the run.
        with torch.random.fork_rng(devices=[]):
            model = _classifier_model(config)
        base = getattr(model, model.base_model_prefix)
        wanted = base.state_dict().keys()
        # The classifier's base may lack parts of the encoder it does not use (RoBERTa's has no pooler).
        result = base.load_state_dict({k: v for k, v in self.encoder.state_dict().items() if k in wanted}, strict=False)
        if result.missing_keys:
            raise ValueError(f"{type(model).__name__}: the encoder lacks weights {result.missing_keys[:5]} for export")
        for part in head.parts:
            getattr(model, part).load_state_dict(getattr(head, part).state_dict())
        return model

    def export_task(self, task: str, directory: str | Path, tokenizer=None) -> None:
        """Save ``task`` as an HF ``*ForSequenceClassification`` directory (shared encoder + this head)."""
        model = self.task_model(task)
        model.save_pretrained(directory)
        if tokenizer is not None:
            save_tokenizer(tokenizer, directory, model.config)
