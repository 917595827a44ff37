"""The bench's limits are upper bounds and its comparisons judge camshaft only (audit of 2026-12-03).

- Multi-forward methods run their copies in larger forwards than the batch: their limit is measured
  at that batch (at batch 1 a forward of one image understated it, and ratios read above 1).
- The input-gradient limit is the best of the model as given and as the eager backend runs it.
- The pipeline is compared by its ratio to the limit, not to its method (which a faster method lowers).
- A model file's raw throughput is compared on the same machine only.
- Duplicate model names, a workdir below a file, and a model file that cannot serve the targets
  are refused before any work (flags that act only with another: ``test_bench.py``).
"""

from __future__ import annotations

import pytest
from conftest import run_cli

from camshaft.bench import BenchSettings, compare, format_table, run_bench
from camshaft.bench.compare import format_comparison
from camshaft.bench.ratios import derive
from camshaft.bench.report import BenchReport
from camshaft.bench.runner import ModelBench, limit_workloads
from camshaft.bench.cases import Group, forward_batch, input_batch
from camshaft.bench.workload import Figure, Workload
from camshaft.errors import ConfigError

G = {"model": "resnet18", "input_size": [224, 224], "batch": 1}


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")


def fig(key, role, seconds, *, images=1, k=1, evaluations=None, **attrs) -> Figure:
    return Figure(key, role, images, images * k, evaluations or images, (seconds,), {**G, "k": k, **attrs})


# --- the forward batch ------------------------------------------------------------------------------


def test_the_forward_batch_follows_each_methods_per_forward_option():
    occlusion = {"window": (32, 32), "stride": (16, 16), "positions_per_forward": 64}
    assert forward_batch("occlusion", occlusion, (224, 224), 1) == 64  # 169 positions, 64 at a time
    assert forward_batch("occlusion", occlusion, (64, 64), 1) == 9  # 3 x 3 positions: all in one forward
    assert forward_batch("occlusion", occlusion, (64, 64), 16) == 64
    assert forward_batch("occlusion", occlusion, (224, 224), 128) == 128  # the clean forward is the largest
    assert forward_batch("scorecam", {"masks_per_forward": 64}, (224, 224), 1, channels=512) == 64
    assert forward_batch("scorecam", {"masks_per_forward": 64}, (224, 224), 1, channels=8) == 8
    smooth = {"samples": 25, "samples_per_forward": 32}
    assert forward_batch("smoothgrad", smooth, (224, 224), 1) == 25  # all 25 samples in one forward
    assert forward_batch("smoothgrad", smooth, (224, 224), 16) == 32  # 2 samples of 16 images
    assert forward_batch("smoothgrad", smooth, (224, 224), 64) == 64  # one sample of each image
    assert forward_batch("gradcam", {}, (224, 224), 16) == 16
    assert forward_batch("saliency", {}, (224, 224), 4) == 4


def test_a_multi_forward_method_is_held_to_the_limit_at_its_forward_batch():
    figures = [
        fig("l/b1", "limit", 1.0, variant="eager"),  # 1 image/s at batch 1
        fig("l/b64/eager", "limit", 16.0, images=64, variant="eager", forward_batch=64),  # 4 images/s
        fig("l/b64/onnx", "limit", 8.0, images=64, variant="onnxruntime", forward_batch=64),  # 8 images/s
        fig("m/occ", "method", 100.0, evaluations=170, method="occlusion", backend="eager", targets="top:1",
            forward_batch=64),  # 1.7 evaluations/s
        fig("m/cam", "method", 0.5, method="cam", backend="eager", targets="top:1", forward_batch=1),
        fig("ib/eager", "input_backward", 32.0, images=64, variant="eager", forward_batch=64),  # 2 images/s
        fig("ib/folded", "input_backward", 16.0, images=64, variant="folded", forward_batch=64),  # 4 images/s
        fig("ib/b1", "input_backward", 2.0, variant="eager"),  # 0.5 images/s at batch 1
        fig("m/smooth", "method", 10.0, evaluations=26, method="smoothgrad", backend="eager", targets="top:1",
            gradient="input", forward_batch=64),
        fig("m/sal", "method", 4.0, method="saliency", backend="eager", targets="top:1", gradient="input",
            forward_batch=1),
    ]
    d = derive(figures)
    assert d["m/occ"]["limit_per_second"] == 8.0 and d["m/occ"]["limit_variant"] == "onnxruntime"
    assert d["m/occ"]["ratio_to_limit"] == pytest.approx(1.7 / 8) and d["m/occ"]["limit_batch"] == 64
    assert d["m/cam"]["ratio_to_limit"] == pytest.approx(2.0) and "limit_batch" not in d["m/cam"]
    assert d["m/smooth"]["gradient_limit_per_second"] == pytest.approx(4.0)  # the folded variant, at batch 64
    assert d["m/sal"]["gradient_limit_per_second"] == pytest.approx(0.5)  # batch 1's own
    table = format_table(BenchReport({}, {}, figures).to_dict())
    assert "resnet18 224x224 b1 (forwards of 64)" in table and "(b64)" in table
    assert "input (folded)" in table


def test_the_pipelines_ratio_to_the_limit_is_its_methods_scaled():
    figures = [
        fig("l", "limit", 1.0, images=16, variant="eager", batch=16),
        fig("m", "method", 2.0, images=16, method="gradcam", backend="eager", targets="top:1", batch=16),
        fig("p", "pipeline", 4.0, images=16, method="gradcam", backend="eager", targets="top:1", batch=16),
    ]
    d = derive(figures)["p"]
    assert d["ratio_to_method"] == pytest.approx(0.5) and d["ratio_to_limit"] == pytest.approx(0.25)


# --- comparisons --------------------------------------------------------------------------------------


def _run(method_s: float, pipeline_s: float, *, machine: str = "A") -> dict:
    figures = [
        fig("l", "limit", 1.0, images=16, variant="eager", batch=16),
        fig("m", "method", method_s, images=16, method="gradcam", backend="eager", targets="top:1", batch=16),
        fig("p", "pipeline", pipeline_s, images=16, method="gradcam", backend="eager", targets="top:1", batch=16),
    ]
    return BenchReport({"device": "cpu"}, {"cpu": machine}, figures).to_dict()


def test_a_pipeline_is_not_flagged_when_only_its_method_got_faster():
    before = _run(2.0, 4.0)
    after = _run(1.4, 3.7)  # the method 30% faster, the decode-bound pipeline 8%: its ratio to the method fell
    result = compare(before, after, threshold=0.1)
    assert result.ok and not result.regressions, format_comparison(result)
    slower = compare(before, _run(2.0, 5.0), threshold=0.1)  # the pipeline alone 20% slower: flagged
    assert [c.key for c in slower.regressions] == ["p"] and slower.regressions[0].metric == "ratio_to_limit"


def _file_run(seconds: float, machine: str) -> dict:
    figures = [fig("f/cam", "method", seconds, images=16, method="cam", backend="onnxruntime", targets="top:1")]
    return BenchReport({"device": "cpu"}, {"cpu": machine}, figures).to_dict()


def test_a_model_files_throughput_is_compared_on_the_same_machine_only():
    same = compare(_file_run(1.0, "A"), _file_run(2.0, "A"), threshold=0.1)
    assert [c.metric for c in same.regressions] == ["evaluations_per_second"]
    other = compare(_file_run(1.0, "A"), _file_run(2.0, "B"), threshold=0.1)
    assert not other.regressions and other.elsewhere == ("f/cam",) and not other.ok
    assert "without a limit" in format_comparison(other)
    assert not other.missing and not other.new  # not counted twice as gone and new


def test_a_figure_measured_by_another_number_is_neither_gone_nor_new():
    with_limit = _run(2.0, 4.0)
    without = _run(2.0, 4.0)
    without["figures"] = [{k: v for k, v in f.items() if k != "ratio_to_limit"} for f in without["figures"]]
    result = compare(with_limit, without, threshold=0.1)
    assert result.switched == ("m", "p") and not result.missing and not result.new
    refused = compare(with_limit, {**without, "settings": {"device": "cuda"}}, threshold=0.1)
    assert refused.refused and not refused.missing and not refused.new and not refused.switched


# --- refused before any work --------------------------------------------------------------------------


def test_a_workdir_below_a_file_is_refused_before_any_work(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("camshaft.bench.runner.bench_model", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "bench", "--quick", "--workdir", tmp_path / "file" / "sub")
    assert code == 2 and "--workdir" in err and "Traceback" not in err


def test_two_model_files_with_one_name_are_refused(tmp_path):
    for folder in ("v1", "v2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.onnx").write_bytes(b"")
    models = (str(tmp_path / "v1" / "model.onnx"), str(tmp_path / "v2" / "model.onnx"))
    with pytest.raises(ConfigError, match="share the name 'model.onnx'"):
        BenchSettings(models=models, quick=True)


def test_a_model_file_that_cannot_serve_the_targets_stops_the_run_before_any_timing(
    capsys, monkeypatch, tmp_path
):
    path = tmp_path / "demo.onnx"
    assert run_cli(capsys, "export", "demo", "--format", "onnx", "--out", path)[0] == 0
    monkeypatch.setattr("camshaft.bench.runner.bench_model", lambda *a, **k: pytest.fail("work started"))
    settings = BenchSettings(models=("resnet18", str(path)), targets=("top:7",), backends=("onnxruntime",), quick=True)
    with pytest.raises(ConfigError, match="demo.onnx: --targets 'top:7': the model has only 5 classes"):
        run_bench(settings, workdir=tmp_path / "work")


# --- the workloads --------------------------------------------------------------------------------------


def test_occlusion_at_batch_1_gets_limits_at_the_batch_of_its_forwards(tmp_path):
    settings = BenchSettings.preset(quick=True).replace(
        methods=("occlusion", "smoothgrad", "cam"), backends=("eager",), batch_sizes=(1,), peers=False
    )
    mb = ModelBench("demo", settings, tmp_path, lambda _: None)
    group = Group("demo", (64, 64), 1)
    items = [w for w in limit_workloads(mb, group, input_batch(group, device=mb.device, seed=0))
             if isinstance(w, Workload)]
    batches = {(w.role, w.attrs.get("forward_batch"), w.attrs.get("variant")) for w in items}
    # occlusion at 64 px: 3 x 3 windows of 32 at stride 16, one forward of 9; SmoothGrad: its 16 samples at once
    assert ("limit", 9, "eager") in batches and ("limit", 16, "eager") in batches
    assert ("input_backward", 16, "folded") in batches and ("input_backward", None, "eager") in batches
    assert {w.images for w in items if w.attrs.get("forward_batch") == 9} == {9}
    for w in items:  # every one of them runs
        w.fn()


def test_guided_backprop_is_timed_against_captum():
    pytest.importorskip("captum")
    import torch

    from camshaft.bench import peers
    from camshaft.demo.model import build_demo_model

    items = peers.peer_workloads("guided_backprop", model=build_demo_model(), tap=None, x=torch.randn(2, 3, 32, 32),
                                 targets={"top:2": 2}, options={}, evaluations=2, key="g/{peer}/{targets}", attrs={},
                                 quick=True)
    assert [(w.key, w.role, w.pairs) for w in items] == [("g/captum/top:2", "peer", 4)]
    items[0].fn()

