"""The one interface every runtime presents to the methods, and the registry of runtimes."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from camshaft.errors import CapabilityError, ConfigError, UnknownNameError
from camshaft.models.classes import check_count
from camshaft.preprocess import Preprocess

FORWARD = "forward"
TAP_GRADIENTS = "tap_gradients"
INPUT_GRADIENTS = "input_gradients"  # d score / d input pixels
MODULE_HOOKS = "module_hooks"  # a live torch module whose layers a method may hook (guided backprop)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelInfo:
    """What a backend knows of its model: taps, head, preprocessing, class names."""

    taps: tuple[str, ...]  # execution order: gradients flow from the first
    num_classes: int
    preprocess: Preprocess
    class_names: tuple[str, ...] | None = None
    cam_weight: torch.Tensor | None = field(default=None, repr=False)  # (N, C) for taps[cam_tap]
    cam_tap: str | None = None
    source: str = ""
    # per image, as the tap outputs it: (C, h, w), channels last (h, w, C) or tokens (T, C) (models/layout.py)
    tap_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        check_count(self.class_names, self.num_classes, model=self.source or "the model")


@dataclass
class Output:
    """One batch through a backend. ``grads[tap]`` is (B, K, *tap) when asked for. Taps come as the model
    outputs them; ``methods.base.feature_map`` reads one as (B, C, h, w) (its gradients as (B, K, C, h, w))."""

    logits: torch.Tensor  # (B, N), float32
    taps: dict[str, torch.Tensor]  # tap -> (B, C, h, w), (B, h, w, C) or tokens (B, T, C)
    grads: dict[str, torch.Tensor] | None = None
    targets: torch.Tensor | None = None  # (B, K) class indices the maps are for
    input_grads: torch.Tensor | None = None  # (B, K, 3, H, W) when asked for


Selector = Callable[[torch.Tensor], torch.Tensor]  # logits (B, N) -> targets (B, K)


class Backend(Protocol):
    name: str
    info: ModelInfo
    device: torch.device
    capabilities: frozenset[str]
    memory_format: torch.memory_format  # the input layout the backend runs on (channels-last or contiguous)

    def forward(self, x: torch.Tensor) -> Output:
        """Logits and taps of a normalised float batch (B, 3, H, W)."""
        ...

    def tap_gradients(self, x: torch.Tensor, select: Selector) -> Output:
        """Also d logits[b, t[b, k]] / d tap for t = select(logits), in one batched backward."""
        ...

    def input_gradients(self, x: torch.Tensor, select: Selector) -> Output:
        """Also d logits[b, t[b, k]] / d x for t = select(logits): ``input_grads`` (B, K, 3, H, W)."""
        ...


BackendFactory = Callable[..., Backend]
_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    if name in _REGISTRY:
        raise ValueError(f"backend {name!r} is already registered")
    _REGISTRY[name] = factory


def _builtin() -> None:
    """Register the built-in backends on first use (imported lazily: they import exporters)."""
    import camshaft.engine.backends.registry  # noqa: F401


LIVE_BACKENDS = ("eager", "inductor")  # run the torch model itself; the others run a file exported from it

AUTO = "auto"  # eager for a torch model, the backend of its format for an exported file (``auto_backend``)


def backend_names() -> list[str]:
    _builtin()
    return list(_REGISTRY)


def backend_choices() -> list[str]:
    """What ``--backend`` takes: ``auto`` and every backend's name."""
    return [AUTO, *backend_names()]


def backend_factory(name: str, source=None) -> BackendFactory:
    """The factory of backend ``name``; ``auto`` needs the model's ``source`` (see ``auto_backend``)."""
    _builtin()
    if name == AUTO and source is not None:
        from camshaft.engine.backends.registry import auto_backend

        name = auto_backend(source)
    if name not in _REGISTRY:
        raise UnknownNameError("backend", name, _REGISTRY)
    return _REGISTRY[name]


ABLE = {
    FORWARD: "eager, inductor, torchscript, pt2, onnxruntime",
    INPUT_GRADIENTS: "eager, inductor, torchscript and pt2 (ONNX Runtime computes no gradients)",
    MODULE_HOOKS: "eager and inductor (the method modifies layers of a live torch model)",
    TAP_GRADIENTS: "eager and inductor (any torch model); torchscript, pt2, inductor and onnxruntime for files "
    "camshaft exported from a model whose first tap splits it (re-export with `camshaft export`; an ONNX file "
    "whose head is large carries it only with `--head`)",
}


CUDA_GRAPHS_BACKENDS = "CUDA graphs run on the eager, torchscript and pt2 backends (not inductor or onnxruntime)"


def require(backend: Backend, needs: frozenset[str], *, method: str) -> None:
    """Fail before any work when ``backend`` cannot serve what ``method`` needs."""
    missing = sorted(needs - backend.capabilities)
    if missing:
        able = "; ".join(f"{m}: {ABLE[m]}" for m in missing)
        at = f" at tap {backend.info.taps[0]!r}" if TAP_GRADIENTS in missing and backend.info.taps else ""
        raise CapabilityError(
            f"method {method!r} needs {', '.join(missing)}, which the {backend.name} backend cannot "
            f"give for {backend.info.source!r}{at}. Backends that can: {able}"
        )


def upload(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor (indices, parameters) on ``device``. To a GPU through pinned memory and
    asynchronously: a plain copy from pageable memory waits until the GPU has run everything queued."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # torch keeps the pinned block until the copy ran


def replays_graphs(backend) -> bool:
    """Whether ``backend``'s forward replays CUDA graphs (``--cuda-graphs``), one recorded per input shape. A method
    whose own forwards come in chunks (Score-CAM's masks, occlusion's windows) pads its last chunk to the full one:
    the last chunk's size changes from batch to batch, and each new size would record another graph (warm-up and
    capture: a few forwards), evicting the ones kept. The padding costs under one forward."""
    return "full" in (getattr(backend, "graphs", None) or {})


def resolve_device(device: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; None picks cuda when available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"invalid device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def resolve_memory_format(name: str, module: torch.nn.Module | None) -> torch.memory_format:
    """The layout image batches enter a torch model in; ``auto``: channels-last for convnets."""
    if name not in MEMORY_FORMATS:
        raise UnknownNameError("memory format", name, MEMORY_FORMATS)
    if name == "auto":
        name = "channels_last" if module is not None and _has_conv2d(module) else "contiguous"
    return torch.channels_last if name == "channels_last" else torch.contiguous_format


def _has_conv2d(module: torch.nn.Module) -> bool:
    """Conv2d modules (eager, TorchScript) or 2-d convolution ops (a torch.export graph module)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d) or getattr(m, "original_name", None) == "Conv2d":
            return True
        if isinstance(m, torch.fx.GraphModule) and any(_conv2d_call(m, n) for n in m.graph.nodes):
            return True
    return False


def _conv2d_call(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A 2-d convolution op: ``aten.conv2d``, or ``aten.convolution`` (a converted TorchScript file's) on a 4-d weight."""
    if node.op != "call_function":
        return False
    if "conv2d" in str(node.target):
        return True
    if node.target is not torch.ops.aten.convolution.default or len(node.args) < 2:
        return False
    weight = node.args[1]
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
        weight = operator.attrgetter(weight.target)(gm)
    elif isinstance(weight, torch.fx.Node):
        weight = weight.meta.get("val")
    return isinstance(weight, torch.Tensor) and weight.dim() == 4


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UnknownNameError("dtype", dtype, DTYPES)
    return DTYPES[dtype]


def one_hot_targets(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) class indices -> (K, B, N) one-hot grad_outputs for a batched backward."""
    b, k = targets.shape
    out = torch.zeros(k, b, num_classes, dtype=dtype, device=targets.device)
    out.scatter_(2, targets.T.unsqueeze(-1), 1.0)
    return out


def batched_grads(outputs: torch.Tensor, inputs: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
    """d outputs[b, t[b,k]] / d input for each input, (B, K, ...): one backward batched over K."""
    go = one_hot_targets(targets.to(outputs.device), outputs.shape[-1], outputs.dtype)
    if go.shape[0] == 1:
        grads = torch.autograd.grad(outputs, inputs, go[0], allow_unused=True)
        grads = [None if g is None else g.unsqueeze(0) for g in grads]
    else:
        grads = torch.autograd.grad(outputs, inputs, go, is_grads_batched=True, allow_unused=True)
    return [None if g is None else g.transpose(0, 1).float() for g in grads]  # (K, B, ...) -> (B, K, ...)


def batched_tap_grads(logits: torch.Tensor, taps: dict[str, torch.Tensor], targets: torch.Tensor) -> dict:
    """d logits[b, t[b,k]] / d tap for every tap: one backward batched over the K targets."""
    names = list(taps)
    out = {}
    for n, g in zip(names, batched_grads(logits, [taps[n] for n in names], targets), strict=True):
        if g is None:
            raise RuntimeError(f"the logits do not depend on tap {n!r}")
        out[n] = g
    return out
