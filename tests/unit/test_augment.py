"""TinyBERT augmentation on a tiny masked-LM and a tiny GloVe file whose answers the tests know in advance.

The masked-LM's output bias makes "bank" (then "market") the top prediction at every masked position, and
the GloVe file puts "joy" next to "happiness": so a replaced single-piece word must read "bank" and a
replaced multi-piece word must read "joy", and any routing mistake shows up as the other word.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_kd.data import augment as aug
from dist_kd.io import read_parquet_metadata, write_parquet_atomic

DIM = 8


@pytest.fixture(scope="module")
def biased_mlm_dir(tmp_path_factory):
    import torch
    from transformers import AutoModelForMaskedLM

    from dist_kd.testing import build_tiny_bert, tiny_vocab

    directory = build_tiny_bert(tmp_path_factory.mktemp("mlm"), seed=0, model_class="BertForMaskedLM", num_layers=2)
    model = AutoModelForMaskedLM.from_pretrained(directory)
    vocab = tiny_vocab()
    with torch.no_grad():
        model.cls.predictions.bias[vocab.index("bank")] = 100.0
        model.cls.predictions.bias[vocab.index("market")] = 90.0
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bpe_mlm_dir(tmp_path_factory):
    """A tiny RoBERTa masked-LM with a byte-level BPE tokenizer (pieces carry their leading space as "Ġ")."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    from dist_kd.testing import random_sentences

    directory = tmp_path_factory.mktemp("bpe_mlm")
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = ByteLevelBPETokenizer()
    corpus = random_sentences(300, seed=0) + ["the bank raised rates", "The Bank said"] * 20
    bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=1, special_tokens=specials)
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )  # fmt: skip
    tokenizer.save_pretrained(directory)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=132, pad_token_id=1)  # fmt: skip
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config)
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        model.lm_head.bias[vocab["Ġrates"]] = 100.0
        # What must never be a candidate: a continuation piece ("ank" of "b ank") and a lone byte of a
        # multi-byte character ("Ã" begins "é"), each scored above every word.
        model.lm_head.bias[vocab["ank"]] = 120.0
        model.lm_head.bias[vocab["Ã"]] = 110.0
        model.lm_head.bias[vocab["ĠBank"]] = 105.0  # a cased vocabulary: "Bank" is "bank" itself
    model.save_pretrained(directory)
    return directory


def _glove_words_and_vectors(seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    known = {
        "happiness": [1.0, 0, 0, 0, 0, 0, 0, 0],
        "joy": [0.95, 0.1, 0, 0, 0, 0, 0, 0],
        "sadness": [0.6, 0.6, 0.1, 0, 0, 0, 0, 0],
        "quickly": [0, 0, 1.0, 0, 0, 0, 0, 0],
        "rapidly": [0, 0, 0.95, 0.1, 0, 0, 0, 0],
        "markets": [0, 0, 0, 0, 1.0, 0, 0, 0],
        "stocks": [0, 0, 0, 0, 0.9, 0.2, 0, 0],
    }
    filler = [f"filler{i}" for i in range(40)]
    # Filler lives in the last two dimensions only, orthogonal to the known words.
    filler_vectors = np.zeros((len(filler), DIM), np.float32)
    filler_vectors[:, 6:] = rng.normal(size=(len(filler), 2))
    vectors = np.concatenate([np.array(list(known.values()), np.float32), filler_vectors])
    return list(known) + filler, vectors


def _write_glove_text(path, words, vectors):
    path.write_text("".join(w + " " + " ".join(f"{x:.6f}" for x in v) + "\n" for w, v in zip(words, vectors)))
    return path


@pytest.fixture(scope="module")
def glove_txt(tmp_path_factory):
    words, vectors = _glove_words_and_vectors()
    return _write_glove_text(tmp_path_factory.mktemp("glove") / "glove.tiny.8d.txt", words, vectors)


def _augmenter(mlm_dir, glove_path, **config) -> aug.Augmenter:
    return aug.build_augmenter(mlm_dir, glove_path, aug.AugmentConfig(**config))


def _examples(texts_a, texts_b=None, labels=None) -> pa.Table:
    num = len(texts_a)
    return pa.table(
        {
            "example_id": [f"t-{i}" for i in range(num)],
            "text_a": texts_a,
            "text_b": texts_b or [None] * num,
            "label": labels or list(range(num)),
        },
        schema=pa.schema(
            [("example_id", pa.string()), ("text_a", pa.string()), ("text_b", pa.string()), ("label", pa.int64())]
        ),
    )


def _random_examples(num: int, seed: int = 0) -> pa.Table:
    from dist_kd.testing import random_sentences

    return _examples(random_sentences(num, seed=seed), random_sentences(num, seed=seed + 1))


def test_replacements_come_from_the_right_source(biased_mlm_dir, glove_txt):
    augmenter = _augmenter(biased_mlm_dir, glove_txt, p_t=1.0, n_a=2, k=1, stop_words="none")
    text = "The team played happiness, xyzzy [SEP] bank."
    sources = {c.word.text: c.source for c in augmenter.word_candidates([text])[0]}
    assert sources == {
        "The": "mlm", "team": "mlm", "played": "mlm", "bank": "mlm",  # single pieces in the tiny vocabulary
        "happiness": "glove", "xyzzy": "glove",  # several pieces
        ",": "none", ".": "none", "[SEP]": "none",  # punctuation and special tokens are never replaced
    }  # fmt: skip
    out = augmenter.augment(_examples([text]), "t")
    # k = 1, p_t = 1: every single-piece word becomes the masked-LM's favourite ("bank", or "market" where
    # the word is "bank" itself), the multi-piece word becomes its GloVe neighbour; "xyzzy" is not in GloVe.
    assert out.column("text_a").to_pylist() == [text] + ["Bank bank bank joy, xyzzy [SEP] market."] * 2


def test_a_word_with_an_invisible_character_inside_is_replaced_whole_or_kept(biased_mlm_dir, glove_txt):
    """BERT reads "happi\u00adness" (a soft hyphen) as "happiness"; cut at the hyphen, "ness" was replaced on its
    own ("happi\u00adbank") and "ba\u200dnk" (a zero-width joiner) became "market\u200dnk"."""
    texts = ["ba\u200dnk happi\u00adness", "market\u00adbank game"]
    sources = [{c.word.text: c.source for c in row} for row in _augmenter(
        biased_mlm_dir, glove_txt, stop_words="none").word_candidates(texts)]  # fmt: skip
    # "ba\u200dnk" is the one piece "bank"; "market\u00adbank" is BERT's "marketbank": pieces, no GloVe entry
    assert sources == [{"ba\u200dnk": "mlm", "happi\u00adness": "glove"}, {"market\u00adbank": "glove", "game": "mlm"}]
    # k = 1, p_t = 1: the masked-LM's favourite for "bank" is "market"; GloVe knows "happiness" and not "bank" (kept
    # whole, as is "market\u00adbank", which has no candidate as a whole word)
    for mlm_dir, expected in [(biased_mlm_dir, ["market joy", "market\u00adbank bank"]),
                              (None, ["ba\u200dnk joy", "market\u00adbank game"])]:  # fmt: skip
        out = _augmenter(mlm_dir, glove_txt, p_t=1.0, n_a=1, k=1, stop_words="none").augment(_examples(texts), "t")
        assert out.column("text_a").to_pylist()[1::2] == expected
    glove_only = _augmenter(None, glove_txt, p_t=1.0, n_a=1, k=1, stop_words="none")
    assert glove_only.augment(_examples(["Happi\u00adness"]), "t").column("text_a").to_pylist()[1] == "Joy"


def test_glove_only_replaces_every_word_from_glove(glove_txt):
    """--mlm none: single-piece words take GloVe neighbours too, and the metadata says so."""
    augmenter = _augmenter(None, glove_txt, p_t=1.0, n_a=1, k=1)
    text = "Markets fell quickly, happiness."
    sources = {c.word.text: c.source for c in augmenter.word_candidates([text])[0]}
    assert sources == {"Markets": "glove", "fell": "glove", "quickly": "glove", "happiness": "glove", ",": "none",
                       ".": "none"}  # fmt: skip
    out = augmenter.augment(_examples([text]), "t")
    # GloVe is lower-case; "fell" is not in it and stays. The case of the original word is kept.
    assert out.column("text_a").to_pylist() == [text, "Stocks fell rapidly, joy."]
    metadata = aug.build_metadata(
        augmenter.config, task="t", task_type="classification", label_names=["a"], mlm_dir=None,
        glove=augmenter.glove.glove, data_path=glove_txt, num_examples=1,
    )  # fmt: skip
    assert metadata["masked_lm"] is None and metadata["parameters"]["algorithm"] == "glove_only"


def test_glove_only_keeps_special_tokens_written_in_the_text(glove_txt):
    """--mlm none has no tokenizer: "[SEP]" was split into "[", "SEP", "]" and "SEP" replaced ("[OCT]"), so a
    field separator became text for the teacher's tokenizer."""
    augmenter = _augmenter(None, glove_txt, p_t=1.0, n_a=1, k=1)
    text = "Markets fell [SEP] happiness [MASK] <s> quickly </s>"
    sources = {c.word.text: c.source for c in augmenter.word_candidates([text])[0]}
    assert {token: sources[token] for token in ("[SEP]", "[MASK]", "<s>", "</s>")} == dict.fromkeys(
        ("[SEP]", "[MASK]", "<s>", "</s>"), "none"
    )
    out = augmenter.augment(_examples([text]), "t")
    assert out.column("text_a").to_pylist()[1] == "Stocks fell [SEP] joy [MASK] <s> rapidly </s>"


def test_augment_names_what_its_table_and_task_lack(glove_txt):
    # a raw file's table (no text_b, no example_id) or a TaskSpec for the name ended in a bare KeyError
    from dist_kd.data.tasks import TaskSpec

    augmenter = _augmenter(None, glove_txt, n_a=1)
    raw = pa.table({"text_a": ["markets fell"], "label": ["a"]})
    with pytest.raises(ValueError, match=r"has no column example_id, text_b \(it has \['text_a', 'label'\]\)"):
        augmenter.augment(raw, "t")
    with pytest.raises(ValueError, match="task is the task's name \\(a str\\), got TaskSpec"):
        augmenter.augment(_examples(["markets fell"]), TaskSpec(name="t", labels=["a", "b"]))


def test_candidate_lists(biased_mlm_dir, glove_txt):
    augmenter = _augmenter(biased_mlm_dir, glove_txt, k=2, stop_words="none")
    words = augmenter.word_candidates(["the markets rose quickly"])[0]
    by_word = {c.word.text: c.candidates for c in words}
    assert by_word["the"] == ["bank", "market"]
    assert by_word["markets"] == ["stocks", "happiness"]  # the rest score 0 (orthogonal): ties go to the lower row
    assert by_word["quickly"][0] == "rapidly"


def test_p_t_zero_gives_back_the_originals(biased_mlm_dir, glove_txt):
    augmenter = _augmenter(biased_mlm_dir, glove_txt, p_t=0.0, n_a=3, k=5)
    examples = _random_examples(6)
    out = augmenter.augment(examples, "t").to_pylist()
    assert len(out) == 6 * 4
    for i, original in enumerate(examples.to_pylist()):
        rows = out[4 * i : 4 * i + 4]
        assert [r["example_id"] for r in rows] == [f"t-{i}"] + [f"t-{i}-aug{k}" for k in range(3)]
        assert {(r["text_a"], r["text_b"]) for r in rows} == {(original["text_a"], original["text_b"])}
        assert [r["label"] for r in rows] == [original["label"], None, None, None]
        assert {r["task"] for r in rows} == {"t"}


def test_n_a_copies_per_example_and_words_change(biased_mlm_dir, glove_txt):
    augmenter = _augmenter(biased_mlm_dir, glove_txt, p_t=0.5, n_a=5, k=3)
    examples = _random_examples(4)
    out = augmenter.augment(examples, "t")
    assert out.num_rows == 4 * 6
    ids = out.column("example_id").to_pylist()
    for i in range(4):
        assert ids.count(f"t-{i}") == 1 and sum(x.startswith(f"t-{i}-aug") for x in ids) == 5
    originals = set(examples.column("text_a").to_pylist())
    augmented = [r["text_a"] for r in out.to_pylist() if "-aug" in r["example_id"]]
    assert sum(text not in originals for text in augmented) >= 15  # p_t = 0.5: nearly every copy changes
    assert out.schema == aug.augmented_schema(pa.int64())


def test_same_seed_same_output_regardless_of_batching_and_order(biased_mlm_dir, glove_txt):
    examples = _random_examples(10, seed=3)
    reference = _augmenter(biased_mlm_dir, glove_txt, p_t=0.4, n_a=4, k=5, seed=7).augment(examples, "t")
    rebatched = _augmenter(biased_mlm_dir, glove_txt, p_t=0.4, n_a=4, k=5, seed=7, batch_size=3, chunk_size=4)
    assert rebatched.augment(examples, "t").equals(reference)
    # Each example's stream depends on (seed, example_id) only: reordering the input reorders the output.
    reversed_out = rebatched.augment(examples.take(list(range(9, -1, -1))), "t").to_pylist()
    assert sorted(reversed_out, key=lambda r: r["example_id"]) == sorted(
        reference.to_pylist(), key=lambda r: r["example_id"]
    )
    twins = rebatched.augment(_examples([examples["text_a"][0].as_py()] * 2), "t").column("text_a").to_pylist()
    assert twins[1:5] != twins[6:10]  # the same text under another id draws its own copies
    other_seed = _augmenter(biased_mlm_dir, glove_txt, p_t=0.4, n_a=4, k=5, seed=8).augment(examples, "t")
    assert not other_seed.equals(reference)


def test_parts_merge_to_the_single_run(biased_mlm_dir, glove_txt, tmp_path, caplog):
    examples = _random_examples(7, seed=5)
    augmenter = _augmenter(biased_mlm_dir, glove_txt, n_a=2, k=4)
    metadata = {"run": "abc", "task": "t"}
    single = augmenter.augment(examples, "t")
    parts = []
    for rank in range(3):
        start, stop = aug.shard_range(examples.num_rows, rank, 3)
        parts.append(aug.part_path(tmp_path, rank, 3))
        write_parquet_atomic(augmenter.augment(examples.slice(start, stop - start), "t"), parts[-1], metadata)
    aug.wait_for_parts(parts, "abc", timeout_s=1)
    aug.merge_parts(parts, aug.final_path(tmp_path), metadata)
    merged = pq.read_table(aug.final_path(tmp_path))
    assert merged.replace_schema_metadata(None).equals(single)
    assert read_parquet_metadata(aug.final_path(tmp_path)) == {"task": "t", "num_rows": single.num_rows}
    write_parquet_atomic(single, parts[0], {"run": "other"})
    with pytest.raises(TimeoutError, match="part-00000-of-00003"):
        aug.wait_for_parts(parts, "abc", timeout_s=0, poll_s=0)
    # Rank 0 waiting for ranks that never started (a bare python under SLURM) said nothing for up to 24 h.
    import logging

    with caplog.at_level(logging.WARNING, logger="dist_kd.data.augment"), pytest.raises(TimeoutError):
        aug.wait_for_parts(parts, "abc", timeout_s=0.05, poll_s=0.01)
    said = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(said) == 1 and "1 rank part(s)" in said[0] and "part-00000-of-00003" in said[0]
    with pytest.raises(ValueError, match="another run"):
        aug.merge_parts(parts, tmp_path / "x.parquet", metadata)


def test_a_rank_part_read_from_other_columns_is_not_reused(glove_txt, tmp_path):
    import json

    from dist_kd.data.tasks import TaskSpec

    rows = [{"title": f"quickly {i}", "body": f"happiness {i}", "label": "a"} for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = aug.AugmentConfig(n_a=1, p_t=0.0)

    def rank_one_part(text_a: str) -> list[str]:
        spec = TaskSpec(name="t", labels=["a", "b"], text_a=text_a)
        out = aug.augment_task(spec, data, tmp_path / "out", glove_txt, config, rank=1, world_size=2, progress=False)
        assert out is None  # rank 1 writes its part and leaves the merge to rank 0
        return pq.read_table(aug.part_path(tmp_path / "out", 1, 2)).column("text_a").to_pylist()

    assert rank_one_part("title")[0] == "quickly 2"
    # The run was stopped and restarted with the right column: the part of the wrong one must not be merged.
    assert rank_one_part("body")[0] == "happiness 2"


def test_a_rank_part_is_reused_when_the_glove_path_is_written_another_way(glove_txt, tmp_path, monkeypatch):
    """The run key held the GloVe path as typed: the same file named by an absolute path (a SLURM resubmit from
    another directory) augmented everything again. And a part of a run with another number of ranks stayed
    beside the merged set after it, where readers of every Parquet file under the directory read its rows twice."""
    import json
    import os

    from dist_kd.data.tasks import TaskSpec

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"quickly {i}", "label": "a"}) + "\n" for i in range(4)))
    spec = TaskSpec(name="t", labels=["a", "b"], text_a="text")
    config = aug.AugmentConfig(n_a=1)
    out = tmp_path / "out"
    # an interrupted 3-rank run left its rank 2's part
    aug.augment_task(spec, data, out, glove_txt, config, rank=2, world_size=3, progress=False)
    assert aug.part_path(out, 2, 3).is_file()
    monkeypatch.chdir(glove_txt.parent)
    aug.augment_task(spec, data, out, glove_txt.name, config, rank=1, world_size=2, progress=False)
    calls = []
    real = aug.Augmenter.augment
    monkeypatch.setattr(aug.Augmenter, "augment", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    merged = aug.augment_task(
        spec, data, out, Path(os.path.abspath(glove_txt)), config, world_size=2, wait_timeout=5, progress=False
    )
    assert len(calls) == 1  # rank 0's share only: rank 1's part, written with a relative path, was reused
    assert merged.num_rows == 8 and not (out / "parts").exists()  # the other run's part is gone too


def test_a_finished_set_of_the_same_inputs_is_kept_and_one_of_other_settings_redone(glove_txt, tmp_path, monkeypatch):
    """A rerun of a finished augmentation (a pipeline script run again) augmented every example again."""
    import json

    from dist_kd.data.tasks import TaskSpec

    rows = [{"text": f"quickly happiness {i}", "label": "a"} for i in range(6)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = TaskSpec(name="t", labels=["a", "b"], text_a="text")
    first = aug.augment_task(spec, data, tmp_path / "out", glove_txt, aug.AugmentConfig(n_a=2), progress=False)
    written = aug.final_path(tmp_path / "out").stat().st_mtime_ns
    calls = []
    real = aug.Augmenter.augment
    monkeypatch.setattr(aug.Augmenter, "augment", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = aug.augment_task(spec, data, tmp_path / "out", glove_txt, aug.AugmentConfig(n_a=2), progress=False)
    assert calls == [] and aug.final_path(tmp_path / "out").stat().st_mtime_ns == written
    assert again.replace_schema_metadata(None).equals(first.replace_schema_metadata(None))
    # Another setting (or other data) is another set: augmented again and replaced.
    other = aug.augment_task(spec, data, tmp_path / "out", glove_txt, aug.AugmentConfig(n_a=3), progress=False)
    assert calls == [1] and other.num_rows == 6 * 3 + 6 != first.num_rows
    assert read_parquet_metadata(aug.final_path(tmp_path / "out"))["parameters"]["n_a"] == 3
    # Another task's set is not replaced (silently, with exit 0, before): refused before any work.
    before = aug.final_path(tmp_path / "out").read_bytes()
    news = TaskSpec(name="news", labels=["a", "b"], text_a="text")
    with pytest.raises(
        ValueError, match=r"augmented.parquet is the augmented set of task 't'; augmenting 'news' would"
    ):
        aug.augment_task(news, data, tmp_path / "out", glove_txt, aug.AugmentConfig(n_a=3), progress=False)
    assert calls == [1] and aug.final_path(tmp_path / "out").read_bytes() == before


def test_a_kept_set_removes_the_parts_an_interrupted_run_of_other_settings_left(glove_txt, tmp_path):
    """The parts were removed after a merge only: a finished set kept by a rerun left the part of an interrupted
    run with other settings beside it, read as rows by tools that read every Parquet file under the directory."""
    import json

    from dist_kd.data.tasks import TaskSpec

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"quickly {i}", "label": "a"}) + "\n" for i in range(4)))
    spec = TaskSpec(name="t", labels=["a", "b"], text_a="text")
    out = tmp_path / "out"
    first = aug.augment_task(spec, data, out, glove_txt, aug.AugmentConfig(n_a=1), progress=False)
    aug.augment_task(spec, data, out, glove_txt, aug.AugmentConfig(n_a=3), rank=1, world_size=2, progress=False)
    assert aug.part_path(out, 1, 2).is_file()  # the rerun with other settings stopped before rank 0's merge
    kept = aug.augment_task(spec, data, out, glove_txt, aug.AugmentConfig(n_a=1), progress=False)
    assert kept.num_rows == first.num_rows == 8
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["augmented.parquet"]


def test_an_output_inside_a_data_directory_is_refused(glove_txt, tmp_path):
    """A directory's data is keyed by the digest of every file under it: the set written inside it changed
    that digest, so the same command's rerun took it for other data and augmented everything again."""
    import datasets

    from dist_kd.data.tasks import TaskSpec

    data = tmp_path / "ds"
    datasets.Dataset.from_list([{"text": f"quickly {i}", "label": "a"} for i in range(4)]).save_to_disk(data)
    spec = TaskSpec(name="t", labels=["a", "b"], text_a="text")
    before = sorted(data.rglob("*"))
    with pytest.raises(ValueError, match=r"--output \S*ds/aug lies inside --data \S*ds: the data's digest"):
        aug.augment_task(spec, data, data / "aug", glove_txt, aug.AugmentConfig(n_a=1), progress=False)
    assert sorted(data.rglob("*")) == before
    assert (
        aug.augment_task(spec, data, tmp_path / "aug", glove_txt, aug.AugmentConfig(n_a=1), progress=False).num_rows
        == 8
    )


def test_ids_the_copies_would_repeat_and_missing_ids_are_refused_before_augmenting(glove_txt, tmp_path):
    """Ids x0 and x0-aug0 gave the set x0-aug0 twice (found by the next command, after the whole run); a missing
    id became the id 'None'."""
    import json

    from dist_kd.data.tasks import TaskSpec

    spec = TaskSpec(name="t", labels=["a", "b"], text_a="text", id_column="id")
    data = tmp_path / "data.jsonl"
    rows = [{"id": "x0", "text": "quickly", "label": "a"}, {"id": "x0-aug1", "text": "happiness", "label": "b"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"the example id 'x0-aug1' is also the id of an augmented copy"):
        aug.augment_task(spec, data, tmp_path / "out", glove_txt, aug.AugmentConfig(n_a=2), progress=False)
    assert aug.augment_task(spec, data, tmp_path / "out", glove_txt, aug.AugmentConfig(n_a=1), progress=False)
    rows[1]["id"] = "x0-aug01"  # no copy's id: the copies write k without leading zeros
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    ids = aug.augment_task(spec, data, tmp_path / "padded", glove_txt, aug.AugmentConfig(n_a=2), progress=False)
    assert sorted(ids.column("example_id").to_pylist()) == sorted(
        ["x0", "x0-aug0", "x0-aug1", "x0-aug01", "x0-aug01-aug0", "x0-aug01-aug1"]
    )
    rows[1]["id"] = None
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"data.jsonl: line 2 has no id in column 'id'"):
        aug.augment_task(spec, data, tmp_path / "out2", glove_txt, aug.AugmentConfig(n_a=2), progress=False)


# ------------------------------------------------------------------------------------------------ GloVe


def test_glove_sources_agree_and_text_is_cached(tmp_path):
    words, vectors = _glove_words_and_vectors()
    text = _write_glove_text(tmp_path / "g.txt", words, vectors)
    from_text = aug.load_glove(text)
    cached = list(tmp_path.glob("g.txt.*.npy"))
    assert len(cached) == 1
    again = aug.load_glove(text)
    assert isinstance(again.vectors, np.memmap) and again.source == str(text)
    np.save(tmp_path / "g.npy", vectors)
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    from_npy = aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "vocab.txt")
    directory = tmp_path / "kumo_like"
    directory.mkdir()
    np.save(directory / "emb.npy", vectors)
    pq.write_table(pa.table({"index": words}), directory / "index.parquet")
    from_dir = aug.load_glove(directory)
    for glove in (again, from_npy, from_dir):
        assert glove.words == from_text.words
        np.testing.assert_allclose(glove.vectors, from_text.vectors, atol=1e-6)
    assert from_text.lookup("Happiness") == 0 and from_text.lookup("absent") is None


def test_glove_digest_is_of_the_words_and_values_not_the_file(tmp_path):
    import hashlib
    import json

    words, vectors = _glove_words_and_vectors()
    np.save(tmp_path / "g.npy", vectors)
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    directory = tmp_path / "kumo_like"
    directory.mkdir()
    np.save(directory / "emb.npy", vectors)
    pq.write_table(pa.table({"index": words}), directory / "index.parquet")
    from_npy = aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "vocab.txt")
    expected = hashlib.sha256(
        json.dumps(["float32", list(vectors.shape)]).encode() + "\n".join(words).encode() + vectors.tobytes()
    ).hexdigest()
    assert from_npy.sha256 == aug.load_glove(directory).sha256 == expected
    # Blocks of rows hash as the whole matrix does (a memory map is read a block at a time).
    many = np.random.default_rng(0).normal(size=(70_000, 64)).astype(np.float32)
    big = aug.GloveVectors(words=[f"w{i}" for i in range(70_000)], vectors=many, source="test")
    assert (
        big.sha256
        == hashlib.sha256(
            json.dumps(["float32", [70_000, 64]]).encode() + "\n".join(big.words).encode() + many.tobytes()
        ).hexdigest()
    )
    changed = vectors.copy()
    changed[3, 5] += 1e-3
    assert aug.GloveVectors(words=words, vectors=changed, source="x").sha256 != expected
    renamed = [*words[:-1], "other"]
    assert aug.GloveVectors(words=renamed, vectors=vectors, source="x").sha256 != expected


def test_vectors_replaced_at_the_same_path_are_not_taken_for_the_old_ones(tmp_path, monkeypatch):
    """The run key held the GloVe path, word count and width only: other vectors written over the file gave
    back the set augmented with the old ones."""
    import json
    import os

    from dist_kd.data.tasks import TaskSpec

    words, vectors = _glove_words_and_vectors()
    glove = _write_glove_text(tmp_path / "glove.txt", words, vectors)
    rows = [{"text": f"quickly happiness {i}", "label": "a"} for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = TaskSpec(name="t", labels=["a", "b"], text_a="text")
    config = aug.AugmentConfig(n_a=1)
    aug.augment_task(spec, data, tmp_path / "out", glove, config, progress=False)
    first = read_parquet_metadata(aug.final_path(tmp_path / "out"))["glove"]
    calls = []
    real = aug.Augmenter.augment
    monkeypatch.setattr(aug.Augmenter, "augment", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    stat = glove.stat()
    _write_glove_text(glove, words, vectors[::-1].copy())  # same words, count and width; other vectors
    os.utime(glove, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    aug.augment_task(spec, data, tmp_path / "out", glove, config, progress=False)
    second = read_parquet_metadata(aug.final_path(tmp_path / "out"))["glove"]
    assert calls == [1], "the set augmented with the old vectors was kept"
    assert {k: v for k, v in first.items() if k != "sha256"} == {k: v for k, v in second.items() if k != "sha256"}
    assert first["sha256"] != second["sha256"]


def test_batched_neighbours_match_a_plain_loop(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    words = _letter_words(300)
    glove = aug.GloveVectors(words=words, vectors=vectors, source="test")
    neighbours = aug.GloveNeighbours(glove, k=5, max_scores=300 * 7)  # several query blocks
    queries = [words[i] for i in range(0, 300, 11)] + ["missing"]
    got = neighbours.neighbours(queries)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for query in queries[:-1]:
        row = words.index(query)
        scores = [(float(unit[row] @ unit[j]), j) for j in range(300) if j != row]
        expected = [words[j] for _, j in sorted(scores, key=lambda pair: -pair[0])[:5]]
        assert got[query] == expected
    assert got["missing"] == []


def test_glove_neighbours_do_not_depend_on_the_words_asked_with_them():
    """A cosine on a rounding boundary (0.8193850 in GloVe 6B, 'alleged' and 'accusations') rounded to either
    side by its last bit, which a batched product's shape moves: one rank and two ranks wrote other copies.
    Here 30 words lie within a float32 step of the boundary 0.550005 from the query: the window is scored again
    in float64, the same way whatever the block holds, and ranked by the exact cosines (ties by id)."""
    rng = np.random.default_rng(0)
    dim = 50
    query = rng.normal(size=dim)
    query /= np.linalg.norm(query)
    near = []
    for cosine in 0.550005 + rng.uniform(-3e-8, 3e-8, size=30):
        other = rng.normal(size=dim)
        other -= (other @ query) * query
        near.append(cosine * query + np.sqrt(1 - cosine**2) * other / np.linalg.norm(other))
    vectors = np.concatenate([query[None], np.array(near), rng.normal(size=(300, dim))]).astype(np.float32)
    words = _letter_words(len(vectors))
    glove = aug.GloveVectors(words=words, vectors=vectors, source="test")
    alone = aug.GloveNeighbours(glove, k=5).neighbours([words[0]])[words[0]]
    for others in (1, 6, 40):
        asked = [words[0]] + words[-others:]
        assert aug.GloveNeighbours(glove, k=5).neighbours(asked)[words[0]] == alone, others
    unit = aug.GloveNeighbours(glove, k=5).unit.double().numpy()  # its float32 unit vectors, in float64
    exact = sorted(range(1, len(words)), key=lambda j: (-round(float(unit[0] @ unit[j]), 5), j))
    assert alone == [words[j] for j in exact[:5]]


def test_glove_neighbours_are_never_punctuation(tmp_path):
    # As in GloVe 6B, where "!" is among the nearest words of "hello" and "." among those of "the".
    words = ["hello", "!", "...", "hey", "at name@domain.com", "goodbye", "kiss"]
    vectors = np.array([[1, 0, 0], [1, 0.01, 0], [1, 0.02, 0], [1, 0.1, 0], [1, 0.11, 0], [1, 0.2, 0], [0, 1, 0]])
    glove = aug.GloveVectors(words=words, vectors=vectors.astype(np.float32), source="test")
    assert aug.GloveNeighbours(glove, k=3).neighbours(["hello"]) == {"hello": ["hey", "goodbye", "kiss"]}
    # Punctuation itself is never replaced, so it needs no candidates; asked for, it gets words only.
    assert aug.GloveNeighbours(glove, k=2).neighbours(["!"]) == {"!": ["hello", "hey"]}


def test_glove_neighbours_never_the_word_itself_in_another_case_or_repeated(tmp_path):
    # A cased file (840B) holds "Bank" and "BANK" beside "bank"; a file may list a word twice.
    words = ["bank", "Bank", "BANK", "banks", "bank", "lender", "lenders", "Lender", "river"]
    vectors = np.array([[1, 0, 0], [1, 0.01, 0], [1, 0.02, 0], [1, 0.03, 0], [1, 0, 0], [1, 0.1, 0], [1, 0.11, 0],
                        [1, 0.1, 0], [0, 1, 0]], dtype=np.float32)  # fmt: skip
    glove = aug.GloveVectors(words=words, vectors=vectors, source="test")
    got = aug.GloveNeighbours(glove, k=3).neighbours(["bank", "Bank"])
    assert got == {"bank": ["banks", "lender", "lenders"], "Bank": ["banks", "lender", "lenders"]}


def test_glove_rows_of_different_dimensions(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a 1 2 3\nb 1 2 3\nc 1 2\n")
    with pytest.raises(ValueError, match=r"line 3 \(word 'c'\) has 2 values, expected 3"):
        aug.load_glove(path)


def test_glove_word2vec_text_format_with_its_header_line(tmp_path):
    words, vectors = _glove_words_and_vectors()
    plain = aug.load_glove(_write_glove_text(tmp_path / "plain.txt", words, vectors))
    lines = _write_glove_text(tmp_path / "lines", words, vectors).read_text()
    (tmp_path / "w2v.txt").write_text(f"{len(words)} {DIM}\n" + lines)
    glove = aug.load_glove(tmp_path / "w2v.txt")
    assert glove.words == plain.words
    np.testing.assert_array_equal(glove.vectors, plain.vectors)
    with pytest.raises(ValueError, match="have dimension 8, expected 50"):
        aug.load_glove(tmp_path / "w2v.txt", expected_dim=50, cache_dir=tmp_path / "c1")
    (tmp_path / "cut.txt").write_text(f"{len(words) + 5} {DIM}\n" + lines)
    with pytest.raises(ValueError, match=f"header line says {len(words) + 5} vectors but it holds {len(words)}"):
        aug.load_glove(tmp_path / "cut.txt")


def test_glove_text_file_compressed_with_gzip(tmp_path):
    import gzip

    words, vectors = _glove_words_and_vectors()
    text = _write_glove_text(tmp_path / "glove.8d.txt", words, vectors).read_bytes()
    plain = aug.load_glove(tmp_path / "glove.8d.txt")
    (tmp_path / "glove.8d.txt.gz").write_bytes(gzip.compress(text))
    glove = aug.load_glove(tmp_path / "glove.8d.txt.gz")
    assert glove.words == plain.words
    np.testing.assert_array_equal(glove.vectors, plain.vectors)
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(text)[:-40])  # an interrupted download
    with pytest.raises(ValueError, match=r"cut.txt.gz: a damaged gzip file"):
        aug.load_glove(tmp_path / "cut.txt.gz")


def test_glove_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"a 1 2 3\nb 1 2 3\ncaf\xe9 1 2 3\n")
    with pytest.raises(ValueError, match=r"latin.txt: line 3 is not UTF-8 \(byte 0xe9 at column 4\)"):
        aug.load_glove(path)


def test_a_glove_vocabulary_written_by_pandas_is_read_from_its_words(tmp_path):
    """pandas' reset_index() writes 'index' (row numbers) beside 'word': the words read were '0', '1', ... and
    every augmented copy equalled its example, with exit 0."""
    words, vectors = _glove_words_and_vectors()
    np.save(tmp_path / "g.npy", vectors)
    pq.write_table(pa.table({"index": list(range(len(words))), "word": words}), tmp_path / "pandas.parquet")
    glove = aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "pandas.parquet")
    assert glove.words == words and glove.lookup(words[3]) == 3
    pq.write_table(pa.table({"index": list(range(len(words)))}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match=r"numbers.parquet: column 'index' holds int64, expected the words as strings"):
        aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "numbers.parquet")


def test_a_glove_vocabulary_that_is_the_text_file_or_has_null_words_is_refused(tmp_path):
    """The GloVe text file given as the vocabulary of its .npy matched row for row, every word read as its whole
    line ("happiness 1.000000 ..."): no word was found, and every copy equalled its example, with exit 0. A null
    word (pandas reads "null", "nan" and "NA" as missing) was an AttributeError mid-run."""
    words, vectors = _glove_words_and_vectors()
    np.save(tmp_path / "g.npy", vectors)
    text = _write_glove_text(tmp_path / "glove.8d.txt", words, vectors)
    expected = r"glove.8d.txt holds lines of a word and 8 numbers \(a GloVe text file\), expected one word per line"
    with pytest.raises(ValueError, match=expected):
        aug.load_glove(tmp_path / "g.npy", vocab_path=text)
    with pytest.raises(ValueError, match=expected):
        aug.load_glove(tmp_path, vocab_path=text)  # the directory form
    # words that merely hold spaces and numbers, as some of the 840B file's do, are words
    (tmp_path / "spaced.txt").write_text("".join(f"{word} 1 2\n" for word in words))
    assert aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "spaced.txt").words[0] == "happiness 1 2"
    pq.write_table(pa.table({"word": [*words[:5], None, *words[6:]]}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match=r"nulls.parquet: row 5 of column 'word' is null \(1 of 47 rows are null\), .*"
                       r"keep_default_na=False"):  # fmt: skip
        aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "nulls.parquet")


def test_glove_files_that_are_not_what_they_claim_are_named(tmp_path):
    """numpy's own errors named no file, and for a file that is not .npy at all advised loading it unsafely."""
    words, vectors = _glove_words_and_vectors()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "html.npy").write_text("<html>not found</html>")  # a failed download
    np.save(tmp_path / "objects.npy", np.array([["a"] * 3] * len(words), dtype=object), allow_pickle=True)
    np.save(tmp_path / "text.npy", np.array([["a"] * 3] * len(words)))
    for name in ("html.npy", "objects.npy"):
        with pytest.raises(ValueError, match=rf"GloVe vectors \S*{name} are not a .npy array of numbers") as err:
            aug.load_glove(tmp_path / name, vocab_path=tmp_path / "vocab.txt")
        assert "unsafe" not in str(err.value)
    with pytest.raises(ValueError, match=r"text.npy must be a 2-D \(words x dim\) array of numbers, found shape"):
        aug.load_glove(tmp_path / "text.npy", vocab_path=tmp_path / "vocab.txt")
    np.save(tmp_path / "g.npy", vectors)
    (tmp_path / "latin.txt").write_bytes(("\n".join(words[:2]) + "\ncaf\xe9\n").encode("latin-1"))
    with pytest.raises(ValueError, match=r"vocabulary \S*latin.txt: line 3 is not UTF-8 \(byte 0xe9\)"):
        aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "latin.txt")


def test_glove_line_with_more_values_than_the_others_is_refused(tmp_path):
    """The 840B file's spaced words ('. . .') end in a field that is no number; a line with one value too many
    was read as the word 'bank 0.4', silently, and cached."""
    path = tmp_path / "extra.txt"
    path.write_text("the 0.1 0.2\nbank 0.4 0.5 0.6\n")
    with pytest.raises(ValueError, match=r"extra.txt: line 2 \(word 'bank'\) has 3 values, expected 2 \(from line 1\)"):
        aug.load_glove(path)
    assert not list(tmp_path.glob("*.npy"))


def test_glove_word2vec_header_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeff2 3\nthe 0.1 0.2 0.3\nbank 0.4 0.5 0.6\n".encode())
    glove = aug.load_glove(path)
    assert glove.words == ["the", "bank"] and glove.vectors.shape == (2, 3)


def test_glove_value_that_is_not_a_number_is_named(tmp_path):
    """numpy's "could not convert string to float" named neither the file nor the line."""
    path = tmp_path / "edited.txt"
    lines = [f"w{i} {i} 0 1" for i in range(9000)]  # the bad line in the second block of 8192
    lines[8500] = "w8500 0 1,5 1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"edited.txt: line 8501 has '1,5' where a number was expected"):
        aug.load_glove(path)
    assert not list(tmp_path.glob("*.npy"))  # nothing cached from a file that failed


def test_glove_words_containing_spaces_as_in_the_840b_file(tmp_path):
    path = tmp_path / "glove.840B.txt"
    path.write_bytes(b"a 1 0 0\n. . . 0 1 0\nat name@domain.com 0 0 1\n  1 1 0\nb 0.9 0.1 0\n")
    glove = aug.load_glove(path)
    assert glove.words == ["a", ". . .", "at name@domain.com", " ", "b"]
    np.testing.assert_array_equal(glove.vectors[2], [0, 0, 1])
    assert aug.load_glove(path).words == glove.words  # the cached vocabulary keeps them too
    assert aug.GloveNeighbours(glove, k=1).neighbours(["a"]) == {"a": ["b"]}


def test_glove_dimension_other_than_expected(tmp_path, glove_txt):
    with pytest.raises(ValueError, match="has 8 values, expected 50"):
        aug.load_glove(glove_txt, expected_dim=50, cache_dir=tmp_path)
    words, vectors = _glove_words_and_vectors()
    np.save(tmp_path / "g.npy", vectors)
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    with pytest.raises(ValueError, match="dimension 8, expected 300"):
        aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "vocab.txt", expected_dim=300)
    # A text file converted once: a later run's error named the cache file, not the file the user gave
    aug.load_glove(glove_txt, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=rf"GloVe vectors {re.escape(str(glove_txt))} have dimension 8, expected 50"):
        aug.load_glove(glove_txt, expected_dim=50, cache_dir=tmp_path)


def test_glove_npy_rows_must_match_vocabulary(tmp_path):
    words, vectors = _glove_words_and_vectors()
    np.save(tmp_path / "g.npy", vectors[:-1])
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    with pytest.raises(ValueError, match=r"have 46 rows but the vocabulary .*vocab.txt has 47 words"):
        aug.load_glove(tmp_path / "g.npy", vocab_path=tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="give their vocabulary"):
        aug.load_glove(tmp_path / "g.npy")
    with pytest.raises(FileNotFoundError):
        aug.load_glove(tmp_path / "absent.txt")
    # A directory and its vocabulary (--glove DIR --glove-vocab FILE) still needs exactly one .npy: none was an
    # IndexError traceback, two took the first name sorted without a word.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"GloVe directory .*empty must hold exactly one .npy; found \[\]"):
        aug.load_glove(empty, vocab_path=tmp_path / "vocab.txt")
    np.save(tmp_path / "h.npy", vectors)
    with pytest.raises(ValueError, match=r"must hold exactly one .npy; found \['g.npy', 'h.npy', 'vocab.txt'\]"):
        aug.load_glove(tmp_path, vocab_path=tmp_path / "vocab.txt")


# ------------------------------------------------------------------------------------------------ misc


def test_split_words_keeps_offsets():
    words = aug.split_words("Don't stop, [SEP] now!", ["[SEP]", "[CLS]"])
    assert [(w.text, w.replaceable) for w in words] == [
        ("Don", False), ("'", False), ("t", False), ("stop", True), (",", False), ("[SEP]", False), ("now", True),
        ("!", False),
    ]  # fmt: skip


def test_only_words_of_letters_outside_contractions_are_replaced():
    """As TinyBERT's code: numbers ("2 films", "2019") and words with digits keep their meaning, and the two sides
    of a contraction are no words ("do'fxff", "it'eds" came out of "don't", "it's")."""
    text = "The 2 films cost 15 million in 2019; it's covid19 we'll don’t students' café 'hello'"
    replaceable = {w.text for w in aug.split_words(text) if w.replaceable}
    assert replaceable == {"The", "films", "cost", "million", "in", "students", "café", "hello"}
    # tokenized text, as SST-2 writes it: the clitic after a spaced apostrophe is no word either ("'ll" -> "'lil"),
    # nor the word before a split negation ("does n't" -> "lot n't", "ca n't" -> "anymore n't")
    sst2 = "it 's a film we 're told it 'll do , but does n't and ca n’t"
    assert {w.text for w in aug.split_words(sst2) if w.replaceable} == {
        "it",
        "a",
        "film",
        "we",
        "told",
        "do",
        "but",
        "and",
    }
    # A word goes on through its combining marks (a decomposed "café", Devanagari's vowel signs): \w alone
    # stopped at each mark, left "́" behind a replaced "cafe" and made single consonants of a Hindi word.
    marked = "cafe\u0301 nai\u0308ve \u0939\u093f\u0928\u094d\u0926\u0940 \u0301x"
    assert [(w.text, w.replaceable) for w in aug.split_words(marked)] == [
        ("cafe\u0301", True), ("nai\u0308ve", True), ("\u0939\u093f\u0928\u094d\u0926\u0940", True),
        ("\u0301x", False),  # a mark with no letter before it starts no word of letters
    ]  # fmt: skip


def _letter_words(count: int) -> list[str]:
    """Distinct words of letters only ("ba", "bb", ...): words with digits are never candidates."""
    return ["".join(chr(97 + (i // 26**p) % 26) for p in (2, 1, 0)) for i in range(count)]


def test_glove_candidates_are_words_of_letters_from_the_first_words_read_and_no_zero_vector():
    words = ["good", "great", "2014-15", ":d", "'m", "fine", "nice", "zero", "rare", "rarer"]
    vectors = np.array(
        [[1, 0.1], [1, 0.2], [1, 0.12], [1, 0.11], [1, 0.13], [1, 0.3], [1, 0.4], [0, 0], [1, 0.16], [1, 0.17]],
        dtype=np.float32,
    )
    glove = aug.GloveVectors(words=words, vectors=vectors, source="test")
    everything = aug.GloveNeighbours(glove, k=5).neighbours(["good", "zero", "rare"])
    # the nearest are "2014-15", ":d", "'m": no words of letters, so never candidates; the zero vector neither
    assert everything == {
        "good": ["rare", "rarer", "great", "fine", "nice"],
        "zero": [],
        "rare": ["rarer", "great", "good", "fine", "nice"],
    }
    # the first 7 words read (a GloVe file's most frequent): the rarer ones are no candidates and have none
    first = aug.GloveNeighbours(glove, k=5, max_words=7).neighbours(["good", "rare"])
    assert first == {"good": ["great", "fine", "nice"], "rare": []}
    # a cased file: a spelling past the words read, or with a zero vector, is looked up lower-cased, as a spelling
    # the file lacks is ("Good" had no candidates while "gOOd" had good's)
    cased = aug.GloveVectors(words=[*words, "Good", "Great"], vectors=np.vstack([vectors, [[1, 0.1], [0, 0]]]),
                             source="test")  # fmt: skip
    found = aug.GloveNeighbours(cased, k=2, max_words=7).neighbours(["Good", "gOOd", "Great"])
    assert found == {"Good": ["great", "fine"], "gOOd": ["great", "fine"], "Great": ["fine", "good"]}


def test_config_validation():
    assert (aug.AugmentConfig().p_t, aug.AugmentConfig().n_a, aug.AugmentConfig().k) == (0.4, 20, 15)
    with pytest.raises(ValueError, match="p_t must be in"):
        aug.AugmentConfig(p_t=1.5)
    with pytest.raises(ValueError, match="n_a must be >= 1"):
        aug.AugmentConfig(n_a=0)


def test_augmented_labels_read_back_as_ids_even_when_names_look_like_integers(tmp_path):
    """augment writes class ids; names like ["1", "0"] must not turn id 0 into the class named "0"."""
    import pyarrow as pa

    from dist_kd.data.tasks import load_task_examples, resolve_task_spec
    from dist_kd.precompute import spec_for_data

    spec = resolve_task_spec("flipped", labels=["1", "0"], text_a="sentence", label="y")
    table = pa.table({
        "example_id": ["a", "a-aug0", "b", "b-aug0"], "task": ["flipped"] * 4,
        "text_a": ["good film", "fine film", "bad film", "poor film"], "text_b": pa.array([None] * 4, pa.string()),
        "label": pa.array([0, None, 1, None], pa.int64()),
    })  # fmt: skip
    path = tmp_path / "augmented.parquet"
    write_parquet_atomic(table, path, {"kind": "augmented_task_data", "task": "flipped", "label_names": ["1", "0"]})
    read = load_task_examples(path, spec_for_data(spec, path), require_labels=False)
    assert read.column("label").to_pylist() == [0, None, 1, None]

    bad = table.set_column(4, "label", pa.array([0, None, 5, None], pa.int64()))
    write_parquet_atomic(bad, path, {"kind": "augmented_task_data", "task": "flipped", "label_names": ["1", "0"]})
    with pytest.raises(ValueError, match="class id 5, but the file names only 2 classes"):
        load_task_examples(path, spec_for_data(spec, path), require_labels=False)


def test_augmented_data_of_another_task_is_refused(tmp_path):
    """sst2's augmented set given for cola has the same labels ['0', '1']; it was read as cola's data."""
    import pyarrow as pa

    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.precompute import spec_for_data

    table = pa.table({"example_id": ["a"], "task": ["sst2"], "text_a": ["good film"],
                      "text_b": pa.array([None], pa.string()), "label": pa.array([1], pa.int64())})  # fmt: skip
    path = tmp_path / "augmented.parquet"
    meta = {"kind": "augmented_task_data", "task": "sst2", "task_type": "classification", "label_names": ["0", "1"]}
    write_parquet_atomic(table, path, meta)
    assert spec_for_data(resolve_task_spec("SST-2"), path).name == "sst2"
    with pytest.raises(ValueError, match=r"augmented data .*augmented.parquet was made for task 'sst2', not 'cola'"):
        spec_for_data(resolve_task_spec("cola"), path)


def test_a_masked_lm_directory_without_tokenizer_files_is_refused(biased_mlm_dir, tmp_path):
    """A model saved without its tokenizer would load a special-tokens-only one: every word [UNK]."""
    import shutil
    from pathlib import Path

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(biased_mlm_dir) / name, bare / name)
    with pytest.raises(FileNotFoundError, match=rf"tokenizer directory {bare} has no vocabulary file"):
        aug.MaskedLMCandidates(bare, k=4)


def test_an_encoder_without_its_masked_lm_head_is_refused(tmp_path):
    from dist_kd.testing import build_tiny_bert

    # A sentence-embedding model (all-MiniLM-L6-v2) has no MLM head: loaded as a masked-LM it gets a random one.
    encoder = build_tiny_bert(tmp_path / "encoder", seed=0, model_class="BertModel", num_layers=2)
    with pytest.raises(ValueError, match=r"has no trained masked-LM head \(cls\.predictions\..*launch/mlm_head.py"):
        aug.MaskedLMCandidates(encoder, k=3)


def test_a_byte_level_bpe_masked_lm_sees_the_text_with_its_spaces(bpe_mlm_dir, glove_txt):
    augmenter = _augmenter(bpe_mlm_dir, glove_txt, k=2)
    text = "the bank raised happiness"
    sources = {c.word.text: (c.source, c.candidates[:1]) for c in augmenter.word_candidates([text])[0]}
    # Given word by word, RoBERTa's tokenizer read "thebankraised..." and split "bank" into "b", "ank".
    assert sources["bank"] == ("mlm", ["rates"])  # the masked-LM's favourite piece, "Ġrates", as a word
    assert sources["happiness"] == ("glove", ["joy"])
    ((ids, positions),) = augmenter.masked_lm.piece_spans([text], [aug.split_words(text)])
    tokens = augmenter.masked_lm.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:4] == ["<s>", "the", "Ġbank", "Ġraised"] and len(tokens) > 6  # "happiness": several pieces
    assert positions == [[1], [2], [3], list(range(4, len(tokens) - 1))]


def test_byte_level_bpe_continuation_pieces_and_lone_bytes_are_never_candidates(bpe_mlm_dir, glove_txt):
    augmenter = _augmenter(bpe_mlm_dir, glove_txt, k=3)
    candidates = {c.word.text: c.candidates for c in augmenter.word_candidates(["the bank raised rates"])[0]}
    assert candidates["bank"][0] == "rates"
    for word in candidates.values():
        assert "ank" not in word and "Ã" not in word and all(any(c.isalnum() for c in w) for w in word)
    # A piece's surface is the text it stands for.
    assert augmenter.masked_lm._surface(augmenter.masked_lm.tokenizer.convert_tokens_to_ids("Ġbank")) == "bank"


def test_a_cased_masked_lm_never_offers_the_word_itself_in_another_case(bpe_mlm_dir, glove_txt):
    augmenter = _augmenter(bpe_mlm_dir, glove_txt, k=3, stop_words="none")
    candidates = {c.word.text: c.candidates for c in augmenter.word_candidates(["the bank raised rates"])[0]}
    assert candidates["the"][:2] == ["Bank", "rates"]  # for another word, "Bank" is a fine candidate
    assert candidates["bank"][0] == "rates" and len(candidates["bank"]) == 3
    assert "bank" not in {word.lower() for word in candidates["bank"]}


def test_words_are_split_as_berts_normalizer_and_pre_tokenizer_split_them():
    """A run of CJK ideographs was one word (many pieces, no candidates: Chinese text came back unchanged); BERT
    makes each ideograph a word, and kana and hangul runs stay whole. The reference is the tokenizers library's
    BertNormalizer (handle_chinese_chars) and BertPreTokenizer."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    from dist_kd.data.augment import split_words

    # clean_text deletes NUL, U+FFFD and the control and format characters: a soft hyphen or a zero-width
    # (non-)joiner inside a word leaves BERT one word, and a word cut there had a fragment replaced ("##ness").
    normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False)
    for text in ("我喜欢这部电影, said Ann; かなは一語 and 한국어 too! 東京-2020", "plain words, no CJK (at all)",
                 "𠀀𠀁 rare ideographs 豈", "I love new_york and #happy_days __init__",
                 "happi\u00adness ba\u200dnk, \u200b alone \u2060x\u2060 ,\u200bword",
                 "می\u200cخواهم a\x00b \ufffd! \x07"):  # fmt: skip
        reference = [word for word, _ in BertPreTokenizer().pre_tokenize_str(normalizer.normalize_str(text))]
        words = split_words(text)
        assert [word.visible for word in words if word.visible] == reference, text
        assert all(text[word.start : word.end] == word.text for word in words)  # offsets into the original
    assert [word.replaceable for word in split_words("电影!")] == [True, True, False]


def test_non_finite_glove_values_are_refused_naming_the_row(tmp_path):
    """A row of NaNs has a NaN cosine with every word, and ranked as every word's nearest neighbour: its word
    flooded the augmented copies, with exit 0."""
    text = tmp_path / "nan.txt"
    text.write_text("good 0.1 0.2 0.3\ngame nan nan nan\nfilm 0.3 0.1 0.2\n")
    with pytest.raises(ValueError, match=r"nan.txt: line 2 holds a non-finite value \(NaN or infinity\), in 1 row"):
        aug.load_glove(text, cache_dir=tmp_path / "cache")
    matrix = np.array([[0.1, 0.2], [0.3, np.inf], [np.nan, 0.0]], dtype=np.float32)
    np.save(tmp_path / "v.npy", matrix)
    (tmp_path / "words.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match=r"v.npy: row 1 \(word 'b'\) holds a non-finite value .*in 2 row"):
        aug.load_glove(tmp_path / "v.npy", tmp_path / "words.txt")
    np.save(tmp_path / "v.npy", matrix[:1])
    (tmp_path / "words.txt").write_text("a\n")
    assert aug.load_glove(tmp_path / "v.npy", tmp_path / "words.txt").words == ["a"]


def test_the_masked_lm_sees_the_masked_text_then_the_text_as_its_second_segment(biased_mlm_dir, bpe_mlm_dir, tmp_path):
    """As TinyBERT's code: [CLS] masked [SEP] text [SEP], segment ids 0 then 1 (the model saw the masked text alone,
    so its candidates were any word the context admits, not words near the one replaced)."""
    import torch

    bert = aug.MaskedLMCandidates(biased_mlm_dir, k=3, max_seq_length=32)
    tokenizer = bert.tokenizer
    ids = tokenizer("the bank raised rates")["input_ids"]
    body = ids[1:-1]
    cls, sep, mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
    pair, types = bert.model_input(ids, 2)
    masked = list(body)
    masked[1] = mask
    assert pair == [cls, *masked, sep, *body, sep]
    assert types == [0] * (len(body) + 2) + [1] * (len(body) + 1)
    # an unbiased masked-LM's scores at the masked position, computed here from the pair, give the candidates; the
    # masked text alone gives others (so a run that read it alone is told apart)
    from dist_kd.testing import build_tiny_bert

    plain = aug.MaskedLMCandidates(
        build_tiny_bert(tmp_path / "plain", seed=3, model_class="BertForMaskedLM", num_layers=2), k=3
    )
    ids = plain.tokenizer("the bank raised rates on loans")["input_ids"]
    expected, alone = {}, {}
    for position in range(1, len(ids) - 1):
        sequence, segments = plain.model_input(ids, position)
        masked = list(ids)
        masked[position] = mask
        for out, inputs in ((expected, (sequence, segments)), (alone, (masked, [0] * len(masked)))):
            with torch.no_grad():
                logits = plain.model(
                    input_ids=torch.tensor([inputs[0]]), token_type_ids=torch.tensor([inputs[1]])
                ).logits[0, position]
            logits[plain.banned[: logits.shape[0]]] = float("-inf")
            logits[ids[position]] = float("-inf")
            out[position] = [plain._surface(i) for i in torch.topk(logits, 3).indices.tolist()]
    (found,) = plain.candidates([(ids, list(expected))])
    assert found == expected and found != alone
    # the second text is cut to the context left; with none left, the masked text alone
    long = tokenizer("the bank raised rates " * 2)["input_ids"]
    room = 32 - len(long) - 1
    pair, types = bert.model_input(long, 2)
    assert pair == [*long[:2], mask, *long[3:], *long[1 : 1 + room], sep] and types == [0] * len(long) + [1] * 6
    longest = tokenizer("the bank raised rates " * 8)["input_ids"]
    pair, types = bert.model_input(longest, 2)
    assert pair == [*longest[:2], mask, *longest[3:31], longest[-1]] and types == [0] * 32
    # RoBERTa frames a pair as <s> a </s></s> b </s>, and its one segment embedding gets no segment ids
    roberta = aug.MaskedLMCandidates(bpe_mlm_dir, k=2)
    ids = roberta.tokenizer("the bank raised rates")["input_ids"]
    pair, _ = roberta.model_input(ids, 2)
    bos, eos, mask = roberta.tokenizer.bos_token_id, roberta.tokenizer.eos_token_id, roberta.tokenizer.mask_token_id
    masked = list(ids[1:-1])
    masked[1] = mask
    assert pair == [bos, *masked, eos, eos, *ids[1:-1], eos] and not roberta.segments and bert.segments


def test_an_explicit_masked_lm_length_is_used_as_given_or_refused(biased_mlm_dir):
    # The tiny masked-LM has 128 positions; a longer context asked for was cut to 128 without a word while the
    # augmented set's metadata recorded the asked value.
    flag = r"max_seq_length \(--max-seq-length\)"
    with pytest.raises(ValueError, match=rf"{flag} 200 exceeds the max_position_embeddings 128 of model .*; set {flag} "
                                         r"to at most 128"):  # fmt: skip
        aug.MaskedLMCandidates(biased_mlm_dir, k=2, max_seq_length=200)
    assert aug.MaskedLMCandidates(biased_mlm_dir, k=2, max_seq_length=64).max_seq_length == 64
    assert aug.MaskedLMCandidates(biased_mlm_dir, k=2).max_seq_length == 128  # null: the model's maximum


def test_a_roberta_masked_lm_reads_sentences_past_its_usable_positions(bpe_mlm_dir):
    # RoBERTa's positions start after the padding id: 132 embeddings hold 130 pieces. The default context was
    # 132, and a sentence of 131 or more pieces indexed past the position embeddings.
    masked_lm = aug.MaskedLMCandidates(bpe_mlm_dir, k=2)
    assert masked_lm.max_seq_length == 130
    ids = masked_lm.tokenizer("the bank raised rates " * 60)["input_ids"]
    assert len(ids) > 132
    (found,) = masked_lm.candidates([(ids, [2, 128, len(ids) - 2])])
    assert sorted(found) == [2, 128, len(ids) - 2]
    assert found[len(ids) - 2] == []  # past the context: no candidates


def test_tinybert_stop_words_are_kept_and_none_replaces_them(glove_txt):
    """TinyBERT's code never replaces its stop words; replacing them took 42 % of a GloVe-only run's replacements
    on tweets and turned negations into other words ("not driving" -> "would stopping")."""
    # The list as TinyBERT's code writes it: NLTK's English stop words without what/which/who/whom/when/where/
    # why/how, 173 words.
    assert len(aug.TINYBERT_STOP_WORDS) == 173
    assert {"not", "no", "nor", "the", "is", "did", "i", "don't", "'s"} <= aug.TINYBERT_STOP_WORDS
    assert not {"never", "what", "how", "happiness"} & aug.TINYBERT_STOP_WORDS
    text = "Not the Happiness , NOR what I did never"
    kept = aug.build_augmenter(None, glove_txt, aug.AugmentConfig(k=2))
    replaceable = {c.word.text for c in kept.word_candidates([text])[0] if c.source != "none"}
    assert replaceable == {"Happiness", "what", "never"}
    every = aug.build_augmenter(None, glove_txt, aug.AugmentConfig(k=2, stop_words="none"))
    replaceable = {c.word.text for c in every.word_candidates([text])[0] if c.source != "none"}
    assert replaceable == {"Not", "the", "Happiness", "NOR", "what", "I", "did", "never"}
    with pytest.raises(ValueError, match="stop_words must be one of none, tinybert, got 'nltk'"):
        aug.AugmentConfig(stop_words="nltk")


def test_i_passes_its_capital_on_at_the_start_of_a_sentence_only():
    """ "then I left" became "then Me left": "I" is a capital wherever it stands."""
    cases = [
        ("I", "me", True, "Me"),
        ("I", "me", False, "me"),
        ("The", "bank", False, "Bank"),
        ("NASA", "esa", False, "ESA"),
    ]
    for original, replacement, starts, expected in cases:
        assert aug._match_case(original, replacement, starts) == expected
    words = [
        aug.WordCandidates(w, ["me"] if w.text == "I" else [], "glove") for w in aug.split_words("I said. Then I left")
    ]
    augmenter = aug.Augmenter(None, aug.GloveNeighbours(aug.GloveVectors(["x"], np.ones((1, 2), np.float32), "t"), k=1),
                              aug.AugmentConfig(p_t=1.0))  # fmt: skip
    assert augmenter._sample("I said. Then I left", words, random.Random(0)) == "Me said. Then me left"


def test_decomposed_words_find_their_glove_row_and_words_with_marks_are_candidates():
    """A word may hold combining marks (a decomposed "café", Devanagari's vowel signs), and so may its
    candidates: isalpha() alone banned every Hindi word with a vowel sign."""
    words = ["café", "cafe", "coffee", "naïve", "tea", "हिन्दी", "भाषा", "किताब", "नमक", "2019"]
    vectors = np.array([[1, 0.1], [1, 0.11], [1, 0.3], [0, 1], [1, 0.5], [-1, 1], [-1, 0.98], [-1, 0.95],
                        [-1, 0.9], [-1, 0.99]], dtype=np.float32)  # fmt: skip
    neighbours = aug.GloveNeighbours(aug.GloveVectors(words=words, vectors=vectors, source="test"), k=2)
    found = neighbours.neighbours(["cafe\u0301"])  # NFD, as some text arrives; GloVe writes words composed
    assert found["cafe\u0301"] == ["cafe", "coffee"]  # the word itself ("café") is none; "cafe" is another word
    assert neighbours.neighbours(["हिन्दी"])["हिन्दी"] == ["भाषा", "किताब"]  # "2019" is no word of letters


def test_a_glove_word_with_a_carriage_return_loads_again_from_its_cache(tmp_path):
    """The text parser keeps odd words (840B has words with spaces); its cached vocabulary was read back with
    newline translation, which split a word holding "\\r" in two, and no later load worked."""
    source = tmp_path / "g.txt"
    source.write_bytes(b"the 0.1 0.2\nbank 0.3 0.1\nodd\rword 0.5 0.5\nmarket 0.3 0.2\n")
    first = aug.load_glove(source)
    assert first.words == ["the", "bank", "odd\rword", "market"]
    assert aug.load_glove(source).words == first.words  # from the cache it wrote
    crlf = tmp_path / "vocab.txt"
    crlf.write_bytes(b"the\r\nbank\r\n")
    assert aug._read_vocab(crlf) == ["the", "bank"]  # a file of CRLF lines throughout is still read as lines


def test_a_set_made_with_another_masked_lm_tokenizer_is_made_again(biased_mlm_dir, glove_txt, tmp_path):
    """The run key held the masked-LM's weights but not its tokenizer, which decides what goes to the masked-LM
    and what to GloVe: a tokenizer fixed in place (lower-casing off) kept the set made with the old one."""
    import json
    import shutil

    from dist_kd.data.tasks import TaskSpec

    mlm = tmp_path / "mlm"
    shutil.copytree(biased_mlm_dir, mlm)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Quickly happiness {i}", "label": "a"}) + "\n" for i in range(3)))
    spec = TaskSpec(name="t", labels=["a", "b"], text_a="text")
    config = aug.AugmentConfig(n_a=1, k=1)
    aug.augment_task(spec, data, tmp_path / "out", glove_txt, config, mlm_dir=mlm, progress=False)
    before = read_parquet_metadata(aug.final_path(tmp_path / "out"))
    written = aug.final_path(tmp_path / "out").stat().st_mtime_ns
    settings = json.loads((mlm / "tokenizer.json").read_text())
    settings["normalizer"]["lowercase"] = False
    (mlm / "tokenizer.json").write_text(json.dumps(settings))
    settings = json.loads((mlm / "tokenizer_config.json").read_text())
    (mlm / "tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": False}))
    aug.augment_task(spec, data, tmp_path / "out", glove_txt, config, mlm_dir=mlm, progress=False)
    after = read_parquet_metadata(aug.final_path(tmp_path / "out"))
    assert after["masked_lm"]["sha256"] == before["masked_lm"]["sha256"]  # the same weights
    assert after["masked_lm"]["tokenizer"] != before["masked_lm"]["tokenizer"]
    assert aug.final_path(tmp_path / "out").stat().st_mtime_ns != written  # made again, not kept


def test_augmentation_summary_counts_words_copies_and_stop_words(glove_txt, tmp_path):
    def rows(example_id, text_a, text_b, copies):
        return [(example_id, text_a, text_b)] + [(f"{example_id}-aug{k}", a, b) for k, (a, b) in enumerate(copies)]

    table = pa.table(
        dict(zip(("example_id", "text_a", "text_b"), zip(*(
            rows("x", "The cat sat on the mat.", None, [
                ("The dog sat on the mat.", None),  # 1 of 6 words
                ("A cat sat in the mat.", None),  # 2 of 6, both stop words
                ("The cat sat on the mat.", None),  # the example itself
            ])
            + rows("x-aug", "It's 2019, folks!", "Hello there", [("It's 2019, people!", "Hello there")])  # 1 of 6
        ))))
    )  # fmt: skip
    summary = aug.augmentation_summary(table)
    assert summary == {
        "examples": 2,
        "copies": 4,
        "identical_copies": 1 / 4,
        "words": 3 * 6 + 6,  # "It's" is two words, "2019" one; the punctuation none
        "words_replaced": 4 / 24,
        "replaced_stop_words": 2 / 4,
        "copies_not_compared": 0,
    }
    # A set written by augment: no copy of p_t = 0 differs, and the directory reads as its table does.
    augmenter = _augmenter(None, glove_txt, p_t=0.0, n_a=3, k=3)
    write_parquet_atomic(augmenter.augment(_random_examples(5), "t"), aug.final_path(tmp_path), {})
    unchanged = aug.augmentation_summary(tmp_path)
    assert (unchanged["examples"], unchanged["copies"], unchanged["identical_copies"]) == (5, 15, 1.0)
    assert unchanged["words_replaced"] == 0.0 and unchanged["words"] > 0
    every = aug.augmentation_summary(_augmenter(None, glove_txt, p_t=1.0, n_a=3, k=3).augment(_random_examples(5), "t"))
    assert every["identical_copies"] < 1.0 and every["words_replaced"] > 0.0  # the fixture has few of the words
    # A copy with another number of words (a set made elsewhere) is counted apart, not an error: augment
    # computes this after writing its set.
    other = table.set_column(1, "text_a", pa.array(table["text_a"].to_pylist()[:5] + ["Hi"]))
    changed = {"copies_not_compared": 1, "words": 18, "words_replaced": 3 / 18, "replaced_stop_words": 2 / 3}
    assert aug.augmentation_summary(other) == summary | changed
    # An example whose own id ends in "-aug<k>" past the copies of the one before ("x", "x-aug5" with N_a = 2)
    # was taken for a copy of it, and its copies for examples.
    two = _augmenter(None, glove_txt, p_t=1.0, n_a=2, k=3)
    ids = _random_examples(3).set_column(0, "example_id", pa.array(["x", "x-aug5", "y"]))
    write_parquet_atomic(two.augment(ids, "t"), aug.final_path(tmp_path), {"parameters": {"n_a": 2}})
    for counted in (aug.augmentation_summary(tmp_path), aug.augmentation_summary(two.augment(ids, "t"))):
        assert (counted["examples"], counted["copies"]) == (3, 6)
    # a set written elsewhere (no dist_kd metadata) is summarised by its ids, as its table is
    pq.write_table(two.augment(ids, "t"), aug.final_path(tmp_path))
    assert (aug.augmentation_summary(tmp_path)["examples"], aug.augmentation_summary(tmp_path)["copies"]) == (3, 6)
    ids = ids.set_column(0, "example_id", pa.array(["x", "x-aug2", "y"]))  # the next copy's id: n_a tells
    assert aug.augmentation_summary(two.augment(ids, "t"), n_a=2)["examples"] == 3
    assert aug.augmentation_summary(two.augment(ids, "t"))["examples"] != 3  # the ids alone miscount
    write_parquet_atomic(two.augment(ids, "t"), aug.final_path(tmp_path), {"parameters": {"n_a": 2}})
    assert aug.augmentation_summary(tmp_path)["examples"] == 3  # the set's metadata gives N_a


def test_a_word_of_letters_in_place_of_a_cjk_ideograph_is_set_apart_by_spaces(tmp_path):
    """'iphone中国 phone' became 'iphonebankriver phone': replacements joined their neighbours into a new word."""
    words = ["中", "国", "bank", "river", "日"]
    vectors = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0.9, 0.1, 0, 0], [0.1, 0.9, 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    _write_glove_text(tmp_path / "g.txt", words, vectors)
    augmenter = _augmenter(None, tmp_path / "g.txt", p_t=1.0, n_a=1, k=1)
    out = augmenter.augment(_examples(["iphone中国 phone", "中日", "a 中, b"]), "t").column("text_a").to_pylist()
    assert out[1] == "iphone bank river phone"
    assert out[3] == "bank中"  # 日's candidate (every word as far: the first) is CJK: no space beside one
    assert out[5] == "a bank, b"  # a space or punctuation there already: none added
    assert aug.augmentation_summary(augmenter.augment(_examples(["iphone中国 phone"]), "t"))["words_replaced"] == 0.5
    # A replacement ending in a combining mark (a decomposed "café") joins the letters after it just the same.
    _write_glove_text(tmp_path / "marks.txt", ["中", "cafe\u0301"], np.array([[1, 0], [0.9, 0.1]], dtype=np.float32))
    marked = _augmenter(None, tmp_path / "marks.txt", p_t=1.0, n_a=1, k=1).augment(_examples(["中abc"]), "t")
    assert marked.column("text_a").to_pylist()[1] == "cafe\u0301 abc"


def test_a_sentencepiece_word_start_marker_of_its_own_is_no_piece_of_the_word(tmp_path, glove_txt):
    """A SentencePiece tokenizer writes a word it has no "▁word" piece for as "▁" + "word"; the lone "▁" had
    offsets over the word's first character at the start of a text (and everywhere with XLM-R's
    pre-tokenizer), so the word counted two pieces there (GloVe) and one elsewhere (masked-LM)."""
    import torch
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import AlbertConfig, AlbertForMaskedLM, PreTrainedTokenizerFast

    from dist_kd.testing import random_sentences

    unigram = SentencePieceUnigramTokenizer()
    specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    unigram.train_from_iterator(
        random_sentences(400, seed=0), vocab_size=400, special_tokens=specials, unk_token="<unk>"
    )
    ids = {token: unigram.token_to_id(token) for token in ("[CLS]", "[SEP]")}
    unigram._tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=list(ids.items())
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=unigram._tokenizer, unk_token="<unk>", pad_token="<pad>", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    tokenizer.save_pretrained(tmp_path)
    config = AlbertConfig(vocab_size=len(tokenizer), embedding_size=16, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    AlbertForMaskedLM(config).save_pretrained(tmp_path)
    vocab = tokenizer.get_vocab()
    lone = [word for word in vocab if word.isalpha() and word.isascii() and "▁" + word not in vocab]
    word = next(word for word in lone if tokenizer.tokenize(f"{word} x")[:2] == ["▁", word])
    augmenter = _augmenter(tmp_path, glove_txt, k=2, stop_words="none")
    first, second = augmenter.word_candidates([f"{word} said", f"said {word}"])
    assert [c.source for c in first if c.word.text == word] == ["mlm"]
    assert [c.source for c in second if c.word.text == word] == ["mlm"]
