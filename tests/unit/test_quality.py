"""Quality signals (spread, linear probe, held-out texts) against brute-force references and known values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dist_kd.quality import (
    HeldOutTexts,
    QualityConfig,
    QualityReport,
    collapse_reasons,
    embedding_spread,
    linear_probe,
    mean_pool,
    stratified_folds,
)


def test_spread_matches_pairwise_cosines():
    x = torch.randn(17, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairs = [
        torch.nn.functional.cosine_similarity(x[i], x[j], dim=0).item()
        for i in range(len(x))
        for j in range(len(x))
        if i != j
    ]
    assert embedding_spread(x) == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)


def test_spread_known_values():
    assert embedding_spread(torch.ones(5, 3) * torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.0)
    assert embedding_spread(torch.eye(4)) == pytest.approx(0.0, abs=1e-12)
    assert embedding_spread(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 2"):
        embedding_spread(torch.ones(1, 3))


def test_spread_zero_row_counts_as_cosine_zero():
    # three identical directions and a row of zeros: 6 of the 12 ordered pairs have cosine 1, the 6 with the
    # zero row have none (0, as torch's cosine_similarity gives it); the formula's diagonal assumed unit rows
    x = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0], [0.0, 0.0]])
    assert embedding_spread(x) == pytest.approx(6 / 12, abs=1e-12)


def test_mean_pool_ignores_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1, :1].mean(0)])
    torch.testing.assert_close(mean_pool(hidden, mask), expected)


def test_stratified_folds_balance_every_class():
    labels = np.array([0] * 23 + [1] * 7 + [2] * 50)
    folds = stratified_folds(labels, 5, seed=3)
    for label in range(3):
        counts = np.bincount(folds[labels == label], minlength=5)
        assert counts.max() - counts.min() <= 1
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1
    assert (stratified_folds(labels, 5, seed=3) == folds).all()


def test_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=150)
    centres = rng.normal(size=(3, 8)) * 4
    separable = centres[labels] + rng.normal(size=(150, 8)) * 0.3
    assert linear_probe(separable, labels, 3) == 1.0
    noise = rng.normal(size=(150, 8))
    assert linear_probe(noise, labels, 3) < 0.55  # chance is about 1/3
    # More dimensions than rows: a classifier scored on rows it was fitted to would get them all right; every
    # row is scored by the folds that did not see it, so noise stays near chance (1/2 here).
    wide, coins = rng.normal(size=(60, 128)), rng.integers(0, 2, size=60)
    assert linear_probe(wide, coins, 2) < 0.75


def test_probe_is_scale_invariant():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=80)
    x = rng.normal(size=(80, 5)) + labels[:, None] * 0.7
    assert linear_probe(x, labels, 2) == linear_probe(x * 1000.0 + 5.0, labels, 2)


def test_collapse_reasons():
    assert collapse_reasons(QualityReport(spread=0.3, probe=0.9), chance=0.25) == []
    assert "spread" in collapse_reasons(QualityReport(spread=0.99, probe=0.9), chance=0.25)[0]
    assert "chance" in collapse_reasons(QualityReport(spread=0.3, probe=0.27), chance=0.25)[0]
    assert collapse_reasons(QualityReport(spread=0.3), chance=None) == []
    # A most frequent class of 0.97: a perfect probe was "near chance" (0.97 + 0.05 > 1); half the room is the margin
    assert collapse_reasons(QualityReport(spread=0.07, probe=1.0), chance=0.97) == []
    assert "chance" in collapse_reasons(QualityReport(spread=0.07, probe=0.98), chance=0.97)[0]
    # The teacher's probe at chance too (texts of one dominant class): the probe tells nothing of the student
    teacher_at_chance, teacher_above = QualityReport(spread=0.1, probe=0.97), QualityReport(spread=0.1, probe=1.0)
    assert collapse_reasons(QualityReport(spread=0.5, probe=0.97), chance=0.97, teacher=teacher_at_chance) == []
    assert collapse_reasons(QualityReport(spread=0.5, probe=0.97), chance=0.97, teacher=teacher_above) != []


def test_a_new_reason_of_collapse_is_said_while_the_student_is_still_collapsed(caplog):
    """Collapsed by its spread at one evaluation and by its probe (spread fine) at the next: the second went
    unsaid, as the student was still flagged."""
    import logging
    import types

    from dist_kd.train.general import GeneralTrainer

    trainer = types.SimpleNamespace(
        info=types.SimpleNamespace(is_main=True), heldout=types.SimpleNamespace(chance=0.35), _collapsed=set(),
        _last_quality=None, step=0, teacher_quality=lambda: QualityReport(0.1, 0.95), heldout_key=lambda: "texts",
    )  # fmt: skip
    said = []
    for step, (spread, probe) in enumerate([(0.97, 0.9), (0.5, 0.36), (0.97, 0.36), (0.5, 0.9), (0.99, 0.9)]):
        trainer.step, trainer.student_quality = step, lambda spread=spread, probe=probe: QualityReport(spread, probe)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dist_kd.train.general"):
            GeneralTrainer.quality_record(trainer)
        said.append([r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()])
    assert [len(lines) for lines in said] == [1, 1, 1, 1, 1], said
    assert "embedding spread" in said[0][0] and "probe accuracy" in said[1][0] and "embedding spread" not in said[1][0]
    assert "embedding spread" in said[2][0] and "probe accuracy" not in said[2][0]  # only the new reason
    assert "no longer looks collapsed at step 3" in said[3][0] and "embedding spread" in said[4][0]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_heldout_texts_from_file(tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer

    from dist_kd.testing import topic_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    path = _write_jsonl(tmp_path / "probe.jsonl", topic_examples(40, seed=1))
    texts = HeldOutTexts.from_file(path, tokenizer, QualityConfig(max_texts=30))
    assert len(texts) == 30 and texts.label_names == ["business", "politics", "sport"]
    assert texts.chance == pytest.approx(np.bincount(texts.labels).max() / 30)
    unlabelled = HeldOutTexts.from_file(path, tokenizer, QualityConfig(label=None))
    assert unlabelled.labels is None and unlabelled.chance is None
    # 3 texts in 2 folds: one fold's probe would train on 1 text (its figure came from NaN); 4 are enough
    with pytest.raises(ValueError, match=r"probe.jsonl: 3 texts are too few for eval.folds=2 \(each fold trains"):
        HeldOutTexts.from_file(path, tokenizer, QualityConfig(max_texts=3, folds=2))
    assert len(HeldOutTexts.from_file(path, tokenizer, QualityConfig(max_texts=4, folds=2))) == 4


def test_heldout_texts_errors_name_the_file_and_column(tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    path = _write_jsonl(tmp_path / "probe.jsonl", [{"sentence": "a b", "label": "x"}] * 6)
    with pytest.raises(ValueError, match=r"probe\.jsonl: no column 'text'.*sentence"):
        HeldOutTexts.from_file(path, tokenizer, QualityConfig())
    with pytest.raises(ValueError, match="at least 2 classes"):
        HeldOutTexts.from_file(path, tokenizer, QualityConfig(text="sentence"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        HeldOutTexts.from_file(tmp_path / "nope.jsonl", tokenizer, QualityConfig())
    # Positions are the lines a user finds in the file (the header is line 1), not 0-based row indices.
    gaps = tmp_path / "gaps.csv"
    gaps.write_text("text,label\na b,x\n,y\nc d,\ne f,y\n")
    with pytest.raises(ValueError, match=r"gaps\.csv: line 3 has no text in column 'text'"):
        HeldOutTexts.from_file(gaps, tokenizer, QualityConfig())
    gaps.write_text("text,label\na b,x\ng h,y\nc d,\ne f,y\n")
    with pytest.raises(ValueError, match=r"gaps\.csv: line 4 has no label in column 'label': .*eval.label=null"):
        HeldOutTexts.from_file(gaps, tokenizer, QualityConfig())
    # Labels are optional only with eval.label=null: the messages said nothing of it.
    bare = _write_jsonl(tmp_path / "bare.jsonl", [{"text": "a b"}] * 6)
    with pytest.raises(ValueError, match=r"no column 'label' .*name the column \(or eval.label=null: the spread alone"):
        HeldOutTexts.from_file(bare, tokenizer, QualityConfig())
    assert HeldOutTexts.from_file(gaps, tokenizer, QualityConfig(label=None)).labels is None
    with pytest.raises(ValueError, match="eval.every"):
        QualityConfig(every=0)


def test_report_of_a_copy_equals_the_original(tiny_bert_dir, tmp_path):
    """Two encoders with the same weights give the same figures; the spread matches a direct computation."""
    from transformers import AutoModel, AutoTokenizer

    from dist_kd.quality import last_states
    from dist_kd.testing import topic_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = HeldOutTexts.from_file(
        _write_jsonl(tmp_path / "p.jsonl", topic_examples(30, seed=2)), tokenizer, QualityConfig()
    )
    model = AutoModel.from_pretrained(tiny_bert_dir)
    model.train()
    report = texts.report(last_states(model), torch.device("cpu"), batch_size=7, folds=3)
    assert model.training, "the model's mode is restored"
    again = texts.report(last_states(AutoModel.from_pretrained(tiny_bert_dir)), torch.device("cpu"), 30, 3)
    assert report.spread == pytest.approx(again.spread, abs=1e-5) and report.probe == again.probe
    with torch.no_grad():
        rows = [json.loads(line)["text"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
        enc = tokenizer(rows, padding=True, return_tensors="pt")
        pooled = mean_pool(model.eval()(**enc).last_hidden_state, enc["attention_mask"])
    assert report.spread == pytest.approx(embedding_spread(pooled), abs=1e-5)
    assert not math.isnan(report.probe)


def test_a_step_zero_row_measured_with_other_pooling_is_left_out_of_the_summary(caplog):
    """A run resumed from a checkpoint of a release that mean-pooled every teacher put that mean-pooled step-0
    row beside this run's CLS-pooled ones."""
    import logging
    from types import SimpleNamespace

    from dist_kd.quality import QualityReport
    from dist_kd.train.general import quality_summary

    class Heldout:
        source, label_names, chance, pooling_name = "dev.jsonl", ["a", "b"], 0.5, "cls"

        def __len__(self):
            return 60

    def rows(initial):
        fake = SimpleNamespace(
            heldout=Heldout(), initial_quality=initial, step=4,
            teacher_quality=lambda: QualityReport(spread=0.1, probe=0.9),
            current_quality=lambda: QualityReport(spread=0.3, probe=0.8),
            random_init_quality=lambda: QualityReport(spread=0.99, probe=0.5),
            heldout_key=lambda as_typed=False: "texts as typed" if as_typed else "texts of now",
        )  # fmt: skip
        return list(quality_summary(fake)["rows"])

    same = {"eval_spread": 0.5, "eval_probe": 0.7, "pooling": "cls"}
    assert "student at step 0" in rows(same)
    with caplog.at_level(logging.WARNING):
        assert "student at step 0" not in rows({"eval_spread": 0.5, "eval_probe": 0.7})  # an earlier release: mean
    assert "measured with mean pooling, this run pools cls" in caplog.text
    # A resume with other held-out texts or eval settings: the step-0 row was of the old texts (a probe on texts
    # without labels, in the reviewer's run).
    assert "student at step 0" in rows({**same, "texts": "texts of now"})
    assert "student at step 0" in rows({**same, "texts": "texts as typed"})  # a release before: paths as typed
    with caplog.at_level(logging.WARNING):
        assert "student at step 0" not in rows({**same, "texts": "texts of then"})
    assert "measured on other held-out texts or eval settings" in caplog.text


def test_held_out_sequences_are_cut_to_eval_max_length_and_empty_ones_refused(tmp_path):
    """eval.max_length cut eval.texts but not the held-out shards' sequences; a sequence of no tokens (a damaged
    shard's masked row) became a zero embedding, of cosine 0 with every text."""
    import numpy as np

    from dist_kd.quality import HeldOutTexts
    from dist_kd.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    sequences = [np.array([2, 7, 8, 9, 10, 3]), np.array([2, 7, 3])]
    heldout = HeldOutTexts.from_sequences(sequences, tokenizer, "shards", max_length=4)
    rows = heldout.rows
    assert [rows.ids[a:b].tolist() for a, b in zip(rows.offsets[:-1], rows.offsets[1:], strict=True)] == [
        [2, 7, 8, 3], [2, 7, 3],
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"held-out texts shards: a sequence without tokens"):
        HeldOutTexts.from_sequences([*sequences, np.array([], dtype=np.int64)], tokenizer, "shards")


def test_the_probe_refuses_folds_that_train_on_one_row():
    """One training row has no standard deviation: the probe's figure came from NaN (0.5 on two texts)."""
    import torch

    from dist_kd.quality import linear_probe

    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"at least 2 training rows in each of its 2 folds; 3 rows leave 1"):
        linear_probe(x, [0, 1, 0], 2, num_folds=2)
    assert 0.0 <= linear_probe(torch.randn(4, 4), [0, 1, 0, 1], 2, num_folds=2) <= 1.0


def test_scores_as_probe_labels_are_refused_and_whole_numbers_are_classes(tiny_bert_dir, tmp_path):
    """A regression file's scores were each a class (58 classes of 60 texts): a meaningless probe, unflagged."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    scored = _write_jsonl(tmp_path / "sts.jsonl", [{"text": f"a b {i}", "label": i / 7} for i in range(12)])
    with pytest.raises(ValueError, match=r"sts.jsonl: column 'label' holds scores \(e.g. 0.142857.*\), not classes; "
                       r"the probe needs class labels \(eval.label=null"):  # fmt: skip
        HeldOutTexts.from_file(scored, tokenizer, QualityConfig(folds=2))
    assert HeldOutTexts.from_file(scored, tokenizer, QualityConfig(label=None, folds=2)).labels is None
    whole = _write_jsonl(tmp_path / "ids.jsonl", [{"text": f"a b {i}", "label": float(i % 2)} for i in range(12)])
    assert HeldOutTexts.from_file(whole, tokenizer, QualityConfig(folds=2)).label_names == ["0.0", "1.0"]


def test_embeddings_that_are_not_finite_are_an_error_naming_the_encoder_and_rows(tiny_bert_dir, tmp_path):
    """One NaN made the spread NaN (never flagged: nan > 0.95 is False) and the probe a figure read off NaN
    logits, which looked like an accuracy, and as the teacher's divided every probe / teacher."""
    from transformers import AutoModel, AutoTokenizer

    from dist_kd.quality import last_states
    from dist_kd.testing import topic_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = HeldOutTexts.from_file(
        _write_jsonl(tmp_path / "p.jsonl", topic_examples(30, seed=2)), tokenizer, QualityConfig()
    )
    forward = last_states(AutoModel.from_pretrained(tiny_bert_dir))

    def overflowing(batch):
        states = forward(batch).clone()
        states[batch["input_ids"][:, 1] % 3 == 0, 0, 0] = float("inf")  # some rows, as an fp16 overflow leaves
        return states

    bad = np.flatnonzero((texts.embeddings(overflowing, torch.device("cpu"), 8).isfinite().all(1) == 0).numpy())
    assert 0 < len(bad) < 30
    said = rf"^the teacher gives embeddings that are not finite \(NaN or infinity\) for {len(bad)} of 30 held-out "
    with pytest.raises(ValueError, match=said + rf"texts of .*p.jsonl \(rows {bad[0]}, .*run it in bf16 or fp32$"):
        texts.report(overflowing, torch.device("cpu"), 8, 3, name="the teacher")
    nan = torch.randn(6, 4)
    nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"the spread needs finite embeddings; 1 of 6 rows hold NaN or infinity"):
        embedding_spread(nan)
    with pytest.raises(ValueError, match=r"the probe needs finite embeddings; 1 of 6 rows"):
        linear_probe(nan, np.array([0, 1] * 3), 2, num_folds=2)
