"""Grad-CAM++ (Chattopadhay et al. 2018, "Grad-CAM++: Improved Visual Explanations").

Pixel-wise weights of the positive gradients, under the paper's exponential-score closed form:
``a = g^2 / (2 g^2 + sum_xy(A) g^3)``, ``w_k = sum_xy a * relu(g)``, ``M = ReLU(sum_k w_k A_k)``,
with ``g = dS_c / dA`` the gradient of the class logit. With ``Y_c = exp(S_c)`` the paper's higher
derivatives are powers of g (its eq. 19: the third-order term is ``sum_ab A_ab`` times g^3 at the
cell itself, as in pytorch-grad-cam; torchcam sums ``A g^3`` over cells instead). Its weights take
``relu(dY_c/dA) = exp(S_c) relu(g)``; the factor ``exp(S_c)`` is dropped, as in pytorch-grad-cam, so
maps are the paper's divided by ``exp(S_c)``: the same once normalised. Where g = 0, a = 0.
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
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)  # 0 / 0 where g = 0
    weights = (alpha * torch.relu(grads)).sum(dim=(-2, -1))  # (B, K, C)
    return torch.relu(torch.einsum("bkc,bchw->bkhw", weights, a))


def _compute(backend: Backend, out: Output, tap: str, options: dict) -> torch.Tensor:
    return gradcam_pp_maps(out.taps[tap], out.grads[tap])


register_method(
    Method(
        "gradcam++",
        frozenset({TAP_GRADIENTS}),
        tap_method(_compute, gradients=True, name="Grad-CAM++"),
        "Grad-CAM++",
        paper="Chattopadhay et al. 2018",
    )
)
