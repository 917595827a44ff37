"""Image parameterizations: the tensors the optimiser changes, and how they become images.

A parameterization builds ``ImageParam(params, image_fn, blur_)`` for a batch: ``image_fn()`` gives
(B, 3, H, W) in [0, 1] (a sigmoid keeps it there), ``blur_(sigma)`` blurs the pre-sigmoid image in
place. Image ``b`` draws its initial noise from ``generators[b]`` only.

- ``pixel``: one free value per pixel and channel (Simonyan et al. 2013).
- ``fourier``: Fourier coefficients scaled by 1 / frequency, in a decorrelated colour space
  (Olah et al. 2017, "Feature Visualization", preconditioning): images people can read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from camshaft.engine.actmax.transforms import gaussian_blur
from camshaft.errors import ConfigError, UnknownNameError

__all__ = [
    "COLOR_SQRT_COV",
    "ImageParam",
    "fourier_image",
    "get_param",
    "param_names",
    "pixel_image",
    "register_param",
]

_EPS = 1e-3  # given images are clipped to [eps, 1 - eps] before the inverse sigmoid

# The square root of ImageNet's RGB covariance (columns: its principal axes scaled by the root of
# their variances: luminance, red-blue, green-magenta), as published with Lucid (Olah et al. 2017).
COLOR_SQRT_COV = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOR = COLOR_SQRT_COV / COLOR_SQRT_COV.norm(dim=0).max()  # largest column of unit length


@dataclass(frozen=True)
class ImageParam:
    params: list[torch.Tensor]  # leaves the optimiser updates
    image_fn: Callable[[], torch.Tensor]  # () -> (B, 3, H, W) in [0, 1]
    blur_: Callable[[float], None]  # sigma in pixels -> None (in place, no autograd)

    def __iter__(self):  # unpacks as lucent's (params, image_fn)
        return iter((self.params, self.image_fn))


Builder = Callable[..., ImageParam]
_PARAMS: dict[str, Builder] = {}


def register_param(name: str, builder: Builder) -> Builder:
    if name in _PARAMS:
        raise ValueError(f"parameterization {name!r} is already registered")
    _PARAMS[name] = builder
    return builder


def param_names() -> list[str]:
    return list(_PARAMS)


def get_param(name: str) -> Builder:
    if name not in _PARAMS:
        raise UnknownNameError("parameterization", name, _PARAMS)
    return _PARAMS[name]


def _noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], sd: float) -> torch.Tensor:
    """(B, *shape) normal noise, row b from generators[b] (on the CPU: the same on every device)."""
    return torch.stack([torch.randn(shape, generator=g) * sd for g in generators])


def _check_init(init: torch.Tensor | None, b: int, size: tuple[int, int]) -> None:
    if init is not None and tuple(init.shape) != (b, 3, *size):
        raise ConfigError(f"initial images must be (B, 3, H, W) = {(b, 3, *size)}, received {tuple(init.shape)}")


def pixel_image(size: tuple[int, int], *, generators: Sequence[torch.Generator], sd: float = 0.01,
                init: torch.Tensor | None = None, device: torch.device | str = "cpu") -> ImageParam:
    """Free pixels behind a sigmoid; ``init`` (B, 3, H, W) in [0, 1] replaces the noise."""
    h, w = size
    _check_init(init, len(generators), size)
    if init is None:
        start = _noise(generators, (3, h, w), sd)
    else:
        start = torch.logit(init.float().cpu().clamp(_EPS, 1 - _EPS))
    p = start.to(device).requires_grad_(True)  # (B, 3, H, W), pre-sigmoid

    def blur_(sigma: float) -> None:
        with torch.no_grad():
            p.copy_(gaussian_blur(p, sigma))

    return ImageParam([p], lambda: torch.sigmoid(p), blur_)


def _frequencies(h: int, w: int) -> torch.Tensor:
    """(H, W // 2 + 1) radial frequency of rfft2's coefficients, in cycles per pixel."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return (fy.pow(2) + fx.pow(2)).sqrt()


def fourier_image(size: tuple[int, int], *, generators: Sequence[torch.Generator], sd: float = 0.01,
                  decay: float = 1.0, init: torch.Tensor | None = None,
                  device: torch.device | str = "cpu") -> ImageParam:
    """Coefficients of a decorrelated image, scaled by ``1 / frequency ** decay``.

    The scale has unit root-mean-square, so an optimiser step moves pixels about as much as with
    ``pixel_image``; low frequencies move most, which is what makes the images readable.
    """
    h, w = size
    _check_init(init, len(generators), size)
    freq = _frequencies(h, w)
    scale = freq.clamp(min=1.0 / max(h, w)).pow(-decay)
    scale = scale / scale.pow(2).mean().sqrt()  # (H, W//2+1)
    color = _COLOR
    if init is None:
        start = _noise(generators, (3, h, w // 2 + 1, 2), sd)  # (B, 3, H, W//2+1, re/im)
    else:
        y = torch.logit(init.float().cpu().clamp(_EPS, 1 - _EPS))  # (B, 3, H, W)
        y = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(color), y)  # undo the colour mixing
        start = torch.view_as_real(torch.fft.rfft2(y, norm="ortho") / scale)
    p = start.to(device).contiguous().requires_grad_(True)
    scale, color, freq = scale.to(device), color.to(device), freq.to(device)

    def image() -> torch.Tensor:
        y = torch.fft.irfft2(torch.view_as_complex(p) * scale, s=(h, w), norm="ortho")  # (B, 3, H, W)
        return torch.sigmoid((color @ y.flatten(2)).view_as(y))  # colours mixed per pixel

    def blur_(sigma: float) -> None:  # a Gaussian's transfer function, exp(-2 pi^2 sigma^2 f^2)
        sigma = min(sigma, 10.0 * max(h, w))  # beyond, every gain but f = 0's is 0 already (no inf * 0)
        gain = torch.exp(-2 * math.pi**2 * sigma**2 * freq.pow(2))  # on the device: no copy to wait for
        with torch.no_grad():
            p.mul_(gain[..., None])

    return ImageParam([p], image, blur_)


register_param("pixel", pixel_image)
register_param("fourier", fourier_image)
