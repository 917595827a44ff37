"""The inductor backend: the eager model's forward and trunk compiled by TorchInductor, weights frozen in.

Its results must be the eager backend's (within float tolerance: batch norms folded, other kernels),
batches smaller than the compiled one padded rather than compiled again, and what it cannot do refused
before any work.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision

import camshaft
from camshaft.bench import limits
from camshaft.demo.shapes import write_demo_dataset
from camshaft.engine.backends import compiled as compiled_module
from camshaft.engine.backends.compiled import Compiled, check_compiler
from camshaft.engine.methods import get_method
from camshaft.errors import ConfigError
from camshaft.exporters import export_prepared
from camshaft.models.prepared import prepare_model
from camshaft.models.sources import ModelSource
from conftest import Untraceable, fixed, open_backend, randn, source_of


def _compiler_missing() -> str | None:
    try:
        check_compiler(torch.device("cpu"))
    except ConfigError as e:
        return str(e)
    return None


pytestmark = pytest.mark.skipif(_compiler_missing() is not None, reason=f"{_compiler_missing()}")

SIZE = (32, 32)


@pytest.fixture(scope="module")
def net():
    """resnet18 with 10 classes, its batch norms given running statistics (folding them must matter)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, *SIZE) * 2 + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def backends(net, tmp_path_factory):
    """The eager and inductor backends on copies of one model, tapped at layer3 and layer4."""
    out = {}
    for name in ("eager", "inductor"):
        source = source_of(copy.deepcopy(net), size=SIZE)
        out[name] = open_backend(name, source, tmp_path_factory.mktemp(name), taps=["layer3", "layer4"])
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_forward_and_taps_match_eager(backends):
    x = randn(4, 3, *SIZE, seed=1)
    eager, compiled = backends["eager"].forward(x), backends["inductor"].forward(x)
    _close(compiled.logits, eager.logits)
    assert set(compiled.taps) == {"layer3", "layer4"}
    for tap in compiled.taps:
        _close(compiled.taps[tap], eager.taps[tap])


# occlusion: 4 images x 9 windows, 16 (image, window) pairs a forward: batches of 16, 16 and 4 (padded to 16)
# after the unoccluded batch of 4
OCCLUSION = {"window": 16, "stride": 8, "positions_per_forward": 16}


@pytest.mark.parametrize("method,tap,options", [("cam", "layer4", {}), ("gradcam", "layer4", {}),
                                                ("gradcam", "layer3", {}), ("saliency", None, {}),
                                                ("occlusion", None, OCCLUSION)])
def test_methods_match_eager(backends, method, tap, options):
    x = randn(4, 3, *SIZE, seed=2)
    targets = fixed([[1, 2], [3, 4], [0, 9], [5, 5]])
    maps = {name: get_method(method).run(b, x, targets, tap=tap, options=options)[0] for name, b in backends.items()}
    assert maps["eager"].abs().max() > 0
    _close(maps["inductor"], maps["eager"])


def test_a_model_fx_cannot_trace_runs_compiled_around_its_graph_break(tmp_path):
    x = randn(3, 3, 8, 8, seed=5)
    maps = {}
    for name in ("eager", "inductor"):
        torch.manual_seed(0)
        backend = open_backend(name, source_of(Untraceable()), tmp_path / name)
        maps[name] = [get_method(m).run(backend, x, fixed([[0, 2]] * 3), tap="features")[0] for m in ("cam", "gradcam")]
    for got, expected in zip(maps["inductor"], maps["eager"], strict=True):
        _close(got, expected)


def test_a_pt2_program_compiles_and_gives_the_pt2_backends_maps(net, tmp_path):
    source = source_of(copy.deepcopy(net), size=SIZE)
    path = export_prepared(prepare_model(source, taps=["layer4"]), format="pt2", out=tmp_path / "m.pt2", head=True)
    file = ModelSource("pt2", str(path), path=path)
    pt2, compiled = (open_backend(name, file, tmp_path / name) for name in ("pt2", "inductor"))
    assert compiled.name == "inductor" and isinstance(compiled._full, Compiled)
    x = randn(3, 3, *SIZE, seed=6)
    targets = fixed([[1, 2], [3, 4], [0, 9]])
    for method, tap in (("cam", "layer4"), ("gradcam", "layer4"), ("saliency", None)):
        expected = get_method(method).run(pt2, x, targets, tap=tap)[0]
        assert expected.abs().max() > 0
        _close(get_method(method).run(compiled, x, targets, tap=tap)[0], expected)


def test_a_smaller_batch_is_padded_and_a_larger_one_compiled(net):
    model = copy.deepcopy(net).to(memory_format=torch.channels_last)
    compiled = Compiled(model)
    x = randn(6, 3, *SIZE, seed=3).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        _close(compiled(x[:4]), expected[:4])
        assert (compiled.batch, compiled.compilations) == (4, 1)
        small = compiled(x[:3])  # padded to 4 with a zero image, cut back to 3
        assert small.shape == (3, 10) and compiled.compilations == 1
        _close(small, expected[:3])
        _close(compiled(x), expected)  # a larger batch: compiled for 6, then serving 1..6
        assert (compiled.batch, compiled.compilations) == (6, 2)
        _close(compiled(x[4:]), expected[4:])
        assert compiled.compilations == 2


def test_a_padded_batch_out_of_memory_is_compiled_at_its_own_size():
    calls = []

    def fake(x):  # as if the device held 4 images at most
        calls.append(x.shape[0])
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("out of memory")
        return x * 2

    compiled = Compiled(fake)
    compiled._compiled = fake
    x = torch.arange(8.0).view(8, 1)
    with torch.no_grad():
        compiled.sizes = [8]  # compiled for 8 earlier, before the device filled up
        torch.testing.assert_close(compiled(x[:3]), x[:3] * 2)  # 8 padded: out of memory; then 3 as they are
        assert calls == [8, 3] and (compiled.batch, compiled.compilations) == (3, 1)
        torch.testing.assert_close(compiled(x[:2]), x[:2] * 2)  # padded to 3 from now on
        assert calls == [8, 3, 3]


def test_a_batch_size_that_keeps_coming_back_at_under_half_a_compiled_one_gets_its_own_graph():
    calls = []

    def fake(x):
        calls.append(x.shape[0])
        return x * 2

    compiled = Compiled(fake)
    compiled._compiled = fake
    x = torch.arange(64.0).view(64, 1)
    with torch.no_grad():
        for n in (32, 64, 40, 20, 5):  # compiled for 32 and 64; 40 and 20 padded (up to half wasted); 5 once
            torch.testing.assert_close(compiled(x[:n]), x[:n] * 2)
        assert calls == [32, 64, 64, 32, 32] and compiled.sizes == [32, 64]
        for _ in range(3):  # 2 images with every batch (a method's own forward): padded twice, then its own graph
            compiled(x[:2])
        assert calls[-3:] == [32, 32, 2] and compiled.sizes == [2, 32, 64] and compiled.compilations == 3
        compiled.sizes = [1, 2, 3, 64]  # at most MAX_SIZES sizes: then padded whatever the waste
        for _ in range(4):
            compiled(x[:10])
        assert calls[-4:] == [64] * 4 and compiled.sizes == [1, 2, 3, 64]
        compiled(x[:40].repeat(2, 1))  # a larger batch than any still compiles
        assert compiled.sizes[-1] == 80


def test_each_compiled_forward_has_its_own_graphs_past_dynamos_recompile_limit():
    """Dynamo counts graphs per code object, up to 8, then runs the code uncompiled without a word: every model,
    tap trunk and batch size of a process compiled the same function."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    x = torch.randn(2, 4)
    with torch.inference_mode():
        for i in range(limit + 2):
            torch.manual_seed(i)
            layer = torch.nn.Linear(4, 3)
            for grid in (False, True):
                compiled = Compiled(layer, grid_linears=grid)
                torch.testing.assert_close(compiled(x), layer(x))
    assert counters["frames"]["ok"] == 2 * (limit + 2), dict(counters["frames"])


class _GridLinear(torch.nn.Module):
    """A ConvNeXt-like pointwise layer: a linear over the channels of an (N, h, w, C) grid, then a classifier."""

    def __init__(self):
        super().__init__()
        self.conv, self.pointwise, self.fc = torch.nn.Conv2d(3, 48, 1), torch.nn.Linear(48, 96), torch.nn.Linear(96, 5)

    def forward(self, x):
        a = self.pointwise(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(a.mean((2, 3)))


def _op_calls(fn, x) -> dict[str, int]:
    with torch.profiler.profile() as prof:
        fn(x)
    return {e.key: e.count for e in prof.key_averages()}


def test_grid_linears_compile_as_onednn_convolutions():
    """The pointwise layer (512 rows of 48 values) runs as a convolution; the classifier (2 rows) stays a matmul."""
    torch.manual_seed(0)
    model = _GridLinear().eval().to(memory_format=torch.channels_last)
    x = randn(2, 3, 16, 16, seed=8).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        routed, plain = Compiled(model, grid_linears=True), Compiled(model)
        _close(routed(x), expected)
        _close(plain(x), expected)
        calls = _op_calls(routed, x), _op_calls(plain, x)
    assert [c.get("aten::addmm", 0) for c in calls] == [1, 2]
    assert [c.get("aten::mkldnn_convolution", 0) for c in calls] == [2, 1]


def test_a_compiled_forward_refuses_autograd(net):
    compiled = Compiled(copy.deepcopy(net))
    with pytest.raises(RuntimeError, match="without autograd"):
        compiled(torch.randn(1, 3, *SIZE))


def test_what_it_cannot_do_is_refused_before_any_work(net, tmp_path, monkeypatch):
    source = source_of(copy.deepcopy(net), size=SIZE)
    with pytest.raises(ConfigError, match="not inductor"):
        open_backend("inductor", source, tmp_path, cuda_graphs=True)
    path = export_prepared(prepare_model(source, taps=["layer4"]), format="torchscript", out=tmp_path / "m.pt")
    file = ModelSource("torchscript", str(path), path=path)
    with pytest.raises(ConfigError, match="compiles a torch model or a .pt2 program.*--backend torchscript"):
        open_backend("inductor", file, tmp_path)

    def missing():
        raise RuntimeError("no compiler found")

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", missing)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*no compiler found"):
        open_backend("inductor", source, tmp_path)
    with pytest.raises(ConfigError, match="invalid explain job: .*needs a C\\+\\+ compiler"):
        camshaft.explain(None, tmp_path, out=tmp_path / "out", backend="inductor", progress=False)
    assert not (tmp_path / "out").exists()
    assert compiled_module.check_compiler is check_compiler  # the same check the bench's limit uses


def test_the_bench_limit_has_the_compiled_forward_when_the_backend_is_benched(net):
    x = randn(2, 3, *SIZE, seed=4)
    plain = limits.frozen_copy(net)
    work = limits.forward_limits(plain, x, dtype=torch.float32, onnx_path=None, key="k", attrs={}, compiled=True)
    by_key = {w.key: w for w in work}
    inductor = by_key["k/limit/inductor"]
    assert inductor.role == "limit" and inductor.attrs["variant"] == "inductor"
    inductor.fn()  # runs (compiled when the workload was built)
    alone = limits.forward_limits(plain, x, dtype=torch.float32, onnx_path=None, key="k", attrs={})
    assert "k/limit/inductor" not in {w.key for w in alone}


def test_a_run_with_a_partial_last_batch_matches_eager(tmp_path):
    images = write_demo_dataset(tmp_path / "data", n=5, seed=0).parent / "images"
    fast = {"scheduler": "sync", "workers": 1, "progress": False, "batch_size": 2, "targets": "top:2"}
    maps = {}
    for backend in ("eager", "inductor"):
        camshaft.explain(None, images, out=tmp_path / backend, method="gradcam", backend=backend, **fast)
        results = camshaft.load_results(tmp_path / backend)
        assert results.attrs["backend"] == backend
        maps[backend] = np.asarray(results.maps)
    assert maps["eager"].shape[0] == 5 and np.abs(maps["eager"]).max() > 0
    np.testing.assert_allclose(maps["inductor"], maps["eager"], rtol=1e-4, atol=1e-4 * np.abs(maps["eager"]).max())


def test_the_bench_opens_it_on_its_own_copy_of_the_model(tmp_path):
    """The backend lays its model's weights out channels-last: the limits and peers must not get that layout."""
    from camshaft.bench.runner import ModelBench
    from camshaft.bench.settings import BenchSettings

    settings = BenchSettings(models=("demo",), backends=("inductor",), input_size=(64, 64), peers=False)
    mb = ModelBench("demo", settings, tmp_path, log=lambda message: None)

    def weights(module):
        return [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]

    assert mb.backends["inductor"].name == "inductor"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights(mb.backends["inductor"].module))
    assert weights(mb.source.module) and all(p.is_contiguous() for p in weights(mb.source.module))


def test_cluster_workers_rebuild_the_model_and_compile_it_themselves(tmp_path):
    distributed = pytest.importorskip("distributed")
    images = write_demo_dataset(tmp_path / "data", n=6, seed=5).parent / "images"
    options = {"targets": "top:2", "partition_size": 3, "batch_size": 2, "progress": False}
    camshaft.explain(None, images, out=tmp_path / "local", backend="eager", scheduler="sync", **options)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster:
        summary = camshaft.explain(None, images, out=tmp_path / "cluster", backend="inductor",
                                   scheduler=cluster.scheduler_address, **options)
    assert (summary.explained, summary.failed) == (6, 0)
    local, remote = (np.asarray(camshaft.load_results(tmp_path / name).maps) for name in ("local", "cluster"))
    np.testing.assert_allclose(remote, local, rtol=1e-4, atol=1e-4 * np.abs(local).max())


def test_a_run_compiles_its_graph_once_before_the_clock_starts(tmp_path):
    """The start-up probe runs a full batch, so the first partition does not compile; the decoded batches
    (normal tensors) and the probe's (made under inference mode) must not compile one graph each; the last,
    smaller batch is padded."""
    from torch._dynamo.utils import counters

    images = write_demo_dataset(tmp_path / "data", n=6, seed=5).parent / "images"
    torch._dynamo.reset()
    counters.clear()
    summary = camshaft.explain(None, images, out=tmp_path / "out", backend="inductor", method="cam", batch_size=4,
                               partition_size=4, scheduler="sync", workers=1, progress=False)
    assert (summary.explained, summary.failed) == (6, 0)
    assert counters["stats"]["unique_graphs"] == 1


def test_a_run_of_fewer_images_than_a_batch_compiles_for_those_images(tmp_path, monkeypatch):
    """A single image (or a nightly delta of a few) must not compile for, and pad to, a whole --batch-size."""
    sizes = []
    original = Compiled.__call__

    def spy(self, x):
        out = original(self, x)
        sizes.append(list(self.sizes))
        return out

    monkeypatch.setattr(Compiled, "__call__", spy)
    images = write_demo_dataset(tmp_path / "data", n=3, seed=5).parent / "images"
    summary = camshaft.explain(None, images, out=tmp_path / "out", backend="inductor", method="cam", batch_size=32,
                               scheduler="sync", workers=1, progress=False)
    assert (summary.explained, summary.failed) == (3, 0)
    assert sizes and all(s == [3] for s in sizes), sizes


ARCHITECTURES = {  # torchvision architectures and a size each runs at; ViT's tap does not split (eager gradients)
    "mobilenet_v3_large": 64, "efficientnet_b0": 64, "convnext_tiny": 64, "swin_t": 64, "densenet121": 64,
    "regnet_y_400mf": 64, "vit_b_16": 224,
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_torchvision_architectures_compile_to_the_eager_results(arch, tmp_path):
    size = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    with torch.no_grad():
        for layer in model.modules():  # ViT's classifier starts at zero: no class would have a gradient
            if isinstance(layer, torch.nn.Linear) and not layer.weight.any():
                layer.weight.normal_(0, 0.02)
    x = randn(2, 3, size, size, seed=7)
    out, maps = {}, {}
    for name in ("eager", "inductor"):
        backend = open_backend(name, source_of(copy.deepcopy(model), size=(size, size)), tmp_path / name)
        out[name] = backend.forward(x)
        maps[name] = get_method("gradcam").run(backend, x, fixed([[1, 2], [3, 4]]), tap=backend.info.taps[0])[0]
    _close(out["inductor"].logits, out["eager"].logits)
    for tap, expected in out["eager"].taps.items():
        _close(out["inductor"].taps[tap], expected)
    assert maps["eager"].abs().max() > 0
    _close(maps["inductor"], maps["eager"])


def test_a_gpu_without_triton_or_a_c_compiler_is_refused(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: False)
    with pytest.raises(ConfigError, match="needs Triton"):
        check_compiler(cuda)
    monkeypatch.setattr("torch.utils._triton.has_triton", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C compiler for Triton"):
        check_compiler(cuda)
    monkeypatch.setenv("CC", "/usr/bin/cc")
    check_compiler(cuda)  # Triton and a compiler: no objection
