"""Taps: named intermediate outputs of a model, and the model that returns them.

A tapped model's forward returns ``(logits, {tap: activation})``. It is built with torchvision's
FX feature extraction where the model traces (taps may then be module paths such as ``layer4`` or
FX node names such as densenet's functional ``relu``), and with forward hooks on modules otherwise.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torchvision.models import feature_extraction
from torchvision.models.feature_extraction import create_feature_extractor

from camshaft.errors import ConfigError, UnknownNameError

LOGITS = "__camshaft_logits__"
_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv})
_TAP_COPY = "camshaft_tap_copy"  # meta flag of the copies ``_keep_tap_values`` inserts


@dataclass(frozen=True)
class TapPlan:
    """How taps are read from a model: FX nodes in execution order, or hooked modules.

    A node's name is the path of the module it calls (``_1``, ``_2`` added for its second and third
    calls: ``layer1.0.relu_1``), else torchvision's name for it (``add``: a function). torchvision's
    own names drop a module path's ``_N`` ending (ViT's ``ln_1`` is its node ``ln``, ``ln_2`` its node
    ``ln_1``), so a module path could name another layer; ``fx_names`` maps a name back to
    torchvision's where they differ.
    """

    nodes: tuple[str, ...]  # execution order; node names as above, or module paths for hooks
    output: str | None  # the FX node producing the logits (None with hooks)
    traceable: bool
    fx_names: dict[str, str] = field(default_factory=dict)  # name -> torchvision's node name, where they differ

    def fx(self, name: str) -> str:
        """torchvision's name of the node named ``name`` (what ``create_feature_extractor`` takes)."""
        return self.fx_names.get(name, name)


def plan_taps(model: nn.Module) -> TapPlan:
    """Trace ``model`` once (eval mode) and list the places a tap can read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nodes, fx_names = _node_names(model)
        return TapPlan(nodes=tuple(nodes), output=nodes[-1], traceable=True, fx_names=fx_names)
    except Exception:  # noqa: BLE001 - any tracing failure means: use hooks
        paths = tuple(name for name, _ in model.named_modules() if name)
        return TapPlan(nodes=paths, output=None, traceable=False)


def _node_names(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The eval-mode graph's node names in execution order (a module call named by the module's path), and
    the names that differ from torchvision's. torchvision's tracer, with the leaves and wrapped functions
    ``get_graph_node_names`` and ``create_feature_extractor`` give it, so that the graphs are the same."""
    defaults = getattr(feature_extraction, "_set_default_tracer_kwargs", None)  # torchvision's own, private
    if defaults is None:  # another torchvision: its names as they are
        return list(feature_extraction.get_graph_node_names(model)[1]), {}
    tracer = feature_extraction.NodePathTracer(**defaults(None))
    training = model.training
    try:
        tracer.trace(model.eval())
    finally:
        model.train(training)
    names: list[str] = []
    fx_names: dict[str, str] = {}
    calls: Counter = Counter()
    taken: set[str] = set()
    for node, qualname in tracer.node_to_qualname.items():
        name = qualname
        if node.op == "call_module":  # the path; a repeated call numbered as torchvision numbers them: relu_1
            name = f"{node.target}_{calls[node.target]}" if calls[node.target] else node.target
            calls[node.target] += 1
        if name in taken:  # a name another node has: this one keeps torchvision's
            name = qualname
        while name in taken:
            name += "'"
        names.append(name)
        taken.add(name)
        if name != qualname:
            fx_names[name] = qualname
    return names, fx_names


def module_paths(model: nn.Module, *, depth: int = 2) -> list[str]:
    """Module paths up to ``depth`` levels, the names users usually pick as taps."""
    return [n for n, _ in model.named_modules() if n and n.count(".") < depth]


def resolve_tap(plan: TapPlan, model: nn.Module, tap: str) -> str:
    """The FX node (or hooked module) that ``tap`` names; unknown names list the valid ones."""
    if tap in plan.nodes:
        return tap
    inside = [n for n in plan.nodes if n.startswith(tap + ".")]
    if plan.traceable and inside:
        return inside[-1]  # a container's output is its last node
    raise UnknownNameError(
        "tap",
        tap,
        module_paths(model),
        hint="Any module path or FX node works; `camshaft inspect MODEL` lists them with shapes",
    )


def order_taps(plan: TapPlan, model: nn.Module, taps: Sequence[str]) -> list[tuple[str, str]]:
    """``[(tap, node)]`` sorted in execution order (the first is where the split happens)."""
    if not taps:
        raise ConfigError("at least one tap is needed")
    if len(set(taps)) != len(taps):
        raise ConfigError(f"taps must be distinct, received {list(taps)}")
    resolved = [(t, resolve_tap(plan, model, t)) for t in taps]
    if plan.traceable:
        rank = {n: i for i, n in enumerate(plan.nodes)}
        resolved.sort(key=lambda tn: rank[tn[1]])
    return resolved


class TappedModel(nn.Module):
    """``forward(x) -> (logits, {tap: activation})`` over a frozen, eval-mode model.

    ``taps`` lists the taps in execution order (with hooks, known after the first forward).

    With ``leaf_first=True`` the first tap's activation is detached and made to require grad,
    so autograd can differentiate class scores w.r.t. it while never recording the trunk below.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str], *, plan: TapPlan | None = None):
        super().__init__()
        plan = plan or plan_taps(model)
        self.taps = [t for t, _ in order_taps(plan, model, taps)]
        self._nodes = dict(order_taps(plan, model, taps))
        self.traceable = plan.traceable
        if plan.traceable:
            logits = [t for t, node in self._nodes.items() if node == plan.output]
            if logits:
                raise ConfigError(
                    f"tap {logits[0]!r} is the layer that outputs the logits, not a feature map: tap a layer "
                    "before it (camshaft inspect lists them)"
                )
            return_nodes = {plan.fx(node): tap for tap, node in self._nodes.items()}
            return_nodes[plan.fx(plan.output)] = LOGITS
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.graph_module = _keep_tap_values(create_feature_extractor(model, return_nodes=return_nodes))
            self.leaf_module = _with_leaf(self.graph_module, self.taps[0])
        else:
            self.model = model
        self.eval()

    def forward(self, x: torch.Tensor, leaf_first: bool = False):
        if self.traceable:
            out = dict((self.leaf_module if leaf_first else self.graph_module)(x))
            logits = out.pop(LOGITS)
            return logits, {t: out[t] for t in self.taps}
        with _hooked(self.model, self._nodes, leaf_first=leaf_first) as store:
            logits = self.model(x)
        missing = [t for t in self.taps if t not in store]
        if missing:
            raise RuntimeError(f"taps {missing} were not reached by the forward pass")
        self.taps = list(store)  # hooks fire in execution order: the first one is where gradients start
        return logits, {t: store[t] for t in self.taps}


def modifies_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether FX ``node`` writes into its first argument (in-place module, method or function)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(node.kwargs.get("inplace")) or node.target in _INPLACE_OPERATORS or name.endswith("_")
    return False


def _keep_tap_values(gm: fx.GraphModule) -> fx.GraphModule:
    """Taps whose value the model overwrites later (``bn1`` before an in-place ReLU, a residual
    branch before ``+=``) are returned as a copy taken when they are computed; the model's own data
    flow is unchanged."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    changed = False
    for node, alias in _output_aliases(out_node).items():
        if alias == LOGITS or not any(u.args and u.args[0] is node and modifies_input(gm, u) for u in node.users):
            continue
        with gm.graph.inserting_after(node):
            copy = gm.graph.call_method("clone", (node,))
        copy.meta[_TAP_COPY] = True
        out_node.replace_input_with(node, copy)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def tap_source(node: fx.Node) -> fx.Node | None:
    """The node a tap copy (``_keep_tap_values``) was taken from, or None for any other node."""
    return node.args[0] if node.meta.get(_TAP_COPY) else None


def _with_leaf(gm: fx.GraphModule, tap: str) -> fx.GraphModule:
    """A copy of ``gm`` whose output named ``tap`` is cut from the graph below it."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    tap_node = next(n for n, alias in _output_aliases(out_node).items() if alias == tap)
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node is tap_node:
            detached = graph.call_method("detach", (env[node],))
            env[node] = graph.call_method("requires_grad_", (detached,))
            if tap_source(node) is not None:  # the model goes on from a copy of the leaf, which it overwrites
                env[tap_source(node)] = graph.call_method("clone", (env[node],))
    return fx.GraphModule(gm, graph)


def _output_aliases(out_node: fx.Node) -> dict[fx.Node, str]:
    (outputs,) = out_node.args
    return {node: alias for alias, node in outputs.items()}


@contextlib.contextmanager
def _hooked(model: nn.Module, nodes: dict[str, str], *, leaf_first: bool) -> Iterator[dict]:
    """Forward hooks recording each tap's output; removed on exit whatever happens."""
    store: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def make_hook(tap: str):
        def hook(_module, _inputs, output):
            if tap in store:
                raise RuntimeError(f"tap {tap!r} is called more than once per forward")
            if not isinstance(output, torch.Tensor):
                raise ConfigError(f"tap {tap!r} outputs {type(output).__name__}, not a tensor")
            if leaf_first and not store:  # the first tap the forward reaches
                output = output.detach().requires_grad_(True)
            store[tap] = output
            # the model goes on with a copy: an in-place op after the module (a ReLU, +=) would
            # overwrite the tap's value (hooks cannot see whether one follows)
            return output.clone()

        return hook

    handles = [modules[node].register_forward_hook(make_hook(tap)) for tap, node in nodes.items()]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
