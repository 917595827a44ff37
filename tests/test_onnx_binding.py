"""ONNX Runtime reads its input and writes its outputs in place (I/O binding) once a batch shape is known.

The first batch of a shape runs through numpy arrays and teaches the backend the outputs' shapes;
later batches of that shape are bound to torch tensors, which on a GPU keeps them on the device. On
the CPU the binding runs the same code with another device type, so these tests check it there.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TinyCam, open_backend, source_of

from camshaft.engine.targets import Targets


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    torch.manual_seed(0)
    source = source_of(TinyCam().eval())
    folder = tmp_path_factory.mktemp("binding")
    return open_backend("eager", source, folder / "eager"), open_backend("onnxruntime", source, folder / "onnx")


class Counting:
    """The session, counting the runs that went through numpy arrays and through a binding."""

    def __init__(self, session):
        self.session, self.arrays, self.bound = session, 0, 0

    def run(self, *args, **kwargs):
        self.arrays += 1
        return self.session.run(*args, **kwargs)

    def run_with_iobinding(self, *args, **kwargs):
        self.bound += 1
        return self.session.run_with_iobinding(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_batches_of_a_known_shape_are_bound_and_match_eager(backends, monkeypatch):
    eager, onnx = backends
    counting = Counting(onnx.session)
    monkeypatch.setattr(onnx, "session", counting)
    monkeypatch.setattr(onnx, "_shapes", {})
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, 8, 8, generator=g) for n in (4, 4, 3, 4, 3)]
    results = [onnx.forward(x) for x in batches]
    assert (counting.arrays, counting.bound) == (2, 3)  # the first batch of 4 and of 3 taught the shapes
    for x, out in zip(batches, results, strict=True):  # each its own tensors: later batches overwrote none
        want = eager.forward(x)
        torch.testing.assert_close(out.logits, want.logits, rtol=1e-4, atol=1e-5)
        for tap, a in want.taps.items():
            torch.testing.assert_close(out.taps[tap], a, rtol=1e-4, atol=1e-5)
    assert results[1].logits.data_ptr() != results[3].logits.data_ptr()


def test_gradients_through_the_head_from_a_bound_trunk(backends):
    eager, onnx = backends
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    select = Targets.parse("top:2").selector()
    for _ in range(2):  # the second call is bound
        got = onnx.tap_gradients(x, select)
    want = eager.tap_gradients(x, select)
    torch.testing.assert_close(got.targets, want.targets)
    for tap, g in want.grads.items():
        torch.testing.assert_close(got.grads[tap], g, rtol=1e-4, atol=1e-6)


def test_a_non_contiguous_or_double_input_is_bound_as_float32(backends):
    eager, onnx = backends
    x = torch.randn(4, 8, 8, 3, generator=torch.Generator().manual_seed(3)).permute(0, 3, 1, 2)  # channels last
    first = onnx.forward(x.contiguous())
    again = onnx.forward(x.double())
    torch.testing.assert_close(again.logits, first.logits)
    torch.testing.assert_close(again.logits, eager.forward(x.contiguous()).logits, rtol=1e-4, atol=1e-5)


def test_tensorrt_is_asked_for_only_on_request(monkeypatch):
    """onnxruntime-gpu lists TensorRT whether or not its libraries are there, and it builds an engine per shape."""
    from camshaft.engine.backends import onnx_backend

    fake = type("ort", (), {"get_available_providers": staticmethod(
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])})
    monkeypatch.setattr(onnx_backend, "_onnxruntime", lambda: fake)
    monkeypatch.delenv(onnx_backend.TENSORRT, raising=False)
    gpu = torch.device("cuda:1")
    assert onnx_backend.providers_for(gpu) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    monkeypatch.setenv(onnx_backend.TENSORRT, "1")
    assert [p[0] for p in onnx_backend.providers_for(gpu)[:2]] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert onnx_backend.providers_for(torch.device("cpu")) == ["CPUExecutionProvider"]
