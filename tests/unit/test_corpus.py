"""prepare_corpus: formats, packing, determinism, tokenizer fingerprints, and clear errors for bad inputs."""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dist_kd.data.corpus import (
    check_tokenizer_matches,
    discover_inputs,
    iter_documents,
    load_tokenizer,
    prepare_corpus,
    read_manifest,
    read_shard,
    tokenizer_fingerprint,
)
from dist_kd.data.stream import build_corpus_loader
from dist_kd.testing import build_tiny_tokenizer, random_sentences

SEQ_LEN = 16

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return random_sentences(240, seed=3, min_words=2, max_words=30)


@pytest.fixture(scope="module")
def text_inputs(tmp_path_factory, texts) -> Path:
    """Three files of three formats; documents in discovery order are ``texts``."""
    directory = tmp_path_factory.mktemp("text_inputs")
    (directory / "a.txt").write_text("\n\n".join(texts[:80]) + "\n")
    with gzip.open(directory / "b.txt.gz", "wt") as handle:
        handle.write("\n\n\n".join(texts[80:160]))
    records = [json.dumps({"text": text, "id": index}) for index, text in enumerate(texts[160:])]
    (directory / "c.jsonl").write_text("\n".join(records) + "\n")
    (directory / "README.md").write_text("not a corpus file; skipped inside directories")
    return directory


def _expected_stream(tokenizer, texts: list[str]) -> list[int]:
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if stream:
            stream.append(tokenizer.sep_token_id)
        stream.extend(ids)
    return stream


def _all_sequences(directory: Path) -> list[np.ndarray]:
    manifest = read_manifest(directory)
    return [
        array for shard in manifest["shards"] for array in read_shard(directory / shard["name"], shard["num_sequences"])
    ]


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_round_trip_packed(tmp_path, text_inputs, texts, tiny_tokenizer_dir):
    summary = prepare_corpus(
        [text_inputs], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ_LEN, shard_size=7, num_workers=0
    )
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    stream = build_corpus_loader(tmp_path / "out", micro_batch_size=1, num_workers=0, shuffle=False)
    batches = list(stream)
    ids = np.concatenate([batch["input_ids"].numpy() for batch in batches])
    assert all(batch["attention_mask"].all() for batch in batches)
    assert ids.shape == (summary.num_sequences, SEQ_LEN)
    assert (ids[:, 0] == tokenizer.cls_token_id).all() and (ids[:, -1] == tokenizer.sep_token_id).all()
    expected = _expected_stream(tokenizer, texts)
    body = SEQ_LEN - 2
    assert ids[:, 1:-1].reshape(-1).tolist() == expected[: len(expected) // body * body]
    assert summary.num_dropped_tokens == len(expected) % body
    assert summary.num_documents == len(texts)
    # Decoding the first sequence gives the first document's words back.
    first_words = tokenizer.decode(ids[0, 1:-1].tolist()).replace(" .", ".").split()
    assert first_words[:3] == texts[0].split()[:3]
    manifest = read_manifest(tmp_path / "out")
    assert manifest["num_sequences"] == sum(shard["num_sequences"] for shard in manifest["shards"])
    assert manifest["dtype"] == "uint16" and manifest["num_tokens"] == summary.num_sequences * SEQ_LEN


def test_round_trip_one_document_per_sequence(tmp_path, text_inputs, texts, tiny_tokenizer_dir):
    seq_len = 12
    prepare_corpus(
        [text_inputs], tiny_tokenizer_dir, tmp_path / "out", seq_len=seq_len, packing="document", num_workers=0
    )
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    batches = list(build_corpus_loader(tmp_path / "out", micro_batch_size=4, num_workers=0, shuffle=False))
    ids = np.concatenate([batch["input_ids"].numpy() for batch in batches])
    mask = np.concatenate([batch["attention_mask"].numpy() for batch in batches])
    assert len(ids) == len(texts) // 4 * 4  # the remainder of a partial micro-batch is left out
    for row, text in enumerate(texts[: len(ids)]):
        expected = [tokenizer.cls_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][: seq_len - 2]
        expected.append(tokenizer.sep_token_id)
        assert mask[row].sum() == len(expected)
        assert ids[row, : len(expected)].tolist() == expected
        assert (ids[row, len(expected) :] == tokenizer.pad_token_id).all()


def test_special_tokens_written_in_the_text_are_stored_as_text(tmp_path, tiny_tokenizer_dir):
    """ "[SEP]" written in a document was stored as the separator's id inside a sequence's body."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("the old [MASK] house [SEP] of the [CLS] city [PAD]\n")
    prepare_corpus([tmp_path / "in"], tiny_tokenizer_dir, tmp_path / "out", seq_len=64, packing="document",
                   num_workers=0)  # fmt: skip
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    [row] = [ids[ids != tokenizer.pad_token_id].tolist() for ids in _all_sequences(tmp_path / "out")]
    assert row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id
    body = tokenizer.convert_ids_to_tokens(row[1:-1])
    assert not set(row[1:-1]) & set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}, body
    assert body[:5] == ["the", "old", "[UNK]", "m", "##a"]  # "[" is not in the tiny vocabulary: [UNK]


def test_shards_are_byte_identical_on_a_second_run(tmp_path, text_inputs, tiny_tokenizer_dir):
    options = dict(seq_len=SEQ_LEN, shard_size=9, progress=False)
    prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "one", num_workers=0, **options)
    # One path as a str (the API's callers): iterated, its first character "/" was walked as a directory.
    prepare_corpus(str(text_inputs), tiny_tokenizer_dir, tmp_path / "two", num_workers=2, **options)
    first = _tree_bytes(tmp_path / "one")
    assert len(first) > 3 and "manifest.json" in first
    assert _tree_bytes(tmp_path / "two") == first
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "one", num_workers=0, **options)
    prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "one", num_workers=0, overwrite=True, **options)
    assert _tree_bytes(tmp_path / "one") == first


def test_overwrite_with_a_smaller_corpus_removes_stale_shards(tmp_path, text_inputs, tiny_tokenizer_dir):
    prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ_LEN, shard_size=5, num_workers=0)
    prepare_corpus(
        [text_inputs / "a.txt"], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ_LEN, shard_size=5, num_workers=0,
        overwrite=True,
    )  # fmt: skip
    names = {shard["name"] for shard in read_manifest(tmp_path / "out")["shards"]}
    assert {path.name for path in (tmp_path / "out").glob("shard-*.tar")} == names


def _foreign_shard(path: Path, index: int) -> None:
    """Another program's webdataset shard of dist_kd's name (an image sample)."""
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        member = tarfile.TarInfo(f"sample{index:04d}.jpg")
        member.size = 3
        archive.addfile(member, io.BytesIO(b"jpg"))


def test_another_programs_shards_in_the_output_are_refused_and_a_killed_runs_replaced(
    tmp_path, text_inputs, tiny_tokenizer_dir
):
    """webdataset's shard-%06d.tar names are ours too: a run into a directory of the user's shards (no manifest)
    replaced shard 0 and deleted the rest. A killed run's shards (no manifest either) are still replaced."""

    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    for index in range(3):
        _foreign_shard(out / f"shard-{index:06d}.tar", index)
    (out / ".backup.tmp").write_text("the user's")
    before = _tree_bytes(out)
    with pytest.raises(FileExistsError, match=r"holds shard files that dist_kd did not write \(shard-000000.tar, "):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)
    assert _tree_bytes(out) == before
    expected = tmp_path / "expected"
    prepare_corpus([text_inputs], tiny_tokenizer_dir, expected, **options)
    killed = tmp_path / "killed"
    shutil.copytree(expected, killed)
    (killed / "manifest.json").unlink()  # killed before its manifest
    (killed / ".backup.tmp").write_text("the user's")
    prepare_corpus([text_inputs], tiny_tokenizer_dir, killed, **options)
    assert _tree_bytes(killed) == {**_tree_bytes(expected), ".backup.tmp": b"the user's"}
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, killed, overwrite=True, **options)
    assert (killed / ".backup.tmp").read_text() == "the user's"  # an overwrite leaves it too


def test_overwrite_refuses_another_programs_manifest_and_shards(tmp_path, text_inputs, tiny_tokenizer_dir):
    """With a manifest.json present, the output was taken for a corpus without looking at it: --overwrite
    deleted another program's manifest.json and its shard-*.tar files, and exited 0."""
    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False, overwrite=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"webdataset": "my manifest"}')
    before = _tree_bytes(foreign)
    with pytest.raises(FileExistsError, match=r"manifest.json is not the manifest of a dist_kd corpus"):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, foreign, **options)
    assert _tree_bytes(foreign) == before
    # a dist_kd corpus with another program's shard beside it: that shard is refused too
    mixed = tmp_path / "mixed"
    prepare_corpus([text_inputs], tiny_tokenizer_dir, mixed, **options)
    _foreign_shard(mixed / "shard-000099.tar", 0)
    before = _tree_bytes(mixed)
    with pytest.raises(FileExistsError, match=r"holds shard files that dist_kd did not write \(shard-000099.tar\)"):
        prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, mixed, **options)
    assert _tree_bytes(mixed) == before


def test_overwrite_of_the_working_directory_leaves_no_lock(tmp_path, text_inputs, tiny_tokenizer_dir, monkeypatch):
    """--output . --overwrite: the lock, moved into the new corpus with the user's files, was released by its
    relative path in the old directory (gone by then), so it stayed, and the next run took over a 'stale' lock."""
    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    out = tmp_path / "out"
    prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)
    monkeypatch.chdir(out)
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, ".", overwrite=True, **options)
    assert not (out / ".dist_kd.lock").exists()
    assert {path.name for path in out.iterdir()} == {
        "manifest.json",
        *(s["name"] for s in read_manifest(out)["shards"]),
    }


def test_a_byte_order_mark_is_no_text(tmp_path, tiny_tokenizer_dir):
    """Notepad's and Excel's UTF-8 files begin with one: in a .txt it became tokens (a BPE tokenizer's), and a
    .jsonl failed at its first line ("Unexpected UTF-8 BOM")."""
    text = "the market rose today\n\nshares fell again\n"
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    plain.mkdir(), marked.mkdir()
    (plain / "a.txt").write_text(text)
    (marked / "a.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (plain / "b.jsonl").write_text('{"text": "one more line"}\n')
    (marked / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "one more line"}\n')
    (plain / "c.txt.gz").write_bytes(gzip.compress(text.encode()))
    (marked / "c.txt.gz").write_bytes(gzip.compress(b"\xef\xbb\xbf" + text.encode()))
    assert [list(iter_documents(marked / name, "paragraph")) for name in ("a.txt", "c.txt.gz")] == [
        ["the market rose today", "shares fell again"]
    ] * 2
    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    prepare_corpus(plain, tiny_tokenizer_dir, tmp_path / "one", **options)
    prepare_corpus(marked, tiny_tokenizer_dir, tmp_path / "two", **options)
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "two")


def test_a_failed_overwrite_leaves_the_old_corpus_intact(tmp_path, text_inputs, tiny_tokenizer_dir):
    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    out = tmp_path / "out"
    prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)
    (out / "NOTES.md").write_text("kept by the user")
    before = _tree_bytes(out)
    # The wrong column is found only while streaming, after shards of the new corpus exist.
    with pytest.raises(ValueError, match="no 'txt' field"):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, out, text_column="txt", overwrite=True, **options)
    assert _tree_bytes(out) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no temporary sibling left behind
    assert len(_all_sequences(out)) == read_manifest(out)["num_sequences"]

    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, out, overwrite=True, **options)
    expected = tmp_path / "expected"
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, expected, **options)
    assert _tree_bytes(out) == {**_tree_bytes(expected), "NOTES.md": b"kept by the user"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["expected", "out"]


def test_an_overwrite_removes_what_a_killed_one_left_and_nothing_else(
    tmp_path, text_inputs, tiny_tokenizer_dir, caplog
):
    """An --overwrite run killed past its cleanup (SIGKILL, the OOM killer) left a hidden partial corpus beside
    the output, up to a whole corpus in size, that no later run removed."""
    import subprocess

    from dist_kd.io import host_tag as _host_tag

    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    out = tmp_path / "out"
    prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has ended
    siblings = {
        "killed": f".out.new-{_host_tag()}-{dead_pid}-abcd1234",  # this host, its pid gone: removed
        "live": f".out.new-{_host_tag()}-{os.getpid()}-efgh5678",  # a run still writing: kept
        "elsewhere": ".out.new-otherhost-1-ijkl9012",  # another host's: kept, said
        "older": ".out.new-mnop3456",  # an earlier release's name: kept, said
        "swapping": f".out.new-{_host_tag()}-{dead_pid}-qrst7890",  # complete, its run killed: removed
        "replaced": f".out.old-{_host_tag()}-{dead_pid}-qrst7890",  # killed while deleting the old corpus: removed
        "replacing": f".out.old-{_host_tag()}-{os.getpid()}-efgh5678",  # a run still deleting it: kept, said
        # its pid gone but written to in the last ABANDONED_S: a container sharing the host name may own it
        "recent": f".out.new-{_host_tag()}-{dead_pid}-uvwx1234",
    }
    for name in siblings.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard-000000.tar").write_bytes(b"partial")
    (tmp_path / siblings["swapping"] / "manifest.json").write_text("{}")
    past = time.time() - 601
    for key, name in siblings.items():
        if key != "recent":
            for path in (*(tmp_path / name).iterdir(), tmp_path / name):
                os.utime(path, (past, past))
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, out, overwrite=True, **options)
    left = {path.name for path in tmp_path.iterdir()}
    removed = ("killed", "swapping", "replaced")
    assert left == {"out", *(name for key, name in siblings.items() if key not in removed)}
    for key in removed:
        assert f"removing {tmp_path / siblings[key]}, left by an --overwrite run that was killed" in caplog.text
    for key in ("live", "elsewhere", "older", "recent"):
        assert f"{tmp_path / siblings[key]} holds part of the new corpus of another --overwrite run" in caplog.text
    assert f"{tmp_path / siblings['replacing']} holds the replaced corpus of another --overwrite run" in caplog.text


def test_a_corpus_whose_overwrite_was_killed_between_its_renames_is_put_back(
    tmp_path, text_inputs, tiny_tokenizer_dir, caplog
):
    """Killed between _swap_in's two renames, an --overwrite left no corpus at the output: the old one hidden as
    .NAME.old-*, the new one as .NAME.new-*. The next run wrote a fresh corpus and left both behind."""
    import subprocess

    from dist_kd.io import host_tag as _host_tag

    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    out = tmp_path / "out"
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, out, **options)
    before = _tree_bytes(out)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tag = f"{_host_tag()}-{int(gone.stdout)}-abcd1234"
    prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / f".out.new-{tag}", **options)
    os.replace(out, tmp_path / f".out.old-{tag}")
    past = time.time() - 601
    for path in [*tmp_path.glob(".out.*/*"), *tmp_path.glob(".out.*")]:
        os.utime(path, (past, past))
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"), pytest.raises(FileExistsError):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)  # the old corpus is back: not replaced
    assert f"putting {tmp_path / f'.out.old-{tag}'} back as {out}" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"] and _tree_bytes(out) == before


def test_a_killed_swaps_old_corpus_keeps_the_users_files_and_goes_back_only_whole(
    tmp_path, text_inputs, tiny_tokenizer_dir, caplog
):
    """Killed after the new corpus was in place but before the user's files moved over, the old corpus (with
    NOTES.md) was removed with them; one killed part of the way through its deletion was put back, broken."""
    import shutil
    import subprocess

    from dist_kd.io import host_tag as _host_tag

    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tag = f"{_host_tag()}-{int(gone.stdout)}-abcd1234"
    out, old = tmp_path / "out", tmp_path / f".out.old-{tag}"
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, old, **options)
    (old / "NOTES.md").write_text("mine")
    prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)  # the new corpus, in place
    past = time.time() - 601
    for path in [*old.iterdir(), old]:
        os.utime(path, (past, past))
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, out, overwrite=True, **options)
    assert f"removing {old}, left by an --overwrite run that was killed" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"] and (out / "NOTES.md").read_text() == "mine"
    # Part of the way through its deletion (a shard gone, the manifest left), the output since removed: not put back.
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, old, **options)
    first = sorted(old.glob("shard-*.tar"))[0]
    first.unlink()
    for path in [*old.iterdir(), old]:
        os.utime(path, (past, past))
    shutil.rmtree(out)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)  # a fresh corpus, not a FileExistsError
    assert f"removing {old}" in caplog.text and "putting" not in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    expected = tmp_path / "expected"
    prepare_corpus([text_inputs], tiny_tokenizer_dir, expected, **options)
    assert _tree_bytes(out) == _tree_bytes(expected)


def test_a_sigterm_while_the_replaced_corpus_is_deleted_still_deletes_it(
    tmp_path, text_inputs, tiny_tokenizer_dir, monkeypatch
):
    import shutil

    from dist_kd.data import corpus

    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    out = tmp_path / "out"
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, out, **options)
    rmtree = shutil.rmtree

    def interrupted(path, ignore_errors=False):
        if ".out.old-" in str(path) and not ignore_errors:
            next(Path(path).iterdir()).unlink()  # part of the way
            raise SystemExit(128 + signal.SIGTERM)  # as cli.ExitOnSignal raises it
        rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(corpus.shutil, "rmtree", interrupted)
    with pytest.raises(SystemExit):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, out, overwrite=True, **options)
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # the old corpus was left hidden, whole
    prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "expected", **options)
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "expected")  # the new one is in place


def test_sigterm_ends_an_overwrite_through_its_cleanup(tmp_path, tiny_tokenizer_dir):
    """scancel or a time limit killed prepare-corpus by SIGTERM's default action: no cleanup ran."""
    import subprocess

    (tmp_path / "big.txt").write_text("\n\n".join(random_sentences(20000, seed=1)))
    out = tmp_path / "out"
    command = [sys.executable, "launch/prepare_corpus.py", "--input", str(tmp_path / "big.txt"), "--tokenizer",
               str(tiny_tokenizer_dir), "--seq-len", "16", "--shard-size", "50", "--num-workers", "0",
               "--no-progress", "--output", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, cwd=REPO)
    before = _tree_bytes(out)
    running = subprocess.Popen([*command, "--overwrite"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.new-*/shard-000002.tar")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.new-*/shard-000002.tar")), "the overwrite wrote no shard in 120 s"
    running.send_signal(signal.SIGTERM)
    _, stderr = running.communicate(timeout=60)
    assert running.returncode == 128 + signal.SIGTERM, stderr
    assert "received SIGTERM: prepare-corpus stops; a corpus being replaced stays as it was until the new" in stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["big.txt", "out"]
    assert _tree_bytes(out) == before


def test_overwrite_through_a_symlink_keeps_the_link(tmp_path, text_inputs, tiny_tokenizer_dir):
    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, tmp_path / "link", **options)
    prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "link", overwrite=True, **options)
    assert (tmp_path / "link").is_symlink()
    prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "expected", **options)
    assert _tree_bytes(tmp_path / "real") == _tree_bytes(tmp_path / "expected")


def test_table_and_dataset_sources_match_jsonl(tmp_path, texts, tiny_tokenizer_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "body": texts})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    pq.write_table(table, tmp_path / "docs.parquet")
    with pa.OSFile(str(tmp_path / "docs.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "saved"))
    digests = []
    for source in ("docs.jsonl", "docs.parquet", "docs.arrow", "saved"):
        out = tmp_path / f"out_{source}"
        prepare_corpus([tmp_path / source], tiny_tokenizer_dir, out, seq_len=SEQ_LEN, text_column="body", num_workers=0)
        digests.append([shard["sha256"] for shard in read_manifest(out)["shards"]])
    assert digests[0] and all(digest == digests[0] for digest in digests)


def test_txt_document_modes(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("title line\nsecond line\n\nparagraph two\n\n\nparagraph three\n")
    assert list(iter_documents(path, "paragraph")) == ["title line\nsecond line", "paragraph two", "paragraph three"]
    assert len(list(iter_documents(path, "line"))) == 4
    assert len(list(iter_documents(path, "file"))) == 1


def test_a_paragraph_without_blank_lines_is_cut_at_line_boundaries(tmp_path, monkeypatch, caplog):
    import logging

    from dist_kd.data import corpus

    monkeypatch.setattr(corpus, "_MAX_PARAGRAPH_CHARS", 100)
    lines = [f"line {i:02d} " + "x" * 20 for i in range(20)]  # 29 characters each, no blank line
    path = tmp_path / "one_paragraph.txt"
    path.write_text("\n".join(lines) + "\n\nshort paragraph\n")
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        documents = list(iter_documents(path, "paragraph"))
    # 4 lines of 29 characters (+ newlines) reach 100: pieces of 4 lines, then the next paragraph unchanged.
    assert documents == ["\n".join(lines[i : i + 4]) for i in range(0, 20, 4)] + ["short paragraph"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "one_paragraph.txt" in warnings[0] and "--txt-document line" in warnings[0]


def test_a_file_past_the_limit_is_cut_at_line_boundaries_in_file_mode(tmp_path, monkeypatch, caplog):
    """--txt-document file read each file whole: a multi-GB file was one document, tokenised at once."""
    import logging

    from dist_kd.data import corpus

    small = tmp_path / "small.txt"
    small.write_text("\n  first line\n\nsecond paragraph\n\n")
    assert list(iter_documents(small, "file")) == [small.read_text().strip()]  # whole, as before
    monkeypatch.setattr(corpus, "_MAX_PARAGRAPH_CHARS", 100)
    lines = [f"line {i:02d} " + "x" * 20 + "\n" for i in range(20)]  # 29 characters each
    lines[9] = "\n"  # a blank line stays inside its piece: the file is not split into paragraphs
    path = tmp_path / "one_big_document.txt"
    path.write_text("".join(lines))
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        documents = list(iter_documents(path, "file"))
    pieces, piece = [], []
    for line in lines:  # the reference: lines gathered until they reach 100 characters
        piece.append(line)
        if sum(map(len, piece)) >= 100:
            pieces.append("".join(piece).strip())
            piece = []
    pieces.append("".join(piece).strip())
    assert documents == [p for p in pieces if p] and len(documents) == 5  # 4 lines a piece; 5 with the blank
    assert "\n\n" in documents[2]  # lines 8-12, the blank line 9 kept
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "one_big_document.txt" in warnings[0]


@pytest.mark.parametrize("mode", ["line", "paragraph", "file"])
def test_a_line_past_the_limit_comes_in_pieces_cut_at_whitespace(tmp_path, monkeypatch, caplog, mode):
    """A file without newlines was one line, read whole (``for line in handle``) in every --txt-document mode."""
    import logging

    from dist_kd.data import corpus

    monkeypatch.setattr(corpus, "_MAX_PARAGRAPH_CHARS", 100)
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(1, 12))) for _ in range(400)]
    line = " ".join(words)  # about 2,800 characters, no newline
    path = tmp_path / "one_line.txt"
    path.write_text(line + "\nshort line\n")
    reads = []
    real_open = corpus._open_text

    def spying_open(*args):
        handle = real_open(*args)
        real_readline = handle.readline

        def readline(size=-1):
            reads.append(size)
            return real_readline(size)

        handle.readline = readline
        return handle

    monkeypatch.setattr(corpus, "_open_text", spying_open)
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        documents = list(iter_documents(path, mode))
    assert reads and all(0 < size <= 100 for size in reads)  # never a whole line
    # Every word comes back whole and in order, and only the long line was cut.
    assert " ".join(" ".join(documents).split()) == line + " short line"
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("one_line.txt" in w and "a line exceeds 100 characters" in w for w in warnings)
    if mode == "line":
        assert documents[-1] == "short line" and len(documents) > 20
        assert all(len(document) <= 100 for document in documents)
        assert all(set(document.split()) <= set(words) for document in documents[:-1])  # cut between words


def test_a_line_without_whitespace_past_the_limit_is_cut_at_the_limit(tmp_path, monkeypatch):
    from dist_kd.data import corpus

    monkeypatch.setattr(corpus, "_MAX_PARAGRAPH_CHARS", 100)
    text = "x" * 250 + " " + "y" * 30  # the only whitespace is in the last piece's first half
    path = tmp_path / "unbroken.txt"
    path.write_text(text)
    documents = list(iter_documents(path, "line"))
    assert documents == ["x" * 100, "x" * 100, "x" * 50 + " " + "y" * 30]
    assert list(iter_documents(path, "file")) == documents  # each piece reaches the file mode's limit alone
    # A line of exactly the limit ending in spaces (8 characters stripped, under the paragraph's limit): its
    # newline, read alone, is no blank line.
    path.write_text("aaa  bbb  \nccc\n\nddd\n")
    monkeypatch.setattr(corpus, "_MAX_PARAGRAPH_CHARS", 10)
    assert list(iter_documents(path, "paragraph")) == ["aaa  bbb\nccc", "ddd"]


def test_bad_inputs_name_the_file(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        discover_inputs([tmp_path / "missing.txt"])
    (tmp_path / "notes.docx").write_text("x")
    with pytest.raises(ValueError, match="notes.docx.*unsupported"):
        discover_inputs([tmp_path / "notes.docx"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no corpus files"):
        discover_inputs([tmp_path / "empty"])

    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: no 'text' field \(found \['body'\]\)"):
        prepare_corpus([bad_jsonl], tiny_tokenizer_dir, tmp_path / "out1", num_workers=0)
    assert not (tmp_path / "out1" / "manifest.json").exists()
    assert not list((tmp_path / "out1").glob("*.tmp"))

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sentence": ["a b c"], "label": [1]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet has no text column 'text' \(found columns: sentence, label\)"):
        prepare_corpus([tmp_path / "t.parquet"], tiny_tokenizer_dir, tmp_path / "out2", num_workers=0)

    (tmp_path / "latin.txt").write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt is not UTF-8"):
        prepare_corpus([tmp_path / "latin.txt"], tiny_tokenizer_dir, tmp_path / "out3", num_workers=0)
    with pytest.raises(ValueError, match="seq_len must be at least 3"):
        prepare_corpus([bad_jsonl], tiny_tokenizer_dir, tmp_path / "out4", seq_len=2)


@pytest.mark.parametrize("name", ["late.txt", "late.txt.gz", "late.jsonl"])
def test_non_utf8_error_gives_the_file_offset_and_line(tmp_path, name):
    line = b'{"text": "abcdefghijklmnopq"}\n' if name.endswith(".jsonl") else b"abcdefghijklmnopqrstuvwxyz0123\n"
    data = line * (100_000 // len(line) + 1) + b'{"text": "caf\xe9"}\n'
    bad = data.index(b"\xe9")
    assert bad > 100_000
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    expected_line = data[:bad].count(b"\n") + 1
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(.* at byte {bad}\b.*, line {expected_line}\)"):
        list(iter_documents(path, "line"))


@pytest.mark.parametrize("content", [b"", b"not a table at all, just some bytes"])
@pytest.mark.parametrize("name", ["docs.parquet", "docs.arrow"])
def test_unreadable_tables_name_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    kind = "Parquet" if name.endswith(".parquet") else "Arrow IPC"
    expected = rf"{re.escape(str(path))} is not a readable {kind} file \(.+\); rewrite it or leave it out"
    with pytest.raises(ValueError, match=expected):
        list(iter_documents(path))


def test_fingerprint_is_stable_across_directories_and_detects_other_tokenizers(tmp_path, tiny_tokenizer_dir):
    from transformers import BertTokenizerFast

    from dist_kd.testing import tiny_vocab

    same = tokenizer_fingerprint(build_tiny_tokenizer(tmp_path / "copy"))
    original = tokenizer_fingerprint(load_tokenizer(tiny_tokenizer_dir))
    assert same["sha256"] == original["sha256"] and same["name_or_path"] != original["name_or_path"]
    assert original["vocab_size"] == len(tiny_vocab())

    cased = BertTokenizerFast(vocab={t: i for i, t in enumerate(tiny_vocab())}, do_lower_case=False)
    cased.save_pretrained(tmp_path / "cased")
    cased = load_tokenizer(tmp_path / "cased")
    assert tokenizer_fingerprint(cased)["sha256"] != original["sha256"]

    check_tokenizer_matches(original, tmp_path / "copy", "corpus_dir")
    with pytest.raises(ValueError, match=r"corpus corpus_dir was tokenized with .* \(sha256 .*teacher uses .*cased"):
        check_tokenizer_matches(original, cased, "corpus_dir")


def test_load_tokenizer_refuses_directories_without_a_vocabulary(tmp_path, tiny_tokenizer_dir):
    import time

    from transformers import BertConfig, BertModel, BertTokenizerFast

    from dist_kd.testing import SPECIAL_TOKENS, tiny_vocab

    # model.save_pretrained alone: config.json + model.safetensors, no tokenizer files. transformers would
    # build a 5-token tokenizer from the config and every word would become [UNK].
    model_only = tmp_path / "model_only"
    BertModel(
        BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(model_only)
    with pytest.raises(FileNotFoundError, match=rf"{model_only} has no vocabulary file .*tokenizer.save_pretrained"):
        load_tokenizer(model_only)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no vocabulary file"):
        load_tokenizer(tmp_path / "empty")
    started = time.monotonic()  # a file path must fail here, not after the Hub's retries
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json is a file, not a directory"):
        load_tokenizer(tiny_tokenizer_dir / "tokenizer.json")
    assert time.monotonic() - started < 5
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_tokenizer(tmp_path / "missing")

    specials_only = tmp_path / "specials_only"
    BertTokenizerFast(vocab={token: index for index, token in enumerate(SPECIAL_TOKENS)}).save_pretrained(specials_only)
    with pytest.raises(ValueError, match=rf"{specials_only} has only its 5 special tokens"):
        load_tokenizer(specials_only)
    (tmp_path / "x.txt").write_text("the game\n")
    with pytest.raises(FileNotFoundError, match=r"model_only has no vocabulary file"):
        prepare_corpus([tmp_path / "x.txt"], model_only, tmp_path / "out", num_workers=0)

    # A WordPiece vocab.txt without tokenizer.json is a vocabulary too (older BERT-family checkpoints).
    wordpiece = tmp_path / "wordpiece"
    wordpiece.mkdir()
    (wordpiece / "vocab.txt").write_text("\n".join(tiny_vocab()) + "\n")
    (wordpiece / "config.json").write_text((model_only / "config.json").read_text())
    tokenizer = load_tokenizer(wordpiece)
    assert len(tokenizer) == len(tiny_vocab()) and tokenizer.tokenize("the game") == ["the", "game"]


def test_a_tokenizer_json_alone_is_refused_naming_the_files_that_name_its_special_tokens(tmp_path, tiny_tokenizer_dir):
    from dist_kd.data.tokenizer import require_special_tokens

    # tokenizer.json loads alone, but nothing then says which token is [CLS], [SEP], [PAD] or [MASK].
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", bare / "tokenizer.json")
    tokenizer = load_tokenizer(bare)
    assert tokenizer.cls_token_id is None and tokenizer.mask_token_id is None
    (tmp_path / "x.txt").write_text("the game\n")
    with pytest.raises(ValueError) as caught:
        prepare_corpus([tmp_path / "x.txt"], bare, tmp_path / "out", num_workers=0)
    message = str(caught.value)
    assert "has no cls token and sep token and pad token" in message
    assert f"{bare} holds no tokenizer_config.json or special_tokens_map.json" in message
    assert "save_pretrained" in message and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"encoder x: its tokenizer has no mask token: .* holds no tokenizer_config"):
        require_special_tokens(tokenizer, bare, ("mask",), "encoder x: its tokenizer")

    # With the files there, a tokenizer that truly lacks a role is said as the wrong kind of tokenizer.
    complete = load_tokenizer(tiny_tokenizer_dir)
    require_special_tokens(complete, tiny_tokenizer_dir, ("cls", "sep", "pad", "mask"), "t")  # nothing missing
    complete.cls_token = None
    with pytest.raises(ValueError, match=r"^t has no cls token \(expected a BERT-style tokenizer\)$"):
        require_special_tokens(complete, tiny_tokenizer_dir, ("cls", "sep"), "t")


def test_prepare_corpus_command(tmp_path, text_inputs, tiny_tokenizer_dir, monkeypatch, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    try:
        from launch.prepare_corpus import main
    finally:
        sys.path.pop(0)
    out = tmp_path / "cli"
    argv = ["--input", str(text_inputs / "a.txt"), str(text_inputs / "c.jsonl"), "--tokenizer", str(tiny_tokenizer_dir)]
    main([*argv, "--output", str(out), "--seq-len", "16", "--shard-size", "10", "--num-workers", "0", "--no-progress"])
    manifest = read_manifest(out)
    assert manifest["seq_len"] == 16 and all(shard["num_sequences"] <= 10 for shard in manifest["shards"])
    assert "tokens/s" in capsys.readouterr().out
    # an output it cannot write (here a file in the way; a read-only disk alike) is one error line, not a traceback
    (tmp_path / "file").write_text("x")
    assert main([*argv, "--output", str(tmp_path / "file" / "shards"), "--num-workers", "0", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --output {tmp_path / 'file' / 'shards'} cannot be written: Not a directory "
        f"({tmp_path / 'file' / 'shards'}); choose a writable --output"
    )


def test_prepare_corpus_command_takes_repeated_inputs_and_says_a_dead_worker_in_one_line(
    tmp_path, text_inputs, tiny_tokenizer_dir, monkeypatch, capsys
):
    """--input a --input b read b alone (argparse kept the last list); a tokenizer worker killed mid-run ended
    in a traceback; the default --num-workers counted the node's cores, not those the process may use."""
    import launch.prepare_corpus as command
    from dist_kd.data.corpus import TokenizerWorkerDied

    argv = ["--tokenizer", str(tiny_tokenizer_dir), "--seq-len", "16", "--num-workers", "0", "--no-progress"]
    command.main(["--input", str(text_inputs / "a.txt"), "--input", str(text_inputs / "c.jsonl"), *argv,
                  "--output", str(tmp_path / "repeated")])  # fmt: skip
    command.main(["--input", str(text_inputs / "a.txt"), str(text_inputs / "c.jsonl"), *argv,
                  "--output", str(tmp_path / "listed")])  # fmt: skip
    assert _tree_bytes(tmp_path / "repeated") == _tree_bytes(tmp_path / "listed")
    capsys.readouterr()

    def die(*args, **kwargs):
        raise TokenizerWorkerDied("a tokenizer worker process died (killed for memory?)")

    monkeypatch.setattr(command, "prepare_corpus", die)
    assert command.main(["--input", str(text_inputs), *argv, "--output", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err == "error: a tokenizer worker process died (killed for memory?)\n"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert command.parse_args(["--input", "x", "--tokenizer", "t", "--output", "o"]).num_workers == 3


def test_shards_are_standard_tar_and_webdataset_files(tmp_path, text_inputs, tiny_tokenizer_dir):
    import tarfile

    import webdataset

    from dist_kd.data.shards import _HeaderTemplate, _tar_header

    for size in (0, 160, 384, 70_000):
        template = _HeaderTemplate(26, size)
        for key in (0, 7, 123_456_789_012):
            name = f"{key:012d}.input_ids.npy"
            assert template.header(name.encode()) == _tar_header(name, size)

    prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "out", seq_len=SEQ_LEN, shard_size=7, num_workers=0)
    shard = tmp_path / "out" / "shard-000001.tar"
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [f"{k:012d}.input_ids.npy" for k in range(7, 14)]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "", 0o644)}
    samples = list(webdataset.WebDataset(str(shard), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{k:012d}" for k in range(7, 14)]
    for sample, array in zip(samples, read_shard(shard, 7), strict=True):
        assert sample["input_ids.npy"].dtype == np.uint16 and (sample["input_ids.npy"] == array).all()


def test_damaged_gzip_and_manifest_are_clear_errors(tmp_path, text_inputs, tiny_tokenizer_dir):
    # A damaged deflate stream (not a truncated one) raises zlib.error deep in gzip: it must name the file.
    payload = bytearray(gzip.compress(("the market fell and the team won. " * 400).encode(), mtime=0))
    for offset in range(40, len(payload) - 20, 7):
        payload[offset] ^= 0x5A
    (tmp_path / "damaged.txt.gz").write_bytes(bytes(payload))
    with pytest.raises(ValueError, match=r"damaged\.txt\.gz is not a valid gzip file"):
        list(iter_documents(tmp_path / "damaged.txt.gz"))

    out = tmp_path / "corpus"
    prepare_corpus([text_inputs], tiny_tokenizer_dir, out, seq_len=16, num_workers=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(manifest)[:-20])
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        read_manifest(out)
    del manifest["shards"][0]["num_sequences"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest\.json: shards\[0\] lacks \['num_sequences'\]"):
        read_manifest(out)


def _die_on_three(item: int) -> int:
    if item == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does
    return item * 2


def test_a_killed_tokenizer_worker_is_an_error_not_a_hang():
    from dist_kd.data.corpus import TokenizerWorkerDied, _ordered_map

    assert list(_ordered_map(_die_on_three, range(3), 2, lambda: None, ())) == [0, 2, 4]
    signal.alarm(60)  # a hang fails the test instead of blocking the suite
    try:
        with pytest.raises(TokenizerWorkerDied, match=r"a tokenizer worker process died .*fewer --num-workers"):
            list(_ordered_map(_die_on_three, range(8), 2, lambda: None, ()))
    finally:
        signal.alarm(0)


def test_seq_len_past_the_models_positions_is_refused_and_past_the_tokenizers_warned(tmp_path, text_inputs, caplog):
    """A --tokenizer that is a model directory gives the hard limit (its config's 128 positions); a tokenizer
    directory alone only its model_max_length, which is a warning (the model it serves is not known)."""
    import logging

    from dist_kd.testing import build_tiny_bert

    model = build_tiny_bert(tmp_path / "model", max_position_embeddings=24)
    with pytest.raises(ValueError, match=r"--seq-len 25 exceeds the max_position_embeddings 24 of model .*model; "
                                         r"set --seq-len to at most 24"):  # fmt: skip
        prepare_corpus([text_inputs], model, tmp_path / "out", seq_len=25, num_workers=0, progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    prepare_corpus([text_inputs], model, tmp_path / "out", seq_len=24, num_workers=0, progress=False)
    assert read_manifest(tmp_path / "out")["seq_len"] == 24

    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    tokenizer.model_max_length = 20
    tokenizer.save_pretrained(tmp_path / "tok")
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        prepare_corpus([text_inputs], tmp_path / "tok", tmp_path / "out2", seq_len=24, num_workers=0, progress=False)
    assert "--seq-len 24 exceeds the model_max_length 20 of tokenizer" in caplog.text
    assert read_manifest(tmp_path / "out2")["seq_len"] == 24


def test_a_lone_surrogate_escape_in_jsonl_follows_encoding_errors(tmp_path, tiny_tokenizer_dir):
    """'\\ud83d' alone is valid JSON but no character: strict names file:line, replace gives U+FFFD (whose ids are
    those of the tokenizer's own text with U+FFFD), ignore drops it; the tokenizer never sees it."""
    source = tmp_path / "scraped.jsonl"
    source.write_text('{"text": "the cat sat"}\n{"text": "a \\ud83d b cat"}\n')
    with pytest.raises(ValueError, match=r"scraped\.jsonl:2: field 'text' holds a lone surrogate escape \(\\ud83d at "
                                         r"character 2\).*--encoding-errors replace"):  # fmt: skip
        list(iter_documents(source))
    assert list(iter_documents(source, encoding_errors="replace")) == ["the cat sat", "a \ufffd b cat"]
    assert list(iter_documents(source, encoding_errors="ignore")) == ["the cat sat", "a  b cat"]

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    prepare_corpus([source], tiny_tokenizer_dir, tmp_path / "out", seq_len=4, packing="document",
                   encoding_errors="replace", num_workers=0, progress=False)  # fmt: skip
    [_, second] = _all_sequences(tmp_path / "out")
    assert second[1:-1].tolist() == tokenizer("a \ufffd b cat", add_special_tokens=False)["input_ids"][:2]


def test_overlapping_inputs_read_each_file_once(tmp_path, text_inputs, tiny_tokenizer_dir, caplog):
    """A directory and a file inside it (or one path twice, or through a link) would double its documents."""
    import logging

    (tmp_path / "link.txt").symlink_to(text_inputs / "a.txt")
    alone = discover_inputs([text_inputs])
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        both = discover_inputs([text_inputs, text_inputs / "a.txt", tmp_path / "link.txt", text_inputs / "c.jsonl"])
    assert both == alone
    assert "3 input(s) found more than once" in caplog.text and "link.txt" in caplog.text

    options = dict(seq_len=SEQ_LEN, num_workers=0, progress=False)
    once = prepare_corpus([text_inputs], tiny_tokenizer_dir, tmp_path / "once", **options)
    twice = prepare_corpus([text_inputs, text_inputs / "a.txt"], tiny_tokenizer_dir, tmp_path / "twice", **options)
    assert twice.num_documents == once.num_documents == 240
    assert _tree_bytes(tmp_path / "once") == _tree_bytes(tmp_path / "twice")


def test_the_files_a_directory_walk_leaves_out_are_named(text_inputs, tmp_path, caplog):
    """A .txt.xz (or .csv) among the inputs was left out without a word; hidden files are not named among them."""
    import shutil

    (tmp_path / "in").mkdir()
    for name in ("a.txt", "README.md"):
        shutil.copy(text_inputs / name, tmp_path / "in" / name)
    (tmp_path / "in" / "more.txt.xz").write_bytes(b"")
    (tmp_path / "in" / ".DS_Store").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        assert discover_inputs([tmp_path / "in"]) == [tmp_path / "in" / "a.txt"]
    assert f"input directory {tmp_path / 'in'}: 2 file(s) of other types than .txt" in caplog.text
    assert "README.md" in caplog.text and "more.txt.xz" in caplog.text and ".DS_Store" not in caplog.text


def test_hidden_entries_are_not_read_and_a_directory_reached_again_through_a_link_is_walked_once(
    text_inputs, tmp_path, caplog
):
    """Jupyter's .ipynb_checkpoints/a-checkpoint.txt (a file of its own, so not caught as found twice) doubled every
    document; two links to ".." made the walk branch at every level until the kernel's link limit (a hang)."""
    root = tmp_path / "in"
    for sub in ("x", "y", ".ipynb_checkpoints"):
        (root / sub).mkdir(parents=True)
    shutil.copy(text_inputs / "a.txt", root / "a.txt")
    shutil.copy(text_inputs / "a.txt", root / ".ipynb_checkpoints" / "a-checkpoint.txt")
    shutil.copy(text_inputs / "a.txt", root / "._a.txt")  # macOS's copy of a file's attributes
    shutil.copy(text_inputs / "a.txt", root / "x" / "b.txt")
    (root / "x" / "up").symlink_to("..", target_is_directory=True)
    (root / "y" / "up").symlink_to("..", target_is_directory=True)
    (root / "y" / "again").symlink_to("../x", target_is_directory=True)
    with caplog.at_level(logging.INFO, logger="dist_kd.data.corpus"):
        assert discover_inputs([root]) == [root / "a.txt", root / "x" / "b.txt"]
    assert f"input directory {root}: 2 hidden entries are not read: " in caplog.text
    assert "found more than once" not in caplog.text
    hidden = tmp_path / ".data"  # a hidden directory given as the input itself is read
    hidden.mkdir()
    shutil.copy(text_inputs / "a.txt", hidden / "b.txt")
    assert discover_inputs([hidden]) == [hidden / "b.txt"]


def test_a_file_inside_a_datasets_directory_among_the_inputs_is_read_once(tmp_path, caplog):
    """A saved datasets directory is one source: its own .arrow file, given too, did not match it."""
    import logging

    import datasets

    datasets.Dataset.from_dict({"text": ["one doc", "two doc"]}).save_to_disk(str(tmp_path / "saved"))
    [arrow] = sorted((tmp_path / "saved").glob("*.arrow"))
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        assert discover_inputs([arrow, tmp_path / "saved"]) == [tmp_path / "saved"]
        assert discover_inputs([tmp_path / "saved", arrow]) == [tmp_path / "saved"]
    assert caplog.text.count("1 input(s) found more than once") == 2 and arrow.name in caplog.text
    # A DatasetDict and one of its splits: the split was read twice, without a word.
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a doc"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["b doc"]})})  # fmt: skip
    splits.save_to_disk(str(tmp_path / "dict"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dist_kd.data.corpus"):
        assert discover_inputs([tmp_path / "dict", tmp_path / "dict" / "train"]) == [tmp_path / "dict"]
        assert discover_inputs([tmp_path / "dict" / "train", tmp_path / "dict"]) == [tmp_path / "dict"]
    assert caplog.text.count("1 input(s) found more than once") == 2


def test_a_full_disk_mid_shard_names_the_shard_and_leaves_no_temporary_file(tmp_path):
    """A write that filled the disk said "[Errno 28] No space left on device" naming no file, and the abort's
    close flushed the buffer, failed again, and left the partial .shard-NNNNNN.tar.tmp behind."""
    import errno

    import numpy as np

    from dist_kd.data.shards import _ShardWriter

    writer = _ShardWriter(tmp_path, shard_size=4, dtype=np.dtype(np.uint16))
    writer.write(np.arange(10, dtype=np.int64))
    real = writer._handle

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            real.close()
            raise OSError(errno.ENOSPC, "No space left on device")

    writer._handle = Full()
    with pytest.raises(OSError) as caught:
        writer.write(np.arange(10, dtype=np.int64))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "shard-000000.tar")
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_worker_ends_once_its_command_is_killed(tmp_path):
    """A SIGKILLed prepare-corpus (the OOM killer) left a worker blocked on a full result pipe running for ever,
    holding the command's stdout open: ``dist-kd prepare-corpus ... | tee log`` hung."""
    import subprocess

    script = (
        "import os, time\n"
        "from dist_kd.data.corpus import _end_with\n"
        "parent = os.getpid()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    import threading\n"
        "    threading.Thread(target=_end_with, args=(parent,), daemon=True).start()\n"
        "    time.sleep(120)  # blocked, as on a full pipe\n"
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "os._exit(0)  # killed: no clean-up\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    worker = int(proc.stdout)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
            with open(f"/proc/{worker}/stat") as stat:  # reaped by init once it ends: a zombie counts as ended
                if stat.read().split(") ")[-1].startswith("Z"):
                    return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its parent by 20 s")


def test_one_run_writes_an_output_at_a_time(tmp_path, text_inputs, tiny_tokenizer_dir):
    """Two runs into one output deleted and replaced each other's shards, and both exited 0 with a corpus that
    contradicted its manifest (checksums)."""
    from dist_kd.train.runlock import RunDirInUse, RunLock

    options = dict(seq_len=SEQ_LEN, shard_size=5, num_workers=0, progress=False)
    out = tmp_path / "out"
    with RunLock(out, flag="--output"), pytest.raises(RunDirInUse, match=r"--output"):
        prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)
    assert not out.exists()  # made by the other run's lock, and removed with it: nothing written
    prepare_corpus([text_inputs], tiny_tokenizer_dir, out, **options)
    (out / "NOTES.md").write_text("kept")
    prepare_corpus([text_inputs / "a.txt"], tiny_tokenizer_dir, out, overwrite=True, **options)
    assert sorted(path.name for path in out.iterdir() if not path.name.startswith("shard-")) == [
        "NOTES.md",
        "manifest.json",
    ]  # the lock moved with the user's file and was removed


def _column_with_a_latin1_row():
    """A string column whose second row holds the latin-1 byte of "café" (pyarrow does not check; Spark writes such)."""
    import pyarrow as pa

    data = pa.py_buffer(b"the first row" + b"caf\xe9 second row")
    offsets = pa.py_buffer(np.array([0, 13, 28], np.int32).tobytes())
    return pa.Array.from_buffers(pa.string(), 2, [None, offsets, data])


def test_bytes_that_are_not_utf8_in_a_table_name_the_row_and_follow_encoding_errors(tmp_path):
    """Reported as a byte offset into the binary Parquet file, with advice (--encoding-errors replace) that gave the
    same error; a datasets directory was "Is a directory"."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = _column_with_a_latin1_row()
    pq.write_table(pa.table({"text": pa.concat_arrays([pa.array(["zero"]), column])}), tmp_path / "a.parquet")
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["x", "y"]}).save_to_disk(str(saved))
    [arrow] = saved.glob("*.arrow")
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(pa.table({"text": column}, schema=schema))
    for source, where, row in [(tmp_path / "a.parquet", "a.parquet", 2), (saved, "saved", 1)]:
        with pytest.raises(ValueError, match=rf"{where}: row {row} of column 'text' is not UTF-8 text \(invalid "
                           r"continuation byte at byte 3 of the row\); pass --encoding-errors replace"):  # fmt: skip
            list(iter_documents(source))
        assert list(iter_documents(source, encoding_errors="replace"))[-2:] == ["the first row", "caf\ufffd second row"]
        assert list(iter_documents(source, encoding_errors="ignore"))[-1] == "caf second row"


def test_a_datasets_directory_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    """A partial copy (an empty state.json) or another tool's directory with files of the same names was datasets'
    own error naming nothing (a KeyError traceback for the second); a cut .arrow file the same."""
    import datasets

    other = tmp_path / "other"
    other.mkdir()
    for name in ("state.json", "dataset_info.json"):
        (other / name).write_text("{}\n")
    partial = tmp_path / "partial"
    datasets.Dataset.from_dict({"text": ["the house"] * 50}).save_to_disk(str(partial))
    (partial / "state.json").write_text("")
    cut = tmp_path / "cut"
    datasets.Dataset.from_dict({"text": ["the house"] * 50}).save_to_disk(str(cut))
    [arrow] = cut.glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:60])
    said = r" is not a readable datasets directory saved with save_to_disk \(\w+: .*\); save it again, or leave it"
    for directory in (other, partial, cut):
        with pytest.raises(ValueError, match=rf"^{re.escape(str(directory))}{said} out of --input$"):
            list(iter_documents(directory))
