"""The limits of each group: plain forward per runtime, and the gradient limits (head / input backward)."""

from __future__ import annotations

import pytest

from camshaft.bench.cases import target_count
from camshaft.bench.limits import COMPILED_VARIANTS, CPU_VARIANTS, VARIANTS


def _pick(items, suffix: str):
    return next((w for w in items if w.key.endswith(suffix)), None)


def test_forward_limit(timed, bench, group, variant):
    item = _pick(bench.limit_workloads(group), f"/limit/{variant}")
    if item is None:
        pytest.skip(f"no {variant} limit for {group.key}")
    timed(item)


@pytest.mark.parametrize("kind", ["head_backward", "input_backward"])
def test_gradient_limit(timed, bench, group, kind, k):
    item = _pick(bench.limit_workloads(group), f"/{kind}/k{k}")
    if item is None:
        pytest.skip(f"no {kind} limit for k={k}: no selected method needs it, or the model does not split")
    timed(item)


def pytest_generate_tests(metafunc):
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", [*VARIANTS, *CPU_VARIANTS, *COMPILED_VARIANTS])  # absent ones skip
    if "k" in metafunc.fixturenames:
        s = metafunc.config.camshaft_bench_settings
        metafunc.parametrize("k", sorted({target_count(t) for t in s.targets}))
