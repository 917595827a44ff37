"""Score-CAM (Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations").

Forward only: each channel of the tap, upsampled to the input and scaled to [0, 1], masks the
input; the softmax probability of the target on the masked input weighs the channel:
``M = ReLU(sum_k p_c(x * mask_k) A_k)``. This is the authors' released code (haofanwang/Score-CAM):
no baseline score is subtracted and the weights are not normalised over channels. pytorch-grad-cam
and torchcam differ: their weights are the softmax over channels of the masked images' logits
(torchcam subtracts a baseline's logit first, which that softmax cancels), so their maps are not
comparable to these. As in the authors' code, a channel constant over the map has no mask (its
min-max scaling would divide by zero) and weight 0, and costs no forward. Masks are built and
scored in chunks of at most ``masks_per_forward`` (image, channel) pairs: memory is bounded by the
option, not by batch x channels x input pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from camshaft.engine.backends.base import FORWARD, Backend, Selector, replays_graphs
from camshaft.engine.methods.base import Method, Option, feature_map, register_method
from camshaft.engine.methods.options import positive_int


def channel_masks(a: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) activations -> (N, C, H, W) masks in [0, 1] (min-max per channel; a constant one is 0)."""
    up = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    lo = up.amin(dim=(-2, -1), keepdim=True)
    hi = up.amax(dim=(-2, -1), keepdim=True)
    return (up - lo) / torch.where(hi > lo, hi - lo, torch.inf)


def channel_scores(backend: Backend, x: torch.Tensor, a: torch.Tensor, targets: torch.Tensor, per: int) -> torch.Tensor:
    """p_target(x_b * mask_bk) for each image b, channel k and target: (B, K, C), ``per`` masked images a forward.

    A channel constant over the map has no mask and weight 0, without a forward. Constancy is read
    before upsampling: bilinear weights round, so an upsampled constant differs by an ulp here and
    there, which min-max scaling would blow up into a mask of rounding noise.
    """
    b, c = a.shape[:2]
    pairs = a.flatten(0, 1).unsqueeze(1)  # (B C, 1, h, w): pair i is image i // C, channel i % C
    live = (pairs.amax(dim=(-2, -1)) > pairs.amin(dim=(-2, -1))).flatten().nonzero().squeeze(1)
    scores = torch.zeros(b * c, targets.shape[1], device=a.device)
    whole = replays_graphs(backend)
    for first in range(0, len(live), per):  # never an empty batch (live.split would give one)
        chunk = live[first : first + per]  # (n,) pairs
        n = len(chunk)
        if whole and n < per:  # padded with copies of its first pair: one graph for every chunk of every batch
            chunk = torch.cat([chunk, chunk[:1].expand(per - n)])
        image = chunk // c
        masked = x[image] * channel_masks(pairs[chunk], x.shape[-2:])  # (n, 3, H, W)
        probs = torch.softmax(backend.forward(masked).logits, dim=-1)  # (n, N)
        scores[chunk[:n]] = probs[:n].gather(1, targets[image[:n]])  # (n, K)
    return scores.view(b, c, -1).transpose(1, 2)


def _scorecam(backend: Backend, x: torch.Tensor, select: Selector, tap: str, options: dict):
    out = backend.forward(x)
    out.targets = select(out.logits)
    a = feature_map(out, tap, "Score-CAM", x.shape[-2:])  # (B, C, h, w)
    weights = channel_scores(backend, x, a, out.targets.to(a.device), options["masks_per_forward"])  # (B, K, C)
    return torch.relu(torch.einsum("bkc,bchw->bkhw", weights, a)), out


register_method(
    Method(
        "scorecam",
        frozenset({FORWARD}),
        _scorecam,
        "Score-CAM (forward only, one masked forward per channel)",
        options=(Option("masks_per_forward", positive_int, 64, "masked images per forward (memory)", memory=True),),
        paper="Wang et al. 2020",
    )
)
