"""Leaky ReLU gradients for dead channels: a way out of the dead-ReLU stall of activation maximization.

Maximising a logit ``b + w . f`` from a grey image sometimes kills every feature with a negative
weight before it grows one with a positive weight; once the channels that would help are dead
everywhere, no gradient reaches them and the optimisation stalls at the bias. Where a ReLU passes
no gradient at all to a channel of an image, that channel's dead units receive ``leak`` times the
part of the gradient that would wake them (descent raises a unit whose gradient is negative). The
forward pass is unchanged, and with a small leak the true gradient dominates wherever there is one.
Adapted from Lucid's redirected ReLU gradient (Olah et al. 2017), which redirects whole layers
during the first 16 steps only; ``render`` leaks during the first 32 by default (``relu_leak_steps``):
the stall happens at the start, and later steps get the exact gradient. The decision is per image and
channel, so a batch still equals its single runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["redirected_relus"]


SUM_FIRST = 1 << 18  # gradients larger than this many values are summed first on the CPU (see the hook)


def _leak_hook(leak: float):
    """A hook for a ReLU's backward node: (its gradient, the incoming one) -> the leaky gradient."""

    def hook(grad_inputs, grad_outputs):
        normal, g = grad_inputs[0], grad_outputs[0]  # ReLU's own gradient (g where out > 0), and g
        if normal is None or g is None:
            return None
        # the channels of an image (B, C, ...), or the vectors (B, N), that pass no gradient at all;
        # all their alive units have g == 0, so the whole channel takes the waking gradient
        # (descent raises units with g < 0)
        space = tuple(range(2, g.dim())) or (1,)  # reduced per channel (any memory layout), or per vector
        if normal.numel() > SUM_FIRST and not _sync_free(g.device):
            # a stalled channel sums to 0: when no sum is 0 (often so for large maps, whose channels
            # rarely die everywhere) one pass and a host read settle it. Among the candidates, a
            # channel whose largest value is 0 too is all zeros (a sum of numbers <= 0 is 0 only
            # when each is). Small gradients skip this: there the number of operations costs more
            # than their passes over the data, and stalls are common
            sums = normal.sum(space, keepdim=True)
            if bool(sums.all()):
                return None
            stalled = sums.eq_(0).mul_(normal.amax(space, keepdim=True).eq_(0))
        else:
            stalled = normal.abs().amax(space, keepdim=True).eq_(0)
        # ``stalled`` is 1.0 where a channel is all zeros, else 0.0 (``normal``'s dtype)
        # adding the waking gradient to a stalled channel's zeros replaces them; other channels add
        # 0 (-inf is clamped to the lowest finite value: 0 * inf would be NaN). ``normal`` is the
        # node's own new tensor, free to change in place
        waking = g.clamp(min=torch.finfo(g.dtype).min, max=0)
        return (normal.addcmul_(stalled, waking, value=leak),)

    return hook


def _sync_free(device: torch.device) -> bool:
    """Whether reading a device value on the host would stall the device queue (not on the CPU)."""
    return device.type != "cpu"


@contextlib.contextmanager
def redirected_relus(model: nn.Module, *, leak: float) -> Iterator[int]:
    """Every ``nn.ReLU`` of ``model`` leaks waking gradients into dead channels; yields how many.

    ``leak=0`` changes nothing. Meanwhile each ReLU module's forward is replaced: torch's own ReLU
    (in place where the module is), whose backward node gets the leak as a hook; functional
    ``F.relu`` calls are not seen.
    """
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)] if leak > 0 else []
    hook = _leak_hook(leak)

    def leaky(module: nn.ReLU):
        def forward(x: torch.Tensor) -> torch.Tensor:
            # in place where the module is; a view modified in place gets its base's backward node,
            # so a view takes the ReLU out of place and the result is copied into it
            view = module.inplace and x._is_view()
            out = torch.relu_(x) if module.inplace and not view else torch.relu(x)
            if out.grad_fn is not None:
                out.grad_fn.register_hook(hook)  # ReLU's own backward node
            return x.copy_(out) if view else out

        return forward

    saved = [(m, m.__dict__.get("forward")) for m in relus]  # an instance-level forward someone set
    try:
        for m in relus:  # the module's own ReLU does not run as well: its forward is replaced
            m.forward = leaky(m)
        yield len(relus)
    finally:
        for m, previous in saved:
            if previous is None:
                del m.forward
            else:
                m.forward = previous
