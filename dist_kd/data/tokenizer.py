"""Tokenizer identity: loading the teacher's fast tokenizer, and a fingerprint that says whether two are the same.

The fingerprint is a sha256 over the vocabulary, the special tokens and the normaliser settings
(lower-casing, accents), not over file bytes or paths, so the same tokenizer saved to two directories matches
and a different one does not. Corpus manifests, soft-target stores and checkpoints record it; every stage that
reads token ids compares it with its teacher's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# Files that hold a vocabulary for the tokenizers this project meets: a fast tokenizer's tokenizer.json,
# WordPiece (BERT, MPNet, ELECTRA), sentencepiece (ALBERT/T5 spiece, XLM-R sentencepiece.bpe, DeBERTa-v2/v3 spm,
# Llama-style tokenizer.model) and byte-level BPE (RoBERTa: vocab.json with merges.txt). Without one,
# transformers builds a tokenizer holding only the special tokens and every word becomes [UNK].
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
    "tokenizer.model",
)
BPE_FILES = ("vocab.json", "merges.txt")


def check_tokenizer_dir(path: str | os.PathLike) -> Path:
    """Raise a clear error unless ``path`` is a directory holding a tokenizer vocabulary file.

    Args:
        path: the directory to check.

    Returns:
        The directory as a ``Path``.

    Raises:
        FileNotFoundError: when ``path`` does not exist, is not a directory, or has no vocabulary file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer path {path} is a file, not a directory; give the directory that holds it ({path.parent})"
        )
    if not any((path / name).is_file() for name in VOCABULARY_FILES) and not all(
        (path / name).is_file() for name in BPE_FILES
    ):
        raise FileNotFoundError(
            f"tokenizer directory {path} has no vocabulary file (one of {', '.join(VOCABULARY_FILES)}, or "
            f"{' + '.join(BPE_FILES)}); save the tokenizer with the model: tokenizer.save_pretrained('{path}')"
        )
    return path


def load_tokenizer(path: str | os.PathLike):
    """Load a fast (Rust) Hugging Face tokenizer from a local directory, or raise a clear error.

    Never contacts the Hugging Face Hub: ``path`` must be a local directory with a vocabulary file.

    Args:
        path: a directory with a tokenizer (a teacher's HF directory works).

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: when ``path`` does not exist, is not a directory or holds no vocabulary file.
        ValueError: when the tokenizer is not a fast one (slow tokenizers are orders of magnitude slower), or
            its vocabulary holds nothing but special tokens.
    """
    from transformers import AutoTokenizer

    path = check_tokenizer_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - said with the directory: the bare error names no file
        # A file that does not parse: JSON's error, a missing key, or the tokenizers library's own (a bare
        # Exception). Anything else (a library the tokenizer needs, such as sentencepiece) is said as it is.
        parse = isinstance(err, json.JSONDecodeError | KeyError) or type(err) is Exception
        files = ", ".join(name for name in (*VOCABULARY_FILES, "tokenizer_config.json") if (path / name).is_file())
        advice = f"; its files ({files}) may be damaged: save the model's tokenizer there again" if parse else ""
        raise ValueError(f"tokenizer in {path} does not load ({type(err).__name__}: {err}){advice}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer in {path} is not a fast tokenizer (found {type(tokenizer).__name__})")
    special = set(tokenizer.all_special_tokens)
    if not any(token not in special for token in tokenizer.get_vocab()):
        raise ValueError(
            f"tokenizer in {path} has only its {len(tokenizer)} special tokens, no vocabulary; "
            f"save the model's real tokenizer there: tokenizer.save_pretrained('{path}')"
        )
    _check_embedding_rows(tokenizer, path)
    # The truncation and padding its tokenizer.json ships with; save_tokenizer writes them back, not whatever a
    # call left in the backend.
    backend = tokenizer.backend_tokenizer
    tokenizer._dist_kd_shipped = (backend.truncation, backend.padding)
    return tokenizer


SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def require_special_tokens(tokenizer, path: str | os.PathLike, roles: tuple[str, ...], what: str) -> None:
    """Raise a clear error unless ``tokenizer`` has a token for each role (``"cls"``, ``"sep"``, ``"pad"``,
    ``"mask"``).

    A directory holding tokenizer.json alone loads, but nothing there says which of its tokens is [CLS] or
    [MASK] (tokenizer_config.json and special_tokens_map.json do), so every role is missing: the error then
    names those files rather than blaming the tokenizer's kind.

    Args:
        tokenizer: a tokenizer from :func:`load_tokenizer`.
        path: the directory it was loaded from, for the message.
        roles: the special tokens the caller needs.
        what: how the message names the tokenizer, e.g. ``"tokenizer data/teacher"``.

    Raises:
        ValueError: naming the missing roles and what to do.
    """
    missing = [role for role in roles if getattr(tokenizer, f"{role}_token_id") is None]
    if not missing:
        return
    said = " and ".join(f"{role} token" for role in missing)
    path = Path(path)
    if not any((path / name).is_file() for name in SPECIAL_TOKEN_FILES):
        raise ValueError(
            f"{what} has no {said}: {path} holds no {' or '.join(SPECIAL_TOKEN_FILES)}, which name the special "
            f"tokens; save the whole tokenizer there: tokenizer.save_pretrained('{path}')"
        )
    raise ValueError(f"{what} has no {said} (expected a BERT-style tokenizer)")


def save_tokenizer(tokenizer, directory: str | os.PathLike, model_config=None) -> None:
    """``tokenizer.save_pretrained(directory)`` as the tokenizer was loaded (:func:`load_tokenizer`): with the
    truncation and padding its files shipped with, not those its last call left in the Rust backend
    (``tokenizer.json`` then cut every input to the run's ``max_length`` for anyone reading it with the
    tokenizers library), and without the load options (``local_files_only``) that transformers writes into
    ``tokenizer_config.json``. transformers sets the backend's truncation and padding again on every call, so
    the live tokenizer is unchanged.

    ``model_config``: the config of the model saved beside it; a ``model_max_length`` beyond what its position
    embeddings hold (a student of fewer positions than its teacher) is saved as that limit, so that
    ``tokenizer(text, truncation=True)`` gives inputs the model takes."""
    from dist_kd.models.teacher import max_input_length

    limit = None if model_config is None else max_input_length(model_config)
    shipped_length = tokenizer.model_max_length
    if limit is not None and shipped_length > limit:
        tokenizer.model_max_length = limit
        tokenizer.init_kwargs["model_max_length"] = limit
    else:
        limit = None
    try:
        _save_as_loaded(tokenizer, directory)
    finally:
        if limit is not None:
            tokenizer.model_max_length = shipped_length
            tokenizer.init_kwargs["model_max_length"] = shipped_length


def _save_as_loaded(tokenizer, directory: str | os.PathLike) -> None:
    backend = tokenizer.backend_tokenizer
    truncation, padding = getattr(tokenizer, "_dist_kd_shipped", (None, None))
    backend.no_truncation()
    backend.no_padding()
    if truncation:
        backend.enable_truncation(**truncation)
    if padding:
        backend.enable_padding(**padding)
    dropped = {key: tokenizer.init_kwargs.pop(key) for key in LOAD_OPTIONS if key in tokenizer.init_kwargs}
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.init_kwargs.update(dropped)


# What AutoTokenizer.from_pretrained(..., local_files_only=True) adds to a tokenizer's init kwargs.
LOAD_OPTIONS = ("local_files_only", "is_local")


def _check_embedding_rows(tokenizer, path: Path) -> None:
    """Raise if the model in ``path`` (its config.json) has fewer embedding rows than the tokenizer has ids: the
    first text with a piece past them is an IndexError deep in the embedding, in every command."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return  # a tokenizer-only directory (or a damaged config, which loading the model names)
    vocab_size = config.get("vocab_size") if isinstance(config, dict) else None
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ValueError(
            f"{path}: its tokenizer has {len(tokenizer)} ids but the model's embeddings only {vocab_size} rows "
            "(config.json vocab_size): the tokenizer is not the model's. Save the model's own tokenizer there, or "
            "resize the embeddings (model.resize_token_embeddings(len(tokenizer))) and save the model"
        )


def _normalizer_settings(tokenizer) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        return {"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer")}
    # Only fast tokenizers reach here in practice; the flag keeps slow ones comparable among themselves.
    return {"do_lower_case": getattr(tokenizer, "do_lower_case", None)}


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Identity of a tokenizer for the manifest: ``{name_or_path, vocab_size, sha256}``.

    The sha256 covers what decides the token ids (vocabulary with ids, special tokens, normaliser and
    pre-tokeniser settings), not file bytes or paths, so it is stable across directories and re-saves.

    Args:
        tokenizer: a Hugging Face tokenizer.

    Returns:
        A JSON-ready dict.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    payload = {
        "vocab": vocab,
        "special_tokens": sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items()),
        "settings": _normalizer_settings(tokenizer),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=True).encode()).hexdigest()
    return {"name_or_path": str(tokenizer.name_or_path), "vocab_size": len(tokenizer), "sha256": digest}


def check_tokenizer_matches(
    manifest_tokenizer: dict[str, Any], teacher_tokenizer: Any, shards_dir: str | os.PathLike
) -> None:
    """Raise if the corpus was tokenised with another tokenizer than the teacher's.

    Token ids from another vocabulary would train silently on garbage, so this runs before any step.

    Args:
        manifest_tokenizer: the manifest's ``tokenizer`` entry.
        teacher_tokenizer: the teacher's tokenizer, or a directory to load it from.
        shards_dir: the corpus directory (named in the error).

    Raises:
        ValueError: on a mismatch, naming both tokenizers and their fingerprints.
    """
    if isinstance(teacher_tokenizer, str | os.PathLike):
        teacher_tokenizer = load_tokenizer(teacher_tokenizer)
    teacher = tokenizer_fingerprint(teacher_tokenizer)
    if manifest_tokenizer.get("sha256") != teacher["sha256"]:
        raise ValueError(
            f"corpus {shards_dir} was tokenized with {manifest_tokenizer.get('name_or_path')} "
            f"(sha256 {str(manifest_tokenizer.get('sha256'))[:16]}, "
            f"vocab_size {manifest_tokenizer.get('vocab_size')}), "
            f"teacher uses {teacher['name_or_path']} (sha256 {teacher['sha256'][:16]}, "
            f"vocab_size {teacher['vocab_size']}); re-run launch/prepare_corpus.py with --tokenizer set to the "
            "teacher's directory"
        )
