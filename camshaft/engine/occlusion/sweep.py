"""The occlusion sweep: score drops of occluded variants, evaluated in bounded batches.

An *evaluator* turns a chunk of (image, position) pairs into the logits of those occluded variants;
the sweep feeds it chunks of at most ``per_forward`` pairs, so memory is bounded whatever the
number of positions, and reads every target's score from the same logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from camshaft.engine.backends.base import upload
from camshaft.engine.occlusion.windows import Grid, all_pairs, occlude

SCORES = ("logit", "prob")
Evaluator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (img (M,), pos (M,)) -> logits (M, N)


def target_scores(logits: torch.Tensor, targets: torch.Tensor, score: str) -> torch.Tensor:
    """(M, N) logits, (M, K) targets -> (M, K) scores: the logit or the softmax probability."""
    logits = logits.float()
    if score == "prob":
        logits = torch.softmax(logits, dim=-1)
    elif score != "logit":
        raise ValueError(f"unknown score {score!r}; choose {', '.join(SCORES)}")
    return logits.gather(1, targets.to(logits.device))


def plain_evaluator(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, fill: torch.Tensor, grid: Grid
) -> Evaluator:
    """Occluded variants built on the device in one shot per chunk, then one batched forward."""

    def evaluate(img: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return forward(occlude(x, fill, grid, img, pos))

    return evaluate


def sweep_drops(
    evaluate: Evaluator,
    *,
    img: torch.Tensor,
    pos: torch.Tensor,
    base: torch.Tensor,
    targets: torch.Tensor,
    score: str,
    per_forward: int,
    sizes: list[int] | None = None,
) -> torch.Tensor:
    """Score drops (M, K) of the pairs ``(img, pos)``: ``base[img] - score(occluded)``.

    ``base`` (B, K) holds the unoccluded scores of the targets (B, K). The pairs are evaluated
    ``per_forward`` at a time, or in consecutive chunks of ``sizes`` when given.
    """
    drops = []
    sizes = [min(per_forward, img.numel() - s) for s in range(0, img.numel(), per_forward)] if sizes is None else sizes
    for i, p in zip(img.split(sizes), pos.split(sizes), strict=True):
        logits = evaluate(i, p)  # (m, N)
        i = upload(i, base.device)
        drops.append(base[i] - target_scores(logits, targets[i], score).to(base.device))
    return torch.cat(drops) if drops else base.new_zeros(0, targets.shape[1])


def to_maps(drops: torch.Tensor, img: torch.Tensor, pos: torch.Tensor, *, batch: int, grid: Grid) -> torch.Tensor:
    """(M, K) drops of pairs -> (B, K, rows, cols) maps; cells no pair visits hold NaN."""
    rows, cols = grid.shape
    k = drops.shape[1]
    maps = drops.new_full((batch, rows * cols, k), float("nan"))
    maps[upload(img, drops.device), upload(pos, drops.device)] = drops
    return maps.permute(0, 2, 1).reshape(batch, k, rows, cols)


def full_sweep(
    evaluate: Evaluator,
    *,
    batch: int,
    grid: Grid,
    base: torch.Tensor,
    targets: torch.Tensor,
    score: str,
    per_forward: int,
    batches: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Maps (B, K, rows, cols) of every window position of every image.

    With ``batches`` (positions, each position in one), each image is evaluated batch by batch;
    by default the pairs of all images are evaluated in turn, ``per_forward`` at a time.
    """
    if batches is None:
        img, pos = all_pairs(batch, grid)
        sizes = None
    else:
        pos = torch.cat(batches).repeat(batch)
        img = torch.arange(batch).repeat_interleave(len(pos) // batch)
        sizes = [len(b) for b in batches] * batch
    drops = sweep_drops(evaluate, img=img, pos=pos, base=base, targets=targets, score=score, per_forward=per_forward,
                        sizes=sizes)
    return to_maps(drops, img, pos, batch=batch, grid=grid)
