"""Tokenised task rows in flat arrays, and right-padded batches of them.

Every stage that feeds task text to a model (teacher fine-tuning, precompute, task distillation,
evaluation) tokenises the same way: single texts and sentence pairs are tokenised as two groups (a fast
tokenizer takes either a list of texts or a list of pairs, not a mix), truncated to ``max_length``, with
segment ids. The pieces live in one flat ``int32`` array with row offsets rather than a list of Python
lists: an augmented set holds tens of millions of pieces, and a Python int costs 28 bytes where an
``int32`` costs 4.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# Rows tokenised per call of the tokenizer (bounds the temporary Python lists it returns).
ENCODE_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class TokenizedRows:
    """Token ids and segment ids of N rows, stored flat.

    Attributes:
        ids: ``int32`` pieces of every row, concatenated.
        types: ``int8`` segment ids aligned with ``ids``.
        offsets: ``int64 (N + 1,)``: row i is ``ids[offsets[i]:offsets[i + 1]]``.
    """

    ids: np.ndarray
    types: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """``(N,)`` pieces per row."""
        return np.diff(self.offsets)

    def row(self, index: int) -> np.ndarray:
        """The pieces of row ``index``."""
        return self.ids[self.offsets[index] : self.offsets[index + 1]]


def tokenize_rows(
    tokenizer,
    text_a: Sequence[str],
    text_b: Sequence[str | None],
    max_length: int,
    flag: str = "--max-length",
) -> TokenizedRows:
    """Tokenise rows of single texts (``text_b`` None) and pairs, keeping the rows' order.

    Args:
        tokenizer: a Hugging Face (fast) tokenizer.
        text_a: first texts.
        text_b: second texts, None for single-text rows.
        max_length: truncate each row to this many pieces (special tokens included).
        flag: where the user set ``max_length``, for the error below.

    Raises:
        ValueError: ``max_length`` leaves no piece of text beside the special tokens (transformers then only logs
            an error and returns rows uncut).
    """
    if len(text_a) != len(text_b):
        raise ValueError(f"text_a has {len(text_a)} rows but text_b {len(text_b)}")
    num_rows = len(text_a)
    row_ids: list[np.ndarray | None] = [None] * num_rows
    row_types: list[np.ndarray | None] = [None] * num_rows
    pairs = [row for row, second in enumerate(text_b) if second is not None]
    singles = [row for row, second in enumerate(text_b) if second is None]
    for rows, is_pair in ((singles, False), (pairs, True)):
        special = tokenizer.num_special_tokens_to_add(pair=is_pair)
        if rows and max_length <= special:
            raise ValueError(
                f"a maximum length of {max_length} pieces leaves no room for text: the tokenizer adds {special} "
                f"special tokens to {'a sentence pair' if is_pair else 'a text'}; give a longer one ({flag})"
            )
    for rows, is_pair in ((singles, False), (pairs, True)):
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = rows[start : start + ENCODE_CHUNK]
            firsts = [text_a[row] for row in chunk]
            seconds = [text_b[row] for row in chunk] if is_pair else None
            enc = tokenizer(firsts, seconds, truncation=True, max_length=max_length, return_token_type_ids=True)
            for position, row in enumerate(chunk):
                row_ids[row] = np.asarray(enc["input_ids"][position], dtype=np.int32)
                row_types[row] = np.asarray(enc["token_type_ids"][position], dtype=np.int8)
    lengths = np.fromiter((len(ids) for ids in row_ids), dtype=np.int64, count=num_rows)
    offsets = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty32, empty8 = np.zeros(0, np.int32), np.zeros(0, np.int8)
    return TokenizedRows(
        ids=np.concatenate(row_ids) if num_rows else empty32,
        types=np.concatenate(row_types) if num_rows else empty8,
        offsets=offsets,
    )


def pad_rows(rows_data: TokenizedRows, rows: Sequence[int] | np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``token_type_ids`` (int64, ``(B, max length)``)."""
    lengths = [int(rows_data.offsets[row + 1] - rows_data.offsets[row]) for row in rows]
    width = max(lengths)
    input_ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    token_types = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for position, (row, length) in enumerate(zip(rows, lengths, strict=True)):
        start = rows_data.offsets[row]
        input_ids[position, :length] = rows_data.ids[start : start + length]
        token_types[position, :length] = rows_data.types[start : start + length]
        mask[position, :length] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(mask),
        "token_type_ids": torch.from_numpy(token_types),
    }


def length_grouped_order(
    lengths: np.ndarray, batch_rows: int, rng: np.random.Generator, group_batches: int = 50, first_batch: int = 0
) -> np.ndarray:
    """A random order of ``range(len(lengths))`` in which each batch of ``batch_rows`` rows has similar lengths.

    The rows are shuffled, cut into groups of ``group_batches`` batches, sorted by length within each group
    and cut into batches, and the full batches are shuffled. Every row still comes once per pass, each batch
    still draws from all over the set, and a padded batch of tweets carries ~95 % real tokens instead of ~60 %.

    Args:
        lengths: ``(N,)`` pieces per row.
        batch_rows: rows per batch (all ranks together).
        rng: the pass's generator (the same on every rank).
        group_batches: batches per sorting group.
        first_batch: rows before the first batch boundary (a batch that began in the previous pass ends
            there; those rows stay random).
    """
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))
    head, rest = order[:first_batch], order[first_batch:]
    group = batch_rows * group_batches
    for start in range(0, len(rest), group):
        chunk = rest[start : start + group]
        rest[start : start + group] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [rest[start : start + batch_rows] for start in range(0, len(rest), batch_rows)]
    # A short last batch stays last: it is completed by the next pass's first rows.
    full = [batch for batch in batches if len(batch) == batch_rows]
    tail = batches[len(full) :]
    return np.concatenate([head, *[full[i] for i in rng.permutation(len(full))], *tail]).astype(order.dtype)


def pad_id_of(tokenizer) -> int:
    """The tokenizer's padding id (0 when it defines none)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def uses_token_types(tokenizer, config: Any = None) -> bool:
    """Whether to pass segment ids: the tokenizer emits them (BERT's does; RoBERTa's does not) and the model
    ``config`` (when given) has a segment embedding for the second one.

    A model with ``type_vocab_size`` 1 (or 0: DeBERTa-v2 ignores them) knows only segment 0, so a BERT
    tokenizer's segment id 1 on the second text of a pair would index past its embedding; such a model gets
    none (all 0), as it was trained.
    """
    if "token_type_ids" not in tokenizer.model_input_names:
        return False
    return config is None or has_second_segment(config)


def has_second_segment(config: Any) -> bool:
    """Whether a model with ``config`` has an embedding for segment 1 (``type_vocab_size`` 2 or more)."""
    return getattr(config, "type_vocab_size", 2) > 1
