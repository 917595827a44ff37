"""Decode any image file Pillow reads into an 8-bit RGB image, or say in a few words why not.

Decisions, in one place:

- EXIF orientation is applied, so the map lines up with the image as people see it.
- Transparency (RGBA, LA, PA, and palette, grey (8 or 16 bits) or RGB with a transparent colour)
  is composited onto white, not dropped: the colour under a transparent pixel is often arbitrary
  (black or stale).
- 16-bit grey (``I;16*``) is scaled by 255/65535 (rounded to the nearest level, in integers: a
  16-bit image costs no float copies); 32-bit ``I`` the same when its values fit in 0..65535
  (16-bit PNG/PGM/TIFF), else stretched min..max; float ``F`` is taken as 0..1 when its values lie
  there, else stretched min..max. Non-finite floats count as 0.
- CMYK goes through its embedded ICC profile when it has one (LittleCMS, to sRGB), else through
  Pillow's ``(255 - C)(255 - K) / 255`` formula. ICC profiles of RGB images are ignored, as the
  torchvision training pipelines ignore them.
- Multi-frame files (GIF, APNG, TIFF, WebP, MPO) give their first frame.
- Pixels are decoded inside :func:`load_rgb`, so a truncated file fails here and not later.
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone. Pillow's decompression-bomb limit
  (``Image.MAX_IMAGE_PIXELS``) applies: past twice the limit the image is refused.
- Only regular files are opened: a named pipe, socket or device is refused (opening a pipe would
  wait for a writer, and the run with it).
- PostScript (EPS) is not read, whatever the file's name: Pillow hands it to Ghostscript, an
  external interpreter that runs the file's program (which may never end) with no time limit.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from camshaft.errors import ConfigError, ImageDecodeError

__all__ = ["load_rgb", "decode_batch"]

_WHITE = (255, 255, 255, 255)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)
_NOT_READ = frozenset({"EPS"})  # formats Pillow reads through an external program


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read one image file as a fully decoded 8-bit RGB image.

    Raises:
        ImageDecodeError: the file is missing, unreadable, not an image, truncated, corrupt,
            too large or of an unsupported pixel mode; the message is a short reason.
    """
    path = os.fspath(path)
    try:
        if not _openable(path):
            raise ImageDecodeError("not a regular file (a pipe, socket or device)")
        with Image.open(path, formats=_formats()) as im:  # positioned on the first frame
            im.load()  # decode every pixel now: truncation surfaces here
            out = _to_rgb(_orient(im))
            return out if out is not im else im.copy()  # never hand out the open file
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one results-table reason
        raise ImageDecodeError(_reason(path, e)) from e


def _formats() -> list[str]:
    """Every format Pillow knows (plugins registered since included), in its order, but those in ``_NOT_READ``."""
    Image.init()
    return [f for f in Image.ID if f not in _NOT_READ]


def _openable(path: str) -> bool:
    """Not a pipe, socket or device: opening a pipe would wait for a writer forever.

    A folder, or a path that cannot be looked at (missing, permission denied), is left to Pillow's open,
    which fails with its reason.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


def decode_batch(
    paths: Iterable[str | os.PathLike], *, max_workers: int = 4
) -> list[Image.Image | ImageDecodeError]:
    """Decode many files on a thread pool (Pillow releases the GIL while decoding).

    Returns one entry per path, in input order: the RGB image, or the ImageDecodeError in its
    place (returned, not raised).
    """
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ConfigError(f"max_workers must be an integer >= 1, got {max_workers!r}")
    paths = list(paths)
    if max_workers == 1 or len(paths) <= 1:
        return [_load_or_error(p) for p in paths]
    workers = min(max_workers, len(paths))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="camshaft-decode") as pool:
        return list(pool.map(_load_or_error, paths))


def _load_or_error(path: str | os.PathLike) -> Image.Image | ImageDecodeError:
    try:
        return load_rgb(path)
    except ImageDecodeError as e:
        return e


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a malformed EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - bad metadata must not cost the image
        warnings.warn(f"ignoring unreadable EXIF orientation: {e}", stacklevel=2)
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(im)
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _flatten_on_white(im)
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"unsupported pixel mode {mode!r}") from e


def _flatten_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    a = np.asarray(im)  # (H, W) uint16, int32 or float32
    if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535):
        grey = a.astype(np.uint32)
        grey *= 255
        grey += 32767  # round half up: v * 255 / 65535 is never a whole number and a half
        grey //= 65535
        grey = grey.astype(np.uint8)
    else:
        f = a.astype(np.float64)
        if im.mode == "F":
            np.nan_to_num(f, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        if im.mode == "F" and f.size and f.min() >= 0.0 and f.max() <= 1.0:
            f *= 255.0
        else:
            f = _stretch(f)
        grey = np.clip(np.rint(f, out=f), 0, 255, out=f).astype(np.uint8)
    key = im.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):  # a grey level that means "transparent"
        grey[a == key] = 255  # composited onto white
    return Image.fromarray(grey).convert("RGB")


def _stretch(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as e:
            msg = f"ignoring unusable CMYK ICC profile ({e}); converting without it"
            warnings.warn(msg, stacklevel=2)
    return im.convert("RGB")


def _reason(path: str, e: BaseException) -> str:
    """The short human reason for a decoding failure (one results-table cell)."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, Image.DecompressionBombError):
        return _too_large(e)
    if isinstance(e, UnidentifiedImageError):
        if _size_or_none(path) == 0:
            return "empty file (0 bytes)"
        return "not an image (cannot identify image file)"
    if isinstance(e, MemoryError):
        return "out of memory while decoding"
    if isinstance(e, OSError) and e.errno is not None:  # the file system's (a link loop, a name too long, EIO)
        return f"cannot read the file: {e.strerror or e}"
    if isinstance(e, _CORRUPT):
        return f"truncated or corrupt image data: {str(e) or type(e).__name__}"
    return f"cannot decode image: {type(e).__name__}: {e}"


def _too_large(e: Image.DecompressionBombError) -> str:
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(e))
    if not found:
        return f"image too large: {e}"
    pixels, limit = found.groups()
    return (
        f"image too large: {pixels} pixels exceeds the decompression-bomb limit of {limit} "
        "pixels (PIL.Image.MAX_IMAGE_PIXELS, doubled)"
    )


def _size_or_none(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
