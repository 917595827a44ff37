"""camshaft: batch explanation engine for image classifiers.

``camshaft.explain``, ``camshaft.export``, ``camshaft.inspect`` and ``camshaft.load_results``
mirror the CLI. They are imported lazily so that ``camshaft --help`` stays fast.
"""

__version__ = "0.1.0"
__all__ = ["explain", "export", "inspect", "load_results", "feature_maps"]


def __getattr__(name: str):
    if name in __all__:
        from camshaft import api

        return getattr(api, name)
    raise AttributeError(f"module 'camshaft' has no attribute {name!r}")
