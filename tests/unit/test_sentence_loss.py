"""The sentence-embedding term (``distill.weights.sentence``): the student's pooled last layer against the
teacher's pooled layer g(M), checked against sums written out by hand, the known value of a common offset,
where its gradient goes, and its refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dist_kd.models.capture import EncoderFeatures
from dist_kd.models.student import SelectedDimensions
from dist_kd.objective import LossWeights, tinybert_objective

ONLY_SENTENCE = LossWeights(embd=0.0, hidden=0.0, attn=0.0, sentence=1.0)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
SELECTED = torch.tensor([0, 2, 4, 6])  # student dimension k against teacher dimension 2k


def _features(width: int, seed: int, requires_grad: bool = False) -> EncoderFeatures:
    generator = torch.Generator().manual_seed(seed)
    hidden = {n: torch.randn(3, 4, width, generator=generator) * n for n in (1, 2)}
    for tensor in hidden.values():
        tensor.requires_grad_(requires_grad)
    return EncoderFeatures(embeddings=torch.randn(3, 4, width, generator=generator), hidden=hidden, scores={})


def _by_hand(student: np.ndarray, teacher: np.ndarray, mask: np.ndarray, mode: str) -> tuple[float, float]:
    """(MSE of the pooled rows, mean over dimensions of the teacher's pooled variance across rows)."""
    rows_s, rows_t = [], []
    for b in range(mask.shape[0]):
        real = [i for i in range(mask.shape[1]) if mask[b, i]]
        if mode == "mean_tokens":
            rows_s.append(sum(student[b, i] for i in real) / len(real))
            rows_t.append(sum(teacher[b, i] for i in real) / len(real))
        elif mode == "cls_token":
            rows_s.append(student[b, 0])
            rows_t.append(teacher[b, 0])
        else:  # lasttoken
            rows_s.append(student[b, real[-1]])
            rows_t.append(teacher[b, real[-1]])
    pooled_s, pooled_t = np.stack(rows_s), np.stack(rows_t)
    mse = float(((pooled_s - pooled_t) ** 2).mean())
    centred = pooled_t - pooled_t.mean(axis=0)
    return mse, float((centred**2).mean(axis=0).mean())


@pytest.mark.parametrize("mode", ["mean_tokens", "cls_token"])
def test_sentence_term_is_the_pooled_mse_of_the_last_layer_against_the_selected_teacher_dimensions(mode):
    student, teacher = _features(4, seed=0), _features(8, seed=1)
    select = SelectedDimensions(SELECTED)
    raw = tinybert_objective(student, teacher, [1, 2], MASK, ONLY_SENTENCE, select, pooling=(mode,))
    relative = tinybert_objective(
        student, teacher, [1, 2], MASK, ONLY_SENTENCE, select, normalize="variance", pooling=(mode,)
    )
    last_student = student.hidden[2].numpy()
    last_teacher = teacher.hidden[2].numpy()[:, :, SELECTED.numpy()]
    mse, variance = _by_hand(last_student, last_teacher, MASK.numpy(), mode)
    assert raw["sentence"].item() == pytest.approx(mse, rel=1e-5)
    assert relative["sentence"].item() == pytest.approx(mse / variance, rel=1e-5)
    assert set(raw) == {"sentence", "loss"} and raw["loss"].item() == pytest.approx(mse, rel=1e-5)


def test_a_vector_common_to_every_token_costs_its_square_over_the_teachers_pooled_variance():
    """The failure the term is for: the student adds one vector c to every token. Token-level terms see |c|^2
    against the teacher's variance over tokens; this term sees it against the (smaller) variance of the pooled
    embeddings, which is what a common component swamps."""
    teacher = _features(4, seed=2)
    offset = torch.tensor([0.5, -1.0, 0.25, 2.0])
    student = EncoderFeatures(
        embeddings=teacher.embeddings, hidden={n: h + offset for n, h in teacher.hidden.items()}, scores={}
    )
    copy = tinybert_objective(teacher, teacher, [1, 2], MASK, ONLY_SENTENCE, normalize="variance")
    assert copy["sentence"].item() == 0.0
    shifted = tinybert_objective(student, teacher, [1, 2], MASK, ONLY_SENTENCE, normalize="variance")
    _, variance = _by_hand(teacher.hidden[2].numpy(), teacher.hidden[2].numpy(), MASK.numpy(), "mean_tokens")
    expected = float((offset**2).mean()) / variance
    assert shifted["sentence"].item() == pytest.approx(expected, rel=1e-5)


def test_only_the_last_layer_gets_a_gradient_and_an_unmasked_batch_pools_every_token():
    student, teacher = _features(4, seed=3, requires_grad=True), _features(4, seed=4)
    terms = tinybert_objective(student, teacher, [1, 2], None, ONLY_SENTENCE, normalize="variance")
    terms["loss"].backward()
    assert student.hidden[1].grad is None
    assert student.hidden[2].grad is not None and student.hidden[2].grad.abs().sum() > 0
    everything = torch.ones(3, 4, dtype=torch.long)
    masked = tinybert_objective(student, teacher, [1, 2], everything, ONLY_SENTENCE, normalize="variance")
    assert terms["sentence"].item() == pytest.approx(masked["sentence"].item(), rel=1e-6)


@pytest.mark.parametrize("mode", ["mean_tokens", "cls_token", "lasttoken"])
def test_rows_without_a_real_token_are_left_out_and_fewer_than_two_rows_give_zero(mode):
    """A corrupt shard's rows come fully masked (data.skip_corrupt): CLS or last-token pooling would read their
    padding, and the teacher's variance over identical rows would be 0."""
    student, teacher = _features(4, seed=5), _features(4, seed=6)
    mask = MASK.clone()
    mask[1] = 0
    both = tinybert_objective(student, teacher, [1, 2], mask, ONLY_SENTENCE, normalize="variance", pooling=(mode,))
    kept = [0, 2]
    mse, variance = _by_hand(student.hidden[2].numpy()[kept], teacher.hidden[2].numpy()[kept], MASK.numpy()[kept],
                             mode)  # fmt: skip
    assert both["sentence"].item() == pytest.approx(mse / variance, rel=1e-5)
    mask[2] = 0  # one real row: no variance across rows, nothing to learn from
    student.hidden[2].requires_grad_(True)
    one = tinybert_objective(student, teacher, [1, 2], mask, ONLY_SENTENCE, normalize="variance", pooling=(mode,))
    assert one["sentence"].item() == 0.0
    one["loss"].backward()  # the graph is kept: a step on such a batch moves nothing
    assert student.hidden[2].grad.abs().sum() == 0
    raw = tinybert_objective(student, teacher, [1, 2], mask, ONLY_SENTENCE, pooling=(mode,))
    assert raw["sentence"].item() > 0  # the raw MSE needs no variance
    mask[0] = 0
    nothing = tinybert_objective(student, teacher, [1, 2], mask, ONLY_SENTENCE, pooling=(mode,))
    assert nothing["sentence"].item() == 0.0


def test_weight_is_checked_and_task_runs_refuse_it():
    from dist_kd.train.task_config import TaskDistillConfig

    with pytest.raises(ValueError, match="distill.weights.sentence must be >= 0"):
        LossWeights(sentence=-1.0)
    assert LossWeights().sentence == 0.0  # TinyBERT's objective unless asked
    with pytest.raises(ValueError, match="distill.weights.sentence is a term of general distillation"):
        TaskDistillConfig(phase="intermediate", weights=LossWeights(sentence=1.0))
