"""Feature capture: embedding output, hidden states and raw attention scores of chosen layers.

TinyBERT's attention loss compares *unnormalized* scores QK^T / sqrt(d_head), before the mask and the
softmax. No stock attention implementation returns them: SDPA returns nothing, and ``eager`` with
``output_attentions`` returns softmax probabilities. transformers (>= 5) dispatches attention through a
registry keyed by ``config._attn_implementation``; dist_kd registers one more entry, ``dist_kd``, which

- in layers marked for capture computes the scores explicitly, hands them to the capture, and
  finishes attention itself (mask + fp32 softmax + dropout + weighted sum, as eager does);
- in every other layer defers to SDPA, so unmapped layers never materialise an L x L matrix, except in
  training with dropout on a CPU, where the explicit path with dist_kd's cheaper dropout mask is faster
  than SDPA's (``models/dropout.py``).

Layers are marked by setting attributes on the modules of each transformer layer, so the mechanism is
independent of the architecture's attribute names: any encoder whose attention goes through the registry
(BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, ModernBERT, ...) works. An encoder whose attention never calls
the registry is rejected at load time with a clear error rather than silently returning no scores, unless
an adapter reads it (``adapters.py``: MPNet and DeBERTa-v2/v3, whose attention adds position terms in
their own code). A captured layer that attends within a sliding window (ModernBERT's local layers) also
hands over its mask, so that the attention loss leaves out the pairs outside the window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ATTN_IMPLEMENTATION = "dist_kd"
_LAYER_ATTR = "_dist_kd_layer"
_SINK_ATTR = "_dist_kd_sink"
_QKV_ATTR = "_dist_kd_qkv"
_MASK_ATTR = "_dist_kd_mask_sink"


@dataclass
class EncoderFeatures:
    """What the distillation losses read from one forward pass.

    Attributes:
        embeddings: ``(B, L, D)`` embedding output (``hidden_states[0]``).
        hidden: 1-based layer index -> ``(B, L, D)`` output of that transformer layer.
        scores: 1-based layer index -> ``(B, H, L, L)`` raw attention scores of that layer.
        qkv: 1-based layer index -> ``(query, key, value)``, each ``(B, H, L, d_head)``, as the layer's
            attention received them (for the relation loss, ``distill.attention: relations``).
        score_masks: 1-based layer index -> ``(B, 1, L, L)`` boolean, the (query, key) pairs its softmax
            sees, for the captured layers that see fewer than every real pair: ModernBERT's sliding-window
            layers. Their scores outside the window are never used, so the attention loss leaves them out
            as it leaves out padding.
        last_hidden: ``(B, L, D)`` output of the last layer that ran.
    """

    embeddings: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    score_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    last_hidden: torch.Tensor | None = None


def _capture_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from dist_kd.models.adapters import deliver, masked_softmax
    from dist_kd.models.dropout import applies as fast_dropout_applies
    from dist_kd.models.dropout import dropout as fast_dropout

    captured = getattr(module, _SINK_ATTR, None) is not None
    # SDPA draws its dropout mask element by element; on a CPU the explicit path with dist_kd's cheaper mask
    # (models/dropout.py) is faster in training.
    cpu_dropout = fast_dropout_applies(query, dropout, module.training)
    if not captured and not cpu_dropout:
        deliver(module, None, (query, key, value))
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    # (Q * s) K^T: the scaling on the (B, H, L, d) query, not on the (B, H, L, L) scores (L > d in practice).
    scores_BHLL = torch.matmul(query * scaling, key.transpose(-1, -2))
    deliver(module, scores_BHLL if captured else None, (query, key, value))
    if captured and kwargs.get("sliding_window") is not None and attention_mask is not None:
        # a sliding-window layer: its boolean mask (SDPA's format, registered below) holds the window
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        getattr(module, _MASK_ATTR)[getattr(module, _LAYER_ATTR)] = allowed
    # finfo.min rather than -inf: a fully padded query row must give a finite softmax, as SDPA does.
    probs = masked_softmax(scores_BHLL.float(), attention_mask, torch.finfo(torch.float32).min).to(value.dtype)
    probs = fast_dropout(probs, dropout, module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, None


def register_attention() -> None:
    """Register the ``dist_kd`` attention function and its mask format (SDPA's boolean masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


SUPPORTED_ENCODERS = (
    "dist_kd supports BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, ModernBERT, MPNet and DeBERTa-v2/v3 (docs/encoders.md)"
)


def check_encoder_config(config, key: str) -> None:
    """Refuse a model whose config lacks what a transformer encoder of a supported family has (FNet has no
    attention heads, Funnel's depth cannot be set): its fields were read, and failed, as a traceback.

    Args:
        key: the config key naming the model (``teacher.path``), for the message.

    Raises:
        ValueError: naming the model, what it lacks and the supported families.
    """
    if getattr(config, "is_encoder_decoder", False):  # T5 (sentence-T5, GTR): its encoder alone ran without inputs
        raise ValueError(
            f"{key}: a {type(config).__name__} ({config.model_type}) is an encoder-decoder, not an encoder: "
            f"{SUPPORTED_ENCODERS}"
        )
    missing = [name for name in ("num_hidden_layers", "hidden_size", "num_attention_heads") if not _has(config, name)]
    if missing:
        raise ValueError(
            f"{key}: a {type(config).__name__} ({config.model_type}) has no {', '.join(missing)}: {SUPPORTED_ENCODERS}"
        )


def _has(config, name: str) -> bool:
    try:
        return isinstance(getattr(config, name), int)
    except (AttributeError, NotImplementedError):  # Funnel's num_hidden_layers is a property that may not be read
        return False


def find_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """Locate the encoder's list of transformer layers (``encoder.layer`` in BERT, ``layers`` elsewhere).

    Returns:
        ``(parent module, attribute name, the ModuleList)``.

    Raises:
        ValueError: no ModuleList with ``config.num_hidden_layers`` entries was found.
    """
    num_layers = model.config.num_hidden_layers
    for _name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers and child_name in ("layer", "layers"):
                return module, child_name, child
    raise ValueError(
        f"{type(model).__name__}: found no list of {num_layers} transformer layers named 'layer' or 'layers'; "
        f"{SUPPORTED_ENCODERS}"
    )


class AttentionNotRouted(RuntimeError):
    """The model's attention did not go through the dist_kd implementation: its scores cannot be captured."""


class FeatureCapture:
    """Marks layers of a model for capture and collects their features on each forward pass.

    Args:
        model: an HF encoder loaded with ``attn_implementation="dist_kd"``.
        score_layers: 1-based layers whose raw attention scores are captured.
        qkv_layers: 1-based layers whose attention inputs (query, key, value) are captured.
    """

    def __init__(self, model: nn.Module, score_layers: list[int], qkv_layers: list[int] | None = None):
        self.model = model
        self.sink: dict[int, torch.Tensor] = {}
        self.qkv_sink: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.mask_sink: dict[int, torch.Tensor] = {}
        from dist_kd.models.adapters import install_adapter

        qkv_layers = list(qkv_layers or [])
        install_adapter(model)
        _, _, layers = find_layer_list(model)
        for index, layer in enumerate(layers, start=1):
            for module in layer.modules():
                setattr(module, _LAYER_ATTR, index)
                for attr, wanted, sink in (
                    (_SINK_ATTR, score_layers, self.sink),
                    (_QKV_ATTR, qkv_layers, self.qkv_sink),
                    (_MASK_ATTR, score_layers, self.mask_sink),
                ):
                    if index in wanted:
                        setattr(module, attr, sink)
                    elif hasattr(module, attr):
                        delattr(module, attr)
        self.score_layers = sorted(set(score_layers))
        self.qkv_layers = sorted(set(qkv_layers))
        self.num_layers = len(layers)
        self._check_routing()

    def _check_routing(self) -> None:
        """One forward pass of a short batch in eval mode (no dropout draws), so that an architecture whose
        attention dist_kd cannot read is refused while the run sets up, in one line, not with a traceback at its
        first step."""
        if not (self.score_layers or self.qkv_layers):
            return
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        ids = torch.arange(1, 5, device=device).unsqueeze(0) % max(int(self.model.config.vocab_size), 1)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                self(ids, torch.ones_like(ids))
        except AttentionNotRouted as err:
            raise ValueError(str(err)) from None
        finally:
            self.model.train(was_training)
            self.sink.clear()
            self.qkv_sink.clear()
            self.mask_sink.clear()

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        hidden_layers: list[int] | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderFeatures:
        """Run the encoder and return its features.

        Args:
            input_ids: ``(B, L)``.
            attention_mask: ``(B, L)`` or None.
            hidden_layers: 1-based layers whose outputs are kept (default: all that ran).
            token_type_ids: ``(B, L)`` segment ids of sentence pairs (None: the model's default, all 0).
        """
        self.sink.clear()
        self.qkv_sink.clear()
        self.mask_sink.clear()
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, return_dict=True, **extra
        )
        states = outputs.hidden_states
        missing = [n for n in self.score_layers if n not in self.sink]
        missing += [n for n in self.qkv_layers if n not in self.qkv_sink and n not in missing]
        if missing:
            raise AttentionNotRouted(
                f"{type(self.model).__name__} did not route attention through the '{ATTN_IMPLEMENTATION}' "
                f"implementation for layers {missing}; its raw attention scores or inputs cannot be captured: "
                f"{SUPPORTED_ENCODERS}"
            )
        wanted = hidden_layers if hidden_layers is not None else range(1, len(states))
        features = EncoderFeatures(
            embeddings=states[0],
            hidden={n: states[n] for n in wanted},
            scores=dict(self.sink),
            qkv=dict(self.qkv_sink),
            score_masks=dict(self.mask_sink),
            last_hidden=states[-1],
        )
        self.sink.clear()
        self.qkv_sink.clear()
        self.mask_sink.clear()
        return features


def truncate_layers(model: nn.Module, num_layers: int) -> None:
    """Drop the transformer layers above ``num_layers``: general distillation never reads them.

    Every state the cut model gives is the full model's at the same index. A family whose last hidden state is
    its final norm's output (ModernBERT: ``tie_last_hidden_states``) would otherwise give layer ``num_layers``
    normed, once it is the last, and a layer map ending below the top would hold the student to another target.
    """
    parent, name, layers = find_layer_list(model)
    if num_layers < len(layers):
        setattr(parent, name, nn.ModuleList(list(layers)[:num_layers]))
        model.config.num_hidden_layers = num_layers
        model.config.tie_last_hidden_states = False  # unset means the family's default (ModernBERT's: tied)
