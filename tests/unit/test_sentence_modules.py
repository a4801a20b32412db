"""A sentence-transformers teacher's pooling and normalisation reach its student's export: the student then
encodes in SentenceTransformer as the teacher's recipe says (mean pooling, unit norm), at its own width."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dist_kd.sentence_modules import carry_sentence_modules


def _sentence_teacher(directory, width):
    (directory / "1_Pooling").mkdir(parents=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    pooling = {"word_embedding_dimension": width, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
               "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}  # fmt: skip
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return modules


def test_student_export_encodes_like_the_teachers_recipe(tiny_bert_dir, tmp_path):
    teacher = tmp_path / "teacher"
    _sentence_teacher(teacher, width=384)
    student = tmp_path / "student"
    shutil.copytree(tiny_bert_dir, student)  # a 32-wide "student" export
    assert carry_sentence_modules(teacher, student, hidden_size=32, source_hidden=384)
    assert json.loads((student / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 32
    assert json.loads((teacher / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 384

    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel, AutoTokenizer

    model = st.SentenceTransformer(str(student), device="cpu")
    texts = ["the cat sat on the mat", "a completely different sentence about markets"]
    encoded = torch.as_tensor(model.encode(texts))
    tokenizer = AutoTokenizer.from_pretrained(student)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(student)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(encoded, expected, atol=1e-5, rtol=1e-4)


def test_no_modules_or_a_dense_of_another_width_carries_nothing(tiny_bert_dir, tmp_path, caplog):
    student = tmp_path / "student"
    shutil.copytree(tiny_bert_dir, student)
    assert not carry_sentence_modules(tiny_bert_dir, student, 32, 32)  # a plain HF teacher
    teacher = tmp_path / "teacher"
    modules = _sentence_teacher(teacher, width=384)
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (teacher / "modules.json").write_text(json.dumps(modules))
    with caplog.at_level("WARNING"):
        assert not carry_sentence_modules(teacher, student, 32, 384)
    assert "modules made for width 384 (Dense)" in caplog.text and not (student / "modules.json").exists()
    # any module holding weights of the teacher's width: a LayerNorm(384) was carried, and encode() failed
    modules[3] = {"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    (teacher / "modules.json").write_text(json.dumps(modules))
    assert not carry_sentence_modules(teacher, student, 32, 384)
    assert "modules made for width 384 (LayerNorm)" in caplog.text and not (student / "modules.json").exists()
    assert carry_sentence_modules(teacher, student, 384, 384)  # at the teacher's width they fit


@pytest.mark.parametrize("key", ["embedding_dimension", "word_embedding_dimension"])
def test_sentence_transformers_reports_the_students_width(tiny_bert_dir, tmp_path, key):
    """sentence-transformers 6 saves Pooling's width as embedding_dimension and reads the old
    word_embedding_dimension only where the new one is absent; setting only the old one left a 32-wide student
    reporting its teacher's 384."""
    teacher = tmp_path / "teacher"
    _sentence_teacher(teacher, width=384)
    if key == "embedding_dimension":  # the file as sentence-transformers 6 writes it
        pooling = {"embedding_dimension": 384, "pooling_mode": "mean", "include_prompt": True}
        (teacher / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    student = tmp_path / "student"
    shutil.copytree(tiny_bert_dir, student)
    assert carry_sentence_modules(teacher, student, hidden_size=32, source_hidden=384)
    settings = json.loads((student / "1_Pooling" / "config.json").read_text())
    assert settings[key] == 32 and set(settings) == set(json.loads((teacher / "1_Pooling" / "config.json").read_text()))

    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(student), device="cpu")
    width = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    assert width() == 32 == model.encode(["the cat sat on the mat"]).shape[1]


@pytest.mark.parametrize(
    ("settings", "normalise"),
    [
        ({"pooling_mode_cls_token": True}, False),
        ({"pooling_mode_max_tokens": True}, True),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, False),  # concatenated: cls, mean
        ({"pooling_mode_mean_sqrt_len_tokens": True}, False),
        ({"pooling_mode_weightedmean_tokens": True}, True),
        ({"pooling_mode_lasttoken": True}, False),
        ({"pooling_mode": "cls"}, False),  # the single-string spelling
        # sentence-transformers 6 writes several modes as a list, concatenated in its order: read as mean pooling
        ({"pooling_mode": ["mean", "cls"]}, True),
    ],
)
def test_quality_pools_as_the_teachers_modules_do(tiny_bert_dir, tmp_path, settings, normalise):
    """The quality figures (spread, probe) mean-pooled whatever pooling the teacher's modules, and so its
    students' exports, use: the spread of a CLS-pooled student read 0.973 where SentenceTransformer gave 1.000."""
    from transformers import AutoModel, AutoTokenizer

    from dist_kd.quality import sentence_pool
    from dist_kd.sentence_modules import sentence_pooling

    student = tmp_path / "student"
    shutil.copytree(tiny_bert_dir, student)
    modules = _sentence_teacher(student, width=32)
    if not normalise:
        modules = modules[:2]
        (student / "modules.json").write_text(json.dumps(modules))
    (student / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **settings}))
    modes, normalised = sentence_pooling(student)
    assert normalised == normalise
    texts = ["the cat sat on the mat", "a completely different and much longer sentence about markets", "rates"]
    tokenizer = AutoTokenizer.from_pretrained(student)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(student)(**batch).last_hidden_state
    pooled = sentence_pool(states, batch["attention_mask"], modes)
    if normalised:  # the Normalize module, which the quality figures leave out (a cosine does not see it)
        pooled = torch.nn.functional.normalize(pooled, dim=1)
    # Independent: each text alone (no padding), pooled by hand.
    expected = []
    for text in texts:
        with torch.no_grad():
            alone = AutoModel.from_pretrained(student)(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        weights = torch.arange(1, len(alone) + 1, dtype=torch.float32)[:, None]
        by_mode = {
            "cls_token": alone[0], "max_tokens": alone.max(0).values, "mean_tokens": alone.mean(0),
            "mean_sqrt_len_tokens": alone.sum(0) / len(alone) ** 0.5,
            "weightedmean_tokens": (alone * weights).sum(0) / weights.sum(), "lasttoken": alone[-1],
        }  # fmt: skip
        row = torch.cat([by_mode[mode] for mode in modes])
        expected.append(torch.nn.functional.normalize(row, dim=0) if normalise else row)
    torch.testing.assert_close(pooled, torch.stack(expected), atol=2e-5, rtol=1e-4)

    st = pytest.importorskip("sentence_transformers")
    encoded = torch.as_tensor(st.SentenceTransformer(str(student), device="cpu").encode(texts))
    torch.testing.assert_close(encoded, pooled, atol=2e-5, rtol=1e-4)


def test_a_teachers_encoder_folder_is_not_carried_the_student_is_the_encoder(tiny_bert_dir, tmp_path):
    """A teacher saved as sentence-transformers before 2.0 did (the encoder in 0_Transformer/) had that folder
    copied into the student's export: SentenceTransformer(student) then ran the teacher, without a word."""
    from dist_kd.testing import build_tiny_bert

    teacher = tmp_path / "teacher"
    modules = _sentence_teacher(teacher, width=32)
    modules[0]["path"] = "0_Transformer"
    (teacher / "modules.json").write_text(json.dumps(modules))
    build_tiny_bert(teacher / "0_Transformer", seed=7, num_layers=2)  # other weights than the student's
    (teacher / "0_Transformer" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    (teacher / "sentence_bert_config.json").unlink()
    student = tmp_path / "student"
    shutil.copytree(tiny_bert_dir, student)
    assert carry_sentence_modules(teacher, student, hidden_size=32, source_hidden=32)
    assert not (student / "0_Transformer").exists()
    carried = json.loads((student / "modules.json").read_text())
    assert carried[0] == {**modules[0], "path": ""} and carried[1:] == modules[1:]
    assert json.loads((student / "sentence_bert_config.json").read_text()) == {"max_seq_length": 48}

    st = pytest.importorskip("sentence_transformers")
    from transformers import AutoModel, AutoTokenizer

    texts = ["the cat sat on the mat", "a completely different sentence about markets"]
    encoded = torch.as_tensor(st.SentenceTransformer(str(student), device="cpu").encode(texts))
    batch = AutoTokenizer.from_pretrained(student)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = AutoModel.from_pretrained(student)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(encoded, expected, atol=1e-5, rtol=1e-4)  # the student's states, not the teacher's


@pytest.mark.parametrize("damage", ['{"word_embedding_dimension": 384, "pooling_mode_mean', "[1, 2]"])
def test_a_pooling_config_that_does_not_parse_carries_nothing_with_a_warning(tiny_bert_dir, tmp_path, damage, caplog):
    """json.loads of the copied Pooling config raised at the run's end, after its training: an error naming no
    file, and no student written, at every rerun."""
    teacher = tmp_path / "teacher"
    _sentence_teacher(teacher, width=384)
    config = teacher / "1_Pooling" / "config.json"
    config.write_text(damage)
    student = tmp_path / "student"
    shutil.copytree(tiny_bert_dir, student)
    with caplog.at_level("WARNING"):
        assert not carry_sentence_modules(teacher, student, hidden_size=32, source_hidden=384)
    assert (
        f"{config} does not parse" in caplog.text and "the student gets no sentence-transformers modules" in caplog.text
    )
    assert sorted(p.name for p in student.iterdir()) == sorted(p.name for p in tiny_bert_dir.iterdir())  # untouched
    (teacher / "modules.json").write_text('{"not": "a list"}')
    assert not carry_sentence_modules(teacher, student, hidden_size=32, source_hidden=384)
    assert "modules.json does not parse (not a list of modules)" in caplog.text


def test_quality_says_it_leaves_out_a_dense_module_after_the_pooling(tiny_bert_dir, tmp_path, caplog):
    """With a Dense after the pooling (LaBSE), the spread and probe were not those of SentenceTransformer's
    embeddings, without a word."""
    from dist_kd.quality import HeldOutTexts

    teacher = tmp_path / "teacher"
    modules = _sentence_teacher(teacher, width=32)
    held = HeldOutTexts.__new__(HeldOutTexts)
    with caplog.at_level("WARNING"):
        held.use_pooling_of(teacher)
    assert "module(s) after the pooling" not in caplog.text  # Pooling and Normalize alone: measured as encoded
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (teacher / "modules.json").write_text(json.dumps(modules))
    with caplog.at_level("WARNING"):
        held.use_pooling_of(teacher)
    assert "without its Dense module(s) after the pooling" in caplog.text and held.pooling == ("mean_tokens",)


def test_max_seq_length_is_lowered_to_the_students_positions(tmp_path):
    """A student of fewer positions than the teacher's max_seq_length (64 here, MiniLM's 256 against a student of
    128 positions) got the teacher's setting: SentenceTransformer(student).encode failed on every longer text."""
    from dist_kd.testing import build_tiny_bert

    teacher = tmp_path / "teacher"
    _sentence_teacher(teacher, width=32)
    student = build_tiny_bert(tmp_path / "student", max_position_embeddings=16)
    assert carry_sentence_modules(teacher, student, hidden_size=32, source_hidden=32)
    assert json.loads((student / "sentence_bert_config.json").read_text()) == {"max_seq_length": 16,
                                                                                "do_lower_case": False}  # fmt: skip
    roomy = build_tiny_bert(tmp_path / "roomy", max_position_embeddings=128)
    assert carry_sentence_modules(teacher, roomy, hidden_size=32, source_hidden=32)
    assert json.loads((roomy / "sentence_bert_config.json").read_text())["max_seq_length"] == 64  # kept

    st = pytest.importorskip("sentence_transformers")
    encoded = st.SentenceTransformer(str(student), device="cpu").encode(["word " * 40])
    assert encoded.shape == (1, 32)
