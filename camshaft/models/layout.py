"""How a tap's activations are laid out, and the same activations as (C, h, w) feature maps.

Explanations read a tap as channels over a grid of cells, (B, C, h, w). Three layouts reach that:

- (B, C, h, w): a convolutional network's maps, as they are;
- (B, h, w, C): channels last, as Swin's stages and ConvNeXt's blocks keep them between their
  permutes. Told apart from the first by the input size: a grid's (h, w) follow the image's
  (H, W) at some stride, channels do not. When both readings fit (C = h = w), channels first;
- (B, T, C): a transformer's tokens, when they tile a square (T = h*h, or 1 + h*h with a class token
  first, which is dropped: ViT).

Anything else (a pooled vector, a flattened map) has no grid and stays as it is, for the caller to refuse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["as_maps", "channels_last", "map_shape", "token_grid", "tokens_as_maps"]


def _grid_like(h: int, w: int, size: Sequence[int]) -> bool:
    """Whether (h, w) cells can be an (H, W) image seen at one stride s: h ~ H/s and w ~ W/s, each
    within a cell (padding and rounding), so |h*W - w*H| <= H + W."""
    H, W = size
    return 1 <= h <= H and 1 <= w <= W and abs(h * W - w * H) <= H + W


def channels_last(shape: Sequence[int], size: Sequence[int]) -> bool:
    """Whether a per-image shape (a, b, c) is (h, w, C) for an input of ``size`` (H, W): (a, b) is a grid
    of the image and (b, c) is not. Ambiguous shapes are read channels first."""
    if len(shape) != 3:
        return False
    a, b, c = shape
    return _grid_like(a, b, size) and not _grid_like(b, c, size)


def token_grid(tokens: int) -> tuple[int, int] | None:
    """``(tokens skipped, side)`` when ``tokens`` tile a square after a class token, or without one."""
    for skip in (1, 0):
        side = math.isqrt(max(tokens - skip, 0))
        if side > 1 and side * side == tokens - skip:
            return skip, side
    return None


def tokens_as_maps(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(..., T, C) tokens -> (..., C, side, side) maps, row-major (as a patch embedding lays them out)."""
    skip, side = grid
    return t[..., skip:, :].transpose(-1, -2).reshape(*t.shape[:-2], t.shape[-1], side, side)


def map_shape(shape: Sequence[int], size: Sequence[int], *, tokens: bool = True) -> tuple[int, ...] | None:
    """The (C, h, w) that a per-image activation ``shape`` reads as at input ``size``; None without a grid."""
    shape = tuple(shape)
    if len(shape) == 3:
        return (shape[2], shape[0], shape[1]) if channels_last(shape, size) else shape
    if len(shape) == 2 and tokens:
        grid = token_grid(shape[0])
        if grid is not None:
            return (shape[1], grid[1], grid[1])
    return None


def as_maps(t: torch.Tensor, size: Sequence[int], *, lead: int = 1, tokens: bool = True) -> torch.Tensor:
    """``t`` (``lead`` leading axes, then one image's activation) as (..., C, h, w) maps, a view where it can be.

    ``lead`` is 1 for activations (B, ...) and 2 for their gradients per target (B, K, ...). A tensor
    already (C, h, w), or without a grid (see ``map_shape``), is returned as it is."""
    per_image = tuple(t.shape[lead:])
    if len(per_image) == 3 and channels_last(per_image, size):
        return t.movedim(-1, -3)
    if len(per_image) == 2 and tokens:
        grid = token_grid(per_image[0])
        if grid is not None:
            return tokens_as_maps(t, grid)
    return t
