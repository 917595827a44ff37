"""Benchmarks: camshaft's throughput beside the limit measured in the same run, and beside peers.

Shared by ``camshaft bench`` and the pytest-benchmark suites in ``benchmarks/``:

- ``timing``: warm-up, device synchronization, round-robin repeats;
- ``limits``: plain forward (eager, channels_last, frozen TorchScript in both layouts, ONNX
  Runtime), head and input backward, a plain batched Adam loop;
- ``cases``: the model × batch × method × backend × targets matrix and camshaft's timed work;
- ``peers``: the same work with pytorch-grad-cam, captum and torchcam when installed;
- ``pipeline``: decode + explain + write on generated JPEGs;
- ``ratios`` / ``report`` / ``compare``: ratios, the table and JSON, regressions between runs.
"""

from camshaft.bench.compare import Comparison, compare, format_comparison
from camshaft.bench.report import BenchReport, format_table, load_json, save_json
from camshaft.bench.settings import BenchSettings
from camshaft.bench.timing import TimingConfig

__all__ = [
    "BenchReport",
    "BenchSettings",
    "Comparison",
    "TimingConfig",
    "compare",
    "format_comparison",
    "format_table",
    "load_json",
    "run_bench",
    "save_json",
]


def __getattr__(name: str):
    if name == "run_bench":  # imports the engine and torchvision: only when a run is asked for
        from camshaft.bench.runner import run_bench

        return run_bench
    raise AttributeError(f"module 'camshaft.bench' has no attribute {name!r}")
