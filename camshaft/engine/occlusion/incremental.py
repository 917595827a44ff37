"""Incremental occlusion (exact): recompute each layer only inside the occluded patch's cone.

After Nakandala et al., "Incremental and Approximate Inference for Faster Occlusion-based Deep CNN
Explanations" (SIGMOD 2019). The model is traced with torch.fx; one forward of the unoccluded image
caches every node's output. A batch of occluded variants then flows through the graph as
``Region``s (see ``regions.py``): convolutions, pools, batch norms, pointwise activations and
additions are computed on the boxes only, reading the cached activation around them. Any other op,
or a box covering most of its map, turns the variants into full tensors and the rest of the graph
runs as usual. The result equals plain occlusion up to float rounding. Boxes and the index plans
that read them depend on the positions only: a sweep makes them once per batch of positions and
uses them for every image.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

from camshaft.engine.occlusion.regions import (
    Region,
    apply_read,
    box_starts,
    gather_boxes,
    materialize,
    plan_full,
    plan_read,
    source,
    union,
    window_range,
)
from camshaft.engine.occlusion.sweep import Evaluator
from camshaft.engine.occlusion.windows import Grid
from camshaft.errors import CapabilityError
from camshaft.models.fold import foldable_pairs
from camshaft.models.taps import modifies_input

FULL_FRACTION = 0.8  # a box covering this much of its map: compute full tensors from there on
GEOMETRIES_KEPT = 16  # batches of positions whose boxes and read plans a sweep keeps (a few per image)
_TRACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_POINTWISE_MODULES: dict[type, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    nn.ReLU: lambda m, t: F.relu(t),
    nn.ReLU6: lambda m, t: F.relu6(t),
    nn.LeakyReLU: lambda m, t: F.leaky_relu(t, m.negative_slope),
    nn.SiLU: lambda m, t: F.silu(t),
    nn.GELU: lambda m, t: F.gelu(t, approximate=m.approximate),
    nn.Hardswish: lambda m, t: F.hardswish(t),
    nn.Hardsigmoid: lambda m, t: F.hardsigmoid(t),
    nn.Sigmoid: lambda m, t: torch.sigmoid(t),
    nn.Tanh: lambda m, t: torch.tanh(t),
    nn.Identity: lambda m, t: t,
    nn.Dropout: lambda m, t: t,  # eval mode only (checked)
    nn.BatchNorm2d: lambda m, t: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps),
}
_POINTWISE_FUNCTIONS = {F.relu: F.relu, torch.relu: torch.relu, torch.sigmoid: torch.sigmoid, torch.tanh: torch.tanh}
_BINARY = {operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul}


@dataclass(frozen=True)
class Full:
    """Per-variant values computed as usual: a tensor (P, ...) or anything derived from them."""

    value: Any


@dataclass(frozen=True)
class WindowOp:
    """A sliding-window module as (kernel, stride, padding, dilation) pairs and its unpadded op."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pad_value: float
    run: Callable[[torch.Tensor], torch.Tensor]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def window_op(m: nn.Module) -> WindowOp | None:
    """The window geometry of a conv / pool module computed exactly on crops, else None."""
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        run = lambda t: F.conv2d(t, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)  # noqa: E731
        return WindowOp(m.kernel_size, m.stride, m.padding, m.dilation, 0.0, run)
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        k, s, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        return WindowOp(k, s, _pair(m.padding), d, float("-inf"), lambda t: F.max_pool2d(t, k, s, 0, d))
    if isinstance(m, nn.AvgPool2d) and not m.ceil_mode and m.divisor_override is None:
        k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
        if m.count_include_pad or p == (0, 0):
            return WindowOp(k, s, p, (1, 1), 0.0, lambda t: F.avg_pool2d(t, k, s, 0))
    return None


def _pointwise_module(m: nn.Module):
    fn = _POINTWISE_MODULES.get(type(m))
    if fn is None or (m.training and isinstance(m, nn.BatchNorm2d | nn.Dropout)):
        return None
    if isinstance(m, nn.BatchNorm2d) and m.running_mean is None:
        return None
    return fn


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _execute(gm: fx.GraphModule, node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """Run one node as the model would."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)
    raise RuntimeError(f"cannot execute fx node {node.op} {node.target}")


def trace(module: nn.Module) -> fx.GraphModule:
    """The model traced by torch.fx (memoised per module; it calls the module's own layers)."""
    if module not in _TRACES:
        try:
            _TRACES[module] = fx.symbolic_trace(module)
        except Exception as e:
            raise CapabilityError(
                f"incremental occlusion needs a model torch.fx can trace; {type(module).__name__} cannot be "
                f"traced ({type(e).__name__}: {e}). Use --occlusion-mode plain"
            ) from e
    return _TRACES[module]


@dataclass
class Folded:
    """A traced model with batch norms folded into convolutions, and where each folded one came from."""

    gm: fx.GraphModule
    pairs: list[tuple[nn.Conv2d, nn.Conv2d, nn.BatchNorm2d]]  # (folded, conv, bn)
    key: tuple  # the modes, devices and dtypes it was built for

    def refresh(self) -> fx.GraphModule:
        """The folded weights recomputed from the model's current ones (one pass over them)."""
        with torch.no_grad():
            for folded, conv, bn in self.pairs:
                w, b = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
                )
                folded.weight.copy_(w)
                folded.bias.copy_(b)
        return self.gm


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fold_key(module: nn.Module) -> tuple:
    tensors = (*module.parameters(), *module.buffers())
    return tuple(m.training for m in module.modules()), tuple((t.device, t.dtype) for t in tensors)


def fold_batch_norms(module: nn.Module) -> fx.GraphModule:
    """``module`` traced, each eval-mode ``BatchNorm2d`` that only follows a ``Conv2d`` folded into it.

    One convolution instead of a convolution and a batch norm, on every box and full map: the same
    values up to float rounding. The folded convolutions are new modules; their weights are
    recomputed from the model's at every call (a model trained between sweeps is never stale); the
    other layers are the model's own, and the model is left as it was. The structure is memoised
    per module, its modes, devices and dtypes.
    """
    key = _fold_key(module)
    memo = _FOLDED.get(module)
    if memo is not None and memo.key == key:
        return memo.refresh()
    gm = trace(module)
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    pairs = []
    for node, prev, conv, bn in foldable_pairs(out):
        if type(conv) is not nn.Conv2d:  # the boxes are 2-d
            continue
        name = f"camshaft_folded_{len(pairs)}"
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: refreshed in any mode later
            folded = fuse_conv_bn_eval(conv, bn)
        out.add_submodule(name, folded)
        pairs.append((folded, conv, bn))
        prev.target = name
        node.replace_all_uses_with(prev)
        out.graph.erase_node(node)
    if pairs:
        out.delete_all_unused_submodules()
        out.recompile()
    _FOLDED[module] = Folded(out, pairs, key)
    return out


class _Pass:
    """One batch of P occluded variants of one image through the graph."""

    def __init__(
        self,
        gm: fx.GraphModule,
        env: dict,
        sources: dict,
        full_fraction: float,
        memory_format: torch.memory_format,
        geometry: dict | None = None,
    ):
        self.gm, self.env, self.sources, self.full_fraction = gm, env, sources, full_fraction
        self.memory_format = memory_format
        # (node, use) -> its boxes and read plans: they depend on the positions only, so a sweep keeps
        # them for every image of a batch of positions
        self.geometry = {} if geometry is None else geometry
        self.dyn: dict[fx.Node, Region | Full] = {}
        self.full: dict[fx.Node, torch.Tensor] = {}  # materialised regions
        self.owned: set[fx.Node] = set()  # nodes whose crop this pass allocated (not a view of another's)

    def value(self, n: Any, *, full: bool) -> Any:
        """A node argument: its static value, its Region (or its full tensor when ``full``)."""
        if not isinstance(n, fx.Node):
            return n
        v = self.dyn.get(n)
        if v is None:
            return self.env[n]
        if isinstance(v, Full):
            return v.value
        if not full:
            return v
        if n not in self.full:
            plan = self.planned((n, "full"), lambda: plan_full(v))
            self.full[n] = materialize(plan, v.crop, self.source(v.base), self.memory_format)
        return self.full[n]

    def planned(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``geometry[key]``, made by ``make()`` the first time (for the first image of the positions)."""
        if key not in self.geometry:
            self.geometry[key] = make()
        return self.geometry[key]

    def source(self, base: torch.Tensor, pad=(0, 0, 0, 0), value: float = 0.0) -> torch.Tensor:
        """``source(base, pad, value)``, kept for the image's whole sweep (bases live as long)."""
        key = (id(base), pad, value)
        if key not in self.sources:
            self.sources[key] = source(base, pad, value)
        return self.sources[key]

    def args(self, node: fx.Node, *, full: bool) -> tuple[tuple, dict]:
        return fx.node.map_arg((node.args, node.kwargs), lambda a: self.value(a, full=full))

    def run(self, node: fx.Node) -> Region | Full:
        if any(isinstance(self.dyn.get(a), Full) for a in node.all_input_nodes):
            return self.as_full(node)
        args, kwargs = self.args(node, full=False)
        out = None
        if node.op == "call_module":
            out = self.module(node, self.gm.get_submodule(node.target), args, kwargs)
        elif node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS and args and isinstance(args[0], Region):
            if all(not isinstance(a, Region) for a in args[1:]) and set(kwargs) <= {"inplace"}:
                r = args[0]
                out = Region(_POINTWISE_FUNCTIONS[node.target](r.crop), r.top, r.left, self.env[node])
        elif node.op == "call_function" and node.target in _BINARY and not kwargs:
            out = self.binary(node, args)
        if out is None:
            return self.as_full(node)
        # the crop is this node's own when it is new, or taken over from its one reader's input
        shared = [a for a in node.all_input_nodes if isinstance(self.dyn.get(a), Region) and self.dyn[a].crop is out.crop]
        if all(a in self.owned and len(a.users) == 1 for a in shared):
            self.owned.add(node)
        return out

    def as_full(self, node: fx.Node) -> Full:
        """The node run as usual on full tensors; an in-place op gets copies of cached values."""
        if modifies_input(self.gm, node):
            args, kwargs = fx.node.map_arg(
                (node.args, node.kwargs), lambda a: self.value(a, full=True) if a in self.dyn else _copy(self.env[a])
            )
        else:
            args, kwargs = self.args(node, full=True)
        return Full(_execute(self.gm, node, args, kwargs))

    def module(self, node: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Region | Full | None:
        if kwargs or len(args) != 1 or not isinstance(args[0], Region):
            return None
        r, base = args[0], self.env[node]
        fn = _pointwise_module(m)
        if type(m) is nn.ReLU and node.args[0] in self.owned and len(node.args[0].users) == 1:
            fn = lambda m, t: torch.relu_(t)  # noqa: E731  the crop is ours and read by nobody else
        if fn is not None:
            return Region(fn(m, r.crop), r.top, r.left, base)
        op = window_op(m)
        if op is None or base.dim() != 4:
            return None
        geometry = self.planned((node, "window"), lambda: self.window_geometry(op, r, base))
        if geometry is None:
            return None
        top, left, pad, plan = geometry
        win = apply_read(plan, r.crop, self.source(r.base, pad, op.pad_value))
        return Region(op.run(win), top, left, base)

    def window_geometry(self, op: WindowOp, r: Region, base: torch.Tensor):
        """(top, left, pad, read plan) of a window op's output boxes, or None where it goes full."""
        axes = [
            window_range(
                start, length, kernel=op.kernel[a], stride=op.stride[a], padding=op.padding[a],
                dilation=op.dilation[a], size_in=r.map_size[a], size_out=base.shape[2 + a],
            )
            for a, (start, length) in enumerate(((r.top, r.box[0]), (r.left, r.box[1])))
        ]
        (top, rows, bottom_pad), (left, cols, right_pad) = axes
        if rows * cols >= self.full_fraction * base.shape[2] * base.shape[3]:
            return None
        pad = (op.padding[0], bottom_pad, op.padding[1], right_pad)
        spans = zip((rows, cols), op.stride, op.kernel, op.dilation, strict=True)
        size = tuple((n - 1) * s + (k - 1) * d + 1 for n, s, k, d in spans)  # the input window per box
        return top, left, pad, plan_read(r, top * op.stride[0], left * op.stride[1], size, pad=pad)

    def binary(self, node: fx.Node, args: tuple) -> Region | None:
        regions = [a for a in args if isinstance(a, Region)]
        if any(r.base.shape != regions[0].base.shape for r in regions):
            return None
        if any(isinstance(a, torch.Tensor) and a.numel() > 1 and (a.dim() < 2 or a.shape[-2:] != (1, 1)) for a in args):
            return None  # a static operand that varies over space
        geometry = self.planned((node, "union"), lambda: self.union_geometry(args, regions))
        if geometry is None:
            return None
        top, left, plans = geometry
        crops = [a if plan is None else apply_read(plan, a.crop, self.source(a.base)) for a, plan in zip(args, plans)]
        return Region(node.target(*crops), top, left, self.env[node])

    def union_geometry(self, args: tuple, regions: list[Region]):
        """(top, left, a read plan per Region argument) of a binary op's boxes, or None where it goes full."""
        top, left, size = union(regions)
        if size[0] * size[1] >= self.full_fraction * regions[0].map_size[0] * regions[0].map_size[1]:
            return None
        return top, left, [plan_read(a, top, left, size) if isinstance(a, Region) else None for a in args]


class IncrementalModel:
    """A traced model that evaluates occluded variants of one image incrementally."""

    def __init__(
        self,
        module: nn.Module,
        *,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        full_fraction: float = FULL_FRACTION,
        memory_format: torch.memory_format = torch.contiguous_format,
    ):
        self.gm, self.autocast, self.full_fraction = fold_batch_norms(module), autocast, full_fraction
        self.memory_format = memory_format  # of the cached image and of regions turned full
        self.placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.last_regions: tuple[str, ...] = ()  # nodes the last batch computed on boxes only
        if len(self.placeholders) != 1:
            raise CapabilityError(
                f"incremental occlusion needs a model with one input; this one takes {len(self.placeholders)}"
            )

    def cache(self, x1: torch.Tensor) -> dict:
        """Every node's value for one unoccluded image (1, C, H, W)."""
        env: dict[fx.Node, Any] = {}
        with torch.inference_mode(), self.autocast():
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    env[node] = x1.contiguous(memory_format=self.memory_format)
                elif node.op != "output":
                    # an in-place op gets copies: the cache must keep every node's own value
                    get = (lambda a: _copy(env[a])) if modifies_input(self.gm, node) else env.__getitem__
                    env[node] = _execute(self.gm, node, *fx.node.map_arg((node.args, node.kwargs), get))
        return env

    def logits(self, env: dict, sources: dict, x_in: Region, geometry: dict | None = None) -> torch.Tensor:
        """Logits (P, N) of the variants whose input is the region ``x_in``.

        ``env`` is ``cache(image)``; ``sources`` a dict kept with it (padded cached activations);
        ``geometry`` a dict kept with the positions of ``x_in``, for any image (boxes, read plans).
        """
        p = _Pass(self.gm, env, sources, self.full_fraction, self.memory_format, geometry)
        with torch.inference_mode(), self.autocast():
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    p.dyn[node] = x_in
                elif node.op == "output":
                    out = p.value(node.args[0], full=True)
                elif any(a in p.dyn for a in node.all_input_nodes):
                    p.dyn[node] = p.run(node)
        self.last_regions = tuple(n.name for n, v in p.dyn.items() if isinstance(v, Region))  # for inspection
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x_in.crop.shape[0]:
            raise CapabilityError("incremental occlusion needs a model whose output is a logits tensor (B, N)")
        return out


def input_region(
    x1: torch.Tensor, fill1: torch.Tensor, grid: Grid, pos: torch.Tensor, geometry: dict | None = None
) -> Region:
    """The occluded inputs of one image as a Region: one window-sized box per position.

    ``geometry``: a dict kept with ``pos`` (as for ``IncrementalModel.logits``).
    """
    geometry = {} if geometry is None else geometry
    if "input" not in geometry:
        top, left, bottom, right = grid.boxes(pos)
        (h, w), (wh, ww) = grid.size, grid.window
        btop, bleft = top.clamp(max=h - wh), left.clamp(max=w - ww)  # cut border windows: shift the box in
        rows = btop[:, None] + torch.arange(wh)  # (P, wh)
        cols = bleft[:, None] + torch.arange(ww)
        inside = ((rows >= top[:, None]) & (rows < bottom[:, None]))[:, :, None] & (
            (cols >= left[:, None]) & (cols < right[:, None])
        )[:, None, :]
        first = box_starts(btop, bleft, w, x1.device)
        geometry["input"] = (btop, bleft, first, inside.to(x1.device, non_blocking=True)[:, None])
    btop, bleft, first, inside = geometry["input"]
    pixels = gather_boxes(source(x1), first, grid.window)
    fills = gather_boxes(source(fill1.expand_as(x1)), first, grid.window)
    return Region(torch.where(inside, fills, pixels), btop, bleft, x1)


def incremental_evaluator(model: IncrementalModel, x: torch.Tensor, fill: torch.Tensor, grid: Grid) -> Evaluator:
    """An evaluator over (image, position) pairs; one image's cache is kept at a time."""
    state: dict[str, Any] = {"image": None}
    geometries: collections.OrderedDict[bytes, dict] = collections.OrderedDict()  # per batch of positions

    def geometry(pos: torch.Tensor) -> dict:
        key = pos.cpu().numpy().tobytes()
        if key in geometries:
            geometries.move_to_end(key)
        else:
            geometries[key] = {}
            if len(geometries) > GEOMETRIES_KEPT:
                geometries.popitem(last=False)
        return geometries[key]

    def evaluate(img: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = []
        images, counts = torch.unique_consecutive(img, return_counts=True)
        for b, p in zip(images.tolist(), pos.split(counts.tolist()), strict=True):
            if state["image"] != b:
                state.update(image=None, env=None, sources=None)  # free the previous image first
                state.update(image=b, env=model.cache(x[b : b + 1]), sources={})
            g = geometry(p)
            region = input_region(x[b : b + 1], fill[b : b + 1], grid, p, g)
            out.append(model.logits(state["env"], state["sources"], region, g))
        return torch.cat(out)

    return evaluate
