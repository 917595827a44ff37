"""Explanation methods, one file each, registered by name."""

from camshaft.engine.methods import cam, gradcam  # noqa: F401 - registers the methods
from camshaft.engine.methods.base import Method, check_backend, get_method, method_names

__all__ = ["Method", "check_backend", "get_method", "method_names"]
