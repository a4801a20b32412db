"""Pieces of the task stage: tokenised rows, the multi-task sampler, task heads and their export, the masked
prediction loss, and the task-run config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_kd.config import load_config
from dist_kd.data.encode import pad_rows, tokenize_rows
from dist_kd.data.multitask import TaskSampler
from dist_kd.losses import prediction_loss
from dist_kd.testing import random_sentences
from dist_kd.train.task_config import TaskConfig

# ---------------------------------------------------------------------------------------------- encoding


def test_tokenize_rows_equals_the_tokenizer_row_by_row(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    text_a = random_sentences(9, seed=1)
    text_b = [None if i % 3 else s.upper() for i, s in enumerate(random_sentences(9, seed=2))]
    rows = tokenize_rows(tokenizer, text_a, text_b, max_length=16)
    assert len(rows) == 9
    for i, (a, b) in enumerate(zip(text_a, text_b, strict=True)):
        expected = tokenizer(a, b, truncation=True, max_length=16, return_token_type_ids=True)
        assert rows.row(i).tolist() == expected["input_ids"]
        start, stop = rows.offsets[i], rows.offsets[i + 1]
        assert rows.types[start:stop].tolist() == expected["token_type_ids"]
    assert rows.lengths.tolist() == [len(rows.row(i)) for i in range(9)]


def test_pad_rows_right_pads_with_a_mask(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rows = tokenize_rows(tokenizer, ["a b c d e f", "a", "x y"], ["one two", None, None], max_length=32)
    batch = pad_rows(rows, [1, 0], pad_id=0)
    width = int(rows.lengths.max())
    assert batch["input_ids"].shape == (2, width) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == [rows.lengths[1], rows.lengths[0]]
    assert batch["input_ids"][0, : rows.lengths[1]].tolist() == rows.row(1).tolist()
    assert (batch["input_ids"][0, rows.lengths[1] :] == 0).all()
    assert batch["token_type_ids"][1].max() == 1  # the pair's second segment


# ----------------------------------------------------------------------------------------------- sampler


def _drain(sampler: TaskSampler, count: int) -> list[tuple[int, list[int]]]:
    return [(task, rows.tolist()) for task, rows in (sampler.next() for _ in range(count))]


def test_sampler_draws_tasks_in_proportion_to_their_weights():
    sampler = TaskSampler([100, 300], [1.0, 3.0], seed=0, rows_per_batch=4)
    tasks = np.array([task for task, _ in _drain(sampler, 4000)])
    share = (tasks == 1).mean()
    # Binomial(4000, 0.75): standard deviation 0.0068; 5 of them.
    assert abs(share - 0.75) < 0.035


def test_sampler_visits_every_row_once_per_task_epoch_and_ranks_split_batches():
    sizes = [10, 7]
    sampler = TaskSampler(sizes, [1.0, 1.0], seed=3, rows_per_batch=4)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for task, rows in _drain(sampler, 60):
        assert len(rows) == 4
        seen[task].extend(rows)
    for task, size in enumerate(sizes):
        rows = seen[task]
        for epoch in range(len(rows) // size):
            assert sorted(rows[epoch * size : (epoch + 1) * size]) == list(range(size)), (task, epoch)
        # Epochs are reshuffled.
        assert rows[:size] != rows[size : 2 * size]


def test_sampler_resumes_exactly_and_refuses_other_data():
    straight = TaskSampler([13, 5, 8], [2.0, 1.0, 1.0], seed=7, rows_per_batch=3)
    expected = _drain(straight, 50)
    first = TaskSampler([13, 5, 8], [2.0, 1.0, 1.0], seed=7, rows_per_batch=3)
    head = _drain(first, 21)
    state = first.state_dict()
    resumed = TaskSampler([13, 5, 8], [2.0, 1.0, 1.0], seed=7, rows_per_batch=3)
    resumed.load_state_dict(state)
    assert head + _drain(resumed, 29) == expected
    with pytest.raises(ValueError, match="training rows changed"):
        TaskSampler([13, 6, 8], [2.0, 1.0, 1.0], seed=7, rows_per_batch=3).load_state_dict(state)


# ------------------------------------------------------------------------------------------------- heads


@pytest.mark.parametrize(
    "arch, style",
    [
        ("bert", "pooled"),
        ("roberta", "sequence"),
        ("mpnet", "sequence"),
        ("deberta-v2", "context"),
        ("electra", "sequence"),
        ("distilbert", "pre_classifier"),
        ("modernbert", "prediction_head"),
        ("modernbert-mean", "prediction_head"),
    ],
)
def test_task_heads_export_as_stock_classifiers_with_the_same_logits(arch, style, tiny_bert_dir, tmp_path):
    """Each family's head computes its stock classifier's logits (padding in the batch: ModernBERT's mean
    pooling reads the real tokens alone), and exports as that classifier."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from dist_kd.models.heads import MultiTaskStudent
    from dist_kd.testing import build_tiny_encoder

    if arch == "bert":
        model_dir = tiny_bert_dir
    elif arch == "modernbert-mean":
        model_dir = build_tiny_encoder(tmp_path / "encoder", "modernbert", classifier_pooling="mean")
    else:
        model_dir = build_tiny_encoder(tmp_path / "encoder", arch)
    encoder = AutoModel.from_pretrained(model_dir)
    student = MultiTaskStudent(encoder, {"topic": (3, ["a", "b", "c"]), "score": (1, None)}).eval()
    assert {head.style for head in student.heads.values()} == {style}
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    for task, num_outputs in (("topic", 3), ("score", 1)):
        logits = student(task, ids, mask)
        assert logits.shape == (3, num_outputs)
        student.export_task(task, tmp_path / task)
        loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / task).eval()
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits)
    assert loaded.config.problem_type == "regression"
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "topic").config.id2label == {
        0: "a",
        1: "b",
        2: "c",
    }


@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta-v2", "distilbert", "modernbert"])
def test_in_training_idle_heads_get_zero_gradients_and_draw_no_dropout(arch, tiny_bert_dir, tmp_path):
    """ZeRO-3 re-used the last gradient of a head that took no part in a step; every head now gets one, zero
    for the idle ones. The active head's logits, and the random stream (its dropout masks), are unchanged."""
    from transformers import AutoModel

    from dist_kd.models.heads import MultiTaskStudent
    from dist_kd.testing import build_tiny_encoder

    model_dir = tiny_bert_dir if arch == "bert" else build_tiny_encoder(tmp_path / "encoder", arch)
    tasks = {"topic": (3, ["a", "b", "c"]), "score": (1, None), "pair": (2, ["x", "y"])}
    student = MultiTaskStudent(AutoModel.from_pretrained(model_dir), tasks, dropout=0.3).train()
    ids, mask = torch.randint(5, 100, (4, 9)), torch.ones(4, 9, dtype=torch.long)
    torch.manual_seed(3)
    reference = student.heads["topic"](student.encoder(input_ids=ids, attention_mask=mask, return_dict=True))
    after_reference = torch.get_rng_state()
    torch.manual_seed(3)
    logits = student("topic", ids, mask)
    assert torch.equal(logits, reference) and torch.equal(torch.get_rng_state(), after_reference)
    assert all(head.training for head in student.heads.values())
    logits.square().sum().backward()
    for name, param in student.heads.named_parameters():
        assert param.grad is not None, name
        if name.startswith("topic."):
            assert param.grad.abs().sum() > 0, name
        else:
            assert torch.count_nonzero(param.grad) == 0, name
    student.zero_grad(set_to_none=True)
    student.eval()  # evaluation runs the asked head alone
    student("topic", ids, mask).sum().backward()
    assert all(param.grad is None for name, param in student.heads.named_parameters() if not name.startswith("topic."))
    # The export carries the head's dropout as trained (its config left classifier_dropout empty).
    from dist_kd.models.heads import HEAD_DROPOUT_FIELDS

    exported = student.task_model("topic")
    assert {getattr(exported.config, name) for name in HEAD_DROPOUT_FIELDS.get(arch, ("classifier_dropout",))} == {0.3}
    # the rate is the head's own dropout module's, in training and in the export (DeBERTa's was left at 0.0)
    head_rates = {
        m.p
        for name, m in exported.named_modules()
        if "Dropout" in type(m).__name__ and not name.startswith(exported.base_model_prefix)
    }
    assert head_rates == {0.3}, head_rates
    # A diverged idle head (inf weights) leaves the active task alone: 0 x inf was NaN in its logits and loss.
    student.train()
    with torch.no_grad():
        for param in student.heads["score"].parameters():
            param.fill_(float("inf"))
    student.zero_grad(set_to_none=True)
    logits = student("topic", ids, mask)
    assert torch.isfinite(logits).all()
    logits.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in student.encoder.parameters() if p.grad is not None)


def test_a_student_saved_in_fp16_gives_fp32_heads_and_fp32_exports(tmp_path):
    """transformers builds from_config models in config.dtype: a student.path saved in fp16 (or a teacher that
    a student is derived from) gave fp16 task heads beside the fp32 encoder (an fp32 run crashed on "mat1 and
    mat2 must have the same dtype"), fp16 exported classifiers and fp16 random-init comparison students."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, BertModel

    from dist_kd.models.heads import MultiTaskStudent
    from dist_kd.models.student import StudentConfig, build_student
    from dist_kd.testing import build_tiny_tokenizer, tiny_bert_config

    source = tmp_path / "fp16"
    torch.manual_seed(0)
    BertModel(tiny_bert_config(num_layers=2)).half().save_pretrained(source)
    build_tiny_tokenizer(source)
    assert json.loads((source / "config.json").read_text())["dtype"] == "float16"

    encoder = build_student(StudentConfig(path=str(source), dropout=0.0), None)
    student = MultiTaskStudent(encoder, {"topic": (3, ["a", "b", "c"])}).eval()
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones_like(ids)
    logits = student("topic", ids, mask)
    student.export_task("topic", tmp_path / "topic")
    assert json.loads((tmp_path / "topic" / "config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in load_file(tmp_path / "topic" / "model.safetensors").values()} == {torch.float32}
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "topic").eval()
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, logits)

    cut = StudentConfig(num_layers=1, hidden_size=16, num_heads=4, intermediate_size=32)
    derived = build_student(cut, AutoConfig.from_pretrained(source))
    assert {p.dtype for p in AutoModel.from_config(derived.config).parameters()} == {torch.float32}


def test_a_task_export_draws_nothing_from_the_global_generator(tiny_bert_dir, tmp_path):
    """The classifier export_task builds (and overwrites) drew its random init from the CPU generator that draws a
    CPU run's dropout masks: a best/ export mid-run moved every later mask (eval.every changed the model trained,
    and a resume that kept a best/ of the lost steps went another way)."""
    from transformers import AutoModel

    from dist_kd.models.heads import MultiTaskStudent

    student = MultiTaskStudent(AutoModel.from_pretrained(tiny_bert_dir), {"topic": (3, ["a", "b", "c"])}).eval()
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    student.export_task("topic", tmp_path / "topic")
    student.task_model("topic")
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ losses


def test_masked_hard_loss_is_the_mean_over_labelled_rows_only():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    probs = torch.softmax(torch.randn(5, 3), dim=-1)
    labels = torch.tensor([2, -1, 0, -1, 1])
    mask = labels >= 0
    out = prediction_loss(logits, probs, labels, soft_weight=0.4, hard_weight=0.6, label_mask=mask)
    log_p = torch.log_softmax(logits.detach(), dim=-1)
    soft_ref = -(probs * log_p).sum(1).mean()
    hard_ref = -(log_p[0, 2] + log_p[2, 0] + log_p[4, 1]) / 3
    torch.testing.assert_close(out["soft"], soft_ref)
    torch.testing.assert_close(out["hard"], hard_ref)
    torch.testing.assert_close(out["loss"], 0.4 * soft_ref + 0.6 * hard_ref)
    out["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_masked_regression_and_a_batch_without_labels():
    logits = torch.tensor([[0.5], [1.0], [2.0]], requires_grad=True)
    values = torch.tensor([1.0, float("nan"), 0.0])
    out = prediction_loss(logits, None, values, hard_weight=1.0, task_type="regression",
                          label_mask=~torch.isnan(values))  # fmt: skip
    torch.testing.assert_close(out["hard"], torch.tensor(((0.5 - 1.0) ** 2 + (2.0 - 0.0) ** 2) / 2))
    empty = prediction_loss(logits, None, values, hard_weight=1.0, task_type="regression",
                            label_mask=torch.zeros(3, dtype=torch.bool))  # fmt: skip
    assert empty["loss"].item() == 0.0
    empty["loss"].backward()  # still a graph through the logits
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert F.mse_loss(torch.zeros(1), torch.zeros(1)) == 0  # the reference itself is sane


# ------------------------------------------------------------------------------------------------ config


def _task_config(tmp_path, text: str, overrides: list[str] | None = None) -> TaskConfig:
    path = tmp_path / "task.yaml"
    path.write_text(text)
    return load_config(TaskConfig, path, overrides)


GOOD = """
student: {path: S}
tasks:
  - {name: topic, labels: [a, b], soft_targets: ST}
  - {name: stsb, train: T}
"""


def test_config_reads_tasks_and_glue_defaults(tmp_path):
    cfg = _task_config(tmp_path, GOOD, ["train.epochs=2", "distill.hard_weight=0.5"])
    topic, stsb = cfg.tasks
    assert topic.spec().labels == ["a", "b"] and topic.spec().metric == "accuracy"
    assert stsb.spec().type == "regression" and stsb.spec().metric == "pearson"
    assert stsb.spec().text_a == "sentence1" and stsb.spec().text_b == "sentence2"
    assert cfg.train.epochs == 2 and cfg.distill.hard_weight == 0.5 and cfg.distill.phase == "prediction"


def test_both_target_weights_at_zero_are_refused_only_where_a_task_has_soft_targets(tmp_path):
    """Tasks of hard labels alone train at weight 1 whatever the two weights: a run of such tasks with both at 0
    was refused as having nothing to learn from."""
    zero = ["distill.soft_weight=0", "distill.hard_weight=0"]
    hard_only = "student: {path: S}\ntasks:\n  - {name: stsb, train: T}\n"
    assert _task_config(tmp_path, hard_only, zero).distill.soft_weight == 0
    with pytest.raises(ValueError, match=r"both 0: the tasks with soft targets \(\['topic'\]\) have nothing to learn"):
        _task_config(tmp_path, GOOD, zero)
    assert _task_config(tmp_path, GOOD, [*zero, "distill.phase=intermediate", "teacher.path=T"])  # no targets read


def test_a_resume_names_another_dropout_clipping_or_teacher_precision(tmp_path, caplog):
    """They change how the student runs and steps (and, in phase intermediate, the teacher's targets): a resume
    with other values was accepted without a word."""
    from dist_kd.train.checkpoint import check_changeable
    from dist_kd.train.task import objective_meta

    phase = ["distill.phase=intermediate", "teacher.path=T"]
    before = _task_config(tmp_path, GOOD, phase)
    changed = ["student.dropout=0.2", "student.head_dropout=0", "train.clip=0.5", "teacher.dtype=bf16"]
    after = _task_config(tmp_path, GOOD, [*phase, *changed])
    saved, now = objective_meta(before, "intermediate"), objective_meta(after, "intermediate")
    caplog.set_level("WARNING")
    check_changeable({**saved, "step": 4}, now, tmp_path / "step-00000004")
    assert "student.dropout None -> 0.2, student.head_dropout None -> 0.0, train.clip 1.0 -> 0.5, " in caplog.text
    assert "teacher.dtype fp16 -> bf16" in caplog.text
    assert "teacher.dtype" not in objective_meta(before, "prediction")["changeable"]  # no teacher runs there


def test_keys_of_the_other_phase_are_said_to_do_nothing(tmp_path, caplog):
    """distill.weights.pred=3 or a layer map in phase prediction ran with exit 0, no word, and the same losses. The
    trainer says it (dist-kd export, which loads a finished run's config again, does not)."""
    caplog.set_level("WARNING")
    cfg = _task_config(tmp_path, GOOD, ["distill.hard_weight=0.5", "distill.temperature=2"])
    assert cfg.distill.other_phase_note() is None  # the keys phase prediction reads
    cfg = _task_config(tmp_path, GOOD, ["distill.weights.pred=3", "distill.layer_map=top", "distill.hard_weight=0.5"])
    assert cfg.distill.other_phase_note() == (
        "distill.layer_map, distill.weights: read in phase intermediate only; this run (phase prediction) does not "
        "use them"
    )
    cfg = _task_config(tmp_path, GOOD, ["distill.phase=intermediate", "distill.temperature=2", "distill.layer_map=top"])
    assert cfg.distill.other_phase_note() == (
        "distill.temperature: read in phase prediction only; this run (phase intermediate) does not use it"
    )
    assert not caplog.records  # loading a config says nothing


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("student: {path: S}\ntasks: []\n", "list at least one task"),
        ("tasks: [{name: a, labels: [x, y]}]\n", "give train .* or soft_targets"),
        ("tasks: [{name: a, labels: [x], train: T}]\n", "at least 2 labels"),
        ("tasks: [{name: a, labels: [x, y], train: T}, {name: a, labels: [x, y], train: T}]\n", "more than once"),
        # two spellings of one GLUE task would share its head, best/ and eval.json entry
        ("tasks: [{name: sst2, train: T}, {name: SST-2, train: T}]\n",
         r"the names \['sst2'\] appear more than once \(as \['sst2', 'SST-2'\]\)"),
        ("tasks: [{name: a, labels: [x, y], train: T, weight: 2}, {name: b, labels: [x, y], train: T}]\n",
         "weight to every task or to none"),
        ("tasks: [{name: a, labels: [x, y], train: T, wieght: 2}]\n", "did you mean 'tasks\\[0\\].weight'"),
        # text_A was "did you mean 'tasks[0].text_b'": case was a difference like any other
        ("tasks: [{name: a, labels: [x, y], train: T, text_A: t}]\n", "did you mean 'tasks\\[0\\].text_a'"),
        # a name that one of its section's holds
        ("tasks: [{name: a, labels: [x, y], train: T, dev_data: D}]\n", "did you mean 'tasks\\[0\\].dev'"),
        ("tasks: [{name: a, labels: [x, y], train: T}]\ndistill: {soft: 1}\n", "did you mean 'distill.soft_weight'"),
        # the heads' ModuleDict raised KeyError "attribute 'type' already exists" after the data had loaded
        ("tasks: [{name: type, labels: [x, y], train: T}]\n", r"task 'type': the name is taken by torch's ModuleDict"),
        ("tasks: [{name: eval, labels: [x, y], train: T}]\n", r"rename the task \(e.g. 'eval_task'\)"),
        # an instance's attributes too (training, _modules), which dir() of the class leaves out
        ("tasks: [{name: training, labels: [x, y], train: T}]\n", r"task 'training': the name is taken"),
        ("tasks: [{name: _modules, labels: [x, y], train: T}]\n", r"task '_modules': the name is taken"),
        # '.' ended the run in a traceback from torch's ModuleDict, '/' nested best/<name>/ in directories
        ("tasks: [{name: mnli.m, labels: [x, y], train: T}]\n", "task 'mnli.m': a task name may not contain '.'"),
        ("tasks: [{name: a/b, labels: [x, y], train: T}]\n", "task 'a/b': a task name may not contain '/'"),
        ("tasks: [{name: a, labels: [x, y], train: T}]\ndistill: {phase: both}\n", "distill.phase must be one of"),
        ("tasks: [{name: a, labels: [x, y], soft_targets: S}]\ndistill: {soft_weight: 0}\n", "both 0"),
        # a metric of the other type failed only at the first evaluation, an epoch into the run
        ("tasks: [{name: a, labels: [x, y], train: T, metric: pearson}]\n",
         "tasks\\[0\\]: task 'a': metric 'pearson' does not apply to a classification task"),
        ("tasks: [{name: s, type: regression, train: T, metric: f1}]\n", "'f1' does not apply to a regression task"),
        ("tasks: [{name: stsb, train: T, metric: accuracy}]\n", "'accuracy' does not apply to a regression task"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        _task_config(tmp_path, text)


def test_a_train_file_beside_a_soft_target_store_is_named_as_unread(tmp_path, caplog):
    """The store's rows are the training rows: a train file beside it was never read, without a word. Configs
    (and run directories) of earlier releases have both, so it is a warning, not an error."""
    import logging

    with caplog.at_level(logging.WARNING, logger="dist_kd.train.task_config"):
        cfg = _task_config(tmp_path, "tasks: [{name: a, labels: [x, y], train: T, soft_targets: S}]\n")
    assert cfg.tasks[0].soft_targets and "task 'a': train " in caplog.text and "is not read" in caplog.text


# ------------------------------------------------------------------------------------------------ store temperature


def _store(tmp_path, temperature: float, keep_logits: bool, labels: tuple = (0, 1, 2, 0)):
    import pyarrow as pa

    from dist_kd.data import soft_targets as st
    from dist_kd.losses import ensemble_probs

    logits_NKC = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1))
    probs = ensemble_probs(logits_NKC.transpose(0, 1), temperature).numpy()
    examples = pa.table({"example_id": [f"t-{i}" for i in range(4)], "text_a": ["a b", "c d", "e f", "g h"],
                         "text_b": pa.array([None] * 4, pa.string()),
                         "label": pa.array(list(labels), pa.int64())})  # fmt: skip
    rows = st.build_rows(examples, "topic", probs, logits_NKC.numpy() if keep_logits else None, "classification")
    metadata = st.StoreMetadata(
        task="topic", task_type="classification", label_names=["x", "y", "z"], temperature=temperature,
        teachers=[{"path": "t1", "sha256": "0"}, {"path": "t2", "sha256": "1"}], source_data={"path": "d"},
        has_teacher_logits=keep_logits,
    )  # fmt: skip
    directory = tmp_path / f"store-{temperature}-{keep_logits}-{sum(label is not None for label in labels)}"
    st.write_soft_targets(rows, directory, metadata)
    return directory, logits_NKC


def test_store_targets_follow_the_students_temperature(tmp_path, tiny_tokenizer_dir):
    from dist_kd.data.multitask import load_task_data
    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.data.tokenizer import load_tokenizer
    from dist_kd.losses import ensemble_probs

    spec = resolve_task_spec("topic", labels=["x", "y", "z"], text_a="text_a")
    tokenizer = load_tokenizer(tiny_tokenizer_dir)

    def load(store, temperature):
        return load_task_data(spec, train=None, soft_targets=str(store), dev=None, tokenizer=tokenizer,
                              max_length=16, need_labels=True, temperature=temperature)  # fmt: skip

    plain, _ = _store(tmp_path, 2.0, keep_logits=False)
    assert load(plain, 2.0).soft.shape == (4, 3)  # same t: used as stored
    with pytest.raises(ValueError, match=r"at temperature 2, but distill.temperature is 1 .*--temperature 1"):
        load(plain, 1.0)

    with_logits, logits_NKC = _store(tmp_path, 2.0, keep_logits=True)
    recomputed = load(with_logits, 4.0).soft
    np.testing.assert_allclose(recomputed, ensemble_probs(logits_NKC.transpose(0, 1), 4.0).numpy(), rtol=1e-6)
    # Different from the stored t=2 targets, so the recomputation is not a no-op.
    assert not np.allclose(recomputed, load(with_logits, 2.0).soft, atol=1e-3)


def _load(spec, tokenizer, **kw):
    from dist_kd.data.multitask import load_task_data

    return load_task_data(spec, dev=None, tokenizer=tokenizer, max_length=16, **({"train": None, "soft_targets": None,
                          "need_labels": True} | kw))  # fmt: skip


def test_hard_weight_on_a_store_without_any_label_is_an_error(tmp_path, tiny_tokenizer_dir):
    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.data.tokenizer import load_tokenizer

    spec = resolve_task_spec("topic", labels=["x", "y", "z"], text_a="text_a")
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    unlabelled, _ = _store(tmp_path, 1.0, keep_logits=False, labels=(None,) * 4)
    with pytest.raises(ValueError, match=r"task 'topic': distill.hard_weight is 0.5 but none of the 4 training rows "
                                         r".* has a label.*set distill.hard_weight: 0"):  # fmt: skip
        _load(spec, tokenizer, soft_targets=str(unlabelled), hard_weight=0.5)
    assert _load(spec, tokenizer, soft_targets=str(unlabelled), hard_weight=0.0).has_label.sum() == 0
    # Augmented rows have no label: one labelled row is enough, the hard term averages over the labelled rows.
    some, _ = _store(tmp_path, 1.0, keep_logits=False, labels=(2, None, None, None))
    data = _load(spec, tokenizer, soft_targets=str(some), hard_weight=0.5)
    assert data.has_label.tolist() == [True, False, False, False] and data.labels[0] == 2


def test_hard_label_training_file_without_the_label_column_names_it(tmp_path, tiny_tokenizer_dir):
    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.data.tokenizer import load_tokenizer

    spec = resolve_task_spec("topic", labels=["x", "y"], text_a="text")
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    path = tmp_path / "train.csv"
    path.write_text("text,category\na b,x\nc d,y\n")
    with pytest.raises(ValueError, match=r"train.csv has no column 'label' \(label of task 'topic'\); columns found: "
                                         r"\['text', 'category'\]\. Map the column with --label or the task config's "
                                         r"'label' key"):  # fmt: skip
        _load(spec, tokenizer, train=str(path))
    assert _load(spec, tokenizer, train=str(path), need_labels=False).has_label.tolist() == [False, False]


def test_store_of_the_other_task_type_is_named_as_such(tmp_path, tiny_tokenizer_dir):
    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    store, _ = _store(tmp_path, 1.0, keep_logits=False)
    # A classification store given to a regression task was reported as a label list other than [].
    spec = resolve_task_spec("topic", type="regression", text_a="text_a")
    with pytest.raises(ValueError, match=r"holds a classification task, but task 'topic' is regression"):
        _load(spec, tokenizer, soft_targets=str(store))


def test_store_given_as_hard_label_training_data_says_where_it_belongs(tmp_path, tiny_tokenizer_dir):
    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.data.tokenizer import load_tokenizer

    spec = resolve_task_spec("topic", labels=["x", "y", "z"], text_a="text_a")
    store, _ = _store(tmp_path, 1.0, keep_logits=False)
    # It was read as a datasets directory: "neither a `Dataset` directory nor a `DatasetDict` directory".
    with pytest.raises(ValueError, match=r"task 'topic': train .* is a soft-target store .*give it as the task's "
                                         r"soft_targets"):  # fmt: skip
        _load(spec, load_tokenizer(tiny_tokenizer_dir), train=str(store))


def test_pairs_in_training_and_single_texts_in_dev_are_an_error(tmp_path, tiny_tokenizer_dir):
    from dist_kd.data.multitask import load_task_data
    from dist_kd.data.tasks import resolve_task_spec
    from dist_kd.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    spec = resolve_task_spec("topic", labels=["x", "y", "z"], text_a="text_a")
    kw = {"train": None, "tokenizer": tokenizer, "max_length": 16, "need_labels": True}
    single_store, _ = _store(tmp_path, 1.0, keep_logits=False)
    pairs_dev = tmp_path / "pairs_dev.jsonl"
    pairs_dev.write_text(
        '{"text_a": "a b", "text_b": "c d", "label": "x"}\n{"text_a": "e", "text_b": "f", "label": "y"}\n'
    )
    # The dev set was scored as pairs while the head learnt single texts (or the reverse), silently.
    with pytest.raises(ValueError, match=r"task 'topic': the training rows of .* are single texts but the dev rows "
                                         r"of .*pairs_dev.jsonl are sentence pairs \(column 'text_b'\)"):  # fmt: skip
        load_task_data(spec, soft_targets=str(single_store), dev=str(pairs_dev), **kw)
    pairs_train = tmp_path / "pairs_train.jsonl"
    pairs_train.write_text(pairs_dev.read_text())
    single_dev = tmp_path / "single_dev.jsonl"
    single_dev.write_text('{"text_a": "a b", "label": "x"}\n')
    kw["train"] = str(pairs_train)
    with pytest.raises(ValueError, match=r"are sentence pairs \(text_b\) but the dev rows of .*single_dev.jsonl are "
                                         r"single texts"):  # fmt: skip
        load_task_data(spec, soft_targets=None, dev=str(single_dev), **kw)
    assert load_task_data(spec, soft_targets=None, dev=str(pairs_dev), **kw).dev_rows is not None
    # A store made with --text-b beside a config with text_b: null named a column 'None'.
    import pyarrow as pa

    from dist_kd.data.multitask import check_pairs

    single = resolve_task_spec("topic", labels=["x", "y", "z"], text_a="text_a", text_b=None)
    with pytest.raises(ValueError, match=r"dev rows of dev.jsonl are single texts \(the task has no text_b\); set"):
        check_pairs(single, "store", pa.table({"text_b": ["b"]}), "dev.jsonl", pa.table({"text_b": pa.nulls(1)}))


def test_an_mpnet_head_dropout_that_cannot_apply_is_said_once(tmp_path, caplog):
    """MPNet's classification head reads the encoder's hidden dropout: student.head_dropout does not change it."""
    from transformers import AutoModel

    from dist_kd.models import heads
    from dist_kd.models.heads import MultiTaskStudent
    from dist_kd.testing import build_tiny_encoder

    heads._note_mpnet_head_dropout.cache_clear()
    encoder = AutoModel.from_pretrained(build_tiny_encoder(tmp_path / "mpnet", "mpnet"))
    MultiTaskStudent(encoder, {"a": (2, ["x", "y"]), "b": (1, None)})
    assert not caplog.records
    MultiTaskStudent(encoder, {"a": (2, ["x", "y"]), "b": (1, None)}, dropout=0.3)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "MPNet's classification head has no dropout of its own" in warned[0], warned


# ---------------------------------------------------------------------------------------------- epochs


@pytest.mark.parametrize(
    "saved, expected",
    [
        # this release's checkpoint, same rows per step: its origin kept (a run never changed counts from 0)
        (
            {"step": 40, "positions": [320, 320], "epochs_at": {"step": 0, "epoch": 0.0, "rows_per_step": 16}},
            {"step": 0, "epoch": 0.0},
        ),
        # 16 -> 32 rows a step at step 40: 40 steps of a 40-step epoch done (640 rows / 16), the rest from there
        (
            {"step": 40, "positions": [320, 320], "epochs_at": {"step": 0, "epoch": 0.0, "rows_per_step": 16}},
            {"step": 40, "epoch": 1.0, "rows_per_step": 32},
        ),
        # a second change: the epochs of the first origin carry on (step 10 at epoch 0.25, 30 steps of 20/epoch)
        (
            {"step": 40, "positions": [500, 300], "epochs_at": {"step": 10, "epoch": 0.25, "rows_per_step": 32}},
            {"step": 40, "epoch": 1.75, "rows_per_step": 16},
        ),
        # an earlier release's checkpoint (no origin): its rows per step from its rows drawn, 640 / 40
        ({"step": 40, "positions": [320, 320]}, {"step": 40, "epoch": 1.0, "rows_per_step": 32}),
        ({"step": 40, "positions": [640, 640]}, {"step": 0, "epoch": 0.0, "rows_per_step": 32}),
    ],
)
def test_epochs_are_counted_in_the_steps_that_trained_them(saved, expected, monkeypatch, tmp_path):
    """An epoch is ceil(rows / rows per step) steps; a resume with other rows per step counts the epochs done in
    the checkpoint's steps (train.epochs trained fewer epochs, or was refused, when counted in the new ones)."""
    from types import SimpleNamespace

    from dist_kd.train import checkpoint as ckpt
    from dist_kd.train.task import TaskTrainer

    rows_per_step = expected.get("rows_per_step", 16)
    trainer = SimpleNamespace(
        rows_per_step=rows_per_step, tasks=[SimpleNamespace(num_rows=400), SimpleNamespace(num_rows=240)],
        cfg=SimpleNamespace(train=SimpleNamespace(epochs=3)),
    )  # fmt: skip
    state = {"step": saved["step"], "sampler": {"positions": saved["positions"]}}
    if "epochs_at" in saved:
        state["epochs_at"] = saved["epochs_at"]
    monkeypatch.setattr(ckpt, "saved_trainer_state", lambda checkpoint: state)
    assert TaskTrainer._epochs_origin(trainer, None) == {"step": 0, "epoch": 0.0, "rows_per_step": rows_per_step}
    origin = TaskTrainer._epochs_origin(trainer, tmp_path)
    assert origin == pytest.approx({"rows_per_step": rows_per_step, **expected})


def test_a_max_length_with_no_room_for_text_names_the_setting(tiny_tokenizer_dir):
    """transformers returns rows uncut (it logs an error) when max_length is at most its special tokens: a
    batch then crashed mid-run, or trained at full length while the run recorded the cut."""
    from dist_kd.data.encode import tokenize_rows
    from dist_kd.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    long = "the game was good " * 20
    with pytest.raises(ValueError, match=r"of 2 pieces .* adds 2 special tokens to a text; give a longer one \(x\)"):
        tokenize_rows(tokenizer, [long], [None], 2, "x")
    with pytest.raises(ValueError, match=r"of 3 pieces .* adds 3 special tokens to a sentence pair.*--max-length"):
        tokenize_rows(tokenizer, [long, "a"], [None, long], 3)
    rows = tokenize_rows(tokenizer, [long, long], [None, long], 4)
    assert rows.lengths.tolist() == [4, 4]
