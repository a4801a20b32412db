"""Carry a sentence-transformers teacher's modules (pooling, normalisation) over to its student.

A sentence-transformers directory is a Hugging Face model plus ``modules.json``, which lists the modules
applied after the encoder (``Pooling``, ``Normalize``, ``Dense``...) and where their configs live. A student
exported without them loads in ``SentenceTransformer(dir)`` with a default pooling and no normalisation, so
its embeddings are not the teacher's kind. The files are copied as they are, except ``Pooling``'s input
width, set to the student's: ``embedding_dimension`` in sentence-transformers 6, ``word_embedding_dimension``
before (6 still reads the old name, but only where the new one is absent), each one the file has. Any module
but the encoder, ``Pooling`` and ``Normalize`` (a ``Dense``, a ``LayerNorm``) holds weights of the teacher's
width; a student of another width cannot use them, and then nothing is carried (with a warning). The encoder
module is the student, at the top of its directory: a teacher's encoder folder (``0_Transformer/``, as
sentence-transformers before 2.0 saved it) is not copied, and ``modules.json`` points the module at the top.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

TOP_LEVEL_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
# The modules a student of another width can take over (Pooling's input width is rewritten); the encoder itself
# is the student.
WIDTH_FREE_MODULES = (".Transformer", ".Pooling", ".Normalize")
POOLING_WIDTH_KEYS = ("embedding_dimension", "word_embedding_dimension")  # sentence-transformers >= 6, < 6


def carry_sentence_modules(source: str | Path, target: str | Path, hidden_size: int, source_hidden: int) -> bool:
    """Copy ``source``'s sentence-transformers modules into the exported ``target`` directory.

    Args:
        source: the teacher's (or the starting student's) directory.
        target: the exported student directory (its HF files already written).
        hidden_size: the student's width.
        source_hidden: the width ``source``'s modules were made for.

    Returns:
        True when modules were carried, False when ``source`` has none or they cannot fit the student.
    """
    source, target = Path(source), Path(target)
    listing = source / "modules.json"
    if not listing.is_file():
        return False
    try:
        modules = json.loads(listing.read_text())
        if not isinstance(modules, list) or not all(isinstance(module, dict) for module in modules):
            raise ValueError("not a list of modules")
    except ValueError as err:
        logger.warning("%s does not parse (%s); the student gets no sentence-transformers modules", listing, err)
        return False
    kinds = [str(module.get("type", "")) for module in modules]
    # Modules that read the token states without weights of their width; any other (Dense, LayerNorm, ...)
    # holds weights made for source_hidden.
    unsized = [kind for kind in kinds if hidden_size != source_hidden and not kind.endswith(WIDTH_FREE_MODULES)]
    if unsized:
        logger.warning(
            "%s has modules made for width %d (%s); the %d-wide student cannot use them, so no sentence-transformers "
            "modules are carried (load the student with AutoModel and pool it yourself)",
            source, source_hidden, ", ".join(kind.rsplit(".", 1)[-1] for kind in unsized), hidden_size,
        )  # fmt: skip
        return False
    # Read before anything is copied: a Pooling config that does not parse ended the run after its training, with
    # an error naming no file, and no student written.
    pooling: dict[str, dict] = {}
    for module in modules:
        path = module.get("path") or ""
        config = source / path / "config.json"
        if str(module.get("type", "")).endswith(".Pooling") and path and config.is_file():
            try:
                pooling[path] = json.loads(config.read_text())
                if not isinstance(pooling[path], dict):
                    raise ValueError(f"a JSON {type(pooling[path]).__name__}, not an object")
            except (OSError, ValueError) as err:
                logger.warning("%s does not parse (%s); the student gets no sentence-transformers modules", config, err)
                return False
    for name in TOP_LEVEL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    listed = []
    for module in modules:
        path = module.get("path") or ""
        if str(module.get("type", "")).endswith(".Transformer"):
            # The encoder is the student, whose files are at the top of target. A teacher saved with the
            # encoder in a folder of its own (sentence-transformers before 2.0: 0_Transformer/) had that folder
            # copied, and SentenceTransformer(student) ran the teacher; its settings (max_seq_length) come along.
            if (
                path
                and (source / path / "sentence_bert_config.json").is_file()
                and not (target / "sentence_bert_config.json").exists()
            ):
                shutil.copy2(source / path / "sentence_bert_config.json", target / "sentence_bert_config.json")
            listed.append({**module, "path": ""})
            continue
        listed.append(module)
        if not path or not (source / path).is_dir():
            continue
        shutil.copytree(source / path, target / path, dirs_exist_ok=True)
        if path in pooling:
            settings = pooling[path]
            config = target / path / "config.json"
            keys = [key for key in POOLING_WIDTH_KEYS if key in settings] or ["word_embedding_dimension"]
            for key in keys:  # every version's name the file has; a file with neither gets the one all read
                settings[key] = hidden_size
            config.write_text(json.dumps(settings, indent=2) + "\n")
    if listed != modules:
        (target / "modules.json").write_text(json.dumps(listed, indent=2) + "\n")
    _fit_max_seq_length(target)
    return True


def _fit_max_seq_length(target: Path) -> None:
    """Lower the carried ``max_seq_length`` to what the student (``target``'s config.json) can read: a student of
    fewer positions than its teacher's setting crashed in ``SentenceTransformer.encode`` on every longer text."""
    from transformers import AutoConfig

    from dist_kd.models.teacher import max_input_length

    settings_path = target / "sentence_bert_config.json"
    if not settings_path.is_file():
        return
    try:
        settings = json.loads(settings_path.read_text())
    except ValueError:
        return  # carried as the source has it; sentence-transformers names the file
    held = settings.get("max_seq_length") if isinstance(settings, dict) else None
    limit = max_input_length(AutoConfig.from_pretrained(target))
    if limit is not None and isinstance(held, int) and held > limit:
        logger.info("sentence-transformers' max_seq_length %s is more than the student reads: %d", held, limit)
        settings["max_seq_length"] = limit
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")


# sentence-transformers' pooling modes, in the order its Pooling module concatenates them.
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
# Its single-string spelling (``pooling_mode: cls``) of each.
POOLING_NAMES = {"cls": "cls_token", "max": "max_tokens", "mean": "mean_tokens", "mean_sqrt_len_tokens":
                 "mean_sqrt_len_tokens", "weightedmean": "weightedmean_tokens", "lasttoken": "lasttoken"}  # fmt: skip


def sentence_pooling(source: str | Path) -> tuple[tuple[str, ...], bool] | None:
    """How ``source``'s sentence-transformers modules turn token states into a sentence embedding:
    ``(pooling modes in concatenation order, normalised)``; None without modules (or without a Pooling module
    dist_kd can read, warned).
    """
    source = Path(source)
    listing = source / "modules.json"
    if not listing.is_file():
        return None
    try:
        modules = json.loads(listing.read_text())
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        settings = json.loads((source / (pooling.get("path") or "") / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        logger.warning("%s: no readable Pooling module; quality is measured on mean-pooled states", source)
        return None
    named = settings.get("pooling_mode")
    if isinstance(named, str):
        named = [named]
    if isinstance(named, list) and named:  # sentence-transformers 6: one name, or a list concatenated in its order
        known = [POOLING_NAMES.get(name) if isinstance(name, str) else None for name in named]
        modes: tuple[str, ...] = tuple(known) if all(known) else ()
    else:
        modes = tuple(mode for mode in POOLING_MODES if settings.get(f"pooling_mode_{mode}"))
    if not modes:
        logger.warning("%s: its Pooling module names no mode dist_kd knows; quality uses mean pooling", source)
        return None
    normalised = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    return modes, normalised


def modules_after_pooling(source: str | Path) -> list[str]:
    """The names of ``source``'s sentence-transformers modules that dist_kd's pooling does not apply (``Dense``,
    ``LayerNorm``; not the encoder, ``Pooling`` or ``Normalize``); empty without readable modules."""
    try:
        modules = json.loads((Path(source) / "modules.json").read_text())
        kinds = [str(module.get("type", "")) for module in modules]
    except (OSError, ValueError, TypeError, AttributeError):
        return []
    return [kind.rsplit(".", 1)[-1] for kind in kinds if not kind.endswith(WIDTH_FREE_MODULES)]
