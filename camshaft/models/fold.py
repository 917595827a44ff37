"""Fold eval-mode batch norms into the convolutions that feed them, in traced (FX) graphs.

In inference a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` is one convolution with
scaled weights and a shifted bias: the same values (to float rounding) for one kernel launch and
one pass over the activation fewer. Frozen TorchScript and ONNX Runtime do this on export; the
eager backend does it here, so its forward is not the slowest of the backends.

Only the graph modules change: each fold puts a new convolution in the graph module's own copy of
the module tree, and the model the user handed over keeps its layers and values. A pair is folded
only where nothing else can see the convolution's own output: it feeds the norm alone (a tap on it
would be an output of the graph, a second user) and its module is called once in the graph. A
module the user put a hook on is never folded: its replacement would not run the hook.

Pairs inside a leaf of the trace are folded too: torchvision keeps its ``ops`` modules whole, so a
MobileNet's or EfficientNet's ``Conv2dNormActivation`` (a Sequential: conv, norm, activation) is one
graph node. No tap can read inside a leaf, so such a leaf is swapped in the graph module for a
Sequential of the same layers with its pairs folded: the same function, however often it is called.

A graph of ATen operations (a TorchScript or .pt2 file from elsewhere, converted by
``camshaft.models.foreign``) holds no layers: its convolutions and norms are function calls on
tensors the graph reads (``get_attr``). Such a pair folds into the same call on new weight and bias
tensors, kept as buffers of the graph module itself (the tensors it read stay as they are).
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

# exact types: a subclass may compute something else (a weight-standardised convolution, say)
_PAIRS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_aten = torch.ops.aten
# convolution calls in an ATen graph: (input, weight, bias, ...); aten.convolution has a ``transposed`` flag (arg 6)
_CONV_CALLS = (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.convolution.default)
_NORM_CALL = _aten.batch_norm.default  # (input, weight, bias, running_mean, running_var, training, momentum, eps, ...)
FOLDED_PREFIX = "_camshaft_folded"  # the graph module's own buffers that hold folded weights


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
    targets = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    folded = 0
    for node, src, conv, bn in foldable_pairs(gm):
        # one module, one replacement: a second call of it, or a node reading inside it, would change too
        if calls[src.target] != 1 or not _replaceable(src.target, targets):
            continue
        _replace_submodule(gm, src.target, _cached_fused(conv, bn, memory_format, cache))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    folded += _fold_calls(gm, memory_format, cache)
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded + _fold_leaves(gm, targets, memory_format, cache)


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
        and not _hooked(conv)
        and not _hooked(bn)
        and not conv.training
        and not bn.training
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _fold_leaves(gm: fx.GraphModule, targets: set, memory_format: torch.memory_format, cache: dict) -> int:
    """Swap each Sequential leaf of ``gm`` holding foldable pairs for a folded copy; returns the pairs folded.

    The graph calls the leaf by its path, so the swap needs no recompile; the copy computes what the
    leaf computes, so a leaf called several times is swapped too.
    """
    folded = 0
    for target in sorted({n.target for n in gm.graph.nodes if n.op == "call_module"}):
        if not _replaceable(target, targets):
            continue
        leaf = gm.get_submodule(target)
        key = ("leaf", id(leaf))
        if key not in cache:
            cache[key] = _folded_sequential(leaf, memory_format, cache)
        copy, pairs = cache[key]
        if pairs:
            _replace_submodule(gm, target, copy)
            folded += pairs
    return folded


def _folded_sequential(seq: nn.Module, memory_format: torch.memory_format, cache: dict):
    """``(a Sequential of seq's layers with each foldable pair one convolution, pairs)``; ``(None, 0)``
    when none folds. Only a module whose forward is Sequential's: it runs its layers in order, so a
    convolution followed by a norm feeds that norm alone. Its other layers are shared, not copied."""
    if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward or _hooked(seq):
        return None, 0
    layers, out, pairs, i = list(seq), [], 0, 0
    while i < len(layers):
        if i + 1 < len(layers) and _foldable(layers[i], layers[i + 1]):
            out.append(_cached_fused(layers[i], layers[i + 1], memory_format, cache))
            pairs, i = pairs + 1, i + 2
            continue
        inner, n = _folded_sequential(layers[i], memory_format, cache)  # a Sequential inside the leaf
        out.append(inner if n else layers[i])
        pairs, i = pairs + n, i + 1
    return (nn.Sequential(*out) if pairs else None), pairs


def _fold_calls(gm: fx.GraphModule, memory_format: torch.memory_format, cache: dict) -> int:
    """Fold each ``batch_norm`` call (inference) on a convolution call whose output nothing else reads;
    returns how many. The graph is recompiled by the caller."""
    folded = 0
    for norm in list(gm.graph.nodes):
        pair = _call_pair(gm, norm)
        if pair is None:
            continue
        conv, tensors = pair
        key = ("calls", *(id(t) for t in tensors))
        if key not in cache:
            cache[key] = _fused_tensors(*tensors, eps=float(norm.args[7]), memory_format=memory_format)
        args = list(conv.args) + [None] * (3 - len(conv.args))  # a conv2d call may leave its bias out
        old = [a for a in args[1:3] if isinstance(a, fx.Node)]
        with gm.graph.inserting_before(conv):
            args[1], args[2] = (gm.graph.get_attr(_own_buffer(gm, t)) for t in cache[key])
        conv.args = tuple(args)
        norm.replace_all_uses_with(conv)
        stale = old + [a for a in norm.args[1:5] if isinstance(a, fx.Node)]
        gm.graph.erase_node(norm)
        for node in stale:  # the weights it read, unless another call still reads them
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        folded += 1
    return folded


def _call_pair(gm: fx.GraphModule, norm: fx.Node):
    """``(conv node, (weight, bias, mean, var, gamma, beta))`` when ``norm`` is an inference ``batch_norm``
    call on a convolution call that feeds it alone, every tensor read from the graph module (bias,
    gamma and beta may be None); else None."""
    if norm.op != "call_function" or norm.target is not _NORM_CALL or len(norm.args) < 8 or norm.kwargs:
        return None
    conv, training = norm.args[0], norm.args[5]
    if training is not False or not isinstance(conv, fx.Node) or conv.op != "call_function":
        return None
    if conv.target not in _CONV_CALLS or conv.kwargs or len(conv.users) != 1 or len(conv.args) < 2:
        return None
    if conv.target is _aten.convolution.default and conv.args[6] is not False:  # a transposed convolution
        return None
    bias = conv.args[2] if len(conv.args) > 2 else None
    nodes = (conv.args[1], bias, norm.args[3], norm.args[4], norm.args[1], norm.args[2])
    tensors = tuple(None if n is None else _read(gm, n) for n in nodes)
    if any(t is None for i, t in enumerate(tensors) if nodes[i] is not None or i in (0, 2, 3)):
        return None  # a tensor computed in the graph, not read from it
    if tensors[0].dim() < 3 or tensors[2].shape != (tensors[0].shape[0],):
        return None
    return conv, tensors


def _read(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = operator.attrgetter(node.target)(gm)
    return value if isinstance(value, torch.Tensor) and value.is_floating_point() else None


def _fused_tensors(weight, bias, mean, var, gamma, beta, *, eps: float, memory_format: torch.memory_format):
    """The convolution's weight and bias with the norm applied (torch's own folding formula)."""
    with torch.no_grad():
        w, b = fuse_conv_bn_weights(weight, bias, mean, var, eps, gamma, beta)
    w, b = w.detach(), b.detach()
    return (w.contiguous(memory_format=memory_format) if w.dim() == 4 else w), b


def _own_buffer(gm: fx.GraphModule, tensor: torch.Tensor) -> str:
    """The name of a buffer of ``gm`` holding ``tensor`` (one per tensor: graphs sharing a cache share them)."""
    for name, held in gm.named_buffers(recurse=False):
        if held is tensor:
            return name
    n = sum(1 for name, _ in gm.named_buffers(recurse=False) if name.startswith(FOLDED_PREFIX))
    name = f"{FOLDED_PREFIX}_{n}"
    gm.register_buffer(name, tensor)
    return name


def _hooked(module: nn.Module) -> bool:
    """Whether the user put a hook on ``module``: a folded copy would not run it, so it stays as it is."""
    return any(
        getattr(module, name, None)
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    )


def _replaceable(target: str, targets: set) -> bool:
    """Whether the module at ``target`` can be swapped in the graph module alone: no other node reads
    inside it (a parameter, a layer) and none calls a module above it, which would be the user's own
    module (``fx.GraphModule`` shares the modules the graph names and makes new parents for the rest)."""
    return not any(t.startswith(target + ".") or target.startswith(t + ".") for t in targets)


def _cached_fused(conv: nn.Module, bn: nn.Module, memory_format: torch.memory_format, cache: dict) -> nn.Module:
    key = (id(conv), id(bn))
    if key not in cache:
        cache[key] = _fused(conv, bn, memory_format)
    return cache[key]


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
