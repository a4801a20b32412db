"""Checkpoint directories: atomic saves, no re-save of a whole step, the ``latest`` tag, damaged checkpoints
skipped for the previous one, and a failed save (a full disk) reported in one line with nothing lost."""

from __future__ import annotations

import errno
import json
import logging

import pytest
import torch

from dist_kd.train import checkpoint as ckpt


class FakeEngine:
    """Writes what a DeepSpeed engine would: a model-states file under checkpoints_dir/tag."""

    def __init__(self, fail: BaseException | None = None):
        self.saves = 0
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert save_latest is False
        self.saves += 1
        target = ckpt.Path(save_dir) / tag
        target.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": torch.arange(100)}, target / "mp_rank_00_model_states.pt")
        if self.fail is not None:
            raise self.fail


def _save(directory, step, engine=None, keep_last=0):
    return ckpt.save_checkpoint(engine or FakeEngine(), directory, step, {"step": step}, {"student": 1}, keep_last)


def test_save_writes_a_whole_checkpoint_the_latest_tag_and_keeps_the_last(tmp_path):
    for step in (10, 20, 30):
        final = _save(tmp_path, step, keep_last=2)
    assert final == tmp_path / "step-00000030" and ckpt.damage(final) is None
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [20, 30]
    assert (tmp_path / "latest").read_text() == "step-00000030"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == 30 and meta["world_size"] == 1 and meta["student"] == 1
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "rank00000.pt"}
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_whole_step_is_not_saved_again(tmp_path):
    """A finished run started again resumes at its last step: its checkpoint is never taken down to re-save."""
    final = _save(tmp_path, 10)
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    engine = FakeEngine()
    assert _save(tmp_path, 10, engine) == final and engine.saves == 0
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == before
    (final / "rank00000.pt").unlink()  # damaged: this time it is replaced
    assert _save(tmp_path, 10, engine) == final and engine.saves == 1 and ckpt.damage(final) is None


@pytest.mark.parametrize(
    ("harm", "reason"),
    [
        (lambda d: (d / "rank00000.pt").unlink(), "missing rank00000.pt"),
        (lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(b"cut"), "3 bytes, .* when saved"),
        (lambda d: (d / "meta.json").write_text("{"), "meta.json does not parse"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, harm, reason):
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    harm(newest)
    assert ckpt.damage(newest) is not None
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000010"
    assert f"checkpoint {newest} is damaged" in caplog.text
    import re

    assert re.search(reason, caplog.text)


def test_old_checkpoints_without_file_sizes_still_resume(tmp_path):
    final = _save(tmp_path, 10)
    meta = json.loads((final / "meta.json").read_text())
    del meta["files"]
    (final / "meta.json").write_text(json.dumps(meta))
    assert ckpt.damage(final) is None and ckpt.latest_checkpoint(tmp_path) == final


def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(tmp_path):
    _save(tmp_path, 10)
    full = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 6208 vs 6100")
    full.__context__ = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ckpt.CheckpointSaveError) as caught:
        _save(tmp_path, 20, FakeEngine(fail=full))
    message = str(caught.value)
    assert "\n" not in message and caught.value.disk_full
    assert f"saving a checkpoint under {tmp_path} failed: no space left on the device" in message
    assert "step-00000010, is intact" in message
    assert not list(tmp_path.glob(".tmp-*")) and ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000010"
    with pytest.raises(ckpt.CheckpointSaveError, match="PermissionError: denied") as caught:
        _save(tmp_path, 20, FakeEngine(fail=PermissionError("denied")))
    assert not caught.value.disk_full or "no space" in str(caught.value)  # unless this disk really is full


@pytest.mark.parametrize(("stage", "refused"), [(0, False), (1, True), (2, True), (3, True)])
def test_another_world_size_is_refused_where_zero_partitions_by_rank(tmp_path, stage, refused):
    saved = {"world_size": 2}
    ckpt.check_world_size(saved, 2, stage, tmp_path)  # the same world size always resumes
    if refused:
        with pytest.raises(ValueError, match=rf"saved by 2 ranks under ZeRO-{stage}.* this run has 1; start it on 2"):
            ckpt.check_world_size(saved, 1, stage, tmp_path)
    else:
        ckpt.check_world_size(saved, 1, stage, tmp_path)
