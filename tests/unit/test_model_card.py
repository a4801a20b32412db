"""Model cards: hub-readable YAML metadata, the facts and metrics given, and loading code."""

from __future__ import annotations

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
