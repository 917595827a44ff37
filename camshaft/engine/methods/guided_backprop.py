"""Guided backpropagation (Springenberg et al. 2015, "Striving for Simplicity").

The input gradient with every ReLU's backward replaced by ``relu(grad) * (input > 0)``: only
positive signals flow back through positive activations. It rewires the ReLU modules of a live
model for the duration of one backward (``MODULE_HOOKS``: eager backend only); functional relus
(``F.relu`` in a forward) cannot be reached and keep their usual backward. A model without ReLU
modules (EfficientNet's SiLU, ConvNeXt's GELU) gets plain saliency, with a warning saying so.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from camshaft.engine.backends.base import INPUT_GRADIENTS, MODULE_HOOKS, Backend, Selector
from camshaft.engine.methods.base import Method, register_method
from camshaft.engine.methods.input_gradients import channel_max_abs


class _GuidedRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * (x > 0).to(grad.dtype)


@contextlib.contextmanager
def guided(model: nn.Module) -> Iterator[int]:
    """Every ``nn.ReLU`` of ``model`` backpropagates guidedly inside the block; yields their count."""

    def hook(_module, _inputs, output):
        return _GuidedRelu.apply(output)  # output >= 0 already: forward unchanged, backward guided

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def _guided_backprop(backend: Backend, x: torch.Tensor, select: Selector, tap, options: dict):
    with guided(backend.module) as relus:
        if not relus:
            warnings.warn(
                f"guided backpropagation: {backend.info.source!r} has no nn.ReLU modules to guide (its activations "
                "are other functions: SiLU, GELU, functional relus), so its map is the plain input gradient, "
                "as --method saliency gives",
                stacklevel=3,
            )
        out = backend.input_gradients(x, select)
    return channel_max_abs(out.input_grads), out


register_method(
    Method(
        "guided_backprop",
        frozenset({INPUT_GRADIENTS, MODULE_HOOKS}),
        _guided_backprop,
        "input gradient through guided ReLUs",
        uses_tap=False,
        paper="Springenberg et al. 2015",
    )
)
