"""The corpus shard format: WebDataset tar shards of token-id arrays, and their manifest.

``shard-NNNNNN.tar`` files whose samples hold one member ``<key>.input_ids.npy`` (a 1-D array, uint16 when
the vocabulary fits, else int32), and ``manifest.json``, written last and atomically, so a directory with a
manifest is complete. Tar members carry fixed metadata (mtime 0, uid/gid 0, empty owner names, mode 0644,
USTAR format) and keys are global sequence numbers, so the same sequences give byte-identical shards. The
writer (``dist_kd.data.corpus``) and the training stream (``dist_kd.data.stream``) both go through here.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SAMPLE_SUFFIX = ".input_ids.npy"
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # what tarfile pads an archive to; matching it keeps shards readable by all tools


class CorruptShardError(ValueError):
    """A shard that cannot be read as the manifest describes it (missing, truncated, malformed)."""

    def __init__(self, shard: str | os.PathLike, reason: str | None = None):
        # The one-argument form (a full message) lets DataLoader workers re-raise this type in the main process.
        self.shard = str(shard)
        self.reason = reason or ""
        super().__init__(f"corrupt corpus shard {self.shard}: {reason}" if reason is not None else self.shard)

    def __reduce__(self):  # a DataLoader worker's error pickles to the trainer with its shard and reason
        return (type(self), (self.shard,) if self.args == (self.shard,) else (self.shard, self.reason))


def shard_name(index: int) -> str:
    """The file name of shard ``index`` (``shard-000042.tar``)."""
    return f"shard-{index:06d}.tar"


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _tar_header(name: str, size: int) -> bytes:
    """The USTAR header ``tarfile`` writes for a regular file with fixed metadata (mtime 0, root, 0644)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


class _HeaderTemplate:
    """``_tar_header`` for many names of one length and one size, without building a TarInfo each time.

    Building the header is most of the writer's per-sequence cost; only the name and checksum differ
    between samples, so they are patched into a template (byte-identical to ``_tar_header``; tested).
    """

    def __init__(self, name_length: int, size: int):
        self.template = bytearray(_tar_header("0" * name_length, size))
        self.template[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
        self.base_sum = sum(self.template) - sum(self.template[:name_length])
        self.name_length = name_length

    def header(self, name: bytes) -> bytes:
        assert len(name) == self.name_length
        header = self.template.copy()
        header[: self.name_length] = name
        header[148:155] = b"%06o\0" % (self.base_sum + sum(name))
        return bytes(header)


class _ShardWriter:
    """Writes sequences into ``shard-NNNNNN.tar`` files of ``shard_size`` samples each.

    Each shard is written under a hidden temporary name, hashed while written, fsynced and renamed, so
    a shard under its final name is always complete.
    """

    def __init__(self, directory: Path, shard_size: int, dtype: np.dtype):
        self.directory = directory
        self.shard_size = shard_size
        self.dtype = dtype
        self.shards: list[dict[str, Any]] = []
        self.num_sequences = 0
        self.num_tokens = 0
        self._handle = None
        self._digest = None
        self._in_shard = 0
        self._bytes = 0
        self._npy_headers: dict[int, bytes] = {}
        self._tar_headers: dict[int, _HeaderTemplate] = {}

    def _write(self, data: bytes) -> None:
        try:
            self._handle.write(data)
        except OSError as err:
            raise self._named(err) from err
        self._digest.update(data)
        self._bytes += len(data)

    def _named(self, err: OSError) -> OSError:
        """``err`` naming the shard being written (a full disk's error names no file)."""
        return OSError(err.errno, err.strerror, str(self.directory / shard_name(len(self.shards))))

    def write(self, sequence: np.ndarray) -> None:
        if self._handle is None:
            name = shard_name(len(self.shards))
            self._handle = open(self.directory / f".{name}.tmp", "wb")
            self._digest = hashlib.sha256()
            self._in_shard = 0
            self._bytes = 0
        header = self._npy_headers.get(len(sequence))
        if header is None:
            header = self._npy_headers[len(sequence)] = _npy_header(self.dtype, len(sequence))
        payload = header + sequence.astype(self.dtype, copy=False).tobytes()
        # Keys are global sequence numbers: unique across shards and stable across runs.
        name = f"{self.num_sequences:012d}{SAMPLE_SUFFIX}".encode()
        template = self._tar_headers.get(len(payload))
        if template is None or template.name_length != len(name):
            template = self._tar_headers[len(payload)] = _HeaderTemplate(len(name), len(payload))
        self._write(template.header(name))
        self._write(payload)
        self._write(b"\0" * (-len(payload) % _TAR_BLOCK))
        self._in_shard += 1
        self.num_sequences += 1
        self.num_tokens += len(sequence)
        if self._in_shard == self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        self._write(b"\0" * (2 * _TAR_BLOCK))
        self._write(b"\0" * (-self._bytes % _TAR_RECORD))
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        except OSError as err:
            raise self._named(err) from err
        name = shard_name(len(self.shards))
        os.replace(self.directory / f".{name}.tmp", self.directory / name)
        self.shards.append(
            {
                "name": name,
                "num_sequences": self._in_shard,
                "num_bytes": self._bytes,
                "sha256": self._digest.hexdigest(),
            }
        )
        self._handle = None

    def close(self) -> list[dict[str, Any]]:
        if self._handle is not None:
            self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (after an error), leaving no temporary file behind."""
        if self._handle is not None:
            try:  # closing flushes the buffer, which fails again on a full disk: the file goes all the same
                with contextlib.suppress(OSError):
                    self._handle.close()
            finally:
                (self.directory / f".{shard_name(len(self.shards))}.tmp").unlink(missing_ok=True)
                self._handle = None


_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER_CACHE: dict[bytes, tuple[np.dtype, int]] = {}


def _parse_npy_header(header: bytes) -> tuple[np.dtype, int]:
    parsed = _NPY_HEADER_CACHE.get(header)
    if parsed is None:
        spec = ast.literal_eval(header.decode("latin1"))
        shape = spec["shape"]
        if spec.get("fortran_order") or len(shape) != 1:
            raise ValueError(f"expected a 1-D array, found shape {shape}")
        parsed = _NPY_HEADER_CACHE[header] = (np.dtype(spec["descr"]), int(shape[0]))
    return parsed


def shard_problem(path: Path, shard: dict) -> str | None:
    """Why the shard file ``path`` is not the one its manifest entry ``shard`` describes, by existence and size
    (``num_bytes``, where recorded); None when it looks whole. Reading and checksums are the callers' part."""
    if not path.is_file():
        return "is not a file (a directory or another kind of entry)" if path.exists() else "file is missing"
    size = path.stat().st_size
    if "num_bytes" in shard and size != shard["num_bytes"]:
        return f"size is {size} bytes, manifest says {shard['num_bytes']} (truncated?)"
    return None


def read_shard(path: str | os.PathLike, expected_num_sequences: int | None = None) -> list[np.ndarray]:
    """Read a shard's ``input_ids`` arrays, in file order, validating the tar and npy structure.

    A hand-rolled reader: shards are USTAR archives of small members, and parsing them directly is several
    times faster than ``tarfile`` (the stream's throughput is bound by this loop). Members with other
    suffixes are ignored, as WebDataset readers would.

    Args:
        path: the shard file.
        expected_num_sequences: the manifest's count for this shard, checked when given.

    Returns:
        1-D arrays (views into the file's bytes) in key order.

    Raises:
        CorruptShardError: naming the shard, for a missing file, a truncated or malformed archive, or a
            sequence count different from the manifest's.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CorruptShardError(path, f"cannot be read ({error.strerror or error})") from None
    arrays: list[np.ndarray] = []
    offset = 0
    size_total = len(data)
    try:
        while True:
            if offset + _TAR_BLOCK > size_total:
                raise ValueError(f"archive ends without an end marker at byte {offset} (file truncated?)")
            header = data[offset : offset + _TAR_BLOCK]
            if header[0] == 0 and not header.strip(b"\0"):
                break  # end-of-archive marker
            checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError(f"bad tar header checksum at byte {offset}")
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            start = offset + _TAR_BLOCK
            end = start + size
            if end > size_total:
                raise ValueError(f"member {name} needs {size} bytes but the file ends at byte {size_total} (truncated)")
            offset = start + size + (-size % _TAR_BLOCK)
            if header[156:157] not in (b"0", b"\0") or not name.endswith(SAMPLE_SUFFIX):
                continue
            if data[start : start + 6] != _NPY_MAGIC or size < 10:
                raise ValueError(f"member {name} is not a .npy array ({size} bytes)")
            if data[start + 6] == 1:
                header_len, body = int.from_bytes(data[start + 8 : start + 10], "little"), start + 10
            else:
                header_len, body = int.from_bytes(data[start + 8 : start + 12], "little"), start + 12
            if body + header_len > end:
                raise ValueError(f"member {name} is {size} bytes, too short for its .npy header")
            try:
                dtype, length = _parse_npy_header(data[body : body + header_len])
            except (ValueError, SyntaxError, KeyError, TypeError) as error:
                raise ValueError(f"member {name} has a malformed .npy header ({error})") from None
            body += header_len
            if body + length * dtype.itemsize != end:
                raise ValueError(f"member {name} holds {end - body} bytes for {length} x {dtype}")
            arrays.append(np.frombuffer(data, dtype=dtype, count=length, offset=body))
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptShardError(path, str(error)) from None
    if expected_num_sequences is not None and len(arrays) != expected_num_sequences:
        raise CorruptShardError(path, f"holds {len(arrays)} sequences, manifest says {expected_num_sequences}")
    return arrays


def read_manifest(shards_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and validate ``manifest.json`` of a corpus directory.

    Raises:
        FileNotFoundError: when the directory or its manifest is missing.
        ValueError: when a required field is missing or the format version is unknown.
    """
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: {shards_dir} is not a prepared corpus (run launch/prepare_corpus.py; "
            "an interrupted run leaves no manifest)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); prepare the corpus again") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    for field in ("format_version", "tokenizer", "seq_len", "num_sequences", "shards"):
        if field not in manifest:
            raise ValueError(f"{path}: missing field '{field}'")
    for index, shard in enumerate(manifest["shards"]):
        missing = [key for key in ("name", "num_sequences") if not isinstance(shard, dict) or key not in shard]
        if missing:
            raise ValueError(f"{path}: shards[{index}] lacks {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path}: field 'format_version' is {manifest['format_version']}, this version reads {FORMAT_VERSION}"
        )
    return manifest
