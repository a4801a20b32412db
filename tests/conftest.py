"""Shared fixtures: tiny models and tokenizers built from configs, saved like real HF checkpoints."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.pop("DIST_KD_LOG_LEVEL", None)  # tests read the INFO lines of the commands they start


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests on machines without CUDA (CI is CPU-only; their CPU twins run there)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from dist_kd.testing import build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A 4-layer, 32-wide BERT teacher with its tokenizer."""
    from dist_kd.testing import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), seed=0)


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory):
    from dist_kd.testing import build_tiny_roberta

    return build_tiny_roberta(tmp_path_factory.mktemp("tiny_roberta"), seed=0)


@pytest.fixture
def refuse_mkdir_in(monkeypatch):
    """Call with a directory (and an errno): os.mkdir is refused in it, as a read-only mount or another user's
    directory would refuse it (chmod alone does not stop root, who runs CI)."""
    original = os.mkdir

    def refuse(directory, number=errno.EACCES):
        def mkdir(path, *args, **kwargs):
            if Path(path).parent == Path(directory):
                raise OSError(number, os.strerror(number), str(path))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)

    return refuse
