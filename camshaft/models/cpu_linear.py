"""Linear layers on the CPU through oneDNN: the product as a 1x1 convolution.

On the CPU torch hands ``F.linear`` to the BLAS (MKL's ``sgemm``, through ``addmm``); the same
product written as a 1x1 convolution goes to oneDNN, the library behind torch's CPU convolutions.
On the machine measured (AMD EPYC, 2 cores, AVX-512) oneDNN ran these products 2.0-2.7x faster:
(50176 x 96) @ (96 x 384) 34.8 -> 16.8 ms, (3152 x 768) @ (768 x 3072) 77.9 -> 36.3 ms, the same
for every shape of ConvNeXt, Swin and ViT at batch 16 and 224 px; the whole forward went from 0.93
to 0.51 s (convnext_tiny), 1.08 to 0.64 s (swin_t), 3.26 to 2.21 s (vit_b_16). A few rows (a
classifier on a batch of pooled vectors) gain nothing, so they stay with the BLAS.

The rows of the input become the pixels of a one-column image in channels-last layout:
``x.reshape(1, M, 1, C).permute(0, 3, 1, 2)`` is a view of a contiguous (..., C) input, the
convolution's output is channels-last again, and permuted back it is the contiguous (..., O)
result. The values agree with the BLAS's to float rounding (another summation order).

``LinearsThroughOneDnn`` is a ``TorchFunctionMode``: while it is active, every ``F.linear`` call
(``aten.linear`` in a graph converted from a TorchScript or .pt2 file) that fits (float32 CPU
tensors, at least ``MIN_ROWS`` rows and more than ``ONEDNN_MIN_VALUES`` values) takes this route:
``nn.Linear`` layers (hooks still fire), functional calls inside leaf modules and attention
functions alike. Autograd records the convolution, so gradients flow as through the linear.

``GridLinearsThroughOneDnn`` is the form for code compiled by TorchInductor (the inductor backend): it
holds no state (a counter would make dynamo recompile at every call) and routes only linears over
contiguous (N, h, w, C) grids, as a convolution of their channels-last (N, C, h, w) view.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_ATEN_LINEAR = torch.ops.aten.linear.default
MIN_ROWS = 256  # below: a classifier's few rows, where the BLAS is as fast
# torch's rule for a convolution of one image with a 1x1 kernel: oneDNN above this many input values, its own
# GEMM (the BLAS again, after a copy) at or below
ONEDNN_MIN_VALUES = 20480


def linear_as_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as a 1x1 convolution over the rows of ``x``."""
    c = x.shape[-1]
    rows = x.numel() // c
    image = x.reshape(1, rows, 1, c).permute(0, 3, 1, 2)  # (1, C, M, 1), channels-last
    out = F.conv2d(image, weight[:, :, None, None], bias)  # (1, O, M, 1), channels-last
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def fits(x, weight, bias) -> bool:
    """Whether ``F.linear(x, weight, bias)`` gains from oneDNN: float32 CPU tensors, enough rows and values."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and x.dim() >= 2
        and weight.dim() == 2
        and x.shape[-1] > 0
        and x.numel() // x.shape[-1] >= MIN_ROWS
        and x.numel() > ONEDNN_MIN_VALUES
    )


def grid_linear_as_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` over the channels of a contiguous (N, h, w, C) grid as a 1x1 convolution of its
    channels-last (N, C, h, w) view: no copy either way. Under TorchInductor this form keeps its
    oneDNN convolution (``linear_as_convolution``'s one-column image came with copies there)."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1)


class GridLinearsThroughOneDnn(TorchFunctionMode):
    """``F.linear`` on contiguous (N, h, w, C) grids that ``fits`` as ``grid_linear_as_convolution``; holds no
    state, so that ``torch.compile`` traces it into a graph (ConvNeXt's and Swin's pointwise layers)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            given = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}
            x, weight, bias = given.get("input"), given.get("weight"), given.get("bias")
            if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_contiguous() and fits(x, weight, bias):
                return grid_linear_as_convolution(x, weight, bias)
        return func(*args, **kwargs)


class LinearsThroughOneDnn(TorchFunctionMode):
    """``F.linear`` on float32 CPU tensors of at least ``MIN_ROWS`` rows as a 1x1 convolution (oneDNN)."""

    def __init__(self):
        super().__init__()
        self.routed = 0  # linear calls that took the convolution while active

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear or func is _ATEN_LINEAR:  # a layer or call; a graph converted from a file
            given = {**dict(zip(("input", "weight", "bias"), args)), **kwargs}
            x, weight, bias = given.get("input"), given.get("weight"), given.get("bias")
            if fits(x, weight, bias):
                self.routed += 1
                return linear_as_convolution(x, weight, bias)
        return func(*args, **kwargs)


def cpu_linears(device: torch.device | str | None) -> contextlib.AbstractContextManager:
    """``LinearsThroughOneDnn()`` on the CPU where torch has oneDNN, else a context that does nothing."""
    if torch.device(device or "cpu").type == "cpu" and torch.backends.mkldnn.is_available():
        return LinearsThroughOneDnn()
    return contextlib.nullcontext()
