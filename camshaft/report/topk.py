"""A running top-k of images per channel: the dataset exemplars of a tap, gathered in one pass.

Each image scores each channel by the channel's spatial maximum (or mean) activation; the
accumulator keeps, per channel, the k highest scores with their image index and the channel's
activation map (h, w), which shows the activating region. Ties go to the lower image index, so the
result does not depend on batch size or batch order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from camshaft.engine.backends.base import upload
from camshaft.errors import ConfigError

REDUCTIONS = ("max", "mean")


@dataclass(frozen=True)
class TopKResult:
    """Per channel, the best images first: ``scores``/``indices`` (C, k'), ``maps`` (C, k', h, w).

    k' = min(k, images seen); images with a NaN score come after every number (tables leave them out).
    """

    channels: tuple[int, ...]
    scores: torch.Tensor
    indices: torch.Tensor
    maps: torch.Tensor


class TopK:
    """Keeps the k most activating images per channel of one tap; call ``update`` per batch."""

    def __init__(self, *, k: int, channels: Sequence[int] | None = None, reduce: str = "max"):
        if k < 1:
            raise ConfigError(f"k must be at least 1, received {k}")
        if reduce not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {reduce!r}; valid choices: {', '.join(REDUCTIONS)}")
        self.k, self.reduce = k, reduce
        self.channels = None if channels is None else tuple(int(c) for c in channels)
        self._scores = self._indices = self._maps = None  # (C, k), (C, k), (C, k, h, w)

    @property
    def empty(self) -> bool:
        """Whether no image has been added yet."""
        return self._scores is None

    def update(
        self, activations: torch.Tensor, indices: Sequence[int] | torch.Tensor, *, shown: torch.Tensor | None = None
    ) -> None:
        """Add a batch: ``activations`` (B, C, h, w) of the images ``indices`` (B,).

        ``shown`` (B, h, w) bool: the cells that show each image (``postprocess.shown_cells``); only
        they score, so a channel that answers letterbox padding does not rank images by their padding.
        """
        a = activations.detach().float()
        if a.dim() != 4:
            raise ConfigError(f"activations must be (B, C, h, w), received shape {tuple(a.shape)}")
        idx = upload(torch.as_tensor(indices, dtype=torch.int64), a.device)  # without waiting for a GPU
        if idx.shape != (a.shape[0],):
            raise ConfigError(f"got {idx.numel()} indices for a batch of {a.shape[0]} images")
        a = self._select(a).transpose(0, 1)  # (C, B, h, w)
        self._fold(self._score(a, shown), idx.expand(a.shape[0], -1), a)

    def _score(self, a: torch.Tensor, shown: torch.Tensor | None) -> torch.Tensor:
        """(C, B) scores of activations (C, B, h, w): their max or mean over the cells shown."""
        if shown is None:
            return a.amax(dim=(2, 3)) if self.reduce == "max" else a.mean(dim=(2, 3))
        shown = shown.to(a.device)
        if self.reduce == "max":
            return a.masked_fill(~shown, -torch.inf).amax(dim=(2, 3))
        return (a * shown).sum(dim=(2, 3)) / shown.sum(dim=(1, 2))

    def merge(self, other: TopKResult) -> None:
        """Fold in another accumulator's result (a partition's): as if its images came here."""
        if self.channels is None:
            self.channels = tuple(other.channels)
        elif tuple(other.channels) != self.channels:
            raise ConfigError(f"cannot merge exemplars of channels {list(other.channels)} into channels {list(self.channels)}")
        device = self._scores.device if self._scores is not None else other.scores.device
        self._fold(other.scores.to(device), other.indices.to(device), other.maps.to(device))

    def _fold(self, score: torch.Tensor, ids: torch.Tensor, maps: torch.Tensor) -> None:
        """Keep the k best of the current entries and (C, n) new ones with maps (C, n, h, w)."""
        if self._scores is not None:
            score = torch.cat([self._scores, score], dim=1)
            ids = torch.cat([self._indices, ids], dim=1)
            maps = torch.cat([self._maps, maps], dim=1)
        keep = _best(score, ids, self.k)  # (C, k')
        self._scores, self._indices = score.gather(1, keep), ids.gather(1, keep)
        self._maps = maps.gather(1, keep[:, :, None, None].expand(-1, -1, *maps.shape[2:]))

    def _select(self, a: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            self.channels = tuple(range(a.shape[1]))
            return a
        bad = [c for c in self.channels if not 0 <= c < a.shape[1]]
        if bad:
            raise ConfigError(f"channels {bad} out of range: this tap has channels 0..{a.shape[1] - 1}")
        return a[:, list(self.channels)]

    def result(self) -> TopKResult:
        """The exemplars so far, on the CPU."""
        if self._scores is None:
            raise ConfigError("no activations were added: call update() with at least one batch")
        return TopKResult(self.channels, self._scores.cpu(), self._indices.cpu(), self._maps.cpu())


def _best(score: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Column positions of the k best per row: highest score first, ties to the lower index, NaN last.

    (A descending sort alone would put NaN first: a NaN image would push a real exemplar out.)
    """
    by_id = torch.sort(ids, dim=1, stable=True).indices
    s = score.gather(1, by_id)
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
    nan_last = torch.sort(s.gather(1, by_score).isnan().to(torch.uint8), dim=1, stable=True).indices
    return by_id.gather(1, by_score.gather(1, nan_last))[:, :k]
