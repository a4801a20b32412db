"""Outputs and devices that cannot work are refused before any work (they failed after it, or with a traceback)."""

from __future__ import annotations

import pytest
import torch

from dist_kd.data.augment import AugmentConfig, augment_task, check_device
from dist_kd.data.corpus import prepare_corpus
from dist_kd.data.tasks import TaskSpec
from dist_kd.precompute import PrecomputeConfig, precompute_soft_targets

SPEC = TaskSpec(name="t", labels=["a", "b"], text_a="text")


def test_an_output_that_is_a_file_is_refused_before_any_input_is_read(tmp_path):
    """augment ran every masked-LM pass, then said "train.jsonl/parts: Not a directory"; precompute and
    prepare-corpus said the same without naming the flag. The inputs here do not exist: the output is named
    first, so nothing was read."""
    taken = tmp_path / "train.jsonl"
    taken.write_text('{"text": "a row", "label": "a"}\n')
    before = taken.read_bytes()
    missing = tmp_path / "missing"
    refusal = f"--output {taken} is a file, not a directory: give a directory for the output"
    with pytest.raises(ValueError, match=refusal):
        augment_task(SPEC, missing / "data.jsonl", taken, missing / "glove.txt", AugmentConfig(), device="cpu")
    with pytest.raises(ValueError, match=refusal):
        precompute_soft_targets(SPEC, missing / "data.jsonl", taken, PrecomputeConfig(teachers=[str(missing)]))
    with pytest.raises(ValueError, match=refusal):
        prepare_corpus([taken], missing / "tokenizer", taken)
    assert taken.read_bytes() == before


def test_a_device_torch_cannot_name_or_a_gpu_the_machine_lacks_is_refused():
    """augment --device gpu (or cuda without one) gave a traceback and exit code 1 at the first batch."""
    check_device("cpu")
    for name in ("gpu", "cuda:x"):
        with pytest.raises(ValueError, match=rf"device \(--device\) '{name}' is not a device torch knows"):
            check_device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"device \(--device\) 'cuda:{count}': this machine has {count} CUDA"):
        check_device(f"cuda:{count}")
    if count == 0:
        with pytest.raises(ValueError, match=r"'cuda': this machine has 0 CUDA device\(s\); give cpu$"):
            check_device("cuda")
    else:
        check_device("cuda")
