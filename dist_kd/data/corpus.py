"""Corpus shards: tokenise raw text once, pack it into fixed-length sequences, write WebDataset shards.

General distillation reads billions of tokens, so tokenisation happens once, offline, here, and the
training stream (``dist_kd.data.stream``) only reads integers. The output directory is the contract of
docs/corpus.md: ``shard-NNNNNN.tar`` files whose samples hold ``<key>.input_ids.npy`` (1-D, uint16 when
the vocabulary fits, else int32) and a ``manifest.json`` written last, atomically, so a directory with a
manifest is always complete.

Design:

- **Inputs** are discovered in a fixed order (paths as given, directories walked in sorted order), then
  read as a stream of documents: ``.txt``/``.txt.gz`` (a document per blank-line-separated paragraph by
  default; ``txt_document="line"`` or ``"file"`` for the other common layouts), ``.jsonl``/``.jsonl.gz``
  (a document per line, in the ``text_column`` field), ``.parquet``/``.arrow`` files and ``datasets``
  directories saved with ``save_to_disk`` (a document per row of ``text_column``; every split of a
  ``DatasetDict``, in name order).
- **Tokenisation** runs in worker processes over batches of documents; results come back in submission
  order with a bounded number in flight, so the output does not depend on the number of workers and
  memory stays flat whatever the corpus size.
- **Packing** (default ``packing="pack"``): the documents form one token stream with a ``[SEP]`` between
  consecutive documents; the stream is cut into bodies of ``seq_len - 2`` tokens and each sequence is
  ``[CLS] body [SEP]``, no padding. A body may therefore start or end at a document boundary next to the
  framing token (``[CLS] [SEP] ...``); BERT-style encoders see such boundaries in pre-training anyway. The
  final partial body (fewer than ``seq_len - 2`` tokens) is dropped and reported. With
  ``packing="document"`` each document becomes one sequence ``[CLS] doc[:seq_len-2] [SEP]`` (longer ones
  truncated, reported), stored without padding; the stream pads and builds attention masks.
- **Determinism**: the shard format (``dist_kd.data.shards``) fixes every tar member's metadata, keys are
  global sequence numbers, and the manifest is JSON with sorted keys and no timestamps, so the same inputs
  and options give byte-identical shards and manifest.
- **Overwrite**: a corpus being replaced stays loadable until the new one is complete: the new one is
  written into a hidden sibling directory and swapped in by renames at the end.
- **Tokenizer identity** (``dist_kd.data.tokenizer``): the manifest records the tokenizer's fingerprint, which
  every reader compares with its teacher's.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import stat
import tarfile
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The shard format and the tokenizer identity live in their own modules; their public names stay importable
# from here, where they were first defined.
from dist_kd.data.shards import (  # noqa: F401
    FORMAT_VERSION,
    MANIFEST_NAME,
    SAMPLE_SUFFIX,
    CorruptShardError,
    _ShardWriter,
    read_manifest,
    read_shard,
    shard_name,
    shard_problem,
)
from dist_kd.data.tokenizer import (  # noqa: F401
    check_tokenizer_matches,
    load_tokenizer,
    require_special_tokens,
    tokenizer_fingerprint,
)
from dist_kd.io import check_output_dir, killed_writer, listed, write_json_atomic, writer_tag

logger = logging.getLogger(__name__)

PACKINGS = ("pack", "document")
TXT_DOCUMENT_MODES = ("paragraph", "line", "file")
ENCODING_ERRORS = ("strict", "replace", "ignore")
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TABLE_SUFFIXES = (".parquet", ".arrow")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES

# Documents per tokenisation task, and a cap on their characters: large enough to amortise the
# inter-process transfer, small enough that (tasks in flight x task size) stays a few MB.
_DOCS_PER_TASK = 256
_CHARS_PER_TASK = 1 << 20
# A paragraph of a .txt file (or, under --txt-document file, the file) is cut at a line boundary once it
# reaches this size, so that no document is larger than one task: tokenising text takes ~150 bytes of memory
# per character.
_MAX_PARAGRAPH_CHARS = _CHARS_PER_TASK


class TokenizerWorkerDied(RuntimeError):
    """A tokeniser process died mid-run (the OOM killer, a signal): not the input's fault, but said in one line."""


# ----------------------------------------------------------------------------------------------------------
# Inputs: discovery and documents
# ----------------------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def _is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def discover_inputs(inputs: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Expand input paths (or one path) into the ordered list of sources (files and ``datasets`` directories).

    Directories are walked in sorted order; files with unsupported suffixes inside them are skipped, named in a
    warning; hidden files and directories (names starting with ".") are not read. A file
    found more than once (overlapping inputs) is kept where it was first found, with a warning; so is a file
    inside a ``datasets`` directory among the inputs (read with the directory).

    Raises:
        FileNotFoundError: for a path that does not exist.
        ValueError: for a file with an unsupported suffix, or a directory without any input.
    """
    if isinstance(inputs, str | os.PathLike):  # one path: iterating a str walked "/" for its first character
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input paths given (expected at least one file or directory)")
    sources: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist")
        if path.is_dir():
            skipped: list[Path] = []
            hidden: list[Path] = []
            found = _walk(path, skipped, hidden)
            if hidden:
                logger.info("input directory %s: %d hidden entries are not read: %s", path, len(hidden),
                            listed([str(item) for item in hidden]))  # fmt: skip
            if skipped:  # a .txt.xz or .csv among them: data the user meant, left out (said, not silently)
                logger.warning(
                    "input directory %s: %d file(s) of other types than %s are not read: %s",
                    path, len(skipped), ", ".join(SUPPORTED_SUFFIXES), listed([str(item) for item in skipped]),
                )  # fmt: skip
            if not found:
                raise ValueError(
                    f"input directory {path} holds no corpus files (expected {', '.join(SUPPORTED_SUFFIXES)} files "
                    "or a datasets directory saved with save_to_disk)"
                )
            sources.extend(found)
        elif _suffix(path) is None:
            raise ValueError(f"input {path} has an unsupported type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
        else:
            sources.append(path)
    # Overlapping inputs (a directory and a file inside it, a path given twice or through a link) would write
    # every document of the repeated file twice; the first place a file is found keeps its order.
    unique: dict[Path, Path] = {}
    repeated: list[Path] = []
    datasets_dirs = {source.resolve() for source in sources if source.is_dir()}  # _walk's only directories
    for source in sources:
        key = source.resolve()
        # read already, or as part of a datasets directory among the inputs (a file or split directory in it)
        if key in unique or not datasets_dirs.isdisjoint(key.parents):
            repeated.append(source)
        else:
            unique[key] = source
    if repeated:
        logger.warning(
            "%d input(s) found more than once among the --input paths are read once: %s",
            len(repeated), ", ".join(str(path) for path in repeated[:5]) + (" ..." if len(repeated) > 5 else ""),
        )  # fmt: skip
    return list(unique.values())


def _walk(
    directory: Path, skipped: list[Path] | None = None, hidden: list[Path] | None = None, seen: set[Path] | None = None
) -> list[Path]:
    """The corpus files and ``datasets`` directories under ``directory``, in sorted order; the files of other
    types are added to ``skipped``, and the hidden entries, never read, to ``hidden``.

    Hidden files and directories (``.ipynb_checkpoints/``, macOS's ``._*`` copies) were read as corpus: another
    copy of every document, which the check of files found twice did not catch. A directory reached again through
    a link (``up -> ..``) is walked once: two such links made the walk branch at every level, and it never ended.
    """
    seen = set() if seen is None else seen
    if directory.resolve() in seen:
        return []
    seen.add(directory.resolve())
    if _is_dataset_dir(directory):
        return [directory]
    found = []
    for entry in sorted(directory.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            if hidden is not None:
                hidden.append(entry)
        elif entry.is_dir():
            found.extend(_walk(entry, skipped, hidden, seen))
        elif _suffix(entry) is not None:
            found.append(entry)
        elif skipped is not None:
            skipped.append(entry)
    return found


def _open_text(path: Path, encoding_errors: str):
    # utf-8-sig: a byte-order mark (Notepad, Excel's "CSV UTF-8") is no text; it became tokens (BPE) or failed
    # a JSONL file's first line
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors=encoding_errors)
    return open(path, encoding="utf-8-sig", errors=encoding_errors)


def _bounded_lines(handle: Any, path: Path) -> Iterator[str]:
    """The lines of ``handle``; a line longer than ``_MAX_PARAGRAPH_CHARS`` comes in pieces of at most that size.

    ``for line in handle`` holds a whole line in memory, and a multi-GB file without a newline would be one
    line. A long line is cut after its last whitespace in the second half of each piece (so that words stay
    whole, and the text carried into the next piece stays under half a piece), or, without one there, at the
    limit itself. The pieces concatenate to the line; only the last one ends with its newline (so a piece of
    whitespace after a cut is the rest of a line, not a blank line).
    """
    limit = _MAX_PARAGRAPH_CHARS
    carry, warned = "", False
    while True:
        size = limit - len(carry)  # pieces of at most ``limit`` characters
        chunk = handle.readline(size)
        text = carry + chunk
        carry = ""
        if not chunk or chunk.endswith("\n") or len(chunk) < size:  # a line's end, or the file's
            if text:
                yield text
            if not chunk:
                return
            continue
        if not warned:
            logger.warning(
                "%s: a line exceeds %d characters and is cut at whitespace into pieces of about that size",
                path, limit,
            )  # fmt: skip
            warned = True
        half = len(text) // 2
        cut = max(text.rfind(" ", half), text.rfind("\t", half)) + 1
        if cut <= half:  # no whitespace in the second half: cut at the end of the piece
            cut = len(text)
        yield text[:cut]
        carry = text[cut:]


def _text_documents(path: Path, mode: str, encoding_errors: str) -> Iterator[str]:
    with _open_text(path, encoding_errors) as handle:
        lines = _bounded_lines(handle, path)
        if mode == "file":
            # Read line by line and cut a file past the limit at line boundaries: read whole, a multi-GB file
            # would be one document, tokenised at once (~150 bytes per character). Smaller files give the
            # whole text, stripped, as before.
            piece: list[str] = []
            num_chars, warned = 0, False
            for line in lines:
                piece.append(line)
                num_chars += len(line)
                if num_chars >= _MAX_PARAGRAPH_CHARS:
                    if not warned:
                        logger.warning(
                            "%s: the file exceeds %d characters and is read as documents of about that size, cut "
                            "at line boundaries (--txt-document file holds each file whole otherwise)",
                            path, _MAX_PARAGRAPH_CHARS,
                        )  # fmt: skip
                        warned = True
                    text = "".join(piece).strip()
                    if text:
                        yield text
                    piece, num_chars = [], 0
            text = "".join(piece).strip()
            if text:
                yield text
        elif mode == "line":
            for line in lines:
                if line.strip():
                    yield line.strip()
        else:
            paragraph: list[str] = []
            num_chars, warned = 0, False
            line_end = True  # whether the last piece ended its line (after a cut, whitespace is no blank line)
            for line in lines:
                after_cut, line_end = not line_end, line.endswith("\n")
                if line.strip():
                    paragraph.append(line.strip())
                    num_chars += len(paragraph[-1]) + 1
                    if num_chars >= _MAX_PARAGRAPH_CHARS:
                        # A file without blank lines would otherwise be one document, held and tokenised whole.
                        if not warned:
                            logger.warning(
                                "%s: a paragraph (no blank line) exceeds %d characters and is cut at line "
                                "boundaries into documents of about that size; if the file has one document per "
                                "line, pass --txt-document line",
                                path, _MAX_PARAGRAPH_CHARS,
                            )  # fmt: skip
                            warned = True
                        yield "\n".join(paragraph)
                        paragraph, num_chars = [], 0
                elif paragraph and not after_cut:
                    yield "\n".join(paragraph)
                    paragraph, num_chars = [], 0
            if paragraph:
                yield "\n".join(paragraph)


def _jsonl_documents(path: Path, text_column: str, encoding_errors: str) -> Iterator[str]:
    with _open_text(path, encoding_errors) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or text_column not in record:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{line_number}: no '{text_column}' field (found {found})")
            text = record[text_column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{line_number}: field '{text_column}' must be a string, found {type(text).__name__}"
                )
            if _SURROGATE.search(text):
                text = _lone_surrogates(text, f"{path}:{line_number}: field '{text_column}'", encoding_errors)
            if text.strip():
                yield text


# JSON may escape half of a UTF-16 pair alone ("\ud83d", common in scraped text): valid JSON, but not a
# character; such a string cannot be encoded as UTF-8, and the tokenizer fails on it naming no file.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogates(text: str, where: str, encoding_errors: str) -> str:
    """``text`` with its lone surrogates handled as ``encoding_errors`` handles undecodable bytes."""
    if encoding_errors == "strict":
        found = _SURROGATE.search(text)
        raise ValueError(
            f"{where} holds a lone surrogate escape (\\u{ord(found.group()):04x} at character {found.start()}), "
            "which is not text; pass --encoding-errors replace to substitute U+FFFD (or ignore to drop it)"
        )
    return _SURROGATE.sub("\ufffd" if encoding_errors == "replace" else "", text)


def _column_texts(values: Iterable[Any], where: str, text_column: str) -> Iterator[str]:
    for text in values:
        if text is None:
            continue
        if not isinstance(text, str):
            raise ValueError(f"{where}: column '{text_column}' must hold strings, found {type(text).__name__}")
        if text.strip():
            yield text


def _check_column(names: Sequence[str], text_column: str, where: Path) -> None:
    if text_column not in names:
        raise ValueError(
            f"{where} has no text column '{text_column}' (found columns: {', '.join(names)}); "
            "choose one with --text-column"
        )


def _arrow_texts(column: Any, where: str, text_column: str, encoding_errors: str, first_row: int) -> Iterator[str]:
    """The texts of an Arrow string column whose rows may hold bytes that are not UTF-8 (a Spark job can write
    them): such a row is named, or its bytes replaced or dropped as ``encoding_errors`` says. pyarrow's own
    UnicodeDecodeError was reported as a byte offset into the binary file, with advice that did not help."""
    import pyarrow as pa

    try:
        values = column.to_pylist()
    except UnicodeDecodeError:
        binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        values = []
        for row, raw in enumerate(column.cast(binary).to_pylist(), first_row):
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                if encoding_errors == "strict":
                    raise ValueError(
                        f"{where}: row {row} of column '{text_column}' is not UTF-8 text ({error.reason} at byte "
                        f"{error.start} of the row); pass --encoding-errors replace to substitute such bytes"
                    ) from None
                values.append(raw.decode("utf-8", encoding_errors))
    yield from _column_texts(values, where, text_column)


def _table_documents(path: Path, text_column: str, encoding_errors: str = "strict") -> Iterator[str]:
    import pyarrow as pa

    kind = "Parquet" if path.name.lower().endswith(".parquet") else "Arrow IPC"
    try:
        yield from _table_rows(path, text_column, encoding_errors)
    except pa.ArrowException as error:
        # pyarrow's own message names no file (e.g. "Parquet file size is 0 bytes").
        raise ValueError(
            f"{path} is not a readable {kind} file ({error}); rewrite it or leave it out of --input"
        ) from None


def _table_rows(path: Path, text_column: str, encoding_errors: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.lower().endswith(".parquet"):
        parquet = pq.ParquetFile(path)
        _check_column(parquet.schema_arrow.names, text_column, path)
        batches = parquet.iter_batches(columns=[text_column], batch_size=1024)
    else:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            # datasets writes its .arrow cache files in the IPC *stream* format, not the file format.
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        _check_column(reader.schema.names, text_column, path)
    row = 0
    for batch in batches:
        yield from _arrow_texts(batch.column(text_column), str(path), text_column, encoding_errors, row)
        row += batch.num_rows


def _dataset_documents(path: Path, text_column: str, encoding_errors: str = "strict") -> Iterator[str]:
    import datasets
    import pyarrow as pa

    def unreadable(error: BaseException) -> ValueError:
        # A partial copy (an empty state.json), a cut .arrow file, or another tool's directory holding files of
        # the same names: datasets' own errors (a KeyError traceback among them) named no directory.
        return ValueError(
            f"{path} is not a readable datasets directory saved with save_to_disk ({type(error).__name__}: "
            f"{error}); save it again, or leave it out of --input"
        )

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as error:
        raise unreadable(error) from None
    names = sorted(loaded) if isinstance(loaded, datasets.DatasetDict) else [None]
    for name in names:
        split = loaded if name is None else loaded[name]
        where = str(path) if name is None else f"{path} (split {name})"
        _check_column(split.column_names, text_column, path)
        row = 0
        try:
            for batch in split.select_columns([text_column]).with_format("arrow").iter(batch_size=1024):
                yield from _arrow_texts(batch.column(text_column), where, text_column, encoding_errors, row)
                row += batch.num_rows
        except (OSError, pa.ArrowException) as error:
            raise unreadable(error) from None


def _undecodable_position(path: Path, chunk_size: int = 1 << 20) -> tuple[int, int]:
    """File offset and 1-based line of the first byte of ``path`` that is not UTF-8 (after decompression)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    consumed, newlines = 0, 0
    with opener(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                # The decoder may hold back the start of a sequence from the previous chunk; error.start
                # counts from those held-back bytes.
                held = len(error.object) - len(chunk)
                offset = consumed - held + error.start
                return offset, newlines + error.object[: error.start].count(b"\n") + 1
            if not chunk:
                return consumed, newlines + 1  # not reached for a file that failed to decode
            consumed += len(chunk)
            newlines += chunk.count(b"\n")


def iter_documents(
    source: Path, txt_document: str = "paragraph", text_column: str = "text", encoding_errors: str = "strict"
) -> Iterator[str]:
    """The documents of one source (a file or a saved ``datasets`` directory), in file order.

    Args:
        source: a file or a saved ``datasets`` directory (from ``discover_inputs``).
        txt_document: how ``.txt`` files split into documents (``paragraph``, ``line``, ``file``).
        text_column: JSONL field / table column with the text.
        encoding_errors: how text files treat bytes that are not UTF-8, and JSONL texts lone surrogate escapes
            (``strict``, ``replace``, ``ignore``).

    Raises:
        ValueError: naming the file (and line) for undecodable text, bad JSON, or a missing text field/column.
    """
    try:
        if source.is_dir():
            yield from _dataset_documents(source, text_column, encoding_errors)
            return
        suffix = _suffix(source)
        if suffix in TEXT_SUFFIXES:
            yield from _text_documents(source, txt_document, encoding_errors)
        elif suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(source, text_column, encoding_errors)
        else:
            yield from _table_documents(source, text_column, encoding_errors)
    except UnicodeDecodeError as error:
        # error.start counts from the start of the decoder's current chunk, not of the file.
        offset, line = _undecodable_position(source)
        where = f"byte {offset}" + (" of the uncompressed text" if source.name.lower().endswith(".gz") else "")
        raise ValueError(
            f"{source} is not UTF-8 text ({error.reason} at {where}, line {line}); "
            "pass --encoding-errors replace to substitute such bytes"
        ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{source} is not a valid gzip file ({error})") from None


def _document_batches(
    sources: Sequence[Path], txt_document: str, text_column: str, encoding_errors: str, counter: list[int]
) -> Iterator[list[str]]:
    batch: list[str] = []
    num_chars = 0
    for source in sources:
        for document in iter_documents(source, txt_document, text_column, encoding_errors):
            batch.append(document)
            num_chars += len(document)
            counter[0] += 1
            if len(batch) >= _DOCS_PER_TASK or num_chars >= _CHARS_PER_TASK:
                yield batch
                batch, num_chars = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------------------------------------
# Tokenisation (worker processes)
# ----------------------------------------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_tokenizer_worker(tokenizer_dir: str, parent: int | None = None) -> None:
    global _WORKER_TOKENIZER
    if parent is not None and parent != os.getpid():  # a worker process (--num-workers 0 tokenises in-process)
        # The command's stop handlers (forked with it) are not the worker's: it ends on the pool's shutdown, or
        # once its parent is gone.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        threading.Thread(target=_end_with, args=(parent,), daemon=True, name="end-with-parent").start()
    # One Rust thread per process: the parallelism is the processes; nested thread pools only contend.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)
    _WORKER_TOKENIZER.model_max_length = 1 << 62  # documents are cut by the packer, not the tokenizer


def _end_with(parent: int) -> None:
    """End this worker once ``parent`` is gone: a command killed with SIGKILL (the OOM killer) left a worker
    blocked on a full result pipe running for ever, holding the command's stdout open (``| tee`` hung)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _tokenize_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of ``texts`` without special tokens, as (flat int32 ids, per-document lengths).

    A special token's text written in a document ("[SEP]", HTML's "<s>" for a RoBERTa tokenizer) is text, not
    markup: it was stored as the special id inside a sequence's body, where the teacher read a separator."""
    encoded = _WORKER_TOKENIZER(
        texts,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        split_special_tokens=True,
    )["input_ids"]
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _ordered_map(
    function: Callable[[Any], Any], items: Iterable[Any], num_workers: int, initializer: Callable, initargs: tuple
) -> Iterator[Any]:
    """``map`` over worker processes, results in input order, at most ``4 * num_workers`` tasks in flight.

    ``Pool.imap`` would read the whole input into its task queue ahead of the workers; the bound keeps
    memory flat for corpora larger than RAM. A ``ProcessPoolExecutor``, unlike a ``multiprocessing.Pool``,
    notices a worker that dies (the OOM killer's SIGKILL) and fails instead of waiting for it forever.

    Raises:
        RuntimeError: a worker process died.
    """
    if num_workers <= 0:
        initializer(*initargs)
        yield from map(function, items)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    executor = ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context(method), initializer=initializer, initargs=initargs
    )
    try:
        pending: deque = deque()
        for item in items:
            pending.append(executor.submit(function, item))
            if len(pending) >= 4 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise TokenizerWorkerDied(
            f"a tokenizer worker process died (killed for memory?) while {num_workers} workers tokenised the "
            "corpus; retry with fewer --num-workers, and --txt-document line for text files without blank lines"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------
# Packing
# ----------------------------------------------------------------------------------------------------------


class _Packer:
    """Turns batches of tokenised documents into stored sequences (see the module docstring)."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, packing: str, dtype: np.dtype):
        self.seq_len = seq_len
        self.cls_id = cls_id
        self.sep_id = sep_id
        self.packing = packing
        self.dtype = dtype
        self.num_dropped_tokens = 0
        self._carry = np.zeros(0, dtype=np.int64)
        self._seen_document = False

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        if self.packing == "document":
            return self._one_per_document(flat, lengths)
        lengths = lengths[lengths > 0]
        if len(lengths) == 0:
            return []
        # [SEP] between consecutive documents, including across task batches.
        stream = np.insert(flat.astype(np.int64), np.cumsum(lengths)[:-1], self.sep_id)
        if self._seen_document:
            stream = np.concatenate([[self.sep_id], stream])
        self._seen_document = True
        buffer = np.concatenate([self._carry, stream])
        body = self.seq_len - 2
        num_full = len(buffer) // body
        bodies = buffer[: num_full * body].reshape(num_full, body)
        self._carry = buffer[num_full * body :]
        framed = np.empty((num_full, self.seq_len), dtype=self.dtype)
        framed[:, 0] = self.cls_id
        framed[:, 1:-1] = bodies
        framed[:, -1] = self.sep_id
        return list(framed)

    def _one_per_document(self, flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        out = []
        body = self.seq_len - 2
        for start, length in zip(np.cumsum(lengths) - lengths, lengths, strict=True):
            if length == 0:
                continue
            kept = min(int(length), body)
            self.num_dropped_tokens += int(length) - kept
            sequence = np.empty(kept + 2, dtype=self.dtype)
            sequence[0] = self.cls_id
            sequence[1:-1] = flat[start : start + kept]
            sequence[-1] = self.sep_id
            out.append(sequence)
        return out

    def finish(self) -> None:
        # The last partial body would need padding, which packed shards never store.
        self.num_dropped_tokens += len(self._carry)
        self._carry = self._carry[:0]


# ----------------------------------------------------------------------------------------------------------
# prepare_corpus
# ----------------------------------------------------------------------------------------------------------


@dataclass
class CorpusSummary:
    """What ``prepare_corpus`` wrote, for the end-of-run summary and the benchmark."""

    num_documents: int
    num_input_tokens: int
    num_sequences: int
    num_tokens: int
    num_shards: int
    num_bytes: int
    num_dropped_tokens: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        """Tokenised input tokens per second of wall time."""
        return self.num_input_tokens / max(self.elapsed_s, 1e-9)

    def format(self) -> str:
        """One human-readable line."""
        return (
            f"{self.num_documents:,} documents, {self.num_input_tokens:,} tokens -> {self.num_sequences:,} sequences "
            f"in {self.num_shards:,} shards ({self.num_bytes / 1e6:,.1f} MB; {self.num_dropped_tokens:,} tokens "
            f"dropped by packing/truncation) in {self.elapsed_s:.1f} s, {self.tokens_per_s:,.0f} tokens/s"
        )


def _validate_options(
    seq_len: int, shard_size: int, num_workers: int, packing: str, txt_document: str, encoding_errors: str
) -> None:
    if seq_len < 3:
        raise ValueError(f"seq_len must be at least 3 ([CLS] + a token + [SEP]), found {seq_len}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1 sequence, found {shard_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, found {num_workers}")
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, found {packing!r}")
    if txt_document not in TXT_DOCUMENT_MODES:
        raise ValueError(f"txt_document must be one of {TXT_DOCUMENT_MODES}, found {txt_document!r}")
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors must be one of {ENCODING_ERRORS}, found {encoding_errors!r}")


def _check_seq_len(seq_len: int, tokenizer_dir: Path, tok: Any) -> None:
    """Refuse sequences longer than the position embeddings of the model in ``tokenizer_dir`` (the teacher's
    directory, as usual); warn when only a tokenizer says they are too long.

    Such a corpus is only found out at training time: general distillation refuses it before its first step.
    A tokenizer directory alone does not know the model; its ``model_max_length`` is the hint it gives.
    """
    from types import SimpleNamespace

    from dist_kd.models.teacher import check_max_length

    config_file = tokenizer_dir / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            config = None  # not a model config this check can read; loading the teacher reports it
        if isinstance(config, dict):
            check_max_length(SimpleNamespace(**config), seq_len, tokenizer_dir, "--seq-len")
            return
    limit = getattr(tok, "model_max_length", None)
    if isinstance(limit, int) and limit < seq_len:
        logger.warning(
            "--seq-len %d exceeds the model_max_length %d of tokenizer %s: a model with that limit cannot read "
            "these sequences (general distillation refuses a corpus longer than its teacher's positions); "
            "pass --seq-len %d or less unless your model takes more",
            seq_len, limit, tokenizer_dir, limit,
        )  # fmt: skip


def _corpus_entry(name: str) -> bool:
    """A file that belongs to a corpus (or to a run writing one), as opposed to the user's own files."""
    return (
        name == MANIFEST_NAME
        or fnmatch.fnmatch(name, "shard-*.tar")
        or fnmatch.fnmatch(name, ".shard-*.tar.tmp")  # ShardWriter's
        or fnmatch.fnmatch(name, f".{MANIFEST_NAME}.*.tmp")  # write_json_atomic's
    )


def _written_by_dist_kd(shard: Path) -> bool:
    """Whether ``shard`` is a shard this command wrote (its first member ``<12 digits>.input_ids.npy``), not
    another program's file of the same name (webdataset's ``shard-%06d.tar``)."""
    try:
        with tarfile.open(shard) as archive:
            first = archive.next()
    except (OSError, tarfile.TarError):
        return False
    return first is not None and re.fullmatch(rf"\d{{12}}{re.escape(SAMPLE_SUFFIX)}", first.name) is not None


def _corpus_manifest(path: Path) -> bool:
    """Whether ``path`` is a dist_kd corpus manifest (of this format version or another), not another
    program's ``manifest.json``."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest and "shards" in manifest


def _prepare_output(output: Path, overwrite: bool) -> Path:
    """The directory to write into: ``output`` itself, or a new hidden sibling when it holds a corpus.

    A corpus being replaced (``overwrite``) stays complete and loadable until the new one is: the new
    corpus is written next to it and swapped in at the end (:func:`_swap_in`), so a run that fails, for
    instance on a wrong ``text_column`` found while streaming, leaves the old one as it was.
    """
    # Resolved so that a symlinked output keeps its link and the siblings are on the target's file system.
    target = output.resolve()
    manifest = output / MANIFEST_NAME
    # Shards of a run killed before its manifest are replaced; another program's of the same name are not, nor
    # is a manifest.json of another format (webdataset tools and others write that name too): --overwrite
    # would delete them.
    foreign = sorted(path.name for path in output.glob("shard-*.tar") if not _written_by_dist_kd(path))
    if foreign:
        raise FileExistsError(
            f"{output} holds shard files that dist_kd did not write ({listed(foreign)}): a corpus written there "
            "would replace or delete them; give a new or empty directory"
        )
    if manifest.exists() and not _corpus_manifest(manifest):
        raise FileExistsError(
            f"{manifest} is not the manifest of a dist_kd corpus (a JSON object with 'format_version' and "
            "'shards'): a corpus written there would replace it; give a new or empty directory"
        )
    if manifest.exists():
        if not overwrite:
            raise FileExistsError(
                f"{output} already holds a corpus ({manifest}); pass --overwrite (overwrite=True from Python) to "
                "replace it"
            )
        # The writer's host and pid in the name: a run killed past its cleanup (SIGKILL, the OOM killer) is
        # told from a live one by the next run on the same host.
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.new-{writer_tag()}", dir=target.parent))
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(".shard-*.tar.tmp"):
        stale.unlink()
    return output


def _recover_killed_swaps(target: Path) -> None:
    """Clean up after ``--overwrite`` runs killed before their cleanup (SIGKILL, the OOM killer), on this host.

    Their hidden siblings of ``target`` are ``.NAME.new-HOST-PID-*`` (the new corpus, partial or complete) and
    ``.NAME.old-HOST-PID-*`` (the corpus replaced, between :func:`_swap_in`'s renames or while it is deleted):
    up to the size of a whole corpus each. A killed run's old corpus goes back in place where ``target`` is
    missing (killed between the two renames: the run did not finish, so the corpus stays as it was) if it is
    whole, and is removed otherwise, the files the user kept in it moved over to the new one where that is in
    place; its new corpus is removed (:func:`dist_kd.io.killed_writer`). Say
    where any other such directory is (a live run's, or one killed on another host), and leave it.
    """
    for kind in ("old", "new"):  # the old corpus first: it may go back where the new one was never put
        prefix = f".{target.name}.{kind}-"
        for sibling in sorted(target.parent.glob(f"{glob.escape(prefix)}*")):
            if not sibling.is_dir():
                continue
            pid = killed_writer(sibling, sibling.name[len(prefix) :])
            if pid is None:
                logger.warning(
                    "%s holds %s corpus of another --overwrite run (or one killed on another host, or by an earlier "
                    "release): remove it if no run is writing there",
                    sibling, "the replaced" if kind == "old" else "part of the new",
                )  # fmt: skip
            elif kind == "old" and not target.exists() and _whole_corpus(sibling):
                logger.warning(
                    "putting %s back as %s: an --overwrite run (pid %s) was killed while it swapped its new corpus in",
                    sibling, target, pid,
                )  # fmt: skip
                os.replace(sibling, target)
            else:
                if kind == "old" and target.is_dir():  # files the user kept beside the corpus, not yet moved over
                    for entry in sibling.iterdir():
                        if not _corpus_entry(entry.name) and not (target / entry.name).exists():
                            os.replace(entry, target / entry.name)
                logger.warning("removing %s, left by an --overwrite run that was killed (pid %s)", sibling, pid)
                shutil.rmtree(sibling, ignore_errors=True)


def _whole_corpus(directory: Path) -> bool:
    """Whether ``directory`` holds a corpus with every shard its manifest lists, at its recorded size (a
    deletion cut short can leave the manifest and some shards)."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        return all(shard_problem(directory / shard["name"], shard) is None for shard in manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _swap_in(new: Path, output: Path) -> None:
    """Replace the corpus directory ``output`` with ``new`` (same parent) by two renames, then drop the old one.

    Other files kept in ``output`` (notes, a ``.gitignore``) move into the new directory.
    """
    target = output.resolve()
    os.chmod(new, stat.S_IMODE(target.stat().st_mode))  # mkdtemp made it private; keep the old permissions
    old = new.with_name(new.name.replace(".new-", ".old-", 1))
    os.replace(target, old)
    os.replace(new, target)
    for entry in old.iterdir():
        if not _corpus_entry(entry.name):
            os.replace(entry, target / entry.name)
    try:
        shutil.rmtree(old)
    except BaseException:  # SIGTERM's SystemExit mid-way: the new corpus is in place, the old one goes all the same
        shutil.rmtree(old, ignore_errors=True)
        raise


def _write_corpus(
    sources: Sequence[Path],
    tok: Any,
    tokenizer: str,
    directory: Path,
    seq_len: int,
    shard_size: int,
    num_workers: int,
    packing: str,
    txt_document: str,
    text_column: str,
    encoding_errors: str,
    dtype: np.dtype,
    progress: bool,
) -> tuple[list[dict[str, Any]], _ShardWriter, _Packer, int, int]:
    """Tokenise, pack and write the shards into ``directory``: (shards, writer, packer, documents, input tokens)."""
    from dist_kd.cli import progress as tqdm

    packer = _Packer(seq_len, tok.cls_token_id, tok.sep_token_id, packing, dtype)
    writer = _ShardWriter(directory, shard_size, dtype)
    num_documents = [0]
    num_input_tokens = 0
    batches = _document_batches(sources, txt_document, text_column, encoding_errors, num_documents)
    bar = tqdm(desc="prepare_corpus", unit="tok", unit_scale=True, disable=not progress)
    try:
        for flat, lengths in _ordered_map(
            _tokenize_batch, batches, num_workers, _init_tokenizer_worker, (tokenizer, os.getpid())
        ):
            num_input_tokens += len(flat)
            for sequence in packer.add(flat, lengths):
                writer.write(sequence)
            bar.update(len(flat))
            bar.set_postfix(sequences=writer.num_sequences, shards=len(writer.shards), refresh=False)
        packer.finish()
        shards = writer.close()
    finally:
        bar.close()
        writer.abort()
    return shards, writer, packer, num_documents[0], num_input_tokens


def prepare_corpus(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer: str | os.PathLike,
    output_dir: str | os.PathLike,
    seq_len: int = 128,
    shard_size: int = 10_000,
    num_workers: int = 1,
    packing: str = "pack",
    txt_document: str = "paragraph",
    text_column: str = "text",
    encoding_errors: str = "strict",
    overwrite: bool = False,
    progress: bool = True,
) -> CorpusSummary:
    """Tokenise ``inputs`` with ``tokenizer``, pack them, and write shards plus ``manifest.json``.

    Args:
        inputs: files and directories, or one of them (see the module docstring for the formats).
        tokenizer: the teacher's tokenizer directory (a fast tokenizer).
        output_dir: the corpus directory to write.
        seq_len: tokens per sequence, ``[CLS]`` and ``[SEP]`` included.
        shard_size: sequences per shard (the last shard may hold fewer).
        num_workers: tokeniser processes; 0 tokenises in this process.
        packing: ``"pack"`` (full sequences across documents) or ``"document"`` (one per document).
        txt_document: how ``.txt`` files split into documents: ``"paragraph"``, ``"line"`` or ``"file"``.
        text_column: field of ``.jsonl`` records / column of tables and datasets holding the text.
        encoding_errors: ``strict`` (default: a non-UTF-8 text file, or a JSONL text with a lone surrogate escape
            such as ``\\ud83d``, is an error naming it), ``replace`` (U+FFFD) or
            ``ignore`` (Python's codec error handlers).
        overwrite: replace an existing corpus in ``output_dir``.
        progress: show a progress bar.

    Returns:
        The summary of what was written.

    Raises:
        FileNotFoundError: for a missing input or tokenizer.
        FileExistsError: when ``output_dir`` holds a corpus and ``overwrite`` is false.
        ValueError: for bad options or bad inputs (naming the file and, for JSONL, the line), or an
            ``output_dir`` that is a file.
    """
    _validate_options(seq_len, shard_size, num_workers, packing, txt_document, encoding_errors)
    check_output_dir(output_dir)
    started = time.perf_counter()
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    sources = discover_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    require_special_tokens(tok, tokenizer, ("cls", "sep", "pad"), f"tokenizer {tokenizer}")
    _check_seq_len(seq_len, Path(tokenizer), tok)
    fingerprint = tokenizer_fingerprint(tok)
    dtype = np.dtype(np.uint16) if fingerprint["vocab_size"] <= 65535 else np.dtype(np.int32)
    output = Path(output_dir)
    from dist_kd.train.runlock import RunLock

    # One writer at a time (two runs into one output each deleted and replaced the other's shards, and both
    # exited 0 with a corpus that contradicted its manifest); the lock moves with the user's files on a swap.
    target = output.resolve()  # a symlinked output: the siblings of its target
    if target.parent.is_dir():  # before the lock, which would make the directory a killed swap left missing
        _recover_killed_swaps(target)
    with RunLock(output, flag="--output"):
        work = _prepare_output(output, overwrite)
        try:
            shards, writer, packer, num_documents, num_input_tokens = _write_corpus(
                sources, tok, str(tokenizer), work, seq_len, shard_size, num_workers, packing, txt_document,
                text_column, encoding_errors, dtype, progress,
            )  # fmt: skip
            if not shards:
                raise ValueError(
                    f"inputs {[str(p) for p in inputs]} gave no sequence of {seq_len} tokens "
                    f"({num_documents} documents, {num_input_tokens} tokens)"
                )
            names = {shard["name"] for shard in shards}
            for stale in work.glob("shard-*.tar"):
                if stale.name not in names:  # left by an earlier, larger (incomplete) corpus in the same directory
                    stale.unlink()
            manifest = {
                "format_version": FORMAT_VERSION,
                "tokenizer": fingerprint,
                "seq_len": seq_len,
                "num_sequences": writer.num_sequences,
                "num_tokens": writer.num_tokens,
                "num_documents": num_documents,
                "dtype": dtype.name,
                "packing": packing,
                "special_tokens": {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id},
                "options": {
                    "txt_document": txt_document,
                    "text_column": text_column,
                    "encoding_errors": encoding_errors,
                    "shard_size": shard_size,
                },
                "shards": shards,
            }
            write_json_atomic(work / MANIFEST_NAME, manifest)
        except BaseException:
            if work != output:
                shutil.rmtree(work, ignore_errors=True)  # the corpus being replaced stays as it was
            raise
        if work != output:
            _swap_in(work, output)
    summary = CorpusSummary(
        num_documents=num_documents,
        num_input_tokens=num_input_tokens,
        num_sequences=writer.num_sequences,
        num_tokens=writer.num_tokens,
        num_shards=len(shards),
        num_bytes=sum(shard["num_bytes"] for shard in shards),
        num_dropped_tokens=packer.num_dropped_tokens,
        elapsed_s=time.perf_counter() - started,
    )
    logger.info("prepare_corpus: %s", summary.format())
    return summary
