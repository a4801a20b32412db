"""Atomic file and directory writes.

Every output dist_kd produces (shards, manifests, Parquet stores, checkpoints, exported models) is written
to a temporary sibling first and renamed into place, so a crash or preemption never leaves a half-written
file under the final name and never damages what was there before.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any worker thread writes files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _ordinary_mode(path: Path, directory: bool) -> None:
    """Give a temporary file or directory the mode a plain ``open`` / ``mkdir`` would have.

    ``mkstemp`` and ``mkdtemp`` create owner-only entries (0600 / 0700), and the rename keeps that mode: a
    manifest, config or exported model would be unreadable by the rest of a cluster group.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


def _ordinary_modes_under(root: Path) -> None:
    """Give every file and directory under ``root`` the mode a plain ``open`` / ``mkdir`` would have.

    Writers inside an ``atomic_dir`` block may create owner-only files (safetensors' ``save_file`` makes
    ``model.safetensors`` 0600), which would leave an exported model unreadable by the cluster group. Files
    with an execute bit keep it (``0777 & ~umask``); symbolic links are left alone.
    """
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            if not os.path.islink(os.path.join(directory, name)):
                _ordinary_mode(Path(directory, name), directory=True)
        for name in files:
            file = Path(directory, name)
            if file.is_symlink():
                continue
            executable = os.stat(file).st_mode & 0o111
            _ordinary_mode(file, directory=bool(executable))


# Causes that can only come from writing: a full device, an exhausted quota, a read-only filesystem.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
WRITE_MESSAGES = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def error_causes(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from or during, outermost first."""
    causes: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in causes:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    return causes


def write_errno(err: BaseException) -> int | None:
    """The errno (:data:`WRITE_ERRNOS`) of the write failure that ``err`` or one of its causes reports, or None.

    safetensors and DeepSpeed report a full disk in errors of their own types, with the OS's text inside.
    """
    for cause in error_causes(err):
        if getattr(cause, "errno", None) in WRITE_ERRNOS:
            return cause.errno
        for number, message in zip(WRITE_ERRNOS, WRITE_MESSAGES, strict=True):
            if message in str(cause):
                return number
    return None


@contextlib.contextmanager
def _writes_named(final: Path) -> Iterator[None]:
    """A write failure inside an atomic write's block (a full disk, often raised by a library without any file
    name, or as its own error type: safetensors') becomes an OSError naming ``final``, raised from it."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised as it was unless it is a write failure
        number = write_errno(err)
        if number is None or (isinstance(err, OSError) and err.filename == str(final)):
            raise
        raise OSError(number, os.strerror(number), str(final)) from err


@contextlib.contextmanager
def _naming(final: Path) -> Iterator[None]:
    """An OSError making the temporary sibling of ``final`` names ``final`` (what the caller asked to write),
    not the hidden temporary name. Only around that: an error making ``final``'s directory names the
    directory."""
    try:
        yield
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(final)) from err


def fsync_path(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk. A directory on a filesystem that cannot
    flush one (some network filesystems refuse it with EINVAL) is left as it is: their renames are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if not (Path(path).is_dir() and err.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def sync_tree(root: str | os.PathLike) -> None:
    """:func:`fsync_path` for every file and directory under ``root`` (``root`` included): before a rename
    makes a new output the current one and the old one is deleted. Without it a node that crashed (or lost
    power) shortly after could leave the new files at their sizes but holding zeros, the old ones gone."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(directory, name))
        fsync_path(directory)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it onto ``path`` if the block succeeds.

    Args:
        path: the final file name.

    Yields:
        A temporary path in the same directory (same filesystem, so the rename is atomic).
    """
    final = Path(os.path.abspath(path))  # "out/." and "out/x/.." have no name to derive a temporary one from
    final.parent.mkdir(parents=True, exist_ok=True)  # its own error names the directory in the way
    with _naming(final):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    _ordinary_mode(tmp, directory=False)
    try:
        with _writes_named(final):
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _stat_fields(pid: int | str) -> list[str]:
    """Fields 3 on (state, ppid, ...) of Linux's /proc/PID/stat: after "pid (comm) ", whose comm may hold
    spaces and parentheses. Raises OSError or ValueError where it cannot be read."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def process_started(pid: int | str) -> float | None:
    """When process ``pid`` of this host began, in clock ticks since boot, from Linux's /proc (``"self"``: this
    process); None where that cannot be read or the process has ended (a zombie that was not reaped yet)."""
    try:
        fields = _stat_fields(pid)
        if fields[0] in ("Z", "X"):
            return None
        return float(fields[19])  # field 22, starttime
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` on this host (children, theirs, ...), from Linux's /proc (none where it cannot
    be read); those that left its process group or session (``setsid``) included, which killing the group misses."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            children.setdefault(int(_stat_fields(entry.name)[1]), []).append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def same_process(pid: int, started: object) -> bool:
    """Whether live process ``pid`` of this host is the one that began at ``started`` (as
    :func:`process_started` gave it then). False for a pid that is gone, a zombie, another process that has the
    pid now (used again, or one of another pid namespace under the same host name), a ``started`` that was not
    recorded, and where /proc cannot be read: callers decide what an unknown start means."""
    return isinstance(started, (int, float)) and pid_alive(pid) and process_started(pid) == started


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def listed(items, limit: int = 5) -> str:
    """The first ``limit`` of ``items``, comma-separated, with ", ..." where more were left out (for messages)."""
    return ", ".join(str(item) for item in items[:limit]) + (", ..." if len(items) > limit else "")


ABANDONED_S = 600.0  # a temporary directory unchanged this long, its writer's pid gone, was abandoned


def host_tag() -> str:
    """This host's name as it can stand in a file name (no "-": :func:`writer_tag`'s fields are split on it)."""
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def writer_tag() -> str:
    """``HOST-PID-``, the start of a temporary directory's name, so that the next writer on this host tells one
    left by a killed process (SIGKILL, the OOM killer: no cleanup ran) from one being written
    (:func:`killed_writer`)."""
    return f"{host_tag()}-{os.getpid()}-"


def killed_writer(directory: Path, tag: str, abandoned_s: float = ABANDONED_S) -> int | None:
    """The pid of the killed process that left ``directory``, or None when it may still be written.

    ``tag`` is the part of its name that :func:`writer_tag` began (``HOST-PID-XXXX``): HOST must be this host,
    PID no longer run, and nothing in the directory have changed for ``abandoned_s`` (a container that shares
    the host's name but not its process ids could be writing there; 0 where a lock already rules that out).
    Another form (another host's, an earlier release's name) is None too.
    """
    fields = tag.split("-")
    if len(fields) != 3 or fields[0] != host_tag() or not fields[1].isdigit():
        return None
    try:
        changed = max(path.stat().st_mtime for path in [directory, *directory.iterdir()])
    except OSError:  # removed meanwhile
        return None
    if time.time() - changed <= abandoned_s or pid_alive(int(fields[1])):
        return None
    return int(fields[1])


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; move it onto ``path`` if the block succeeds.

    An existing directory at ``path`` is replaced only after the new one is complete. Before the rename, the
    directory and everything in it get the modes the umask implies, whatever mode their writers chose. The
    temporary directory's name carries this host and pid, so that the one a killed process left (a whole
    model, for an export) is removed by a later write of ``path`` (:func:`killed_writer`). A symbolic link at
    ``path`` (a scratch directory linked in) is written through: the output replaces its target, and the link
    stays.
    """
    given = Path(os.path.abspath(path))  # "." has no name to derive a temporary one from
    # A link: the swap's renames would move the link itself aside, and rmtree refuses a link.
    final = given.resolve() if given.is_symlink() else given
    final.parent.mkdir(parents=True, exist_ok=True)  # its own error names the directory in the way
    old = final.with_name(f".{final.name}.old")  # the earlier output, whole, while the new one moves in
    trash = final.with_name(f".{final.name}.trash")  # what is being deleted: never put back
    if old.is_dir() and not old.is_symlink() and not final.exists():  # a swap killed between its two renames
        os.replace(old, final)  # the earlier output back
    for base in {given, final}:  # links an earlier release's swap of a link left beside it
        for link in (base.with_name(f".{base.name}.old"), base.with_name(f".{base.name}.trash")):
            if link.is_symlink():
                link.unlink()
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    prefix = f".{final.name}."
    for sibling in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        if sibling.is_dir() and killed_writer(sibling, sibling.name[len(prefix) : -len(".tmp")]) is not None:
            shutil.rmtree(sibling, ignore_errors=True)
    with _naming(final):
        tmp = Path(tempfile.mkdtemp(prefix=prefix + writer_tag(), suffix=".tmp", dir=final.parent))
    _ordinary_mode(tmp, directory=True)
    try:
        with _writes_named(final):
            yield tmp
            _ordinary_modes_under(tmp)
            sync_tree(tmp)
            if final.exists():
                if old.exists():  # a stale one beside a whole output
                    os.replace(old, trash)
                    shutil.rmtree(trash)
                os.replace(final, old)
                try:
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(old, final)  # the earlier output stays where it was
                    raise
                os.replace(old, trash)  # a deletion cut short leaves a .trash, never a half .old to restore
                fsync_path(final.parent)  # the renames on the disk before the earlier output goes
                shutil.rmtree(trash)
            else:
                os.replace(tmp, final)
                fsync_path(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


TMP_FILE_ABANDONED_S = 60.0  # an atomic_path temporary file (no pid in its name) unchanged this long


def recover_interrupted_writes(directory: Path) -> list[str]:
    """Put right what writes killed midway left in ``directory`` (one level); returns what was done, in words.

    Called by the process that has just taken a run directory's lock (:mod:`dist_kd.train.runlock`), so that
    no other run writes there: a model directory whose :func:`atomic_dir` swap was killed between its two
    renames (``.NAME.old`` with a ``config.json``, without ``NAME``: a finished task run's ``best/<task>`` that
    no later evaluation writes again) is put back; ``.NAME.trash`` beside a model ``NAME`` is deleted; the
    temporary directories of writers of this host whose process has ended (a whole model each, for an export)
    are removed whatever their age; and so are :func:`atomic_path`'s temporary files beside their file, once
    unchanged for a minute. :func:`atomic_dir` does the same for its own ``path`` alone, and only when that path
    is written again. Anything else (a directory that is not a model, another program's file) is left as it is.
    """
    done: list[str] = []
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return done
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or entry.is_symlink():
            continue
        try:
            if name.endswith((".old", ".trash")) and entry.is_dir():
                output = directory / name[1 : name.rindex(".")]
                if name.endswith(".old") and not output.exists() and (entry / "config.json").is_file():
                    os.replace(entry, output)
                    done.append(f"{output} put back (its replacement was killed midway)")
                elif name.endswith(".trash") and (output / "config.json").is_file():
                    shutil.rmtree(entry, ignore_errors=True)
            elif name.endswith(".tmp") and entry.is_dir():
                # .NAME.HOST-PID-XXXXXXXX.tmp (writer_tag); HOST may hold dots, so NAME ends at this host's
                head, mark, tail = name[: -len(".tmp")].rpartition(f".{host_tag()}-")
                if head and mark and (pid := killed_writer(entry, f"{host_tag()}-{tail}", abandoned_s=0)) is not None:
                    shutil.rmtree(entry, ignore_errors=True)
                    done.append(f"{entry} removed (left by process {pid}, which has ended)")
            elif (match := _TMP_FILE.match(name)) and entry.is_file() and (directory / match.group(1)).is_file():
                if time.time() - entry.stat().st_mtime > TMP_FILE_ABANDONED_S:
                    entry.unlink()
        except OSError:
            continue  # removed meanwhile, or not ours to change: the next write of that path deals with it
    return done


_TMP_FILE = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$")  # atomic_path's (tempfile.mkstemp's random part)


def check_replaceable_dir(
    output: str | os.PathLike,
    flag: str,
    strangers: Callable[[Path], list[str]],
    kind: str,
    example: str,
    replaced: str,
) -> Path:
    """Raise unless :func:`atomic_dir` may replace ``output``: absent, empty, or an earlier output of its kind.

    ``atomic_dir`` swaps the whole directory, so a directory holding anything else (a run directory, a home
    directory, ``.``, given by mistake) would lose it. Call this before the work, so a bad output costs none.

    Args:
        flag: how the user named it (``--output``), for the messages.
        strangers: the names in an existing directory that an earlier output of this kind does not have (none:
            it is replaced).
        kind: what an earlier output is, in words (``a previous evaluation``).
        example: a directory name to suggest (``eval``).
        replaced: which existing directory is replaced, in words (``one holding only predictions.jsonl and
            metrics.json``).

    Raises:
        ValueError: naming the directory, what in it is not an earlier output (or the directory this process
            cannot write the output in), and what to give instead.
    """
    output = Path(output)
    if within(Path.cwd(), output):
        raise ValueError(
            f"{flag} {output} is the current directory or holds it; the output replaces its directory whole: "
            f"give a directory of its own (e.g. {flag} {example})"
        )
    existing = next((path for path in (output, *output.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        where = f"{flag} {output}" if existing == output else f"{flag} {output}: {existing}"
        raise ValueError(f"{where} is a file; give a directory")
    # The copy is made beside the output and renamed onto it: a directory this process cannot write in was
    # found only there, after the work (an evaluation's inference, a head's training) was done and lost.
    parent = output.resolve().parent if existing == output else existing  # a link: its target's, as atomic_dir
    if parent is not None:
        try:
            tempfile.TemporaryDirectory(prefix=".dist_kd-probe-", dir=parent).cleanup()
        except OSError as err:
            raise ValueError(
                f"{flag} {output}: cannot write in {parent} ({err.strerror or err}); give a directory you can write to"
            ) from err
    others = sorted(strangers(output)) if output.is_dir() and any(output.iterdir()) else []
    if others:
        raise ValueError(
            f"{flag} {output} holds files other than {kind} ({listed(others)}); the output replaces its directory "
            f"whole, which would delete them: give a new or empty directory (e.g. {flag} {example}), or {replaced} "
            "(replaced)"
        )
    return output


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically, with sorted keys so that output is deterministic."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks so large files do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """sha256 of a HF directory's weights: the file's digest, or a digest over the shards' digests."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"model directory {model_dir} holds no *.safetensors or *.bin weights")
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def usable_cores() -> int:
    """The cores this process may run on: a SLURM or cgroup allocation's, not the whole node's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def within(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` is ``root`` or lies under it, both resolved (symbolic links and ``..`` followed)."""
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def check_output_outside_data(output: str | os.PathLike, flag: str, inputs: dict[str, Any]) -> None:
    """Refuse an output directory inside a data directory it reads: the data's digest (:func:`data_fingerprint`,
    what tells a rerun it may keep or resume its work) takes in every file under that directory, the run's own
    among them, so the same command run again found other data and refused to resume (a precompute's finished
    chunks lost) or to keep what it had made.

    Args:
        flag: how the user names the output (``--output``, ``run.output_dir``).
        inputs: flag or key -> the data path (None or empty: not given; a file: nothing to check).

    Raises:
        ValueError: naming both.
    """
    for key, given in inputs.items():
        if given and Path(given).is_dir() and within(output, given):
            raise ValueError(
                f"{flag} {output} lies inside {key} {given}: the data's digest would take in this run's own files, "
                f"and a rerun would take them for other data; give {flag} a directory outside it"
            )


def data_fingerprint(path: str | os.PathLike) -> str:
    """A sha256 that changes when the data under ``path`` changes (recorded in checkpoints, checked on resume).

    A directory with a manifest that lists its files with their own sha256 (a corpus' ``manifest.json``, a
    soft-target store's ``.manifest.json``) is identified by that list, so a terabyte corpus costs no read;
    any other file or directory by the names and bytes of its files.
    """
    path = Path(path)
    digest = hashlib.sha256()
    for name in ("manifest.json", ".manifest.json", "_manifest.json"):
        manifest = path / name
        if manifest.is_file():
            try:
                listed = json.loads(manifest.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            entries = listed.get("shards", listed.get("files")) if isinstance(listed, dict) else None
            if isinstance(entries, list) and entries and all(isinstance(e, dict) and e.get("sha256") for e in entries):
                digest.update(json.dumps([[e.get("name"), e["sha256"]] for e in entries]).encode())
                return digest.hexdigest()
            break
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0{sha256_file(file)}\0".encode())
    return digest.hexdigest()


# Every Parquet file dist_kd writes (soft-target stores, precompute chunks, augmented sets) carries what
# produced it as JSON under this schema-metadata key.
PARQUET_METADATA_KEY = b"dist_kd"


def encode_parquet_metadata(metadata: dict[str, Any]) -> dict[bytes, bytes]:
    """Schema metadata holding ``metadata`` under :data:`PARQUET_METADATA_KEY` (sorted keys: deterministic)."""
    return {PARQUET_METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}


def parquet_metadata_of(schema_metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The dist_kd JSON in a Parquet schema's metadata, or None when there is none (or it is not JSON)."""
    raw = (schema_metadata or {}).get(PARQUET_METADATA_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The dist_kd JSON of one Parquet file (read from its footer only).

    Raises:
        ValueError: the file carries none (it was not written by dist_kd).
    """
    import pyarrow.parquet as pq

    found = parquet_metadata_of(pq.read_schema(path).metadata)
    if found is None:
        raise ValueError(
            f"{path} has no '{PARQUET_METADATA_KEY.decode()}' Parquet metadata; was it written by dist_kd?"
        )
    return found


def write_parquet_atomic(table, path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Write a ``pyarrow.Table`` to one Parquet file with ``metadata`` (see above), atomically."""
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata(encode_parquet_metadata(metadata))
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def check_output_dir(output_dir: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse an output directory that is a file, before any work (found when the first output was written)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a directory: give a directory for the output")
