"""The corpus stream: exactly-once coverage across ranks and workers, seeded shuffle, exact resume, resize,
tokenizer check and corrupt shards. Ranks are simulated in one process (rank/world_size are arguments)."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from dist_kd.data.corpus import CorruptShardError, prepare_corpus, read_manifest, read_shard
from dist_kd.data.stream import CorpusStream, build_corpus_loader
from dist_kd.testing import build_tiny_tokenizer, random_sentences

SEQ_LEN = 16
BATCH = 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """About 330 packed sequences of 16 tokens in 21 shards of 16 (the last one partial)."""
    directory = tmp_path_factory.mktemp("stream_corpus")
    (directory / "docs.txt").write_text("\n".join(random_sentences(320, seed=11)) + "\n")
    out = directory / "shards"
    prepare_corpus(
        [directory / "docs.txt"], tiny_tokenizer_dir, out, seq_len=SEQ_LEN, shard_size=16, txt_document="line",
        num_workers=0, progress=False,
    )  # fmt: skip
    return out


def _sequences(directory: Path) -> list[tuple[int, ...]]:
    manifest = read_manifest(directory)
    return [
        tuple(int(token) for token in array)
        for shard in manifest["shards"]
        for array in read_shard(directory / shard["name"], shard["num_sequences"])
    ]


def _rows(batches) -> list[tuple[int, ...]]:
    return [tuple(row) for batch in batches for row in batch["input_ids"].tolist()]


def _take(stream: CorpusStream, count: int) -> list[dict]:
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def _stream(corpus: Path, **kwargs) -> CorpusStream:
    options = dict(micro_batch_size=BATCH, num_workers=0, seed=5, shuffle=True, shuffle_buffer=10)
    options.update(kwargs)
    return build_corpus_loader(corpus, **options)


def test_batches_are_int64_with_masks(corpus):
    import torch

    batch = next(iter(_stream(corpus)))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
    assert tuple(batch["input_ids"].shape) == (BATCH, SEQ_LEN) and bool(batch["attention_mask"].all())


@pytest.mark.parametrize("shuffle", [False, True])
def test_exactly_once_across_two_ranks_and_two_workers(corpus, shuffle):
    everything = Counter(_sequences(corpus))
    total = sum(everything.values())
    world = 2
    per_rank = []
    for epoch in range(2):
        seen: Counter = Counter()
        for rank in range(world):
            stream = _stream(corpus, rank=rank, world_size=world, num_workers=2, shuffle=shuffle)
            for _ in range(epoch):
                list(stream)  # move to the epoch under test
            rows = _rows(stream)
            per_rank.append(len(rows))
            seen.update(rows)
        assert not seen - everything, "a sequence was delivered more often than it exists"
        expected = world * ((total // world) // BATCH) * BATCH
        assert sum(seen.values()) == expected and total - expected < world * BATCH
    assert len(set(per_rank)) == 1, "every rank must run the same number of steps"


def test_unshuffled_single_rank_is_manifest_order(corpus):
    rows = _rows(_stream(corpus, shuffle=False))
    sequences = _sequences(corpus)
    assert rows == sequences[: len(rows)] and len(sequences) - len(rows) < BATCH


def test_shuffle_is_seeded_and_changes_each_epoch(corpus):
    stream = _stream(corpus, seed=1)
    epoch0, epoch1 = _rows(stream), _rows(stream)
    assert stream.epoch == 2
    assert epoch0 != epoch1
    # Samples are shuffled within shards too, not only the shard order.
    index = {row: position for position, row in enumerate(_sequences(corpus))}
    neighbours = sum(index[b] - index[a] == 1 for a, b in zip(epoch0, epoch0[1:], strict=False))
    assert neighbours < len(epoch0) // 3
    again = _stream(corpus, seed=1)
    assert _rows(again) == epoch0 and _rows(again) == epoch1
    assert _rows(_stream(corpus, seed=2)) != epoch0
    assert epoch0 != _rows(_stream(corpus, shuffle=False))


def test_rotate_intervals_matches_rolling_the_positions():
    import numpy as np

    from dist_kd.data.stream import rotate_intervals

    intervals = [(3, 7), (10, 11), (20, 25)]
    positions = [p for start, end in intervals for p in range(start, end)]
    for offset in range(len(positions)):
        rotated = rotate_intervals(intervals, offset)
        assert [p for start, end in rotated for p in range(start, end)] == np.roll(positions, -offset).tolist()
        assert all(end > start for start, end in rotated)


def test_the_sequences_left_out_differ_each_epoch_in_a_corpus_of_one_shard(tmp_path, tiny_tokenizer_dir):
    (tmp_path / "docs.txt").write_text("\n".join(random_sentences(40, seed=3)) + "\n")
    prepare_corpus(
        [tmp_path / "docs.txt"], tiny_tokenizer_dir, tmp_path / "one", seq_len=SEQ_LEN, shard_size=10_000,
        txt_document="line", num_workers=0, progress=False,
    )  # fmt: skip
    sequences = set(_sequences(tmp_path / "one"))
    assert len(read_manifest(tmp_path / "one")["shards"]) == 1 and len(sequences) % 8
    stream = _stream(tmp_path / "one", micro_batch_size=8, shuffle_buffer=4)
    left_out = []
    for _ in range(4):
        rows = _rows(stream)
        assert len(rows) == len(set(rows)) == len(sequences) // 8 * 8
        left_out.append(frozenset(sequences - set(rows)))
    assert len(set(left_out)) > 1  # the same ones every epoch before: only the shard order moved, one shard
    # A resume on another number of ranks keeps the epoch's seeded start (it was laid out from the beginning).
    state = stream.state_dict()
    assert state["epoch"] == 4 and state["intervals"][0][0] != 0
    resized = _stream(tmp_path / "one", micro_batch_size=8, shuffle_buffer=4, world_size=2)
    resized.load_state_dict(state)
    assert resized.state_dict()["intervals"] == state["intervals"] and resized.state_dict()["generation"] == 1
    unshuffled = _stream(tmp_path / "one", micro_batch_size=8, shuffle=False)
    assert _rows(unshuffled) == _rows(unshuffled)  # without shuffling, the same tail each epoch (documented)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize(
    ("num_workers", "consumed"),
    [(0, 5), (2, 3), (2, 4), (3, 7), (2, "epoch")],
)
def test_resume_gives_exactly_the_uninterrupted_batches(corpus, num_workers, consumed):
    options = dict(rank=1, world_size=2, num_workers=num_workers)
    reference_stream = _stream(corpus, **options)
    reference = _rows(reference_stream) + _rows(reference_stream)  # two epochs
    per_epoch = len(reference_stream)
    consumed = per_epoch if consumed == "epoch" else consumed

    interrupted = _stream(corpus, **options)
    before = _rows(_take(interrupted, consumed))
    state = json.loads(json.dumps(interrupted.state_dict()))  # must survive a JSON checkpoint
    other_rank = _stream(corpus, **{**options, "rank": 0})
    _take(other_rank, consumed)
    assert other_rank.state_dict() == state, "state must be the same on every rank at the same step"

    resumed = _stream(corpus, **options)
    resumed.load_state_dict(state)
    after = []
    while resumed.epoch < 2:  # the rest of epoch 0 (if any), then epoch 1
        after += _rows(resumed)
    assert before + after == reference


def test_resize_continues_the_epoch_without_repeats(corpus, caplog):
    everything = Counter(_sequences(corpus))
    old = [_stream(corpus, rank=rank, world_size=2, num_workers=2, shuffle_buffer=6) for rank in range(2)]
    before = Counter(row for stream in old for row in _rows(_take(stream, 5)))
    state = old[0].state_dict()
    new = [_stream(corpus, rank=rank, world_size=3, num_workers=1, shuffle_buffer=6) for rank in range(3)]
    with caplog.at_level(logging.INFO, logger="dist_kd.data.stream"):
        for stream in new:
            stream.load_state_dict(state)
    after_per_rank = [_rows(stream) for stream in new]
    assert len({len(rows) for rows in after_per_rank}) == 1
    after = Counter(row for rows in after_per_rank for row in rows)
    assert not (before + after) - everything, "a sequence repeated within the epoch after the resize"
    # Left out: partly delivered shuffle windows (< window per old worker) and the new layout's remainder.
    missing = sum(everything.values()) - sum(before.values()) - sum(after.values())
    assert 0 <= missing < 2 * 2 * 6 + 3 * BATCH
    assert all(stream.epoch == 1 for stream in new)
    # The windows' part is said as a warning with its count (an INFO line said only what was left): each rank's
    # 5 batches went round-robin to its 2 workers, 3 and 2 batches of 4 sequences, so in windows of 6 the first
    # worker stopped at a window's end (12) and the second 4 sequences into its second window (8 of 12).
    passed_over = 2 * ((-(3 * BATCH) % 6) + (-(2 * BATCH) % 6))
    assert passed_over == 8
    [record] = {r.getMessage(): r for r in caplog.records if "passed over" in r.getMessage()}.values()
    assert record.levelno == logging.WARNING
    left = sum(everything.values()) - sum(before.values()) - passed_over
    assert f": {passed_over} sequences of shuffle windows read in part are passed over" in record.getMessage()
    assert f"; {left} sequences left in the epoch" in record.getMessage()


@pytest.mark.parametrize(
    "change",
    [
        {"micro_batch_size": 2 * BATCH},
        {"micro_batch_size": 3},
        {"shuffle_buffer": 7},
        {"shuffle": False, "micro_batch_size": 3},
    ],
)
def test_another_batch_size_or_shuffle_buffer_continues_the_epoch_without_repeats(corpus, change):
    """Why a general run may resume with another data.micro_batch_size or data.shuffle_buffer (the checkpoint
    checks allow them, with a warning); without shuffling the position is kept to the sequence."""
    shuffle = change.get("shuffle", True)
    everything = Counter(_sequences(corpus))
    old = _stream(corpus, num_workers=2, shuffle=shuffle)
    before = Counter(_rows(_take(old, 5)))
    new = _stream(corpus, num_workers=2, **change)
    new.load_state_dict(old.state_dict())
    after = Counter(_rows(new))
    assert not (before + after) - everything, "a sequence repeated within the epoch after the change"
    missing = sum(everything.values()) - sum(before.values()) - sum(after.values())
    # Left out: with shuffling, the partly delivered windows (< shuffle_buffer per old worker); the remainder.
    assert 0 <= missing < (2 * 10 if shuffle else 0) + new.micro_batch_size
    assert new.epoch == 1


def test_state_from_another_seed_is_rejected(corpus):
    state = _stream(corpus, seed=1).state_dict()
    with pytest.raises(ValueError, match="field 'seed' is 1 but this stream has 2"):
        _stream(corpus, seed=2).load_state_dict(state)


def test_state_from_another_corpus_with_the_same_totals_is_rejected(corpus, tmp_path):
    """docs/corpus.md: a state from another corpus is an error. Only the totals were compared: shards of other
    sequences, or the same shards listed in another order, took the saved positions for other sequences."""
    state = _stream(corpus).state_dict()
    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    manifest = json.loads((other / "manifest.json").read_text())
    first, second = manifest["shards"][0], manifest["shards"][1]
    assert first["num_sequences"] == second["num_sequences"]  # same totals, same shard sizes
    manifest["shards"][0], manifest["shards"][1] = second, first
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"comes from another corpus than .*other.*read other sequences"):
        _stream(other).load_state_dict(state)
    manifest["shards"][0], manifest["shards"][1] = first, dict(second, sha256="0" * 64)  # rewritten in place
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="comes from another corpus"):
        _stream(other).load_state_dict(state)
    # The same corpus elsewhere (moved, copied) is the same data; a state of an earlier release has no digest.
    shutil.copy(corpus / "manifest.json", other / "manifest.json")
    _stream(other).load_state_dict(state)
    _stream(corpus).load_state_dict({key: value for key, value in state.items() if key != "corpus"})


def test_tokenizer_mismatch_is_a_clear_error(corpus, tiny_tokenizer_dir, tmp_path):
    from transformers import BertTokenizerFast

    from dist_kd.testing import tiny_vocab

    build_corpus_loader(corpus, micro_batch_size=BATCH, num_workers=0, teacher_tokenizer=tiny_tokenizer_dir)
    other = BertTokenizerFast(vocab={t: i for i, t in enumerate(reversed(tiny_vocab()))}, do_lower_case=True)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"was tokenized with .*tiny_tokenizer.*teacher uses .*other"):
        build_corpus_loader(corpus, micro_batch_size=BATCH, num_workers=0, teacher_tokenizer=tmp_path / "other")
    build_tiny_tokenizer(tmp_path / "copy")  # the same tokenizer elsewhere is accepted
    build_corpus_loader(corpus, micro_batch_size=BATCH, num_workers=0, teacher_tokenizer=tmp_path / "copy")


def test_seq_len_and_missing_manifest_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq_len is 16, the run expects 128"):
        _stream(corpus, seq_len=128)
    with pytest.raises(FileNotFoundError, match="manifest.json does not exist"):
        _stream(tmp_path)
    with pytest.raises(ValueError, match="fewer than one micro-batch per rank"):
        _stream(corpus, micro_batch_size=10_000)


def _truncated_copy(corpus, tmp_path):
    """A copy of ``corpus`` whose shard-000003.tar is cut short, and the sequences that shard held."""
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    shard = damaged / "shard-000003.tar"
    lost = Counter(tuple(int(t) for t in array) for array in read_shard(shard))
    shard.write_bytes(shard.read_bytes()[:1000])
    return damaged, lost


def test_truncated_shard_is_named_or_skipped_and_counted(corpus, tmp_path, caplog):
    damaged, lost = _truncated_copy(corpus, tmp_path)
    with pytest.raises(CorruptShardError, match=r"shard-000003\.tar.*truncated"):
        _stream(damaged)
    streams = [_stream(damaged, rank=rank, world_size=2, skip_corrupt=True) for rank in range(2)]
    assert "skipping corrupt corpus shard" in caplog.text and "shard-000003.tar" in caplog.text
    assert all(stream.num_skipped_shards == 1 for stream in streams)
    seen = Counter(row for stream in streams for row in _rows(stream))
    remaining = Counter(_sequences(corpus)) - lost
    assert not seen - remaining and sum(remaining.values()) - sum(seen.values()) < 2 * BATCH

    # The general stage's end-of-run summary reports them.
    from types import SimpleNamespace

    from dist_kd.train.general import summary_lines

    trainer = SimpleNamespace(run_dir=tmp_path, first_terms=None, last_terms=None, loader=streams[0], empty_batches=0)
    assert summary_lines(trainer, None)[-1] == "skipped 1 corrupt corpus shard(s) (data.skip_corrupt): shard-000003.tar"
    # On 2 ranks, a shard only rank 1 read was in neither the summary nor summary.json: every rank's count
    ranks = [({}, 0), ({"shard-000003.tar": "bad member"}, 16)]
    assert summary_lines(trainer, None, ranks)[-2:] == [
        "skipped 1 corrupt corpus shard(s) (data.skip_corrupt): shard-000003.tar",
        "16 micro-batch(es) (rank 1: 16) held only rows of a corrupt shard and trained on nothing; they are left out "
        "of the logged losses",
    ]


def test_a_member_cut_inside_its_npy_header_is_a_corrupt_shard_not_an_index_error(corpus, tmp_path):
    """A member whose tar header says 6 bytes, the file ending after the .npy magic (a manifest without
    num_bytes, as the stream accepts): reading the version byte past the end was an IndexError, which
    skip_corrupt did not catch either."""
    import json

    from dist_kd.data.shards import _tar_header

    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    shard = damaged / "shard-000003.tar"
    first_member_end = 512 + 512  # tar header + the first .npy, padded to a block
    shard.write_bytes(shard.read_bytes()[:first_member_end] + _tar_header("x.input_ids.npy", 6) + b"\x93NUMPY")
    manifest = json.loads((damaged / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop("num_bytes", None)
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptShardError, match=r"shard-000003\.tar: member x\.input_ids\.npy is not a \.npy array"):
        read_shard(shard)
    stream = _stream(damaged, shuffle=False, skip_corrupt=True)
    batches = list(stream)
    assert stream.skipped_shards.keys() == {"shard-000003.tar"} and len(batches) == len(stream)
    shard.unlink()
    shard.mkdir()  # a directory in a shard's place was said to be a missing file
    with pytest.raises(CorruptShardError, match=r"shard-000003\.tar: is not a file \(a directory"):
        _stream(damaged)


def test_ranks_that_found_different_shards_damaged_are_refused(monkeypatch):
    """Each rank lays its epoch out over the shards it found undamaged; with node-local copies they could
    disagree and read some sequences twice, others never, in different numbers of batches."""
    from types import SimpleNamespace

    from dist_kd import distributed
    from dist_kd.train.general import GeneralTrainer

    def trainer(found):
        monkeypatch.setattr(distributed, "gather_objects", lambda names: found)
        cfg = SimpleNamespace(data=SimpleNamespace(shards="corpus/shards"))
        return SimpleNamespace(cfg=cfg, loader=SimpleNamespace(skipped_shards={}))

    GeneralTrainer._check_ranks_skip_alike(trainer([["shard-000003.tar"]] * 3))  # alike: nothing said
    GeneralTrainer._check_ranks_skip_alike(trainer([[], []]))
    with pytest.raises(ValueError) as raised:
        GeneralTrainer._check_ranks_skip_alike(trainer([[], ["shard-000003.tar"], []]))
    assert str(raised.value).startswith(
        "data.shards corpus/shards: the ranks found different corpus shards damaged (rank 0: none; rank 1: "
        "shard-000003.tar; rank 2: none)"
    )
    assert distributed.reported_elsewhere(raised.value, 1) and distributed.agreed(raised.value)  # said once


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_member_found_while_reading(corpus, tmp_path, num_workers, caplog):
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    shard = damaged / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[512 * 4 + 100 : 512 * 4 + 108] = b"garbage!"  # the tar header of the 3rd member; the size is unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard-000002\.tar.*checksum") as raised:
        list(_stream(damaged, shuffle=False, num_workers=num_workers))
    # From a DataLoader worker too, the error is the one line that names the shard ("Caught CorruptShardError in
    # DataLoader worker process 0." and a traceback, before), with its shard and reason.
    assert str(raised.value).startswith(f"corrupt corpus shard {damaged / 'shard-000002.tar'}: bad tar header")
    assert "\n" not in str(raised.value) and raised.value.shard == str(damaged / "shard-000002.tar")
    assert "checksum" in raised.value.reason
    stream = _stream(damaged, shuffle=False, num_workers=num_workers, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.stream"):
        batches = list(stream)
    assert stream.num_skipped_shards == 1 and "shard-000002.tar" in stream.skipped_shards
    # Only the rank that read the shard finds it: its warning shows from that rank (cli.configure_logging).
    [record] = [r for r in caplog.records if "skipping corrupt corpus shard" in r.getMessage()]
    assert record.rank_specific
    # Its sequences become fully masked rows, so every rank still runs the same number of steps.
    masked = sum(int((batch["attention_mask"].sum(dim=1) == 0).sum()) for batch in batches)
    assert masked == 16 and len(batches) == len(stream)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_flipped_token_bytes_are_named_counted_or_caught_by_checksums(corpus, tmp_path, num_workers):
    """Damage that keeps the tar valid and the size equal: the ids leave the vocabulary. The stream names the
    shard (not an IndexError in the embedding), skip_corrupt masks its rows, verify_checksums finds it first."""
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    shard = damaged / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    assert data[512:518] == b"\x93NUMPY"  # the first member's .npy payload
    start = 512 + 10 + int.from_bytes(data[520:522], "little")
    data[start : start + 4] = b"\xff\x7f\xff\x7f"
    shard.write_bytes(bytes(data))
    _stream(damaged)  # size and structure are fine: nothing found before reading
    with pytest.raises(CorruptShardError, match=r"shard-000001\.tar: sequence 0 holds token id .* outside the tok"):
        list(_stream(damaged, shuffle=False, num_workers=num_workers))
    stream = _stream(damaged, shuffle=False, num_workers=num_workers, skip_corrupt=True)
    batches = list(stream)
    assert stream.num_skipped_shards == 1 and "shard-000001.tar" in stream.skipped_shards
    vocab = read_manifest(corpus)["tokenizer"]["vocab_size"]
    assert all(int(batch["input_ids"].max()) < vocab for batch in batches)
    with pytest.raises(CorruptShardError, match=r"shard-000001\.tar.*sha256"):
        _stream(damaged, verify_checksums=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_the_global_torch_rng_alone(corpus, num_workers):
    """Dropout draws from torch's global RNG; a resumed run restores it and then starts the loader, so the loader
    must not draw from it (it did: DataLoader's worker base seed), or resumed losses drift."""
    import torch

    torch.manual_seed(123)
    before = torch.get_rng_state()
    stream = _stream(corpus, num_workers=num_workers)
    _take(stream, 3)
    list(stream)
    assert torch.equal(torch.get_rng_state(), before)


def _general_trainer(tokenizer_dir: Path, eval_shards: Path, skip_corrupt: bool, max_positions: int = 128):
    """A GeneralTrainer with only what its held-out loader reads (no teacher, engine or run directory)."""
    from transformers import BertConfig

    from dist_kd.data.tokenizer import load_tokenizer
    from dist_kd.train.general import DataConfig, GeneralConfig, GeneralTrainer

    trainer = GeneralTrainer.__new__(GeneralTrainer)
    trainer.cfg = GeneralConfig(
        data=DataConfig(
            micro_batch_size=BATCH, eval_shards=str(eval_shards), eval_batches=1000, skip_corrupt=skip_corrupt
        )
    )
    trainer.tokenizer = load_tokenizer(tokenizer_dir)
    trainer._position_models = [(BertConfig(max_position_embeddings=max_positions), "teacher-dir")]
    return trainer


def test_general_held_out_shards_take_at_most_eval_max_texts(corpus, tiny_tokenizer_dir):
    """eval.max_texts cut eval.texts' file only: the held-out shards gave every sequence of data.eval_batches."""
    import dataclasses

    trainer = _general_trainer(tiny_tokenizer_dir, corpus, skip_corrupt=False)
    everything = len(trainer._heldout_texts())
    assert everything > 10
    trainer.cfg = dataclasses.replace(trainer.cfg, eval=dataclasses.replace(trainer.cfg.eval, max_texts=10))
    assert len(trainer._heldout_texts()) == 10


def test_general_held_out_shards_skip_corrupt_ones_as_the_corpus_does(corpus, tiny_tokenizer_dir, tmp_path):
    """data.eval_shards (and calibration) read through the same data.skip_corrupt as the training corpus."""
    damaged, lost = _truncated_copy(corpus, tmp_path)
    with pytest.raises(CorruptShardError, match=r"shard-000003\.tar"):
        _general_trainer(tiny_tokenizer_dir, damaged, skip_corrupt=False)._heldout_texts()
    heldout = _general_trainer(tiny_tokenizer_dir, damaged, skip_corrupt=True)._heldout_texts()
    remaining = Counter(_sequences(corpus)) - lost
    # every intact sequence (the last partial micro-batch's too: they are texts to measure, not batches)
    assert len(heldout) == sum(remaining.values())
    rows = heldout.rows
    seen = Counter(tuple(int(t) for t in rows.ids[a:b]) for a, b in itertools.pairwise(rows.offsets))
    assert not seen - remaining


def test_held_out_rows_of_a_shard_damaged_mid_read_are_left_out_not_measured_as_empty_texts(
    corpus, tiny_tokenizer_dir, tmp_path, caplog
):
    """A shard found damaged while reading (data.skip_corrupt) gives fully masked rows: they became texts of no
    tokens, pooled to zero vectors (cosine 0 with everything), and pulled a collapsed student's spread down."""
    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    shard = damaged / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[512 * 4 + 100 : 512 * 4 + 108] = b"garbage!"  # a member's header, past the ones read at open
    shard.write_bytes(bytes(data))
    caplog.set_level("WARNING")
    heldout = _general_trainer(tiny_tokenizer_dir, damaged, skip_corrupt=True)._heldout_texts()
    assert (heldout.rows.lengths > 0).all() and len(heldout) < len(_sequences(corpus))
    assert "held-out sequences of data.eval_shards came from damaged shards: left out" in caplog.text


def test_general_held_out_shards_of_another_tokenizer_or_too_long_are_refused(corpus, tiny_tokenizer_dir, tmp_path):
    from transformers import BertTokenizerFast

    from dist_kd.testing import tiny_vocab

    other = BertTokenizerFast(vocab={t: i for i, t in enumerate(reversed(tiny_vocab()))}, do_lower_case=True)
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "docs.txt").write_text("\n".join(random_sentences(50, seed=2)) + "\n")
    prepare_corpus([tmp_path / "docs.txt"], tmp_path / "other", tmp_path / "shards", seq_len=SEQ_LEN,
                   txt_document="line", num_workers=0, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"corpus .*shards was tokenized with .*other.*teacher uses"):
        _general_trainer(tiny_tokenizer_dir, tmp_path / "shards", skip_corrupt=False)._heldout_texts()
    message = r"the seq_len of corpus .* \(launch/prepare_corpus.py --seq-len\) 16 exceeds the max_position_embed"
    with pytest.raises(ValueError, match=message):
        _general_trainer(tiny_tokenizer_dir, corpus, skip_corrupt=False, max_positions=12)._heldout_texts()
    assert len(_general_trainer(tiny_tokenizer_dir, corpus, skip_corrupt=False, max_positions=16)._heldout_texts())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_sequences_longer_than_the_manifest_says_name_the_shard(corpus, tmp_path, num_workers):
    """A manifest edited to a shorter seq_len (or shards copied from another corpus) was a NumPy broadcast error
    ("could not broadcast input array from shape (16,) into shape (8,)") naming no file."""
    edited = tmp_path / "edited"
    shutil.copytree(corpus, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["seq_len"] = SEQ_LEN // 2
    (edited / "manifest.json").write_text(json.dumps(manifest))
    for skip_corrupt in (False, True):  # not a damaged shard to skip: every shard would be masked, a run on nothing
        with pytest.raises(ValueError, match=rf"shard-000000\.tar: sequence 0 has {SEQ_LEN} tokens, more than the "
                           rf"seq_len {SEQ_LEN // 2} of .*edited/manifest.json"):  # fmt: skip
            list(_stream(edited, shuffle=False, num_workers=num_workers, skip_corrupt=skip_corrupt))


WORKER_SIGNALS = """
import os, signal, sys, time
from dist_kd.data.stream import _ignore_stop_signals
_ignore_stop_signals(0)
for _ in range(200):  # the group's signal, then the launcher's, in a burst: the trainer handles them
    for sig in (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):
        os.kill(os.getpid(), sig)
time.sleep(0.2)
print("alive", flush=True)
"""


def test_a_loader_worker_leaves_every_stop_signal_to_the_trainer():
    """The group's SIGTERM killed the workers and failed the trainer's checkpoint save; a worker that let one
    SIGTERM pass died of the launcher's (``deepspeed``, ``torchrun``), which follows the group's, in the middle of
    the rank's stop checkpoint; a handler that took a lock deadlocked under two SIGTERMs in a row."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", WORKER_SIGNALS], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout == "alive\n" and proc.returncode == 0, (proc.stdout, proc.returncode, proc.stderr)


def _stuck_worker() -> None:
    import time

    from dist_kd.data.stream import _ignore_stop_signals

    _ignore_stop_signals(0)
    time.sleep(600)  # reading a stalled filesystem


def test_closing_a_loader_kills_a_worker_that_outlives_torchs_shutdown():
    """A worker that passes SIGTERM over and does not end when told would hold the trainer's exit for ever."""
    import multiprocessing
    import signal
    import time

    from dist_kd.data.stream import _close_loader

    worker = multiprocessing.get_context("fork").Process(target=_stuck_worker, daemon=True)
    worker.start()
    time.sleep(0.5)
    worker.terminate()  # what torch's shutdown does to a worker that did not end
    worker.join(timeout=1)
    assert worker.is_alive()
    told = []
    source = type("Iterator", (), {"_workers": [worker], "_shutdown_workers": lambda self: told.append(True)})()
    _close_loader(source)
    assert told and not worker.is_alive() and worker.exitcode == -signal.SIGKILL


LOADER_SIGNALS = """
import signal, sys, time
import psutil
from dist_kd.data.stream import build_corpus_loader

stream = build_corpus_loader(sys.argv[1], micro_batch_size=4, num_workers=2, shuffle=False)
source = iter(stream)  # starts the workers
workers = psutil.Process().children()
for _ in range(50):  # the group's SIGTERM and the launchers' after it, in a burst, from the workers' first moments
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
time.sleep(0.3)
drawn = sum(1 for _ in zip(range(40), source))  # the workers read on: every batch arrives
source.close()  # the loader closes: the workers end, none left behind
_, left = psutil.wait_procs(workers, timeout=10)
print(len(workers), drawn, left, flush=True)
"""


def test_loader_workers_read_on_through_repeated_sigterms_and_end_with_the_loader(corpus):
    """End to end through a real DataLoader: 50 SIGTERMs to each worker from its first moments (before its
    worker_init_fn ran, torch's handler ended it: a preemption at an epoch's start), batches still arrive; closing
    ends them."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", LOADER_SIGNALS, str(corpus)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == "2 40 []", (proc.stdout, proc.stderr[-3000:])


def test_a_process_that_exits_with_its_loader_open_ends(corpus):
    """Exiting with the stream's iterator still open (a trainer's error path that keeps it referenced) hung the
    process: multiprocessing's exit handler signals the workers and waits for them, and they passed its SIGTERM
    over, leaving it to their trainer."""
    import os
    import subprocess
    import sys

    script = f"""
import multiprocessing
from dist_kd.data.stream import build_corpus_loader
stream = build_corpus_loader({str(corpus)!r}, micro_batch_size=4, num_workers=2, shuffle=False)
source = iter(stream)
next(source)
print("exiting", flush=True)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "exiting\n", (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_corrupt_shard_error_pickles_as_it_was_raised():
    """It crosses from a DataLoader worker to the trainer pickled: its one-argument form came back as the message."""
    import pickle

    for error in (CorruptShardError("/x/shard-000001.tar", "truncated"), CorruptShardError("/x/shard-000001.tar")):
        again = pickle.loads(pickle.dumps(error))
        assert (str(again), again.shard, again.reason) == (str(error), error.shard, error.reason)


def test_a_data_error_in_a_worker_ends_the_process(corpus, tmp_path):
    """A trainer that stopped on a corrupt shard found by a DataLoader worker printed its error and then never
    exited: the workers outlived the iterator, and at exit they passed over Python's one SIGTERM to each (they
    leave signals to the trainer), so the job held its nodes until its time limit."""
    import subprocess
    import sys

    damaged = tmp_path / "damaged"
    shutil.copytree(corpus, damaged)
    shard = damaged / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[512 * 4 + 100 : 512 * 4 + 108] = b"garbage!"
    shard.write_bytes(bytes(data))
    script = f"""
import sys
from dist_kd.data.stream import build_corpus_loader

stream = build_corpus_loader({str(damaged)!r}, micro_batch_size={BATCH}, num_workers=2, shuffle=False)

def batches():  # as the general trainer draws them
    while True:
        yield from stream

source = batches()
try:
    for _ in range(1000):
        next(source)
except ValueError as err:
    print("error:", err, file=sys.stderr)
    sys.exit(2)
finally:
    source.close()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: corrupt corpus shard {shard}: bad tar header checksum at byte 2048"
    ], proc.stderr[-3000:]


def test_a_token_id_equal_to_the_vocabulary_size_is_out_of_range(tmp_path):
    import numpy as np

    from dist_kd.data.stream import check_token_ids

    check_token_ids(tmp_path / "shard.tar", [np.array([0, 9])], vocab_size=10)  # the largest id is vocab_size - 1
    with pytest.raises(CorruptShardError, match="token id 10"):
        check_token_ids(tmp_path / "shard.tar", [np.array([0, 10])], vocab_size=10)


def test_the_first_epoch_starts_at_the_beginning_of_the_shard_order(corpus):
    from dist_kd.data.stream import epoch_shard_order

    manifest = read_manifest(corpus)
    order = epoch_shard_order(len(manifest["shards"]), 5, 0, True)
    shards = [manifest["shards"][index] for index in order]
    expected = [tuple(int(t) for t in a) for s in shards for a in read_shard(corpus / s["name"], s["num_sequences"])]
    rows = _rows(_stream(corpus, shuffle_buffer=1))  # windows of one: the layout order itself
    assert rows == expected[: len(rows)]


def test_a_state_saved_after_the_last_batch_of_an_epoch_resumes_with_the_next_epoch(corpus):
    interrupted = _stream(corpus)
    _take(interrupted, len(interrupted))  # the trainer saves while the iterator is still open
    reference = _stream(corpus)
    list(reference)
    resumed = _stream(corpus)
    resumed.load_state_dict(interrupted.state_dict())
    assert _rows([next(iter(resumed))]) == _rows([next(iter(reference))]) and resumed.epoch == 1


@pytest.mark.parametrize("micro_batch_size", [BATCH, 2 * BATCH])  # the same layout, and a new one
def test_a_shard_found_corrupt_on_resume_is_left_out_of_the_rest_of_the_epoch(corpus, tmp_path, micro_batch_size):
    damaged, lost = _truncated_copy(corpus, tmp_path)
    interrupted = _stream(corpus)
    _take(interrupted, 3)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = _stream(damaged, skip_corrupt=True, micro_batch_size=micro_batch_size)
    assert len(resumed) == (len(_sequences(corpus)) - sum(lost.values())) // micro_batch_size
    resumed.load_state_dict(state)
    batches = list(resumed)  # the rest of epoch 0
    assert batches and all(bool(batch["attention_mask"].all()) for batch in batches), "rows of the corrupt shard"
    assert not Counter(_rows(batches)) & lost
