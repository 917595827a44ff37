"""Deletion and insertion curves (Petsiuk et al. 2018, RISE), batched on the device.

For one image x (normalised input, (3, H, W)), its map for target t, upsampled bilinearly to
(H, W), orders the P = H * W pixels from the highest value to the lowest (ties: row-major order).
With ``n`` steps, point i = 0..n of a curve uses the first ``m_i = floor(i * P / n)`` pixels:

- deletion: those pixels replaced by the baseline (default ``zero``: 0 in normalised input, the
  dataset's mean colour); the curve starts at the image's score and ends at the baseline's.
- insertion: those pixels taken from the image, the others from the baseline (default ``blur``: a
  Gaussian blur of the image, sigma 5, kernel 11); the curve ends at the image's score.

The score is the target's softmax probability (``prob``, as in the paper) or its logit. The area
under a curve is the trapezoid rule over x in [0, 1]: ``(s_0 / 2 + s_1 + ... + s_{n-1} + s_n / 2) / n``.
A faithful map gives a low deletion area and a high insertion area.

Every (image, target, step) input is one row of a forward batch: ``batch_size`` of them per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from camshaft.engine.backends.base import upload
from camshaft.errors import ConfigError

KINDS = ("deletion", "insertion")
BASELINES = ("zero", "blur")
SCORES = ("prob", "logit")


@dataclass(frozen=True)
class CurveSpec:
    """One faithfulness curve: its kind, step count, baseline and score."""

    kind: str  # deletion | insertion
    steps: int = 50  # n: the curve has n + 1 points
    baseline: str | None = None  # zero | blur; None: zero for deletion, blur for insertion
    score: str = "prob"  # prob (softmax) | logit
    batch_size: int = 64  # perturbed inputs per forward
    blur_sigma: float = 5.0

    def __post_init__(self):
        problems = []
        if self.kind not in KINDS:
            problems.append(f"unknown metric {self.kind!r}; valid choices: {', '.join(KINDS)}")
        if self.baseline is not None and self.baseline not in BASELINES:
            problems.append(f"unknown baseline {self.baseline!r}; valid choices: {', '.join(BASELINES)}")
        if self.score not in SCORES:
            problems.append(f"unknown score {self.score!r}; valid choices: {', '.join(SCORES)}")
        if self.steps < 1:
            problems.append(f"steps must be at least 1, received {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be at least 1, received {self.batch_size}")
        if self.blur_sigma <= 0:
            problems.append(f"blur_sigma must be positive, received {self.blur_sigma}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def resolved_baseline(self) -> str:
        return self.baseline or ("zero" if self.kind == "deletion" else "blur")


def parse_metrics(text: str, **fields) -> tuple[CurveSpec, ...]:
    """``deletion,insertion`` -> one CurveSpec each (``fields`` shared: steps, score, ...)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown or not names:
        raise ConfigError(f"unknown metrics {unknown or [text]}; valid choices: {', '.join(KINDS)}")
    return tuple(CurveSpec(n, **fields) for n in dict.fromkeys(names))


def step_counts(pixels: int, steps: int) -> torch.Tensor:
    """m_i = floor(i * P / n) for i = 0..n: how many pixels are moved at each point, (n + 1,)."""
    return torch.arange(steps + 1, dtype=torch.int64) * pixels // steps


def pixel_ranks(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (B, K, h, w) -> each input pixel's position in the order, (B, K, H * W) int64."""
    b, k = maps.shape[:2]
    m = torch.nan_to_num(maps.float(), nan=float("-inf")).reshape(b * k, 1, *maps.shape[2:])
    up = m if tuple(m.shape[2:]) == tuple(size) else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    order = torch.sort(up.reshape(b, k, -1), dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def blur(x: torch.Tensor, *, sigma: float, kernel: int = 11) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), replicate padding; the kernel fits small images."""
    size = min(kernel, 2 * (min(x.shape[-2:]) // 2) + 1)
    t = torch.arange(size, dtype=x.dtype, device=x.device) - size // 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c, r = x.shape[1], size // 2
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def baseline_of(x: torch.Tensor, spec: CurveSpec) -> torch.Tensor:
    """The baseline image (B, 3, H, W) of ``spec`` for a normalised batch ``x``."""
    if spec.resolved_baseline == "zero":
        return torch.zeros_like(x)
    return blur(x, sigma=spec.blur_sigma)


@torch.no_grad()
def curves(backend, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, *, spec: CurveSpec) -> torch.Tensor:
    """The curve of ``spec`` for every image and target: (B, K, steps + 1) scores.

    Args:
        backend: anything with ``forward(x) -> Output`` (a camshaft backend).
        x: normalised inputs (B, 3, H, W) on the backend's device.
        maps: maps (B, K, h, w) at any resolution; upsampled bilinearly to (H, W).
        targets: class indices (B, K) the maps explain.
    """
    b, k = targets.shape
    H, W = x.shape[-2:]
    ranks = pixel_ranks(maps.to(x.device), (H, W))  # (B, K, P)
    counts = upload(step_counts(H * W, spec.steps), x.device)  # (n + 1,), without waiting for a GPU
    base = baseline_of(x, spec)
    first, second = (base, x) if spec.kind == "deletion" else (x, base)  # moved pixels come from `first`
    jobs = torch.cartesian_prod(*(torch.arange(n, device=x.device) for n in (b, k, spec.steps + 1)))
    scores = torch.empty(len(jobs), dtype=torch.float32, device=x.device)
    for s in range(0, len(jobs), spec.batch_size):
        bb, kk, ii = jobs[s : s + spec.batch_size].unbind(1)
        moved = (ranks[bb, kk] < counts[ii, None]).view(-1, 1, H, W)  # (n, 1, H, W)
        logits = backend.forward(torch.where(moved, first[bb], second[bb])).logits.float()
        values = logits.softmax(dim=-1) if spec.score == "prob" else logits
        scores[s : s + spec.batch_size] = values.gather(1, targets.to(x.device)[bb, kk, None].long()).squeeze(1)
    return scores.view(b, k, spec.steps + 1)


def area(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area over x in [0, 1] of curves (..., n + 1) with equal steps: (...)."""
    n = curve.shape[-1] - 1
    if n < 1:
        raise ConfigError(f"a curve needs at least 2 points, received {curve.shape[-1]}")
    return (curve.sum(-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / n
