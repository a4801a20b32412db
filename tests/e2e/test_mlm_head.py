"""launch/mlm_head.py: a masked-LM head fitted on a frozen tiny encoder predicts masked pieces better than the
untrained head, leaves the encoder untouched, and loads as an HF masked-LM that augmentation accepts."""

from __future__ import annotations

import json

import pytest
import torch

from tests.e2e.conftest import run_script


def test_fitted_head_beats_untrained_and_keeps_encoder(tiny_bert_dir, tiny_corpus, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    out = tmp_path / "mlm"
    proc = run_script(
        "launch/mlm_head.py", "--encoder", str(tiny_bert_dir), "--shards", str(tiny_corpus / "shards"),
        "--output", str(out), "--steps", "60", "--batch-size", "8", "--lr", "3e-3", "--eval-batches", "4",
        "--top-k", "5",
    )  # fmt: skip
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    # stderr is a pipe, as a SLURM log: the bar is a line when it starts and ends (and once a minute), not a step
    bar_lines = [line for line in proc.stderr.splitlines() if line.startswith("MLM head")]
    assert 2 <= len(bar_lines) <= 4, proc.stderr[-3000:]
    result = json.loads((out / "mlm.json").read_text())
    assert printed["held_out_after"] == result["held_out_after"]
    before, after = result["held_out_before"], result["held_out_after"]
    # the tiny corpus draws words uniformly, so little beyond the word/piece statistics is learnable
    assert after["loss"] < before["loss"], (before, after)
    assert after["top5"] > before["top5"] + 0.05, (before, after)
    mlm = AutoModelForMaskedLM.from_pretrained(out)
    encoder = AutoModel.from_pretrained(tiny_bert_dir)
    for name, value in encoder.state_dict().items():
        if name.startswith("pooler"):
            continue  # a masked-LM has no pooler
        torch.testing.assert_close(mlm.base_model.state_dict()[name], value, msg=name)


def test_augment_accepts_the_fitted_head(tiny_bert_dir, tiny_corpus, tmp_path):
    from dist_kd.data.augment import MaskedLMCandidates

    out = tmp_path / "mlm"
    proc = run_script(
        "launch/mlm_head.py", "--encoder", str(tiny_bert_dir), "--shards", str(tiny_corpus / "shards"),
        "--output", str(out), "--steps", "5", "--batch-size", "4", "--eval-batches", "1",
    )  # fmt: skip
    candidates = MaskedLMCandidates(out, k=3, batch_size=8, device="cpu")
    assert candidates.tokenizer.mask_token_id is not None
    assert "Warning" not in proc.stderr, proc.stderr  # float() of the last loss warned of its gradient every run


def test_bad_input_is_one_error_line(tmp_path, tiny_bert_dir):
    proc = run_script(
        "launch/mlm_head.py", "--encoder", str(tmp_path / "nope"), "--shards", str(tmp_path), "--output",
        str(tmp_path / "o"), check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "nope" in proc.stderr
    proc = run_script(
        "launch/mlm_head.py", "--encoder", str(tiny_bert_dir), "--shards", str(tmp_path), "--output",
        str(tmp_path / "o"), "--mask-prob", "1.5", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "mask_prob" in proc.stderr
    assert not (tmp_path / "o").exists()
    vocab = json.loads((tiny_bert_dir / "config.json").read_text())["vocab_size"]
    proc = run_script(
        "launch/mlm_head.py", "--encoder", str(tiny_bert_dir), "--shards", str(tmp_path), "--output",
        str(tmp_path / "o"), "--top-k", str(vocab + 1), check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: top_k (--top-k) {vocab + 1} exceeds the encoder's vocabulary of {vocab} pieces"
    ), proc.stderr
    assert not (tmp_path / "o").exists()
    # An output holding the user's files (here the encoder itself) was replaced whole: the encoder deleted.
    before = sorted(path.name for path in tiny_bert_dir.iterdir())
    proc = run_script(
        "launch/mlm_head.py", "--encoder", str(tiny_bert_dir), "--shards", str(tmp_path), "--output",
        str(tiny_bert_dir), check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: --output {tiny_bert_dir} holds files other than"), (
        proc.stderr
    )
    assert "an earlier masked-LM head (with mlm.json)" in proc.stderr
    assert sorted(path.name for path in tiny_bert_dir.iterdir()) == before


def test_train_layers_changes_only_the_top_layers(tiny_bert_dir, tiny_corpus, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM

    out = tmp_path / "mlm"
    run_script(
        "launch/mlm_head.py", "--encoder", str(tiny_bert_dir), "--shards", str(tiny_corpus / "shards"),
        "--output", str(out), "--steps", "10", "--batch-size", "4", "--eval-batches", "1", "--train-layers", "1",
    )  # fmt: skip
    mlm, encoder = AutoModelForMaskedLM.from_pretrained(out).base_model, AutoModel.from_pretrained(tiny_bert_dir)
    for name, value in encoder.state_dict().items():
        if name.startswith("pooler"):
            continue
        changed = not torch.equal(mlm.state_dict()[name], value)
        assert changed == name.startswith("encoder.layer.3."), name


def test_training_batches_are_every_batch_but_the_held_out_ones_each_pass(tiny_bert_dir, tiny_corpus):
    """The first pass lost the len(held_out) batches after the held-out ones (the loader keeps its position, and
    every pass skipped its first len(held_out) batches); a corpus that had just enough batches was refused."""
    import pytest

    from dist_kd.data.stream import build_corpus_loader
    from dist_kd.data.tokenizer import load_tokenizer
    from dist_kd.mlm import training_batches

    def loader():
        return build_corpus_loader(tiny_corpus / "shards", micro_batch_size=8, num_workers=0, seed=0, shuffle=False,
                                   teacher_tokenizer=load_tokenizer(tiny_bert_dir))  # fmt: skip

    everything = [batch["input_ids"] for batch in loader()]  # one pass of a fresh loader: the reference
    assert len(everything) >= 6
    for held in (2, len(everything) - 1):
        stream = loader()
        held_out = []
        for batch in stream:
            held_out.append(batch)
            if len(held_out) == held:
                break
        expected = everything[held:] * 2  # two passes, each without the held-out batches
        got = training_batches(stream, held_out, "corpus c")
        for index, ids in enumerate(expected):
            assert torch.equal(next(got)["input_ids"], ids), (held, index)
    stream = loader()
    held_out = list(stream)
    with pytest.raises(ValueError, match=f"corpus c has no batches left after the {len(everything)} held out"):
        next(training_batches(stream, held_out, "corpus c"))


def test_an_encoder_saved_in_bf16_gets_a_head_fitted_in_fp32(tiny_bert_dir, tmp_path):
    """transformers 5 loads weights in the dtype they were saved in: a bf16 encoder's new head was made and
    trained in bf16."""
    from transformers import AutoModel, AutoTokenizer

    from dist_kd.mlm import MlmHead

    AutoModel.from_pretrained(tiny_bert_dir).to(torch.bfloat16).save_pretrained(tmp_path / "half")
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / "half")
    head = MlmHead(tmp_path / "half")
    assert {parameter.dtype for parameter in head.model.parameters()} == {torch.float32}


def test_families_whose_head_sits_on_the_model_are_fitted_too(tmp_path):
    """DistilBERT, ELECTRA and ModernBERT keep their masked-LM head's layers on the model itself (no cls or
    lm_head module): mlm-head refused them ("found no masked-LM head") after loading the model and the corpus,
    while augment reads them."""
    from transformers import AutoTokenizer

    from dist_kd.mlm import MlmHead
    from dist_kd.testing import build_tiny_encoder

    for family in ("distilbert", "electra", "modernbert"):
        encoder = build_tiny_encoder(tmp_path / family, family, num_layers=2)
        head = MlmHead(encoder)
        batch = AutoTokenizer.from_pretrained(encoder)(["the cat sat on the mat", "a bank"], padding=True,
                                                       return_tensors="pt")  # fmt: skip
        positions = batch["attention_mask"].bool()
        positions[:, 0] = False
        logits = head.logits_at(batch["input_ids"], batch["attention_mask"], positions)
        assert logits.shape == (int(positions.sum()), head.model.config.vocab_size)
        logits.float().logsumexp(-1).sum().backward()
        trained = {id(p) for p in head.head_parameters}
        assert all(p.grad is not None for p in head.head_parameters), family
        assert all(p.grad is None for p in head.model.parameters() if id(p) not in trained), family


def test_batches_without_a_masked_position_are_passed_over_and_said(tiny_bert_dir, tiny_corpus, tmp_path):
    """A batch with no position masked gave a nan training loss (written as NaN, which JSON readers refuse),
    and held-out batches without one a loss of 0.0 over no positions, which read as a perfect head."""
    from dist_kd.mlm import MlmHeadConfig, fit_mlm_head

    base = dict(encoder=str(tiny_bert_dir), shards=str(tiny_corpus / "shards"), steps=4, batch_size=1,
                eval_batches=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"the 1 held-out batches have no masked position \(--mask-prob 1e-06"):
        fit_mlm_head(MlmHeadConfig(**base, mask_prob=1e-6, output=str(tmp_path / "none")), progress=False)
    assert not (tmp_path / "none").exists()
    # 2 % of about 30 maskable pieces: about half the one-sequence batches have no masked position (seeded)
    some = MlmHeadConfig(**{**base, "eval_batches": 8, "steps": 8}, mask_prob=0.02, output=str(tmp_path / "some"))
    result = fit_mlm_head(some, progress=False)
    written = json.loads((tmp_path / "some" / "mlm.json").read_text(), parse_constant=pytest.fail)  # no NaN
    assert written["held_out_after"]["positions"] == result["held_out_before"]["positions"] > 0
    assert 1 <= written["steps_without_masked_positions"] < 8
    assert written["last_train_loss"] > 0


def test_a_learning_rate_that_is_not_finite_or_a_head_that_diverged_is_refused_and_nothing_written(
    tiny_bert_dir, tiny_corpus, tmp_path
):
    """--lr inf passed the "> 0" check, trained to nan, saved the head and printed "loss": NaN with exit 0."""
    from dist_kd.mlm import MlmHeadConfig, fit_mlm_head

    common = ["--encoder", str(tiny_bert_dir), "--shards", str(tiny_corpus / "shards"), "--output", str(tmp_path / "o")]
    for lr in ("inf", "nan", "-1"):
        proc = run_script("launch/mlm_head.py", *common, "--lr", lr, check=False)
        assert proc.returncode == 2 and "argument --lr: expected a finite number > 0" in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got inf"):
        MlmHeadConfig(encoder=str(tiny_bert_dir), shards=str(tiny_corpus / "shards"), output="o", lr=float("inf"))
    shards, out = str(tiny_corpus / "shards"), tmp_path / "o"
    cfg = MlmHeadConfig(encoder=str(tiny_bert_dir), shards=shards, output=str(out), steps=4, batch_size=8,
                        eval_batches=2, lr=1e30)  # fmt: skip
    with pytest.raises(ValueError, match=r"held-out loss is nan after 4 steps at --lr 1e\+30: training diverged"):
        fit_mlm_head(cfg, progress=False)
    assert not (tmp_path / "o").exists()


def test_a_seed_no_generator_takes_or_a_held_out_part_past_the_corpus_is_named(tiny_bert_dir, tiny_corpus, tmp_path):
    """--seed 2**64-1 ended as "Overflow when unpacking long long" after the encoder loaded; --eval-batches
    beyond the corpus held all of it out and was said after a whole evaluation as "no batches left after the
    71 held out", naming no flag."""
    from dist_kd.mlm import MlmHeadConfig, fit_mlm_head

    base = {"encoder": str(tiny_bert_dir), "shards": str(tiny_corpus / "shards"), "output": str(tmp_path / "o")}
    for seed in (2**64 - 1, -1, 2**63 - 1):
        with pytest.raises(ValueError, match=rf"^seed \(--seed\) must be a whole number in 0..2\*\*63-2, got {seed}$"):
            MlmHeadConfig(**base, seed=seed)
    MlmHeadConfig(**base, seed=2**63 - 2)
    with pytest.raises(ValueError, match=r"^--eval-batches 100000 holds out the whole corpus .* \((\d+) batches of "):
        fit_mlm_head(MlmHeadConfig(**base, eval_batches=100_000, batch_size=4, steps=2), progress=False)
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_that_ships_its_head_is_fitted_from_that_head_and_says_so(tiny_bert_dir, tiny_corpus, tmp_path):
    """A full BERT checkpoint (with its masked-LM head) had that head loaded and trained on while mlm.json and the
    docs called held_out_before the untrained head's figures."""
    import shutil

    from transformers import AutoModelForMaskedLM

    from dist_kd.mlm import MlmHead, MlmHeadConfig, fit_mlm_head

    assert MlmHead(tiny_bert_dir).head_from_checkpoint is False
    with_head = tmp_path / "with-head"
    torch.manual_seed(7)
    AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).save_pretrained(with_head)
    for path in tiny_bert_dir.iterdir():
        if "token" in path.name or path.name == "vocab.txt":
            shutil.copy(path, with_head / path.name)
    saved = AutoModelForMaskedLM.from_pretrained(with_head).cls.predictions.transform.dense.weight
    head = MlmHead(with_head, seed=0)
    assert head.head_from_checkpoint is True
    torch.testing.assert_close(head.model.cls.predictions.transform.dense.weight, saved, rtol=0, atol=0)
    settings = {"shards": str(tiny_corpus / "shards"), "steps": 2, "batch_size": 4, "eval_batches": 1}
    fresh = fit_mlm_head(MlmHeadConfig(encoder=str(tiny_bert_dir), output=str(tmp_path / "a"), **settings), False)
    kept = fit_mlm_head(MlmHeadConfig(encoder=str(with_head), output=str(tmp_path / "b"), **settings), False)
    assert (fresh["head"], kept["head"]) == ("fresh", "checkpoint")
    assert json.loads((tmp_path / "b" / "mlm.json").read_text())["head"] == "checkpoint"
