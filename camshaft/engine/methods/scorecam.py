"""Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations").

Forward only: each channel of the tap, upsampled to the input and scaled to [0, 1], masks the
input; the softmax probability of the target on the masked input weighs the channel:
``M = ReLU(sum_k p_c(x * mask_k) A_k)``. Masks of all channels and images are batched, at most
``masks_per_forward`` masked images per forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from camshaft.engine.backends.base import FORWARD, Backend, Selector
from camshaft.engine.methods.base import Method, Option, register_method
from camshaft.engine.methods.options import positive_int


def channel_masks(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) activations -> (B, C, H, W) masks in [0, 1] (min-max per channel)."""
    up = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    lo = up.amin(dim=(-2, -1), keepdim=True)
    hi = up.amax(dim=(-2, -1), keepdim=True)
    return (up - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))


def _scorecam(backend: Backend, x: torch.Tensor, select: Selector, tap: str, options: dict):
    out = backend.forward(x)
    targets = select(out.logits)
    out.targets = targets
    a = out.taps[tap]
    b, c = a.shape[:2]
    masks = channel_masks(a, x.shape[-2:])  # (B, C, H, W)
    scores = torch.empty(b, c, targets.shape[1], device=x.device)
    per = max(1, options["masks_per_forward"] // b)
    for first in range(0, c, per):
        m = masks[:, first : first + per]  # (B, c', H, W)
        masked = (x.unsqueeze(1) * m.unsqueeze(2)).flatten(0, 1)  # (B c', 3, H, W)
        probs = torch.softmax(backend.forward(masked).logits, dim=-1).view(b, m.shape[1], -1)
        scores[:, first : first + per] = probs.gather(2, targets.unsqueeze(1).expand(-1, m.shape[1], -1))
    weights = scores.transpose(1, 2)  # (B, K, C)
    return torch.relu(torch.einsum("bkc,bchw->bkhw", weights, a)), out


register_method(
    Method(
        "scorecam",
        frozenset({FORWARD}),
        _scorecam,
        "Score-CAM (forward only, one masked forward per channel)",
        options=(Option("masks_per_forward", positive_int, 64, "masked images per forward (memory)"),),
        paper="Wang et al. 2020",
    )
)
