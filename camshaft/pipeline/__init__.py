"""The Dask layer: plan partitions, schedule them, resume and update runs. The engine has no Dask."""

from camshaft.pipeline.run import RunSummary, run_explain

__all__ = ["RunSummary", "run_explain"]
