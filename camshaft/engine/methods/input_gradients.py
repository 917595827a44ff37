"""The input-gradient family, on one shared path: saliency, SmoothGrad, integrated gradients.

Every method here needs d score / d input pixels (``INPUT_GRADIENTS``: eager and TorchScript). The
sampled ones (SmoothGrad, integrated gradients) choose targets from one clean forward, then batch
their samples (several per image, all K targets in one batched backward) in chunks bounded by
``samples_per_forward``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from camshaft.engine.backends.base import FORWARD, INPUT_GRADIENTS, Backend, Output, Selector, upload
from camshaft.engine.methods.base import Method, Option, register_method
from camshaft.engine.methods.options import finite_float, non_negative_float, positive_int, seed

SampleFn = Callable[[torch.Tensor, int, int], torch.Tensor]  # (x, first, last) -> (B, S, 3, H, W)


def sampled_input_gradients(
    backend: Backend,
    x: torch.Tensor,
    select: Selector,
    samples: SampleFn,
    *,
    n: int,
    per_forward: int,
    per_sample: Callable[[torch.Tensor], torch.Tensor] = lambda g: g,
) -> tuple[torch.Tensor, Output]:
    """Sum over ``n`` samples of ``per_sample(d score / d sample)``, with the clean output.

    ``per_sample`` maps gradients (B, S, K, 3, H, W) to (B, S, K, ...) before the sum.
    """
    out = backend.forward(x)
    targets = select(out.logits)
    out.targets = targets
    b, k = targets.shape
    total = None
    chunk = max(1, per_forward // b)
    for first in range(0, n, chunk):
        last = min(n, first + chunk)
        xs = samples(x, first, last)  # (B, S, 3, H, W)
        s = xs.shape[1]
        repeated = targets.repeat_interleave(s, dim=0)
        grads = backend.input_gradients(xs.flatten(0, 1), lambda logits, t=repeated: t).input_grads
        part = per_sample(grads.view(b, s, k, *x.shape[1:])).sum(dim=1)
        total = part if total is None else total + part
    return total, out


def channel_max_abs(grads: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., H, W): the saliency convention, max over colour channels of |g|."""
    return grads.abs().amax(dim=-3)


def _saliency(backend: Backend, x: torch.Tensor, select: Selector, tap, options: dict):
    """Simonyan et al. 2013, "Deep Inside Convolutional Networks": |dy_c/dx|, max over channels."""
    out = backend.input_gradients(x, select)
    return channel_max_abs(out.input_grads), out


def smoothgrad_noise(seed: int, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """SmoothGrad's standard normal noise (S, 3, H, W): sample ``j`` is a function of (seed, j) only.

    Drawn by torch's CPU generator and then moved: a generator on the input's device would draw
    other numbers for the same seed (CUDA's Philox), so CPU and GPU maps of one seed would differ.
    The same for every image, batch size, chunking, partition and device (bitwise, for a given torch
    build and CPU instruction set). Read-only: it is a cached tensor, on its device (``_cached_noise``).
    Noise too large to cache goes to a GPU through pinned memory: a plain copy would wait for the GPU.
    """
    shape, device = tuple(shape), torch.device(device)
    if math.prod(shape) <= CACHED_NOISE_NUMEL:
        return _cached_noise(seed, shape, device)
    return upload(_noise(seed, shape), device)


CACHED_NOISE_NUMEL = 2**24  # 64 MiB of float32 noise kept per cached (seed, shape); larger ones are drawn per batch


def _noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=2)
def _cached_noise(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Drawn and copied once per run, not at every batch (16 x 3 x 224 x 224 takes 15-40 ms on 2 CPU cores)."""
    return upload(_noise(seed, shape), device)


def _smoothgrad(backend: Backend, x: torch.Tensor, select: Selector, tap, options: dict):
    """Smilkov et al. 2017, "SmoothGrad": the saliency of noisy copies, averaged.

    The noise is added in the model's normalised input space, with std ``noise * (max - min)`` of
    the image there (over all its channels): the paper's noise level sigma / (x_max - x_min), as
    its reference code computes it on the model's input. The noise is ``smoothgrad_noise``: the
    same on every device, so CPU and GPU maps of one seed differ only by rounding.
    """
    n = options["samples"]
    spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1, 1)  # per image
    noise = smoothgrad_noise(options["seed"], (n, *x.shape[1:]), x.device)  # (S, 3, H, W)

    def samples(x, first, last):
        return x.unsqueeze(1) + options["noise"] * spread * noise[first:last].unsqueeze(0)

    total, out = sampled_input_gradients(
        backend, x, select, samples, n=n, per_forward=options["samples_per_forward"], per_sample=channel_max_abs
    )
    return total / n, out


def integrated_gradients(
    backend: Backend, x: torch.Tensor, select: Selector, *, baseline: torch.Tensor, steps: int, per_forward: int
) -> tuple[torch.Tensor, Output]:
    """Sundararajan et al. 2017: (x - x') * mean_alpha dF(x' + alpha (x - x'))/dx, (B, K, 3, H, W).

    Midpoint Riemann sum over ``steps``; sum over pixels ~ F(x) - F(x') (completeness).
    """
    delta = x - baseline
    alphas = (torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps

    def samples(x, first, last):
        a = alphas[first:last].view(1, -1, 1, 1, 1)
        return baseline.unsqueeze(1) + a * delta.unsqueeze(1)

    total, out = sampled_input_gradients(backend, x, select, samples, n=steps, per_forward=per_forward)
    return delta.unsqueeze(1) * total / steps, out


def baseline_for(x: torch.Tensor, kind: str | float) -> torch.Tensor:
    """``zero`` (the mean colour, in normalised input space), ``blur``, or a constant."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "blur":
        k = max(3, (min(x.shape[-2:]) // 8) | 1)
        return torch.nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
    return torch.full_like(x, float(kind))


def _integrated(backend: Backend, x: torch.Tensor, select: Selector, tap, options: dict):
    baseline = baseline_for(x, options["baseline"])
    attributions, out = integrated_gradients(
        backend, x, select, baseline=baseline, steps=options["steps"], per_forward=options["samples_per_forward"]
    )
    return attributions.sum(dim=2), out  # signed, summed over colour channels


def _baseline(text: str) -> str | float:
    if text in ("zero", "blur"):
        return text
    try:
        return finite_float(text)
    except ValueError as e:
        raise ValueError(f"baseline must be zero, blur or a finite number, received {text!r}") from e


PER_FORWARD = Option("samples_per_forward", positive_int, 32, "noisy or interpolated images per forward (memory)",
                     memory=True)
NEEDS = frozenset({FORWARD, INPUT_GRADIENTS})

register_method(
    Method(
        "saliency", frozenset({INPUT_GRADIENTS}), _saliency, "|d score / d pixel|, max over channels",
        uses_tap=False, paper="Simonyan et al. 2013",
    )
)
register_method(
    Method(
        "smoothgrad",
        NEEDS,
        _smoothgrad,
        "saliency averaged over noisy copies",
        options=(
            Option("samples", positive_int, 16, "noisy copies per image"),
            Option(
                "noise", non_negative_float, 0.15,
                "noise std as a fraction of the image's value range (max - min over its channels, in the model's "
                "normalised input space, where the noise is added)",
            ),
            Option("seed", seed, 0, "seed of the noise (the same noise for every image, batch and device)"),
            PER_FORWARD,
        ),
        uses_tap=False,
        paper="Smilkov et al. 2017",
    )
)
register_method(
    Method(
        "integrated_gradients",
        NEEDS,
        _integrated,
        "integrated gradients from a baseline (signed, sums to F(x) - F(baseline))",
        options=(
            Option("steps", positive_int, 32, "interpolation steps (midpoint rule)"),
            Option("baseline", _baseline, "zero", "zero (mean colour), blur, or a constant in input space"),
            PER_FORWARD,
        ),
        uses_tap=False,
        paper="Sundararajan et al. 2017",
    )
)
