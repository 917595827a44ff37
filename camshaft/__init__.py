"""camshaft: batch explanation engine for image classifiers.

``camshaft.explain``, ``camshaft.export``, ``camshaft.inspect``, ``camshaft.load_results``,
``camshaft.feature_maps`` and ``camshaft.actmax`` mirror the CLI. They are imported lazily so that
``camshaft --help`` stays fast; the composable pieces of activation maximization (objectives,
parameterizations, transforms, ``render``) are in ``camshaft.engine.actmax``.
"""

__version__ = "0.1.0"
__all__ = ["actmax", "explain", "export", "feature_maps", "inspect", "load_results"]


def __getattr__(name: str):
    if name in __all__:
        from camshaft import api

        return getattr(api, name)
    raise AttributeError(f"module 'camshaft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})  # the lazy names too: tab completion in a notebook lists them
