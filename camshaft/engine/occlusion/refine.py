"""Coarse-to-fine occlusion (APPROXIMATE): a sparse sweep, then exact cells only where it matters.

1. Coarse: every other window position along each axis (indices 0, 2, 4, ... and always the last)
   is evaluated exactly.
2. The other cells are first estimated by bilinear interpolation between the coarse cells around
   them (in cell-index space).
3. Fine: a cell is evaluated exactly when the largest |drop| (over the targets) of the coarse cells
   around it reaches ``threshold`` times the image's largest coarse |drop|.

Coarse and refined cells are exact; the remaining cells are interpolated, hence approximate.
``threshold`` 0 evaluates every cell (the plain result); 1 refines only around the peak.
"""

from __future__ import annotations

import torch

from camshaft.engine.occlusion.sweep import Evaluator, sweep_drops
from camshaft.engine.occlusion.windows import Grid


def coarse_indices(n: int) -> torch.Tensor:
    """Indices 0, 2, 4, ... of ``n`` cells, always with the last one."""
    return torch.unique(torch.cat([torch.arange(0, n, 2), torch.tensor([n - 1])]))


def brackets(n: int, coarse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of ``n`` cells: the coarse entries at or below / above it, and its weight on the upper."""
    i = torch.arange(n)
    hi = torch.searchsorted(coarse, i)  # first coarse index >= i
    lo = torch.where(coarse[hi] == i, hi, hi - 1)
    span = (coarse[hi] - coarse[lo]).clamp(min=1)
    return lo, hi, ((i - coarse[lo]) / span).float()


def _sweep(evaluate, b, i, j, cols, **kw):
    return sweep_drops(evaluate, img=b, pos=i * cols + j, **kw)


def coarse_to_fine(
    evaluate: Evaluator,
    *,
    batch: int,
    grid: Grid,
    base: torch.Tensor,
    targets: torch.Tensor,
    score: str,
    per_forward: int,
    threshold: float,
) -> torch.Tensor:
    """Approximate maps (B, K, rows, cols); see the module docstring."""
    rows, cols = grid.shape
    kw = dict(base=base, targets=targets, score=score, per_forward=per_forward)
    cr, cc = coarse_indices(rows), coarse_indices(cols)
    b, i, j = torch.meshgrid(torch.arange(batch), cr, cc, indexing="ij")
    coarse = _sweep(evaluate, b.flatten(), i.flatten(), j.flatten(), cols, **kw)  # (B * nr * nc, K)
    coarse = coarse.view(batch, len(cr), len(cc), -1).permute(0, 3, 1, 2)  # (B, K, nr, nc)
    (rlo, rhi, rt), (clo, chi, ct) = brackets(rows, cr), brackets(cols, cc)
    rt, ct = rt.to(coarse.device)[:, None], ct.to(coarse.device)[None, :]
    top = coarse[:, :, rlo][..., clo] * (1 - ct) + coarse[:, :, rlo][..., chi] * ct
    bottom = coarse[:, :, rhi][..., clo] * (1 - ct) + coarse[:, :, rhi][..., chi] * ct
    maps = top * (1 - rt) + bottom * rt  # (B, K, rows, cols); exact at coarse cells

    a = coarse.abs().amax(1)  # (B, nr, nc)
    near = torch.stack([a[:, r][..., c] for r in (rlo, rhi) for c in (clo, chi)]).amax(0)  # (B, rows, cols)
    peak = a.flatten(1).amax(1)[:, None, None]
    is_coarse = torch.zeros(rows, cols, dtype=torch.bool)
    is_coarse[cr[:, None], cc[None, :]] = True
    refine = (near >= threshold * peak).cpu() & ~is_coarse
    b, i, j = refine.nonzero(as_tuple=True)
    if b.numel():
        fine = _sweep(evaluate, b, i, j, cols, **kw)  # (M, K)
        dev = maps.device
        maps[b.to(dev), :, i.to(dev), j.to(dev)] = fine
    return maps

