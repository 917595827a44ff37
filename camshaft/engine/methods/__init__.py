"""Explanation methods, one file each, registered by name when this package is imported."""

import importlib
import pkgutil

from camshaft.engine.methods.base import Method, Option, all_options, check_backend, get_method, method_names

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "Option", "all_options", "check_backend", "get_method", "method_names"]
