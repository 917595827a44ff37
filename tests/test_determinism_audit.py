"""Reproducibility: seeded noise independent of the device, reruns bitwise, backends within tolerance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from conftest import fixed, open_backend, randn, source_of
from torch import nn

import camshaft
from camshaft.engine.backends.base import Output
from camshaft.engine.methods import check_backend, get_method, method_names
from camshaft.engine.methods import input_gradients as ig
from camshaft.errors import CapabilityError


class Recording:
    """A backend stub on any device (even ``meta``): zero gradients, and it keeps the inputs it was given."""

    name = "recording"

    def __init__(self, classes: int = 3):
        self.classes, self.inputs = classes, []

    def forward(self, x):
        return Output(torch.zeros(x.shape[0], self.classes, device=x.device), {})

    def input_gradients(self, x, select):
        self.inputs.append(x)
        logits = torch.zeros(x.shape[0], self.classes, device=x.device)
        targets = select(logits)
        grads = torch.zeros(x.shape[0], targets.shape[1], *x.shape[1:], device=x.device)
        return Output(logits, {}, targets=targets, input_grads=grads)


OPTS = {"samples": 5, "noise": 0.2, "seed": 9, "samples_per_forward": 4}


def _smoothgrad_inputs(device: str) -> torch.Tensor:
    """The noisy copies SmoothGrad sends to the backend for two images on ``device``, (B, S, 3, H, W)."""
    backend = Recording()
    x = torch.stack([randn(3, 6, 5, seed=1), 3 * randn(3, 6, 5, seed=2) + 1]).to(device)
    get_method("smoothgrad").run(backend, x, fixed([[1], [2]]), tap=None, options=OPTS)
    return torch.cat([xs.view(2, -1, 3, 6, 5) for xs in backend.inputs], dim=1)


# --- SmoothGrad's noise is a function of (seed, sample) only ------------------------------------------


def test_smoothgrad_on_another_device_draws_the_cpu_generators_noise():
    """The noise once came from a generator on the input's device: CUDA's draws other numbers than the
    CPU's for one seed (and a ``meta`` input failed outright). It is drawn on the CPU and moved now."""
    inputs = _smoothgrad_inputs("meta")  # failed: "META device type not an accelerator"
    assert inputs.device.type == "meta" and inputs.shape == (2, 5, 3, 6, 5)
    assert torch.equal(ig.smoothgrad_noise(9, (5, 3, 6, 5), "cpu"), randn(5, 3, 6, 5, seed=9))


def test_smoothgrad_noise_is_the_same_drawn_fresh_or_cached_and_the_cache_is_never_written(monkeypatch):
    expected = randn(4, 3, 7, 6, seed=-3)
    cached = ig.smoothgrad_noise(-3, (4, 3, 7, 6), "cpu")
    monkeypatch.setattr(ig, "CACHED_NOISE_NUMEL", 10)  # every draw fresh
    assert torch.equal(cached, expected) and torch.equal(ig.smoothgrad_noise(-3, [4, 3, 7, 6], "cpu"), expected)
    monkeypatch.undo()
    inputs = _smoothgrad_inputs("cpu")
    assert torch.equal(ig.smoothgrad_noise(9, (5, 3, 6, 5), "cpu"), randn(5, 3, 6, 5, seed=9))  # unchanged by a run
    assert torch.equal(inputs, _smoothgrad_inputs("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoothgrad_sends_bitwise_the_same_noisy_copies_on_cuda_as_on_the_cpu():
    assert torch.equal(_smoothgrad_inputs("cuda").cpu(), _smoothgrad_inputs("cpu"))


# --- every method: a rerun is bitwise the same, backends agree within tolerance ---------------------------------


class Small(nn.Module):
    """A small convnet with batch norm, max-pool and a GAP + linear head: every method and backend serve it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)
        with torch.no_grad():  # batch-norm statistics of real activations: non-trivial maps
            self.train()(randn(8, 3, 32, 32, seed=0))
        self.eval()

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


SMALL = {"samples": 3, "steps": 4, "window": 8, "stride": 4}  # few evaluations for the sampled methods
BACKENDS = ("eager", "torchscript", "pt2", "onnxruntime")


def _options(method: str) -> dict:
    names = {o.name for o in get_method(method).options}
    return {k: v for k, v in SMALL.items() if k in names}


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    source = source_of(Small(), size=(32, 32))
    root = tmp_path_factory.mktemp("backends")
    return {name: open_backend(name, source, root / name, taps=["features"]) for name in BACKENDS}


def _serves(method: str, backend) -> bool:
    try:
        check_backend(get_method(method), backend, tap="features")
    except CapabilityError:
        return False
    return True


@pytest.mark.parametrize("method", method_names())
def test_every_backend_that_serves_a_method_agrees_with_eager(method, backends):
    """Within rtol 1e-4 and 1e-5 of the eager map's largest value (float32 on the CPU)."""
    x = randn(3, 3, 32, 32, seed=3)
    targets = fixed([[1, 4], [0, 2], [3, 3]])
    run = get_method(method)
    eager, _ = run.explain(backends["eager"], x, targets, tap="features", options=_options(method))
    scale = eager.abs().max()
    assert scale > 0 and torch.isfinite(eager).all()
    served = [name for name in BACKENDS[1:] if _serves(method, backends[name])]
    for name in served:
        maps, _ = run.explain(backends[name], x, targets, tap="features", options=_options(method))
        torch.testing.assert_close(maps, eager, rtol=1e-4, atol=1e-5 * scale.item(), msg=f"{method} on {name}")
    again, _ = run.explain(backends["eager"], x, targets, tap="features", options=_options(method))
    assert torch.equal(again, eager)  # a rerun in the same process: bitwise


def _run(data, out, methods, **kw):
    camshaft.explain(None, data, out=out, method=methods, options={"samples": 2}, targets="top:2",
                     progress=False, **kw)
    maps = {m: np.asarray(zarr.open_group(str(out / m / "maps.zarr"), mode="r")["maps"]) for m in methods}
    tables = {m: pd.read_parquet(out / m / "results.parquet") for m in methods}
    return maps, tables


@pytest.fixture(scope="module")
def demo_images(tmp_path_factory):
    from camshaft.demo.shapes import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("data"), n=4, seed=2).parent / "images"


@pytest.mark.slow  # two runs through the whole pipeline: 10-30 s on 2 busy cores
def test_the_same_threaded_run_twice_writes_bitwise_the_same_maps_and_tables(demo_images, tmp_path):
    """What a nightly diff relies on: two partitions in Dask's threaded scheduler, seeded SmoothGrad."""
    methods = ["gradcam", "smoothgrad", "occlusion"]
    kw = {"batch_size": 2, "partition_size": 3, "scheduler": "threads", "workers": 1}
    first, first_tables = _run(demo_images, tmp_path / "a", methods, **kw)
    second, second_tables = _run(demo_images, tmp_path / "b", methods, **kw)
    for m in methods:
        assert np.isfinite(first[m]).all()
        assert np.array_equal(first[m], second[m]), m
        pd.testing.assert_frame_equal(first_tables[m], second_tables[m], check_exact=True)
