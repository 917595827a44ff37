"""Fold eval-mode batch norms into the convolutions that feed them, in traced (FX) graphs.

In inference a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` is one convolution with
scaled weights and a shifted bias: the same values (to float rounding) for one kernel launch and
one pass over the activation fewer. Frozen TorchScript and ONNX Runtime do this on export; the
eager backend does it here, so its forward is not the slowest of the backends.

Only the graph modules change: each fold puts a new convolution in the graph module's own copy of
the module tree, and the model the user handed over keeps its layers and values. A pair is folded
only where nothing else can see the convolution's own output: it feeds the norm alone (a tap on it
would be an output of the graph, a second user) and its module is called once in the graph.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# exact types: a subclass may compute something else (a weight-standardised convolution, say)
_PAIRS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def fold_batchnorms(
    gm: fx.GraphModule,
    *,
    memory_format: torch.memory_format = torch.contiguous_format,
    cache: dict | None = None,
) -> int:
    """Fold every eligible ``conv -> batchnorm`` pair of ``gm`` in place; returns how many.

    ``cache`` shares the folded convolutions between graph modules cut from one model (the
    full graph, its trunk and head), so their weights are held once.
    """
    cache = {} if cache is None else cache
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded = 0
    for node, src, conv, bn in foldable_pairs(gm):
        if calls[src.target] != 1:  # the module is replaced, and with it every call of it
            continue
        key = (id(conv), id(bn))
        if key not in cache:
            cache[key] = _fused(conv, bn, memory_format)
        _replace_submodule(gm, src.target, cache[key])
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def foldable_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, nn.Module, nn.Module]]:
    """Every ``(norm node, conv node, conv, norm)`` of ``gm`` whose norm can fold into the conv: an
    eval-mode norm applied to the output of a convolution that nothing else reads."""
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn, src = modules.get(node.target), node.args[0]
        if type(bn) not in _PAIRS.values() or not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv = modules.get(src.target)
        if _foldable(conv, bn) and len(src.users) == 1:
            pairs.append((node, src, conv, bn))
    return pairs


def fold_graphs(graphs, *, memory_format: torch.memory_format = torch.contiguous_format) -> int:
    """``fold_batchnorms`` on graph modules cut from one model, its folded convolutions held once."""
    cache: dict = {}
    return sum(fold_batchnorms(gm, memory_format=memory_format, cache=cache) for gm in graphs)


def _foldable(conv, bn) -> bool:
    return (
        type(bn) is _PAIRS.get(type(conv))
        and not conv.training
        and not bn.training
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _fused(conv: nn.Module, bn: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    with torch.no_grad():
        fused = fuse_conv_bn_eval(conv, bn)
    fused.requires_grad_(False)  # an inference copy: gradients flow through it, never into it
    if fused.weight.dim() == 4:
        fused.to(memory_format=memory_format)
    return fused


def _replace_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)
