"""Each loss against a plain loop-based reference written here, masks and dtypes included."""

from __future__ import annotations

import math

import pytest
import torch

from dist_kd.losses import (
    attention_mse,
    ensemble_probs,
    hard_label_loss,
    hidden_mse,
    hidden_variance,
    prediction_loss,
    score_variance,
    soft_cross_entropy,
)


def _mask(batch: int, length: int, lengths: list[int]) -> torch.Tensor:
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return mask


def _reference_attention(s, t, lengths):
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        for h in range(s.shape[1]):
            for i in range(n):
                for j in range(n):
                    total += (float(s[b, h, i, j]) - float(t[b, h, i, j])) ** 2
                    count += 1
    return total / count


def _reference_hidden(s, t, lengths):
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        for i in range(n):
            for d in range(t.shape[2]):
                total += (float(s[b, i, d]) - float(t[b, i, d])) ** 2
                count += 1
    return total / count


def test_attention_mse_matches_reference_with_padding():
    torch.manual_seed(0)
    s, t = torch.randn(3, 2, 5, 5), torch.randn(3, 2, 5, 5)
    lengths = [5, 3, 1]
    got = attention_mse(s, t, _mask(3, 5, lengths))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference_attention(s, t, lengths), rel=1e-5)


def test_attention_mse_ignores_padded_positions():
    torch.manual_seed(1)
    s, t = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    mask = _mask(2, 4, [4, 2])
    s2 = s.clone()
    s2[1, :, 2:, :] = 1e4  # padded queries
    s2[1, :, :, 2:] = -1e4  # padded keys (as a masked score would look)
    assert attention_mse(s2, t, mask).item() == pytest.approx(attention_mse(s, t, mask).item(), rel=1e-6)


def test_attention_mse_no_mask_is_plain_mean():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert attention_mse(s, t, None).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def test_attention_mse_accumulates_in_fp32_for_half_inputs():
    torch.manual_seed(2)
    s, t = torch.randn(2, 2, 6, 6) * 8, torch.randn(2, 2, 6, 6) * 8
    lengths = [6, 4]
    got = attention_mse(s.half(), t.half(), _mask(2, 6, lengths))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_reference_attention(s.half().float(), t.half().float(), lengths), rel=1e-5)


def test_attention_mse_head_mismatch_is_clear():
    with pytest.raises(ValueError, match="head count"):
        attention_mse(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3), None)


def test_hidden_mse_matches_reference_with_projection():
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, 3), torch.randn(2, 4, 5)
    proj = torch.nn.Linear(3, 5)
    lengths = [4, 2]
    got = hidden_mse(s, t, _mask(2, 4, lengths), proj)
    with torch.no_grad():
        expected = _reference_hidden(proj(s), t, lengths)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hidden_mse_width_mismatch_without_projection_is_clear():
    with pytest.raises(ValueError, match="projection"):
        hidden_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 5), None)


def test_hidden_variance_matches_per_feature_variance_of_real_tokens():
    torch.manual_seed(5)
    h = torch.randn(3, 6, 4) * torch.tensor([1.0, 3.0, 0.5, 10.0]) + 7.0
    lengths = [6, 2, 4]
    real = torch.cat([h[b, :n] for b, n in enumerate(lengths)])  # (tokens, D)
    expected = real.var(dim=0, unbiased=False).mean()
    assert hidden_variance(h, _mask(3, 6, lengths)).item() == pytest.approx(expected.item(), rel=1e-5)
    # it is the hidden_mse of the best constant guess: the real tokens' mean state
    guess = real.mean(0).expand_as(h)
    assert hidden_mse(guess, h, _mask(3, 6, lengths)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_score_variance_matches_per_head_variance_of_real_pairs():
    torch.manual_seed(6)
    scores = torch.randn(2, 3, 5, 5) * torch.tensor([1.0, 4.0, 0.2])[None, :, None, None] + 2.0
    lengths = [5, 3]
    per_head = []
    for head in range(3):
        real = torch.cat([scores[b, head, :n, :n].reshape(-1) for b, n in enumerate(lengths)])
        per_head.append(real.var(unbiased=False))
    expected = torch.stack(per_head).mean()
    assert score_variance(scores, _mask(2, 5, lengths)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_cross_entropy_matches_reference_and_temperature():
    torch.manual_seed(4)
    z = torch.randn(4, 3)
    q = torch.softmax(torch.randn(4, 3), dim=-1)
    for t in (1.0, 2.0):
        expected = 0.0
        for b in range(4):
            row = [float(v) / t for v in z[b]]
            log_norm = math.log(sum(math.exp(v) for v in row))
            expected += -sum(float(q[b, c]) * (row[c] - log_norm) for c in range(3))
        assert soft_cross_entropy(z, q, t).item() == pytest.approx(expected / 4, rel=1e-5)


def test_soft_cross_entropy_minimised_at_target():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    at_target = soft_cross_entropy(q.log(), q)
    entropy = -(q * q.log()).sum()
    assert at_target.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert soft_cross_entropy(torch.tensor([[0.0, 1.0, 0.0]]), q) > at_target


def test_ensemble_probs_is_mean_of_softmaxes():
    torch.manual_seed(5)
    logits = [torch.randn(3, 4) for _ in range(3)]
    for t in (1.0, 3.0):
        expected = torch.zeros(3, 4)
        for z in logits:
            e = torch.exp(z / t)
            expected += e / e.sum(dim=-1, keepdim=True)
        expected /= 3
        torch.testing.assert_close(ensemble_probs(logits, t), expected)
        torch.testing.assert_close(ensemble_probs(torch.stack(logits), t), expected)


def test_hard_label_loss_classification_and_regression():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (1 + math.e))) / 2
    assert hard_label_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert hard_label_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 2.0]), "regression").item() == 1.0


def test_prediction_loss_mixes_soft_and_hard():
    z = torch.tensor([[1.0, -1.0, 0.5]])
    q = torch.tensor([[0.2, 0.5, 0.3]])
    y = torch.tensor([2])
    out = prediction_loss(z, q, y, soft_weight=0.3, hard_weight=0.7)
    expected = 0.3 * soft_cross_entropy(z, q) + 0.7 * hard_label_loss(z, y)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(out) == {"loss", "soft", "hard"}
    assert set(prediction_loss(z, None, y, hard_weight=1.0)) == {"loss", "hard"}
    with pytest.raises(ValueError):
        prediction_loss(z, None, None)


def test_prediction_loss_hard_term_over_the_labelled_rows_and_hard_rows():
    """The hard term is the sum of the labelled rows' cross-entropies over their count, or over ``hard_rows``
    (data-parallel: the micro-batch's labelled rows over the world size), computed here row by row."""
    import math

    z = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.1, -0.3], [2.0, 0.0, 1.0], [-1.0, 1.0, 0.0]])
    y = torch.tensor([2, 0, 0, 1])
    labelled = torch.tensor([True, False, True, True])
    row_ce = [math.log(sum(math.exp(v) for v in row)) - row[int(k)] for row, k in zip(z.tolist(), y, strict=True)]
    summed = row_ce[0] + row_ce[2] + row_ce[3]
    mean = prediction_loss(z, None, y, hard_weight=1.0, label_mask=labelled)
    assert mean["hard"].item() == pytest.approx(summed / 3, rel=1e-6)
    spread = prediction_loss(z, None, y, hard_weight=0.5, label_mask=labelled, hard_rows=2.5)
    assert spread["hard"].item() == pytest.approx(summed / 2.5, rel=1e-6)
    assert spread["loss"].item() == pytest.approx(0.5 * summed / 2.5, rel=1e-6)


def _relation_kl_by_loops(student, teacher, mask, heads):
    """MiniLMv2's relation KL written out example by example, relation head by relation head, query by query."""
    import math

    total, count = 0.0, 0
    for b in range(student.shape[0]):
        real = [i for i in range(student.shape[2]) if mask[b, i]]
        concat = {
            name: x[b].permute(1, 0, 2).reshape(x.shape[2], -1).double() for name, x in (("s", student), ("t", teacher))
        }
        for r in range(heads):
            parts = {}
            for name, x in concat.items():
                width = x.shape[1] // heads
                parts[name] = x[real][:, r * width : (r + 1) * width]
            for i in range(len(real)):
                dist = {}
                for name, x in parts.items():
                    width = x.shape[1]
                    logits = [float(x[i] @ x[j]) / math.sqrt(width) for j in range(len(real))]
                    top = max(logits)
                    z = sum(math.exp(v - top) for v in logits)
                    dist[name] = [math.exp(v - top) / z for v in logits]
                total += sum(p * math.log(p / q) for p, q in zip(dist["t"], dist["s"], strict=True) if p > 0)
                count += 1
    return total / count


def test_relation_kl_matches_a_loop_reference_with_padding_and_other_head_counts():
    from dist_kd.losses import relation_kl

    torch.manual_seed(0)
    student = torch.randn(2, 2, 5, 8)  # 2 heads x 8 = 16 wide
    teacher = torch.randn(2, 4, 5, 12)  # 4 heads x 12 = 48 wide
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = relation_kl(student, teacher, mask, num_relation_heads=4)
    assert got.item() == pytest.approx(_relation_kl_by_loops(student, teacher, mask, 4), rel=1e-5)
    # padded positions change nothing
    padded = student.clone()
    padded[1, :, 3:] = 1e3
    assert relation_kl(padded, teacher, mask, 4).item() == pytest.approx(got.item(), rel=1e-6)


def test_relation_kl_is_zero_for_the_same_features_split_into_other_heads_and_has_gradients():
    from dist_kd.losses import relation_kl

    torch.manual_seed(1)
    concat_BLD = torch.randn(3, 6, 24)
    as_heads = lambda x, h: x.view(3, 6, h, 24 // h).transpose(1, 2)  # noqa: E731
    teacher = as_heads(concat_BLD, 6)  # 6 heads of 4
    student = as_heads(concat_BLD.clone().requires_grad_(True), 2)  # 2 heads of 12: the same relations
    loss = relation_kl(student, teacher, None, num_relation_heads=3)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    other = as_heads(torch.randn(3, 6, 24, requires_grad=True), 2)
    loss = relation_kl(other, teacher, None, 3)
    loss.backward()
    assert loss.item() > 1e-3
    with pytest.raises(ValueError, match="relation_heads 5 does not divide the attention width 24"):
        relation_kl(student, teacher, None, 5)
