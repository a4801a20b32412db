"""Tiny models, tokenizers and text for tests, benchmarks and debugging.

Everything here is built from configs in a few milliseconds and saved to a directory in the same layout
as a real Hugging Face checkpoint, so tests exercise the same loading code users run. The vocabulary
holds whole words and ``##`` continuation pieces, so some words tokenize to one piece and others to
several (augmentation treats the two differently).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

WORDS = (
    "the a an and or but of to in on at for with from by as is are was were be been it this that these those "
    "he she they we you i his her their our my your its not no yes all some many few more most other such "
    "one two three four five six seven eight nine ten first last new old good bad great small large long short "
    "high low big little early late young day night year time week month world city country house home school "
    "work game team player match goal season club music film book story news report market price bank company "
    "government minister party election vote law court police people man woman child family friend life health "
    "water food money business trade oil energy power car road train plane phone computer software internet data "
    "said says told asked made make take took give gave get got go went come came see saw know knew think thought "
    "find found show showed play played win won lose lost run ran buy sold rise fell grow grew start started end "
    "happy sad love hate like want need help try call keep hold turn move live believe bring happen write read"
).split()

PIECES = "##s ##ed ##ing ##er ##ly ##est ##ness ##ment ##tion ##al ##ful ##less ##able ##ize ##ous".split()
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")


def tiny_vocab() -> list[str]:
    """The tiny WordPiece vocabulary: specials, whole words, continuation pieces, single characters."""
    tokens = SPECIAL_TOKENS + WORDS + PIECES + CHARS + [f"##{c}" for c in CHARS if c.isalnum()]
    return list(dict.fromkeys(tokens))  # first occurrence wins: ids stay stable, no duplicate entries


def build_tiny_tokenizer(directory: str | Path):
    """Write a BERT WordPiece fast tokenizer over ``tiny_vocab()`` to ``directory`` and return it."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tiny_vocab())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_bert_config(
    num_layers: int = 4,
    hidden_size: int = 32,
    num_heads: int = 4,
    intermediate_size: int = 64,
    vocab_size: int | None = None,
    max_position_embeddings: int = 128,
    initializer_range: float = 0.02,
    type_vocab_size: int = 2,
):
    """A BertConfig small enough to train on a CPU in seconds.

    ``initializer_range`` 0.1 (BERT's is 0.02) makes a model this small train from scratch quickly and
    reliably; at 0.02 it often sits on a plateau for epochs.
    """
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size or len(tiny_vocab()),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=initializer_range,
        type_vocab_size=type_vocab_size,
    )


def build_tiny_bert(directory: str | Path, seed: int = 0, model_class: str = "BertModel", **config_kwargs) -> Path:
    """Save a randomly initialised tiny BERT (``model_class`` from transformers) and its tokenizer.

    Args:
        directory: where to save the HF directory.
        seed: torch seed for the weights.
        model_class: e.g. ``BertModel``, ``BertForMaskedLM``, ``BertForSequenceClassification``.
        **config_kwargs: passed to ``tiny_bert_config`` (and ``num_labels`` etc. set on the config).

    Returns:
        The directory.
    """
    import torch
    import transformers

    directory = Path(directory)
    extra = {k: config_kwargs.pop(k) for k in list(config_kwargs) if k in ("num_labels", "id2label", "label2id")}
    config = tiny_bert_config(**config_kwargs)
    for key, value in extra.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    model.save_pretrained(directory)
    build_tiny_tokenizer(directory)
    return directory


def build_tiny_encoder(
    directory: str | Path,
    arch: str = "roberta",
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_heads: int = 4,
    **overrides,
) -> Path:
    """Save a tiny encoder of another architecture than BERT, with the tiny BERT WordPiece tokenizer.

    Args:
        arch: ``roberta``; ``mpnet`` (relative position bias in attention); ``deberta-v2`` (DeBERTa-v3's
            layout: disentangled attention with c2p and p2c, shared position keys, log-bucketed positions);
            ``deberta-v2-unshared`` (DeBERTa-v2's separate position projections, no buckets); ``electra``
            (embeddings a quarter of the hidden width, projected up); ``distilbert``; ``modernbert`` (pre-LN, rotary
            positions, fused Wqkv, a gated MLP, no biases; every second layer a sliding window of 8 tokens).
        **overrides: set on the config after the defaults.
    """
    import torch
    import transformers

    common = dict(
        vocab_size=len(tiny_vocab()),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    deberta = dict(
        max_position_embeddings=128,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
    )
    ids = dict(pad_token_id=0, cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3)
    own_names = {  # the families that do not take BERT's config names
        "distilbert": dict(
            vocab_size=common["vocab_size"], dim=hidden_size, n_layers=num_layers, n_heads=num_heads,
            hidden_dim=2 * hidden_size, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
            pad_token_id=0,
        ),
        "modernbert": dict(
            vocab_size=common["vocab_size"], hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, intermediate_size=2 * hidden_size, max_position_embeddings=128,
            global_attn_every_n_layers=2, local_attention=8, attention_dropout=0.0, mlp_dropout=0.0,
            embedding_dropout=0.0, **ids,
        ),
    }  # fmt: skip
    if arch in own_names:
        common = own_names[arch]
    configs = {
        "roberta": ("RobertaConfig", "RobertaModel", dict(max_position_embeddings=132)),
        "electra": ("ElectraConfig", "ElectraModel", dict(embedding_size=hidden_size // 4)),
        "distilbert": ("DistilBertConfig", "DistilBertModel", {}),
        "modernbert": ("ModernBertConfig", "ModernBertModel", {}),
        "mpnet": ("MPNetConfig", "MPNetModel", dict(max_position_embeddings=132, relative_attention_num_buckets=32)),
        "deberta-v2": (
            "DebertaV2Config",
            "DebertaV2Model",
            dict(deberta, position_buckets=16, share_att_key=True, norm_rel_ebd="layer_norm"),
        ),
        "deberta-v2-unshared": (
            "DebertaV2Config",
            "DebertaV2Model",
            dict(deberta, position_buckets=-1, max_relative_positions=24, share_att_key=False),
        ),
    }
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {sorted(configs)}")
    config_name, model_name, specific = configs[arch]
    config = getattr(transformers, config_name)(**{**common, **specific, **overrides})
    directory = Path(directory)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # tiny random models: make the position terms as large as the content ones
        for name, param in model.named_parameters():
            if "relative_attention_bias" in name or "rel_embeddings" in name:
                param.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    build_tiny_tokenizer(directory)
    return directory


def build_tiny_roberta(directory: str | Path, seed: int = 0, num_layers: int = 2, hidden_size: int = 32) -> Path:
    """Save a tiny RoBERTa encoder (a second architecture) with a BERT WordPiece tokenizer."""
    return build_tiny_encoder(directory, "roberta", seed=seed, num_layers=num_layers, hidden_size=hidden_size)


def reorder_classifier_outputs(model_dir: str | Path, directory: str | Path, perm: list[int]) -> Path:
    """A copy of an HF sequence classifier with its outputs permuted: output ``j`` is the original's class
    ``perm[j]`` (head weights and ``id2label``), as a head trained with the classes in another order is."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(model_dir, directory)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    head = getattr(model.classifier, "out_proj", model.classifier)  # RoBERTa's head ends in out_proj
    with torch.no_grad():
        head.weight.copy_(head.weight[perm].clone())
        head.bias.copy_(head.bias[perm].clone())
    names = [model.config.id2label[index] for index in perm]
    model.config.id2label, model.config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    model.save_pretrained(directory)
    return Path(directory)


def fail_on_rank(function, error: Exception, rank: str = "1"):
    """``function``, raising ``error`` instead on the rank whose ``RANK`` variable is ``rank`` (distributed tests:
    an input missing on one node, a failure of one rank alone)."""

    def patched(*args, **kwargs):
        if os.environ.get("RANK") == rank:
            raise error
        return function(*args, **kwargs)

    return patched


def random_sentences(num: int, seed: int = 0, min_words: int = 3, max_words: int = 20) -> list[str]:
    """Deterministic pseudo-English sentences over the tiny vocabulary (plus a few multi-piece words)."""
    rng = random.Random(seed)
    extra = ["played", "goals", "markets", "quickly", "happiness", "xyzzy"]
    out = []
    for _ in range(num):
        n = rng.randint(min_words, max_words)
        out.append(" ".join(rng.choice(WORDS + extra) for _ in range(n)) + ".")
    return out


# A learnable synthetic topic task: each sentence carries keywords of its class among filler words.
TOPIC_KEYWORDS = {
    "sport": ["game", "team", "player", "match", "goal", "season", "club", "win"],
    "business": ["market", "price", "bank", "company", "trade", "oil", "money", "sold"],
    "politics": ["government", "minister", "party", "election", "vote", "law", "court", "police"],
}


def topic_examples(num: int, seed: int = 0, num_keywords: int = 2) -> list[dict[str, str]]:
    """``{"text": ..., "label": ...}`` rows of a 3-class topic task a tiny model learns in seconds.

    A sentence is 5-12 filler words with ``num_keywords`` words of its class mixed in, so the label is a
    function of the text and the attainable accuracy is 1.
    """
    rng = random.Random(seed)
    keywords = {word for words in TOPIC_KEYWORDS.values() for word in words}
    filler = [word for word in WORDS if word not in keywords]
    labels = sorted(TOPIC_KEYWORDS)
    rows = []
    for _ in range(num):
        label = rng.choice(labels)
        words = [rng.choice(filler) for _ in range(rng.randint(5, 12))]
        words += [rng.choice(TOPIC_KEYWORDS[label]) for _ in range(num_keywords)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words) + ".", "label": label})
    return rows


def run_process_group(
    command: list[str], timeout: float, popen=subprocess.Popen, **popen_kwargs
) -> subprocess.CompletedProcess:
    """Run ``command`` in a process group of its own (text output captured) and kill the whole group when it
    ends or after ``timeout`` seconds, so none of its children (a launcher's ranks) outlive it and hold a
    port or a device; those that left the group (a nested run's own, in a session of its own) too, so none
    keeps the output open either. ``returncode`` is None when the timeout stopped it (with what it wrote by
    then). ``popen``: what starts it (the tests pass one that forks the test process where it can)."""
    from dist_kd.io import descendants

    proc = popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                 **popen_kwargs)  # fmt: skip
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out, stdout, stderr = True, "", ""
    finally:
        below = descendants(proc.pid)  # before the kill: the orphans' parent becomes another process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    if timed_out:
        with contextlib.suppress(subprocess.TimeoutExpired):
            stdout, stderr = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(command, None if timed_out else proc.returncode, stdout or "", stderr or "")
