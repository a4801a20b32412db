"""MPNet and DeBERTa-v2/v3 through dist_kd's attention adapters: the captured raw scores equal an independent
computation from each layer's weights (the papers' formulas, with each model's relative-position buckets
written out here), and the adapted forward leaves the model's outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from dist_kd.models.teacher import Teacher
from dist_kd.testing import build_tiny_encoder
from tests.reference_attention import deberta_scores, mpnet_scores

ARCHS = ["mpnet", "deberta-v2", "deberta-v2-unshared"]
TEXTS = ["the game was good and the team won the match at night", "a bank sold oil"]  # 14 and 6 tokens


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request, tmp_path_factory):
    return request.param, build_tiny_encoder(tmp_path_factory.mktemp(request.param), request.param, num_layers=3)


def _batch(model_dir):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(model_dir)(TEXTS, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def test_captured_scores_equal_an_independent_computation(arch_dir):
    from dist_kd.models.capture import find_layer_list

    arch, model_dir = arch_dir
    teacher = Teacher(model_dir, dtype="fp32", score_layers=[1, 3])
    ids, mask = _batch(model_dir)
    features = teacher.features(ids, mask)
    assert sorted(features.scores) == [1, 3]
    layers = find_layer_list(teacher.model)[2]
    heads = teacher.num_heads
    encoder = teacher.model.encoder
    with torch.no_grad():
        for n in (1, 3):
            inputs = features.embeddings if n == 1 else features.hidden[n - 1]
            for b in range(ids.shape[0]):
                real = int(mask[b].sum())
                h_LD = inputs[b, :real]
                if arch == "mpnet":
                    bias_table = encoder.relative_attention_bias.weight
                    expected = mpnet_scores(layers[n - 1].attention.attn, bias_table, h_LD, heads)
                else:
                    expected = deberta_scores(
                        layers[n - 1].attention.self, encoder.get_rel_embedding(), teacher.config, h_LD, heads
                    )
                # Among real tokens the scores do not depend on padding (relative positions only).
                torch.testing.assert_close(features.scores[n][b, :, :real, :real], expected, rtol=1e-4, atol=1e-5)
    assert (features.scores[1] < 0).any()  # raw scores, not probabilities


def test_adapted_model_gives_the_stock_outputs_and_query_key_value(arch_dir):
    from transformers import AutoModel

    arch, model_dir = arch_dir
    teacher = Teacher(model_dir, dtype="fp32", score_layers=[2], qkv_layers=[1, 3])
    ids, mask = _batch(model_dir)
    features = teacher.features(ids, mask)
    assert sorted(features.qkv) == [1, 3]
    heads, width = teacher.num_heads, teacher.hidden_size
    for query, key, value in features.qkv.values():
        assert query.shape == key.shape == value.shape == (ids.shape[0], heads, ids.shape[1], width // heads)
    stock = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    for n in range(1, 4):
        torch.testing.assert_close(features.hidden[n][real], reference[n][real], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["mpnet", "deberta-v2"])
def test_narrower_student_with_fewer_heads_is_cut_from_the_teacher(arch, tmp_path):
    """init: teacher on an adapted family: inner projections take whole heads, MPNet's per-head position bias
    keeps the same heads, and the student runs under the capture."""
    from dist_kd.models.student import DistillStudent, StudentConfig, build_student

    teacher_dir = build_tiny_encoder(tmp_path / arch, arch, num_layers=4, hidden_size=32, num_heads=4)
    teacher = Teacher(teacher_dir, dtype="fp32")
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=2, intermediate_size=32, init="teacher", dropout=0.0)
    student = build_student(cfg, teacher.config, teacher.model, [2, 4])
    if arch == "mpnet":
        kept = student.encoder.relative_attention_bias.weight
        torch.testing.assert_close(kept, teacher.model.encoder.relative_attention_bias.weight[:, [0, 2]])

    def query_of(layer):
        return layer.attention.attn.q if arch == "mpnet" else layer.attention.self.query_proj

    query, t_query = query_of(student.encoder.layer[0]), query_of(teacher.model.encoder.layer[1])
    # 2 of the teacher's 4 heads, evenly spaced (0 and 2), each whole (8 wide: the student's heads are 16 / 2)
    rows = [*range(0, 8), *range(16, 24)]
    torch.testing.assert_close(query.bias, t_query.bias[rows])
    features = DistillStudent(student, None)(*_batch(teacher_dir))
    assert sorted(features.scores) == [1, 2] and features.scores[1].shape[1] == 2


@pytest.mark.parametrize("arch", ["mpnet", "deberta-v2"])
def test_full_size_copy_of_the_teacher_has_the_teachers_scores(arch, tmp_path):
    """A student of the teacher's shape cut with init: teacher is the teacher: raw scores and states equal."""
    from dist_kd.models.student import DistillStudent, StudentConfig, build_student

    teacher_dir = build_tiny_encoder(tmp_path / arch, arch, num_layers=2, hidden_size=32, num_heads=4)
    teacher = Teacher(teacher_dir, dtype="fp32", score_layers=[1, 2])
    cfg = StudentConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, init="teacher", dropout=0.0)
    student = DistillStudent(build_student(cfg, teacher.config, teacher.model, [1, 2]), None).eval()
    ids, mask = _batch(teacher_dir)
    expected = teacher.features(ids, mask)
    with torch.no_grad():
        got = student(ids, mask)
    for n in (1, 2):
        torch.testing.assert_close(got.scores[n], expected.scores[n])
        torch.testing.assert_close(got.hidden[n], expected.hidden[n])


def test_deberta_v1_is_left_to_the_registry_check_not_given_v2s_forward(tmp_path):
    """DeBERTa v1's attention class has v2's name (DisentangledSelfAttention) and another layout (a fused
    in_proj): v2's forward was installed on it, and every forward raised an AttributeError, hidden states only
    too. Now it gets the clear refusal where a loss needs its scores, and trains on hidden states."""
    import transformers

    from dist_kd.models.adapters import adapter_for
    from dist_kd.testing import build_tiny_tokenizer, tiny_vocab

    config = transformers.DebertaConfig(
        vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )  # fmt: skip
    model = transformers.DebertaModel(config)
    assert adapter_for(model) is None
    model.save_pretrained(tmp_path / "v1")
    build_tiny_tokenizer(tmp_path / "v1")
    ids, mask = _batch(tmp_path / "v1")
    # refused as the teacher is built (a one-line ValueError), not at the first step's forward (a RuntimeError)
    with pytest.raises(
        ValueError, match="DebertaModel did not route attention through the .dist_kd.*: dist_kd supports"
    ):
        Teacher(tmp_path / "v1", dtype="fp32", score_layers=[1])
    features = Teacher(tmp_path / "v1", dtype="fp32", score_layers=[]).features(ids, mask)
    assert sorted(features.hidden) == [1, 2] and not features.scores


def test_families_without_heads_or_a_settable_depth_are_refused_in_one_line(tmp_path):
    """FNet (no attention heads) and Funnel (a depth of blocks that cannot be set) ended in an AttributeError or
    NotImplementedError traceback, exit 1, where other unsupported families get the supported list."""
    import transformers

    from dist_kd.models.capture import check_encoder_config
    from dist_kd.models.student import StudentConfig, student_config_from_teacher
    from dist_kd.testing import tiny_vocab

    fnet = transformers.FNetConfig(vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"^teacher.path T: a FNetConfig \(fnet\) has no num_attention_heads: dist_kd"):
        check_encoder_config(fnet, "teacher.path T")
    transformers.FNetModel(fnet).save_pretrained(tmp_path / "fnet")
    with pytest.raises(ValueError, match=r"FNetConfig \(fnet\) has no num_attention_heads: dist_kd supports"):
        Teacher(tmp_path / "fnet", dtype="fp32")
    funnel = transformers.FunnelConfig(vocab_size=len(tiny_vocab()), d_model=32, n_head=4, d_head=8, d_inner=64,
                                       block_sizes=[1, 1])  # fmt: skip
    check_encoder_config(funnel, "teacher.path T")  # its fields read; its depth cannot be set
    shape = StudentConfig(num_layers=1, hidden_size=32, num_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match=r"FunnelConfig \(funnel\) does not take another number of layers: dist_kd"):
        student_config_from_teacher(funnel, shape)
    check_encoder_config(transformers.BertConfig(), "teacher.path T")
    # T5 (sentence-T5, GTR) names layers, width and heads too: its encoder ran without inputs ("You must specify
    # exactly one of input_ids or inputs_embeds"), naming neither the teacher nor the supported families
    t5 = transformers.T5Config(vocab_size=len(tiny_vocab()), d_model=32, num_layers=2, num_heads=4, d_kv=8, d_ff=64)
    with pytest.raises(ValueError, match=r"^teacher.path T: a T5Config \(t5\) is an encoder-decoder, not an encoder: "
                       "dist_kd supports"):  # fmt: skip
        check_encoder_config(t5, "teacher.path T")
    transformers.T5Model(t5).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"T5Config \(t5\) is an encoder-decoder, not an encoder"):
        Teacher(tmp_path / "t5", dtype="fp32")


@pytest.mark.parametrize("init", ["random", "teacher"])
def test_a_deberta_teacher_naming_its_head_width_gives_the_student_its_own(init, tmp_path):
    """DeBERTa-v2-xlarge/xxlarge set attention_head_size (64) in config.json, and DeBERTa reads it before
    hidden_size / heads: a student of 16 x 4 heads was built with the teacher's 8-wide heads (query 32 x 16)."""
    from transformers import AutoModel

    from dist_kd.models.student import StudentConfig, build_student

    teacher_dir = build_tiny_encoder(tmp_path / "t", "deberta-v2", num_layers=2, attention_head_size=8)
    teacher = Teacher(teacher_dir, dtype="fp32")
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, init=init, dropout=0.0)
    student = build_student(cfg, teacher.config, teacher.model, [1, 2])
    assert student.encoder.layer[0].attention.self.query_proj.weight.shape == (16, 16)
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModel.from_pretrained(tmp_path / "s")
    assert reloaded.config.attention_head_size == 4
    assert reloaded.encoder.layer[0].attention.self.query_proj.weight.shape == (16, 16)
