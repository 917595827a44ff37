"""CUDA graphs: a forward's hundreds of kernels launched as one.

At batch 16 a GPU finishes a ResNet's small kernels faster than the host launches them (H200,
resnet50: eager 0.65x and TorchScript 0.88x of the best forward at batch 16, against 0.97x and
1.10x at batch 64). A CUDA graph records the kernels of one call and replays them with a single
launch (PyTorch's "CUDA Graphs" notes; ``torch.cuda.graph``).

:class:`Graphed` wraps a forward-only callable ``x -> outputs`` (no autograd: the backends graph
the trunk below the tap, and the full forward for forward-only methods). One graph per input shape,
layout, dtype and inference mode, the few most recent kept. The first call of a shape warms the callable
up on a side stream (cuDNN picks its kernels, TorchScript profiles and optimises) and records it;
every call then copies its input into the graph's own input and replays. Outputs are copied out of
the graph's memory, so a later replay never overwrites what a caller still holds.

What a graph cannot hold is refused when it is recorded, with the reason: a forward that reads
values back to the host (``.item()``, data-dependent shapes) or that runs on the CPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.utils._pytree import tree_map

from camshaft.errors import ConfigError

WARMUP = 3  # uncaptured calls before recording: cuDNN autotuning, TorchScript's profiling runs (two)
KEEP = 3  # graphs kept (input shapes): a run's full batch, its last partial one, an OOM back-off


class GraphCaptureError(ConfigError):
    """The model's forward cannot be recorded as a CUDA graph."""


class Graphed:
    """``fn`` replayed from CUDA graphs; ``autocast`` (a dtype or None) is applied inside the graph."""

    def __init__(self, fn: Callable, *, autocast: torch.dtype | None = None, keep: int = KEEP):
        self.fn, self.autocast, self.keep = fn, autocast, keep
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = OrderedDict()
        self.captures = 0  # graphs recorded so far (tests and benchmarks read it)

    def __call__(self, x: torch.Tensor):
        if x.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA device; the input is on {x.device}")
        if torch.is_grad_enabled():
            raise RuntimeError("a graphed forward runs without autograd: call it under no_grad or inference_mode")
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, torch.is_inference_mode_enabled())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._record(x)
            self._graphs[key] = entry
            while len(self._graphs) > self.keep:
                self._graphs.popitem(last=False)  # the graph and its memory pool go with it
        else:
            self._graphs.move_to_end(key)
        graph, static_x, static_out = entry
        with torch.cuda.device(x.device):  # the current stream of the input's device
            static_x.copy_(x)
            graph.replay()
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def clear(self) -> None:
        """Drop every graph (their memory returns to torch's allocator)."""
        self._graphs.clear()

    def _run(self, x: torch.Tensor):
        # autocast's cache of cast weights must stay off while recording: the cached casts would be
        # freed when the context ends, under a graph that still reads them
        with torch.autocast("cuda", dtype=self.autocast or torch.float16, enabled=self.autocast is not None,
                            cache_enabled=False):
            return self.fn(x)

    def _record(self, x: torch.Tensor):
        with torch.cuda.device(x.device):  # a capture on another device than the current one fails
            static_x = torch.empty_like(x)  # the same strides (channels-last stays so)
            static_x.copy_(x)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            try:
                with torch.cuda.stream(side):
                    for _ in range(WARMUP):
                        self._run(static_x)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads of a run (decoders pinning memory, partitions copying
                # results to the host) may call CUDA meanwhile; only this thread's calls must be safe
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    static_out = self._run(static_x)
            except torch.OutOfMemoryError:
                self.clear()  # the graphs of larger batches hold memory the back-off needs
                raise  # the caller's back-off halves the batch
            except RuntimeError as e:
                raise GraphCaptureError(
                    f"this model's forward cannot be recorded as a CUDA graph ({_first_line(e)}); "
                    "run without CUDA graphs"
                ) from e
        self.captures += 1
        return graph, static_x, static_out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
