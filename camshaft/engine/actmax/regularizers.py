"""Regularizers: objectives over the image (or a tap) that keep visualizations natural.

They are ordinary :class:`Objective` terms (lower is better), so they add and scale like any other:
``class_logit(3) + 1e-3 * l2() + 0.1 * total_variation()``. Blurring every few steps is not a loss
but a step the render loop takes on the parameterization (see ``ImageParam.blur_``).
"""

from __future__ import annotations

import torch

from camshaft.engine.actmax.objectives import Activations, Objective, Term

__all__ = ["diversity", "frequency_penalty", "l2", "total_variation"]


def l2() -> Objective:
    """Mean squared distance of the pixels to grey (L2 decay; Simonyan et al. 2013)."""
    fn = lambda a: (a.images - 0.5).pow(2).flatten(1).mean(1)
    return Objective.of(Term("l2", fn))


def _tv(a: Activations) -> torch.Tensor:
    x = a.images  # (B, 3, H, W)
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1)
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dx + dy


def total_variation() -> Objective:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels (Mahendran & Vedaldi 2015)."""
    return Objective.of(Term("tv", _tv))


def _high_frequency_energy(a: Activations) -> torch.Tensor:
    x = a.images  # (B, 3, H, W)
    h, w = x.shape[-2:]
    spectrum = torch.fft.rfft2(x - x.mean((-2, -1), keepdim=True), norm="ortho")  # (B, 3, H, W//2+1)
    fy = torch.fft.fftfreq(h, device=x.device)[:, None]
    fx = torch.fft.rfftfreq(w, device=x.device)[None, :]
    weight = (fy.pow(2) + fx.pow(2)).sqrt()  # cycles per pixel, 0 .. 0.71
    return (spectrum.abs().pow(2) * weight).flatten(1).mean(1)


def frequency_penalty() -> Objective:
    """Image energy weighted by spatial frequency: penalises high-frequency patterns (Olah et al. 2017)."""
    return Objective.of(Term("freq", _high_frequency_energy))


def diversity(tap: str) -> Objective:
    """Mean cosine similarity of each image's Gram matrix at ``tap`` to the others' in its group.

    Lowering it makes several images of the same unit differ in style (Olah et al. 2017, "Diversity").
    Images are compared within the group the render loop hands over: the copies of one objective.
    """

    def fn(a: Activations) -> torch.Tensor:
        t = a.tap(tap)  # (B, C, h, w)
        b = t.shape[0]
        if b < 2:
            return t.new_zeros(b) + 0.0 * t.sum()  # nothing to differ from
        f = t.flatten(2)  # (B, C, hw)
        gram = torch.nn.functional.normalize((f @ f.transpose(1, 2)).flatten(1), dim=1)  # (B, C*C)
        sim = gram @ gram.T  # (B, B)
        return (sim.sum(1) - sim.diagonal()) / (b - 1)

    return Objective.of(Term(f"diversity:{tap}", fn, frozenset({tap})))
