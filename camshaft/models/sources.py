"""One resolver from a model specification to something camshaft can run.

Accepted: ``demo`` (the built-in classifier), a torchvision architecture name, ``pkg.module:factory``
(or a model instance; both with optional local weights), a TorchScript file and an ONNX file.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from camshaft.errors import ConfigError, ModelSourceError
from camshaft.models.classes import read_class_names
from camshaft.preprocess import Preprocess

DEMO = "demo"
_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "")  # camshaft/, for warnings' stacklevel


@dataclass
class ModelSource:
    """A resolved model: a live torch module, or the path of an exported artifact."""

    kind: str  # "torch" | "torchscript" | "onnx" | "pt2"
    spec: str
    module: nn.Module | None = None
    path: Path | None = None
    preprocess: Preprocess | None = None  # defaults this source implies, if any
    class_names: list[str] | None = field(default=None, repr=False)
    # a model converted from a file (camshaft.models.foreign): raises a ConfigError for an input size
    # (H, W) its graph does not hold at; prepare_model calls it
    check: Callable[[tuple[int, int]], None] | None = field(default=None, repr=False, compare=False)

    def check_input_size(self, input_size: tuple[int, int]) -> None:
        """A graph converted from a file must hold, and match the file, at ``input_size`` (else a ConfigError)."""
        if self.check is not None:
            self.check(input_size)


_KIND_NAMES = {
    "torch": "a torch model", "torchscript": "a TorchScript file", "onnx": "an ONNX file", "pt2": "a .pt2 file",
}


def kind_name(kind: str) -> str:
    """A model kind in a sentence: ``an ONNX file``, ``a TorchScript file``, ``a .pt2 file``, ``a torch model``."""
    return _KIND_NAMES.get(kind, f"a {kind} file")


def classification_models() -> list[str]:
    """torchvision's classification architectures."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def resolve_model(
    spec: str | Path | None,
    *,
    weights: str | Path | None = None,
    class_names: str | Path | None = None,
    preprocess: dict | None = None,
) -> ModelSource:
    """Resolve ``spec``; the error lists every interpretation tried and why it failed.

    ``class_names``: a file of the model's class names (see `camshaft.models.classes`), replacing
    the ones the model or artifact carries; checked against the model's outputs when it is opened.
    ``preprocess``: the run's preprocessing overrides (``input_size``, ``mean``, ...), for a TorchScript
    or .pt2 file that ``camshaft export`` did not write: it is converted at that input size.
    """
    names = None if class_names is None else read_class_names(class_names)  # a bad file fails before loading
    source = _resolve(spec, weights, preprocess or {})
    if names is not None:
        source.class_names = list(names)
    return source


def model_spec(spec) -> str:
    """``spec`` as text: a name, ``module:factory`` or a file path (``demo`` for None); another type is refused."""
    if spec is None:
        return DEMO
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    if not isinstance(spec, str):
        hint = " (a live nn.Module: give its package.module:factory)" if isinstance(spec, nn.Module) else ""
        raise ConfigError(f"model must be an architecture name, package.module:factory, a file path or None "
                          f"(the demo model), received {type(spec).__name__}{hint}")
    return spec or DEMO


def _resolve(spec: str | Path | None, weights, preprocess: dict) -> ModelSource:
    spec = model_spec(spec)
    if spec == DEMO:
        _no_weights(spec, weights)
        return _demo()
    path = Path(spec)
    tried: list[str] = []
    if path.is_file():
        _no_weights(spec, weights)
        if path.suffix.lower() == ".onnx":
            from camshaft.models.onnx_graph import check_external_data

            check_external_data(path)
            return ModelSource("onnx", spec, path=path)
        if zipfile.is_zipfile(path):
            kind = _archive_kind(path, spec)
            from camshaft.models import foreign

            if not foreign.has_camshaft_meta(path):
                return _foreign(path, kind, spec, preprocess)
            return ModelSource(kind, spec, path=path)
        raise ModelSourceError(
            spec, [f"file {path}: not an ONNX file (.onnx), a TorchScript archive or a torch.export archive (.pt2)"]
        )
    tried.append(f"file: no such file {path}")
    if ":" in spec:
        return _factory(spec, weights)
    tried.append("module:factory: no ':' in the name")
    names = classification_models()
    if spec in names:
        return _torchvision(spec, weights)
    tried.append(f"torchvision architecture: not one of {', '.join(names[:12])}, ... ({len(names)} in all)")
    raise ModelSourceError(spec, tried)


def _is_pt2(path: Path) -> bool:
    """A torch.export archive (its programs under ``models/``), not a TorchScript one (``code/``)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/models/" in n or n.startswith("models/") for n in names) and not any("/code/" in n for n in names)


def _archive_kind(path: Path, spec: str) -> str:
    """``pt2`` or ``torchscript`` for a zip file; a checkpoint (``torch.save``) or another zip is refused."""
    if _is_pt2(path):
        return "pt2"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if any("/code/" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("/data.pkl") for n in names):
        raise ModelSourceError(spec, [
            f"file {path}: a torch.save checkpoint (weights), not a model: give the architecture or "
            f"module:factory and --weights {path}"
        ])
    raise ModelSourceError(spec, [f"file {path}: a zip archive, but neither a TorchScript nor a .pt2 model"])


def _foreign(path: Path, kind: str, spec: str, preprocess: dict) -> ModelSource:
    """A TorchScript or .pt2 file from elsewhere, as a torch model (``camshaft.models.foreign``)."""
    from camshaft.models import foreign

    pre = Preprocess().replace(input_size=preprocess.get("input_size"))
    module, check, fixed = foreign.convert(path, kind, pre.input_size)
    pre = pre.replace(input_size=None if preprocess.get("input_size") else fixed)  # the one size a file takes
    if preprocess.get("mean") is None or preprocess.get("std") is None:
        h, w = pre.input_size
        warnings.warn(
            f"{spec} carries no camshaft metadata: assuming ImageNet mean/std, center-crop and a {h}x{w} input; "
            "set --mean, --std, --resize and --input-size to match how the model was trained",
            stacklevel=_outside_camshaft(),
        )
    return ModelSource("torch", spec, module=module, path=path, preprocess=pre, check=check)


def _no_weights(spec: str, weights) -> None:
    if weights is not None:
        raise ConfigError(f"--weights applies to architectures and factories, not to {spec!r}")


def _outside_camshaft() -> int:
    """The ``stacklevel`` (for a warning raised by its caller) of the first frame outside camshaft.

    Computed, not fixed: camshaft reaches ``resolve_model`` by several paths (the API, the CLI, a
    Dask task), and the warning should point at the user's code whichever one it took.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def _demo() -> ModelSource:
    from camshaft.demo import model as demo

    pre = Preprocess(tuple(demo.DEMO_INPUT_SIZE), tuple(demo.DEMO_MEAN), tuple(demo.DEMO_STD), "stretch")
    return ModelSource("torch", DEMO, module=demo.load_demo_model(), preprocess=pre, class_names=list(demo.CLASS_NAMES))


def _torchvision(name: str, weights) -> ModelSource:
    model = torchvision.models.get_model(name, weights=None)
    if weights is None:
        warnings.warn(
            f"{name}: no weights given (--weights, or weights= in Python), using random weights: "
            "results are meaningless",
            stacklevel=_outside_camshaft(),
        )
    else:
        state = read_state_dict(weights)
        classes = _checkpoint_classes(model, state)
        if classes is not None:  # a fine-tuned classifier: the architecture with that many classes
            model = torchvision.models.get_model(name, weights=None, num_classes=classes)
        _load_state(model, state, weights)
    categories = _imagenet_categories(name)
    class_names = categories if categories and num_classes_of(model) == len(categories) else None
    return ModelSource("torch", name, module=model.eval(), preprocess=Preprocess(), class_names=class_names)


def _factory(spec: str, weights) -> ModelSource:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelSourceError(spec, [f"module:factory: cannot import {attr!r} from {module_name!r}: {e}"]) from e
    model = factory if isinstance(factory, nn.Module) else _call_factory(factory, spec)
    if not isinstance(model, nn.Module):
        raise ModelSourceError(spec, [f"module:factory: {spec}() returned {type(model).__name__}, not a torch.nn.Module"])
    if weights is not None:
        load_weights(model, weights)
    return ModelSource("torch", spec, module=model.eval())


def _call_factory(factory, spec: str):
    """``factory()``; one that cannot be called without arguments is refused before the call."""
    if not callable(factory):
        raise ModelSourceError(spec, [f"module:factory: {spec} is a {type(factory).__name__}, not a callable"])
    try:
        inspect.signature(factory).bind()
    except TypeError as e:
        raise ModelSourceError(spec, [
            f"module:factory: {spec}() cannot be called without arguments ({e}); "
            "point to a function that builds the model with no arguments, or to a model instance"
        ]) from e
    except ValueError:  # no signature to check (some builtins): just call it
        pass
    return factory()


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint safely (``weights_only=True``) into ``model``, strictly."""
    _load_state(model, read_state_dict(path), path)


def read_state_dict(path: str | Path) -> dict:
    """The state_dict of a local checkpoint, read with ``weights_only=True``.

    Unwrapped from ``{"state_dict" | "model" | "model_state_dict": ...}``; the ``module.`` prefix
    of a ``DataParallel`` model and the ``_orig_mod.`` one of ``torch.compile`` are removed when
    every key has them.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"cannot load weights {path} with weights_only=True (camshaft never unpickles code from model "
            f"files): {_load_failure(e)}. Save a plain state_dict: torch.save(model.state_dict(), path)"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ConfigError(f"weights file {path} holds a {type(state).__name__}, expected a state_dict")
    for prefix in ("module.", "_orig_mod."):  # DataParallel, then torch.compile (which may sit inside it)
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _load_failure(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to unpickle everything."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (f"it stores the Python object {found.group(1)} (a pickled model, torch.save(model), "
                "or another object), not only tensors")
    detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)  # past torch's advice to unpickle everything
    reason = detail.group(1).strip() if detail else (text.strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {reason} (is it a torch.save checkpoint?)"


def _load_state(model: nn.Module, state: dict, path: str | Path) -> None:
    own = model.state_dict()
    if state and all(k.startswith("module.") for k in own) and not any(k.startswith("module.") for k in state):
        state = {f"module.{k}": v for k, v in state.items()}  # the model's own top module is named "module"
    shapes = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if shapes:
        raise ConfigError(f"weights {path} do not fit the model: other shapes for {_first(shapes)}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"weights {path} do not fit the model: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )


def _first(items: list[str], n: int = 4) -> str:
    """The first ``n`` of ``items`` as text: ``a, b, c, d and 3 more``."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _checkpoint_classes(model: nn.Module, state: dict) -> int | None:
    """The class count of a checkpoint whose last linear layer has another one than ``model``'s."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return None
    name, last = linears[-1]
    weight = state.get(f"{name}.weight")
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == last.in_features:
        return int(weight.shape[0]) if weight.shape[0] != last.out_features else None
    return None


def num_classes_of(model: nn.Module) -> int | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _imagenet_categories(name: str) -> list[str] | None:
    """ImageNet class names from torchvision's weight metadata (no download involved)."""
    try:
        enum = torchvision.models.get_model_weights(name)
        return list(enum.DEFAULT.meta["categories"])
    except (ValueError, KeyError, AttributeError):
        return None
