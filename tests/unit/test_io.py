"""Atomic writes: all or nothing under the final name, with the permissions a plain write would give."""

from __future__ import annotations

import errno
import os
import re
import stat

import pytest

from dist_kd.io import atomic_dir, atomic_path, check_replaceable_dir, data_fingerprint, within, write_json_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    # The reference: what open() and mkdir() give under this process's umask (tempfile's would be 0600/0700).
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    with atomic_dir(tmp_path / "student") as tmp:
        (tmp / "config.json").write_text("{}")
    assert _mode(tmp_path / "manifest.json") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "student") == _mode(tmp_path / "plain_dir")


def test_atomic_dir_gives_owner_only_files_inside_ordinary_permissions(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain_dir").mkdir()
    with atomic_dir(tmp_path / "export") as tmp:
        # What safetensors' save_file does: an owner-only file (0600), also one level down.
        for path in (tmp / "model.safetensors", tmp / "sub" / "weights.bin"):
            path.parent.mkdir(mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            assert _mode(path) == 0o600
    assert _mode(tmp_path / "export" / "model.safetensors") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "export" / "sub" / "weights.bin") == _mode(tmp_path / "plain.txt")
    assert _mode(tmp_path / "export" / "sub") == _mode(tmp_path / "plain_dir")


def test_a_failed_block_leaves_the_old_output(tmp_path):
    write_json_atomic(tmp_path / "state.json", {"step": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "state.json") as tmp:
        tmp.write_text('{"step": 2, "trunc')
        raise RuntimeError("preempted")
    assert (tmp_path / "state.json").read_text().strip().endswith("}")
    assert '"step": 1' in (tmp_path / "state.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_dir_flushes_every_new_file_before_the_earlier_output_goes(tmp_path, monkeypatch):
    """Without fsync, a node that crashed soon after a swap could leave the new files at their sizes but holding
    zeros, and the earlier output already deleted."""
    import dist_kd.io as io

    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "old.bin").write_bytes(b"earlier")
    synced: list[tuple[str, bool, bool]] = []  # (path, the new output in place, the earlier one still there)

    def fsync_path(path):
        synced.append((os.fspath(path), (out / "new.bin").exists(), (out / "old.bin").exists() or any(
            p.name.endswith((".old", ".trash")) for p in tmp_path.iterdir())))  # fmt: skip
        real_fsync_path(path)

    real_fsync_path = io.fsync_path
    monkeypatch.setattr(io, "fsync_path", fsync_path)
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "new.bin").write_bytes(b"new")
        (tmp / "sub" / "part.bin").write_bytes(b"part")
        new_tmp = tmp
    names = [path for path, _, _ in synced]
    for path in (new_tmp / "new.bin", new_tmp / "sub" / "part.bin", new_tmp / "sub", new_tmp):
        assert names.count(os.fspath(path)) == 1, names
    # the files and their directories before the rename; the parent after it, before the earlier output goes
    assert all(not moved for path, moved, _ in synced if path != os.fspath(tmp_path))
    assert synced[-1] == (os.fspath(tmp_path), True, True)
    assert (out / "new.bin").read_bytes() == b"new" and not (out / "old.bin").exists()
    io.fsync_path(tmp_path)  # a directory flushes (or is left alone where its filesystem cannot)


def test_data_fingerprint_follows_content_not_names_or_times(tmp_path):
    import json

    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    first = data_fingerprint(data)
    os.utime(data, (1, 1))
    assert data_fingerprint(data) == first  # a touch is not a change
    data.write_text('{"text": "b"}\n')  # same size, other bytes
    assert data_fingerprint(data) != first

    folder = tmp_path / "aug"
    folder.mkdir()
    (folder / "part.parquet").write_bytes(b"12345")
    before = data_fingerprint(folder)
    (folder / "part.parquet").write_bytes(b"12346")
    assert data_fingerprint(folder) != before

    corpus = tmp_path / "corpus"  # listed shards with their sha256: the shards themselves are not read
    corpus.mkdir()
    shards = [{"name": "shard-00000.tar", "num_sequences": 4, "sha256": "aa"}]
    (corpus / "manifest.json").write_text(json.dumps({"shards": shards, "seq_len": 128}))
    listed = data_fingerprint(corpus)
    (corpus / "manifest.json").write_text(json.dumps({"shards": shards, "seq_len": 128, "note": "other field"}))
    assert data_fingerprint(corpus) == listed
    shards[0]["sha256"] = "ab"
    (corpus / "manifest.json").write_text(json.dumps({"shards": shards, "seq_len": 128}))
    assert data_fingerprint(corpus) != listed


def test_an_output_inside_a_data_directory_is_refused(tmp_path):
    """data_fingerprint takes in every file under a data directory, so an output written inside it changed the
    data's digest: the same command, run again, found 'other data' and refused to resume or keep its work."""
    from dist_kd.io import check_output_outside_data

    data = tmp_path / "ds"
    (data / "train").mkdir(parents=True)
    (data / "train.jsonl").write_text("{}\n")
    for output in (data / "soft", data / "train" / "deeper" / "out", data):
        with pytest.raises(ValueError, match=rf"--output {output} lies inside --data {data}: the data's digest"):
            check_output_outside_data(output, "--output", {"--dev": None, "--data": data})
    check_output_outside_data(tmp_path / "ds2", "--output", {"--data": data})  # a sibling sharing a prefix
    check_output_outside_data(data / "out", "--output", {"--data": data / "train.jsonl"})  # a file: its bytes
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(ValueError, match=r"lies inside --train"):
        check_output_outside_data(tmp_path / "link" / "out", "--output", {"--train": str(data)})


def test_an_output_that_cannot_be_made_is_named_not_its_temporary_sibling(tmp_path):
    """The error named the hidden temporary name (/out/.x.g9mxc16f.tmp), not the output asked for."""
    (tmp_path / "file").write_text("x")
    for atomic in (atomic_dir, atomic_path):
        with pytest.raises(OSError) as caught:
            with atomic(tmp_path / "file" / "out"):
                pytest.fail("no temporary output where a file is in the way")
        # The file in the way is named (naming tmp/file/out, "File exists", pointed at a path that is not there).
        assert caught.value.filename == str(tmp_path / "file") and caught.value.strerror, caught.value


def test_an_output_named_by_a_dot_path_is_written(tmp_path, monkeypatch):
    """atomic_dir(".") derived its temporary name from an empty name: "PosixPath('.') has an empty name"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    with atomic_dir("out/.") as tmp:
        (tmp / "a.txt").write_text("a")
    with atomic_path("out/b/../b.txt") as tmp:
        tmp.write_text("b")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.txt", "b.txt"]


def test_a_write_failure_in_an_atomic_block_names_the_output_and_keeps_the_earlier_one(tmp_path):
    """safetensors reports a full disk as its own error type naming no file: export printed a traceback, and
    prepare-corpus, precompute and augment said "[Errno 28] No space left on device" without a path."""
    import errno

    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("earlier")
    full = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                     'on device" })')  # fmt: skip
    for write in (atomic_dir, atomic_path):
        target = out if write is atomic_dir else tmp_path / "file.json"
        with pytest.raises(OSError) as caught, write(target):
            raise full
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
        assert caught.value.__cause__ is full
    assert (out / "weights").read_text() == "earlier"
    with pytest.raises(KeyError), atomic_dir(out):  # anything else passes through as it was
        raise KeyError("not a write failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_swap_stopped_between_its_two_renames_keeps_the_earlier_output(tmp_path, monkeypatch):
    """atomic_dir moves the earlier output aside, then the new one in: a failure of the second rename lost the
    earlier output under the final name (only a hidden .model.old held it, which nothing restored)."""
    from dist_kd import io

    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("earlier")
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", second_fails)
    with pytest.raises(OSError), atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    monkeypatch.setattr(io.os, "replace", real)
    assert (out / "weights").read_text() == "earlier" and not (tmp_path / ".model.old").exists()
    # A process killed between the renames left only .model.old: the next write puts it back first.
    os.rename(out, tmp_path / ".model.old")
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("the new output failed too")
    assert (out / "weights").read_text() == "earlier"


def test_a_deletion_of_the_earlier_output_cut_short_is_never_put_back(tmp_path):
    """A process killed while deleting the earlier output after a swap left a half-deleted .model.old, which the
    next write put back under the final name once the user had removed the output."""
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("earlier")
    (tmp_path / ".model.trash").mkdir()  # what a cut-short deletion leaves now
    (tmp_path / ".model.trash" / "config.json").write_text("half")
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_output_that_is_a_symbolic_link_is_written_through_the_link(tmp_path):
    """The swap's renames moved the link aside ("Cannot call rmtree on a symbolic link"), the output became a
    real directory, the linked scratch directory stayed empty, and every later write failed ("Not a directory")
    on the .old link left behind."""
    scratch, link = tmp_path / "scratch" / "model", tmp_path / "runs" / "model"
    scratch.mkdir(parents=True)
    link.parent.mkdir()
    link.symlink_to(scratch)
    for text in ("first", "second"):
        with atomic_dir(link) as tmp:
            (tmp / "weights").write_text(text)
        assert link.is_symlink() and link.resolve() == scratch.resolve()
        assert (scratch / "weights").read_text() == text
        assert sorted(p.name for p in link.parent.iterdir()) == ["model"]
        assert sorted(p.name for p in scratch.parent.iterdir()) == ["model"]
    # What an earlier release left beside the link: its .old and .trash links are removed, not followed.
    (link.parent / ".model.old").symlink_to(scratch)
    (link.parent / ".model.trash").symlink_to(scratch)
    with atomic_dir(link.parent / ".." / "runs" / "model") as tmp:
        (tmp / "weights").write_text("third")
    assert (scratch / "weights").read_text() == "third" and sorted(p.name for p in link.parent.iterdir()) == ["model"]


def test_atomic_dir_removes_the_copy_a_killed_writer_left_and_nothing_else(tmp_path):
    """A process killed while it wrote an export (SIGKILL, the OOM killer) left its hidden copy, a whole model,
    beside the output for good: nothing but that write's own cleanup ever removed it."""
    import subprocess
    import sys
    import time

    from dist_kd.io import host_tag

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    siblings = {
        "killed": f".student.{host_tag()}-{dead}-abcd1234.tmp",  # this host, its pid gone, untouched: removed
        "live": f".student.{host_tag()}-{os.getpid()}-efgh5678.tmp",  # a write going on
        "elsewhere": ".student.otherhost-1-ijkl9012.tmp",  # another host's: cannot tell
        "older": ".student.mnop3456.tmp",  # an earlier release's name: cannot tell
        "recent": f".student.{host_tag()}-{dead}-uvwx1234.tmp",  # changed in the last 10 minutes
        "other output": f".student.x.{host_tag()}-{dead}-qrst7890.tmp",  # of output "student.x"
    }
    past = time.time() - 601
    for key, name in siblings.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
        if key != "recent":
            for path in (tmp_path / name / "model.safetensors", tmp_path / name):
                os.utime(path, (past, past))
    with atomic_dir(tmp_path / "student") as tmp:
        assert tmp.name.startswith(f".student.{host_tag()}-{os.getpid()}-")
        (tmp / "config.json").write_text("{}")
    left = {path.name for path in tmp_path.iterdir()}
    assert left == {"student", *(name for key, name in siblings.items() if key != "killed")}


def test_same_process_tells_the_recorded_process_from_one_that_took_its_pid_or_ended():
    import subprocess
    import sys

    from dist_kd.io import process_started, same_process

    began = process_started("self")
    assert began is not None  # Linux: /proc is readable
    assert same_process(os.getpid(), began)
    assert not same_process(os.getpid(), began - 1)  # another process that had this pid before
    assert not same_process(os.getpid(), None)  # a record without the start: unknown, not "the same"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child_began = process_started(child.pid)
        assert same_process(child.pid, child_began)
    finally:
        child.kill()
        child.wait()
    assert not same_process(child.pid, child_began)  # gone


def test_recover_interrupted_writes_puts_back_a_swapped_out_output_and_removes_dead_writers_leftovers(
    tmp_path, monkeypatch
):
    """A kill between atomic_dir's two renames left a finished task run without best/<task> (eval.json naming it)
    when no later evaluation wrote that task's best again; killed exports left whole models in hidden
    directories, and killed atomic_path writes their temporary files, for good."""
    import socket
    import subprocess
    import sys
    import time

    from dist_kd.io import host_tag, recover_interrupted_writes

    monkeypatch.setattr(socket, "gethostname", lambda: "node-7.cluster.example")  # a host name with dots
    host = host_tag()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    for name in (".share.old", ".topic.old", "topic", ".topic.trash", ".cache.old", ".local.trash",
                 f".share.{host}-{dead}-abcd1234.tmp", f".share.{host}-{os.getpid()}-efgh5678.tmp",
                 f".share.otherhost-{dead}-ijkl9012.tmp"):  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / ("notes.txt" if name in (".cache.old", ".local.trash") else "config.json")).write_text(name)
    for name in ("eval.json", ".eval.json.k2j4h5g6.tmp", "config.yaml", ".config.yaml.a1b2c3d4.tmp",
                 ".notes.txt.k2j4h5g6.tmp", ".gitignore"):  # fmt: skip
        (tmp_path / name).write_text("x")
    past = time.time() - 61
    for name in (".eval.json.k2j4h5g6.tmp", ".notes.txt.k2j4h5g6.tmp"):
        os.utime(tmp_path / name, (past, past))
    done = recover_interrupted_writes(tmp_path)
    assert (tmp_path / "share" / "config.json").read_text() == ".share.old"  # put back
    assert (tmp_path / "topic" / "config.json").read_text() == "topic"  # a whole output beside its .old: kept
    assert {path.name for path in tmp_path.iterdir()} == {
        "share", "topic", ".topic.old", "eval.json", "config.yaml",
        f".share.{host}-{os.getpid()}-efgh5678.tmp",  # a write going on (this process)
        f".share.otherhost-{dead}-ijkl9012.tmp",  # another host's: cannot tell
        ".config.yaml.a1b2c3d4.tmp",  # changed in the last minute
        ".cache.old", ".local.trash", ".notes.txt.k2j4h5g6.tmp",  # no model, no file of that name: not ours
        ".gitignore",
    }  # fmt: skip
    assert sorted(done) == sorted([
        f"{tmp_path / 'share'} put back (its replacement was killed midway)",
        f"{tmp_path / f'.share.{host}-{dead}-abcd1234.tmp'} removed (left by process {dead}, which has ended)",
    ])  # fmt: skip


def test_within_follows_links_and_dots_and_compares_whole_names(tmp_path, monkeypatch):
    (tmp_path / "run" / "student").mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run", target_is_directory=True)
    assert within(tmp_path / "run", tmp_path / "run")  # the directory itself
    assert within(tmp_path / "run" / "student" / "model.safetensors", tmp_path / "run")  # not there yet: still inside
    assert within(tmp_path / "alias" / "student", tmp_path / "run")  # through a link
    assert within(tmp_path / "run" / "student", tmp_path / "alias")
    assert within(tmp_path / "runs" / ".." / "run" / "student", tmp_path / "run")
    assert not within(tmp_path / "runs", tmp_path / "run")  # a name that merely starts alike
    assert not within(tmp_path / "run" / "..", tmp_path / "run")
    assert not within(tmp_path, tmp_path / "run")  # the parent is not inside
    monkeypatch.chdir(tmp_path / "run")
    assert within("student", tmp_path / "alias")  # relative to the current directory
    assert within(tmp_path / "run", ".")


@pytest.mark.parametrize("number", [errno.EACCES, errno.EROFS])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, refuse_mkdir_in, number):
    """The copy is made beside the output: a directory the process cannot write in was found after the work."""
    (tmp_path / "locked" / "eval").mkdir(parents=True)
    (tmp_path / "open").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "locked" / "eval", target_is_directory=True)
    refuse_mkdir_in(tmp_path / "locked", number)
    args = ("--output", lambda path: [], "a previous evaluation", "eval", "one")
    for output, where in [
        (tmp_path / "locked" / "eval", tmp_path / "locked"),  # replaced in place
        (tmp_path / "locked" / "new", tmp_path / "locked"),  # made there
        (tmp_path / "locked" / "a" / "b", tmp_path / "locked"),  # its parents made there first
        (tmp_path / "link", tmp_path / "locked"),  # a link's target is replaced, beside the target
    ]:
        expected = f"--output {output}: cannot write in {where} ({os.strerror(number)}); give a directory you can"
        with pytest.raises(ValueError, match="^" + re.escape(expected)):
            check_replaceable_dir(output, *args)
    assert check_replaceable_dir(tmp_path / "open" / "eval", *args) == tmp_path / "open" / "eval"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["eval", "link", "locked", "open"]  # no probe left
