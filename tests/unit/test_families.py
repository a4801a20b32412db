"""ELECTRA, DistilBERT and ModernBERT as teachers and students: captured scores by hand, weight selection of
fused projections, ModernBERT's rotary positions and sliding windows, and calibration of a pre-LN encoder."""

from __future__ import annotations

import pytest
import torch

from dist_kd.models.teacher import Teacher
from dist_kd.testing import build_tiny_encoder, random_sentences

FAMILIES = ["electra", "distilbert", "modernbert"]


def _batch(model_dir, num=3, max_length=24):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = random_sentences(num, seed=1) + ["word " * 40]  # the last row is longer than ModernBERT's window
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch should contain padding"
    return enc["input_ids"], enc["attention_mask"]


def _rotate(x_BHLd: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding by its definition: dimensions i and i + d/2 of position p turn together by
    the angle p * theta ** (-2 i / d)."""
    length, width = x_BHLd.shape[-2], x_BHLd.shape[-1]
    half = width // 2
    frequencies = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / width)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * frequencies[None, :]
    cos, sin = angle.cos().float(), angle.sin().float()
    first, second = x_BHLd[..., :half], x_BHLd[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def _query_key_by_hand(model, n: int, hidden_in: torch.Tensor):
    """Layer n's query and key ``(B, H, L, d)`` from its own weights, before any position rotation."""
    from dist_kd.models.capture import find_layer_list

    layer = find_layer_list(model)[2][n - 1]
    heads = model.config.num_attention_heads
    batch, length, width = hidden_in.shape
    d_head = width // heads
    family = model.config.model_type
    if family == "modernbert":
        qkv = layer.attn.Wqkv(layer.attn_norm(hidden_in)).view(batch, length, 3, heads, d_head)
        query, key = qkv[:, :, 0], qkv[:, :, 1]
    elif family == "distilbert":
        query, key = (
            lin(hidden_in).view(batch, length, heads, d_head) for lin in (layer.attention.q_lin, layer.attention.k_lin)
        )
    else:
        attention = layer.attention.self
        query, key = (lin(hidden_in).view(batch, length, heads, d_head) for lin in (attention.query, attention.key))
    return query.transpose(1, 2), key.transpose(1, 2)


def _scores_by_hand(model, n: int, hidden_in: torch.Tensor) -> torch.Tensor:
    query, key = _query_key_by_hand(model, n, hidden_in)
    config = model.config
    if config.model_type == "modernbert":
        theta = config.rope_parameters[config.layer_types[n - 1]]["rope_theta"]
        query, key = _rotate(query, theta), _rotate(key, theta)
    return query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_scores_equal_qk_by_hand_and_states_equal_the_stock_models(family, tmp_path):
    """Through the registry: QK^T / sqrt(d) (after ModernBERT's rotation) in the captured layers, the stock
    model's hidden states everywhere."""
    from transformers import AutoModel

    model_dir = build_tiny_encoder(tmp_path / family, family, num_layers=4, hidden_size=32, num_heads=4)
    teacher = Teacher(model_dir, dtype="fp32", score_layers=[1, 2, 4])
    ids, mask = _batch(model_dir)
    features = teacher.features(ids, mask)
    assert sorted(features.scores) == [1, 2, 4]
    with torch.no_grad():
        for n in (1, 2, 4):
            expected = _scores_by_hand(teacher.model, n, features.hidden[n - 1] if n > 1 else features.embeddings)
            torch.testing.assert_close(features.scores[n], expected, rtol=1e-4, atol=1e-5)
        stock = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
        reference = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for n in range(0, 5):
        got = features.embeddings if n == 0 else features.hidden[n]
        torch.testing.assert_close(got[real], reference[n][real], rtol=1e-4, atol=1e-5)


def test_modernbert_sliding_window_layers_give_their_window_to_the_loss(tmp_path):
    """ModernBERT's sliding-window layers hand over the pairs their softmax sees (|i - j| <= local_attention /
    2, real keys); its global layers hand over none (padding alone is the loss's own mask)."""
    model_dir = build_tiny_encoder(tmp_path / "mb", "modernbert", num_layers=4, hidden_size=32, num_heads=4)
    teacher = Teacher(model_dir, dtype="fp32", score_layers=[1, 2, 3, 4])
    ids, mask = _batch(model_dir)
    features = teacher.features(ids, mask)
    config = teacher.config
    assert [config.layer_types[n - 1] for n in sorted(features.score_masks)] == ["sliding_attention"] * 2
    length = ids.shape[1]
    position = torch.arange(length)
    band_LL = (position[:, None] - position[None, :]).abs() <= config.local_attention // 2
    for window_B1LL in features.score_masks.values():
        assert window_B1LL.dtype == torch.bool and window_B1LL.shape == (len(ids), 1, length, length)
        real_B1LL = (band_LL[None] & mask.bool()[:, None, :])[:, None]  # keys must be real; queries any
        assert torch.equal(window_B1LL, real_B1LL)


def test_attention_loss_leaves_out_the_pairs_outside_a_window():
    """attention_mse and score_variance with a pair mask average over the allowed real pairs alone (a reference
    mean over the pairs listed one by one); an all-True pair mask is no pair mask."""
    from dist_kd.losses import attention_mse, score_variance

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    position = torch.arange(6)
    window = ((position[:, None] - position[None, :]).abs() <= 1).expand(2, 1, 6, 6)
    pairs = [
        (b, i, j) for b in range(2) for i in range(6) for j in range(6) if mask[b, i] and mask[b, j] and abs(i - j) <= 1
    ]
    squared = [(student[b, :, i, j] - teacher[b, :, i, j]).square() for b, i, j in pairs]
    torch.testing.assert_close(attention_mse(student, teacher, mask, window), torch.stack(squared).mean())
    values = torch.stack([teacher[b, :, i, j] for b, i, j in pairs])  # (pairs, H)
    torch.testing.assert_close(score_variance(teacher, mask, window), values.var(0, unbiased=False).mean())
    everything = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    torch.testing.assert_close(attention_mse(student, teacher, mask, everything), attention_mse(student, teacher, mask))
    torch.testing.assert_close(score_variance(teacher, mask, everything), score_variance(teacher, mask))


def test_scores_outside_a_window_do_not_move_the_attention_term(tmp_path):
    """A ModernBERT teacher's raw scores outside a sliding layer's window reach no softmax: changing them
    leaves the attention term as it was; changing one inside the window changes it."""
    from dist_kd.objective import LossWeights, tinybert_objective

    model_dir = build_tiny_encoder(tmp_path / "mb", "modernbert", num_layers=2, hidden_size=32, num_heads=4)
    teacher = Teacher(model_dir, dtype="fp32", score_layers=[1, 2])
    ids, mask = _batch(model_dir)
    features = teacher.features(ids, mask)
    student = teacher.features(ids, mask)
    student.scores = {n: scores + 0.1 * torch.randn_like(scores) for n, scores in student.scores.items()}
    weights = LossWeights(embd=0.0, hidden=0.0, attn=1.0)

    def attention_term(teacher_features):
        return tinybert_objective(student, teacher_features, [1, 2], mask, weights, normalize="variance")["attn"]

    before = attention_term(features)
    outside = features.score_masks[2].logical_not().expand_as(features.scores[2])
    assert outside.any()
    features.scores[2] = torch.where(outside, features.scores[2] + 100.0, features.scores[2])
    torch.testing.assert_close(attention_term(features), before)
    features.scores[2][:, :, 0, 0] += 1.0  # a pair inside every window
    assert not torch.allclose(attention_term(features), before)


def test_narrower_modernbert_is_cut_block_by_block_from_its_fused_projections(tmp_path):
    """student.init=teacher on ModernBERT: Wqkv (query, key, value stacked) takes the same whole heads from
    each of its three blocks, the gated MLP's Wi the same feed-forward units from its input and its gate; the
    student keeps teacher layer g(m)'s attention kind."""
    from dist_kd.layer_map import layer_map
    from dist_kd.models.student import StudentConfig, build_student, unit_selection

    teacher_dir = build_tiny_encoder(tmp_path / "mb", "modernbert", num_layers=4, hidden_size=32, num_heads=4)
    teacher = Teacher(teacher_dir, dtype="fp32")
    mapping = layer_map(4, 2)
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=2, intermediate_size=40, init="teacher", dropout=0.0)
    student = build_student(cfg, teacher.config, teacher.model, mapping)
    selection = unit_selection(student.config, teacher.config)
    assert selection.inner.tolist() == [*range(0, 8), *range(16, 24)]  # heads 0 and 2 of 4, each 8 wide
    ffn = selection.ffn
    for m, g in enumerate(mapping):
        s_layer, t_layer = student.layers[m], teacher.model.layers[g - 1]
        qkv_rows = torch.cat([block * 32 + selection.inner for block in range(3)])
        torch.testing.assert_close(s_layer.attn.Wqkv.weight, t_layer.attn.Wqkv.weight[qkv_rows][:, selection.residual])
        torch.testing.assert_close(
            s_layer.attn.Wo.weight, t_layer.attn.Wo.weight[selection.residual][:, selection.inner]
        )
        torch.testing.assert_close(
            s_layer.mlp.Wi.weight, t_layer.mlp.Wi.weight[torch.cat([ffn, 64 + ffn])][:, selection.residual]
        )
        torch.testing.assert_close(s_layer.mlp.Wo.weight, t_layer.mlp.Wo.weight[selection.residual][:, ffn])
        assert student.config.layer_types[m] == teacher.config.layer_types[g - 1]


def test_a_cut_head_keeps_the_teachers_rotary_pairs_and_frequencies(tmp_path):
    """Heads cut to half their width keep every other dimension, so the two dimensions of each kept rotary
    pair (i and i + d/2) stay together, and the student's pair j turns at the teacher's frequency of its pair
    2j: the student's rotated query is the teacher's query projection (the cut rows, on the student's input)
    rotated as the teacher rotates it, then cut."""
    from dist_kd.models.capture import FeatureCapture
    from dist_kd.models.student import StudentConfig, build_student, unit_selection

    teacher_dir = build_tiny_encoder(tmp_path / "mb", "modernbert", num_layers=2, hidden_size=32, num_heads=4)
    teacher = Teacher(teacher_dir, dtype="fp32")
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, init="teacher", dropout=0.0)
    student = build_student(cfg, teacher.config, teacher.model, [1, 2]).eval()
    selection = unit_selection(student.config, teacher.config)
    assert selection.inner[:4].tolist() == [0, 2, 4, 6]  # within each 8-wide head: pairs (0, 4) and (2, 6)
    ids, mask = _batch(teacher_dir)
    with torch.no_grad():
        features = FeatureCapture(student, [], [1, 2])(ids, mask)
        for n in (1, 2):
            t_layer = teacher.model.layers[n - 1]
            s_input = student.layers[n - 1].attn_norm(features.embeddings if n == 1 else features.hidden[n - 1])
            batch, length, _ = s_input.shape
            query_rows = t_layer.attn.Wqkv.weight[:32][:, selection.residual]  # the teacher's query, all 4 x 8
            full = (s_input @ query_rows.T).view(batch, length, 4, 8).transpose(1, 2)
            theta = teacher.config.rope_parameters[teacher.config.layer_types[n - 1]]["rope_theta"]
            expected = _rotate(full, theta)[..., [0, 2, 4, 6]]
            torch.testing.assert_close(features.qkv[n][0], expected, rtol=1e-4, atol=1e-5)


def test_calibration_of_a_pre_ln_student_is_refused_before_it_changes_a_weight(tmp_path):
    """ModernBERT's states are not LayerNorm outputs: calibrate_to_teacher raises NotPostLayerNorm and the
    student is as it was (its embeddings' LayerNorm, a true output norm, was not calibrated alone)."""
    from dist_kd.models.student import NotPostLayerNorm, StudentConfig, build_student, calibrate_to_teacher

    teacher_dir = build_tiny_encoder(tmp_path / "mb", "modernbert", num_layers=4, hidden_size=32, num_heads=4)
    teacher = Teacher(teacher_dir, dtype="fp32")
    cfg = StudentConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, init="teacher", dropout=0.0)
    student = build_student(cfg, teacher.config, teacher.model, [2, 4])
    before = {name: value.clone() for name, value in student.state_dict().items()}
    ids, mask = _batch(teacher_dir)
    with pytest.raises(NotPostLayerNorm, match="not the output of a LayerNorm"):
        calibrate_to_teacher(student, teacher.model, [2, 4], [{"input_ids": ids, "attention_mask": mask}])
    assert all(torch.equal(value, before[name]) for name, value in student.state_dict().items())
    assert student.training


def test_electra_student_keeps_the_teachers_embedding_projection_cut_and_is_calibrated_through_it(tmp_path):
    """ELECTRA's embeddings are narrower than its layers and projected up: a narrower student keeps the rows
    of the projection that its residual dimensions select, so its embedding output is the teacher's, cut, and
    calibration sets that state's statistics through the projection (ELECTRA is post-LN; it was refused as
    pre-LN). A student as wide as the embeddings would have no projection (transformers builds none): refused."""
    from dist_kd.models.student import (
        DistillStudent,
        StudentConfig,
        build_student,
        calibrate_to_teacher,
        unit_selection,
    )

    teacher_dir = build_tiny_encoder(tmp_path / "electra", "electra", num_layers=2, hidden_size=32, num_heads=4)
    teacher = Teacher(teacher_dir, dtype="fp32")
    assert teacher.config.embedding_size == 8
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, init="teacher", dropout=0.0)
    student = build_student(cfg, teacher.config, teacher.model, [1, 2]).eval()
    residual = unit_selection(student.config, teacher.config).residual
    project = teacher.model.embeddings_project
    torch.testing.assert_close(student.embeddings_project.weight, project.weight[residual])
    ids, mask = _batch(teacher_dir)
    with torch.no_grad():
        got = DistillStudent(student, None)(ids, mask).embeddings
    torch.testing.assert_close(got, teacher.features(ids, mask).embeddings[..., residual])
    batches = [{"input_ids": ids, "attention_mask": mask}]
    errors = calibrate_to_teacher(student, teacher.model, [1, 2], batches, residual)
    assert len(errors) == 3
    with torch.no_grad():
        states = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for index, n in enumerate([0, 1, 2]):
        s_rows = states[index][real]
        t_rows = teacher.features(ids, mask).embeddings[real] if n == 0 else teacher.features(ids, mask).hidden[n][real]
        torch.testing.assert_close(s_rows.mean(0), t_rows[:, residual].mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s_rows.std(0), t_rows[:, residual].std(0), atol=1e-4, rtol=1e-4)
    as_wide = StudentConfig(num_layers=2, hidden_size=8, num_heads=4, intermediate_size=32, init="teacher")
    with pytest.raises(ValueError, match=r"leaves out the teacher's embeddings_project.bias.*embedding_size \(8\)"):
        build_student(as_wide, teacher.config, teacher.model, [1, 2])
    with pytest.raises(ValueError, match=r"leaves out student.path's embeddings_project.bias"):  # a task run's cut
        build_student(as_wide, teacher.config, teacher.model, [1, 2], "student.path")


def test_a_deberta_student_as_wide_as_the_teachers_embeddings_is_told_what_to_change(tmp_path):
    """DeBERTa-v2's projection of narrow embeddings is embeddings.embed_proj: the refusal gave ELECTRA's hint only."""
    from dist_kd.models.student import StudentConfig, build_student
    from dist_kd.models.teacher import Teacher
    from dist_kd.testing import build_tiny_encoder

    teacher = Teacher(build_tiny_encoder(tmp_path / "deberta", "deberta-v2", embedding_size=16), dtype="fp32")
    as_wide = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, init="teacher")
    said = r"leaves out the teacher's embeddings.embed_proj.weight, .*other than the teacher's embedding_size"
    with pytest.raises(ValueError, match=said + r" \(16\), or use"):
        build_student(as_wide, teacher.config, teacher.model, [1, 2])
    narrower = StudentConfig(num_layers=2, hidden_size=8, num_heads=4, intermediate_size=32, init="teacher")
    assert build_student(narrower, teacher.config, teacher.model, [1, 2]) is not None


@pytest.mark.parametrize("conv", [False, True])
def test_deberta_students_are_calibrated_on_padded_batches_and_through_the_convolution(conv, tmp_path):
    """DeBERTa is post-LN, but its calibration was skipped as if pre-LN: its embeddings zero the padding after
    their LayerNorm (a padded batch failed the check once the norm had a bias, as any trained one has), and
    v2-xlarge/xxlarge's convolution after layer 1 ends in its own LayerNorm (the check failed every time)."""
    from transformers import AutoModel

    from dist_kd.models.student import StudentConfig, build_student, calibrate_to_teacher, unit_selection

    extra = dict(conv_kernel_size=3, conv_act="gelu") if conv else {}
    teacher_dir = build_tiny_encoder(tmp_path / "d", "deberta-v2", num_layers=3, hidden_size=32, num_heads=4, **extra)
    model = AutoModel.from_pretrained(teacher_dir)
    with torch.no_grad():  # trained LayerNorms have biases
        for name, parameter in model.named_parameters():
            if "LayerNorm.bias" in name:
                parameter.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(teacher_dir)
    teacher = Teacher(teacher_dir, dtype="fp32")
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=2, intermediate_size=32, init="teacher", dropout=0.0)
    student = build_student(cfg, teacher.config, teacher.model, [1, 3])
    residual = unit_selection(student.config, teacher.config).residual
    ids, mask = _batch(teacher_dir)
    assert not mask.bool().all()  # padded
    calibrate_to_teacher(student, teacher.model, [1, 3], [{"input_ids": ids, "attention_mask": mask}], residual)
    with torch.no_grad():
        states = student.eval()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        target = teacher.features(ids, mask)
    real = mask.bool()
    for index, t_state in enumerate([target.embeddings, target.hidden[1], target.hidden[3]]):
        s_rows, t_rows = states[index][real], t_state[real][:, residual]
        torch.testing.assert_close(s_rows.mean(0), t_rows.mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(s_rows.std(0), t_rows.std(0), atol=1e-4, rtol=1e-4)


def test_calibration_of_a_student_without_an_embeddings_module_is_refused_as_pre_ln():
    """EuroBERT (embed_tokens, pre-LN layers) is accepted as a teacher (its attention routes through dist_kd's),
    but the default student.calibrate read student.embeddings: an AttributeError traceback, not the documented
    skip with a warning."""
    import transformers

    from dist_kd.models.student import NotPostLayerNorm, _output_maps

    if not hasattr(transformers, "EuroBertModel"):
        pytest.skip("this transformers has no EuroBERT")
    shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}
    config = transformers.EuroBertConfig(vocab_size=64, pad_token_id=0, intermediate_size=64, **shape)
    with pytest.raises(NotPostLayerNorm, match="EuroBertModel has no embeddings module"):
        _output_maps(transformers.EuroBertModel(config))


@pytest.mark.parametrize("family", [*FAMILIES, "roberta", "mpnet", "deberta-v2"])
def test_a_teacher_cut_above_its_last_mapped_layer_gives_the_full_models_states(family, tmp_path):
    """A layer map ending below the top cuts the teacher there; ModernBERT then gave its final norm's output as the
    last mapped layer's state (transformers ties the last state to it), another target than the full model's."""
    from transformers import AutoModel

    model_dir = build_tiny_encoder(tmp_path / family, family, num_layers=4, hidden_size=32, num_heads=4)
    ids, mask = _batch(model_dir)
    stock = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        full = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for top in (2, 3):
        features = Teacher(model_dir, dtype="fp32", score_layers=[1, top], max_layer=top).features(ids, mask)
        assert sorted(features.hidden) == list(range(1, top + 1))
        real = mask.bool()
        for n in range(1, top + 1):
            torch.testing.assert_close(features.hidden[n][real], full[n][real], atol=1e-5, rtol=1e-4)
