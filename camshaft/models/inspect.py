"""What a model offers to explain: its layers with output shapes, the default tap, the CAM head."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from camshaft.engine.backends.torch_backend import frozen
from camshaft.errors import ConfigError
from camshaft.models.layout import as_maps, map_shape, token_grid
from camshaft.models.split import split_at_first_tap
from camshaft.models.taps import TapPlan, TappedModel, plan_taps


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str
    shape: tuple[int, ...] | None  # output shape for a batch of one, None if not a tensor


@dataclass(frozen=True)
class CamHead:
    """``logits = weight @ mean_hw(A) + bias`` for the tap A: the class activation map head."""

    tap: str
    linear: str  # module path of the linear layer
    weight: torch.Tensor  # (N, C)
    bias: torch.Tensor | None  # (N,)


@dataclass(frozen=True)
class ModelReport:
    layers: list[Layer]
    default_tap: str | None
    cam_head: CamHead | None
    num_classes: int


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (a model may be handed over already on a GPU)."""
    return next((t.device for t in model.parameters()), torch.device("cpu"))


def describe(model: nn.Module, *, input_size: tuple[int, int]) -> ModelReport:
    """List the layers of ``model`` with shapes for ``input_size`` and find tap and CAM head."""
    plan = plan_taps(model)
    x = probe_input(input_size, model_device(model))
    layers, logits, same = _layers(model, plan, x)
    default = _default_tap(model, layers, plan, same, x)
    head = find_cam_head(model, default, plan=plan, x=x) if default else None
    return ModelReport(layers, default, head, int(logits.shape[-1]))


def _layers(model: nn.Module, plan: TapPlan, x: torch.Tensor):
    """Layers in execution order with their output shapes, and the logits."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...] | None] = {}
    same: dict[str, str] = {}  # hooked module -> the shortest module path giving the same tensor
    with torch.inference_mode(), input_checked(x):
        if plan.traceable:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = create_feature_extractor(model, return_nodes={plan.fx(n): n for n in plan.nodes})
            outputs = gm(x)
            for name, value in outputs.items():
                shapes[name] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
            logits_value, order = outputs[plan.output], list(plan.nodes)
        else:
            with _record_all(model, shapes, same):
                logits_value = model(x)
            order = list(shapes)  # hooks fire in execution order
    layers = []
    for name in order:
        if name in shapes:
            kind = type(modules[name]).__name__ if name in modules else "function"
            layers.append(Layer(name, kind, shapes[name]))
    return layers, logits_value, same


@contextlib.contextmanager
def _record_all(model: nn.Module, shapes: dict, same: dict):
    seen: dict[int, str] = {}

    def make(name):
        def hook(_m, _i, out):
            shapes[name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            if isinstance(out, torch.Tensor):
                first = seen.setdefault(id(out), name)
                same[name] = min(first, name, key=lambda n: (n.count("."), len(n)))
                same[first] = same[name]

        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in model.named_modules() if n]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _default_tap(model: nn.Module, layers: list[Layer], plan: TapPlan, same: dict[str, str],
                 x: torch.Tensor) -> str | None:
    """The last spatial map before global pooling, named by the shortest module path ending there.

    A spatial map is (N, C, h, w), or channels last (N, h, w, C: ``camshaft.models.layout``), with h, w > 1.
    Adaptive pooling is not a feature map (VGG's resizes any map to 7x7): an ``nn.Adaptive*`` module, or
    the ``adaptive_*`` function node of a traced function or of a graph converted from a file.

    A transformer's tokens after that map (ViT's blocks after its patch embedding) are the map instead:
    the last tokens that tile a square and whose patch tokens still reach the classifier (``_reaching``).
    ViT reads its class token alone after the last block's attention, so that is the last block's
    ``ln_1`` (the layer pytorch-grad-cam's ViT example taps); a model pooling all its tokens, the last.
    """
    size = tuple(x.shape[-2:])

    def spatial(lay: Layer) -> bool:
        grid = map_shape(lay.shape[1:], size, tokens=False) if lay.shape and len(lay.shape) == 4 else None
        return (grid is not None and min(grid[1:]) > 1 and not lay.kind.startswith("Adaptive")
                and not (lay.kind == "function" and lay.name.startswith("adaptive_")))

    places = [i for i, lay in enumerate(layers) if spatial(lay)]
    if not places:
        return None
    last = layers[places[-1]].name
    if not plan.traceable:
        return same.get(last, last)
    tokens = [lay.name for lay in layers[places[-1] + 1:]
              if lay.shape and len(lay.shape) == 3 and map_shape(lay.shape[1:], size) is not None]
    if tokens:
        last = next((t for t in reversed(_reaching(model, plan, tokens, x)) if t), last)
    parts = last.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        inside = [n for n in plan.nodes if n == prefix or n.startswith(prefix + ".")]
        if inside and inside[-1] == last:
            return prefix
    return last


def _reaching(model: nn.Module, plan: TapPlan, tokens: list[str], x: torch.Tensor) -> list[str | None]:
    """Each token node whose patch tokens (all but a class token) move what the classifier reads, or None.

    The gradient, for one random image, of a random projection of the last layer's input: not of the
    logits, which a randomly initialised torchvision ViT's zero head leaves flat (and not of a plain sum,
    which a LayerNorm's output keeps constant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = create_feature_extractor(model, return_nodes={plan.fx(n): n for n in [*tokens, plan.output]})
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = dict(out_node.args[0])
    read = {f"camshaft_read_{i}": n for i, n in enumerate(outputs[plan.output].all_input_nodes)}
    out_node.args = ({**outputs, **read},)
    gm.recompile()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen).to(x.device)
    # weights off the tape: a tensor the image does not reach (ViT's position embedding) is off it too
    with frozen(model), torch.inference_mode(False), torch.enable_grad():
        out = gm(noise.requires_grad_())
        inputs = [out[k] for k in read if isinstance(out[k], torch.Tensor) and out[k].requires_grad]
        values = {t: out[t] for t in tokens if out[t].requires_grad}
        grads = {}
        if inputs and values:
            target = sum((t * torch.randn(t.shape, generator=gen).to(t)).sum() for t in inputs)
            grads = dict(zip(values, torch.autograd.grad(target, list(values.values()), allow_unused=True),
                             strict=True))
    reached = []
    for t in tokens:
        g, skip = grads.get(t), token_grid(out[t].shape[1])[0]
        reached.append(t if g is not None and bool(g[:, skip:].abs().amax() > 0) else None)
    return reached


def find_cam_head(model: nn.Module, tap: str, *, plan: TapPlan | None = None, x: torch.Tensor) -> CamHead | None:
    """Check numerically whether logits = W·GAP(A) + b for the tap A; return W and b if so."""
    plan = plan or plan_taps(model)
    tapped = TappedModel(model, [tap], plan=plan)
    with torch.inference_mode():
        logits, taps = tapped(x)
    a = taps[tap]
    if a.dim() != 4:
        return None
    size = x.shape[-2:]
    channels = as_maps(a, size, tokens=False).shape[1]  # a channels-last map's are its last axis
    linears = _linear_weights(model, (logits.shape[-1], channels))
    if not linears:
        return None
    name, linear = linears[-1]
    head = _head_function(tapped, model, tap, x)
    if head is None:
        return None
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        probe = torch.randn((2, *a.shape[1:]), generator=gen).to(a.device) * a.abs().mean().clamp_min(1e-3)
        with torch.inference_mode():
            got = head(probe)
            want = as_maps(probe, size, tokens=False).mean(dim=(2, 3)) @ linear.weight.T
            if linear.bias is not None:
                want = want + linear.bias
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * (1 + want.abs().max().item())):
            return None
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return CamHead(tap, name, linear.weight.detach().clone(), bias)


def _linear_weights(model: nn.Module, shape: tuple[int, int]) -> list[tuple[str, nn.Module | SimpleNamespace]]:
    """The linear layers (name, module with ``weight`` and ``bias``) whose weight has ``shape`` (classes, C):
    ``nn.Linear`` modules, or the plain modules holding a graph's weights (a model converted from a file)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and tuple(m.weight.shape) == shape]
    if found:
        return found
    for n, m in model.named_modules():  # a converted graph holds its weights as buffers
        weight = m._parameters.get("weight", m._buffers.get("weight"))
        bias = m._parameters.get("bias", m._buffers.get("bias"))
        if weight is not None and tuple(weight.shape) == shape and (bias is None or tuple(bias.shape) == shape[:1]):
            found.append((n, SimpleNamespace(weight=weight, bias=bias)))
    return found


def _head_function(tapped: TappedModel, model: nn.Module, tap: str, x: torch.Tensor):
    """``A -> logits`` for the tap: the split head, or the model with a hook replacing the tap."""
    split = split_at_first_tap(tapped)
    if split is not None:
        return lambda a: split.head(a)[0]
    modules = dict(model.named_modules())
    if tapped.traceable or tap not in modules:
        return None

    def run(a):
        h = modules[tap].register_forward_hook(lambda *_: a)
        try:
            return model(x.expand(a.shape[0], *x.shape[1:]))
        finally:
            h.remove()

    return run


@contextlib.contextmanager
def input_checked(x: torch.Tensor):
    """A model that cannot run on this input says so (a pooling layer's kernel larger than its map)."""
    try:
        yield
    except RuntimeError as e:
        h, w = x.shape[-2:]
        if _out_of_memory(e):
            raise ConfigError(f"a {h}x{w} input needs more memory than {x.device} has "
                              "(choose a smaller --input-size)") from e
        text = str(e)
        if "channels" in text:
            raise ConfigError(f"the model cannot run on a {h}x{w} input (camshaft feeds it RGB images, 3 channels): "
                              f"{e}") from e
        if any(word in text for word in _SHAPE_WORDS):
            raise ConfigError(f"the model cannot run on a {h}x{w} input (choose another --input-size): {e}") from e
        # not about the input's shape (a bug in the model's code, a dtype it does not take): no advice on size
        raise ConfigError(f"the model failed on a {h}x{w} test input: {e}") from e


_SHAPE_WORDS = ("size", "shape", "mat1 and mat2", "dimension")  # torch's words for an input of the wrong size


def probe_input(input_size: tuple[int, int], device) -> torch.Tensor:
    """A zero image batch of one at ``input_size``: the shapes probe; one too large for memory is a ConfigError."""
    try:
        return torch.zeros(1, 3, *input_size, device=device)
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        h, w = input_size
        raise ConfigError(f"a {h}x{w} input needs more memory than {torch.device(device)} has "
                          "(choose a smaller --input-size)") from e


def _out_of_memory(e: RuntimeError) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
