"""XGrad-CAM (Fu et al. 2020, "Axiom-based Grad-CAM").

Channel weights are gradients averaged with the activation as the weight:
``w_k = sum_xy (A_k / sum_xy A_k) * g_k``, ``M = ReLU(sum_k w_k A_k)``. The paper assumes A >= 0
(a tap after a ReLU); a channel whose activations sum to 0 gets weight 0.
"""

from __future__ import annotations

import torch

from camshaft.engine.backends.base import TAP_GRADIENTS, Backend, Output
from camshaft.engine.methods.base import Method, register_method, tap_method


def xgradcam_maps(a: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) activations, (B, K, C, h, w) gradients -> (B, K, h, w)."""
    total = a.sum(dim=(-2, -1), keepdim=True)
    share = a / torch.where(total != 0, total, torch.ones_like(total))  # (B, C, h, w)
    weights = (share.unsqueeze(1) * grads).sum(dim=(-2, -1))  # (B, K, C)
    return torch.relu(torch.einsum("bkc,bchw->bkhw", weights, a))


def _compute(backend: Backend, out: Output, tap: str, options: dict) -> torch.Tensor:
    return xgradcam_maps(out.taps[tap], out.grads[tap])


register_method(
    Method(
        "xgradcam",
        frozenset({TAP_GRADIENTS}),
        tap_method(_compute, gradients=True, name="XGrad-CAM"),
        "XGrad-CAM",
        paper="Fu et al. 2020",
    )
)
