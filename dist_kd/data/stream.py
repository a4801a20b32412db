"""The corpus stream: shards -> int64 batches, split across ranks and DataLoader workers, resumable exactly.

``build_corpus_loader`` returns a ``CorpusStream``: iterate it for the rest of the current epoch, save
``state_dict()`` with the checkpoint, ``load_state_dict()`` before iterating after a restart. Ranks and
world size are arguments (the trainer takes them from ``dist_kd.distributed``); nothing here reads the
environment or ``torch.distributed``, so several ranks can be simulated in one process.

How an epoch is laid out (all of it a pure function of the manifest, the seed and the epoch):

1. **Order.** The shards are permuted with ``(seed, epoch)`` (identity when ``shuffle=False``) and their
   sequences concatenated into one virtual list of the epoch. With shuffling, the layout of every epoch
   after the first starts at a position of that list drawn from ``(seed, epoch)`` and wraps around to its
   beginning.
2. **Ranks.** With ``M`` sequences in the epoch, rank ``r`` takes the contiguous range
   ``[r * M // world, (r + 1) * M // world)`` and uses its first ``num_batches * micro_batch_size``,
   where ``num_batches = (M // world) // micro_batch_size`` is the same on every rank.
   **Remainder policy:** every rank must run the same number of steps (DeepSpeed collectives would hang
   otherwise) with full micro-batches, so the up to ``world * micro_batch_size - 1`` sequences that do not
   fill a micro-batch on every rank are left out of that epoch, and never padded or wrapped. With shuffling
   they are different sequences each epoch (the layout starts elsewhere, a corpus of one shard included);
   without it the same tail is dropped.
   Every other sequence of the epoch is delivered exactly once across all ranks and workers.
3. **Workers.** A rank's batches are split into contiguous runs, one per DataLoader worker (the first
   ``num_batches % num_workers`` workers get one more). The DataLoader takes batches from its workers
   round-robin, so the batch order is a deterministic function of the layout.
4. **Shuffle.** Besides the shard order, each worker permutes its sequences in consecutive windows of
   ``shuffle_buffer`` (a bounded buffer: memory is one window, not the corpus), seeded by
   ``(seed, epoch, generation, rank, worker, window)``; windows make the shuffle seekable, which is what
   makes resume exact.

**State** (``state_dict``) is ``epoch`` + the epoch's layout (``intervals`` of the virtual list still to
deliver, ``generation``) + ``batches_consumed`` on this rank. It holds no rank id and is the same on every
rank at the same step, so saving rank 0's copy is enough. Batches are counted in the main process as they
are handed out; a restarted stream sends each worker straight to its position (the shard and offset are
computed, not replayed) and rotates the workers so the round-robin continues with the right one, so the
following batches are exactly those the uninterrupted run would have produced.

**Resize policy:** restoring a state saved with another ``world_size`` (or ``num_workers``,
``micro_batch_size``, ``shuffle_buffer``) continues the same epoch without repeating anything: each old
worker's range minus what it delivered is kept (with shuffling, a partly delivered window counts as
delivered, so up to ``shuffle_buffer - 1`` sequences per old worker are skipped for the rest of that
epoch), and that remainder is laid out afresh over the new ranks and workers (``generation`` + 1). The
next epoch starts from the full corpus. Seed, shuffle and the corpus itself must not change (an error).

**Corrupt shards.** At construction every shard is checked for existence and size (``num_bytes`` in the
manifest; ``verify_checksums=True`` also compares sha256, reading everything). A bad shard is a
``CorruptShardError`` naming it, or with ``skip_corrupt=True`` a warning, and the shard is left out of
every epoch's layout (identically on all ranks, as they read the same files). Damage found only while
reading (a malformed tar member) is likewise an error naming the shard, or with ``skip_corrupt`` a warning
and the shard's sequences in that batch become fully padded rows with an all-zero attention mask, which
keeps the number of steps equal on all ranks. Skipped shards are counted in ``skipped_shards``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing.util  # noqa: F401 - its exit handler must be registered before ours
import os
import signal
import sys
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_kd.data.shards import CorruptShardError, read_manifest, read_shard, shard_problem
from dist_kd.data.tokenizer import check_tokenizer_matches
from dist_kd.distributed import RANK_SPECIFIC
from dist_kd.io import sha256_file

logger = logging.getLogger(__name__)

STATE_VERSION = 1
Interval = tuple[int, int]


def check_token_ids(path: Path, arrays: list[np.ndarray], vocab_size: int, seq_len: int | None = None) -> None:
    """Every token id of a shard within the tokenizer's vocabulary (damaged bytes that keep the tar valid
    would otherwise reach the embedding lookup as an ``IndexError`` that names no file), and every sequence
    within the manifest's ``seq_len`` (an edited manifest was a NumPy broadcast error naming no file).

    Raises:
        CorruptShardError: naming the shard, the sequence and the id.
        ValueError: a sequence longer than ``seq_len``: the manifest does not describe the corpus, which
            ``skip_corrupt`` must not skip shard by shard (every row would be masked, a run on nothing).
    """
    if seq_len:
        longer = next((number for number, ids in enumerate(arrays) if len(ids) > seq_len), None)
        if longer is not None:
            raise ValueError(
                f"corpus shard {path}: sequence {longer} has {len(arrays[longer])} tokens, more than the seq_len "
                f"{seq_len} of {path.parent / 'manifest.json'} (the manifest edited, or shards of another corpus?)"
            )
    if not vocab_size or not arrays:
        return
    for number, ids in enumerate(arrays):
        if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
            bad = int(ids[(ids >= vocab_size) | (ids < 0)][0])
            raise CorruptShardError(
                path,
                f"sequence {number} holds token id {bad}, outside the tokenizer's vocabulary 0..{vocab_size - 1} "
                "(damaged bytes? data.verify_checksums: true compares every shard with its manifest sha256)",
            )


def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order in which shards form the epoch's virtual list (manifest indices)."""
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def _merge(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _subtract(intervals: list[Interval], removed: list[Interval]) -> list[Interval]:
    """``intervals`` minus ``removed`` (both lists of half-open ranges)."""
    out: list[Interval] = []
    removed = _merge(removed)
    for start, end in _merge(intervals):
        cursor = start
        for cut_start, cut_end in removed:
            if cut_end <= cursor or cut_start >= end:
                continue
            if cut_start > cursor:
                out.append((cursor, cut_start))
            cursor = max(cursor, cut_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def _subtract_in_order(intervals: list[Interval], removed: list[Interval]) -> list[Interval]:
    """``intervals`` (disjoint, in layout order) minus ``removed``, in the same order (touching pieces joined):
    :func:`_subtract` sorts them, which would undo an epoch's seeded start."""
    out: list[Interval] = []
    for start, end in intervals:
        for piece in _subtract([(start, end)], removed):
            if out and out[-1][1] == piece[0]:
                out[-1] = (out[-1][0], piece[1])
            else:
                out.append(piece)
    return out


def rotate_intervals(intervals: list[Interval], offset: int) -> list[Interval]:
    """``intervals``, their concatenation started ``offset`` positions in and wrapped around to its beginning."""
    out, tail = [], []
    for start, end in intervals:
        length = end - start
        if offset >= length:
            tail.append((start, end))
        elif offset > 0:
            out.append((start + offset, end))
            tail.append((start, start + offset))
        else:
            out.append((start, end))
        offset = max(offset - length, 0)
    return out + tail


def _rank_workers(total: int, world_size: int, num_workers: int, batch_size: int, rank: int) -> list[tuple[int, int]]:
    """(layout start, number of batches) of each worker of ``rank`` (see the module docstring)."""
    per_rank = total // world_size
    num_batches = per_rank // batch_size
    start = rank * per_rank
    row = []
    for worker in range(num_workers):
        count = num_batches // num_workers + (1 if worker < num_batches % num_workers else 0)
        row.append((start, count))
        start += count * batch_size
    return row


def _consumed_batches(batches_consumed: int, num_workers: int, worker: int) -> int:
    """Batches worker ``worker`` delivered after the rank delivered ``batches_consumed`` round-robin."""
    return batches_consumed // num_workers + (1 if worker < batches_consumed % num_workers else 0)


class _EpochPlan:
    """Maps layout positions (the epoch's remaining intervals, concatenated) to shards and offsets."""

    def __init__(self, shard_counts: np.ndarray, order: np.ndarray, intervals: list[Interval]):
        self.order = order
        self.shard_starts = np.concatenate([[0], np.cumsum(shard_counts[order])]).astype(np.int64)
        self.intervals = [(int(s), int(e)) for s, e in intervals if e > s]
        lengths = [end - start for start, end in self.intervals]
        self.layout_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.total = int(self.layout_starts[-1])

    def to_virtual(self, start: int, end: int) -> list[Interval]:
        out = []
        index = int(np.searchsorted(self.layout_starts, start, side="right")) - 1
        while start < end:
            first, last = self.intervals[index]
            offset = start - int(self.layout_starts[index])
            take = min(end - start, last - first - offset)
            out.append((first + offset, first + offset + take))
            start += take
            index += 1
        return out

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(manifest shard index, first, last) runs covering layout positions ``[start, end)``, in order."""
        out = []
        for first, last in self.to_virtual(start, end):
            slot = int(np.searchsorted(self.shard_starts, first, side="right")) - 1
            while first < last:
                shard_start, shard_end = int(self.shard_starts[slot]), int(self.shard_starts[slot + 1])
                take = min(last, shard_end) - first
                if take > 0:
                    out.append((int(self.order[slot]), first - shard_start, first - shard_start + take))
                    first += take
                slot += 1
        return out

    def shard_range(self, shard_index: int) -> Interval:
        slot = int(np.flatnonzero(self.order == shard_index)[0])
        return int(self.shard_starts[slot]), int(self.shard_starts[slot + 1])


class _PieceReader:
    """Reads positions of one worker's range, keeping the last two shards parsed."""

    def __init__(self, pieces: list[tuple[int, int, int]], spec: dict[str, Any]):
        self.pieces = pieces
        self.piece_starts = np.concatenate([[0], np.cumsum([hi - lo for _, lo, hi in pieces])]).astype(np.int64)
        self.spec = spec
        self.cache: OrderedDict[int, list[np.ndarray] | None] = OrderedDict()
        self.reported: set[str] = set()
        self.newly_skipped: list[tuple[str, str]] = []

    def _shard(self, index: int) -> list[np.ndarray] | None:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        name = self.spec["shard_names"][index]
        try:
            arrays = read_shard(Path(self.spec["shards_dir"]) / name, int(self.spec["shard_counts"][index]))
            check_token_ids(
                Path(self.spec["shards_dir"]) / name, arrays, self.spec.get("vocab_size", 0), self.spec["seq_len"]
            )
        except CorruptShardError as error:
            if not self.spec["skip_corrupt"]:
                raise
            arrays = None
            if name not in self.reported:
                self.reported.add(name)
                self.newly_skipped.append((name, error.reason))
        self.cache[index] = arrays
        if len(self.cache) > 2:
            self.cache.popitem(last=False)
        return arrays

    def read(self, start: int, end: int) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        index = int(np.searchsorted(self.piece_starts, start, side="right")) - 1
        while start < end:
            shard, first, last = self.pieces[index]
            offset = start - int(self.piece_starts[index])
            take = min(end - start, last - first - offset)
            arrays = self._shard(shard)
            if arrays is None:
                out.extend([None] * take)  # skip_corrupt: becomes a fully masked row
            else:
                out.extend(arrays[first + offset : first + offset + take])
            start += take
            index += 1
        return out


def _ignore_stop_signals(_worker_id: int) -> None:
    """A DataLoader worker leaves SIGTERM, SIGINT and SIGUSR1 to its trainer, however many come. ``scancel``, a
    preemption, the launchers and Ctrl-C signal the whole process group, and the ``deepspeed`` and ``torchrun``
    launchers then pass the signal on to each rank's processes: torch's worker handler died on SIGTERM (an
    earlier version let one SIGTERM pass and died of the launcher's), and the trainer, saving its checkpoint,
    failed with "DataLoader worker ... is killed by signal: Terminated". No Python handler: one that took a
    lock deadlocked when a second SIGTERM came while it ran.

    A worker that does not end when told (stuck reading a stalled filesystem) therefore outlives torch's
    SIGTERM: the trainer's close ends it with SIGKILL (:func:`_close_loader`), and so does the interpreter's
    exit for loaders still open, before multiprocessing's own clean-up would wait on it for ever.
    """
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by the trainer while it forked this worker


_STOP_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while it starts a loader's workers: a forked worker inherits the
    mask and so passes a group's SIGTERM over even before its ``worker_init_fn`` runs (torch's own handler, set
    first, ended it: a preemption landing at an epoch's start crashed the rank). The trainer's own signals wait
    meanwhile (milliseconds) and then reach its handler."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# The iterators of the loaders whose workers run: closed at the interpreter's exit too, before multiprocessing's
# own clean-up signals the workers still running and waits for them (a trainer's error path that kept the
# iterator referenced hung there).
_OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()


def _close_loader(source: Any) -> None:
    """End the workers of ``source``, a DataLoader iterator: torch's shutdown tells them to end and waits; one
    still running then (stuck, past torch's SIGTERM, which it passes over) is killed."""
    if sys.is_finalizing():  # the exit handler closed it; the module's globals may be gone
        return
    _OPEN_LOADERS.discard(source)
    shutdown = getattr(source, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in getattr(source, "_workers", None) or []:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _close_every_loader() -> None:
    for source in list(_OPEN_LOADERS):
        _close_loader(source)


# Exit handlers run newest first: this one before multiprocessing's, registered when it was imported (above).
atexit.register(_close_every_loader)


def _collate(items: list[np.ndarray | None], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if all(item is not None and len(item) == seq_len for item in items):
        input_ids = torch.from_numpy(np.stack(items).astype(np.int64))
        return input_ids, torch.ones_like(input_ids)
    input_ids = np.full((len(items), seq_len), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(items), seq_len), dtype=np.int64)
    for row, item in enumerate(items):
        if item is not None:
            input_ids[row, : len(item)] = item
            attention_mask[row, : len(item)] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)


class _WorkerDataset(IterableDataset):
    """What one DataLoader worker (or the main process) iterates: its run of batches, from its position.

    ``spec`` is a plain dict snapshot of the stream's state, so it pickles to worker processes cheaply.
    """

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if get_worker_info() is None:
            yield from self._batches()
            return
        # In a DataLoader worker, a corrupt shard goes to the trainer as an item: torch would re-raise it as a
        # "Caught CorruptShardError in DataLoader worker" traceback whose message is that whole text, where the
        # user wants the one line naming the shard. Any other error keeps torch's way, with the worker's traceback.
        try:
            yield from self._batches()
        except CorruptShardError as err:
            yield {"_error": err}

    def _batches(self) -> Iterator[dict[str, Any]]:
        spec = self.spec
        info = get_worker_info()
        num_workers = spec["num_workers"]
        assert (info.num_workers if info else 1) == num_workers, "DataLoader workers differ from the layout"
        worker = ((info.id if info else 0) + spec["rotation"]) % num_workers
        batch_size, window = spec["micro_batch_size"], spec["window"]
        plan = _EpochPlan(spec["shard_counts"], spec["order"], spec["intervals"])
        start, num_batches = _rank_workers(plan.total, spec["world_size"], num_workers, batch_size, spec["rank"])[
            worker
        ]
        length = num_batches * batch_size
        position = spec["start_batches"][worker] * batch_size
        reader = _PieceReader(plan.pieces(start, start + length), spec)
        pending: list[np.ndarray | None] = []
        while position < length:
            window_index = position // window
            first, last = window_index * window, min((window_index + 1) * window, length)
            items = reader.read(first, last)
            if spec["shuffle"]:
                seed = [spec["seed"], spec["epoch"], spec["generation"], spec["rank"], worker, window_index]
                permutation = np.random.default_rng(seed).permutation(len(items))
                items = [items[i] for i in permutation]
            pending.extend(items[position - first :])
            position = last
            while len(pending) >= batch_size:
                batch, pending = pending[:batch_size], pending[batch_size:]
                input_ids, attention_mask = _collate(batch, spec["seq_len"], spec["pad_id"])
                skipped, reader.newly_skipped = reader.newly_skipped, []
                yield {
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "_worker": worker,
                    "_skipped": skipped,
                }
        assert not pending, "worker range is a whole number of batches"


class CorpusStream:
    """Batches ``{"input_ids", "attention_mask"}`` (int64, ``(micro_batch_size, seq_len)``) for one rank.

    Iterating yields the rest of the current epoch, then moves to the next epoch; loop over it again for
    more. See the module docstring for the layout, remainder, resume and resize policies.
    """

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        *,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 8192,
        skip_corrupt: bool = False,
        seq_len: int | None = None,
        verify_checksums: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        manifest: dict[str, Any] | None = None,
    ):
        """Read the manifest, check the shards and lay out epoch 0.

        Args:
            shards_dir: a directory written by ``prepare_corpus``.
            micro_batch_size: sequences per batch on this rank.
            rank: this rank, in ``[0, world_size)``.
            world_size: number of data-parallel ranks.
            num_workers: DataLoader worker processes; 0 reads in this process.
            seed: seed of the shard order and sample shuffle.
            shuffle: shuffle shards and samples (a new order each epoch).
            shuffle_buffer: sequences per shuffle window (memory per worker).
            skip_corrupt: skip corrupt shards with a warning instead of raising.
            seq_len: the sequence length the model expects; must equal the manifest's when given.
            verify_checksums: compare every shard's sha256 with the manifest at start (reads everything).
            pin_memory: pin batches (for asynchronous host-to-GPU copies).
            prefetch_factor: batches prefetched per worker.
            manifest: an already loaded manifest (read from ``shards_dir`` when None).

        Raises:
            FileNotFoundError: when the manifest is missing.
            ValueError: for bad arguments, a ``seq_len`` mismatch, or a corpus too small for one batch per rank.
            CorruptShardError: for a missing or damaged shard when ``skip_corrupt`` is false.
        """
        for name, value, low in (("micro_batch_size", micro_batch_size, 1), ("world_size", world_size, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, found {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), found {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, found {num_workers}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, found {shuffle_buffer}")
        self.shards_dir = Path(shards_dir)
        self.manifest = manifest if manifest is not None else read_manifest(shards_dir)
        if seq_len is not None and self.manifest["seq_len"] != seq_len:
            raise ValueError(
                f"{self.shards_dir / 'manifest.json'}: seq_len is {self.manifest['seq_len']}, the run expects {seq_len}"
            )
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.skip_corrupt = skip_corrupt
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.seq_len = int(self.manifest["seq_len"])
        self.pad_id = int(self.manifest.get("special_tokens", {}).get("pad", 0))
        self.vocab_size = int(self.manifest["tokenizer"].get("vocab_size") or 0)  # 0: unknown, not checked
        self._names = [shard["name"] for shard in self.manifest["shards"]]
        self._corpus_digest: str | None = None
        self._counts = np.array([int(shard["num_sequences"]) for shard in self.manifest["shards"]], dtype=np.int64)
        if int(self._counts.sum()) != int(self.manifest["num_sequences"]):
            raise ValueError(
                f"{self.shards_dir / 'manifest.json'}: num_sequences is {self.manifest['num_sequences']} but the "
                f"shards hold {int(self._counts.sum())}"
            )
        self.skipped_shards: dict[str, str] = {}
        self._excluded = self._check_shards(verify_checksums)
        self._iteration = 0
        self._start_epoch(0)
        if self.num_batches_per_epoch == 0:
            usable = int(self._counts.sum()) - int(self._counts[self._excluded].sum())
            raise ValueError(
                f"corpus {self.shards_dir} has {usable} usable sequences, fewer than one micro-batch per rank "
                f"(world_size {world_size} x micro_batch_size {micro_batch_size})"
            )

    # -- layout ----------------------------------------------------------------------------------------

    @property
    def _logical_workers(self) -> int:
        return max(1, self.num_workers)

    @property
    def _window(self) -> int:
        # Without shuffling the window only sets the read granularity; a whole number of batches keeps it simple.
        return self.shuffle_buffer if self.shuffle else max(self.micro_batch_size, 1024)

    def _check_shards(self, verify_checksums: bool) -> list[int]:
        excluded = []
        for index, shard in enumerate(self.manifest["shards"]):
            path = self.shards_dir / shard["name"]
            reason = shard_problem(path, shard)
            if reason is None and verify_checksums and sha256_file(path) != shard["sha256"]:
                reason = "sha256 differs from the manifest's"
            if reason is None:
                continue
            if not self.skip_corrupt:
                raise CorruptShardError(path, reason + " (set data.skip_corrupt: true to skip such shards)")
            logger.warning("skipping corrupt corpus shard %s: %s", path, reason)
            self.skipped_shards[shard["name"]] = reason
            excluded.append(index)
        return excluded

    def _full_intervals(self, epoch: int) -> list[Interval]:
        plan = _EpochPlan(self._counts, self._order(epoch), [(0, int(self._counts.sum()))])
        intervals = _subtract(plan.intervals, [plan.shard_range(index) for index in self._excluded])
        total = sum(end - start for start, end in intervals)
        if not self.shuffle or total == 0 or epoch == 0:
            return intervals
        # After the first epoch, the layout starts at a seeded position of the virtual list and wraps around, so
        # that the sequences left out (the layout's tail, each rank's last part batch) differ each epoch: a new
        # shard order alone moved nothing in a corpus of one shard. The first epoch is laid out as before.
        return rotate_intervals(intervals, int(np.random.default_rng([self.seed, epoch, 1]).integers(total)))

    def _order(self, epoch: int) -> np.ndarray:
        return epoch_shard_order(len(self._names), self.seed, epoch, self.shuffle)

    def _start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._generation = 0
        self._intervals = self._full_intervals(epoch)
        self._batches_consumed = 0

    def _layout_batches(self) -> int:
        total = sum(end - start for start, end in self._intervals)
        return (total // self.world_size) // self.micro_batch_size

    @property
    def epoch(self) -> int:
        """The epoch being delivered (0-based)."""
        return self._epoch

    @property
    def batches_consumed(self) -> int:
        """Batches this rank has delivered in the current epoch layout."""
        return self._batches_consumed

    @property
    def num_batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the same on every rank)."""
        total = int(self._counts.sum()) - int(self._counts[self._excluded].sum())
        return (total // self.world_size) // self.micro_batch_size

    def __len__(self) -> int:
        return self.num_batches_per_epoch

    @property
    def num_skipped_shards(self) -> int:
        """Corrupt shards skipped so far (``skip_corrupt=True``), found at start or while reading."""
        return len(self.skipped_shards)

    # -- iteration -------------------------------------------------------------------------------------

    def _spec(self) -> dict[str, Any]:
        num_workers = self._logical_workers
        rotation = self._batches_consumed % num_workers
        return {
            "shards_dir": str(self.shards_dir),
            "shard_names": self._names,
            "shard_counts": self._counts,
            "order": self._order(self._epoch),
            "intervals": list(self._intervals),
            "epoch": self._epoch,
            "generation": self._generation,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "window": self._window,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": num_workers,
            "micro_batch_size": self.micro_batch_size,
            "seq_len": self.seq_len,
            "pad_id": self.pad_id,
            "vocab_size": self.vocab_size,
            "skip_corrupt": self.skip_corrupt,
            "start_batches": [_consumed_batches(self._batches_consumed, num_workers, w) for w in range(num_workers)],
            # DataLoader worker i plays layout worker (i + rotation): its round-robin then resumes with the
            # worker whose turn it was when the state was saved.
            "rotation": rotation,
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._batches_consumed >= self._layout_batches():
            self._start_epoch(self._epoch + 1)
        self._iteration += 1
        iteration = self._iteration
        dataset = _WorkerDataset(self._spec())
        if self.num_workers == 0:
            source = iter(dataset)
        else:
            with _stop_signals_blocked():
                source = iter(
                    DataLoader(
                        dataset,
                        batch_size=None,
                        num_workers=self.num_workers,
                        pin_memory=self.pin_memory,
                        prefetch_factor=self.prefetch_factor,
                        # Its own generator: starting an iterator otherwise draws the workers' base seed from the
                        # global torch RNG, which also drives dropout, so a resumed run (whose iterator starts
                        # after the checkpoint's RNG state is restored) would draw other dropout masks.
                        generator=torch.Generator().manual_seed(self.seed),
                        worker_init_fn=_ignore_stop_signals,
                    )
                )
            _OPEN_LOADERS.add(source)  # closed at the latest when the interpreter exits
        return self._track(source, iteration)

    def _track(self, source: Iterator[dict[str, Any]], iteration: int) -> Iterator[dict[str, torch.Tensor]]:
        try:
            yield from self._tracked(source, iteration)
        finally:
            # The workers end with the iterator, whatever ends it: an error of the data left them running, and
            # at the interpreter's exit multiprocessing's SIGTERM to each (which they pass over, leaving stop
            # signals to the trainer) then hung the trainer after its error line until the job's time limit.
            _close_loader(source)

    def _tracked(self, source: Iterator[dict[str, Any]], iteration: int) -> Iterator[dict[str, torch.Tensor]]:
        num_workers = self._logical_workers
        for batch in source:
            if "_error" in batch:
                raise batch["_error"]  # a worker's (see _WorkerDataset.__iter__), as the main process raises it
            if iteration != self._iteration:
                raise RuntimeError("a CorpusStream iterator was used after a newer one was started")
            worker = batch.pop("_worker")
            assert worker == self._batches_consumed % num_workers, "batch arrived out of round-robin order"
            for name, reason in batch.pop("_skipped"):
                if name not in self.skipped_shards:
                    # found by this rank's reading alone: the other ranks read other shards
                    logger.warning(
                        "skipping corrupt corpus shard %s: %s", self.shards_dir / name, reason, extra=RANK_SPECIFIC
                    )
                    self.skipped_shards[name] = reason
            # Counted before it is handed out: a state saved after the step that used it must include it.
            self._batches_consumed += 1
            yield batch
        if iteration == self._iteration and self._batches_consumed >= self._layout_batches():
            self._start_epoch(self._epoch + 1)

    # -- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The stream position: JSON-ready, identical on every rank at the same step."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_sequences": int(self._counts.sum()),
            "num_shards": len(self._names),
            "corpus": self.corpus_digest(),
            "world_size": self.world_size,
            "num_workers": self._logical_workers,
            "micro_batch_size": self.micro_batch_size,
            "window": self._window,
            "excluded_shards": [self._names[index] for index in self._excluded],
            "epoch": self._epoch,
            "generation": self._generation,
            "intervals": [[start, end] for start, end in self._intervals],
            "batches_consumed": self._batches_consumed,
        }

    def corpus_digest(self) -> str:
        """A digest of the manifest's shards (names, sequence counts, sha256 in order): the positions a state
        holds point at these sequences. A corpus of other shards with the same totals passed the totals' check
        and was read from positions that meant other sequences."""
        if self._corpus_digest is None:
            shards = self.manifest["shards"]
            listed = [[shard["name"], int(shard["num_sequences"]), shard.get("sha256")] for shard in shards]
            self._corpus_digest = hashlib.sha256(json.dumps(listed).encode()).hexdigest()
        return self._corpus_digest

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (call before iterating).

        With the same world size, workers and batch size the next batches are exactly those of the
        uninterrupted run; otherwise the rest of the epoch is laid out afresh (module docstring).

        Raises:
            ValueError: when the state comes from another corpus, seed or shuffle setting.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"corpus stream state has version {state.get('version')}, expected {STATE_VERSION}")
        current = self.state_dict()
        for field in ("seed", "shuffle", "num_sequences", "num_shards"):
            if state[field] != current[field]:
                raise ValueError(
                    f"corpus stream state field '{field}' is {state[field]!r} but this stream has {current[field]!r} "
                    f"(corpus {self.shards_dir}); resuming would not continue the same data order"
                )
        if state.get("corpus", current["corpus"]) != current["corpus"]:  # states of earlier releases lack it
            raise ValueError(
                f"corpus stream state comes from another corpus than {self.shards_dir} (its manifest's shards, their "
                "sequence counts or sha256 differ); resuming would read other sequences at the saved positions"
            )
        self._iteration += 1  # invalidates iterators over the old position
        self._epoch = int(state["epoch"])
        intervals = [(int(start), int(end)) for start, end in state["intervals"]]
        same_layout = all(state[key] == current[key] for key in ("world_size", "num_workers", "micro_batch_size"))
        same_layout = same_layout and (state["window"] == current["window"] or not self.shuffle)
        same_layout = same_layout and state["excluded_shards"] == current["excluded_shards"]
        if same_layout:
            self._generation = int(state["generation"])
            self._intervals = intervals
            self._batches_consumed = int(state["batches_consumed"])
            return
        plan = _EpochPlan(self._counts, self._order(self._epoch), intervals)
        window = state["window"] if self.shuffle else 1
        delivered, passed_over = [], 0
        for rank in range(state["world_size"]):
            row = _rank_workers(plan.total, state["world_size"], state["num_workers"], state["micro_batch_size"], rank)
            for worker, (start, num_batches) in enumerate(row):
                handed_out = _consumed_batches(state["batches_consumed"], state["num_workers"], worker)
                handed_out *= state["micro_batch_size"]
                done = min(num_batches * state["micro_batch_size"], math.ceil(handed_out / window) * window)
                passed_over += done - handed_out  # the rest of a shuffle window read in part: not known which
                delivered.append((start, start + done))
        remaining = []
        for start, end in _subtract([(0, plan.total)], delivered):
            remaining.extend(plan.to_virtual(start, end))
        newly_excluded = set(current["excluded_shards"]) - set(state["excluded_shards"])
        cut = [plan.shard_range(self._names.index(name)) for name in sorted(newly_excluded)]
        self._intervals = _subtract_in_order(remaining, cut)
        self._generation = int(state["generation"]) + 1
        self._batches_consumed = 0
        changed = [f"{key} {state[key]} -> {current[key]}" for key in ("world_size", "num_workers",
                   "micro_batch_size", "window", "excluded_shards") if state[key] != current[key]]  # fmt: skip
        left = sum(end - start for start, end in self._intervals)
        if passed_over:
            logger.warning(
                "corpus stream: epoch %d resumed with a new layout (%s): %d sequences of shuffle windows read in part "
                "are passed over in this epoch (which of them were used is not kept; keep the world size, "
                "data.num_workers and data.micro_batch_size to resume exactly); %d sequences left in the epoch",
                self._epoch, ", ".join(changed), passed_over, left,
            )  # fmt: skip
        else:
            logger.info(
                "corpus stream: epoch %d resumed with a new layout (%s); %d sequences left in the epoch",
                self._epoch, ", ".join(changed), left,
            )  # fmt: skip


def build_corpus_loader(
    shards_dir: str | os.PathLike,
    *,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 8192,
    skip_corrupt: bool = False,
    seq_len: int | None = None,
    teacher_tokenizer: Any = None,
    verify_checksums: bool = False,
    pin_memory: bool = False,
) -> CorpusStream:
    """Open a prepared corpus for one rank, after checking it against the teacher's tokenizer.

    Args:
        shards_dir: a directory written by ``prepare_corpus`` (``data.shards``).
        micro_batch_size: sequences per batch on this rank (``data.micro_batch_size``).
        rank: this data-parallel rank.
        world_size: number of data-parallel ranks.
        num_workers: DataLoader worker processes (``data.num_workers``); 0 reads in the calling process.
        seed: shuffle seed (``train.seed``).
        shuffle: shuffle shard order and samples, anew each epoch.
        shuffle_buffer: sequences per shuffle window.
        skip_corrupt: skip corrupt shards with a warning (``data.skip_corrupt``).
        seq_len: expected sequence length, checked against the manifest.
        teacher_tokenizer: the teacher's tokenizer or its directory; when given, a corpus tokenised with
            another tokenizer is an error.
        verify_checksums: check every shard's sha256 at start.
        pin_memory: pin batches for asynchronous copies to the GPU.

    Returns:
        The stream; iterate it for batches, save ``state_dict()`` in checkpoints.

    Raises:
        FileNotFoundError: when the corpus has no manifest.
        ValueError: for a tokenizer or ``seq_len`` mismatch or bad arguments.
        CorruptShardError: for a damaged shard (unless ``skip_corrupt``).
    """
    manifest = read_manifest(shards_dir)
    if teacher_tokenizer is not None:
        check_tokenizer_matches(manifest["tokenizer"], teacher_tokenizer, shards_dir)
    return CorpusStream(
        shards_dir,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=seed,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        skip_corrupt=skip_corrupt,
        seq_len=seq_len,
        verify_checksums=verify_checksums,
        pin_memory=pin_memory,
        manifest=manifest,
    )
