"""Backends: one interface over eager torch, TorchScript and ONNX Runtime."""

from camshaft.engine.backends.base import Backend, Output, backend_factory, backend_names

__all__ = ["Backend", "Output", "backend_factory", "backend_names"]
