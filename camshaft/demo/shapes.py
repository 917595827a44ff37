"""Synthetic "shapes on clutter" images for the embedded demo classifier.

The class is decided only by the object's shape. The clutter (a colour gradient, small blobs,
thin lines and pixel noise) is drawn from one distribution for every class and never holds a
shape at object scale, so a classifier must look at the object and its maps sit on it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from camshaft.errors import ConfigError

CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
IMAGE_SIZE = 96

_OBJECT_EXTENT = (0.25, 0.45)  # object's bounding-box side, as a fraction of the image side
_MIN_CONTRAST = 90.0  # least luminance gap between the object and the local background
_SUPERSAMPLE = 2  # the object mask is drawn this much larger, then reduced (anti-aliasing)

Box = tuple[int, int, int, int]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two random colours, (size, size, 3) float."""
    c0, c1 = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    t = ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)  # (size, size) in [0, 1]
    return c0.astype(np.float32) + t[..., None] * (c1 - c0).astype(np.float32)


def _clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Small blobs and thin lines in muted colours, the same for every class."""
    size = canvas.width
    draw = ImageDraw.Draw(canvas)
    base = np.asarray(canvas, dtype=np.float32).reshape(-1, 3).mean(axis=0)

    def muted() -> tuple[int, ...]:
        mix = rng.uniform(0.3, 0.7)
        return tuple((base * (1 - mix) + rng.uniform(0, 255, 3) * mix).astype(int).tolist())

    for _ in range(int(rng.integers(12, 25))):  # blobs: ellipses and small polygons
        cx, cy = rng.uniform(0, size, 2)
        r = rng.uniform(0.015, 0.05) * size
        if rng.random() < 0.5:
            rx, ry = r, r * rng.uniform(0.4, 1.0)
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=muted())
        else:
            k = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * math.pi, k))
            rad = r * rng.uniform(0.5, 1.0, k)
            pts = list(zip(cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
            draw.polygon(pts, fill=muted())
    for _ in range(int(rng.integers(4, 10))):  # thin lines and short strokes
        x0, y0 = rng.uniform(0, size, 2)
        length = rng.uniform(0.1, 0.6) * size
        ang = rng.uniform(0, 2 * math.pi)
        end = (x0 + length * math.cos(ang), y0 + length * math.sin(ang))
        draw.line([(x0, y0), end], fill=muted(), width=int(rng.integers(1, 3)))


def _outline(rng: np.random.Generator, label: int) -> list[list[tuple[float, float]]]:
    """Unit-scale polygons of a shape centred on 0; rings are an outer and an inner circle."""
    name = CLASS_NAMES[label]
    if name in ("circle", "ring"):
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        polys = [np.stack([np.cos(t), np.sin(t)], 1)]
        if name == "ring":
            polys.append(polys[0] * rng.uniform(0.45, 0.6))
        return [[tuple(p) for p in poly] for poly in polys]
    if name == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    elif name == "triangle":
        t = np.array([-90, 30, 150]) * math.pi / 180
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif name == "cross":
        w = rng.uniform(0.28, 0.4)  # half-width of each bar
        q = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
             (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        pts = np.array(q, dtype=float)
    else:  # pragma: no cover - CLASS_NAMES and this function change together
        raise AssertionError(name)
    a = rng.uniform(0, 2 * math.pi)  # rotation
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return [[tuple(p) for p in pts @ rot.T]]


def _object_mask(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """An 'L' mask of one shape, random extent and position, fully inside the image."""
    polys = _outline(rng, label)
    allpts = np.concatenate([np.asarray(p) for p in polys])
    lo, hi = allpts.min(0), allpts.max(0)
    extent = rng.uniform(*_OBJECT_EXTENT) * size
    scale = extent / (hi - lo).max()
    span = (hi - lo) * scale
    origin = np.array([rng.uniform(1, size - 1 - s) for s in span])  # top-left of the box
    s = _SUPERSAMPLE
    mask = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(mask)
    for i, poly in enumerate(polys):  # the first polygon fills, later ones cut holes
        pts = [tuple(((np.asarray(p) - lo) * scale + origin) * s) for p in poly]
        draw.polygon(pts, fill=255 if i == 0 else 0)
    return mask.resize((size, size), Image.Resampling.BOX)


def _object_colour(rng: np.random.Generator, local: np.ndarray) -> np.ndarray:
    """A random colour whose luminance is far enough from the local background's."""
    bg = float(_luma(local))
    for _ in range(100):
        c = rng.uniform(0, 255, 3)
        if abs(float(_luma(c)) - bg) >= _MIN_CONTRAST:
            return c
    return np.full(3, 0.0 if bg > 127 else 255.0)


def render_sample(
    rng: np.random.Generator, *, size: int = IMAGE_SIZE, label: int | None = None
) -> tuple[Image.Image, int, Box]:
    """Draw one image: a shape of class `label` (random if None) on class-free clutter.

    Returns:
        The RGB image, its label and the object's box (x0, y0, x1, y1), x1/y1 exclusive.
    """
    if label is None:
        label = int(rng.integers(len(CLASS_NAMES)))
    elif not 0 <= label < len(CLASS_NAMES):
        raise ConfigError(f"label must be in [0, {len(CLASS_NAMES)}), received {label}")
    if size < 32:
        raise ConfigError(f"size must be at least 32 pixels, received {size}")

    canvas = Image.fromarray(_background(rng, size).astype(np.uint8))
    _clutter(rng, canvas)
    mask = _object_mask(rng, label, size)
    box = mask.getbbox()
    pixels = np.asarray(canvas, dtype=np.float32)  # (H, W, 3)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0  # (H, W, 1)
    local = (pixels * alpha).sum((0, 1)) / max(float(alpha.sum()), 1e-6)
    colour = _object_colour(rng, local).astype(np.float32)
    pixels += alpha * (colour - pixels)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32)
    pixels += noise * np.float32(rng.uniform(3, 12))  # sensor-like noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image, label, box


def write_demo_dataset(
    out_dir: str | Path, *, n: int = 24, seed: int = 0, size: int = IMAGE_SIZE
) -> Path:
    """Write `n` images (every third a PNG, the rest JPEG) and `manifest.csv` under `out_dir`.

    Classes cycle so every class is present; the same seed writes the same files.

    Returns:
        The manifest's path; its rows are `path,label,x0,y0,x1,y1`, paths relative to it.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, received {n}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image, label, box = render_sample(rng, size=size, label=i % len(CLASS_NAMES))
        rel = Path("images") / CLASS_NAMES[label] / f"{i}.{'png' if i % 3 == 2 else 'jpg'}"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.suffix == ".png":
            image.save(out / rel)
        else:
            image.save(out / rel, quality=95)
        rows.append([rel.as_posix(), CLASS_NAMES[label], *box])
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "x0", "y0", "x1", "y1"])
        writer.writerows(rows)
    return manifest
