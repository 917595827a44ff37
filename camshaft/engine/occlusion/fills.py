"""What replaces the pixels under an occlusion window, in the model's (normalised) input space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FILL_MODES = ("zero", "mean", "blur")  # or a number


def fill_values(x: torch.Tensor, fill: str | float, *, window: tuple[int, int]) -> torch.Tensor:
    """The fill for each image of ``x`` (B, C, H, W), broadcastable to it with a batch dimension.

    ``zero`` and a number: that constant in the model's input space (after normalisation: with
    ImageNet mean/std, 0 is the dataset's mean colour), (B, 1, 1, 1). ``mean``: each image's own
    per-channel mean, (B, C, 1, 1). ``blur``: a Gaussian-blurred copy of each image with
    sigma = window / 4 along each axis, (B, C, H, W).
    """
    b = x.shape[0]
    if fill == "zero":
        return x.new_zeros(b, 1, 1, 1)
    if fill == "mean":
        return x.mean(dim=(2, 3), keepdim=True)
    if fill == "blur":
        return gaussian_blur(x, sigma=(window[0] / 4, window[1] / 4))
    if isinstance(fill, str):
        raise ValueError(f"unknown fill {fill!r}; choose {', '.join(FILL_MODES)} or a number")
    return x.new_full((b, 1, 1, 1), float(fill))


def _kernel(sigma: float, *, device, dtype) -> torch.Tensor:
    """A normalised 1-D Gaussian of radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, *, sigma: tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), borders replicated; the size is kept."""
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    for axis, s in ((2, sigma[0]), (3, sigma[1])):
        k = _kernel(s, device=x.device, dtype=x.dtype)
        r = k.numel() // 2
        pad = (0, 0, r, r) if axis == 2 else (r, r, 0, 0)
        shape = (1, 1, -1, 1) if axis == 2 else (1, 1, 1, -1)
        y = F.conv2d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return y.reshape(b, c, h, w)
