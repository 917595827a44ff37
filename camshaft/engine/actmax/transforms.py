"""Robustness transforms: random jitter, scaling, rotation and padding before each step.

A transform is ``(x (B, C, H, W), generators) -> Tensor``: image ``b`` draws its random parameters
from ``generators[b]`` only, so a batch transforms exactly as its images would one at a time
(Mordvintsev et al. 2015, Olah et al. 2017 "transformation robustness"). Geometric transforms are
affine; :class:`Compose` multiplies consecutive ones into one resampling per batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from camshaft.engine.backends.base import upload
from camshaft.errors import ConfigError

__all__ = ["Compose", "Jitter", "Pad", "Rotate", "Scale", "Transform", "center", "gaussian_blur", "warp"]


class Transform(Protocol):
    def __call__(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor: ...


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _check_count(x: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
    if x.shape[0] != len(generators):
        raise ConfigError(f"a batch of {x.shape[0]} images needs as many generators, received {len(generators)}")


@dataclass(frozen=True)
class Pad:
    """A frame of ``width`` pixels on every side, mirrored (default) or constant; not random.

    The mirrored frame is the default: a constant one makes exact ties in max-pooling, whose
    winners then depend on rounding, so a batch would no longer equal its single runs.
    """

    width: int
    mode: str = "reflect"  # reflect | constant
    value: float = 0.5  # the constant frame's value

    def __post_init__(self):
        if self.width < 0:
            raise ConfigError(f"pad width must be >= 0, received {self.width}")
        if self.mode not in ("reflect", "constant"):
            raise ConfigError(f"pad mode must be reflect or constant, received {self.mode!r}")

    def __call__(self, x, generators):
        if not self.width:
            return x
        if self.mode == "constant":
            return F.pad(x, [self.width] * 4, value=self.value)
        return F.pad(x, [self.width] * 4, mode="reflect")


Matrix = tuple[tuple[float, float, float], ...]  # 3 x 3, row-major


def _matmul(a: Matrix, b: Matrix) -> Matrix:
    return tuple(tuple(sum(a[i][k] * b[k][j] for k in range(3)) for j in range(3)) for i in range(3))


class Affine:
    """A random affine map per image, as a sampling matrix in centred pixel coordinates.

    Matrices are Python floats (float64) until a batch's product is done: a handful of numbers per
    image, not worth a tensor operation each.
    """

    def matrices(self, generators: Sequence[torch.Generator]) -> list[Matrix]:
        """One 3 x 3 matrix per image: output pixel (centred) -> input pixel (centred)."""
        return [self.sample(g) for g in generators]

    def sample(self, g: torch.Generator) -> Matrix:
        raise NotImplementedError

    def __call__(self, x, generators):
        _check_count(x, generators)
        return warp(x, self.matrices(generators))


@dataclass(frozen=True)
class Jitter(Affine):
    """Shift by a whole number of pixels drawn uniformly from ``[-pixels, pixels]`` on each axis."""

    pixels: int

    def __post_init__(self):
        if self.pixels < 0:
            raise ConfigError(f"jitter must be >= 0 pixels, received {self.pixels}")

    def sample(self, g):
        dy, dx = torch.randint(-self.pixels, self.pixels + 1, (2,), generator=g).tolist()
        return ((1.0, 0.0, float(dx)), (0.0, 1.0, float(dy)), (0.0, 0.0, 1.0))


@dataclass(frozen=True)
class Scale(Affine):
    """Zoom about the centre by a factor drawn uniformly from ``[1 - amount, 1 + amount]``."""

    amount: float

    def __post_init__(self):
        if not 0 <= self.amount < 1:
            raise ConfigError(f"scale amount must lie in [0, 1), received {self.amount}")

    def sample(self, g):
        s = _uniform(g, 1 - self.amount, 1 + self.amount)
        return ((1 / s, 0.0, 0.0), (0.0, 1 / s, 0.0), (0.0, 0.0, 1.0))


@dataclass(frozen=True)
class Rotate(Affine):
    """Rotate about the centre by an angle drawn uniformly from ``[-degrees, degrees]``."""

    degrees: float

    def __post_init__(self):
        if not 0 <= self.degrees <= 180:
            raise ConfigError(f"rotation must lie in [0, 180] degrees, received {self.degrees}")

    def sample(self, g):
        a = math.radians(_uniform(g, -self.degrees, self.degrees))
        c, s = math.cos(a), math.sin(a)
        return ((c, -s, 0.0), (s, c, 0.0), (0.0, 0.0, 1.0))


class Compose:
    """Transforms applied in order; runs of affine transforms are resampled once.

    With ``size``, the result is the centre ``size`` of the transformed image: a frame added by
    ``Pad`` then only feeds what jitter, scaling and rotation bring into view, and the model sees
    images of its own input size (no extra work for the frame; models with a fixed input work).
    """

    def __init__(self, transforms: Sequence[Transform], size: tuple[int, int] | None = None):
        self.transforms, self.size = tuple(transforms), None if size is None else tuple(size)

    def __call__(self, x, generators):
        _check_count(x, generators)
        pending: list[Matrix] | None = None  # the product of the affine maps met so far, per image
        for t in self.transforms:
            if isinstance(t, Affine):
                m = t.matrices(generators)
                # sampling maps compose in reverse: out = T2(T1(x)) samples x at M1 @ M2 @ p
                pending = m if pending is None else [_matmul(a, b) for a, b in zip(pending, m, strict=True)]
                continue
            if pending is not None:
                x, pending = warp(x, pending), None
            x = t(x, generators)
        if pending is not None:
            return warp(x, pending, size=self.size)
        return x if self.size is None else center(x, self.size)

    def __repr__(self) -> str:
        return f"Compose({list(self.transforms)}, size={self.size})"


def center(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre ``size`` of ``x`` (B, C, H, W); ``x`` must be at least that large."""
    (h, w), (oh, ow) = x.shape[-2:], size
    if oh > h or ow > w:
        raise ConfigError(f"cannot cut {oh}x{ow} out of a {h}x{w} image")
    top, left = (h - oh) // 2, (w - ow) // 2
    return x[..., top : top + oh, left : left + ow]


def warp(
    x: torch.Tensor, matrices: torch.Tensor | Sequence[Matrix], size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resample ``x`` (B, C, H, W) at ``matrices`` (B, 3, 3) (output -> input, centred pixels).

    The output is ``size`` (default: the input's), centred on the input's centre.
    """
    matrices = torch.as_tensor(matrices, dtype=torch.float64)
    h, w = x.shape[-2:]
    oh, ow = (h, w) if size is None else size
    # keep pixel centres on the input's grid, as ``center`` cuts: shift by half a pixel where the
    # margins are odd, then centred pixels -> grid_sample's normalised coordinates
    # (align_corners=False): u -> 2u / size on the input, and back (* size / 2) on the output
    shift = torch.tensor([-((w - ow) % 2) / 2, -((h - oh) % 2) / 2], dtype=torch.float64)
    to_norm = torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64)[:, None]
    from_norm = torch.tensor([ow / 2.0, oh / 2.0, 1.0], dtype=torch.float64)
    theta = matrices[:, :2].clone()
    theta[:, :, 2] += shift
    theta = upload((theta * to_norm * from_norm).to(x.dtype), x.device)  # (B, 2, 3)
    grid = _affine_grid(theta, oh, ow)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)`` as a sum of broadcast products.

    The same sampling points; affine_grid multiplies a (h * w, 3) grid of pixel centres by each
    matrix, which on the CPU costs more than the resampling itself.
    """
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    t = theta[:, :, None, None, :]  # (B, 2, 1, 1, 3): x' = t0 x + t1 y + t2, per output coordinate
    grid = t[..., 0] * xs[None, :] + (t[..., 1] * ys[:, None] + t[..., 2])  # (B, 2, h, w)
    return grid.permute(0, 2, 3, 1)  # (B, h, w, 2), as grid_sample reads it


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflected borders; ``sigma`` in pixels."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(min(3 * sigma, max(x.shape[-2:]))))  # a wider kernel is cropped below anyway
    r = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:  # image smaller than the kernel: crop the kernel
        k = k[radius - pad: radius + pad + 1] / k[radius - pad: radius + pad + 1].sum()
    x = F.conv2d(F.pad(x, [pad, pad, 0, 0], mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, [0, 0, pad, pad], mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
