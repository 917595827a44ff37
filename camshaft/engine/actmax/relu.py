"""Leaky ReLU gradients for dead channels: a way out of the dead-ReLU stall of activation maximization.

Maximising a logit ``b + w . f`` from a grey image sometimes kills every feature with a negative
weight before it grows one with a positive weight; once the channels that would help are dead
everywhere, no gradient reaches them and the optimisation stalls at the bias. Where a ReLU passes
no gradient at all to a channel of an image, that channel's dead units receive ``leak`` times the
part of the gradient that would wake them (descent raises a unit whose gradient is negative). The
forward pass is unchanged, and with a small leak the true gradient dominates wherever there is one.
Adapted from Lucid's redirected ReLU gradient (Olah et al. 2017), which redirects whole layers.
The decision is per image and channel, so a batch still equals its single runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["redirected_relus"]


class _LeakyDeadReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, leak: float) -> torch.Tensor:
        out = torch.relu(x)
        ctx.save_for_backward(out)
        ctx.leak = leak
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (out,) = ctx.saved_tensors
        normal = torch.ops.aten.threshold_backward(g, out, 0)  # ReLU's own gradient: g where out > 0
        # the channels of an image (B, C, ...), or the vectors (B, N), that pass no gradient at all
        # (a max of |g| is several times faster than ``any`` on the CPU)
        stalled = normal.flatten(2).abs().amax(2) == 0 if g.dim() > 2 else normal.abs().amax(1, keepdim=True) == 0
        # a stalled channel passes nothing, so its alive units all have g == 0: the whole channel
        # takes the waking gradient (descent raises units with g < 0)
        if _sync_free(g.device):  # no host sync: one pass over everything
            stalled = stalled.view(*stalled.shape, *([1] * (g.dim() - stalled.dim())))
            return torch.where(stalled, g.clamp(max=0) * ctx.leak, normal), None
        if not bool(stalled.any()):  # the common case
            return normal, None
        b, c = stalled.nonzero(as_tuple=True)  # only the stalled channels are touched
        if g.dim() > 2:
            normal[b, c] = g[b, c].clamp(max=0) * ctx.leak
        else:
            normal[b] = g[b].clamp(max=0) * ctx.leak
        return normal, None


def _sync_free(device: torch.device) -> bool:
    """Whether reading a device value on the host would stall the device queue (not on the CPU)."""
    return device.type != "cpu"


@contextlib.contextmanager
def redirected_relus(model: nn.Module, *, leak: float) -> Iterator[int]:
    """Every ``nn.ReLU`` of ``model`` leaks waking gradients into dead channels; yields how many.

    ``leak=0`` changes nothing. In-place ReLUs are made out-of-place meanwhile (the hook reads
    their input); functional ``F.relu`` calls are not seen. Hooks and flags are restored on exit.
    """
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)] if leak > 0 else []
    flags = [(m, m.inplace) for m in relus]
    handles = []

    def hook(_module, inputs, _output):
        return _LeakyDeadReLU.apply(inputs[0], leak)

    try:
        for m in relus:
            m.inplace = False
            handles.append(m.register_forward_hook(hook))
        yield len(relus)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.inplace = flag
