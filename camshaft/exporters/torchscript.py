"""TorchScript artifacts: ``forward(x) -> (logits, {tap: activation})`` with metadata inside.

Where the model splits at its first tap, the artifact keeps the trunk and the head as separate
traced submodules (``trunk(x) -> first tap``, ``head(a) -> [logits, later taps...]``), so a
TorchScript backend runs the trunk without autograd and differentiates only the head.
"""

import warnings
from pathlib import Path
from typing import Dict, List, Tuple  # noqa: UP035 - TorchScript needs the typing aliases

import torch
from torch import nn

from camshaft.errors import ConfigError
from camshaft.exporters.metadata import (
    REEXPORT,
    ArtifactMeta,
    cam_from_bytes,
    cam_to_bytes,
    check_graph,
    parse_meta,
    shape_text,
)
from camshaft.models.prepared import PreparedModel

META_FILE = "camshaft/meta.json"
CAM_FILE = "camshaft/cam_head.npz"


class FlatHead(nn.Module):
    """``a -> [logits, later taps...]``: a head with a flat, traceable output."""

    def __init__(self, head: nn.Module, later: list[str]):
        super().__init__()
        self.head, self.later = head, list(later)

    def forward(self, a: torch.Tensor):
        logits, taps = self.head(a)
        return [logits] + [taps[t] for t in self.later]


class FlatTapped(nn.Module):
    """``x -> [logits, taps...]`` for a model that does not split."""

    def __init__(self, tapped: nn.Module):
        super().__init__()
        self.tapped = tapped

    def forward(self, x: torch.Tensor):
        logits, taps = self.tapped(x)
        return [logits] + [taps[t] for t in self.tapped.taps]


class SplitArtifact(nn.Module):
    taps: List[str]

    def __init__(self, trunk: nn.Module, head: nn.Module, taps: List[str]):
        super().__init__()
        self.trunk, self.head, self.taps = trunk, head, taps

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        a = self.trunk(x)
        outs: List[torch.Tensor] = self.head(a)
        taps: Dict[str, torch.Tensor] = {self.taps[0]: a}
        for i in range(1, len(self.taps)):
            taps[self.taps[i]] = outs[i]
        return outs[0], taps


class WholeArtifact(nn.Module):
    taps: List[str]

    def __init__(self, flat: nn.Module, taps: List[str]):
        super().__init__()
        self.flat, self.taps = flat, taps

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        outs: List[torch.Tensor] = self.flat(x)
        taps: Dict[str, torch.Tensor] = {}
        for i in range(len(self.taps)):
            taps[self.taps[i]] = outs[i + 1]
        return outs[0], taps


def build(prepared: PreparedModel, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace the prepared model into a scripted artifact module (on CPU, eval mode)."""
    taps = list(prepared.tapped.taps)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if prepared.split is not None:
            trunk = torch.jit.trace(prepared.split.trunk.eval(), (example,))
            head = torch.jit.trace(FlatHead(prepared.split.head, taps[1:]).eval(), (trunk(example),), strict=False)
            return torch.jit.script(SplitArtifact(trunk, head, taps).eval())
        flat = torch.jit.trace(FlatTapped(prepared.tapped).eval(), (example,), strict=False)
        return torch.jit.script(WholeArtifact(flat, taps).eval())


def save(module: torch.jit.ScriptModule, meta: ArtifactMeta, cam_weight: torch.Tensor | None, path: Path) -> None:
    extra = {META_FILE: meta.to_json()}
    if cam_weight is not None:
        extra[CAM_FILE] = cam_to_bytes(cam_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(module, str(path), _extra_files=extra)


def load(path: Path, *, device: torch.device | str = "cpu"):
    """``(module, meta or None, cam_weight or None)`` of a TorchScript file."""
    extra = {META_FILE: "", CAM_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    if not extra[META_FILE]:
        return module.eval(), None, cam_from_bytes(extra[CAM_FILE]) if extra[CAM_FILE] else None
    meta, cam = parse_meta(extra[META_FILE], extra[CAM_FILE] or None, where=str(path))
    _check_outputs(module.eval(), meta, path, device)
    return module, meta, cam


def _check_outputs(module: torch.jit.ScriptModule, meta: ArtifactMeta, path: Path, device) -> None:
    """One forward at the metadata's input size: a TorchScript file has no static shapes to compare.

    It runs unoptimized: the profiling executor would otherwise count it among the runs it profiles before it
    specializes the graph (the backend's warm-up gives it the run's own batch shape and dtype)."""
    x = torch.zeros(1, 3, *meta.preprocess.input_size, device=device)
    try:
        with torch.no_grad(), torch.jit.optimized_execution(False):
            logits, taps = module(x)
    except Exception as e:  # noqa: BLE001 - whatever the graph raises, the file and its metadata disagree
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{path}: its model does not run on the {shape_text(x.shape)} input its camshaft "
                          f"metadata names ({type(e).__name__}: {reason}); {REEXPORT}") from e
    shapes = {t: tuple(taps[t].shape[1:]) if t in taps else None for t in meta.taps}
    check_graph(meta, where=str(path), num_classes=logits.shape[-1], tap_shapes=shapes)
