"""Eager PyTorch and TorchScript backends: the same torch code over a live or a loaded model.

Gradients are asked only w.r.t. the taps: the trunk below the first tap runs without autograd and
no weight gradient is ever computed. Where the model splits at its first tap the trunk runs under
``no_grad`` and only the head records a graph.

On the CPU the eager and pt2 backends run linear layers as 1x1 convolutions (``cpu_linears``): oneDNN
ran them 2x faster than the BLAS (ConvNeXt, Swin and ViT forwards 1.5-1.8x faster).

Image batches enter in channels-last layout (``memory_format``): oneDNN's convolutions (CPU) and
cuDNN's tensor-core kernels (CUDA, half precision) run fastest on it; measured on 2 CPU cores,
resnet18 1.43x, resnet50 1.27x, mobilenet_v3_large 1.5x the contiguous-layout forward. Taps and
gradients are handed back contiguous, so methods never see the layout.

With ``cuda_graphs`` the forward-only parts (the full forward, and the trunk below the tap) replay
from CUDA graphs (``graphs.py``): at small batches a GPU otherwise waits on the host's launches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from camshaft.engine.backends.base import (
    FORWARD,
    INPUT_GRADIENTS,
    MODULE_HOOKS,
    TAP_GRADIENTS,
    ModelInfo,
    Output,
    Selector,
    batched_grads,
    batched_tap_grads,
)
from camshaft.engine.backends.graphs import Graphed
from camshaft.errors import ConfigError
from camshaft.models.cpu_linear import cpu_linears


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters temporarily excluded from autograd; the caller's flags are restored."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class TorchBackend:
    """A torch callable ``x -> (logits, taps)`` and, optionally, a split ``trunk`` / ``head``."""

    def __init__(
        self,
        *,
        name: str,
        info: ModelInfo,
        full: Callable,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        split: tuple[Callable, Callable] | None = None,
        leaf_forward: Callable | None = None,
        grad_forward: Callable | None = None,
        owner: nn.Module | None = None,
        memory_format: torch.memory_format = torch.contiguous_format,
        cuda_graphs: bool = False,
        cpu_linears: bool = False,
    ):
        self.name, self.info, self.device, self.dtype = name, info, device, dtype
        self._cpu_linears = cpu_linears  # F.linear as oneDNN 1x1 convolutions (camshaft.models.cpu_linear)
        self.memory_format = memory_format
        self._full, self._split, self._leaf_forward, self._owner = full, split, leaf_forward, owner
        self._grad_forward = grad_forward or full  # a differentiable x -> (logits, taps)
        caps = {FORWARD, INPUT_GRADIENTS}
        if split is not None or leaf_forward is not None:
            caps.add(TAP_GRADIENTS)
        if owner is not None:
            caps.add(MODULE_HOOKS)
        self.capabilities = frozenset(caps)
        self.module = owner  # the live model (eager only): methods that hook layers use it
        self.graphs: dict[str, Graphed] = {}  # "full" and "trunk", replayed from CUDA graphs
        if cuda_graphs:
            if device.type != "cuda":
                raise ConfigError(f"CUDA graphs need a CUDA device; the {name} backend runs on {device}")
            mixed = None if dtype == torch.float32 else dtype
            self.graphs["full"] = Graphed(full, autocast=mixed)
            if split is not None:
                self.graphs["trunk"] = Graphed(split[0], autocast=mixed)

    def running(self) -> contextlib.ExitStack:
        """What every call of the model runs under: mixed precision for float16 / bfloat16 (CUDA, and CPU
        where torch supports it) and, with ``cpu_linears`` on the CPU, linear layers through oneDNN."""
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32))
        if self._cpu_linears:
            stack.enter_context(cpu_linears(self.device))
        return stack

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def forward(self, x: torch.Tensor) -> Output:
        if "full" in self.graphs:  # autocast is recorded in the graph
            with torch.inference_mode():
                logits, taps = self.graphs["full"](self._layout(x))
        else:
            with torch.inference_mode(), self.running():
                logits, taps = self._full(self._layout(x))
        return Output(logits.float(), {k: _plain(v) for k, v in taps.items()})

    def tap_gradients(self, x: torch.Tensor, select: Selector) -> Output:
        if TAP_GRADIENTS not in self.capabilities:
            raise RuntimeError(f"{self.name} backend has no tap gradients for this model")
        freeze = frozen(self._owner) if self._owner is not None else contextlib.nullcontext()
        x = self._layout(x)
        with freeze, self.running():
            if self._split is not None:
                trunk, head = self._split
                with torch.no_grad():
                    a = self.graphs["trunk"](x) if "trunk" in self.graphs else trunk(x)
                a = a.detach().requires_grad_(True)
                with torch.enable_grad():
                    logits, taps = head(a)
                    targets = select(logits.detach().float())
                    grads = batched_tap_grads(logits.float(), taps, targets)
            else:
                with torch.enable_grad():
                    logits, taps = self._leaf_forward(x)
                    targets = select(logits.detach().float())
                    grads = batched_tap_grads(logits.float(), taps, targets)
        grads = {k: _plain(v) for k, v in grads.items()}
        return Output(logits.detach().float(), {k: _plain(v) for k, v in taps.items()}, grads, targets)

    def input_gradients(self, x: torch.Tensor, select: Selector) -> Output:
        freeze = frozen(self._owner) if self._owner is not None else contextlib.nullcontext()
        with freeze, self.running(), torch.enable_grad():
            x = self._layout(x.detach()).requires_grad_(True)
            logits, taps = self._grad_forward(x)
            targets = select(logits.detach().float())
            (grads,) = batched_grads(logits.float(), [x], targets)
        return Output(
            logits.detach().float(), {k: _plain(v) for k, v in taps.items()}, targets=targets, input_grads=_plain(grads)
        )


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A float32, contiguous, detached copy-if-needed of a backend result."""
    return t.detach().float().contiguous()
