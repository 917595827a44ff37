"""The limits: what the hardware does for the same model when nothing is explained.

*The limit* is the best plain batched forward of the model on the device and dtype of the run,
under inference mode: the best of eager, channels_last, frozen TorchScript (``torch.jit.trace`` +
``torch.jit.freeze``, fed contiguous and channels-last batches) and ONNX Runtime (the session
options camshaft itself uses, the input and outputs bound where they lie, as the backend binds
them); on a CPU, for a model whose linear layers the eager backend runs as oneDNN convolutions,
channels_last with those too (``cl_onednn``). Gradient methods are also compared with *the
gradient limit*: that best forward plus the head above the tap run forward with a batched backward
of the K target scores to the tap (``head_backward``). Methods on input gradients are compared with
a forward and a batched backward to the pixels (``input_backward``: the faster of the model as given and
as the eager backend runs it). A method that runs larger forwards than its batch (occlusion, Score-CAM,
SmoothGrad) gets these limits again at that batch (``runner.limit_workloads``). With ``cuda_graphs`` (a run whose backends replay
CUDA graphs) the two fastest variants are also replayed from CUDA graphs (``GRAPH_VARIANTS``), so
graphed methods are held to a graphed forward. In a run that benchmarks the inductor backend, the
model compiled by TorchInductor as that backend compiles it (``inductor``) is a variant too: a backend
is never compared with a limit slower than its own forward.

Limits run on their own frozen copy of the model, so they share no state with backends or peers.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from camshaft.bench.workload import Skipped, Workload
from camshaft.errors import CamshaftError
from camshaft.exporters.onnx import quiet
from camshaft.models.cpu_linear import LinearsThroughOneDnn, cpu_linears

VARIANTS = ("eager", "channels_last", "torchscript", "torchscript_cl", "onnxruntime")
GRAPH_VARIANTS = ("channels_last_graph", "torchscript_cl_graph")  # only in runs with CUDA graphs
# only on a CPU, for a model with linear layers that camshaft.models.cpu_linear runs as oneDNN convolutions (the
# eager backend does): channels-last with those, so that the limit is no slower than what the backend runs
CPU_VARIANTS = ("cl_onednn",)
COMPILED_VARIANTS = ("inductor",)  # only in runs that benchmark the inductor backend


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy whose parameters never require gradients."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def forward_limits(
    model: nn.Module,
    x: torch.Tensor,
    *,
    dtype: torch.dtype,
    onnx_path: Path | None,
    key: str,
    attrs: dict,
    cuda_graphs: bool = False,
    compiled: bool = False,
) -> list[Workload | Skipped]:
    """One ``limit`` workload per variant for the batch ``x`` (or why a variant cannot run)."""
    x_cl = x.contiguous(memory_format=torch.channels_last)
    builders: dict[str, Callable[[], Callable[[], object]]] = {
        "eager": lambda: _eager(model, x, dtype),
        "channels_last": lambda: _eager(_cl_copy(model), x_cl, dtype),
        "torchscript": lambda: _torchscript(model, x, dtype),
        "torchscript_cl": lambda: _torchscript(model, x_cl, dtype),
        "onnxruntime": lambda: _onnxruntime(onnx_path, x, dtype),
    }
    if x.device.type == "cpu" and _routes_linears(model, x_cl, dtype):
        builders["cl_onednn"] = lambda: _eager(_cl_copy(model), x_cl, dtype, linears=True)
    if compiled:
        builders["inductor"] = lambda: _inductor(model, x, dtype)
    if cuda_graphs:
        builders["channels_last_graph"] = lambda: _graphed(_cl_copy(model), x_cl, dtype)
        builders["torchscript_cl_graph"] = lambda: _graphed(_traced(model, x_cl, dtype), x_cl, dtype)
    out: list[Workload | Skipped] = []
    b = x.shape[0]
    for variant, build in builders.items():
        k = f"{key}/limit/{variant}"
        try:
            fn = build()
        except (_Unavailable, CamshaftError) as e:  # e.g. no CUDA provider in ONNX Runtime
            out.append(Skipped(k, str(e)))
            continue
        out.append(Workload(k, "limit", fn, b, b, b, {**attrs, "variant": variant}))
    return out


class _Unavailable(Exception):
    """A limit variant that cannot run here (dtype, missing runtime, failed export)."""


def _eager(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, *, linears: bool = False) -> Callable[[], object]:
    def fn():
        with torch.inference_mode(), autocast(x.device, dtype), (cpu_linears(x.device) if linears else nullcontext()):
            model(x)

    return fn


def _routes_linears(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a forward of ``x`` runs any linear layer through oneDNN (``cpu_linear``): one forward of a copy."""
    mode = LinearsThroughOneDnn()
    try:
        with torch.inference_mode(), autocast(x.device, dtype), mode:
            _cl_copy(model)(x)
    except Exception:  # noqa: BLE001 - a model that fails here fails in the other variants, with its reason
        return False
    return mode.routed > 0


def _cl_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _traced(model: nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """Traced in float32 and frozen, as the TorchScript backend holds a model (``dtype`` is its autocast;
    on a GPU it freezes only a float32 run, and so does this)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x).eval()
        return torch.jit.freeze(traced) if x.device.type == "cpu" or dtype == torch.float32 else traced


def _graphed(model, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
    """The forward replayed from a CUDA graph, recorded here (a model it cannot hold is skipped)."""
    from camshaft.engine.backends.graphs import Graphed

    if x.device.type != "cuda":
        raise _Unavailable("CUDA graphs need a CUDA device")
    graphed = Graphed(model, autocast=None if dtype == torch.float32 else dtype)

    def fn():
        with torch.inference_mode():
            graphed(x)

    fn()  # records the graph (a GraphCaptureError is a CamshaftError: the variant is skipped)
    return fn


def _inductor(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
    """Compiled with frozen weights in the layout the backends give the model (compiled once, here)."""
    from camshaft.engine.backends.base import resolve_memory_format
    from camshaft.engine.backends.compiled import Compiled, check_compiler, grid_linears

    check_compiler(x.device)  # a ConfigError: the variant is skipped with the reason
    layout = resolve_memory_format("auto", model) if x.dim() == 4 else torch.contiguous_format
    compiled = Compiled(_folded(model, layout), grid_linears=grid_linears(x.device))
    x = x.contiguous(memory_format=layout)

    def fn():
        with torch.inference_mode(), autocast(x.device, dtype):
            compiled(x)

    fn()
    return fn


def _folded(model: nn.Module, layout: torch.memory_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy in ``layout`` with its batch norms folded into convolutions as the backends fold them
    (``camshaft.models.fold``: the graph of a model FX traces; another model is copied as it is)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    from camshaft.models.fold import fold_graphs
    from camshaft.models.taps import plan_taps

    model = copy.deepcopy(model).to(memory_format=layout)
    plan = plan_taps(model)
    if not plan.traceable:
        return model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = create_feature_extractor(model, return_nodes={plan.fx(plan.output): "logits"})
    fold_graphs([gm], memory_format=layout)
    return lambda x: gm(x)["logits"]


def _torchscript(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
    traced = _traced(model, x, dtype)

    def fn():
        with torch.inference_mode(), autocast(x.device, dtype):  # as the TorchScript backend runs it
            traced(x)

    return fn


def _onnxruntime(path: Path | None, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], object]:
    if dtype != torch.float32:
        raise _Unavailable("ONNX Runtime limit is measured in float32 only (as the backend runs)")
    if path is None or not path.is_file():
        raise _Unavailable("no ONNX export of the plain model (onnxruntime missing or the export failed)")
    from camshaft.engine.backends.onnx_backend import open_session

    session = open_session(path, x.device)
    x = x.detach().float().contiguous()
    kind, index = x.device.type, x.device.index or 0
    name, outputs = session.get_inputs()[0].name, [o.name for o in session.get_outputs()]

    def fn():  # the input read and the outputs written on the device, as the backend binds them
        binding = session.io_binding()
        binding.bind_input(name, kind, index, np.float32, tuple(x.shape), x.data_ptr())
        for output in outputs:
            binding.bind_output(output, kind, index)
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return fn


def export_plain_onnx(model: nn.Module, input_size: tuple[int, int], path: Path) -> Path | str:
    """The plain model as ONNX with a dynamic batch axis; returns the path, or why it failed."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed"
    example = torch.zeros(2, 3, *input_size)
    model = copy.deepcopy(model).cpu().eval()
    attempts = {  # the same order as camshaft's exporter: torch.export first, TorchScript-based second
        "dynamo": {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("batch")},), "external_data": False},
        "torchscript-based": {
            "dynamo": False,
            "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}},
            "opset_version": 17,
        },
    }
    errors = []
    for name, options in attempts.items():
        try:
            with quiet():
                torch.onnx.export(
                    model, (example,), str(path), input_names=["input"], output_names=["logits"], **options
                )
            return path
        except Exception as e:  # noqa: BLE001 - try the next exporter, report both
            errors.append(f"{name}: {e}")
    return "ONNX export of the plain model failed: " + "; ".join(errors)


def one_hot(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, K) classes -> (K, B, N) grad_outputs: the K scores of every image in one backward."""
    b, k = targets.shape
    out = torch.zeros(k, b, num_classes, dtype=dtype, device=targets.device)
    return out.scatter_(2, targets.T.unsqueeze(-1), 1.0)


def backward_to(leaf: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    """d logits[b, top-k of b] / d leaf, batched over the k targets: (k, B, ...) or (B, ...)."""
    go = one_hot(logits.detach().topk(k, dim=-1).indices, logits.shape[-1], logits.dtype)
    if k == 1:
        return torch.autograd.grad(logits, leaf, go[0])[0]
    return torch.autograd.grad(logits, leaf, go, is_grads_batched=True)[0]


def head_backward(head: Callable, a: torch.Tensor, *, k: int, dtype: torch.dtype, key: str, attrs: dict) -> Workload:
    """The head (tap -> logits) forward and a batched backward of k scores to the tap activation ``a``."""

    def fn():
        leaf = a.detach().requires_grad_(True)
        with torch.enable_grad(), autocast(a.device, dtype):
            logits = head(leaf)
            logits = logits[0] if isinstance(logits, tuple) else logits
            backward_to(leaf, logits.float(), k)

    b = a.shape[0]
    return Workload(f"{key}/head_backward/k{k}", "head_backward", fn, b, b * k, b, {**attrs, "k": k})


INPUT_BACKWARD_VARIANTS = ("eager", "folded")


def input_backward(model: nn.Module, x: torch.Tensor, *, k: int, dtype: torch.dtype, key: str, attrs: dict,
                   variant: str = "eager") -> Workload:
    """A forward and a batched backward of k scores to the input pixels (parameters frozen).

    ``eager``: the model as given, on contiguous images. ``folded``: as the eager backend runs it, batch norms
    folded, in the layout it picks (channels-last for a convolutional model) and, on a CPU, linear layers
    through oneDNN where they run so; the input-gradient limit is the faster of the two.
    """
    if variant not in INPUT_BACKWARD_VARIANTS:
        raise ValueError(f"unknown input_backward variant {variant!r}; valid: {', '.join(INPUT_BACKWARD_VARIANTS)}")
    linears = nullcontext
    if variant == "folded":
        from camshaft.engine.backends.base import resolve_memory_format

        layout = resolve_memory_format("auto", model) if x.dim() == 4 else torch.contiguous_format
        if x.device.type == "cpu" and _routes_linears(model, x.contiguous(memory_format=layout), dtype):
            linears = lambda: cpu_linears(x.device)  # noqa: E731
        model, x = _folded(model, layout), x.contiguous(memory_format=layout)

    def fn():
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad(), autocast(x.device, dtype), linears():
            backward_to(leaf, model(leaf).float(), k)

    b = x.shape[0]
    suffix = "" if variant == "eager" else f"/{variant}"  # the eager variant keeps the key it always had
    return Workload(f"{key}/input_backward/k{k}{suffix}", "input_backward", fn, b, b * k, b,
                    {**attrs, "k": k, "variant": variant})


def adam_loop(
    model: nn.Module,
    *,
    classes: torch.Tensor,
    size: int,
    steps: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Callable[[], object]:
    """The activation-maximization limit: a plain batched Adam ascent on N class logits at once.

    With ``memory_format=torch.channels_last`` the model (converted here) sees channels-last images.
    """
    model = model.to(memory_format=memory_format)

    def fn():
        gen = torch.Generator(device=device).manual_seed(0)
        img = (0.01 * torch.randn(len(classes), 3, size, size, generator=gen, device=device)).requires_grad_(True)
        opt = torch.optim.Adam([img], lr=0.05, fused=device.type == "cuda" or None)  # as render runs it
        rows = torch.arange(len(classes), device=device)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = -model(img.contiguous(memory_format=memory_format))[rows, classes].sum()
            loss.backward()
            opt.step()

    return fn
