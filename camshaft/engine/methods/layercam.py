"""LayerCAM (Jiang et al. 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps").

Element-wise weights instead of one weight per channel: ``M = ReLU(sum_k relu(g_k) * A_k)``,
which keeps fine detail at earlier taps.
"""

from __future__ import annotations

import torch

from camshaft.engine.backends.base import TAP_GRADIENTS, Backend, Output
from camshaft.engine.methods.base import Method, register_method, tap_method


def layercam_maps(a: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) activations, (B, K, C, h, w) gradients -> (B, K, h, w)."""
    return torch.relu((torch.relu(grads) * a.unsqueeze(1)).sum(dim=2))


def _compute(backend: Backend, out: Output, tap: str, options: dict) -> torch.Tensor:
    return layercam_maps(out.taps[tap], out.grads[tap])


register_method(
    Method(
        "layercam",
        frozenset({TAP_GRADIENTS}),
        tap_method(_compute, gradients=True, name="LayerCAM"),
        "LayerCAM",
        paper="Jiang et al. 2021",
    )
)
