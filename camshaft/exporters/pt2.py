"""``torch.export`` artifacts (.pt2): the successor of TorchScript, with metadata inside.

The archive's program is ``x -> [logits, taps...]`` with a dynamic batch axis. Where the model
splits at its first tap, the head (``a -> [logits, later taps...]``) is exported too and travels in
the archive's extra files (a .pt2 holds one program per ``torch.export.save``), so a backend can
differentiate just the head, as with ONNX files. Metadata and CAM weights are extra files as well.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import itertools
import json
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from camshaft.errors import ConfigError
from camshaft.exporters.metadata import ArtifactMeta, cam_from_bytes, cam_to_bytes, check_graph, parse_meta
from camshaft.exporters.torchscript import FlatHead, FlatTapped
from camshaft.models.prepared import PreparedModel

META_FILE = "camshaft/meta.json"
CAM_FILE = "camshaft/cam_head.npz.b64"
HEAD_FILE = "camshaft/head.pt2.b64"
MAX_BATCH = 65536
_ENV_LOCK = threading.Lock()


@dataclass
class Pt2Artifact:
    program: torch.export.ExportedProgram  # x -> [logits, taps...]
    head: torch.export.ExportedProgram | None  # first tap -> [logits, later taps...]
    taps: tuple[str, ...]

    @functools.cached_property
    def _module(self) -> torch.nn.Module:
        return self.program.module()  # builds a graph module: once

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return unflatten(self._module(x), self.taps)


def unflatten(outs, taps) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return outs[0], dict(zip(taps, outs[1:], strict=True))


def _batch_axis() -> tuple[dict[int, torch.export.Dim]]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def build(prepared: PreparedModel, example: torch.Tensor) -> Pt2Artifact:
    """Export the prepared model (and its head, where it splits) with a dynamic batch axis."""
    taps = tuple(prepared.tapped.taps)
    try:
        with torch.no_grad():
            program = torch.export.export(FlatTapped(prepared.tapped).eval(), (example,), dynamic_shapes=_batch_axis())
            head = None
            if prepared.split is not None:
                a = prepared.split.trunk.eval()(example)
                flat_head = FlatHead(prepared.split.head, list(taps[1:])).eval()
                head = torch.export.export(flat_head, (a,), dynamic_shapes=_batch_axis())
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds; all mean the same here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"torch.export cannot export {prepared.info.source!r} ({type(e).__name__}: {first}); models whose "
            "control flow depends on the data cannot become .pt2 programs: use --format torchscript or onnx"
        ) from e
    for part in (program, head):
        if part is not None:
            _dense_weights(part)
    return Pt2Artifact(program, head, taps)


def _dense_weights(program: torch.export.ExportedProgram) -> None:
    """Give ``program`` its own row-major copy of each weight stored in another layout.

    A channels-last convolution weight (the eager backend lays out a live model's weights so) is
    saved as a slice of its storage, and loading it warns once per weight that weights off the CPU
    may come back wrong. The values are the same; the model handed over keeps its own tensors.
    """
    for table in (program.state_dict, program.constants):
        for name, value in table.items():
            if isinstance(value, torch.Tensor) and not value.is_contiguous():
                dense = value.contiguous()
                if isinstance(value, torch.nn.Parameter):
                    dense = torch.nn.Parameter(dense, requires_grad=value.requires_grad)
                table[name] = dense


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def save(artifact: Pt2Artifact, meta: ArtifactMeta, cam_weight: torch.Tensor | None, path: Path) -> None:
    extra = {META_FILE: meta.to_json()}
    if cam_weight is not None:
        extra[CAM_FILE] = _b64(cam_to_bytes(cam_weight))
    if artifact.head is not None:
        buf = io.BytesIO()
        torch.export.save(artifact.head, buf)
        extra[HEAD_FILE] = _b64(buf.getvalue())
    with open(path, "wb") as f:
        torch.export.save(artifact.program, f, extra_files=extra)


@contextlib.contextmanager
def weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True``.

    ``torch.export.load`` falls back to full unpickling for some stored objects; a model file must
    never run code, so inside this block that fallback is refused (torch's own override switch).
    """
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    with _ENV_LOCK:  # the switch is process-wide: loads in other threads must not unset it early
        previous = os.environ.get(key)
        os.environ[key] = "1"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = previous


# what a .pt2 archive's weight and constant configs may name: tensors (raw bytes, or torch.save'd ones
# that weights_only() covers). torch.export.load reads other stored objects ("opaque_obj_*" with
# plain pickle.loads, "custom_obj_*" with TorchScript's unpickler) whatever torch.load is told
_STORED = re.compile(r"(?:^|/)data/(constants|weights)/[^/]*_config\.json$")
_TENSOR_PREFIXES = {"constants": "tensor_", "weights": "weight_"}
_OBJECTS = re.compile(r"(?:^|/)data/constants/(?:opaque|custom)_obj_[^/]*$")


def check_archive(f, path: Path) -> None:
    """Refuse a .pt2 archive that stores anything but tensors, before ``torch.export.load`` reads it.

    Raises:
        ConfigError: the file is not a zip archive, or stores objects that loading would unpickle.
    """
    try:
        with zipfile.ZipFile(f) as archive:
            names = archive.namelist()
            objects = [n for n in names if _OBJECTS.search(n)]
            for name in names:
                found = _STORED.search(name)
                if found is None:
                    continue
                prefix = _TENSOR_PREFIXES[found.group(1)]
                config = json.loads(archive.read(name)).get("config", {})
                objects += [f"{fqn} ({entry.get('path_name')})" for fqn, entry in config.items()
                            if not str(entry.get("path_name", "")).startswith(prefix)]
    except (zipfile.BadZipFile, json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{path} is not a readable .pt2 archive ({e})") from e
    finally:
        if hasattr(f, "seek"):
            f.seek(0)
    if objects:
        raise ConfigError(
            f"{path} stores Python objects that loading it would unpickle ({', '.join(sorted(set(objects))[:5])}); "
            "camshaft does not run code from model files. Re-export it with `camshaft export --format pt2`"
        )


def _load_program(f, path: Path, extra: dict | None = None) -> torch.export.ExportedProgram:
    check_archive(f, path)
    try:
        with weights_only():
            return torch.export.load(f, extra_files=extra)
    except pickle.UnpicklingError as e:
        raise ConfigError(
            f"{path} stores pickled objects that cannot be loaded as plain weights; camshaft does not "
            f"unpickle model files ({e}). Re-export it with `camshaft export --format pt2`"
        ) from e


def load(path: Path, *, device: torch.device | str = "cpu"):
    """``(program module, head module or None, meta or None, cam weight or None)`` of a .pt2 file."""
    extra = {META_FILE: "", CAM_FILE: "", HEAD_FILE: ""}
    program = _load_program(str(path), path, extra)
    head = None
    if extra[HEAD_FILE]:
        head = _load_program(io.BytesIO(base64.b64decode(extra[HEAD_FILE])), path)
    cam = base64.b64decode(extra[CAM_FILE]) if extra[CAM_FILE] else None
    meta = None
    if extra[META_FILE]:
        meta, cam = parse_meta(extra[META_FILE], cam, where=str(path))
        _check_programs(program, head, meta, path)
    elif cam is not None:
        cam = cam_from_bytes(cam)
    return program.module().to(device), None if head is None else head.module().to(device), meta, cam


def _check_programs(program, head, meta: ArtifactMeta, path: Path) -> None:
    """The programs' static shapes against the metadata: ``x -> [logits, taps...]``, ``a -> [logits, later...]``."""
    size, outs = _signature(program)
    check_graph(meta, where=str(path), input_size=size[-2:], num_classes=_classes(outs),
                tap_shapes=_per_image(meta.taps, outs[1:]))
    if head is not None:  # gradient methods differentiate it: its logits must be the same classes
        size, outs = _signature(head)
        shapes = {meta.taps[0]: size[1:], **_per_image(meta.taps[1:], outs[1:])}
        check_graph(meta, where=f"{path} (its head)", num_classes=_classes(outs), tap_shapes=shapes)


def _classes(outs: list[list]):
    return outs[0][-1] if outs and outs[0] else None


def _per_image(taps: list[str], shapes: list[list]) -> dict:
    """``{tap: its shape without the batch axis}``; None for a tap the program does not output."""
    return {t: None if s is None else s[1:] for t, s in itertools.zip_longest(taps, shapes) if t is not None}


def _signature(program: torch.export.ExportedProgram) -> tuple[list, list[list]]:
    """The shape of a program's user input and of each user output (a dynamic size is not an int)."""
    user = set(program.graph_signature.user_inputs)
    inputs, outputs = [], []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            inputs.append(_shape(node))
        elif node.op == "output":
            outputs = [_shape(a) for a in node.args[0]][-len(program.graph_signature.user_outputs):]
    return (inputs[0] if inputs else []), outputs


def _shape(node) -> list:
    shape = getattr(getattr(node, "meta", {}).get("val"), "shape", None)
    return [] if shape is None else [d if type(d) is int else None for d in shape]
