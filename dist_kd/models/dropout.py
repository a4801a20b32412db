"""Dropout with a cheaper mask on a CPU.

On a CPU, ``torch.nn.functional.dropout`` draws one Bernoulli sample per element with the scalar generator,
about 7 ns an element on the machines we test on; in a 3 x 192 student at 128 tokens that was 27 % of a
training step (the attention probabilities alone are B x H x L x L), and 16 % of a MiniLM fine-tuning step
(``python bench/dropout.py`` prints the figures for this machine). Here the mask comes from whole 64-bit
words of the same generator, each cut into four 16-bit uniform integers: an element is kept when its integer
is at least ``round(p * 65536)``, so the drop rate is ``p`` to within 1/131072, and kept elements are scaled
by ``1 / (1 - p)`` exactly as stock dropout does. The draw is seeded by ``torch.manual_seed`` like any other.

On other devices (CUDA's dropout is already a fused kernel), outside training, and at ``p`` = 0 every call
here is stock dropout, so GPU runs and evaluation are unchanged. ``DIST_KD_FAST_DROPOUT=0`` in the environment
(or :func:`set_enabled`) makes every call stock dropout on a CPU too, for a bit-for-bit comparison with
another tool's run.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

_LEVELS = 1 << 16  # 16-bit pieces: four per 64-bit word
_enabled = os.environ.get("DIST_KD_FAST_DROPOUT", "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Turn the cheaper CPU mask on or off for this process (default: on unless DIST_KD_FAST_DROPOUT=0)."""
    global _enabled
    _enabled = bool(enabled)


def applies(x: torch.Tensor, p: float, training: bool) -> bool:
    """Whether :func:`dropout` draws the cheaper mask for this call (a CPU float tensor in training, 0 < p < 1),
    not inside a graph torch.compile traces (``train.compile``): the mask's in-place ``random_`` would break
    the graph at every dropout, and the compiled stock dropout draws its mask in a fused kernel anyway."""
    if not (_enabled and training and 0.0 < p < 1.0 and x.device.type == "cpu" and x.is_floating_point()):
        return False
    return not torch.compiler.is_compiling()


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean CPU mask of ``shape`` whose elements are True independently with probability ``1 - p``
    (``p`` rounded to a multiple of 1/65536)."""
    count = math.prod(shape)
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1)
    pieces = words.view(torch.int16)[:count].view(shape)  # uniform over [-32768, 32767]
    return pieces >= round(p * _LEVELS) - _LEVELS // 2


class _ScaleByMask(torch.autograd.Function):
    """``x * keep * scale``, with the boolean mask saved for the backward pass (one byte per element)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        # where() rather than mul(): multiplying by a boolean tensor converts it to floats first.
        return torch.where(keep, x, x.new_zeros(())).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, grad.new_zeros(())).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``torch.nn.functional.dropout(x, p, training)``, with the cheaper mask on a CPU."""
    if not applies(x, p, training):
        return nn.functional.dropout(x, p, training)
    return _ScaleByMask.apply(x, keep_mask(x.shape, p), 1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` whose training-mode mask is drawn by :func:`keep_mask` on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


def install_fast_dropout(model: nn.Module) -> int:
    """Replace every plain ``nn.Dropout`` in ``model`` by a :class:`FastDropout` of the same rate (subclasses,
    which may do something else, are left alone). Returns how many were replaced; calling it again replaces
    none."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p, child.inplace))
                replaced += 1
    return replaced
