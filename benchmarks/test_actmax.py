"""Activation maximization: seconds per class of camshaft's batched render, its limit, and lucent.

Full mode: resnet18, 128 px, 64 steps, 8 classes at once (the issue's setting); quick: the tiny preset.
"""

from __future__ import annotations

import pytest

from camshaft.bench.cases import Group


@pytest.fixture(scope="module")
def actmax_items(bench):
    from camshaft.bench.actmax import actmax_workloads

    s = bench.settings
    model = s.models[0] if s.quick else "resnet18"
    group = Group(model, (s.actmax_size, s.actmax_size), s.actmax_classes)
    mb = bench.model(model)
    items = actmax_workloads(
        mb.source.module,
        classes=s.actmax_classes,
        size=s.actmax_size,
        steps=s.actmax_steps,
        device=mb.device,
        dtype=s.dtype,
        key=group.key,
        attrs=group.attrs(),
        peers=True,
    )
    return {"/".join(item.key.rsplit("/", 2)[-2:]): item for item in items}


@pytest.mark.parametrize("who", ["actmax/eager", "actmax[no-exact]/eager", "actmax/peer:lucent"])
def test_actmax(timed, bench, actmax_items, who):
    if who not in actmax_items:
        pytest.skip(f"{who} is not timed on this device")
    bench.ensure([actmax_items[k] for k in actmax_items if k.startswith("actmax_limit")])  # the plain Adam loops
    timed(actmax_items[who])
