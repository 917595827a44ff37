"""Linear layers on channels-last feature maps, run as 1x1 convolutions on the CPU.

ConvNeXt's blocks (and others like them) permute a map to (N, H, W, C) and apply ``nn.Linear`` to
its channels. On the CPU torch hands such a linear to the BLAS (``addmm``), while the same product
as a 1x1 convolution over the channels-last view of the map goes to oneDNN, which ran it 1.4-2x
faster on the machines measured (AMD EPYC, 2 cores: convnext_tiny's pointwise layers at b16, 224 px;
the linears were 85% of its forward). The view costs nothing: ``x.permute(0, 3, 1, 2)`` of a
contiguous (N, H, W, C) tensor is a channels-last (N, C, H, W) one, and the convolution's
channels-last output permuted back is a contiguous (N, H, W, O) tensor again. The values agree to
float rounding (another summation order).

As ``camshaft.models.fold``, only graph modules change: each ``nn.Linear`` the graph calls is
swapped, in the graph module's own module tree, for a wrapper holding that same layer (its weights
shared, so a change to them shows), which takes the convolution on a 4-d CPU input and calls the
layer on anything else. A layer the user hooked, or one inside a leaf of the trace, is left alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from camshaft.models.fold import _hooked, _replace_submodule, _replaceable


class ChannelsLastLinear(nn.Module):
    """``linear`` on (N, H, W, C) CPU inputs as a 1x1 convolution of their channels-last (N, C, H, W) view."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.device.type != "cpu":
            return self.linear(x)
        weight = self.linear.weight[:, :, None, None]  # (O, C, 1, 1): a view
        return F.conv2d(x.permute(0, 3, 1, 2), weight, self.linear.bias).permute(0, 2, 3, 1)


def linears_as_convolutions(gm: fx.GraphModule, *, cache: dict | None = None) -> int:
    """Swap each ``nn.Linear`` that ``gm`` calls for a ``ChannelsLastLinear`` on it; returns how many.

    ``cache`` shares the wrappers between graph modules cut from one model (the full graph, its trunk
    and head). The graph itself is unchanged (the node calls the same path), so no recompile is needed.
    """
    cache = {} if cache is None else cache
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    swapped = 0
    for target in sorted({n.target for n in gm.graph.nodes if n.op == "call_module"}):
        layer = gm.get_submodule(target)
        if type(layer) is not nn.Linear or _hooked(layer) or not _replaceable(target, targets):
            continue
        if id(layer) not in cache:
            cache[id(layer)] = ChannelsLastLinear(layer)
        _replace_submodule(gm, target, cache[id(layer)])
        swapped += 1
    return swapped


def convert_graphs(graphs) -> int:
    """``linears_as_convolutions`` on graph modules cut from one model, each layer wrapped once."""
    cache: dict = {}
    return sum(linears_as_convolutions(gm, cache=cache) for gm in graphs)
