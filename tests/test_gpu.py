"""The CUDA paths: the same results on the GPU as on the CPU, and mixed precision close to float32.

Marked ``gpu``: the default run skips them, and they skip themselves where no CUDA device is
present. Run them with ``python -m pytest -m gpu`` on a machine with a GPU (``scripts/gpu_check.sh``
runs them with the GPU benchmarks). ``CAMSHAFT_TEST_DEVICE=cpu python -m pytest -m gpu`` runs the
same tests with the CPU in the GPU's place: that checks the tests themselves, not CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import camshaft
from camshaft.demo.shapes import write_demo_dataset
from camshaft.engine.actmax import RenderConfig, channel, class_logit, class_prob, direction, render
from camshaft.engine.backends.base import TAP_GRADIENTS, backend_factory
from camshaft.engine.methods import check_backend, get_method, method_names
from camshaft.engine.targets import Targets
from camshaft.errors import CapabilityError, ConfigError
from camshaft.models.sources import resolve_model

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("CAMSHAFT_TEST_DEVICE", "cuda")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("no CUDA device (CAMSHAFT_TEST_DEVICE=cpu runs these tests on the CPU)", allow_module_level=True)

METHODS = {  # what each backend serves (ONNX Runtime: no input gradients)
    "eager": ["cam", "gradcam", "occlusion", "saliency"],
    "inductor": ["cam", "gradcam", "occlusion", "saliency"],  # compiled for the device it runs on (Triton on CUDA)
    "torchscript": ["cam", "gradcam", "occlusion", "saliency"],
    "pt2": ["cam", "gradcam", "occlusion"],
    "onnxruntime": ["cam", "gradcam", "occlusion"],
}


TARGETS = "0,3"  # fixed classes: a top-k list could reorder near-ties between devices


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), n=12, seed=5).parent / "images"


def _explain(data, out, methods, **kw):
    camshaft.explain(None, data, out=out, method=methods, targets=TARGETS, scheduler="sync", batch_size=8,
                     progress=False, **kw)
    return {m: camshaft.load_results(out / m) for m in methods}


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """The largest difference between two stacks of maps, relative to each map's largest magnitude."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = np.abs(b).max(axis=(-2, -1), keepdims=True) + 1e-12
    return float((np.abs(a - b) / scale).max())


@pytest.fixture(scope="module")
def on_cpu(data, tmp_path_factory):
    """The CPU's float32 results, per backend, for the device runs to match."""
    cache = {}

    def get(backend):
        if backend not in cache:
            cache[backend] = _explain(data, tmp_path_factory.mktemp(f"cpu-{backend}"), METHODS[backend],
                                      backend=backend, device="cpu")
        return cache[backend]

    return get


@pytest.fixture
def no_tf32():
    """Float32 on the GPU as on the CPU: TF32 convolutions and matrix products (on by default for
    cuDNN) round to about 1e-3, which input gradients amplify (saliency then differs by ~4e-2)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("backend", list(METHODS))
def test_every_backend_on_the_device_gives_the_cpus_maps(backend, data, on_cpu, tmp_path, no_tf32):
    cuda = DEVICE.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        got = _explain(data, tmp_path / "run", METHODS[backend], backend=backend, device=DEVICE)
        wanted = on_cpu(backend)
    except ConfigError as e:
        if backend == "onnxruntime" and "needs onnxruntime-gpu" in str(e):
            pytest.skip(f"ONNX Runtime has no CUDA provider here: {e}")
        if backend == "inductor" and ("needs Triton" in str(e) or "compiler" in str(e)):
            pytest.skip(f"TorchInductor cannot generate code here: {e}")
        raise
    for method, want in wanted.items():
        assert (got[method].table["status"] == "ok").all()
        top1 = [r.table["top5_classes"].map(lambda c: c[0]).tolist() for r in (got[method], want)]
        assert top1[0] == top1[1]  # the same predicted classes
        error = _relative_error(got[method].maps[:], want.maps[:])
        # saliency is an input gradient through ReLUs: a unit whose input sits at zero may switch
        # on one device and not the other (H200 vs CPU, TF32 off: 8e-3; every other method < 5e-3)
        assert error < (2e-2 if method == "saliency" else 5e-3), f"{method}: {error:.2e}"
    assert not cuda or torch.cuda.max_memory_allocated() > 0  # the work ran on the GPU


def test_onnx_runtime_reads_and_writes_device_tensors_in_place(tmp_path, no_tf32):
    """After the first batch of a shape, the session is bound to tensors on the device (I/O binding):
    no copy through the host, and the same numbers as the CPU's session."""
    source = resolve_model("demo")
    open_ = lambda device: backend_factory("onnxruntime")(  # noqa: E731
        source, taps=None, preprocess={}, device=torch.device(device), dtype=torch.float32, workdir=tmp_path / device)
    try:
        backend = open_(DEVICE)
    except ConfigError as e:
        if "needs onnxruntime-gpu" in str(e):
            pytest.skip(f"ONNX Runtime has no CUDA provider here: {e}")
        raise
    cpu = open_("cpu")
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(8, 3, *source.preprocess.input_size, generator=g) for _ in range(3)]
    got = [backend.forward(x.to(DEVICE)) for x in batches]  # the first teaches the shapes, the others are bound
    assert backend._shapes
    for x, out in zip(batches, got, strict=True):
        want = cpu.forward(x)
        assert out.logits.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(out.logits.cpu(), want.logits, rtol=1e-3, atol=1e-4)
        for tap, a in want.taps.items():
            torch.testing.assert_close(out.taps[tap].cpu(), a, rtol=1e-3, atol=1e-4)
    select = Targets.parse("top:2").selector()
    grads = [backend.tap_gradients(batches[0].to(DEVICE), select) for _ in range(2)]
    want = cpu.tap_gradients(batches[0], select)
    for tap, w in want.grads.items():
        torch.testing.assert_close(grads[1].grads[tap].cpu(), w, rtol=1e-3, atol=1e-5)


def test_partitions_sharing_the_device_give_what_one_partition_at_a_time_gives(data, tmp_path, no_tf32):
    """Concurrent partitions queue batches while earlier results are still on their way to the host
    (pinned copies, collected a batch later), and images come from worker processes on a GPU."""
    methods = ["cam", "gradcam"]
    one = _explain(data, tmp_path / "sync", methods, device=DEVICE)
    kw = dict(method=methods, targets=TARGETS, batch_size=2, partition_size=3, progress=False, device=DEVICE)
    summary = camshaft.explain(None, data, out=tmp_path / "threads", decode="processes", **kw)
    assert summary.decoding.endswith("processes") and summary.ok == 12
    for m in methods:
        got = camshaft.load_results(tmp_path / "threads" / m)
        assert [list(c) for c in got.table["top5_classes"]] == [list(c) for c in one[m].table["top5_classes"]]
        np.testing.assert_allclose(got.maps[:], one[m].maps[:], rtol=1e-4, atol=1e-5)


def test_jpegs_decoded_on_the_device_match_pillows_and_give_the_same_explanations(data, tmp_path, no_tf32):
    """--decode device: nvJPEG (on a GPU) and the resize there, against Pillow on the CPU."""
    from camshaft.data.workers import Decoder, decode_resized
    from camshaft.preprocess import Preprocess

    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    pre = Preprocess((64, 64))
    decoder = Decoder("device", 2, device=DEVICE)
    read = list(decoder.map(paths, pre))
    assert paths and all(r.encoded is not None for r in read)
    for path, r in zip(paths, decoder.finish(paths, read, pre), strict=True):
        assert r.pixels.device.type == torch.device(DEVICE).type
        diff = np.abs(r.pixels.cpu().numpy().astype(int) - decode_resized(path, pre).pixels)
        # nvJPEG's IDCT and colour conversion differ from libjpeg-turbo's by a few levels
        assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8, (path, diff.mean(), diff.max())
    kw = dict(method="gradcam", targets=TARGETS, batch_size=4, partition_size=6, progress=False, device=DEVICE)
    summary = camshaft.explain(None, data, out=tmp_path / "device", decode="device", **kw)
    assert summary.ok == 12 and summary.stages["decoding_on_device"] > 0
    camshaft.explain(None, data, out=tmp_path / "threads", decode="threads", **kw)
    got, want = (camshaft.load_results(tmp_path / d) for d in ("device", "threads"))
    assert [c[0] for c in got.table["top5_classes"]] == [c[0] for c in want.table["top5_classes"]]
    assert _relative_error(got.maps[:], want.maps[:]) < 0.1  # inputs a few levels apart


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_maps_stay_close_to_float32(dtype, data, tmp_path):
    methods = ["cam", "gradcam"]
    full = _explain(data, tmp_path / "fp32", methods, device=DEVICE)
    half = _explain(data, tmp_path / dtype, methods, device=DEVICE, dtype=dtype)
    for m in methods:
        assert (half[m].table["status"] == "ok").all()
        error = _relative_error(half[m].maps[:], full[m].maps[:])
        # bfloat16 keeps 8 bits of mantissa; no difference at all would mean autocast never engaged
        assert 0 < error < (0.05 if dtype == "float16" else 0.15), (m, error)


@pytest.mark.parametrize("backend_name", ["eager", "torchscript"])
@pytest.mark.parametrize("method", method_names())
def test_a_batchs_explanation_never_waits_for_the_device(method, backend_name, tmp_path):
    """Nothing in a method reads the GPU back or copies to it from pageable memory (CUDA's sync
    debug mode raises): the host queues a batch's work while the GPU runs the one before."""
    source = resolve_model("demo")
    backend = backend_factory(backend_name)(source, taps=None, preprocess={}, device=torch.device(DEVICE),
                                            dtype=torch.float32, workdir=tmp_path, fold=True)
    m = get_method(method)
    tap = (backend.info.cam_tap if method == "cam" else backend.info.taps[-1]) if m.uses_tap else None
    try:
        check_backend(m, backend, tap=tap)
    except CapabilityError as e:
        pytest.skip(str(e))
    x = torch.randn(4, 3, *source.preprocess.input_size, device=DEVICE)
    for select in (Targets.parse("top:2").selector(), Targets.parse("0,3").selector()):
        for _ in range(2):  # first calls: cuDNN, allocator, the classes' copy, TorchScript's optimizing runs
            m.run(backend, x, select, tap=tap)
        if method == "scorecam":  # one wait a batch, allowed: the count of its non-constant channels, on the host
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                _set_sync_debug_mode("warn")
                try:
                    maps, _ = m.run(backend, x, select, tap=tap)
                finally:
                    _set_sync_debug_mode(0)
            waits = [w for w in seen if "synchroniz" in str(w.message)]
            assert len(waits) <= 1, [str(w.message) for w in waits]
        else:
            _set_sync_debug_mode("error")
            try:
                maps, _ = m.run(backend, x, select, tap=tap)
            finally:
                _set_sync_debug_mode(0)
        assert maps.shape[:2] == (4, 2)


@pytest.mark.parametrize("targets", ["top:2", "0,3", "label"])
def test_a_pipeline_queues_its_batches_without_waiting_for_the_device(targets, data, tmp_path, monkeypatch):
    """Queuing a batch (its upload, normalisation, methods and copies back) never waits for the GPU,
    so a batch is queued while the one before still runs; only collecting a batch waits for it."""
    from camshaft.engine.explainer import Explainer

    launch, calls = Explainer._launch, []

    def strict(self, batch, **kw):
        calls.append(len(batch))
        _set_sync_debug_mode("error" if len(calls) > 1 else 0)  # the first batch: allocator, cuDNN, copies made once
        try:
            return launch(self, batch, **kw)
        finally:
            _set_sync_debug_mode(0)

    monkeypatch.setattr(Explainer, "_launch", strict)
    exemplars = ("features",) if targets == "top:2" else ()  # the dataset's top images per channel, same pass
    camshaft.explain(None, data, out=tmp_path / "run", method=["cam", "gradcam"], targets=targets, scheduler="sync",
                     batch_size=4, device=DEVICE, labels_from_folders=True, exemplars=exemplars, progress=False)
    assert len(calls) >= 3
    results = camshaft.load_results(tmp_path / "run" / "gradcam")
    assert (results.table["status"] == "ok").all()


needs_cuda = pytest.mark.skipif(not DEVICE.startswith("cuda"), reason="CUDA graphs need a CUDA device")


@needs_cuda
@pytest.mark.parametrize("backend", ["eager", "torchscript", "pt2"])
def test_cuda_graphs_replay_the_same_forward_and_tap_gradients(backend, tmp_path, no_tf32):
    """Per input shape one graph, kept; outputs a caller holds survive later replays."""
    kw = dict(taps=None, preprocess={}, device=torch.device(DEVICE), dtype=torch.float32, fold=True)
    plain = backend_factory(backend)(resolve_model("demo"), workdir=tmp_path / "plain", **kw)
    source = resolve_model("demo")  # a model of its own: the eager backend moves and lays out the one it opens
    graphed = backend_factory(backend)(source, workdir=tmp_path / "graphed", cuda_graphs=True, **kw)
    assert set(graphed.graphs) == ({"full", "trunk"} if TAP_GRADIENTS in graphed.capabilities else {"full"})
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, *source.preprocess.input_size, generator=g).to(DEVICE) for n in (8, 3, 8)]
    select = Targets.parse("0,2").selector()
    held = []
    for x in batches:
        want, got = plain.forward(x), graphed.forward(x)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
        for tap in want.taps:
            torch.testing.assert_close(got.taps[tap], want.taps[tap], rtol=1e-4, atol=1e-4)
        held.append((got.logits, want.logits))
        if "trunk" in graphed.graphs:
            want, got = plain.tap_gradients(x, select), graphed.tap_gradients(x, select)
            for tap in want.grads:
                torch.testing.assert_close(got.grads[tap], want.grads[tap], rtol=1e-4, atol=1e-5)
    for got, want in held:  # the first batch's logits were not overwritten by the later replays
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert graphed.graphs["full"].captures == 2  # batch 8 replayed its graph the second time


@needs_cuda
def test_scorecam_chunks_replay_one_graph_under_cuda_graphs(tmp_path, no_tf32):
    """Score-CAM's last chunk (live channels modulo masks_per_forward) varies by batch; padded, it replays the
    graph of the full chunks: two graphs in all (the batch, the chunk), whatever the batches."""
    kw = dict(taps=None, preprocess={}, device=torch.device(DEVICE), dtype=torch.float32, fold=True)
    graphed = backend_factory("eager")(resolve_model("demo"), workdir=tmp_path, cuda_graphs=True, **kw)
    g = torch.Generator().manual_seed(1)
    select = Targets.parse("0").selector()
    for scale in (1.0, 3.0, 0.3, 2.0):
        x = (scale * torch.randn(4, 3, *graphed.info.preprocess.input_size, generator=g)).to(DEVICE)
        get_method("scorecam").run(graphed, x, select, tap=graphed.info.taps[-1], options={"masks_per_forward": 7})
    assert graphed.graphs["full"].captures == 2


@needs_cuda
def test_explain_with_cuda_graphs_gives_the_same_maps(data, tmp_path, no_tf32):
    methods = ["cam", "gradcam", "occlusion"]
    want = _explain(data, tmp_path / "plain", methods, device=DEVICE)
    got = _explain(data, tmp_path / "graphed", methods, device=DEVICE, cuda_graphs=True)
    for m in methods:
        assert (got[m].table["status"] == "ok").all()
        assert _relative_error(got[m].maps[:], want[m].maps[:]) < 1e-4, m


@pytest.fixture(scope="module")
def demo_model():
    source = resolve_model("demo")
    return source.module, source.preprocess.replace(input_size=(48, 48))


def test_actmax_on_the_device_follows_the_cpu(demo_model):
    """The same seeds draw the same noise and transforms on every device; the first steps agree
    to rounding (gradient ascent amplifies rounding later, and Adam's first step is about the sign
    of each gradient)."""
    model, pre = demo_model
    objectives = [class_logit(0), class_logit(3)]
    runs = [render(model, objectives, preprocess=pre, config=RenderConfig(steps=2, device=d, exact=True))
            for d in ("cpu", DEVICE)]
    torch.testing.assert_close(runs[1].losses, runs[0].losses, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(runs[1].images, runs[0].images, rtol=0, atol=1e-2)
    assert next(model.parameters()).device.type == DEVICE.split(":")[0]  # render moved the model


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_actmax_reaches_its_classes_in_every_precision(demo_model, dtype):
    model, pre = demo_model
    objectives = [class_logit(c) for c in range(4)]
    r = render(model, objectives, preprocess=pre,
               config=RenderConfig(steps=128, device=DEVICE, dtype=dtype, exact=False, seed=1))
    assert torch.isfinite(r.losses).all()  # float16's loss scaling kept the gradients finite
    assert r.target_probs.min() > 0.9, r.target_probs.tolist()


def test_an_actmax_step_never_waits_for_the_device(demo_model, monkeypatch):
    """From the second step to the last, nothing in the loop reads the GPU or copies to it from
    pageable memory (CUDA's sync debug mode raises): the host queues steps while the GPU runs."""

    class Strict:  # the loop's progress bar, switching the mode on after the first step
        steps = 0

        def __init__(self, total, **_):
            self.total, self.n = total, 0

        def __enter__(self):
            return self

        def __exit__(self, *_):
            _set_sync_debug_mode(0)
            Strict.steps = self.n

        def update(self, k):
            self.n += k
            _set_sync_debug_mode("error" if self.n < self.total else 0)

    monkeypatch.setattr("tqdm.auto.tqdm", Strict)
    model, pre = demo_model
    objectives = [class_logit(0), channel("features", 3), direction("features", [1.0] * 80), class_prob(2)]
    config = RenderConfig(steps=4, device=DEVICE, exact=False, blur_every=2, l2=1e-3, tv=1e-3, freq=1e-3,
                          copies=2, diversity=0.1, diversity_tap="features", relu_leak_steps=3)
    r = render(model, objectives, preprocess=pre, config=config, progress=True)
    assert Strict.steps == 4  # the loop ran under the bar
    assert torch.isfinite(r.losses).all() and r.losses.shape == (4, 8)


def _set_sync_debug_mode(mode):
    if DEVICE.startswith("cuda"):  # with the CPU in the GPU's place nothing waits: the test runs the loop only
        torch.cuda.set_sync_debug_mode(mode)


def test_bench_runs_on_the_device(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "camshaft", "bench", "--quick", "--device", DEVICE, "--method", "cam", "gradcam",
           "--backend", "eager", "torchscript", "--no-peers", "--json", str(out), "--workdir", str(tmp_path / "w")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["machine"]["device"].startswith(DEVICE.split(":")[0])
    methods = [f for f in report["figures"] if f["role"] == "method"]
    assert methods and all(f["ratio_to_limit"] > 0 for f in methods)


@needs_cuda
def test_a_forward_that_reads_the_device_is_refused_with_the_reason():
    """Last in the file: a failed capture is ended cleanly, but nothing should depend on it."""
    from camshaft.engine.backends.graphs import GraphCaptureError, Graphed

    def reads(x):
        return x * float(x.sum())  # a host read: nothing a graph can record

    with pytest.raises(GraphCaptureError, match="cannot be recorded as a CUDA graph"), torch.inference_mode():
        Graphed(reads)(torch.ones(4, device=DEVICE))
