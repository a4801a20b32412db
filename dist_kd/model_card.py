"""README.md model cards for every exported model directory: what it is, how it was made, how it scored,
and how to load it. The Hugging Face hub and ``huggingface_hub.ModelCard`` read the YAML block at the top."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_kd.io import atomic_path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value).replace("|", "\\|")


def model_card(
    title: str,
    summary: str,
    facts: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    load: str = "",
    pipeline_tag: str | None = None,
) -> str:
    """The card's Markdown: YAML metadata, a summary, a table of how it was made, metrics, loading code.

    Args:
        title: the heading.
        summary: a paragraph on what the model is.
        facts: training facts, in order (teacher, method, data, steps, ...).
        metrics: name -> value (None: left out).
        load: Python that loads the model (shown as a code block).
        pipeline_tag: the hub's task tag (``feature-extraction``, ``text-classification``).
    """
    meta = ["---", "library_name: transformers", "tags:", "- distillation", "- dist_kd"]
    if pipeline_tag:
        meta.append(f"pipeline_tag: {pipeline_tag}")
    meta.append("---")
    lines = [*meta, "", f"# {title}", "", summary, "", "## How it was made", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in facts.items()]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {_cell(value)} |" for name, value in metrics.items() if value is not None]
    if load:
        lines += ["", "## Loading", "", "```python", load.strip(), "```"]
    lines += ["", "Made with dist_kd (TinyBERT / MT-DNN-KD distillation on DeepSpeed).", ""]
    return "\n".join(lines)


# What save_pretrained, a tokenizer's save and the sentence-transformers modules write (with the card and a task
# run's task.json): an earlier output holds these alone.
_SAVED_MODEL_FILE = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|task|modules"
    r"|sentence_bert_config|config_sentence_transformers)\.json|README\.md|vocab\.txt|merges\.txt|[\w.-]+\.model"
    r"|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|pytorch_model(-\d+-of-\d+)?\.bin|pytorch_model\.bin\.index\.json"
)


def saved_model_strangers(directory: str | Path, own: Sequence[str] = ()) -> list[str]:
    """The names in ``directory`` that a saved model (a dist_kd export, a masked-LM head) would not hold, besides
    ``own``: a fine-tuning run's ``checkpoint-500/``, a hub clone's ``.git``, notes. They were deleted with the
    earlier output it replaced, with exit 0. The module folders its ``modules.json`` lists are the model's."""
    directory = Path(directory)
    modules: set[str] = set()
    try:
        listed = json.loads((directory / "modules.json").read_text())
        modules = {str(entry.get("path")) for entry in listed if isinstance(entry, dict) and entry.get("path")}
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return sorted(
        entry.name
        for entry in directory.iterdir()
        if entry.name not in own
        and not (entry.is_dir() and entry.name in modules)
        and not (entry.is_file() and _SAVED_MODEL_FILE.fullmatch(entry.name))
    )


def is_dist_kd_model(directory: str | Path) -> bool:
    """Whether ``directory`` is a model dist_kd wrote: its README.md is one of our cards (the ``dist_kd`` tag in
    its front matter). Such a directory may be replaced by a new export; anything else is the user's."""
    card = Path(directory) / "README.md"
    try:
        text = card.read_text(errors="replace")
    except OSError:
        return False
    if not text.startswith("---\n"):
        return False
    front = text[4:].split("\n---", 1)[0]
    return "- dist_kd" in front.splitlines()


def write_model_card(directory: str | Path, text: str) -> Path:
    """``directory/README.md``, atomically."""
    path = Path(directory) / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def encoder_load_snippet(directory: str | Path) -> str:
    directory = Path(directory).resolve()  # a relative one loads only from where the export ran
    return (
        "from transformers import AutoModel, AutoTokenizer\n\n"
        f'model = AutoModel.from_pretrained("{directory}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{directory}")'
    )


def classifier_load_snippet(directory: str | Path, pairs: bool = False) -> str:
    example = '{"text": "a first sentence", "text_pair": "a second one"}' if pairs else '"an example sentence"'
    directory = Path(directory).resolve()
    return (
        "from transformers import pipeline\n\n"
        f'classify = pipeline("text-classification", model="{directory}")\n'
        f"print(classify({example}))"
    )
