"""Metadata that travels inside every artifact, and its binary companions (CAM weights, head)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from camshaft.preprocess import Preprocess

SCHEMA = 1


@dataclass
class ArtifactMeta:
    """What an exported model carries besides its graph."""

    format: str  # torchscript | onnx | pt2
    source: str
    preprocess: Preprocess
    taps: list[str]  # execution order
    tap_shapes: dict[str, list[int]]  # per image, e.g. [512, 7, 7]
    num_classes: int
    class_names: list[str] | None = None
    cam_tap: str | None = None  # tap the CAM head reads, when the model has one
    cam_linear: str | None = None  # module path of the CAM head's linear layer
    has_head: bool = False  # a differentiable head (first tap -> logits) travels along
    parity: dict[str, float] = field(default_factory=dict)  # max abs error per output
    exporter: str = ""  # which torch exporter wrote an ONNX or .pt2 file
    camshaft_version: str = ""
    schema: int = SCHEMA

    def to_json(self) -> str:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ArtifactMeta:
        d = json.loads(text)
        d["preprocess"] = Preprocess.from_dict(d["preprocess"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def cam_to_bytes(weight: torch.Tensor) -> bytes:
    """CAM head weights (N, C) as .npz bytes (readable without unpickling)."""
    buf = io.BytesIO()
    np.savez(buf, weight=weight.detach().float().cpu().numpy())
    return buf.getvalue()


def cam_from_bytes(data: bytes) -> torch.Tensor:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return torch.from_numpy(z["weight"].copy())


def version() -> str:
    from camshaft import __version__

    return __version__
