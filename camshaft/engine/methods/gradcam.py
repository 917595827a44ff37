"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks").

``alpha_k^c = mean_xy dy_c / dA_k`` and ``M_c = ReLU(sum_k alpha_k^c A_k)``. The gradients of the
K targets come from one forward and one batched backward through the head only.
"""

from __future__ import annotations

import torch

from camshaft.engine.backends.base import TAP_GRADIENTS, Backend, Output
from camshaft.engine.methods.base import Method, register_method, tap_method


def gradcam_maps(a: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) activations, (B, K, C, h, w) gradients -> (B, K, h, w) maps."""
    alpha = grads.mean(dim=(-2, -1))  # (B, K, C)
    return torch.relu(torch.einsum("bkc,bchw->bkhw", alpha, a))


def _compute(backend: Backend, out: Output, tap: str, options: dict) -> torch.Tensor:
    return gradcam_maps(out.taps[tap], out.grads[tap])


GRADCAM = register_method(
    Method(
        "gradcam",
        frozenset({TAP_GRADIENTS}),
        tap_method(_compute, gradients=True, name="Grad-CAM"),
        "Grad-CAM (tap gradients)",
        paper="Selvaraju et al. 2017",
    )
)
