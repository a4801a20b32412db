"""length_grouped_order and the task sampler's length grouping: every row once per pass, batch boundaries
where the sampler draws them, and far less padding than a plain permutation."""

from __future__ import annotations

import numpy as np
import pytest

from dist_kd.data.encode import length_grouped_order
from dist_kd.data.multitask import TaskSampler


def _padding_share(lengths, order, batch_rows, first=0):
    bounds = [0, first] if first else [0]
    bounds += list(range(first + batch_rows, len(order), batch_rows)) + [len(order)]
    bounds = sorted(set(bounds))
    real = padded = 0
    for a, b in zip(bounds, bounds[1:]):
        batch = lengths[order[a:b]]
        real, padded = real + batch.sum(), padded + batch.max() * len(batch)
    return 1 - real / padded


@pytest.mark.parametrize(("size", "batch_rows", "first"), [(1000, 16, 0), (997, 32, 0), (501, 8, 5), (40, 16, 3)])
def test_order_is_a_permutation_with_homogeneous_batches(size, batch_rows, first):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 64, size=size)
    order = length_grouped_order(lengths, batch_rows, np.random.default_rng(1), group_batches=10, first_batch=first)
    assert sorted(order.tolist()) == list(range(size))
    plain = np.random.default_rng(1).permutation(size)
    if size >= 10 * batch_rows:
        assert _padding_share(lengths, order, batch_rows, first) < 0.5 * _padding_share(lengths, plain, batch_rows)
    again = length_grouped_order(lengths, batch_rows, np.random.default_rng(1), group_batches=10, first_batch=first)
    assert (again == order).all(), "deterministic for a given generator"


def test_batches_still_mix_the_whole_set():
    lengths = np.arange(2000) % 50 + 3
    order = length_grouped_order(lengths, 20, np.random.default_rng(3), group_batches=5)
    first_batches = order[: 20 * 10]
    # the first ten batches come from all over the set, not from its first rows
    assert first_batches.min() < 300 and first_batches.max() > 1700


def test_sampler_with_lengths_draws_every_row_once_per_epoch_in_grouped_batches():
    sizes, rows_per_batch = [103, 61], 8
    rng = np.random.default_rng(4)
    lengths = [rng.integers(4, 60, size=n) for n in sizes]
    sampler = TaskSampler(sizes, [1.0, 1.0], seed=5, rows_per_batch=rows_per_batch, lengths=lengths)
    drawn = {0: [], 1: []}
    spreads = []
    for _ in range(120):
        task, rows = sampler.next()
        assert len(rows) == rows_per_batch
        drawn[task].append(rows)
        spreads.append(np.ptp(lengths[task][rows]))
    for task, size in enumerate(sizes):
        flat = np.concatenate(drawn[task])
        for epoch in range(len(flat) // size):
            assert sorted(flat[epoch * size : (epoch + 1) * size].tolist()) == list(range(size)), (task, epoch)
    plain = TaskSampler(sizes, [1.0, 1.0], seed=5, rows_per_batch=rows_per_batch)
    plain_spreads = []
    for _ in range(120):
        task, rows = plain.next()
        plain_spreads.append(np.ptp(lengths[task][rows]))
    assert np.median(spreads) < 0.5 * np.median(plain_spreads)


def test_sampler_resumed_at_another_world_size_keeps_each_task_epoch_whole():
    # Two ranks of 4 rows, then (ZeRO 0 allows it) one rank of 4: the grouped order of the epoch under way
    # was cut for 8-row micro-batches, and re-cut for 4 it repeated some rows and skipped others.
    sizes, micro_batch = [53, 31], 4
    rng = np.random.default_rng(6)
    lengths = [rng.integers(4, 60, size=n) for n in sizes]
    two_ranks = TaskSampler(sizes, [1.0, 1.0], seed=2, rows_per_batch=2 * micro_batch, lengths=lengths,
                            group_rows=micro_batch)  # fmt: skip
    drawn = {0: [], 1: []}
    for _ in range(7):
        task, rows = two_ranks.next()
        drawn[task].extend(rows.tolist())
    one_rank = TaskSampler(sizes, [1.0, 1.0], seed=2, rows_per_batch=micro_batch, lengths=lengths,
                           group_rows=micro_batch)  # fmt: skip
    one_rank.load_state_dict(two_ranks.state_dict())
    while min(len(drawn[0]) - sizes[0], len(drawn[1]) - sizes[1]) < 0:
        task, rows = one_rank.next()
        drawn[task].extend(rows.tolist())
    for task, size in enumerate(sizes):
        assert sorted(drawn[task][:size]) == list(range(size)), f"task {task}: rows repeated or skipped"


def _epoch_after_resume(sizes, lengths, before_rows, after_rows):
    """Each task's first epoch when 7 micro-batches of ``before_rows`` rows are followed, from the saved state,
    by micro-batches of ``after_rows`` (group_rows: the rows per batch, one rank)."""
    grouped = lengths is not None
    first = TaskSampler(sizes, [1.0, 1.0], seed=2, rows_per_batch=before_rows, lengths=lengths,
                        group_rows=before_rows if grouped else None)  # fmt: skip
    drawn = {0: [], 1: []}
    for _ in range(7):
        task, rows = first.next()
        drawn[task].extend(rows.tolist())
    resumed = TaskSampler(sizes, [1.0, 1.0], seed=2, rows_per_batch=after_rows, lengths=lengths,
                          group_rows=after_rows if grouped else None)  # fmt: skip
    resumed.load_state_dict(first.state_dict())
    while min(len(drawn[0]) - sizes[0], len(drawn[1]) - sizes[1]) < 0:
        task, rows = resumed.next()
        drawn[task].extend(rows.tolist())
    return [sorted(drawn[task][:size]) for task, size in enumerate(sizes)]


def test_another_micro_batch_size_keeps_each_task_epoch_whole_only_without_length_grouping():
    """Why a task run resumes with another data.micro_batch_size only without data.group_by_length (the
    checkpoint's meta.json refuses it with grouping): the grouped order is cut for micro_batch_size rows."""
    sizes = [53, 31]
    rng = np.random.default_rng(6)
    lengths = [rng.integers(4, 60, size=n) for n in sizes]
    whole = [list(range(size)) for size in sizes]
    assert _epoch_after_resume(sizes, None, 4, 8) == whole
    assert _epoch_after_resume(sizes, lengths, 4, 4) == whole
    assert _epoch_after_resume(sizes, lengths, 4, 8) != whole  # rows repeated and skipped
