"""Export a tapped model to TorchScript, ONNX or torch.export (.pt2), with metadata and a parity check.

An artifact is written under a temporary name and renamed only after it matches the eager model
on logits and every tap; otherwise nothing is written and the error says by how much it failed.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from camshaft.errors import ConfigError, ParityError
from camshaft.exporters import onnx as onnx_export
from camshaft.exporters import pt2 as pt2_export
from camshaft.exporters import torchscript as ts_export
from camshaft.exporters.metadata import ArtifactMeta, version
from camshaft.models.prepared import PreparedModel
from camshaft.writers.atomic import atomic_path, cannot_write

FORMATS = ("torchscript", "onnx", "pt2")
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "pt2": ".pt2"}


def check_artifact_path(format: str, out: str | Path) -> None:
    """Refuse, before any work, an ``out`` that is a folder or cannot be written.

    ONNX files are known by their ``.onnx`` suffix only (TorchScript and .pt2 archives by their
    content), so an ONNX artifact written under another name could not be opened again.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the artifact's file name, "
                          f"e.g. {str(out / ('model' + SUFFIX.get(format, '.pt')))!r}")
    if format == "onnx" and out.suffix.lower() != SUFFIX["onnx"]:
        raise ConfigError(f"an ONNX artifact's name must end in .onnx (camshaft recognises ONNX files by it), "
                          f"received {str(out)!r}")
    folder = next(p for p in out.absolute().parents if p.exists())  # the folder the file or its parents go into
    why = cannot_write(folder)  # a file there: "Not a directory"
    if why is not None:
        raise ConfigError(f"cannot write --out {str(out)!r}: {why} ({folder}); choose a writable place")


def export_prepared(
    prepared: PreparedModel, *, format: str, out: str | Path, rtol: float = 1e-3, head: bool | None = None
) -> Path:
    """Write ``prepared`` as a ``format`` artifact at ``out`` after a parity check.

    ``head``: embed the differentiable head in an ONNX file (None: when it is small; see onnx.head_bytes).
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; valid choices: {', '.join(FORMATS)}")
    check_artifact_path(format, out)
    out = Path(out)
    pre = prepared.info.preprocess
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, *pre.input_size, generator=gen)
    checks = [torch.randn(n, 3, *pre.input_size, generator=gen) for n in (1, 3)]  # other batch sizes
    meta = ArtifactMeta(
        format=format,
        source=prepared.info.source,
        preprocess=pre,
        taps=list(prepared.tapped.taps),
        tap_shapes=prepared.tap_shapes,
        num_classes=prepared.info.num_classes,
        class_names=list(prepared.info.class_names) if prepared.info.class_names else None,
        cam_tap=prepared.cam_head.tap if prepared.cam_head else None,
        cam_linear=prepared.cam_head.linear if prepared.cam_head else None,
        has_head=prepared.split is not None,
        camshaft_version=version(),
    )
    cam = prepared.cam_head.weight if prepared.cam_head else None
    module = prepared.tapped.cpu().eval()
    if prepared.split is not None:
        prepared.split.trunk.cpu(), prepared.split.head.cpu()
    with _new_folders(out.parent), atomic_path(out) as tmp:  # the artifact appears whole, or not at all
        if format == "torchscript":
            artifact = ts_export.build(prepared, example)
            meta.parity = _parity(module, lambda x: artifact(x), checks, rtol=rtol)
            ts_export.save(artifact, meta, cam, tmp)
        elif format == "pt2":
            exported = pt2_export.build(prepared, example)
            meta.parity = _parity(module, exported, checks, rtol=rtol)
            if exported.head is not None:
                meta.parity |= _head_parity(module, exported.head.module(), meta.taps, checks, rtol=rtol)
            meta.exporter = f"torch.export (torch {torch.__version__})"
            pt2_export.save(exported, meta, cam, tmp)
        else:
            meta.exporter = onnx_export.build(prepared, example, tmp)
            session = _session(tmp)
            names = [onnx_export.LOGITS, *map(onnx_export.tap_output, meta.taps)]
            run = lambda x: _unflatten(session.run(names, {"input": x.numpy()}), meta.taps)  # noqa: E731
            meta.parity = _parity(module, run, checks, rtol=rtol)
            head_module = onnx_export.head_bytes(prepared, example, embed=head)
            meta.has_head = head_module is not None
            if head_module is not None:
                with warnings.catch_warnings():  # torch.jit.load's deprecation: the head travels as TorchScript
                    warnings.simplefilter("ignore")
                    embedded = torch.jit.load(io.BytesIO(head_module))
                meta.parity |= _head_parity(module, embedded, meta.taps, checks, rtol=rtol)
            onnx_export.write_metadata(tmp, meta, cam, head_module)
    return out


@contextlib.contextmanager
def _new_folders(folder: Path) -> Iterator[None]:
    """Folders made for the artifact are removed again (when empty) if the export fails."""
    made = [p for p in [folder, *folder.parents] if not p.exists()]
    try:
        yield
    except BaseException:
        for p in made:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _session(path: Path):
    from camshaft.engine.backends.onnx_backend import open_session

    return open_session(path, torch.device("cpu"))


def _unflatten(outs, taps):
    tensors = [torch.from_numpy(o) for o in outs]
    return tensors[0], dict(zip(taps, tensors[1:], strict=True))


def _parity(eager, artifact, inputs, *, rtol: float) -> dict[str, float]:
    """Max abs error per output over ``inputs``; raises ParityError beyond ``rtol`` × scale."""
    errors: dict[str, float] = {}
    scales: dict[str, float] = {}
    with torch.inference_mode():
        for x in inputs:
            ref_logits, ref_taps = eager(x)
            got_logits, got_taps = artifact(x)
            pairs = {"logits": (ref_logits, got_logits), **{t: (ref_taps[t], got_taps[t]) for t in ref_taps}}
            for name, (ref, got) in pairs.items():
                if tuple(ref.shape) != tuple(got.shape):
                    raise ParityError(f"{name}: shape {tuple(got.shape)} in the artifact, {tuple(ref.shape)} eager")
                errors[name] = max(errors.get(name, 0.0), _max_error(ref.float(), got.float()))
                finite = ref.float().nan_to_num(0.0, 0.0, 0.0)
                scales[name] = max(scales.get(name, 0.0), finite.abs().max().item())
    # relative to each output's own scale: a floor of 1 would let any output smaller than rtol pass
    # (randomly initialised MobileNet and EfficientNet logits are below 1e-9)
    failed = {n: e for n, e in errors.items() if not e <= rtol * max(scales[n], _TINY)}
    if failed:
        detail = ", ".join(f"{n}: max abs error {e:.3g} (scale {scales[n]:.3g})" for n, e in failed.items())
        raise ParityError(f"the artifact disagrees with the eager model beyond rtol {rtol}: {detail}; nothing written")
    return errors


def _head_parity(eager, head, taps: list[str], inputs, *, rtol: float) -> dict[str, float]:
    """The embedded head (first tap -> logits and later taps) against the eager model, fed the eager first
    tap: gradient methods differentiate through it, so a wrong split must not be written."""
    first, later = taps[0], taps[1:]

    def through_head(x):
        _, acts = eager(x)
        outs = head(acts[first])
        return outs[0], {first: acts[first], **dict(zip(later, outs[1:], strict=True))}

    try:
        errors = _parity(eager, through_head, inputs, rtol=rtol)
    except ParityError as e:
        raise ParityError(f"the embedded head (from tap {first!r}, for gradient methods): {e}") from e
    return {f"head {name}": e for name, e in errors.items() if name != first}


_TINY = 1e-30  # the scale of an output that is zero everywhere: then the artifact's must be zero too


def _max_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Max abs difference; equal values (infinities too) and NaN in both agree, NaN in one is infinitely off."""
    diff = torch.where(ref == got, 0.0, (ref - got).abs())
    both_nan = ref.isnan() & got.isnan()
    diff = torch.where(both_nan, 0.0, diff.nan_to_num(math.inf, math.inf))
    return diff.max().item() if diff.numel() else 0.0
