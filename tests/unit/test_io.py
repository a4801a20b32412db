"""Atomic writes: all or nothing under the final name, with the permissions a plain write would give."""

from __future__ import annotations

import stat

import pytest

from dist_kd.io import atomic_dir, atomic_path, write_json_atomic


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


def test_a_failed_block_leaves_the_old_output(tmp_path):
    write_json_atomic(tmp_path / "state.json", {"step": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "state.json") as tmp:
        tmp.write_text('{"step": 2, "trunc')
        raise RuntimeError("preempted")
    assert (tmp_path / "state.json").read_text().strip().endswith("}")
    assert '"step": 1' in (tmp_path / "state.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
