"""Metadata that travels inside every artifact, and its binary companions (CAM weights, head).

A model file may come from anywhere, so its metadata is checked when read (`parse_meta`) and
against the graph it travels with (`check_graph`): metadata that lies (class names that do not
fit the logits, CAM weights of another shape, an input size the graph does not take) is refused
before any image is read, never turned into maps of the wrong classes.
"""

from __future__ import annotations

import io
import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from camshaft.errors import ConfigError
from camshaft.models.classes import check_names
from camshaft.models.layout import map_shape
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


REEXPORT = "re-export the model with `camshaft export`"


def parse_meta(text: str | bytes, cam: bytes | None, *, where: str) -> tuple[ArtifactMeta, torch.Tensor | None]:
    """An artifact's metadata and CAM weights, checked; a ConfigError naming every problem otherwise."""
    try:
        meta = ArtifactMeta.from_json(text)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # ConfigError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{where}: bad camshaft metadata ({type(e).__name__}: {e}); {REEXPORT}") from e
    try:
        weight = None if cam is None else cam_from_bytes(cam).float()
    except (ValueError, KeyError, OSError, EOFError) as e:  # not an .npz, a pickled array, no "weight"
        raise ConfigError(f"{where}: unreadable CAM head weights ({type(e).__name__}: {e}); {REEXPORT}") from e
    problems = meta_problems(meta, weight)
    if problems:
        raise ConfigError(f"{where}: its camshaft metadata does not fit together: {'; '.join(problems)}; {REEXPORT}")
    return meta, weight


def _count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def meta_problems(meta: ArtifactMeta, cam: torch.Tensor | None) -> list[str]:
    """What in ``meta`` (and the CAM weights ``cam``) contradicts itself; empty when it is consistent."""
    problems = []
    taps = meta.taps if _names(meta.taps) and meta.taps else None
    if taps is None:
        problems.append(f"taps must be a non-empty list of names, received {meta.taps!r}")
    if not _count(meta.num_classes):
        problems.append(f"num_classes must be a positive integer, received {meta.num_classes!r}")
    shapes = meta.tap_shapes if isinstance(meta.tap_shapes, dict) else {}
    if not isinstance(meta.tap_shapes, dict) or (taps is not None and set(shapes) != set(taps)):
        problems.append(f"tap_shapes must give a shape for each tap {taps}, received {meta.tap_shapes!r}")
    problems += [f"tap {t!r} has the shape {s!r}, not a list of positive sizes" for t, s in shapes.items()
                 if not (isinstance(s, list) and s and all(map(_count, s)))]
    problems += _name_problems(meta.class_names, meta.num_classes)
    if meta.cam_tap is not None and meta.cam_tap not in (taps or ()):
        problems.append(f"the CAM head reads tap {meta.cam_tap!r}, which is not among the taps {taps}")
    if meta.cam_tap is not None and not isinstance(meta.cam_linear, str):
        problems.append(f"the CAM head's linear layer must be named, received {meta.cam_linear!r}")
    if not isinstance(meta.parity, dict) or not all(isinstance(v, numbers.Real) for v in meta.parity.values()):
        problems.append(f"parity must map outputs to errors, received {repr(meta.parity)[:60]}")
    if cam is not None:
        problems += _cam_problems(meta, cam, shapes)
    return problems


def _name_problems(names, num_classes) -> list[str]:
    if names is None:
        return []
    if not _names(names):
        return [f"class_names must be a list of names (text), received {repr(names)[:60]}"]
    if _count(num_classes) and len(names) != num_classes:
        return [f"{len(names)} class names for {num_classes} classes"]
    try:
        check_names(names, where="the metadata")
    except ConfigError as e:
        return [str(e)]
    return []


def _cam_problems(meta: ArtifactMeta, cam: torch.Tensor, shapes: Mapping) -> list[str]:
    """CAM weights must be (classes, channels of the CAM tap) and finite, or the maps are of other classes."""
    if meta.cam_tap is None:
        return ["CAM head weights without the tap they read (cam_tap)"]
    shape = shapes.get(meta.cam_tap)
    if not (isinstance(shape, list) and shape):
        return []  # the tap's shape is already reported
    grid = map_shape(shape, meta.preprocess.input_size, tokens=False)  # channels last: (h, w, C)
    channels = grid[0] if grid else shape[0]
    if tuple(cam.shape) != (meta.num_classes, channels):
        return [f"CAM head weights of shape {tuple(cam.shape)}, expected (classes, channels of tap "
                f"{meta.cam_tap!r}) = ({meta.num_classes}, {channels})"]
    if not torch.isfinite(cam).all():
        return ["CAM head weights that are not all finite"]
    return []


def check_graph(meta: ArtifactMeta, *, where: str, input_size: Sequence | None = None, num_classes=None,
                tap_shapes: Mapping[str, Sequence | None] | None = None) -> None:
    """Refuse metadata that disagrees with the graph it travels with.

    The graph's own sizes are given where known (a size that is not an int, a dynamic axis, is not
    compared); a tap in ``tap_shapes`` with None is one the graph does not output.
    """
    problems = []
    if input_size is not None and not _agree(input_size, meta.preprocess.input_size):
        problems.append(f"the graph takes {shape_text(input_size)} inputs, the metadata says "
                        f"{shape_text(meta.preprocess.input_size)}")
    if num_classes is not None and not _agree([num_classes], [meta.num_classes]):
        problems.append(f"the graph gives {num_classes} logits, the metadata says {meta.num_classes} classes")
    for tap, shape in (tap_shapes or {}).items():
        if shape is None:
            problems.append(f"the graph has no output for tap {tap!r}")
        elif not _agree(shape, meta.tap_shapes[tap]):
            claimed = shape_text(meta.tap_shapes[tap])
            problems.append(f"tap {tap!r} is {shape_text(shape)} in the graph, {claimed} in the metadata")
    if problems:
        raise ConfigError(f"{where}: its camshaft metadata does not match its model: {'; '.join(problems)}; {REEXPORT}")


def _agree(graph: Sequence, claimed: Sequence) -> bool:
    """Equal where the graph's size is known (an int), and of the same length."""
    graph = list(graph)
    return len(graph) == len(claimed) and all(not isinstance(g, int) or g == c for g, c in zip(graph, claimed))


def shape_text(shape: Sequence) -> str:
    return "x".join(str(v) if isinstance(v, int) else "?" for v in shape)


def version() -> str:
    from camshaft import __version__

    return __version__
