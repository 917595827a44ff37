"""Split a tapped model at its first tap: a forward-only trunk and a small differentiable head.

Gradient methods need gradients only *above* the tap. The trunk (input -> first tap) can then run
on the fastest runtime there is (ONNX Runtime, frozen TorchScript) and the head (first tap ->
logits and the later taps) where autograd is cheap. The split exists only where the first tap
cuts the graph: every path from the input to the logits passes through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from camshaft.models.taps import LOGITS, TappedModel, _output_aliases, tap_source


class Trunk(nn.Module):
    """``x -> first tap``."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)


class Head(nn.Module):
    """``first tap -> (logits, {tap: activation})``, the first tap included as given."""

    def __init__(self, gm: fx.GraphModule, first: str, later: list[str]):
        super().__init__()
        self.gm, self.first, self.later = gm, first, later

    def forward(self, a: torch.Tensor):
        out = self.gm(a)
        taps = {self.first: a}
        for t in self.later:
            taps[t] = out[t]
        return out[LOGITS], taps


@dataclass
class SplitModel:
    trunk: Trunk
    head: Head


def split_at_first_tap(tapped: TappedModel) -> SplitModel | None:
    """Trunk and head of ``tapped``, or None when the first tap does not cut the graph."""
    if not tapped.traceable:
        return None
    gm = tapped.graph_module
    first = tapped.taps[0]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    by_alias = {alias: node for node, alias in _output_aliases(out_node).items()}
    tap_node = by_alias[first]

    trunk = _subgraph(gm, output=tap_source(tap_node) or tap_node, replace=None)
    head_outputs = {alias: node for alias, node in by_alias.items() if alias != first}
    head = _subgraph(gm, output=head_outputs, replace=tap_node)
    if head is None:
        return None
    return SplitModel(Trunk(trunk), Head(head, first, tapped.taps[1:]))


def _subgraph(gm: fx.GraphModule, *, output, replace: fx.Node | None) -> fx.GraphModule | None:
    """Copy of ``gm`` returning ``output``; with ``replace``, that node becomes the input.

    Returns None when the copy still needs the original input (the node is no cut).
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    new_input = graph.placeholder("a") if replace is not None else None
    # a tap the model overwrites in place is a copy of its source: the head goes on from a copy
    # of its input, so the activation handed to it stays as it is
    source = tap_source(replace) if replace is not None else None
    original_inputs = []
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        if node is replace:
            env[node] = new_input
            continue
        if node is source:
            env[node] = graph.call_method("clone", (new_input,))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "placeholder":
            original_inputs.append(env[node])
    graph.output(fx.node.map_arg(output, lambda n: env[n]))
    sub = fx.GraphModule(gm, graph)
    sub.graph.eliminate_dead_code()
    if replace is not None:
        if any(p.users for p in original_inputs):
            return None
        for p in original_inputs:
            sub.graph.erase_node(p)
    sub.graph.lint()
    sub.delete_all_unused_submodules()
    sub.recompile()
    return sub
