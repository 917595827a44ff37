"""camshaft: batch explanation engine for image classifiers."""

__version__ = "0.1.0"
