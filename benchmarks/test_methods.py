"""Every registered method × backend × batch × targets on each model, beside the limit of its group.

A combination a backend cannot serve is skipped with the backend's reason, never failed.
"""

from __future__ import annotations


def test_method(timed, bench, case):
    bench.ensure_limits(case.group)  # the limit is measured in the same run, before the method
    timed(bench.method_workload(case))
