"""Linear layers through oneDNN on the CPU (``camshaft.models.cpu_linear``): the values of ``F.linear`` to float
rounding, for every rank and call style; hooks still fire; gradients flow; the eager backend takes the route."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import open_backend, source_of
from torch import nn

from camshaft.engine.methods import get_method
from camshaft.models.cpu_linear import LinearsThroughOneDnn, cpu_linears, linear_as_convolution


def _convolutions(fn) -> int:
    """How many oneDNN convolutions ``fn()`` ran."""
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mkldnn_convolution")


@pytest.mark.parametrize("shape", [(300, 96), (2, 150, 96), (2, 12, 13, 96), (1, 2, 3, 4, 96)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_convolution_gives_the_linear_values_for_every_rank(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g), torch.randn(40, 96, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    got = linear_as_convolution(x, w, b)
    assert got.shape == (*shape[:-1], 40) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_the_mode_routes_large_float32_cpu_linears_only():
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(96, 40)
    big, few = torch.randn(2, 16, 16, 96, generator=g), torch.randn(16, 96, generator=g)
    with LinearsThroughOneDnn():
        assert _convolutions(lambda: layer(big)) == 1
        assert _convolutions(lambda: F.linear(input=big, weight=layer.weight, bias=layer.bias)) == 1
        assert _convolutions(lambda: layer(few)) == 0  # a classifier's rows: the BLAS
        assert _convolutions(lambda: layer.double()(big.double())) == 0
        torch.testing.assert_close(layer.float()(big), F.linear(big, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert _convolutions(lambda: layer(big)) == 0  # only while the mode is active


def test_hooks_fire_and_gradients_flow_through_the_route():
    torch.manual_seed(0)
    layer = nn.Linear(96, 40)
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(4, 10, 10, 96, requires_grad=True)
    want = torch.autograd.grad(layer(x).square().sum(), [x, layer.weight])
    with cpu_linears("cpu"):
        got = torch.autograd.grad(layer(x).square().sum(), [x, layer.weight])
    assert seen == [torch.Size([4, 10, 10, 40])] * 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def _convnext() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    for m in model.modules():  # layer scales away from their 1e-6 start, so the pointwise layers count
        if hasattr(m, "layer_scale"):
            m.layer_scale.data.fill_(0.5)
    return model


@pytest.mark.parametrize("name, method", [("eager", "gradcam"), ("eager", "occlusion"), ("pt2", "gradcam")])
def test_the_torch_backends_run_convnext_linears_through_onednn_with_the_same_maps(name, method, tmp_path):
    """The eager backend's linear layers, and the aten.linear calls of a .pt2 program (TorchScript runs its
    graph in C++, where no Python mode reaches)."""
    model = _convnext()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    select = lambda logits: torch.tensor([[3, 1], [5, 0]])  # noqa: E731
    backend = open_backend(name, source_of(copy.deepcopy(model), size=(64, 64)), tmp_path, fold=True)
    options = {"window": 32, "stride": 32} if method == "occlusion" else {}

    def run():
        return get_method(method).run(backend, x, select, tap="features", options=options)

    fast = _convolutions(run)
    got, out = run()
    backend._cpu_linears = False  # the BLAS, for the reference
    slow = _convolutions(run)
    want, out_want = run()
    if name == "eager" and method == "gradcam":  # one forward of the trunk: at 64 px only the first stage's maps (2 x 16 x 16 rows)
        assert fast - slow == 6  # reach MIN_ROWS: its 3 blocks, 2 pointwise layers each
    assert fast > slow > 0
    assert want.abs().max() > 0
    torch.testing.assert_close(out.logits, out_want.logits, rtol=1e-4, atol=1e-4 * out_want.logits.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


class Pointwise(nn.Module):
    """ConvNeXt's pattern: a linear layer on (N, H, W, C), then a classifier on pooled vectors."""

    def __init__(self):
        super().__init__()
        self.conv, self.pw, self.fc = nn.Conv2d(3, 96, 3, padding=1), nn.Linear(96, 96), nn.Linear(96, 3)

    def forward(self, x):
        x = self.pw(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x.mean((2, 3)))


def test_the_limit_has_a_onednn_variant_only_for_a_model_whose_linears_take_that_route():
    from camshaft.bench.limits import forward_limits
    from camshaft.bench.report import _limit_variants

    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    attrs = {"model": "m"}
    with_pointwise = forward_limits(Pointwise().eval(), x, dtype=torch.float32, onnx_path=None, key="p", attrs=attrs)
    classifier = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(1), nn.Linear(8 * 14 * 14, 3)).eval()  # 2 rows
    classifier_only = forward_limits(classifier, x, dtype=torch.float32, onnx_path=None, key="c", attrs=attrs)
    variants = {w.key.rsplit("/", 1)[-1] for w in with_pointwise}
    assert "cl_onednn" in variants and "cl_onednn" not in {w.key.rsplit("/", 1)[-1] for w in classifier_only}
    onednn = next(w for w in with_pointwise if w.key.endswith("/cl_onednn"))
    channels_last = next(w for w in with_pointwise if w.key.endswith("/channels_last"))
    assert _convolutions(onednn.fn) > _convolutions(channels_last.fn)
    figures = [{"role": "limit", "variant": "cl_onednn"}]
    assert _limit_variants(figures)[-1] == "cl_onednn" and "cl_onednn" not in _limit_variants([])


def test_a_converted_torchscript_file_runs_its_linear_calls_through_onednn(tmp_path):
    """A file from elsewhere becomes a graph of ATen calls (``aten.linear``), which take the route too."""
    import warnings

    from camshaft.models.sources import resolve_model

    torch.manual_seed(0)
    model = Pointwise().eval()
    path = tmp_path / "pw.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated upstream
        torch.jit.trace(model, torch.zeros(1, 3, 16, 16)).save(str(path))
        source = resolve_model(path, preprocess={"input_size": (16, 16), "mean": (0.0,) * 3, "std": (1.0,) * 3})
        backend = open_backend("eager", source, tmp_path / "work", fold=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fast = _convolutions(lambda: backend.forward(x))
    got = backend.forward(x).logits
    backend._cpu_linears = False
    assert fast == _convolutions(lambda: backend.forward(x)) + 1  # the pointwise layer: 2 x 16 x 16 rows
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)
