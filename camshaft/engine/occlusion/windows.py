"""Where the occlusion windows sit, and the occluded images built from them on the device.

Layout (the same as captum's ``Occlusion``, so maps compare cell for cell): along each axis of an
input of ``n`` pixels, a window of ``w`` pixels moved by ``s`` pixels takes ``ceil((n - w) / s) + 1``
positions, starting at ``0, s, 2s, ...``. When ``s`` does not divide ``n - w`` the last window
overhangs the border and is cut there (it covers fewer pixels), so every pixel is covered. Position
``(i, j)`` is cell ``(i, j)`` of the method's map; positions are numbered row-major, ``p = i * cols + j``.
Outputs get the map as tiles instead (``Grid.to_tiles``): each pixel's mean over the windows covering it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from camshaft.engine.backends.base import upload
from camshaft.errors import ConfigError


@dataclass(frozen=True)
class Grid:
    """The window positions over an input of ``size`` pixels; all pairs are (height, width)."""

    size: tuple[int, int]  # (H, W) of the model input
    window: tuple[int, int]  # (wh, ww) pixels
    stride: tuple[int, int]  # (sh, sw) pixels

    def __post_init__(self):
        problems = []
        for name in ("window", "stride"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                problems.append(f"{name} must be two positive integers (height, width), received {value}")
        if not problems and (self.window[0] > self.size[0] or self.window[1] > self.size[1]):
            problems.append(
                f"window {self.window[0]}x{self.window[1]} is larger than the {self.size[0]}x{self.size[1]} "
                "model input; use a smaller --window"
            )
        gaps = [a for a in (0, 1) if not problems and self.stride[a] > self.window[a] < self.size[a]]
        if gaps:  # captum's rule: pixels between windows would be covered by none (their map: 0 / 0)
            problems.append(
                f"stride {self.stride[0]},{self.stride[1]} is longer than the window {self.window[0]},"
                f"{self.window[1]}: pixels between windows would be covered by none; use a stride at most the window"
            )
        if problems:
            raise ConfigError("invalid occlusion grid: " + "; ".join(problems))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of window positions: the map's shape."""
        return tuple(math.ceil((n - w) / s) + 1 for n, w, s in zip(self.size, self.window, self.stride, strict=True))

    @property
    def count(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def boxes(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top, left, bottom, right) pixel bounds (exclusive ends, cut at the border) of positions ``pos``."""
        pos = pos.long()
        cols = self.shape[1]
        top = torch.div(pos, cols, rounding_mode="floor") * self.stride[0]
        left = (pos % cols) * self.stride[1]
        bottom = (top + self.window[0]).clamp(max=self.size[0])
        right = (left + self.window[1]).clamp(max=self.size[1])
        return top, left, bottom, right

    def masks(self, pos: torch.Tensor, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """(M, 1, H, W) boolean masks, True inside the windows of positions ``pos`` (M,)."""
        top, left, bottom, right = self.boxes(upload(pos, device))  # computed there
        ys = torch.arange(self.size[0], device=device)
        xs = torch.arange(self.size[1], device=device)
        rows = (ys >= top[:, None]) & (ys < bottom[:, None])  # (M, H)
        cols = (xs >= left[:, None]) & (xs < right[:, None])  # (M, W)
        return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)


    @property
    def tile_shape(self) -> tuple[int, int]:
        """(rows, cols) of the tiles of :meth:`to_tiles`: ``gcd(size, window, stride)`` pixels each."""
        return tuple(n // math.gcd(n, w, s) for n, w, s in zip(self.size, self.window, self.stride, strict=True))

    def to_tiles(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps over window positions (..., rows, cols) -> each pixel's mean over the windows covering it.

        That is captum's per-pixel attribution. Every window edge falls on a multiple of
        ``t = gcd(size, window, stride)`` pixels, so it is constant on tiles of t x t pixels that tile
        the input evenly, as outputs place map cells; the result is those tiles (..., H / t, W / t).
        """
        weights = []
        for n, w, s, count, tiles in zip(self.size, self.window, self.stride, self.shape, self.tile_shape, strict=True):
            first = torch.arange(tiles) * (n // tiles)  # each tile's first pixel: in a window iff the tile is
            starts = torch.arange(count) * s
            cover = (first[:, None] >= starts[None]) & (first[:, None] < starts[None] + w)  # (tiles, positions)
            weights.append(upload(cover / cover.sum(1, keepdim=True), maps.device).to(maps.dtype))  # no GPU wait
        rows, cols = weights
        return torch.einsum("ai,...ij,bj->...ab", rows, maps, cols)


def occlude(x: torch.Tensor, fill: torch.Tensor, grid: Grid, img: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Occluded variants (M, C, H, W): image ``img[m]`` with window ``pos[m]`` replaced by its fill.

    ``x`` is (B, C, H, W); ``fill`` is broadcastable to it with a batch dimension of B (a constant
    (B, 1, 1, 1), a per-image colour (B, C, 1, 1) or a per-image picture (B, C, H, W)).
    """
    img = upload(img, x.device)
    return torch.where(grid.masks(pos, device=x.device), fill[img], x[img])


def all_pairs(batch: int, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, position) of every occluded variant, image-major: (B * count,) each."""
    img = torch.arange(batch).repeat_interleave(grid.count)
    pos = torch.arange(grid.count).repeat(batch)
    return img, pos


def border_batches(grid: Grid, per_forward: int) -> list[torch.Tensor]:
    """Every position once, in batches of at most ``per_forward`` whose windows sit alike near the border.

    For incremental occlusion: a batch computes each layer on boxes of one size, that of the
    largest cone among its windows; a window near an edge has its cone cut there, so a batch of such windows
    works on smaller boxes. The classes, in this order: near a corner, near the top or bottom edge
    only, near the left or right edge only, inside. "Near" is within a sixth of the grid (at least
    one row or column) of the edge. Each class is split into near-equal batches.
    """
    rows, cols = grid.shape
    pos = torch.arange(grid.count)
    r, c = pos // cols, pos % cols
    near = []
    for i, n in ((r, rows), (c, cols)):
        m = max(1, n // 6)
        near.append(((i < m) | (i >= n - m)) if 2 * m < n else torch.ones_like(i, dtype=torch.bool))
    near_r, near_c = near
    out = []
    for members in (near_r & near_c, near_r & ~near_c, ~near_r & near_c, ~near_r & ~near_c):
        group = pos[members]
        if len(group):
            out += list(group.tensor_split(-(-len(group) // per_forward)))
    return out
