"""The same work in pytorch-grad-cam, captum and torchcam (when installed), for the speed-up column."""

from __future__ import annotations

import pytest


def test_peer(timed, bench, peer):
    group, key = peer
    item = next((w for w in bench.peer_workloads(group) if w.key == key), None)
    if item is None:
        pytest.skip(f"{key}: no such peer workload")
    bench.ensure_limits(group)
    timed(item)


def pytest_generate_tests(metafunc):
    if "peer" not in metafunc.fixturenames:
        return
    from camshaft.bench.cases import groups
    from camshaft.bench.peers import peers_for

    s = metafunc.config.camshaft_bench_settings
    found = [
        (g, f"{g.key}/{m}/peer:{peer + (':' + v if v else '')}/{t}")
        for g in groups(s)
        for m in s.method_names()
        for peer, v, _ in peers_for(m, batch=g.batch, quick=s.quick)
        for t in s.targets
    ]
    metafunc.parametrize("peer", found, ids=[k.replace("/", "-") for _, k in found])
