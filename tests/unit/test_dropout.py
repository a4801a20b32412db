"""dist_kd's CPU dropout (dist_kd/models/dropout.py): the mask's statistics, the values and gradients it gives
against the mask drawn again from the same seed, the attention path that uses it, and where it is installed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_kd.models import dropout as fast
from dist_kd.models.capture import _capture_attention


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keep_mask_has_the_rate_and_independence_of_bernoulli_draws(p):
    torch.manual_seed(1)
    n = 1 << 20
    keep = fast.keep_mask((n,), p).float()
    assert keep.dtype == torch.float32 and keep.shape == (n,)

    def within(values: torch.Tensor, rate: float) -> None:
        sigma = math.sqrt(rate * (1 - rate) / values.numel())
        assert abs(values.mean().item() - rate) < 5 * sigma, (values.mean().item(), rate)

    within(keep, 1 - p)
    for piece in range(4):  # each 16-bit piece of the 64-bit words, the sign-bearing one included
        within(keep[piece::4], 1 - p)
    within(keep[:-1] * keep[1:], (1 - p) ** 2)  # neighbours (pieces of one word) are independent
    within(keep[:-4] * keep[4:], (1 - p) ** 2)  # and so are the same pieces of consecutive words


def test_keep_mask_follows_the_seed_and_any_shape():
    torch.manual_seed(3)
    a = fast.keep_mask((3, 5, 7), 0.3)
    torch.manual_seed(3)
    b = fast.keep_mask((3, 5, 7), 0.3)
    assert a.shape == (3, 5, 7) and a.dtype == torch.bool and torch.equal(a, b)
    assert not torch.equal(a, fast.keep_mask((3, 5, 7), 0.3))


def test_dropout_scales_kept_values_and_its_gradient_is_the_mask():
    p = 0.25
    x = torch.randn(4, 6, 33, requires_grad=True)
    torch.manual_seed(5)
    out = fast.dropout(x, p, training=True)
    torch.manual_seed(5)
    keep = fast.keep_mask(x.shape, p)
    expected = torch.where(keep, x.detach() / (1 - p), torch.zeros(()))
    torch.testing.assert_close(out.detach(), expected, rtol=1e-6, atol=0)
    weights = torch.randn_like(x)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    torch.testing.assert_close(grad, torch.where(keep, weights / (1 - p), torch.zeros(())), rtol=1e-6, atol=0)


def test_dropout_is_stock_dropout_outside_its_case():
    x = torch.randn(8, 16)
    assert torch.equal(fast.dropout(x, 0.3, training=False), x)
    assert torch.equal(fast.dropout(x, 0.0, training=True), x)
    assert torch.equal(fast.dropout(x, 1.0, training=True), torch.zeros_like(x))
    fast.set_enabled(False)
    try:
        torch.manual_seed(2)
        got = fast.dropout(x, 0.3, training=True)
        torch.manual_seed(2)
        assert torch.equal(got, nn.functional.dropout(x, 0.3, training=True))
    finally:
        fast.set_enabled(True)


def test_install_replaces_plain_dropout_only_and_keeps_the_eval_output(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    ids = torch.randint(5, 40, (2, 9))
    before = model(input_ids=ids).last_hidden_state

    class Custom(nn.Dropout):
        pass

    model.extra = Custom(0.5)
    assert fast.install_fast_dropout(model) == plain > 0
    assert fast.install_fast_dropout(model) == 0  # a second call replaces nothing
    assert type(model.extra) is Custom
    assert not any(type(m) is nn.Dropout for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, before, rtol=0, atol=0)


def _attention_inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4) for _ in range(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, :, :, 4:] = False  # the second row's last two tokens are padding
    module = nn.Module()
    return module, q, k, v, mask


def test_attention_in_cpu_training_uses_the_explicit_path_with_the_cheaper_mask():
    module, q, k, v, mask = _attention_inputs()
    p = 0.3
    torch.manual_seed(9)
    out, _ = _capture_attention(module.train(), q, k, v, mask, dropout=p)
    torch.manual_seed(9)
    keep = fast.keep_mask((2, 3, 6, 6), p)
    scores = (q @ k.transpose(-1, -2)) / 2.0  # d_head 4
    probs = scores.masked_fill(~mask, torch.finfo(torch.float32).min).softmax(-1)
    expected = (torch.where(keep, probs / (1 - p), torch.zeros(())) @ v).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_attention_outside_cpu_training_is_sdpa():
    module, q, k, v, mask = _attention_inputs()
    expected = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    for training in (False, True):  # HF's layers pass dropout=0.0 outside training
        out, _ = _capture_attention(module.train(training), q, k, v, mask, dropout=0.0)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    fast.set_enabled(False)
    try:  # turned off, training with dropout is SDPA's too (same seed, same mask)
        torch.manual_seed(4)
        out, _ = _capture_attention(module.train(), q, k, v, mask, dropout=0.3)
        torch.manual_seed(4)
        stock = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3).transpose(1, 2)
        torch.testing.assert_close(out, stock, rtol=1e-5, atol=1e-6)
    finally:
        fast.set_enabled(True)


def test_fine_tuned_classifier_gets_the_cpu_dropout_and_exports_a_plain_config(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from dist_kd.data.tasks import TaskSpec
    from dist_kd.train.finetune import build_classifier

    model = build_classifier(tiny_bert_dir, TaskSpec(name="t", labels=["a", "b"]), dropout=0.2)
    assert any(isinstance(m, fast.FastDropout) for m in model.modules())
    assert not any(type(m) is nn.Dropout for m in model.modules())
    model.save_pretrained(tmp_path / "out")
    assert "dist_kd" not in (tmp_path / "out" / "config.json").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(5, 40, (2, 7))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_a_compiled_graph_takes_stock_dropout_without_breaking():
    """Under torch.compile (train.compile) the cheaper mask steps aside: no graph break at a dropout, and the
    compiled dropout is still dropout (values 0 or 1 / (1 - p), keep rate 1 - p within 5 sigma)."""
    import torch._dynamo

    from dist_kd.models.dropout import dropout

    def f(x):
        return dropout(x * 1.0, 0.5, True)

    x = torch.ones(256, 256)
    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    torch._dynamo.reset()
    out = torch.compile(f, backend="eager")(x)
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    kept = float((out > 0).float().mean())
    assert abs(kept - 0.5) < 5 * (0.25 / x.numel()) ** 0.5
