"""TorchInductor (``torch.compile``): a torch backend's forward-only graphs compiled, weights frozen in.

The ``inductor`` backend is the eager one (the pt2 one for a .pt2 file) with its full forward and the
trunk below the first tap compiled by ``torch.compile`` with ``freezing``: batch norms folded, weights
turned into constants and pre-packed for oneDNN (CPU), pointwise layers fused into their neighbours.
What records a graph for autograd (the head above the tap, input gradients, methods that hook layers)
runs uncompiled.

On a CPU, linear layers over (N, h, w, C) grids (ConvNeXt's, Swin's MLPs) are compiled as 1x1
convolutions (``grid_linears``): left to inductor they ran as ``addmm`` on the BLAS, 80% of convnext_tiny's
compiled forward, which then ran at 0.56x the eager backend's (which routes them through oneDNN).

Measured with ``camshaft bench`` on 2 CPU cores (AMD EPYC, AVX-512) at batch 16, 224 px, against the
eager backend in the same run: CAM on efficientnet_b0 1.18x, resnet50 1.01-1.09x (three runs), resnet18
1.0x; Grad-CAM on mobilenet_v3_large 1.13x, efficientnet_b0 1.13x, resnet50 1.03-1.09x, convnext_tiny
1.05x, and swin_t 0.77x (routing its attention's 3-d linears the same way did not help).
So it is a choice, not a default: ``camshaft bench --backend eager inductor`` tells for a model.

A compiled graph serves one batch size (``dynamic=False``).
:class:`Compiled` pads a smaller batch up to a size compiled already, with zero images, and cuts the
results back: a run's last partial batch costs a little compute, not a second compilation (tens of
seconds for a resnet50). A larger batch compiles again, and so do a smaller one whose padded batch
ran out of memory (``camshaft explain`` halves its batches after an out-of-memory error) and one that
keeps coming back at under half a compiled size (a method's own forwards between its larger chunks).
"""

from __future__ import annotations

import bisect
import os
import shutil
import types
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_map

from camshaft.errors import ConfigError
from camshaft.models.cpu_linear import GridLinearsThroughOneDnn


def check_compiler(device: torch.device) -> None:
    """Fail before any work where TorchInductor cannot generate code: a C++ compiler on a CPU, Triton on a GPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("the inductor backend on a GPU needs Triton (pip install triton); "
                              "use the eager or torchscript backend")
        if not (os.environ.get("CC") or any(shutil.which(c) for c in ("gcc", "clang", "cc"))):
            # Triton builds each kernel's launcher with the system's C compiler (triton/runtime/build.py)
            raise ConfigError("the inductor backend on a GPU needs a C compiler for Triton's kernel launchers "
                              "(gcc or clang on the PATH, or CC set); use the eager or torchscript backend")
        return
    if device.type != "cpu":
        raise ConfigError(f"the inductor backend runs on CPU and CUDA devices, not {device.type}")
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError or a subprocess error, by platform
        raise ConfigError(f"the inductor backend on the CPU needs a C++ compiler (g++ or clang++ on the PATH, "
                          f"or CXX set): {e}. Use the eager backend instead") from None


def grid_linears(device: torch.device) -> bool:
    """Whether compiled code routes grid linears through oneDNN on ``device`` (a CPU with oneDNN)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _own_code(fn: Callable) -> Callable:
    """``fn`` called through a function with a code object of its own. Dynamo keeps compiled graphs, and counts
    recompilations against ``recompile_limit`` (8), per code object: compiling one function (or the forward of one
    model class) for each backend, model and batch size would, at the ninth graph of a process, silently run the
    rest uncompiled."""

    def call(x):
        return fn(x)

    return types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__, call.__defaults__,
                              call.__closure__)


class Compiled:
    """``fn`` (``x -> outputs``, run without autograd) compiled by TorchInductor for fixed batch sizes.

    A batch is padded to the smallest size compiled so far that holds it, when that wastes at most half the padded
    batch. A batch size that would waste more gets a graph of its own once it comes back (``PADDED_CALLS``): a
    method's smaller forwards (Score-CAM's images after its chunks of masks) repeat every batch, a run's last
    partial batch comes once. At most ``MAX_SIZES`` sizes are compiled; then batches are padded whatever the waste.

    With ``grid_linears`` (CPU), linear layers over (N, h, w, C) grids are compiled as 1x1 convolutions
    (``camshaft.models.cpu_linear.GridLinearsThroughOneDnn``), which oneDNN runs."""

    MAX_SIZES = 4
    PADDED_CALLS = 2

    def __init__(self, fn: Callable, *, grid_linears: bool = False):
        def routed(x):  # the mode is entered inside the compiled function: dynamo traces it into the graph
            with GridLinearsThroughOneDnn():
                return fn(x)

        self._compiled = torch.compile(_own_code(routed if grid_linears else fn), dynamic=False,
                                       options={"freezing": True})
        self.sizes: list[int] = []  # the batch sizes compiled for, ascending
        self.compilations = 0  # graphs compiled so far (tests read it)
        self._padded: Counter[int] = Counter()  # wasteful paddings of each batch size so far

    @property
    def batch(self) -> int:
        """The largest batch compiled for (0: none yet)."""
        return self.sizes[-1] if self.sizes else 0

    def _size_for(self, n: int) -> int:
        fits = [s for s in self.sizes if s >= n]
        if not fits:
            return n
        if fits[0] <= 2 * n or len(self.sizes) >= self.MAX_SIZES:
            return fits[0]
        self._padded[n] += 1
        return n if self._padded[n] > self.PADDED_CALLS else fits[0]

    def _compile_for(self, n: int) -> None:
        bisect.insort(self.sizes, n)
        self.compilations += 1

    def __call__(self, x: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError("a compiled forward runs without autograd: call it under no_grad or inference_mode")
        if x.is_inference() != torch.is_inference_mode_enabled():
            # dynamo guards on the dispatch keys: an inference tensor and a normal one would compile twice
            x = x.clone()
        n = x.shape[0]
        size = self._size_for(n)
        if size == n:
            if n not in self.sizes:  # compiled for this size on the call below
                self._compile_for(n)
            return self._compiled(x)
        padded = x.new_zeros((size, *x.shape[1:])).contiguous(memory_format=_layout(x))
        padded[:n] = x
        try:
            out = self._compiled(padded)
        except torch.OutOfMemoryError:  # a caller halving its batches after an OOM: padding must not undo that
            del padded
            self.sizes = [s for s in self.sizes if s < size]
            self._compile_for(n)
            return self._compiled(x)
        return tree_map(lambda t: t[:n] if isinstance(t, torch.Tensor) else t, out)
