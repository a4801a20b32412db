"""Exports of a bf16/fp16 engine carry the optimizer's fp32 master weights, not the module's half copy,
and those masters start from the module's weights as built (fp32), not rounded to half precision.

A half-precision engine (the default on GPUs) keeps the module in bf16/fp16 and the weights it trains in
fp32 inside the optimizer. ``full_precision_weights`` (every export of a run) and ``dist-kd export``'s
checkpoint reader must both give those fp32 weights. Checked against DeepSpeed's own zero_to_fp32 reader of
the same step's checkpoint (ZeRO 2-3), against the module (rounding each exported weight to the engine's
dtype gives the module's weight exactly, and the exported weights hold bits the half copy lacks), and the
module comes back unchanged. CPU ranks (DeepSpeed's CPU accelerator trains bf16 and fp16 engines), so these
are the twins of the GPU path.
"""

from __future__ import annotations

import json

import pytest
import torch

from dist_kd.export import fp32_state_dict

pytestmark = pytest.mark.distributed

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_fp16() -> bool:
    """DeepSpeed's CPU accelerator takes fp16 engines only where oneDNN computes fp16 (the test it makes)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_FP16 = pytest.mark.skipif(not _cpu_fp16(), reason="this CPU has no oneDNN fp16: DeepSpeed refuses fp16 engines")
# "bf16": train.bf16_mode=deepspeed (a bf16 module, fp32 masters in DeepSpeed's optimizer); "bf16-autocast": the
# default bf16 mode, an fp32 module under torch.autocast, whose export is the module's weights themselves.
CASES = [("bf16", "zero0", 1), pytest.param("fp16", "zero0", 2, marks=CPU_FP16), ("bf16", "zero2", 2),
         ("bf16", "zero3", 2), ("fp32", "zero0", 1), ("bf16", "zero3_offload", 1), ("bf16-autocast", "zero0", 2),
         ("bf16-autocast", "zero2", 2)]  # fmt: skip
GPU_CASES = [pytest.param(precision, zero, "cuda", marks=pytest.mark.gpu)
             for precision in ("bf16", "fp16", "bf16-autocast") for zero in ("zero0", "zero2")]  # fmt: skip


@pytest.mark.parametrize(("precision", "zero", "nproc"), CASES)
def test_export_carries_the_fp32_master_weights(ranks, tiny_bert_dir, tmp_path, precision, zero, nproc):
    ranks("half_export.py", str(tiny_bert_dir), str(tmp_path), f"ds_configs/{zero}.json", precision, nproc=nproc)
    _check(tmp_path, precision, zero, nproc)


def test_export_of_deepspeeds_bf16_optimizer_carries_its_fp32_master_weights(ranks, tiny_bert_dir, tmp_path):
    """ZeRO-1 with bf16 and fp32 gradient accumulation trains in DeepSpeed's bf16 optimizer, whose checkpoint
    files (bf16_zero_pp_rank_N_...) zero_to_fp32 does not read: dist-kd export refused every such checkpoint."""
    config = tmp_path / "zero1_bf16.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}))
    ranks("half_export.py", str(tiny_bert_dir), str(tmp_path), str(config), "bf16", nproc=2)
    assert sorted(path.name for path in (tmp_path / "checkpoints" / "step-00000004").glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(2)
    ]
    _check(tmp_path, "bf16", "zero1_bf16", 2)


@pytest.mark.parametrize(("precision", "zero", "device"), GPU_CASES)
def test_export_carries_the_fp32_master_weights_on_a_gpu(ranks, tiny_bert_dir, tmp_path, precision, zero, device):
    """The GPU twin, one rank on the device (nccl)."""
    ranks("half_export.py", str(tiny_bert_dir), str(tmp_path), f"ds_configs/{zero}.json", precision, device,
          nproc=1, cuda=True)  # fmt: skip
    _check(tmp_path, precision, zero, 1)


def _check(tmp_path, precision: str, zero: str, nproc: int) -> None:
    # Before any step the masters are the module's weights as built (fp32), not those rounded to half.
    start = torch.load(tmp_path / "start.pt")
    assert start["at_start"].keys() == start["initial"].keys()
    for name, tensor in start["initial"].items():
        torch.testing.assert_close(start["at_start"][name], tensor, rtol=0, atol=0, msg=name)
    for rank in range(nproc):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["restored"], rank
    exported, module = torch.load(tmp_path / "exported.pt"), torch.load(tmp_path / "module.pt")
    assert exported.keys() == module.keys() and len(exported) > 10
    moved = sum(not torch.equal(tensor, start["initial"][name]) for name, tensor in exported.items())
    assert moved > 0.5 * len(exported), "the four steps should have changed most weights"
    half = HALF.get(precision)
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    assert all(tensor.dtype == (half or torch.float32) for tensor in module.values())
    if half is None:
        for name, tensor in exported.items():
            torch.testing.assert_close(tensor, module[name], rtol=0, atol=0, msg=name)
    else:
        for name, tensor in exported.items():
            assert torch.equal(tensor.to(half), module[name]), name  # the module is the master rounded
        extra = sum(int((tensor != module[name].float()).sum()) for name, tensor in exported.items())
        assert extra > 0.5 * sum(t.numel() for t in exported.values()), "most weights should carry bits beyond half"
    _check_scoring(tmp_path, exported, half, zero)
    # The checkpoint of the same step, read back as dist-kd export reads it (zero_to_fp32 for ZeRO 1-3).
    saved = fp32_state_dict(tmp_path / "checkpoints" / "step-00000004")
    assert saved.keys() >= exported.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0, msg=name)
    if zero not in ("zero0", "zero1_bf16"):  # and DeepSpeed's own reader of the whole directory, independently
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        theirs = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), tag="step-00000004")
        for name, tensor in exported.items():
            torch.testing.assert_close(theirs[name], tensor, rtol=0, atol=0, msg=name)


def _check_scoring(tmp_path, exported: dict[str, torch.Tensor], half: torch.dtype | None, zero: str) -> None:
    """Dev scores and quality figures are computed inside ``exported_weights``: the forward is that of the
    exported fp32 weights (an fp32 model loaded from them), not of the engine's half copy, at every ZeRO stage
    (ZeRO-3 runs a plain twin of the module: its own forward hooks would partition weights gathered for the
    context). The module is left as it is (checked by the caller through ``restored``)."""
    from transformers import AutoConfig, AutoModel

    forward = torch.load(tmp_path / "forward.pt")
    weights = {name.removeprefix("student."): t for name, t in exported.items() if name.startswith("student.")}
    config = AutoConfig.from_pretrained(tmp_path / "student_config")
    reference = AutoModel.from_config(config).eval()
    reference.load_state_dict(weights)
    with torch.no_grad():
        expected = reference(input_ids=forward["input_ids"], attention_mask=forward["attention_mask"]).last_hidden_state
    torch.testing.assert_close(forward["scored"], expected, rtol=1e-5, atol=1e-5)
    if half is None:
        torch.testing.assert_close(forward["scored"], forward["as_is"], rtol=0, atol=0)
    else:
        half_error = (forward["as_is"] - expected).abs().max().item()
        assert half_error > 1e-3, f"the half copy's forward should differ from the fp32 weights' ({half_error})"
    if zero.startswith("zero3") and half is not None:  # the twin holds no storage outside the context
        assert forward["twin_after"] == "meta"
