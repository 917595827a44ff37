"""ONNX artifacts: outputs ``logits`` and one output per tap, dynamic batch, metadata inside.

Where the model splits at its first tap, the differentiable head travels in the file too (a
TorchScript module in the metadata), so gradient methods run from an ONNX artifact: ONNX Runtime
computes the trunk, torch autograd the small head.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from camshaft.errors import ConfigError
from camshaft.exporters.metadata import ArtifactMeta, cam_from_bytes, cam_to_bytes, check_graph, parse_meta
from camshaft.exporters.torchscript import FlatHead, FlatTapped
from camshaft.models.prepared import PreparedModel

META_KEY = "camshaft"
CAM_KEY = "camshaft.cam_head"
HEAD_KEY = "camshaft.head"
LOGITS = "logits"


HEAD_LIMIT_BYTES = 64e6  # a head this small always travels in the ONNX file


def tap_output(tap: str) -> str:
    """The graph output of a tap; prefixed so that it never collides with an internal name."""
    return f"tap:{tap}"


class TupleOutputs(nn.Module):
    def __init__(self, flat: nn.Module):
        super().__init__()
        self.flat = flat

    def forward(self, x: torch.Tensor):
        return tuple(self.flat(x))


@contextlib.contextmanager
def quiet():
    """The exporters are chatty (progress lines, deprecation warnings): keep the CLI clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _native_stdout_silenced():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _native_stdout_silenced():
    """C++ writes to file descriptor 1 bypass ``sys.stdout``: the TorchScript-based exporter prints its
    whole graph there when it fails ("Torch IR graph at exception"), pages before camshaft's one-line error."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no descriptor 1 (a daemon) or a closed stream: nothing to silence
        yield
        return
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(sink)


def build(prepared: PreparedModel, example: torch.Tensor, path: Path, *, opset: int | None = None) -> str:
    """Export to ``path``; returns which torch exporter produced it."""
    module = TupleOutputs(FlatTapped(prepared.tapped)).eval()
    names = [LOGITS, *map(tap_output, prepared.tapped.taps)]
    attempts = {  # the torch.export-based exporter first, the TorchScript-based one as fallback
        "dynamo": {"dynamo": True, "dynamic_shapes": ({0: torch.export.Dim("batch")},), "opset_version": opset, "external_data": False},
        "torchscript-based": {
            "dynamo": False,
            "dynamic_axes": {"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            "opset_version": opset or 17,
        },
    }
    errors: dict[str, Exception] = {}
    for name, options in attempts.items():
        try:
            with quiet():
                torch.onnx.export(module, (example,), str(path), input_names=["input"], output_names=names, **options)
            onnx.checker.check_model(str(path))
            return name
        except Exception as e:  # noqa: BLE001 - try the next exporter, report all failures
            errors[name] = e
    detail = "; ".join(f"{n}: {_reason(e)}" for n, e in errors.items())
    raise ConfigError(
        f"cannot export {prepared.info.source!r} to ONNX ({detail}); use --format torchscript or pt2"
    ) from errors["torchscript-based"]


def _reason(e: BaseException) -> str:
    """The first line of the innermost cause: the exporters wrap it in pages of advice."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def head_bytes(prepared: PreparedModel, example: torch.Tensor, *, embed: bool | None = None) -> bytes | None:
    """The split head as TorchScript bytes, or None when the model does not split.

    The head's weights are stored a second time, so by default (``embed=None``) it travels only
    when it is small: at most 64 MB or a quarter of the model (VGG's classifier is 90%, 480 MB).
    """
    if prepared.split is None or embed is False:
        return None
    head_params = sum(p.numel() for p in prepared.split.head.parameters())
    total = sum(p.numel() for p in prepared.module.parameters())
    if embed is None and head_params * 4 > max(HEAD_LIMIT_BYTES, total):  # fp32 bytes vs a quarter of them
        warnings.warn(
            f"the head above tap {prepared.tapped.taps[0]!r} holds {head_params / total:.0%} of the parameters "
            f"({head_params * 4 / 1e6:.0f} MB); "
            "not embedding it (the ONNX file would nearly double), so gradient methods will not run from this "
            "file (TorchScript and eager still serve them); embed it anyway with head=True (--head)",
            stacklevel=3,
        )
        return None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        a = prepared.split.trunk(example)
        head = torch.jit.trace(FlatHead(prepared.split.head, list(prepared.tapped.taps[1:])).eval(), (a,), strict=False)
        buf = io.BytesIO()
        torch.jit.save(head, buf)
    return buf.getvalue()


def write_metadata(path: Path, meta: ArtifactMeta, cam_weight: torch.Tensor | None, head: bytes | None) -> None:
    model = onnx.load(str(path))
    props = {META_KEY: meta.to_json()}
    if cam_weight is not None:
        props[CAM_KEY] = base64.b64encode(cam_to_bytes(cam_weight)).decode()
    if head is not None:
        props[HEAD_KEY] = base64.b64encode(head).decode()
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def read_session(session, path: Path):
    """``(meta or None, cam_weight or None, head module or None)`` of an open ONNX Runtime session, checked
    against its graph: the input, the logits and each tap output (the batch axis is dynamic)."""
    meta, cam, head = read_metadata(session.get_modelmeta().custom_metadata_map, where=str(path))
    if meta is None:
        return meta, cam, head
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    taps = {t: outputs[tap_output(t)][1:] if tap_output(t) in outputs else None for t in meta.taps}
    logits = outputs.get(LOGITS) or [None]
    check_graph(meta, where=str(path), input_size=list(session.get_inputs()[0].shape)[-2:], num_classes=logits[-1],
                tap_shapes=taps)
    if head is not None:  # gradient methods differentiate it: its logits must be the same classes
        try:
            with torch.no_grad(), torch.jit.optimized_execution(False):  # not one of the runs it profiles
                outs = head(torch.zeros(1, *meta.tap_shapes[meta.taps[0]]))
        except Exception as e:  # noqa: BLE001 - whatever the head raises, it does not take the first tap
            raise ConfigError(f"{path}: its head does not take tap {meta.taps[0]!r} as the metadata gives it "
                              f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]})") from e
        shapes = dict(zip(meta.taps[1:], (tuple(o.shape[1:]) for o in outs[1:])))
        check_graph(meta, where=f"{path} (its head)", num_classes=outs[0].shape[-1], tap_shapes=shapes)
    return meta, cam, head


def read_metadata(custom: dict[str, str], *, where: str = "the ONNX file"):
    """``(meta or None, cam_weight or None, head module or None)`` from metadata properties."""
    cam = base64.b64decode(custom[CAM_KEY]) if CAM_KEY in custom else None
    meta = None
    if META_KEY in custom:
        meta, cam = parse_meta(custom[META_KEY], cam, where=where)
    elif cam is not None:
        cam = cam_from_bytes(cam)
    head = None
    if HEAD_KEY in custom:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head = torch.jit.load(io.BytesIO(base64.b64decode(custom[HEAD_KEY])), map_location="cpu").eval()
    return meta, cam, head
