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

    lr_scheduler = None

    def load_checkpoint(self, load_dir, tag, load_optimizer_states):
        return torch.load(ckpt.Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=True)


def _save(directory, step, engine=None, keep_last=0):
    return ckpt.save_checkpoint(engine or FakeEngine(), directory, step, {"step": step}, {"student": 1}, keep_last)


def test_save_writes_a_whole_checkpoint_the_latest_tag_and_keeps_the_last(tmp_path):
    for step in (10, 20, 30):
        final = _save(tmp_path, step, keep_last=2)
    assert final == tmp_path / "step-00000030" and ckpt.damage(final) is None
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path)] == [20, 30]
    assert (tmp_path / "latest").read_text() == "step-00000030"
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == 30 and meta["world_size"] == 1 and meta["student"] == 1
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "rank00000.pt"}
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_save_flushes_its_files_before_it_goes_live_and_before_older_checkpoints_go(tmp_path, monkeypatch):
    """DeepSpeed writes its state files without fsync: a node that crashed soon after a save could leave them at
    their recorded sizes but holding zeros, once keep_last had deleted the checkpoint before (nothing to resume)."""

    class WritingEngine(FakeEngine):  # writes through a checkpoint engine, as DeepSpeed's engine does
        class checkpoint_engine:  # noqa: N801
            @staticmethod
            def save(state_dict, path):
                torch.save(state_dict, path)

        def save_checkpoint(self, save_dir, tag, save_latest):
            target = ckpt.Path(save_dir) / tag
            target.mkdir(parents=True, exist_ok=True)
            self.checkpoint_engine.save({"w": torch.arange(4)}, str(target / "mp_rank_00_model_states.pt"))
            self.checkpoint_engine.save({"m": torch.arange(4)}, path=str(target / "zero_pp_rank_0_optim_states.pt"))

    _save(tmp_path, 10, WritingEngine())
    events: list[tuple[str, bool, bool]] = []  # (name, step 20 live, step 10 still there)

    def fsync_path(path):
        path = ckpt.Path(path)
        name = path.name if path != tmp_path else "checkpoints/"
        events.append((name, (tmp_path / "step-00000020").exists(), (tmp_path / "step-00000010").exists()))

    monkeypatch.setattr(ckpt, "fsync_path", fsync_path)
    _save(tmp_path, 20, WritingEngine(), keep_last=1)
    names = [name for name, _, _ in events]
    written = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_optim_states.pt", "rank00000.pt", ".tmp-step-00000020"]
    # (meta.json is flushed by write_json_atomic itself, before its directory)
    assert names[: len(written)] == written, names
    assert all(not live and kept for name, live, kept in events if name in written)  # before it goes live
    assert ("checkpoints/", True, True) in events  # the rename and latest, before step 10 is pruned
    assert [step for step, _ in ckpt.step_checkpoints(tmp_path)] == [20]


def test_a_whole_step_is_not_saved_again(tmp_path):
    """A finished run started again resumes at its last step: its checkpoint is never taken down to re-save."""
    final = _save(tmp_path, 10)
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    engine = FakeEngine()
    assert _save(tmp_path, 10, engine) == final and engine.saves == 0
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == before
    (final / "rank00000.pt").unlink()  # damaged: this time it is replaced
    assert _save(tmp_path, 10, engine) == final and engine.saves == 1 and ckpt.damage(final) is None


def test_a_save_removes_what_interrupted_saves_of_other_steps_left(tmp_path):
    """A save killed mid-way (SIGKILL after SLURM's KillWait, during the checkpoint taken on SIGTERM) left
    .tmp-step-N, removed only if step N was saved again, which a stop at an arbitrary step rarely is: every
    preemption left nearly a whole checkpoint on the disk."""
    _save(tmp_path, 10)
    for leftover in (".tmp-step-00000013", ".tmp-step-00000027", ".damaged-step-00000010"):
        (tmp_path / leftover).mkdir()
        torch.save({"weights": torch.arange(100)}, tmp_path / leftover / "mp_rank_00_model_states.pt")
    (tmp_path / ".tmp-notes").write_text("not a save of ours")  # only dist_kd's own names go
    _save(tmp_path, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-notes", "latest", "step-00000010", "step-00000020"]
    assert ckpt.damage(tmp_path / "step-00000010") is None and ckpt.damage(tmp_path / "step-00000020") is None


def test_a_prune_cut_short_is_finished_by_the_next_save(tmp_path, monkeypatch):
    """A kill during keep_last's deletion, once meta.json was gone, left a step directory that no later prune
    counted (not a whole checkpoint) and no clean-up matched (not a .tmp- one): on the disk for good."""
    import shutil

    _save(tmp_path, 10, keep_last=1)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # the kill: meta.json is deleted, then the process is gone
        (path / "meta.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 20, keep_last=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step-00000020"
    for step in (30, 40):
        _save(tmp_path, step, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000040"]


def _edit_meta(checkpoint, edit):
    meta = json.loads((checkpoint / "meta.json").read_text())
    edit(meta["files"])
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def _emptied(checkpoint, name):
    (checkpoint / name).write_bytes(b"")
    _edit_meta(checkpoint, lambda files: files.update({name: 0}))


@pytest.mark.parametrize(
    ("harm", "reason"),
    [
        (lambda d: (d / "rank00000.pt").unlink(), "missing rank00000.pt"),
        (lambda d: (d / "mp_rank_00_model_states.pt").write_bytes(b"cut"), "3 bytes, .* when saved"),
        (lambda d: (d / "meta.json").write_text("{"), "meta.json does not parse"),
        # Recorded from a save whose writer had not written DeepSpeed's files yet (a decoupled one), or wrote
        # them empty (a mock one): marked whole, then every resume failed.
        (lambda d: _edit_meta(d, lambda files: files.pop("mp_rank_00_model_states.pt")), "no DeepSpeed model states"),
        (lambda d: _emptied(d, "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt is empty"),
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


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_not_restarted(tmp_path):
    """Starting from step 0 would throw the run's progress and its metrics away without a word."""
    run = tmp_path / "run"
    only = _save(run / "checkpoints", 11)
    (only / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ValueError, match=r"no checkpoint under .* is whole \(1 damaged; newest step-00000011: missing"):
        ckpt.resume_point(run, "auto")
    assert ckpt.resume_point(tmp_path / "fresh", "auto") is None  # no checkpoints at all: a new run


def test_keep_last_counts_whole_checkpoints_only(tmp_path):
    """A damaged checkpoint never takes a whole one's place: with keep_last=1 the new whole save survives."""
    damaged = _save(tmp_path, 11)
    (damaged / "rank00000.pt").unlink()
    _save(tmp_path, 12, keep_last=1)  # older than the whole one kept: the damaged one goes
    assert [step for step, _ in ckpt.step_checkpoints(tmp_path)] == [12]
    for step in (13, 14):
        _save(tmp_path, step)
    (tmp_path / "step-00000014" / "rank00000.pt").unlink()  # the newest is damaged
    _save(tmp_path, 15, keep_last=2)
    # whole 13 and 15 are kept and the damaged 14 between them stays; 12 goes
    assert [step for step, _ in ckpt.step_checkpoints(tmp_path)] == [13, 14, 15]
    assert ckpt.prunable(tmp_path, 2) == []
    assert ckpt.prunable(tmp_path, 1) == [tmp_path / "step-00000013", tmp_path / "step-00000014"]


def test_whole_before_lists_the_whole_checkpoints_older_than_one(tmp_path):
    """The advice of a damaged checkpoint (resume, export) names the whole ones before it, never a damaged one."""
    saved = [_save(tmp_path, step) for step in (3, 7, 9, 12)]
    (saved[1] / "rank00000.pt").unlink()  # step 7 is damaged
    assert ckpt.whole_before(saved[3]) == [saved[0], saved[2]]
    assert ckpt.whole_before(saved[2]) == [saved[0]] and ckpt.whole_before(saved[0]) == []
    assert ckpt.whole_before(tmp_path / "step-00000010") == [saved[0], saved[2]]  # a step that is not saved


class _Train:
    optimizer, lr, weight_decay, seed, warmup_ratio, scheduler = "adamw", 3e-3, 0.01, 42, 0.1, "linear"


def _meta(ds_config=None, max_steps=400, **train):
    settings = type("T", (_Train,), train)
    return {
        "student": 1,
        **ckpt.settings_meta(
            settings, {"zero_optimization": {"stage": 2}} if ds_config is None else ds_config, max_steps
        ),
    }


def test_settings_meta_resolves_precision_and_zero_stage():
    meta = _meta({"bf16": {"enabled": True}, "fp16": {"enabled": False}, "zero_optimization": {"stage": 3}})
    assert meta["train.precision"] == "bf16" and meta["deepspeed.zero_stage"] == 3
    assert _meta({})["train.precision"] == "fp32" and _meta({})["deepspeed.zero_stage"] == 0
    assert meta["schedule"] == {"max_steps": 400, "warmup_ratio": 0.1, "scheduler": "linear"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 1e-5}, r"train.lr: checkpoint has 0.003, this run has 1e-05"),
        ({"weight_decay": 0.0}, r"train.weight_decay: checkpoint has 0.01, this run has 0.0"),
        ({"optimizer": "adamax"}, r"train.optimizer: checkpoint has 'adamw', this run has 'adamax'"),
        ({"seed": 7}, r"train.seed: checkpoint has 42, this run has 7"),
    ],
)
def test_settings_the_checkpoint_cannot_honour_are_refused_with_the_way_out(tmp_path, change, message):
    final = _save(tmp_path / "checkpoints", 11)
    saved = {**json.loads((final / "meta.json").read_text()), **_meta()}
    ckpt.check_compatible(saved, _meta(), final)
    with pytest.raises(ValueError, match=message) as caught:
        ckpt.check_compatible(saved, _meta(**change), final)
    assert f"dist-kd export --checkpoint {final} --output DIR" in str(caught.value)
    with pytest.raises(ValueError, match="deepspeed.zero_stage: checkpoint has 2, this run has 3") as caught:
        ckpt.check_compatible(saved, _meta({"zero_optimization": {"stage": 3}}), final)
    assert "deepspeed.config=ds_configs/zero2.json (or your own JSON of stage 2) resumes it" in str(caught.value)
    with pytest.raises(ValueError, match="train.precision: checkpoint has 'fp32', this run has 'bf16'"):
        ckpt.check_compatible(saved, _meta({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}), final)
    older = {key: value for key, value in saved.items() if not key.startswith(("train.", "deepspeed."))}
    ckpt.check_compatible(older, _meta(**change), final)  # a checkpoint from before these keys: not compared
    # Another corpus: two digests said nothing of what changed, nor of the way out.
    with pytest.raises(ValueError, match="corpus: checkpoint has 'aa', this run has 'bb'") as caught:
        ckpt.check_compatible({**saved, "corpus": "aa"}, {**_meta(), "corpus": "bb"}, final)
    assert "a digest of data.shards' manifest" in str(caught.value) and "shards added, removed" in str(caught.value)
    assert f"dist-kd export --checkpoint {final} --output DIR" in str(caught.value)


def test_a_teacher_is_the_same_by_its_weights_not_its_path(tmp_path, caplog):
    """General runs compared the teacher by path and shape: other weights at the same path resumed silently (the
    loss jumped), and the same teacher staged elsewhere (a job's local disk) was refused."""
    import logging

    final = _save(tmp_path / "checkpoints", 11)
    teacher = {"path": "/shared/teacher", "model_type": "bert", "num_layers": 6}
    saved = {"teacher": teacher, "teacher.sha256": "aa", **_meta()}
    staged = {"teacher": {**teacher, "path": "/tmp/job/teacher"}, "teacher.sha256": "aa", **_meta()}
    with caplog.at_level(logging.INFO, logger="dist_kd.train.checkpoint"):
        ckpt.check_compatible(saved, staged, final)
    assert "teacher: /shared/teacher moved to /tmp/job/teacher (the same weights)" in caplog.text
    retrained = {"teacher": teacher, "teacher.sha256": "bb", **_meta()}
    with pytest.raises(ValueError, match=r"teacher.sha256: checkpoint has 'aa' \(/shared/teacher\), this run has 'bb'"):
        ckpt.check_compatible(saved, retrained, final)
    with pytest.raises(ValueError, match="teacher: checkpoint has .*'num_layers': 6.*this run has .*'num_layers': 4"):
        ckpt.check_compatible(saved, {**staged, "teacher": {**staged["teacher"], "num_layers": 4}}, final)
    # a checkpoint from before the digest: the path is all it knows the teacher by, so a move is refused
    older = {key: value for key, value in saved.items() if key != "teacher.sha256"}
    with pytest.raises(ValueError, match="teacher: checkpoint has .*'/shared/teacher'.*this run has .*'/tmp/job/"):
        ckpt.check_compatible(older, staged, final)
    ckpt.check_compatible(older, retrained, final)  # its digest is not compared: unknown then


def test_a_bf16_checkpoint_of_the_other_bf16_mode_names_the_setting_that_resumes_it(tmp_path):
    """DeepSpeed's bf16 optimizer (a bf16 module, fp32 masters) and autocast (an fp32 module) keep different
    state: a checkpoint of one does not load into the other, and the refusal names train.bf16_mode."""
    final = _save(tmp_path / "checkpoints", 11)
    deepspeed = _meta({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}})
    autocast = _meta({"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}})
    assert (deepspeed["train.precision"], autocast["train.precision"]) == ("bf16", "bf16-autocast")
    resumes = r"checkpoint has '{}', this run has '{}'.*resume this checkpoint with train.bf16_mode={}"
    with pytest.raises(ValueError, match=resumes.format("bf16", "bf16-autocast", "deepspeed")):
        ckpt.check_compatible(deepspeed, autocast, final)
    with pytest.raises(ValueError, match=resumes.format("bf16-autocast", "bf16", "autocast")):
        ckpt.check_compatible(autocast, deepspeed, final)
    # train.bf16_mode=auto resumes each in its own mode; a mode given explicitly is kept (and refused above)
    for meta, mode in ((deepspeed, "deepspeed"), (autocast, "autocast"), (_meta({}), "auto")):
        (final / "meta.json").write_text(json.dumps(meta))
        assert ckpt.resumed_bf16_mode("auto", final) == mode
        assert ckpt.resumed_bf16_mode("autocast", final) == "autocast"
    assert ckpt.resumed_bf16_mode("auto", None) == "auto"
    with pytest.raises(ValueError) as caught:  # fp32 <-> autocast: no bf16_mode hint, the generic way out
        ckpt.check_compatible(_meta({"zero_optimization": {"stage": 0}}), autocast, final)
    assert "bf16_mode" not in str(caught.value) and "dist-kd export" in str(caught.value)


def test_the_schedule_may_grow_but_not_end_before_the_checkpoint(tmp_path, caplog):
    saved = {"step": 11, **_meta()}
    with caplog.at_level(logging.WARNING):
        ckpt.check_schedule(saved, _meta(), tmp_path)
    assert "another schedule" not in caplog.text
    with caplog.at_level(logging.WARNING):
        ckpt.check_schedule(saved, _meta(max_steps=800, warmup_ratio=0.0), tmp_path)
    assert "max_steps 400 -> 800, warmup_ratio 0.1 -> 0.0" in caplog.text and "from step 11 on" in caplog.text
    ckpt.check_schedule(saved, _meta(max_steps=11), tmp_path)  # a finished run started again
    with pytest.raises(ValueError, match="it is at step 11, past this run's 10 steps"):
        ckpt.check_schedule(saved, _meta(max_steps=10), tmp_path)


def _task_meta(micro_batch_size=8, max_length=32, group_by_length=True, grad_accum=1, weights=(3.0, 1.0)):
    from types import SimpleNamespace

    from dist_kd.train.task import data_settings_meta

    cfg = SimpleNamespace(
        data=SimpleNamespace(micro_batch_size=micro_batch_size, max_length=max_length, group_by_length=group_by_length),
        train=SimpleNamespace(grad_accum=grad_accum),
    )
    return {**_meta({"zero_optimization": {"stage": 0}}), **data_settings_meta(cfg, list(weights))}


def _general_meta(micro_batch_size=8, shuffle=True, shuffle_buffer=64, grad_accum=1, num_workers=2):
    from types import SimpleNamespace

    from dist_kd.train.general import data_settings_meta

    cfg = SimpleNamespace(
        data=SimpleNamespace(
            micro_batch_size=micro_batch_size, shuffle=shuffle, shuffle_buffer=shuffle_buffer, num_workers=num_workers
        ),
        train=SimpleNamespace(grad_accum=grad_accum),
    )
    return {**_meta(), **data_settings_meta(cfg)}


def _saved(tmp_path, meta):
    """A checkpoint at step 11 whose meta.json holds ``meta``."""
    return ckpt.save_checkpoint(FakeEngine(), tmp_path / "checkpoints", 11, {"step": 11}, meta, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"micro_batch_size": 4}, "data.micro_batch_size: checkpoint has 8, this run has 4"),
        ({"max_length": 64}, "data.max_length: checkpoint has 32, this run has 64"),
        ({"group_by_length": False}, "data.group_by_length: checkpoint has True, this run has False"),
    ],
)
def test_a_task_resume_that_would_recut_the_length_grouped_epoch_is_refused_in_one_line(tmp_path, change, message):
    """With data.group_by_length, each task's epoch order groups micro_batch_size rows by length: a resume with
    another micro-batch size or max_length followed another order from the saved row counters (rows of the
    epoch in progress repeated or skipped, without a word)."""
    final = _saved(tmp_path, _task_meta())
    ckpt.check_resume(final, _task_meta(), 1)
    with pytest.raises(ValueError, match=message) as caught:
        ckpt.check_resume(final, _task_meta(**change), 1)
    assert "\n" not in str(caught.value)
    assert f"dist-kd export --checkpoint {final} --output DIR" in str(caught.value)


def test_a_task_resume_may_change_what_keeps_each_tasks_position_with_a_warning(tmp_path, caplog):
    """Without length grouping the order is a plain permutation per task: the row counters carry over."""
    final = _saved(tmp_path, _task_meta(group_by_length=False))
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(final, _task_meta(group_by_length=False), 1)
    assert "other settings" not in caplog.text
    changed = _task_meta(micro_batch_size=4, max_length=64, group_by_length=False, grad_accum=2, weights=(1.0, 1.0))
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(final, changed, 2)  # at another world size too, under ZeRO 0
    assert "data.micro_batch_size 8 -> 4, data.max_length 32 -> 64, train.grad_accum 1 -> 2" in caplog.text
    assert "tasks[].weight [3.0, 1.0] -> [1.0, 1.0]" in caplog.text and "from step 11 on" in caplog.text


def test_a_general_resume_refuses_another_shuffle_and_warns_of_another_batch(tmp_path, caplog):
    """data.shuffle was refused by the stream only after DeepSpeed had loaded the checkpoint, in words that named
    no config key; the batch settings, which the stream lays out afresh, changed without a word."""
    final = _saved(tmp_path, _general_meta())
    with pytest.raises(ValueError, match="data.shuffle: checkpoint has True, this run has False") as caught:
        ckpt.check_resume(final, _general_meta(shuffle=False), 1)
    assert "dist-kd export --checkpoint" in str(caught.value)
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(final, _general_meta(micro_batch_size=16, shuffle_buffer=32, grad_accum=4), 1)
    assert "data.micro_batch_size 8 -> 16, train.grad_accum 1 -> 4, data.shuffle_buffer 64 -> 32" in caplog.text
    # Another worker count re-lays the epoch out as well (--debug reads with none): it was not named.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(final, _general_meta(num_workers=0), 1)
    assert "other settings (data.num_workers 2 -> 0)" in caplog.text


def test_a_checkpoint_from_before_the_data_settings_still_resumes(tmp_path, caplog):
    older = _saved(tmp_path / "task", _meta({"zero_optimization": {"stage": 0}}))
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(older, _task_meta(micro_batch_size=4), 1)
        ckpt.check_resume(_saved(tmp_path / "general", _meta()), _general_meta(shuffle=False), 1)
    assert "other settings" not in caplog.text


def test_a_resume_names_another_loss_setting_and_refuses_another_projection(tmp_path, caplog):
    """The objective was not recorded: another distill.projection failed inside DeepSpeed's load (the learnt
    W_h missing or unexpected), and other loss weights or a temperature applied without a word."""
    from dist_kd.objective import DistillConfig, LossWeights

    def meta(**distill):
        return ckpt.merged_settings(_general_meta(), DistillConfig(**distill).resume_meta())

    final = _saved(tmp_path, {**_meta(), **meta()})
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(final, {**_meta(), **meta()}, 1)
    assert "other settings" not in caplog.text
    with pytest.raises(ValueError, match="distill.projection: checkpoint has 'auto', this run has 'select'"):
        ckpt.check_resume(final, {**_meta(), **meta(projection="select")}, 1)
    changed = meta(weights=LossWeights(attn=0.5), temperature=2.0, normalize="variance")
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(final, {**_meta(), **changed}, 1)
    said = "distill.weights.attn 1.0 -> 0.5, distill.temperature 1.0 -> 2.0, distill.normalize none -> variance"
    assert said in caplog.text and "from step 11 on" in caplog.text, caplog.text
    assert "data.micro_batch_size" not in caplog.text  # unchanged settings are not named


def test_a_checkpoint_from_before_the_sentence_term_ran_without_it(tmp_path, caplog):
    """A checkpoint written before distill.weights.sentence existed has no such key: it ran at 0, so turning
    the term on at a resume is named like any other changed weight, and leaving it at 0 says nothing."""
    from dist_kd.objective import DistillConfig, LossWeights

    def meta(**distill):
        return ckpt.merged_settings(_general_meta(), DistillConfig(**distill).resume_meta())

    old = meta()
    del old["changeable"]["distill.weights.sentence"]
    final = _saved(tmp_path, {**_meta(), **old})
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(final, {**_meta(), **meta()}, 1)
    assert "other settings" not in caplog.text
    with caplog.at_level(logging.WARNING):
        ckpt.check_resume(final, {**_meta(), **meta(weights=LossWeights(sentence=1.0))}, 1)
    assert "distill.weights.sentence 0.0 -> 1.0" in caplog.text, caplog.text


def test_an_open_log_window_of_a_release_with_fewer_loss_terms_is_restored_by_name():
    from dist_kd.train.common import LossWindow

    cpu = torch.device("cpu")
    window = LossWindow(cpu)
    window.add({"loss": torch.tensor(3.0), "hidden": torch.tensor(2.0)}, tokens=10, rows=2)
    window.add({"loss": torch.tensor(5.0), "hidden": torch.tensor(4.0)}, tokens=6, rows=1)
    state = window.state_dict()
    # the same window as an earlier release wrote it, without the names added since (the sentence term)
    names = [name for name in state["names"] if name != "sentence"]
    place = {name: i for i, name in enumerate(state["names"])}
    count = len(state["names"])
    old = {
        "names": names,
        "totals": [state["totals"][place[n]] for n in names] + [state["totals"][count + place[n]] for n in names]
        + state["totals"][-2:],
    }  # fmt: skip
    resumed = LossWindow(cpu)
    resumed.load_state_dict(old)
    stats = resumed.reduce()
    assert stats.values == {"loss": 4.0, "hidden": 3.0} and stats.tokens == 16 and stats.rows == 3
    elsewhere = LossWindow(cpu, groups=["other"])  # a window of other tasks is not restored
    elsewhere.add({"loss": torch.tensor(1.0)}, tokens=1, rows=1, group="other")
    mine = LossWindow(cpu, groups=["mine"])
    mine.load_state_dict(elsewhere.state_dict())
    assert mine.reduce().rows == 0


def test_a_restored_log_window_keeps_its_training_time(monkeypatch):
    """The first tokens_per_s after a resume divided the tokens of the whole window by the time since the resume
    alone (7x too high in the reviewer's run)."""
    from dist_kd.train import common

    now = [100.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    window = common.LossWindow(torch.device("cpu"))
    window.add({"loss": torch.tensor(1.0)}, tokens=600, rows=6)
    now[0] += 6.0  # six seconds of training, then the save and the kill
    state = window.state_dict()
    resumed = common.LossWindow(torch.device("cpu"))
    now[0] += 500.0  # down, requeued, loading
    resumed.load_state_dict(state)
    now[0] += 30.0
    resumed.restart_clock()  # training begins again
    resumed.add({"loss": torch.tensor(1.0)}, tokens=400, rows=4)
    now[0] += 4.0
    stats = resumed.reduce()
    assert stats.tokens == 1000 and stats.seconds == 10.0  # 100 tokens/s, as the run that was not stopped
    resumed.add({"loss": torch.tensor(1.0)}, tokens=100, rows=1)
    now[0] += 2.0
    resumed.restart_clock()  # an evaluation: the carried time is not counted twice
    assert resumed.reduce().seconds == 0.0
    old = common.LossWindow(torch.device("cpu"))
    old.load_state_dict({k: v for k, v in state.items() if k != "seconds"})
    old.restart_clock()
    assert old.reduce().seconds == 0.0


def test_a_resume_on_fewer_ranks_keeps_every_old_ranks_open_log_window(tmp_path, monkeypatch):
    """ZeRO-0 saved by 3 ranks, resumed on 2: rank 2's open window (its loss sums, tokens and rows since the last
    log line) was never read, so the next line averaged without it and tokens_seen stayed short for the run."""
    from types import SimpleNamespace

    from dist_kd.train import common
    from dist_kd.train.common import LossWindow

    class Engine(FakeEngine):
        lr_scheduler = None

        def load_checkpoint(self, load_dir, tag, load_optimizer_states):
            pass

    windows = []
    for rank in range(3):  # what each of the 3 ranks saves, each with its own window
        window = LossWindow(torch.device("cpu"))
        window.add({"loss": torch.tensor(1.0 + rank), "attn": torch.tensor(0.5)}, tokens=100 + rank, rows=4)
        windows.append(window)
    state = {"step": 7, "tokens_seen": 900, "window": windows[0].state_dict()}
    checkpoint = ckpt.save_checkpoint(Engine(), tmp_path, 7, state, {"student": 1}, 0)
    for rank in (1, 2):  # the files the other two ranks wrote into it
        torch.save(
            dict(state, window=windows[rank].state_dict(), rng=ckpt.rng_state()), checkpoint / f"rank{rank:05d}.pt"
        )
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps(dict(meta, world_size=3)))
    resumed = []
    for rank in (0, 1):
        monkeypatch.setattr(ckpt.distributed, "current", lambda rank=rank: SimpleNamespace(rank=rank, world_size=2))
        loaded = ckpt.load_checkpoint(Engine(), checkpoint)
        window = LossWindow(torch.device("cpu"))
        window.load_state_dict(loaded["window"])
        resumed.append(window)
    # The next line's all-reduce sums the 2 ranks' windows: it must equal the 3 old ranks' sum.
    torch.testing.assert_close(sum(w.totals for w in resumed), sum(w.totals for w in windows))
    torch.testing.assert_close(resumed[1].totals, windows[1].totals)  # rank 1 had no old rank to take
    # Micro-batches per term are every rank's (1 here): rank 0 counted rank 2's too, and task_batches jumped
    assert [w.batches[w.index["loss"]] for w in resumed] == [1, 1]
    with monkeypatch.context() as patch:  # the line rank 0 logs: the 2 ranks' sums, its own batch counts
        patch.setattr(common.distributed, "current", lambda: SimpleNamespace(world_size=2))
        patch.setattr(common.distributed, "all_reduce_mean", lambda t: sum(w.totals for w in resumed) / 2)
        stats = resumed[0].reduce()
    assert stats.batches == {"loss": 1, "attn": 1} and stats.tokens == 303 and stats.values["loss"] == 2.0


def test_a_rank_without_its_own_state_starts_an_empty_log_window(tmp_path, monkeypatch):
    """ZeRO-0 resumed on more ranks: rank 1 takes rank 0's data position and tokens_seen, but not rank 0's open
    log window, whose sums the next line's reduction would count twice (tokens_seen with them)."""
    from types import SimpleNamespace

    from dist_kd.train.common import LossWindow

    window = LossWindow(torch.device("cpu"))
    window.add({"loss": torch.tensor(2.0)}, tokens=100, rows=4)
    state = {"step": 11, "tokens_seen": 5000, "window": window.state_dict()}
    checkpoint = ckpt.save_checkpoint(FakeEngine(), tmp_path, 11, state, {"student": 1}, 0)

    class LoadingEngine:
        lr_scheduler = None

        def load_checkpoint(self, load_dir, tag, load_optimizer_states):
            assert (load_dir, tag) == (str(tmp_path), checkpoint.name)

    windows = []
    for rank in (0, 1):
        monkeypatch.setattr(ckpt.distributed, "current", lambda rank=rank: SimpleNamespace(rank=rank, world_size=2))
        loaded = ckpt.load_checkpoint(LoadingEngine(), checkpoint)
        assert loaded["tokens_seen"] == 5000 and loaded["step"] == 11  # global counts: the same on every rank
        resumed = LossWindow(torch.device("cpu"))
        if "window" in loaded:  # as the trainers' load_state_dict
            resumed.load_state_dict(loaded["window"])
        windows.append(resumed)
    # What the next log line's all-reduce sums: the open window once, as one rank would have logged it.
    summed = sum(w.totals for w in windows)
    torch.testing.assert_close(summed, window.totals)
    # and the micro-batch count, every rank's, is rank 0's on rank 1 too (it was halved in the line)
    assert [w.batches[w.index["loss"]] for w in windows] == [1, 1]
    del state["window"]["batches"]  # a checkpoint of an earlier release: its counts are rank 0's own
    torch.save(dict(state, rng=ckpt.rng_state()), checkpoint / "rank00000.pt")
    loaded = ckpt.load_checkpoint(LoadingEngine(), checkpoint)  # as rank 1 of 2
    old = LossWindow(torch.device("cpu"))
    old.load_state_dict(loaded["window"])
    assert old.batches[old.index["loss"]] == 1 and not old.totals.any()


def test_a_latest_tag_that_cannot_be_written_names_no_checkpoint_and_is_put_right(tmp_path, monkeypatch, caplog):
    """The disk filled after a checkpoint fitted but before its 4 KiB `latest` did: `latest` kept naming
    step 10, which pruning then deleted (export .../latest failed; with it kept, an older model was exported),
    and a later start at the same step never rewrote it."""
    _save(tmp_path, 10, keep_last=1)
    real = ckpt.atomic_path

    def full_for_latest(path):
        if ckpt.Path(path).name == "latest":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(ckpt, "atomic_path", full_for_latest)
    with caplog.at_level(logging.WARNING):
        _save(tmp_path, 20, keep_last=1)
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path)] == [20]
    assert not (tmp_path / "latest").exists()  # not left naming the pruned step-00000010
    assert "could not write" in caplog.text and "step-00000020 is saved and resumes" in caplog.text
    monkeypatch.setattr(ckpt, "atomic_path", real)
    engine = FakeEngine()
    _save(tmp_path, 20, engine, keep_last=1)  # started again at its last step: nothing saved, `latest` written
    assert engine.saves == 0 and (tmp_path / "latest").read_text() == "step-00000020"


def test_a_refused_write_with_little_room_left_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """Any save failure on a filesystem with under 64 MiB free read "no space left on the device", also a
    read-only checkpoints/ (DeepSpeed: "Parent directory ... does not exist"), whose cause never appeared."""
    _save(tmp_path, 10)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 7 << 20})())
    refused = RuntimeError(f"Parent directory {tmp_path}/.tmp-step-00000020 does not exist.")
    refused.__context__ = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".tmp-step-00000020"))
    with pytest.raises(ckpt.CheckpointSaveError) as caught:
        _save(tmp_path, 20, FakeEngine(fail=refused))
    assert not caught.value.disk_full and "no space" not in str(caught.value)
    assert f"failed: Permission denied ({tmp_path}/.tmp-step-00000020)" in str(caught.value)
    with pytest.raises(ckpt.CheckpointSaveError) as caught:  # nothing said: little room is the likely cause
        _save(tmp_path, 20, FakeEngine(fail=RuntimeError("unexpected pos 6208 vs 6100")))
    assert caught.value.disk_full and "no space left on the device (7 MiB free there)" in str(caught.value)


def test_a_step_directory_without_meta_json_is_damaged_not_invisible(tmp_path, caplog):
    """A save renames its directory into place once meta.json is written; a step-N without one was not listed,
    so a run whose checkpoints had all lost it started again from step 0 without a word (and replaced its
    metrics), one whose newest had lost it resumed from an older one without a warning, and none was pruned."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    for step in (10, 13):
        _save(checkpoints, step)
    (checkpoints / "step-00000013" / "meta.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert ckpt.resume_point(run, "auto") == checkpoints / "step-00000010"
    assert "checkpoint " + str(checkpoints / "step-00000013") + " is damaged (no meta.json)" in caplog.text
    _save(checkpoints, 15, keep_last=1)  # older than the one whole checkpoint kept: pruned
    assert [step for step, _ in ckpt.step_checkpoints(checkpoints)] == [15]
    (checkpoints / "step-00000015" / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"no checkpoint under .* is whole \(1 damaged; newest step-00000015: no meta"):
        ckpt.resume_point(run, "auto")


@pytest.mark.parametrize("damage", ["zeros", "garbage"])
def test_a_state_file_of_its_saved_size_that_does_not_load_names_the_checkpoint(tmp_path, damage):
    """Zeros from a crash after the sizes were recorded pass the size check: torch's unpickler raised a
    traceback naming neither the checkpoint nor the whole one before it."""
    for step in (10, 13):
        _save(tmp_path, step)
    state = tmp_path / "step-00000013" / "rank00000.pt"
    size = state.stat().st_size
    state.write_bytes(b"\0" * size if damage == "zeros" else b"\xff" * size)
    assert ckpt.damage(tmp_path / "step-00000013") is None  # the sizes cannot tell
    with pytest.raises(ValueError, match=r"step-00000013 does not load \(.*\); its file rank00000\.pt is damaged "
                                         r"\(.*move it out of .* to resume from "
                                         r"step-00000010, the newest whole one before it"):  # fmt: skip
        ckpt.saved_trainer_state(tmp_path / "step-00000013")
    with pytest.raises(ValueError, match=r"step-00000013 does not load"):
        ckpt.load_checkpoint(FakeEngine(), tmp_path / "step-00000013")
    state = tmp_path / "step-00000010" / "rank00000.pt"
    state.write_bytes(b"\0" * state.stat().st_size)
    with pytest.raises(ValueError, match=r"no whole checkpoint is older: delete the checkpoints directory"):
        ckpt.saved_trainer_state(tmp_path / "step-00000010")


def test_the_damaged_state_file_is_found_by_the_archives_checksums(tmp_path):
    checkpoint = _save(tmp_path, 10)
    assert ckpt.damaged_state_file(checkpoint) is None  # whole
    state = checkpoint / "mp_rank_00_model_states.pt"
    data = bytearray(state.read_bytes())
    at = data.index(bytes(torch.arange(100).numpy().tobytes()[8:16]))  # inside the stored tensor's bytes
    data[at] ^= 0xFF  # still a zip archive of the same size; its CRC no longer holds
    state.write_bytes(bytes(data))
    assert ckpt.damaged_state_file(checkpoint) == "mp_rank_00_model_states.pt"
    (checkpoint / "rank00000.pt").write_bytes(b"\0" * 64)  # the first in name order is named
    assert ckpt.damaged_state_file(checkpoint) == "mp_rank_00_model_states.pt"
    state.unlink()
    assert ckpt.damaged_state_file(checkpoint) == "rank00000.pt"


def test_a_latest_file_of_bytes_that_are_no_text_is_rewritten_by_the_next_save(tmp_path):
    """point_latest read it as UTF-8 outside its OSError guard: every save of the run failed."""
    _save(tmp_path, 10)
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00bad")
    _save(tmp_path, 20)
    assert (tmp_path / "latest").read_text() == "step-00000020"


def test_an_out_of_memory_error_while_loading_is_not_called_a_damaged_checkpoint(tmp_path):
    """Every RuntimeError of DeepSpeed's load (a CUDA out-of-memory, a collective's) read as damaged files, with
    advice to set a whole checkpoint aside."""
    for step in (10, 20):
        _save(tmp_path, step)

    class Full(FakeEngine):
        def load_checkpoint(self, load_dir, tag, load_optimizer_states):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        ckpt.load_checkpoint(Full(), tmp_path / "step-00000020")

    class Broken(FakeEngine):
        def load_checkpoint(self, load_dir, tag, load_optimizer_states):
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    with pytest.raises(ValueError, match=r"step-00000020 does not load .*resume from step-00000010"):
        ckpt.load_checkpoint(Broken(), tmp_path / "step-00000020")

    class Refused(FakeEngine):  # torch.load(weights_only=True) of files another checkpoint writer saved, whole
        def load_checkpoint(self, load_dir, tag, load_optimizer_states):
            import pickle

            raise pickle.UnpicklingError("Weights only load failed. This file can still be loaded, ...\nmore")

    with pytest.raises(ValueError) as refused:
        ckpt.load_checkpoint(Refused(), tmp_path / "step-00000020")
    said = str(refused.value)
    assert "weights-only loader refuses an object in it (Weights only load failed." in said
    assert "its files are not damaged" in said and "delete" not in said and "move it out" not in said


def test_a_resume_draws_the_random_numbers_the_saved_run_would_have_drawn_next(tmp_path):
    """Dropout masks and sampling after a resume: Python's, NumPy's and torch's generators continue from where
    the checkpoint left them (a resume that skipped them trained on other masks than the uninterrupted run)."""
    import random

    import numpy as np

    class LoadingEngine(FakeEngine):
        lr_scheduler = None

        def load_checkpoint(self, load_dir, tag, load_optimizer_states):
            pass

    def draws():
        return random.random(), float(np.random.random()), torch.rand(3).tolist()

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint = ckpt.save_checkpoint(FakeEngine(), tmp_path, 3, {"step": 3}, {"student": 1}, 0)
    expected = draws()  # what the run drew next
    random.seed(2), np.random.seed(2), torch.manual_seed(2)  # a new process: other states
    assert ckpt.load_checkpoint(LoadingEngine(), checkpoint)["step"] == 3
    assert draws() == expected


def test_resume_never_refuses_a_directory_that_holds_a_run(tmp_path):
    """A run without a checkpoint yet still has its metrics.jsonl, which a fresh start would overwrite."""
    assert ckpt.resume_point(tmp_path / "fresh", "never") is None
    metrics_only = tmp_path / "metrics_only"
    metrics_only.mkdir()
    (metrics_only / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="already holds a run"):
        ckpt.resume_point(metrics_only, "never")
    checkpointed = tmp_path / "checkpointed"
    _save(checkpointed / "checkpoints", 5)
    with pytest.raises(ValueError, match="already holds a run"):
        ckpt.resume_point(checkpointed, "never")
    assert ckpt.resume_point(checkpointed, "auto") == checkpointed / "checkpoints" / "step-00000005"


def test_a_permission_refused_inside_the_run_directory_is_one_line_and_one_elsewhere_is_not_ours(tmp_path):
    """chmod 444 metrics.jsonl (or 555 on the run directory) mid-run was a traceback: only a full, over-quota or
    read-only filesystem counted as a write failure. A refusal on an input outside the run is not one."""
    import errno

    run = tmp_path / "run"
    run.mkdir()
    inside = PermissionError(errno.EACCES, "Permission denied", str(run / "metrics.jsonl"))
    failed = ckpt.output_write_failed(run, inside)
    assert failed is not None and str(failed).startswith(
        f"writing under run.output_dir {run} failed: Permission denied ({run / 'metrics.jsonl'})"
    ), failed
    try:  # wrapped, as a library raises it
        raise RuntimeError("could not save") from PermissionError(errno.EPERM, "Operation not permitted", str(run))
    except RuntimeError as err:
        assert "Operation not permitted" in str(ckpt.output_write_failed(run, err))
    outside = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "data.jsonl"))
    assert ckpt.output_write_failed(run, outside) is None
