"""Frozen teachers: loading, precision, and feature extraction.

A teacher is any BERT-family encoder in a local Hugging Face directory. It runs outside the DeepSpeed
engine (ZeRO never partitions it), in eval mode, with no parameter requiring grad, under ``no_grad``.
``no_grad`` rather than ``inference_mode``: teacher outputs are targets in losses whose graph reaches
the student, and inference-mode tensors cannot be saved for backward.

Precision: fp16 by default on GPU. CPUs lack fast fp16 kernels, so an fp16 request on a CPU falls
back to fp32 with a logged warning (bf16 is kept when asked for explicitly).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dist_kd.config import doc
from dist_kd.data.encode import has_second_segment
from dist_kd.models.capture import ATTN_IMPLEMENTATION, EncoderFeatures, FeatureCapture, register_attention

logger = logging.getLogger(__name__)

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TeacherConfig:
    """The teacher model."""

    path: str = doc("local Hugging Face directory of the teacher encoder", "", path=True)
    dtype: str = doc("teacher precision: fp16 | bf16 | fp32 (fp16 falls back to fp32 on a CPU)", "fp16")

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"teacher.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to run a frozen model in on ``device``, with the CPU fallback for fp16."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    if device.type == "cpu" and name == "fp16":
        _note_cpu_fp16()
        return torch.float32
    return DTYPES[name]


@functools.cache
def _note_cpu_fp16() -> None:
    """Once per process: a precompute of 3 teachers, or a task run's teachers, said it once per model."""
    logger.info("fp16 teachers run in fp32 on a CPU (fp16 matmuls are slow or unsupported there)")


def check_model_dir(path: str | Path, what: str) -> Path:
    """Raise a clear error unless ``path`` is a Hugging Face model directory."""
    if not path:
        raise ValueError(f"{what} is not set; give a local Hugging Face model directory")
    path = Path(path)
    if path.exists() and not path.is_dir():  # a weights file given for its directory was said not to exist
        raise ValueError(f"{what} {path} is a file; give the Hugging Face model directory holding it ({path.parent})")
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} does not exist (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} {path} has no config.json; is it a Hugging Face model directory?")
    try:  # transformers' own error is a traceback naming no setting
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {path}: config.json is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what} {path}: config.json holds a {type(config).__name__}, not a model config")
    return path


# Architectures whose position ids start after the padding id (fairseq's layout): a RoBERTa with 514 position
# embeddings and padding id 1 takes 512 pieces, and one more is an index error deep inside the embedding.
PADDING_OFFSET_POSITIONS = (
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "roberta-prelayernorm", "data2vec-text",
)  # fmt: skip


def max_input_length(config) -> int | None:
    """The most pieces one input of a model with ``config`` can hold, or None when the config sets no limit."""
    limit = getattr(config, "max_position_embeddings", None)
    # DeBERTa with position_biased_input false (v3's layout) adds no absolute positions: its relative buckets
    # take inputs of any length.
    relative_only = getattr(config, "model_type", None) in ("deberta", "deberta-v2") and not getattr(
        config, "position_biased_input", True
    )
    if limit is None or relative_only:
        return None
    model_type = getattr(config, "model_type", None)
    if model_type == "mpnet":  # transformers' MPNet numbers positions from 2 whatever its pad_token_id
        limit -= 2
    elif model_type in PADDING_OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def check_max_length(config, max_length: int, model_dir: str | Path, flag: str) -> None:
    """Raise before any work when inputs of ``max_length`` pieces do not fit the model's position embeddings.

    Args:
        config: the model's config (``AutoConfig``).
        max_length: the truncation length asked for.
        model_dir: the model directory (named in the error).
        flag: the flag or config key that set ``max_length`` (named in the error).

    Raises:
        ValueError: naming the model directory, its ``max_position_embeddings`` and ``flag``.
    """
    limit = max_input_length(config)
    if limit is not None and max_length > limit:
        usable = "" if limit == config.max_position_embeddings else f" ({limit} usable for inputs)"
        raise ValueError(
            f"{flag} {max_length} exceeds the max_position_embeddings {config.max_position_embeddings}{usable} of "
            f"model {model_dir}; set {flag} to at most {limit}"
        )


@contextlib.contextmanager
def readable_weights(path: str | Path, what: str):
    """Loading a model's weights inside this block: a damaged weights file is a ValueError naming it.

    transformers passes a truncated or overwritten ``model.safetensors`` up as safetensors' own error
    ("Error while deserializing header: ..."), which names neither the file nor the config key.
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is a weights-file error
        name = type(err).__name__
        text = str(err).splitlines()[0] if str(err) else name
        if name not in ("SafetensorError", "UnpicklingError", "HeaderTooLarge") and not any(
            fragment in text for fragment in ("deserializ", "safetensors", "PytorchStreamReader", "invalid load key")
        ):
            raise
        files = sorted(p.name for p in Path(path).glob("*.safetensors")) + sorted(
            p.name for p in Path(path).glob("pytorch_model*.bin")
        )
        raise ValueError(
            f"{what} {path}: its weights ({', '.join(files) or 'no weights file'}) cannot be read ({name}: {text}); "
            "the file is damaged or was partly copied: copy or export it again"
        ) from None


_TIED_HEAD = re.compile(r"tied weights mapping .* to tie (\S+) to (\S+), but both are absent")


class _HeldLoadNotes(logging.Filter):
    """Holds back transformers' LOAD REPORT and its tied-weights notes during one load (see :func:`load_pretrained`)."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        if "LOAD REPORT" in text or _TIED_HEAD.search(text):
            self.held.append(record)
            return False
        return True


def _listed(keys: list[str], most: int = 3) -> str:
    return ", ".join(keys[:most]) + (f", ... ({len(keys)} in all)" if len(keys) > most else "")


def load_pretrained(auto_class, path: str | Path, what: str, new_head: bool = False, **kwargs):
    """``auto_class.from_pretrained(path, **kwargs)`` with dist_kd's own words for what the files lack.

    transformers logs a LOAD REPORT table (a multi-line warning in terminal colours) for every difference
    between the files and the model, the expected ones too: a fine-tuned classifier's head when only its
    encoder is loaded (the TinyBERT task recipe's teacher), the new head of a classifier about to be fine-tuned
    (every teacher of ``dist-kd finetune``), and, for a new masked-LM head, a note that its tied weights are
    "absent from the checkpoint". Here these are held back, and the differences that matter are said in one
    line each:

    - encoder weights missing from the files (they would start random): a warning naming them; the pooler
      alone (many sentence-embedding checkpoints ship none, and distillation never reads it) is an INFO line;
    - a head missing from the files of a model that needs its head (``new_head`` False): an error, as it would
      predict with random weights; a classifier's pooler (BERT's head reads it) counts as its head here;
    - weights the model does not use (the head of a classifier loaded as an encoder): a DEBUG line.

    Where transformers raises (weights of another shape than the config's), the held report is logged first,
    as transformers' error points to it. A tied-weights note about weights outside the head is logged as is.

    The weights load in fp32 unless ``dtype`` is given: transformers 5 keeps the dtype they were saved in, so a
    checkpoint stored in bf16 or fp16 (many shared ones are) became a half-precision student to train, or a
    classifier scored in half precision.

    Returns:
        ``(model, loading)``, ``loading`` as transformers' ``output_loading_info`` gives it.

    Raises:
        ValueError: the weights file is damaged (:func:`readable_weights`), or a head is missing as above.
    """
    kwargs.setdefault("dtype", torch.float32)
    held = _HeldLoadNotes()
    source = logging.getLogger("transformers.modeling_utils")
    source.addFilter(held)
    try:
        with readable_weights(path, what):
            model, loading = auto_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception:
        source.removeFilter(held)
        for record in held.held:
            source.handle(record)
        raise
    finally:
        source.removeFilter(held)
    prefix = getattr(model, "base_model_prefix", "")
    with_head = bool(prefix) and getattr(model, prefix, model) is not model

    def in_head(key: str) -> bool:
        if not with_head:
            return False
        # the base model's pooler is part of what a classifier reads, so a head model without it is headless
        return not key.startswith(f"{prefix}.") or (not new_head and key.startswith(f"{prefix}.pooler."))

    for record in held.held:
        tied = _TIED_HEAD.search(str(record.msg))
        if tied and not (new_head and all(in_head(key) for key in tied.groups())):
            source.handle(record)
    missing = sorted(loading["missing_keys"])
    head = [key for key in missing if in_head(key)]
    encoder = [key for key in missing if not in_head(key)]
    if head and not new_head:
        raise ValueError(
            f"{what} {path}: its weights hold no trained head ({_listed(head)} missing), so it would predict "
            f"with random weights; give a fine-tuned {type(model).__name__} directory"
        )
    reshaped = sorted(entry[0] for entry in loading["mismatched_keys"] if not in_head(entry[0]))
    if reshaped:  # ignore_mismatched_sizes (finetune) left them random
        logger.warning(
            "%s %s: %d weights of %s have another shape in its files than its config.json gives and start random "
            "(%s)", what, path, len(reshaped), type(model).__name__, _listed(reshaped),
        )  # fmt: skip
    pooler = [key for key in encoder if ".pooler." in f".{key}"]
    if pooler and len(pooler) == len(encoder):
        logger.info("%s %s has no pooler weights (%s): its pooler starts random", what, path, _listed(pooler))
    elif encoder:
        logger.warning(
            "%s %s: %d weights of %s are not in its files and start random (%s); is it a checkpoint of this "
            "architecture?", what, path, len(encoder), type(model).__name__, _listed(encoder),
        )  # fmt: skip
    unused = sorted(loading["unexpected_keys"])
    # Weights of a module missing inside one the encoder has (a layer's distance_embedding), not of a head (a
    # classifier's, cls.predictions, or bert-base's NSP head cls.seq_relationship beside the masked-LM's cls): the
    # checkpoint's architecture holds something this transformers release does not build, and it runs without it.
    base = f"{prefix}." if with_head else ""
    inside = [
        key for key in unused
        if key.startswith(base) and key.count(".") >= 2 and _has_module(model, key.rsplit(".", 2)[0])
    ]  # fmt: skip
    relative = getattr(model.config, "position_embedding_type", "absolute")
    if isinstance(relative, str) and relative.startswith("relative") and inside:
        raise ValueError(
            f"{what} {path}: its config.json says position_embedding_type {relative!r}, which this transformers "
            f"release ({_transformers_version()}) does not build: {type(model).__name__} would run with absolute "
            f"positions alone, without its files' {_listed(inside)}; use a checkpoint with absolute positions"
        )
    if inside:
        logger.warning(
            "%s %s: %d weights in its files belong inside %s's layers but it has no place for them (%s): it runs "
            "without them; is it a checkpoint of this architecture and transformers release?",
            what, path, len(inside), type(model).__name__, _listed(inside),
        )  # fmt: skip
    if unused:
        logger.debug("%s %s: weights not used by %s: %s", what, path, type(model).__name__, _listed(unused))
    return model, loading


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _transformers_version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def load_frozen(model: nn.Module) -> nn.Module:
    """Put a model in eval mode with every parameter frozen."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


class Teacher:
    """A frozen teacher encoder with feature capture for the mapped layers.

    Args:
        path: local HF directory.
        dtype: ``fp16`` | ``bf16`` | ``fp32``.
        device: where to run it.
        score_layers: 1-based layers whose raw attention scores are captured (the mapped layers).
        qkv_layers: 1-based layers whose attention inputs are captured (``distill.attention: relations``).
        max_layer: drop the layers above this one (general distillation never reads them); None keeps all.
        model_class: the transformers auto class to load with (``AutoModel`` for an encoder,
            ``AutoModelForSequenceClassification`` to also get logits).
        flag: how the user names ``path``, for messages.
    """

    def __init__(
        self,
        path: str | Path,
        dtype: str = "fp16",
        device: torch.device | str = "cpu",
        score_layers: list[int] | None = None,
        max_layer: int | None = None,
        qkv_layers: list[int] | None = None,
        model_class: str = "AutoModel",
        flag: str = "teacher.path",
    ):
        import transformers
        from transformers import AutoConfig

        from dist_kd.models.capture import check_encoder_config, truncate_layers

        self.path = check_model_dir(path, flag)
        check_encoder_config(AutoConfig.from_pretrained(self.path), f"{flag} {path}")  # before its weights load
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        register_attention()
        auto = getattr(transformers, model_class)
        model, _ = load_pretrained(auto, self.path, flag, attn_implementation=ATTN_IMPLEMENTATION, dtype=self.dtype)
        self.config = model.config
        # A teacher with one segment embedding (type_vocab_size 1, or 0) reads every text as segment 0, as it was
        # trained; a BERT tokenizer's segment 1 on a pair's second text would index past it.
        self.takes_segments = has_second_segment(model.config)
        self.num_layers = model.config.num_hidden_layers
        self.num_heads = model.config.num_attention_heads
        self.hidden_size = model.config.hidden_size
        if max_layer is not None:
            if not 1 <= max_layer <= self.num_layers:
                raise ValueError(f"max_layer {max_layer} outside 1..{self.num_layers} for teacher {self.path}")
            truncate_layers(model, max_layer)
        self.model = load_frozen(model.to(self.device))
        self.encoder = self.model.base_model if model_class != "AutoModel" else self.model
        self.capture = FeatureCapture(self.encoder, list(score_layers or []), list(qkv_layers or []))

    @torch.no_grad()
    def features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderFeatures:
        """Embedding output, hidden states and the captured raw attention scores of one batch."""
        types = token_type_ids if self.takes_segments else None
        return self.capture(
            input_ids.to(self.device),
            None if attention_mask is None else attention_mask.to(self.device),
            token_type_ids=None if types is None else types.to(self.device),
        )

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
        """Classification logits (needs ``model_class="AutoModelForSequenceClassification"``)."""
        if not self.takes_segments:
            kwargs.pop("token_type_ids", None)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
