"""TorchScript and torch.export files that ``camshaft export`` did not write, made torch models camshaft can tap.

Such a file carries no taps and no metadata. It is converted into an FX graph of ATen operations (a
TorchScript file by torch's TorchScript-to-``torch.export`` converter, a .pt2 file is one already)
whose nodes are the taps (``camshaft inspect FILE`` lists them with their shapes), so that every
method, backend and exporter serves it as it serves a torch model. The graph is checked against the
file itself before a run uses it: on the run's input size, the file and the graph must agree, and an
input size the conversion does not hold for (a model made for one size only) is refused.
"""

from __future__ import annotations

import logging
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import sympy
import torch
from torch import fx, nn

from camshaft.errors import ConfigError

META_ENTRY = "/extra/camshaft/meta.json"  # where camshaft's exporters put their metadata in the archive
PARITY_RTOL = 1e-4  # the converted graph against the file, relative to the logits' scale
SAMPLE_BATCH = 2  # torch.export keeps a dimension of size 0 or 1 static: the sample batch is 2


def has_camshaft_meta(path: Path) -> bool:
    """Whether an archive (TorchScript or .pt2) was written by ``camshaft export``."""
    with zipfile.ZipFile(path) as z:
        return any(n.endswith(META_ENTRY) for n in z.namelist())


def convert(path: Path, kind: str, input_size: tuple[int, int]) -> tuple[nn.Module, Callable, tuple | None]:
    """The graph module of the model in ``path`` (``kind`` torchscript or pt2), its check, and the one
    input size (H, W) it takes (None: any).

    ``check(input_size)`` raises a ConfigError when the graph does not hold at that input size or
    differs from the file there.
    """
    h, w = input_size
    sample = torch.zeros(SAMPLE_BATCH, 3, h, w)
    if kind == "torchscript":
        original = _load_torchscript(path)
        program = _torchscript_program(original, sample, path)
    else:
        from camshaft.exporters.pt2 import _load_program

        program = _load_program(str(path), path)
        original = None
    batch, channels, h, w = _input_shape(program, path)
    if isinstance(channels, int) and channels != 3:
        if w == 3:  # (N, H, W, 3)
            raise ConfigError(f"{path}: the model takes channels-last images (N, {channels}, {h}, 3); camshaft feeds "
                              "a torch model (N, 3, H, W) batches: save it inside a module that permutes them first "
                              "(x.permute(0, 2, 3, 1)), or export it to ONNX (ONNX files of either layout run)")
        raise ConfigError(f"{path}: the model takes {channels}-channel images; camshaft feeds a classifier RGB images "
                          "(N, 3, H, W)")
    if isinstance(batch, int):
        raise ConfigError(
            f"{path}: exported for batches of exactly {batch} image(s) (torch.export's shapes are static unless "
            "told otherwise); export it with a dynamic batch dimension (dynamic_shapes=({0: torch.export.Dim"
            "('batch')},)), or export the original model with `camshaft export --format pt2`"
        )
    fixed = (h, w) if isinstance(h, int) and isinstance(w, int) else None
    guarded = program.module()  # with torch.export's shape guards: the reference the plain graph is checked on
    plain = _plain(guarded, path)
    batches = _batch_range(program, batch)
    checked: set[tuple[int, int]] = set()

    def check(size: tuple[int, int]) -> None:
        if tuple(size) not in checked:
            _check(plain, guarded, original, tuple(size), path, batches)
            checked.add(tuple(size))

    return plain, check, fixed


def _input_shape(program, path: Path) -> list:
    """The image input's shape: ints where static, symbols where the program takes any size."""
    user = torch.export.graph_signature.InputKind.USER_INPUT
    inputs = [s for s in program.graph_signature.input_specs if s.kind == user]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    shapes = [list(nodes[s.arg.name].meta["val"].shape) for s in inputs if s.arg.name in nodes]
    if len(shapes) != 1 or len(shapes[0]) != 4:
        raise ConfigError(f"{path}: the model takes {len(inputs)} input(s) of shape(s) {shapes}; camshaft feeds a "
                          "classifier one image batch (N, 3, H, W)")
    return [int(d) if isinstance(d, int) else d for d in shapes[0]]


def _batch_range(program, batch) -> tuple[int, int | None]:
    """The batch sizes the program's guards accept, ``(lowest, highest or None)``: an export with
    ``Dim("batch", min=2)`` (the usual way round torch.export's 0/1 specialisation) refuses a batch of 1."""
    expr = getattr(getattr(batch, "node", None), "expr", None)
    bounds = program.range_constraints.get(expr) if expr is not None else None
    if bounds is None:
        return 1, None
    lo = int(bounds.lower) if isinstance(bounds.lower, sympy.Integer) else 1
    hi = int(bounds.upper) if isinstance(bounds.upper, sympy.Integer) else None
    return max(lo, 1), hi


def _within(guarded: nn.Module, lo: int, hi: int | None) -> Callable:
    """``guarded`` on any batch: a smaller batch than it accepts is padded with copies of its first image (the
    images of a batch are independent in inference), a larger one runs in parts; the extra rows are dropped."""

    def run(x: torch.Tensor):
        n = x.shape[0]
        if n < lo:
            return _only_tensor(guarded(torch.cat([x, x[:1].expand(lo - n, *x.shape[1:])])))[:n]
        if hi is not None and n > hi:
            return torch.cat([run(part) for part in x.split(hi)])
        return _only_tensor(guarded(x))

    return run


def _only_tensor(out):
    """The logits of a forward that returns them alone in a container (``{"logits": t}``, ``(t,)``), as the
    converted graph returns them; any other value as it is."""
    leaves = torch.utils._pytree.tree_leaves(out)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], torch.Tensor) else out


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation
        return torch.jit.load(str(path), map_location="cpu").eval()


def _torchscript_program(module: torch.jit.ScriptModule, sample: torch.Tensor, path: Path):
    try:  # torch's own converter, not yet public API: a torch without it says so plainly
        from torch._export.converter import TS2EPConverter
    except ImportError as e:
        raise ConfigError(f"{path}: a TorchScript file without camshaft metadata, and this torch "
                          f"({torch.__version__}) has no TorchScript converter; export the original model with "
                          "`camshaft export`") from e

    h, w = sample.shape[-2:]
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # logs a failed shape check before raising it
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # buffers the graph never reads (num_batches_tracked) are named
            return TS2EPConverter(module, (sample,)).convert()
    except Exception as e:  # noqa: BLE001 - the converter raises many types; each is the same refusal
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        if "channels" in reason:
            raise ConfigError(f"{path}: the model does not take 3-channel images at a {h}x{w} input ({reason}); "
                              "camshaft feeds a classifier RGB images (N, 3, H, W)") from e
        raise ConfigError(
            f"{path}: a TorchScript file without camshaft metadata, which camshaft converts to a graph it can tap; "
            f"the conversion failed at a {h}x{w} input ({type(e).__name__}: {reason}). If the model takes another "
            "input size, give --input-size; else export the original model with `camshaft export`"
        ) from e
    finally:
        quiet.setLevel(level)


def _plain(guarded: fx.GraphModule, path: Path) -> fx.GraphModule:
    """``guarded``'s graph as a plain module: one tensor in, the logits out, no shape guards (they would stop
    symbolic tracing, which tapping uses), every tensor it reads a buffer (moved with ``.to``), its ReLUs modules."""
    graph, env = fx.Graph(), {}
    for node in guarded.graph.nodes:
        if (node.op == "call_module" and node.target == "_guards_fn") or _runtime_assertion(node):
            continue
        if node.op == "output":
            outs = node.args[0]
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            if len(outs) != 1:
                raise ConfigError(f"{path}: the model returns {len(outs)} outputs; camshaft explains a classifier "
                                  "whose forward returns its logits")
            graph.output(env[outs[0]])
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ConfigError(f"{path}: the model takes {len(inputs)} inputs; camshaft feeds a classifier one image batch")
    _out_of_place(graph)
    _sizes_as_methods(graph)
    graph.eliminate_dead_code()  # what only the assertions read
    module = fx.GraphModule(guarded, graph)
    # every tensor it reads a buffer: lifted constants go to the device with the module, and a .pt2 file's
    # parameters are not listed as layers and taps (torchvision's tracer makes a node of each parameter it reads)
    for node in graph.nodes:
        if node.op == "get_attr":
            owner_name, _, name = node.target.rpartition(".")
            owner = module.get_submodule(owner_name)
            value = getattr(owner, name)
            if isinstance(value, torch.Tensor) and name not in owner._buffers:
                delattr(owner, name)
                owner.register_buffer(name, value.detach())
    _relu_modules(module)
    return module.eval()


def _sizes_as_methods(graph: fx.Graph) -> None:
    """``aten.sym_size`` calls, and the shape operations reading them, as tensor methods (``x.size(0)``,
    ``x.view(...)``): ``torch.jit.trace`` (the TorchScript export) records a method's sizes as the input's, where
    an ATen call's sizes are plain numbers, so a traced ShuffleNet kept the batch size of its probe.
    Runs after ``_out_of_place``, which reads views from their ATen schemas."""
    for node in list(graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or node.kwargs:
            continue
        name = target.overloadpacket.__name__
        if target is torch.ops.aten.sym_size.int:
            method = "size"
        elif (name in _SHAPE_METHODS and target._overloadname == "default" and len(node.args) == 2
              and isinstance(node.args[1], (list, tuple)) and any(isinstance(a, fx.Node) for a in node.args[1])):
            method = _SHAPE_METHODS[name]
        else:
            continue
        with graph.inserting_before(node):
            call = graph.call_method(method, node.args)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)


_SHAPE_METHODS = {"view": "view", "_unsafe_view": "view", "reshape": "reshape", "expand": "expand"}


def _runtime_assertion(node: fx.Node) -> bool:
    """A shape assertion torch.export put in the graph (``_assert_scalar``): impure to FX, so a head cut at a tap
    would keep it, and the input sizes it reads. The plain graph runs only at input sizes it was checked on."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.overloadpacket.__name__ in _ASSERTIONS)


_ASSERTIONS = frozenset({"_assert_scalar", "_assert_async", "_assert_tensor_metadata", "sym_constrain_range",
                         "sym_constrain_range_for_size"})


def _relu_modules(module: fx.GraphModule) -> None:
    """Each ``relu`` call becomes a call of its own ``nn.ReLU``, which guided backpropagation rewires (it reaches
    ReLU modules only). The modules take the names torchvision's tracer gives the calls, so taps keep theirs."""
    relus = [n for n in module.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.relu.default
             and len(n.args) == 1 and not n.kwargs]
    for i, node in enumerate(relus):
        name = "relu_default" if i == 0 else f"relu_default_{i}"
        if hasattr(module, name):  # a module of the model's own by that name: the call stays a call
            continue
        module.add_submodule(name, nn.ReLU())
        with module.graph.inserting_before(node):
            call = module.graph.call_module(name, node.args)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        module.graph.erase_node(node)
    module.recompile()


def _out_of_place(graph: fx.Graph) -> None:
    """Make in-place operations (``relu_``, ``add_``) out of place where nothing reads their input after them.

    An in-place operation is impure to FX: dead-code elimination keeps it, so the head cut at a tap would
    keep the whole trunk. ``ExportedProgram.run_decompositions`` would make the graph functional too,
    but it also turns ``flatten`` into a ``view`` sized from the model's input, which no head cut at a tap
    can have. The operations left in place are those whose input, or any view of the same memory, is read
    after them: the head keeps them.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not node.args:
            continue
        name = target.overloadpacket.__name__
        args = target._schema.arguments
        if not (name.endswith("_") and not name.startswith("_") and args and args[0].alias_info is not None
                and args[0].alias_info.is_write):
            continue
        packet = getattr(torch.ops.aten, name[:-1], None)
        functional = getattr(packet, target._overloadname, None) if packet is not None else None
        if functional is None or functional._schema.is_mutable:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        if all(order[u] <= order[node] for a in _aliases(source, node) for u in a.users):
            node.target = functional


def _aliases(node: fx.Node, skip: fx.Node) -> set[fx.Node]:
    """The nodes that share ``node``'s memory, linked through views and in-place operations either way;
    not through ``skip`` (the operation asking)."""
    found, todo = {node, skip}, [node]
    while todo:
        n = todo.pop()
        linked = [n.args[0]] if _aliasing(n) and isinstance(n.args[0], fx.Node) else []
        linked += [u for u in n.users if _aliasing(u) and u.args and u.args[0] is n]
        for m in linked:
            if m not in found:
                found.add(m)
                todo.append(m)
    return found - {skip}


def _aliasing(node: fx.Node) -> bool:
    """Whether ``node``'s output is its first input's memory (a view, or an in-place operation)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not node.args:
        return False
    returns = target._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def _check(plain: nn.Module, guarded: nn.Module, original, input_size: tuple[int, int], path: Path,
           batches: tuple[int, int | None] = (1, None)) -> None:
    """``plain`` against the file at ``input_size``, on batches of 1 and 3 (the graph was made on 2); the file
    runs a batch its guards refuse padded or in parts (``_within``)."""
    h, w = input_size
    device = next((t.device for t in [*plain.parameters(), *plain.buffers()]), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for batch in (1, SAMPLE_BATCH + 1):
        x = torch.randn(batch, 3, h, w, generator=gen).to(device)
        with torch.no_grad():
            try:
                reference = _within(guarded.to(device), *batches)(x)
            except AssertionError as e:  # a guard: the graph was made for sizes this one is not
                raise ConfigError(f"{path}: the model's graph does not hold for a {h}x{w} input ({e}); give the "
                                  "input size it takes with --input-size") from e
            except RuntimeError as e:
                raise ConfigError(f"the model cannot run on a {h}x{w} input (choose another --input-size): "
                                  f"{e}") from e
            # a .pt2's program is the model; a TorchScript file is checked against itself
            want = reference if original is None else _only_tensor(original.to(device)(x))
            got = plain(x)
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            shape = tuple(want.shape) if isinstance(want, torch.Tensor) else type(want).__name__
            raise ConfigError(f"{path}: the converted graph returns {tuple(got.shape)}, the file {shape}")
        err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        if not err <= PARITY_RTOL:
            raise ConfigError(f"{path}: the graph camshaft made of the file differs from it by {err:.1e} (relative, "
                              f"on {batch} {h}x{w} image(s); at most {PARITY_RTOL:g} is accepted): export the "
                              "original model with `camshaft export` instead")
