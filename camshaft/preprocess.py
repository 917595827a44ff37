"""Preprocessing: original image -> model input, and the geometry to map explanations back.

Importing this module does not import torch (decode worker processes resize images with
:func:`resize_rgb` and stay small); :func:`prepare` and :func:`normalize` import it when called.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from camshaft.errors import ConfigError

if TYPE_CHECKING:
    import torch

RESIZE_MODES = ("stretch", "center-crop", "letterbox")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes the model's input tensor."""

    input_size: tuple[int, int] = (224, 224)  # (H, W)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel, on [0, 1] pixels
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "center-crop"  # stretch | center-crop | letterbox
    crop: float = 1.0  # center-crop: the centred fraction of the largest region kept (torchvision's eval: 0.875)

    def __post_init__(self):
        problems = [f"{name} must be a sequence of numbers, received {getattr(self, name)!r}"
                    for name in ("input_size", "mean", "std") if not isinstance(getattr(self, name), (tuple, list))]
        if problems:
            raise ConfigError("; ".join(problems))
        whole = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in self.input_size)
        if len(self.input_size) != 2 or not whole or min(self.input_size) < 1:
            problems.append(f"input_size must be two positive integers (H, W), received {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append(f"mean and std need 3 values (R, G, B), received {self.mean}, {self.std}")
        elif not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in (*self.mean, *self.std)):
            problems.append(f"mean and std must be finite numbers, received {self.mean}, {self.std}")
        elif min(self.std) <= 0:
            problems.append(f"std must be positive, received {self.std}")
        if self.resize not in RESIZE_MODES:
            problems.append(f"resize must be one of {', '.join(RESIZE_MODES)}, received {self.resize!r}")
        if (why := crop_problem(self.crop, self.resize)) is not None:
            problems.append(why)
        if problems:
            raise ConfigError("; ".join(problems))
        object.__setattr__(self, "crop", float(self.crop))  # a numpy number or 1 -> a float, as JSON writes it

    def replace(self, **changes) -> Preprocess:
        """A copy with the given fields changed; None values keep the current field.

        A crop belongs to center-crop: another resize mode drops the crop it would inherit (a model
        exported with a crop fraction still letterboxes on ``resize="letterbox"``); one given with it is checked.
        """
        fields = {k: v for k, v in changes.items() if v is not None}
        if fields.get("resize", "center-crop") != "center-crop" and "crop" not in fields:
            fields["crop"] = 1.0
        return Preprocess(**{**self.__dict__, **fields})

    @property
    def letterbox_fill(self) -> tuple[int, int, int]:
        """The 8-bit colour around a letterboxed image: the mean, which normalises to zero."""
        return tuple(int(round(255 * m)) for m in self.mean)

    def to_dict(self) -> dict:
        """The fields as JSON values; ``crop`` only when it crops, so that runs and artifacts from before it
        existed keep their fingerprints (they resume rather than start over)."""
        d = {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std), "resize": self.resize}
        return d if self.crop == 1 else {**d, "crop": self.crop}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(tuple(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), d.get("resize", "stretch"),
                   d.get("crop", 1.0))


def crop_problem(crop, resize: str | None = None) -> str | None:
    """What is wrong with a crop fraction under ``resize`` (None: not known yet; an unknown mode is the
    caller's to report), or None when nothing is."""
    if not isinstance(crop, numbers.Real) or isinstance(crop, bool) or not 0 < crop <= 1:  # NaN fails too
        return f"crop fraction (--crop-fraction) must be a number in (0, 1], received {crop!r}"
    if crop != 1 and resize in RESIZE_MODES and resize != "center-crop":
        return (f"crop fraction {crop} keeps a centred part of a center-crop, but resize is {resize!r}: "
                "use --resize center-crop, or leave out --crop-fraction")
    return None


def overrides(input_size=None, mean=None, std=None) -> dict:
    """Preprocessing overrides as the API takes them: tuples of plain numbers, one number meaning a square
    input or the same value for every channel (as the CLI's flags); None keeps the model's. ``Preprocess``
    checks the values."""
    fields, problems = {}, []
    for name, value, n in (("input_size", input_size, 2), ("mean", mean, 3), ("std", std, 3)):
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            value = (value,) * n
        elif value is not None and not isinstance(value, str):
            try:
                value = tuple(v.item() if isinstance(v, np.generic) else v for v in value)
            except TypeError:
                pass
        if value is not None and not isinstance(value, tuple):
            problems.append(f"{name} must be {n} numbers or one number, received {value!r}")
        fields[name] = value
    if problems:
        raise ConfigError("; ".join(problems))
    return fields


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits in the model input, and which part of it is seen.

    ``content`` is the box (x0, y0, x1, y1) in model-input pixels showing ``region``, a box in
    original-image pixels. Maps are cropped to ``content`` and stretched onto ``region``.
    """

    original_size: tuple[int, int]  # (W, H)
    content: tuple[float, float, float, float]
    region: tuple[float, float, float, float]

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Model-input pixel coordinates -> original-image pixel coordinates."""
        cx0, cy0, cx1, cy1 = self.content
        rx0, ry0, rx1, ry1 = self.region
        return (rx0 + (x - cx0) * (rx1 - rx0) / (cx1 - cx0), ry0 + (y - cy0) * (ry1 - ry0) / (cy1 - cy0))


def geometry(original_size: tuple[int, int], pre: Preprocess) -> Geometry:
    """Where an image of ``original_size`` (W, H) lands in the model input under ``pre``."""
    h, w = pre.input_size
    w0, h0 = original_size
    if pre.resize == "stretch":
        return Geometry((w0, h0), (0, 0, w, h), (0, 0, w0, h0))
    if pre.resize == "center-crop":
        scale = max(w / w0, h / h0) / pre.crop  # a crop of 0.875: torchvision's resize to 256, crop 224
        cw, ch = w / scale, h / scale  # the seen region, in original pixels
        x0, y0 = (w0 - cw) / 2, (h0 - ch) / 2
        return Geometry((w0, h0), (0, 0, w, h), (x0, y0, x0 + cw, y0 + ch))
    scale = min(w / w0, h / h0)  # letterbox
    nw, nh = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    ox, oy = (w - nw) // 2, (h - nh) // 2
    return Geometry((w0, h0), (ox, oy, ox + nw, oy + nh), (0, 0, w0, h0))


def resize_rgb(image: Image.Image, pre: Preprocess) -> tuple[np.ndarray, Geometry]:
    """Resize an RGB image for the model: a writable uint8 array (H, W, 3) and its geometry."""
    h, w = pre.input_size
    geom = geometry(image.size, pre)
    if pre.resize == "letterbox":
        out = Image.new("RGB", (w, h), pre.letterbox_fill)
        cx0, cy0, cx1, cy1 = (int(v) for v in geom.content)
        out.paste(image.resize((cx1 - cx0, cy1 - cy0), Image.BILINEAR), (cx0, cy0))
    else:
        out = image.resize((w, h), Image.BILINEAR, box=geom.region)
    return np.array(out, dtype=np.uint8), geom


def prepare(image: Image.Image, pre: Preprocess) -> tuple[torch.Tensor, Geometry]:
    """Resize an RGB image for the model: uint8 tensor (3, H, W) and its geometry."""
    import torch

    pixels, geom = resize_rgb(image, pre)
    return torch.from_numpy(pixels).permute(2, 0, 1), geom


def normalize(
    batch: torch.Tensor,
    pre: Preprocess,
    *,
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised input on ``device``, in ``memory_format`` (default: contiguous).

    The batch goes to the device in its own layout (a (B, H, W, 3) buffer viewed as NCHW is copied
    as one block) and changes layout there, where that is cheap.
    """
    import torch

    x = batch.to(device, non_blocking=True).float().div_(255)
    mean, std = _statistics(tuple(pre.mean), tuple(pre.std), x.device)
    return x.sub_(mean).div_(std).contiguous(memory_format=memory_format or torch.contiguous_format)


@functools.lru_cache(maxsize=16)
def _statistics(mean: tuple, std: tuple, device):
    """(1, 3, 1, 1) mean and std on ``device``, made once: a tensor made from numbers on a GPU is a
    copy from pageable memory, which waits until the GPU has run everything queued before it."""
    import torch

    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
