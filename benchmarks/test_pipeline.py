"""End to end — decode + explain + write — on generated JPEGs, beside the method-only figure.

The figure is the pipeline's own clock (``RunSummary.seconds``), which leaves out resolving the
model and opening the artifact; pytest-benchmark's wall-clock column includes them.
"""

from __future__ import annotations


def test_pipeline(timed, bench, pipeline_case):
    bench.ensure_limits(pipeline_case.group)
    bench.ensure([bench.method_workload(pipeline_case)])  # the method-only figure, same run
    timed(bench.pipeline_workload(pipeline_case), self_timed=True)
