"""Regularizers: objectives over the image (or a tap) that keep visualizations natural.

They are ordinary :class:`Objective` terms (lower is better), so they add and scale like any other:
``class_logit(3) + 1e-3 * l2() + 0.1 * total_variation()``. Blurring every few steps is not a loss
but a step the render loop takes on the parameterization (see ``ImageParam.blur_``). Each is a
:class:`Family` of its own, so a batch computes it once for all its images.
"""

from __future__ import annotations

import torch

from camshaft.engine.actmax.objectives import Family, Objective, Term, pick

__all__ = ["diversity", "frequency_penalty", "l2", "total_variation"]


def _on_images(name: str, loss) -> Objective:
    """An objective of the images alone: ``loss`` maps (R, 3, H, W) images to (R,)."""
    family = Family(name, lambda a, rows, _: loss(pick(a.images, rows)))
    return Objective.of(Term(name, lambda a: loss(a.images), family=family))


def _l2(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5).pow(2).flatten(1).mean(1)


def l2() -> Objective:
    """Mean squared distance of the pixels to grey (L2 decay; Simonyan et al. 2013)."""
    return _on_images("l2", _l2)


def _tv(x: torch.Tensor) -> torch.Tensor:
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dx + dy


def total_variation() -> Objective:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels (Mahendran & Vedaldi 2015)."""
    return _on_images("tv", _tv)


def _high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    spectrum = torch.fft.rfft2(x - x.mean((-2, -1), keepdim=True), norm="ortho")  # (B, 3, H, W//2+1)
    fy = torch.fft.fftfreq(h, device=x.device)[:, None]
    fx = torch.fft.rfftfreq(w, device=x.device)[None, :]
    weight = (fy.pow(2) + fx.pow(2)).sqrt()  # cycles per pixel, 0 .. 0.71
    return (spectrum.abs().pow(2) * weight).flatten(1).mean(1)


def frequency_penalty() -> Objective:
    """Image energy weighted by spatial frequency: penalises high-frequency patterns (Olah et al. 2017)."""
    return _on_images("freq", _high_frequency_energy)


def _similarity(t: torch.Tensor, group: int) -> torch.Tensor:
    """(R, C, h, w) maps or (R, T, C) tokens in groups of ``group`` consecutive images -> (R,): each image's
    mean cosine similarity of its Gram matrix (C, C) to those of the others in its group."""
    r = t.shape[0]
    if group < 2:
        return t.new_zeros(r) + 0.0 * t.sum()  # nothing to differ from
    f = t.transpose(1, 2) if t.dim() == 3 else t.flatten(2)  # (R, C, hw); a transformer's tokens (R, T, C) too
    gram = torch.nn.functional.normalize((f @ f.transpose(1, 2)).flatten(1), dim=1)  # (R, C*C)
    gram = gram.view(r // group, group, -1)
    sim = gram @ gram.transpose(1, 2)  # (R / group, group, group)
    return ((sim.sum(2) - sim.diagonal(dim1=1, dim2=2)) / (group - 1)).flatten()


def diversity(tap: str) -> Objective:
    """Mean cosine similarity of each image's Gram matrix at ``tap`` to the others' in its group.

    Lowering it makes several images of the same unit differ in style (Olah et al. 2017, "Diversity").
    Images are compared within the group the render loop hands over: the copies of one objective.
    """
    family = Family(("diversity", tap), lambda a, rows, group: _similarity(pick(a.tap(tap), rows), group),
                    lambda params, device, group: group)
    fn = lambda a: _similarity(a.tap(tap), a.tap(tap).shape[0])
    return Objective.of(Term(f"diversity:{tap}", fn, frozenset({tap}), family=family))
