"""Backends: one interface over eager torch, TorchScript and ONNX Runtime."""

from camshaft.engine.backends import registry as _registry  # noqa: F401 - registers the backends
from camshaft.engine.backends.base import Backend, Output, backend_factory, backend_names

__all__ = ["Backend", "Output", "backend_factory", "backend_names"]
