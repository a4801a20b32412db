"""The step's fast paths give what the plain path gives: the unmasked packed batch, the masked-loss
contraction, the fused AdamW and the ZeRO-0 gradient clipping (bench/general.py measures what each saves;
these check the values)."""

from __future__ import annotations

import math

import pytest
import torch

from dist_kd.layer_map import layer_map
from dist_kd.losses import attention_mse, hidden_mse
from dist_kd.models.student import DistillStudent, StudentConfig, build_projections, build_student
from dist_kd.models.teacher import Teacher
from dist_kd.objective import LossWeights, tinybert_objective
from dist_kd.train.engine import TrainConfig, build_optimizer, clip_gradients, parameter_groups
from dist_kd.train.general import device_mask


def test_device_mask_is_none_only_when_every_token_is_real():
    full = torch.ones(2, 5, dtype=torch.long)
    assert device_mask(full, torch.device("cpu")) is None
    padded = full.clone()
    padded[1, 3:] = 0
    got = device_mask(padded, torch.device("cpu"))
    assert got is not None and torch.equal(got, padded)


def _pair_masked_reference(s, t, mask):
    """The masked score MSE by explicit multiplication with the (B, 1, L, L) pair mask."""
    m = mask.float()
    pair = (m[:, :, None] * m[:, None, :])[:, None]
    return ((s - t).square() * pair).sum() / (pair.sum() * s.shape[1])


def test_masked_losses_value_and_gradient_match_explicit_masking():
    torch.manual_seed(0)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    s = torch.randn(3, 4, 7, 7, requires_grad=True)
    t = torch.randn(3, 4, 7, 7)
    got = attention_mse(s, t, mask)
    (grad,) = torch.autograd.grad(got, s)
    s_ref = s.detach().clone().requires_grad_(True)
    expected = _pair_masked_reference(s_ref, t, mask)
    (grad_ref,) = torch.autograd.grad(expected, s_ref)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-9)
    assert grad[0, :, 5, :].abs().sum() == 0 and grad[0, :, :, 5].abs().sum() == 0  # padded pairs get no gradient

    h = torch.randn(3, 7, 6, requires_grad=True)
    ht = torch.randn(3, 7, 6)
    got_h = hidden_mse(h, ht, mask)
    (grad_h,) = torch.autograd.grad(got_h, h)
    m = mask.float()[:, :, None]
    expected_h = ((h.detach() - ht).square() * m).sum() / (m.sum() * 6)
    torch.testing.assert_close(got_h, expected_h, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_h, 2 * (h.detach() - ht) * m / (m.sum() * 6), rtol=1e-5, atol=1e-9)


def test_unmasked_packed_batch_gives_the_all_ones_losses_and_gradients(tiny_bert_dir):
    """A packed batch run without a mask (models and losses) equals the same batch with an all-ones mask."""
    mapping = layer_map(4, 2, "uniform")
    teacher = Teacher(tiny_bert_dir, dtype="fp32", score_layers=mapping, max_layer=max(mapping))
    cfg = StudentConfig(num_layers=2, hidden_size=16, num_heads=4, intermediate_size=32, dropout=0.0)
    torch.manual_seed(0)
    student = DistillStudent(build_student(cfg, teacher.config), build_projections(16, teacher.hidden_size, 2))
    ids = torch.randint(5, teacher.config.vocab_size, (3, 12))
    ones = torch.ones_like(ids)

    def losses_and_grads(mask):
        student.zero_grad(set_to_none=True)
        terms = tinybert_objective(
            student(ids, mask), teacher.features(ids, mask), mapping, mask, LossWeights(), student.projections
        )
        terms["loss"].backward()
        return terms, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    masked, masked_grads = losses_and_grads(ones)
    unmasked, unmasked_grads = losses_and_grads(device_mask(ones, torch.device("cpu")))
    for name in ("embd", "hidden", "attn", "loss"):
        torch.testing.assert_close(unmasked[name], masked[name], rtol=1e-5, atol=1e-7)
    assert masked_grads.keys() == unmasked_grads.keys()
    for name, grad in masked_grads.items():
        torch.testing.assert_close(unmasked_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_fused_adamw_follows_the_reference_adamw():
    """build_optimizer's fused AdamW and torch's per-tensor AdamW take the same 20 steps (rel 1e-5)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 1))
    reference.load_state_dict(model.state_dict())
    cfg = TrainConfig(lr=1e-2, weight_decay=0.01)
    fused = build_optimizer(model, cfg)
    if not fused.param_groups[0].get("fused"):
        pytest.skip(f"torch {torch.__version__} has no fused AdamW for these parameters")
    plain = torch.optim.AdamW(
        parameter_groups(reference, cfg.weight_decay), lr=cfg.lr, eps=1e-6, foreach=False, fused=False
    )
    data = torch.randn(32, 8)
    target = torch.randn(32, 1)
    for _ in range(20):
        for net, optimizer in ((model, fused), (reference, plain)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(data), target).backward()
            optimizer.step()
    for (name, got), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_clip_gradients_scales_to_the_global_norm():
    """build_engine's ZeRO-0 clipping: every gradient times min(1, clip / (norm + 1e-6)), the norm taken over
    all gradients at once (a reference computed by hand); parameters without a gradient are left alone."""
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(shape)) for shape in ((4, 3), (7,), (2, 2, 2))]
    grads = [torch.randn(p.shape) * 3 for p in parameters[:2]]
    for parameter, grad in zip(parameters, grads, strict=False):
        parameter.grad = grad.clone()
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert norm > 2.0
    returned = clip_gradients(parameters, 2.0)
    assert float(returned) == pytest.approx(norm, rel=1e-6)
    for parameter, grad in zip(parameters, grads, strict=False):
        torch.testing.assert_close(parameter.grad, grad * (2.0 / (norm + 1e-6)), rtol=1e-6, atol=0)
    assert parameters[2].grad is None
    small = [g / 10 for g in grads]  # below the threshold: unchanged
    for parameter, grad in zip(parameters, small, strict=False):
        parameter.grad = grad.clone()
    clip_gradients(parameters, 2.0)
    for parameter, grad in zip(parameters, small, strict=False):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-6, atol=0)


def test_losses_under_autocast_contract_in_fp32():
    """A bf16 student's loss runs under torch.autocast (train.bf16_mode=autocast); the masked contractions and
    the relation logits must not follow it into bf16: each loss equals its value outside autocast (rel 1e-6),
    and only the projection runs in bf16 (the loss of its bf16 output, computed outside autocast)."""
    from dist_kd.losses import relation_kl

    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(3, 9)
    mask[0, 6:] = 0
    mask[2, 4:] = 0
    scores_s, scores_t = (torch.randn(3, 4, 9, 9, generator=generator) * 4 for _ in "st")
    hidden_s, hidden_t = torch.randn(3, 9, 8, generator=generator), torch.randn(3, 9, 16, generator=generator)
    projection = torch.nn.Linear(8, 16)
    query_s, query_t = torch.randn(3, 2, 9, 8, generator=generator), torch.randn(3, 4, 9, 8, generator=generator)
    wide_s = torch.randn(3, 9, 16, generator=generator)

    def losses():
        return {
            "attention": attention_mse(scores_s, scores_t, mask),
            "hidden": hidden_mse(wide_s, hidden_t, mask),
            "relation": relation_kl(query_s, query_t, mask, 4),
        }

    exact = losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = losses()
        projected = hidden_mse(hidden_s, hidden_t, mask, projection)
        projected_bf16 = projection(hidden_s)
    assert projected_bf16.dtype == torch.bfloat16  # autocast is on for the projection
    for name, value in exact.items():
        assert autocast[name].dtype == torch.float32
        torch.testing.assert_close(autocast[name], value, rtol=1e-6, atol=0, msg=name)
    torch.testing.assert_close(projected, hidden_mse(projected_bf16.float(), hidden_t, mask), rtol=1e-6, atol=0)
