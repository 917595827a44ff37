"""Decode JPEGs on the model's device and resize them there as Pillow does.

The decode threads of ``--decode device`` read each file and its header
(:func:`camshaft.data.jpeg.read_encoded`); here a batch of those files is decoded by
torchvision's JPEG decoder on the device (nvJPEG on a GPU, libjpeg-turbo on the CPU), turned by
its EXIF orientation and resized for the model. A file the decoder refuses is decoded by Pillow
instead, which reads it or gives the reason it cannot.

The resize is Pillow's ``Image.resize(size, BILINEAR, box=...)``, the one the other decoders use
(:func:`camshaft.preprocess.resize_rgb`): a triangle filter stretched by the downscaling factor
(antialiased), over the box (fractional for a centre crop), applied along the width and then the
height, each pass rounded to 8 bits. Each pass is one matrix product with the filter's weights,
batched over the images of one size. Pillow 13 runs the height first for some shapes, and its
weights are fixed-point, so a pixel may differ from Pillow's by a rounding step per pass: at most
two levels in 255, a fraction of a level on average (the tests check both); nvJPEG's IDCT on a GPU
adds its own differences of a few levels.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec's; they are what the
torchvision pinned here (and older ones, back to 0.19) offer, so camshaft uses them, silencing that
one warning.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from camshaft.data.jpeg import JpegInfo
from camshaft.data.workers import Resized, decode_resized
from camshaft.preprocess import Geometry, Preprocess, geometry

__all__ = ["decode_on_device", "orient", "resample_weights", "resize"]

warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)


def resample_weights(size_in: int, size_out: int, lo: float, hi: float) -> np.ndarray:
    """(size_out, size_in) weights of Pillow's bilinear resampling of the input span [lo, hi).

    Output cell ``i`` is centred on input coordinate ``lo + (i + 0.5) * scale``; the triangle filter
    is widened by ``scale`` when shrinking (``support``); the cells it reaches are those of the
    centre's support rounded to whole cells, cut at the edges, and the weights are normalised.
    """
    lo, hi = float(np.float32(lo)), float(np.float32(hi))  # Pillow takes the box as C floats
    scale = (hi - lo) / size_out
    support = max(scale, 1.0)
    centre = lo + (np.arange(size_out) + 0.5) * scale
    first = np.maximum(np.trunc(centre - support + 0.5), 0)
    end = np.minimum(np.trunc(centre + support + 0.5), size_in)
    x = np.arange(size_in)
    w = np.clip(1.0 - np.abs((x - centre[:, None] + 0.5) / support), 0.0, None)
    w *= (x >= first[:, None]) & (x < end[:, None])
    total = w.sum(1, keepdims=True)
    return w / np.where(total == 0, 1.0, total)


@functools.lru_cache(maxsize=512)
def _weights(
    size_in: int, size_out: int, lo: float, hi: float, device: torch.device
) -> tuple[torch.Tensor, int, int]:
    """The weights on ``device``, cut to the input cells they reach: (weights, first cell, end cell)."""
    w = resample_weights(size_in, size_out, lo, hi)
    used = np.flatnonzero(w.any(0))
    first, end = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, size_in)
    return torch.from_numpy(w[:, first:end]).float().to(device), first, end


def _round8(t: torch.Tensor) -> torch.Tensor:
    return t.add_(0.5).floor_().clamp_(0, 255)


def _resample(images: torch.Tensor, size: tuple[int, int], box: tuple[float, float, float, float]) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> float (n, 3, h, w) of whole 8-bit values: the box (x0, y0, x1, y1) at ``size``."""
    (h, w), (x0, y0, x1, y1) = size, box
    wx, cx0, cx1 = _weights(images.shape[-1], w, x0, x1, images.device)
    wy, cy0, cy1 = _weights(images.shape[-2], h, y0, y1, images.device)
    rows = _round8(images[..., cy0:cy1, cx0:cx1].float() @ wx.T)  # along the width first, as Pillow
    return _round8(wy @ rows)


def resize(images: torch.Tensor, geom: Geometry, pre: Preprocess) -> torch.Tensor:
    """uint8 (n, 3, H, W) images of one size -> uint8 (n, h, w, 3) model inputs, as ``resize_rgb``."""
    h, w = pre.input_size
    if pre.resize != "letterbox":
        out = _resample(images, (h, w), geom.region)
    else:
        out = torch.empty(images.shape[0], 3, h, w, device=images.device)
        for c, value in enumerate(pre.letterbox_fill):  # filled there: a tensor of numbers would be a blocking copy
            out[:, c].fill_(value)
        cx0, cy0, cx1, cy1 = (int(v) for v in geom.content)
        full = (0.0, 0.0, float(images.shape[-1]), float(images.shape[-2]))
        out[..., cy0:cy1, cx0:cx1] = _resample(images, (cy1 - cy0, cx1 - cx0), full)
    return out.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned by its EXIF orientation, as ``PIL.ImageOps.exif_transpose`` turns it."""
    if orientation in (5, 6, 7, 8):
        # transpose (5), rotate 90 degrees clockwise (6), transverse (7), counter-clockwise (8)
        k = {5: None, 6: -1, 7: None, 8: 1}[orientation]
        if k is not None:
            return torch.rot90(image, k, dims=(-2, -1))
        image = image.transpose(-2, -1)
        return image if orientation == 5 else image.flip(-2, -1)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
CHUNK_PIXELS = 1 << 25  # images resized at once: at most this many pixels (384 MiB as RGB floats)


def _decode(encoded: list[np.ndarray], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 images on ``device``, as stored; None for a file the decoder refuses."""
    tensors = [torch.from_numpy(e) for e in encoded]
    if device.type != "cuda":
        return [_one(t, device) for t in tensors]
    # The decoder's outputs are allocated on a stream of their own, never from blocks that the
    # compute stream's queued kernels may still read (torchvision's nvJPEG path writes them from a
    # private stream without waiting on the caller's). The compute stream then waits for them.
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    stream = _STREAMS[device]
    compute = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream):
        try:
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: find it
            images = [_one(t, device) for t in tensors]
    compute.wait_stream(stream)
    for image in images:
        if image is not None:
            image.record_stream(compute)  # its block is not reused before the compute stream is done with it
    return images


def _one(t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(t, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def decode_on_device(
    files: list[tuple[str, np.ndarray, JpegInfo]], pre: Preprocess, device: torch.device
) -> list[Resized]:
    """Each (path, bytes, header) decoded and resized on ``device``: pixels (h, w, 3) uint8 there.

    A file the device's decoder refuses goes through Pillow, which decodes it or gives the reason.
    """
    images = _decode([data for _, data, _ in files], device)
    out: list[Resized | None] = [None] * len(files)
    sizes: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, ((path, _, info), image) in enumerate(zip(files, images, strict=True)):
        if image is None or tuple(image.shape[-2:]) != (info.height, info.width):
            out[i] = decode_resized(path, pre)
        else:
            images[i] = orient(image, info.orientation)
            sizes[tuple(images[i].shape[-2:])].append(i)
    for (h, w), members in sizes.items():
        geom = geometry((w, h), pre)
        step = max(1, CHUNK_PIXELS // (h * w))  # the resize holds its images as floats: bound that memory
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            pixels = resize(torch.stack([images[i] for i in chunk]), geom, pre)
            for j, i in enumerate(chunk):
                out[i] = Resized(pixels[j], geom)
    return out
