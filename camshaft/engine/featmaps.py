"""Layer feature maps: chosen channels of any tap for one image, as arrays, a grid and overlays."""

from __future__ import annotations

import numbers
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camshaft.data.decode import load_rgb
from camshaft.engine.backends import backend_factory
from camshaft.engine.backends.base import resolve_device, resolve_dtype
from camshaft.engine.postprocess import shown_cells, to_original
from camshaft.errors import ConfigError, ImageDecodeError
from camshaft.models.layout import as_maps
from camshaft.models.sources import resolve_model
from camshaft.preprocess import Geometry, Preprocess, crop_problem, normalize, overrides, prepare
from camshaft.writers.overlay import colorize, normalize_map, overlay, render_grid, upsample_map


@dataclass
class FeatureMaps:
    """Channels ``channels`` of ``tap`` for ``image``: ``maps`` (len(channels), h, w)."""

    tap: str
    channels: list[int]
    maps: np.ndarray
    image: Image.Image
    geometry: Geometry
    preprocess: Preprocess

    def __repr__(self) -> str:  # a notebook shows this, not the whole array
        w, h = self.image.size
        return (f"FeatureMaps({self.tap!r}: {len(self.channels)} channels, maps {tuple(self.maps.shape)}, "
                f"image {w}x{h})")

    def overlays(self, *, alpha: float = 0.4) -> list[Image.Image]:
        """One overlay per channel on the original image (ReLU, [0, 1], bicubic, jet, blend)."""
        return [overlay(self.image, to_original(m, self.geometry, self.preprocess.input_size), alpha=alpha) for m in self.maps]

    def grid(self, *, tile: int = 128, columns: int | None = None) -> Image.Image:
        """The channels side by side, each coloured alone, labelled with its index; tiles are ``tile`` px
        wide and keep the model input's aspect."""
        H, W = self.preprocess.input_size
        size = (tile, max(1, round(tile * H / W)))
        tiles = [Image.fromarray(colorize(upsample_map(normalize_map(m), size))) for m in self.maps]
        columns = columns or int(np.ceil(np.sqrt(len(tiles))))
        return render_grid(tiles, columns=columns, labels=[f"{self.tap} #{c}" for c in self.channels])


def feature_maps(
    model: str | Path | None,
    image: str | Path,
    *,
    tap: str | None = None,
    channels: Sequence[int] | None = None,
    top: int | None = None,
    weights: str | Path | None = None,
    backend: str = "auto",
    device: str | None = None,
    dtype: str = "float32",
    input_size: int | tuple[int, int] | None = None,
    mean: float | tuple[float, float, float] | None = None,
    std: float | tuple[float, float, float] | None = None,
    resize: str | None = None,
    crop_fraction: float | None = None,
    preprocess: dict | None = None,
) -> FeatureMaps:
    """Channels of ``tap`` (default: the last feature map) for one image.

    ``channels`` picks them by index (or one index); ``top`` picks the N with the highest mean
    activation (default: the top 16). ``input_size``, ``mean``, ``std``, ``resize`` and ``crop_fraction`` as
    in ``camshaft.explain`` (None keeps the model's); ``preprocess``, a dict of the same keys, is the
    older way to give them.
    """
    if channels is not None and top is not None:
        raise ConfigError("give --channels or --top, not both")
    given = {**overrides(input_size, mean, std), "resize": resize, "crop_fraction": crop_fraction}
    given = {k: v for k, v in given.items() if v is not None}
    if given and preprocess:
        raise ConfigError("give preprocess or input_size/mean/std/resize, not both (crop_fraction is one of those)")
    preprocess = dict(preprocess or given)
    if "crop_fraction" in preprocess:  # the flag's name -> the field of Preprocess
        preprocess["crop"] = preprocess.pop("crop_fraction")
    if preprocess.get("crop") is not None and (why := crop_problem(preprocess["crop"], preprocess.get("resize"))):
        raise ConfigError(why)  # before the image and the model
    if isinstance(channels, numbers.Integral) and not isinstance(channels, bool):
        channels = [channels]  # one channel
    if channels is not None and not (
        isinstance(channels, Sequence) and all(isinstance(c, numbers.Integral) and not isinstance(c, bool)
                                               for c in channels)
    ):
        raise ConfigError(f"channels must be channel indices (integers), received {channels!r}")
    if channels is not None and len(channels) == 0:  # else: no maps, and a grid that cannot be drawn
        raise ConfigError("channels is empty: give at least one channel index, or top=N")
    if top is not None and (not isinstance(top, numbers.Integral) or isinstance(top, bool) or top < 1):
        raise ConfigError(f"--top must be a positive integer, received {top!r}")
    try:
        picture = load_rgb(image)  # before the model: a bad image costs nothing
    except ImageDecodeError as e:
        raise ImageDecodeError(f"cannot read image {str(image)!r}: {e}") from e
    source = resolve_model(model, weights=weights, preprocess=preprocess)
    with tempfile.TemporaryDirectory(prefix="camshaft-featmaps-") as workdir:  # file backends export torch models
        be = backend_factory(backend, source)(
            source,
            taps=[tap] if tap else None,
            preprocess=preprocess,
            device=resolve_device(device),
            dtype=resolve_dtype(dtype),
            workdir=Path(workdir),
        )
        tap = tap or be.info.taps[-1]
        tensor, geom = prepare(picture, be.info.preprocess)
        a = be.forward(normalize(tensor[None], be.info.preprocess, device=be.device)).taps[tap]
    a = as_maps(a, be.info.preprocess.input_size)[0]  # (C, h, w): channels-last maps and tokens too
    if a.dim() != 3:
        raise ConfigError(f"tap {tap!r} outputs shape {tuple(a.shape)}, not a (C, h, w) feature map "
                          "nor tokens (T, C) that tile a square")
    shown = torch.from_numpy(shown_cells(geom, be.info.preprocess.input_size, tuple(a.shape[1:]))).to(a.device)
    chosen = _channels(a, channels, top, shown)
    return FeatureMaps(tap, chosen, a[chosen].float().cpu().numpy(), picture, geom, be.info.preprocess)


def _channels(a: torch.Tensor, channels: Sequence[int] | None, top: int | None, shown: torch.Tensor) -> list[int]:
    """The channels asked for, or the ``top`` with the highest mean over the cells ``shown`` (h, w) that
    show the image (letterbox padding does not count)."""
    c = a.shape[0]
    if channels is not None:
        bad = [i for i in channels if not 0 <= i < c]
        if bad:
            raise ConfigError(f"channels {bad} out of range: this tap has channels 0..{c - 1}")
        return list(channels)
    k = min(top or 16, c)
    # ties (dead ReLU channels all score 0) to the lower channel, as exemplars break theirs: topk's
    # order among ties is arbitrary; a NaN channel ranks last
    means = torch.nan_to_num(a.float()[:, shown].mean(dim=1), nan=-torch.inf)
    return torch.sort(means, descending=True, stable=True).indices[:k].tolist()
