"""Grad-CAM++ (Chattopadhay et al. 2018, "Grad-CAM++: Improved Visual Explanations").

Pixel-wise weights of the positive gradients, under the paper's exponential-score closed form:
``a = g^2 / (2 g^2 + sum_xy(A) g^3)``, ``w_k = sum_xy a * relu(g)``, ``M = ReLU(sum_k w_k A_k)``.
"""

from __future__ import annotations

import torch

from camshaft.engine.backends.base import TAP_GRADIENTS, Backend, Output
from camshaft.engine.methods.base import Method, register_method, tap_method


def gradcam_pp_maps(a: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) activations, (B, K, C, h, w) gradients -> (B, K, h, w)."""
    g2, g3 = grads.pow(2), grads.pow(3)
    total = a.sum(dim=(-2, -1)).unsqueeze(1)[..., None, None]  # (B, 1, C, 1, 1)
    denom = 2 * g2 + total * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    weights = (alpha * torch.relu(grads)).sum(dim=(-2, -1))  # (B, K, C)
    return torch.relu(torch.einsum("bkc,bchw->bkhw", weights, a))


def _compute(backend: Backend, out: Output, tap: str, options: dict) -> torch.Tensor:
    return gradcam_pp_maps(out.taps[tap], out.grads[tap])


register_method(
    Method("gradcam++", frozenset({TAP_GRADIENTS}), tap_method(_compute, gradients=True), "Grad-CAM++", paper="Chattopadhay et al. 2018")
)
