"""CAM (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization").

``M_c = sum_k W[c, k] * A_k`` for the feature map A read by a global-average-pool + linear head
with weights W. Forward only; K targets per image are one batched contraction.
"""

from __future__ import annotations

import torch

from camshaft.engine.backends.base import FORWARD, Backend, Output
from camshaft.engine.methods.base import Method, register_method, tap_method
from camshaft.errors import CapabilityError


def class_activation_maps(a: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps, (N, C) head weights, (B, K) targets -> (B, K, h, w) CAMs."""
    w = weight.to(a.device, a.dtype)[targets]  # (B, K, C)
    return torch.einsum("bkc,bchw->bkhw", w, a)


def _validate(backend: Backend, tap: str | None) -> None:
    info = backend.info
    if info.cam_weight is None:
        after = f"after {tap!r} in" if tap else "in"
        raise CapabilityError(
            f"CAM needs a global-average-pool + linear head after the tap; there is none {after} {info.source!r} "
            "(camshaft inspect shows the CAM head and its tap when there is one). Use --method gradcam instead"
        )
    if tap != info.cam_tap:
        raise CapabilityError(f"CAM reads the tap before the linear head, {info.cam_tap!r}, not {tap!r}")


def _compute(backend: Backend, out: Output, tap: str, options: dict) -> torch.Tensor:
    _validate(backend, tap)
    return class_activation_maps(out.taps[tap], backend.info.cam_weight, out.targets)


CAM = register_method(
    Method(
        "cam",
        frozenset({FORWARD}),
        tap_method(_compute, gradients=False, name="CAM"),
        "class activation maps (forward only)",
        validate=_validate,
        paper="Zhou et al. 2016",
    )
)
