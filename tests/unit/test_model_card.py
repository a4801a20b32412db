"""Model cards: hub-readable YAML metadata, the facts and metrics given, and loading code."""

from __future__ import annotations

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
    assert 'pipeline("text-classification", model="runs/x/tasks/sst2")' in code
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
    )  # fmt: skip
    card = GeneralTrainer.model_card(trainer)
    assert said in card and f"attention {attention}" in card and f"a {folds}-fold linear probe" in card
    other = "attention-relation KL" if attention == "raw_scores" else "raw attention-score MSE"
    assert other not in card
