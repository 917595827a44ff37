"""Heatmap overlays, the seeds' convention: ReLU, normalise to [0, 1] (optionally square),
upsample bicubically to the image, colour with jet, blend 0.6 x image + 0.4 x heatmap.

numpy lives here on purpose: this is the I/O edge, after the torch core has produced the maps.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from camshaft.errors import ConfigError, UnknownNameError

__all__ = ["normalize_map", "upsample_map", "colorize", "overlay", "render_grid"]


def normalize_map(m: np.ndarray, *, square: bool = False) -> np.ndarray:
    """ReLU, then divide by the maximum; optionally square to suppress small values.

    An all-zero (or all-negative) map stays zero; NaN and infinities count as 0.
    Returns a new float32 array in [0, 1] of the same shape.
    """
    m = np.asarray(m)
    # scaled in float64 when given float64 (or integers): a cast to float32 first would turn values beyond
    # float32's range into infinities (shown as 0) and tiny ones into zeros (an all-blue picture)
    dtype = np.promote_types(m.dtype, np.float32) if m.dtype.kind in "biuf" else np.float64
    m = np.nan_to_num(m.astype(dtype), nan=0.0, posinf=0.0, neginf=0.0)
    m = np.maximum(m, 0.0)
    peak = float(m.max()) if m.size else 0.0
    if peak > 0.0:
        m = m / peak
    if square:
        m = m * m
    return m.astype(np.float32, copy=False)


_BAND_PIXELS = 1 << 18  # pixels coloured and blended at once by ``overlay``


def upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic upsampling of a [0, 1] map (h, w) to size = (width, height); clipped to [0, 1].

    Returns float32 (height, width).
    """
    m = _as_map(m)  # the float32 cast below is safe: a [0, 1] map
    width, height = _check_size(size)
    up = Image.fromarray(np.ascontiguousarray(m, dtype=np.float32)).resize(  # mode "F"
        (width, height), Image.Resampling.BICUBIC
    )
    up = np.array(up, dtype=np.float32)
    return np.clip(up, 0.0, 1.0, out=up)  # bicubic overshoots


def colorize(m01: np.ndarray, *, cmap: str = "jet") -> np.ndarray:
    """Colour a [0, 1] map (H, W) with a matplotlib colormap; returns uint8 (H, W, 3)."""
    import matplotlib  # lazily: only the colormap registry, never pyplot

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as e:
        names = sorted((n for n in matplotlib.colormaps if not n.endswith("_r")), key=str.lower)
        hint = "Common: jet, turbo, viridis, inferno; append '_r' to reverse any colormap"
        raise UnknownNameError("colormap", cmap, names, hint) from e
    m = np.clip(np.nan_to_num(np.asarray(m01, dtype=np.float32)), 0.0, 1.0)
    return np.ascontiguousarray(colormap(m, bytes=True)[..., :3])


def overlay(
    image: Image.Image | np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = 0.4,
    square: bool = False,
    cmap: str = "jet",
) -> Image.Image:
    """Blend a low-resolution map onto its image: (1 - alpha) * image + alpha * colour(map).

    Args:
        image: a PIL image, or an array (H, W[, 3|4]) of uint8, or of floats in [0, 1].
        heatmap: the map (h, w) at any resolution; normalised, then upsampled to (H, W).
    Returns:
        An RGB image of the original size.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must lie in [0, 1], got {alpha!r}")
    base = _as_rgb_array(image)  # (H, W, 3) uint8
    height, width = base.shape[:2]
    m01 = upsample_map(normalize_map(_as_map(heatmap), square=square), (width, height))
    out = np.empty_like(base)
    # coloured and blended a band of rows at a time: the float temporaries of a whole photo (12 MP) took
    # ~0.5 GB per overlay, per writing thread
    rows = max(1, _BAND_PIXELS // width)
    for top in range(0, height, rows):
        band = slice(top, top + rows)
        heat = colorize(m01[band], cmap=cmap)  # (rows, W, 3) uint8
        blended = (1.0 - alpha) * base[band].astype(np.float32) + alpha * heat.astype(np.float32)
        out[band] = np.clip(np.rint(blended), 0, 255)
    return Image.fromarray(out)


def render_grid(
    images: list[Image.Image],
    *,
    columns: int,
    labels: list[str] | None = None,
    pad: int = 2,
) -> Image.Image:
    """Tile images row by row on white, each centred in its cell, with an optional caption below."""
    if not images:
        raise ConfigError("render_grid needs at least one image, got an empty list")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ConfigError(f"columns must be an integer >= 1, got {columns!r}")
    if pad < 0:
        raise ConfigError(f"pad must be >= 0, got {pad!r}")
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"got {len(labels)} labels for {len(images)} images; give one per image")
    tiles = [im.convert("RGB") for im in images]
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    font = ImageFont.load_default()
    caption_h = _caption_height(font, labels, pad=pad)
    cols, rows = min(columns, len(tiles)), math.ceil(len(tiles) / columns)
    size = (cols * cell_w + (cols + 1) * pad, rows * (cell_h + caption_h) + (rows + 1) * pad)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        x, y = pad + col * (cell_w + pad), pad + row * (cell_h + caption_h + pad)
        canvas.paste(tile, (x + (cell_w - tile.width) // 2, y + (cell_h - tile.height) // 2))
        if labels is not None:
            text = _fit(str(labels[i]), font, cell_w)
            draw.text((x, y + cell_h + pad), text, fill="black", font=font)
    return canvas


def _caption_height(font, labels: list[str] | None, *, pad: int) -> int:
    if labels is None:
        return 0
    return max(font.getbbox(str(t) or "Ag")[3] for t in [*labels, "Ag"]) + pad


def _fit(text: str, font, width: int) -> str:
    """Shorten text with '...' until it fits in width pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def _as_map(m: np.ndarray) -> np.ndarray:
    """``m`` as an array, checked to be a 2-D map; its dtype is kept (a float64 map is normalised in float64)."""
    m = np.asarray(m)
    if m.ndim != 2 or m.size == 0:
        raise ConfigError(f"a heatmap must be a non-empty 2-D array (h, w), got shape {m.shape}")
    return m


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"size must be (width, height), got {size!r}") from e
    if width < 1 or height < 1:
        raise ConfigError(f"size must be (width, height) >= (1, 1), got {size!r}")
    return width, height


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or an array (H, W[, C]) of uint8 or floats in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        expected = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        raise ConfigError(f"image array must be {expected}, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.rint(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ConfigError(f"image array must be uint8 or float in [0, 1], got dtype {a.dtype}")
    a = a[..., :3]
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a
