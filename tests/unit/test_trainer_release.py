"""A trainer frees its DeepSpeed engine on every way out: ``close`` after a run (even when the loggers fail
to close), and its constructor when a check after the engine was built raises (a bad resume, say), where
no trainer object is left for anyone to close. The engine here is a stand-in: what is checked is that
``release_engine`` gets it exactly once and the error still reaches the caller."""

from __future__ import annotations

import pytest

from dist_kd.train import engine as engine_module
from dist_kd.train.general import GeneralTrainer
from dist_kd.train.task import TaskTrainer


@pytest.fixture(params=[GeneralTrainer, TaskTrainer], ids=["general", "task"])
def trainer_class(request, monkeypatch):
    released = []
    monkeypatch.setattr(engine_module, "release_engine", released.append)
    return request.param, released


def test_a_set_up_that_fails_after_building_the_engine_frees_it(trainer_class, monkeypatch):
    cls, released = trainer_class
    engine = object()

    def set_up(self, cfg, info):
        self.engine = engine
        raise ValueError("checkpoint step-00000010 was written by 2 ranks; this run has 4")

    monkeypatch.setattr(cls, "_set_up", set_up)
    with pytest.raises(ValueError, match="written by 2 ranks"):
        cls(cfg=None, info=None)
    assert released == [engine]


def test_a_set_up_that_fails_before_the_engine_frees_nothing(trainer_class, monkeypatch):
    cls, released = trainer_class

    def set_up(self, cfg, info):
        raise FileNotFoundError("data.shards: no manifest.json")

    monkeypatch.setattr(cls, "_set_up", set_up)
    with pytest.raises(FileNotFoundError):
        cls(cfg=None, info=None)
    assert released == []


def test_close_frees_the_engine_once_even_when_the_loggers_fail(trainer_class):
    cls, released = trainer_class
    trainer = cls.__new__(cls)
    engine = trainer.engine = object()

    class BrokenLogger:
        def close(self):
            raise OSError("tracker upload failed")

    trainer.metrics = BrokenLogger()
    with pytest.raises(OSError):
        trainer.close()
    assert released == [engine] and trainer.engine is None
    trainer.metrics = type("Logger", (), {"close": lambda self: None})()
    trainer.close()  # a second close frees nothing twice
    assert released == [engine]
