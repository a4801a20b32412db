"""Model cards: hub-readable YAML metadata, the facts and metrics given, and loading code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dist_kd.model_card import classifier_load_snippet, model_card, write_model_card


def test_card_has_metadata_facts_metrics_and_loading_code(tmp_path):
    text = model_card(
        "a student",
        "What it is.",
        {"teacher": "t | with a bar", "steps": 300},
        {"accuracy": 0.91234, "skipped": None},
        classifier_load_snippet("runs/x/tasks/sst2"),
        pipeline_tag="text-classification",
    )
    front = text.split("---\n")[1]
    assert yaml.safe_load(front) == {
        "library_name": "transformers",
        "tags": ["distillation", "dist_kd"],
        "pipeline_tag": "text-classification",
    }
    assert "| teacher | t \\| with a bar |" in text and "| steps | 300 |" in text
    assert "| accuracy | 0.9123 |" in text and "skipped" not in text
    code = text.split("```python\n")[1].split("```")[0]
    compile(code, "card", "exec")  # the loading code is valid Python
    # the absolute path: a relative one (`dist-kd export --output exp`) loaded only from where the export ran
    assert f'pipeline("text-classification", model="{Path("runs/x/tasks/sst2").resolve()}")' in code
    path = write_model_card(tmp_path, text)
    assert path == tmp_path / "README.md" and path.read_text() == text


@pytest.mark.parametrize(
    ("attention", "folds", "said"),
    [("raw_scores", 5, "raw attention-score MSE"), ("relations", 3, "attention-relation KL (12 relation")],
)
def test_general_card_names_the_attention_loss_and_the_folds_the_run_used(tmp_path, attention, folds, said):
    """The card said "raw attention-score MSE" and "5-fold" whatever distill.attention and eval.folds were."""
    from types import SimpleNamespace

    from dist_kd.config import load_config
    from dist_kd.train.general import GeneralConfig, GeneralTrainer

    cfg = load_config(GeneralConfig, None, [f"distill.attention={attention}", f"eval.folds={folds}",
                                            "teacher.path=t", "data.shards=s"])  # fmt: skip
    shape = {"num_layers": 4, "hidden_size": 312, "num_heads": 12, "intermediate_size": 1200}
    trainer = SimpleNamespace(
        cfg=cfg, meta={"student": shape, "teacher": {**shape, "model_type": "bert"}}, mapping=[3, 6, 9, 12],
        manifest={"num_sequences": 10, "seq_len": 128}, step=5, global_batch=8, tokens_seen=5120, run_dir=tmp_path,
        sequences_seen=40, calibrated=True,
    )  # fmt: skip
    card = GeneralTrainer.model_card(trainer)
    assert said in card and f"attention {attention}" in card and f"a {folds}-fold linear probe" in card
    other = "attention-relation KL" if attention == "raw_scores" else "raw attention-score MSE"
    assert other not in card


def _general_card(tmp_path, overrides, **state):
    from types import SimpleNamespace

    from dist_kd.config import load_config
    from dist_kd.train.general import GeneralConfig, GeneralTrainer

    cfg = load_config(GeneralConfig, None, ["teacher.path=t", "data.shards=s", *overrides])
    shape = {"num_layers": 4, "hidden_size": 312, "num_heads": 12, "intermediate_size": 1200}
    trainer = SimpleNamespace(
        cfg=cfg, meta={"student": shape, "teacher": {**shape, "model_type": "bert"}}, mapping=[3, 6, 9, 12],
        manifest={"num_sequences": 10, "seq_len": 128}, step=20, global_batch=8, tokens_seen=3840, run_dir=tmp_path,
        **{"sequences_seen": 120, "calibrated": True, **state},
    )  # fmt: skip
    facts = {}
    for line in GeneralTrainer.model_card(trainer).splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2:
            facts[cells[0]] = cells[1]
    return facts


def test_general_card_names_only_the_terms_with_a_weight(tmp_path):
    """The card named every loss term whatever their weights (and said 'calibrated' where calibration was
    skipped, and counted steps x the batch at the end after a resume that changed the batch: below)."""
    facts = _general_card(tmp_path, ["distill.weights.attn=0", "distill.weights.embd=0"])
    assert facts["method"] == "TinyBERT general distillation: hidden-state MSE through the layer map g = [3, 6, 9, 12]"
    facts = _general_card(tmp_path, ["distill.weights.sentence=0.5"])
    every = "embedding MSE, hidden-state MSE, raw attention-score MSE, sentence-embedding MSE"
    assert facts["method"].startswith(f"TinyBERT general distillation: {every} through")


@pytest.mark.parametrize(
    ("calibrate", "calibrated", "said"),
    [
        ("true", True, "teacher (weight selection, calibrated)"),
        ("true", False, "teacher (weight selection, not calibrated: a pre-LN teacher)"),
        ("true", None, "teacher (weight selection, calibrated)"),  # a checkpoint of an earlier release
        ("false", None, "teacher (weight selection)"),
    ],
)
def test_general_card_says_whether_calibration_ran(tmp_path, calibrate, calibrated, said):
    facts = _general_card(tmp_path, ["student.init=teacher", f"student.calibrate={calibrate}"], calibrated=calibrated)
    assert facts["initialisation"] == said


def test_general_card_counts_the_sequences_trained_on(tmp_path):
    # 10 steps of 4 sequences, then 10 of 8 after a resume that changed the batch: 120, not 20 x 8
    assert _general_card(tmp_path, ["train.lr=1e-4"])["steps"] == "20: 120 sequences, 3840 tokens, lr 0.0001"
    earlier = _general_card(tmp_path, ["train.lr=1e-4"], sequences_seen=None)  # a checkpoint that counted none
    assert earlier["steps"] == "20: 20 x 8 sequences, 3840 tokens, lr 0.0001"


@pytest.mark.parametrize("phase", ["prediction", "intermediate"])
def test_task_card_says_which_tasks_learnt_soft_targets_and_which_their_labels_alone(tmp_path, phase):
    """The card gave soft / hard weights 1.0 / 0.0 for a run whose tasks had no store, and so trained on their
    hard labels at weight 1 (and gave them in the intermediate phase, which trains no prediction loss)."""
    from types import SimpleNamespace as Namespace

    from dist_kd.train.task import TaskTrainer

    def task(name, soft):
        spec = Namespace(name=name, type="classification", labels=["a", "b"])
        return Namespace(spec=spec, num_rows=10, source=f"{name}.jsonl", soft=soft)

    cfg = Namespace(student=Namespace(path="s", init="pretrained"), train=Namespace(lr=1e-4),
                    distill=Namespace(soft_weight=1.0, hard_weight=0.0, temperature=1.0))  # fmt: skip
    trainer = Namespace(cfg=cfg, phase=phase, tasks=[task("topic", object()), task("sentiment", None)], step=5,
                        global_batch=8, history=[], names=["topic", "sentiment"], run_dir=tmp_path)  # fmt: skip
    card = TaskTrainer.model_card(trainer, None)
    said = "| soft / hard weight | 1.0 / 0.0, temperature 1.0 (topic); hard labels alone (sentiment: no soft targets) |"
    assert (said in card) == (phase == "prediction") and ("soft / hard" in card) == (phase == "prediction")


def test_the_files_a_saved_model_holds_are_told_from_the_users(tmp_path):
    import json

    from dist_kd.model_card import saved_model_strangers

    model = tmp_path / "model"
    (model / "1_Pooling").mkdir(parents=True)
    (model / "2_Normalize").mkdir()
    (model / "modules.json").write_text(json.dumps([{"idx": 0, "path": "", "type": "t"},
                                                   {"idx": 1, "path": "1_Pooling", "type": "p"}]))  # fmt: skip
    for name in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "README.md", "vocab.txt",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spm.model", "task.json",
                 "mlm.json", "merges.txt", "vocab.json", "sentence_bert_config.json", ".hidden",
                 "notes.txt"):  # fmt: skip
        (model / name).write_text("x")
    (model / "config.json.bak").write_text("x")
    assert saved_model_strangers(model) == [".hidden", "2_Normalize", "config.json.bak", "mlm.json", "notes.txt"]
    assert saved_model_strangers(model, ["mlm.json", "notes.txt"]) == [".hidden", "2_Normalize", "config.json.bak"]
    (model / "modules.json").write_text("not json")  # its folders are then no longer known to be the model's
    assert "1_Pooling" in saved_model_strangers(model)
