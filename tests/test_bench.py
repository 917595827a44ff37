"""The benchmark machinery (not speed): timing, ratios, JSON, comparison, and ``camshaft bench``.

Ratios are checked on made-up figures with hand-computed answers; the CLI's comparison exit codes
with a stubbed run; one tiny real ``camshaft bench --quick`` proves the whole path works.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_cli as _main
import torch

from camshaft.bench import BenchSettings, TimingConfig, compare, format_table, load_json, run_bench, save_json
from camshaft.bench.cases import Case, Group, evaluations_per_image, method_workload
from camshaft.bench.ratios import derive
from camshaft.bench.report import BenchReport
from camshaft.bench.timing import round_robin, time_call
from camshaft.bench.workload import Figure, Skipped
from camshaft.engine.backends.base import FORWARD
from camshaft.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")


G = {"model": "resnet50", "input_size": [224, 224], "batch": 16}


def fig(key, role, seconds, *, images=16, k=1, evaluations=None, **attrs) -> Figure:
    return Figure(
        key, role, images, images * k, evaluations or images, (seconds, seconds * 1.5), {**G, "k": k, **attrs}
    )


def made_up() -> list[Figure]:
    return [
        fig("l/eager", "limit", 2.0, variant="eager"),  # 8 images/s
        fig("l/onnx", "limit", 1.0, variant="onnxruntime"),  # 16 images/s: the limit
        fig("h/k1", "head_backward", 0.5),
        fig("h/k5", "head_backward", 1.0, k=5),
        fig("m/gradcam/top1", "method", 2.0, method="gradcam", backend="eager", targets="top:1", gradient="tap"),
        fig("m/gradcam/top5", "method", 4.0, k=5, method="gradcam", backend="eager", targets="top:5", gradient="tap"),
        fig("m/occlusion", "method", 10.0, evaluations=16 * 170, method="occlusion", backend="eager", targets="top:1"),
        fig("p/pgc1", "peer", 8.0, method="gradcam", targets="top:1", peer="pytorch-grad-cam"),
        fig("p/captum1", "peer", 5.0, method="gradcam", targets="top:1", peer="captum"),
        fig("p/occ-ppe1", "peer", 80.0, method="occlusion", targets="top:1", peer="captum", variant="ppe1"),
        fig("p/occ-ppe4", "peer", 40.0, method="occlusion", targets="top:1", peer="captum", variant="ppe4"),
        fig("e2e", "pipeline", 2.5, method="gradcam", backend="eager", targets="top:1"),
    ]


# --- timing -----------------------------------------------------------------------------------------


def test_round_robin_warms_up_then_interleaves_and_keeps_every_sample():
    calls, now = [], [0.0]

    def make(name, cost):
        def fn():
            calls.append(name)
            now[0] += cost

        return fn

    timings = round_robin(
        [make("a", 1.0), make("b", 3.0)], config=TimingConfig(warmup=1, repeats=2), clock=lambda: now[0]
    )
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-up, then one call of each per round
    assert [t.seconds for t in timings] == [(1.0, 1.0), (3.0, 3.0)]
    assert timings[1].best == 3.0 and timings[1].median == 3.0


def test_a_workload_may_time_itself():
    assert time_call(lambda: 0.25, clock=iter([0.0, 9.0]).__next__) == 0.25
    assert time_call(lambda: None, clock=iter([1.0, 4.0]).__next__) == 3.0


def test_timing_config_rejects_nonsense():
    with pytest.raises(ConfigError, match="repeats must be at least 1"):
        TimingConfig(repeats=0)


# --- ratios -----------------------------------------------------------------------------------------


def test_ratios_to_the_limit_the_gradient_limit_peers_and_the_method():
    d = derive(made_up())
    top1 = d["m/gradcam/top1"]
    assert top1["limit_per_second"] == 16.0 and top1["limit_variant"] == "onnxruntime"
    assert top1["ratio_to_limit"] == pytest.approx(8 / 16)
    # gradient limit: 16 images / (1 s of the best forward + 0.5 s of head backward)
    assert top1["gradient_limit_per_second"] == pytest.approx(16 / 1.5)
    assert top1["ratio_to_gradient_limit"] == pytest.approx(8 / (16 / 1.5))
    assert top1["peers"]["pytorch-grad-cam"]["speedup"] == pytest.approx(8 / 2)  # pairs/s: 8 vs 2
    assert top1["peers"]["captum"]["speedup"] == pytest.approx(8 / 3.2)
    top5 = d["m/gradcam/top5"]
    assert top5["ratio_to_limit"] == pytest.approx(4 / 16)  # images/s against the limit
    assert top5["gradient_limit_per_second"] == pytest.approx(16 / 2.0)  # the k=5 head backward
    occ = d["m/occlusion"]
    assert occ["ratio_to_limit"] == pytest.approx(16 * 170 / 10 / 16)  # evaluations/s
    assert occ["peers"]["captum"]["speedup"] == pytest.approx((16 / 10) / (16 / 40))  # captum at its best ppe
    assert d["e2e"]["ratio_to_method"] == pytest.approx((16 / 2.5) / 8)


def test_evaluations_count_occlusion_windows_like_captum():
    assert evaluations_per_image("occlusion", {"window": (32, 32), "stride": (16, 16)}, (224, 224)) == 13 * 13 + 1
    assert evaluations_per_image("smoothgrad", {"samples": 16}, (224, 224)) == 17
    assert evaluations_per_image("scorecam", {}, (224, 224), channels=2048) == 2049
    assert evaluations_per_image("gradcam", {}, (224, 224)) == 1


def test_a_backend_that_cannot_serve_a_method_is_skipped_with_the_reason():
    info = SimpleNamespace(
        taps=("layer4",), cam_tap="layer4", num_classes=10, source="tiny", tap_shapes={"layer4": (8, 2, 2)}
    )
    backend = SimpleNamespace(
        name="onnxruntime", info=info, capabilities=frozenset({FORWARD}), device=torch.device("cpu")
    )
    case = Case(Group("tiny", (8, 8), 2), "gradcam", "onnxruntime", "top:1")
    skipped = method_workload(case, backend, torch.zeros(2, 3, 8, 8))
    assert isinstance(skipped, Skipped) and "tap_gradients" in skipped.reason


def test_settings_collect_every_problem():
    with pytest.raises(ConfigError) as e:
        BenchSettings(models=("nonsense",), methods=("nope",), batch_sizes=(0,), targets=("label",), decode="gpu")
    for part in (
        "unknown decode 'gpu'; valid: auto, processes, threads",
        "unknown model 'nonsense'",
        "unknown methods ['nope']",
        "batch sizes must be positive",
        "needs dataset labels",
    ):
        assert part in str(e.value)


# --- JSON and comparison ----------------------------------------------------------------------------


def report_of(figures) -> dict:
    settings = BenchSettings.preset(quick=True)
    return BenchReport(
        settings.to_dict(), {"cpu": "test", "device": "cpu", "dtype": "float32"}, figures, [Skipped("x", "why")]
    ).to_dict()


def test_json_round_trip_has_the_fields_and_ratios(tmp_path):
    from camshaft.bench.machine import machine_info

    data = BenchReport(BenchSettings.preset(quick=True).to_dict(), machine_info("cpu", "float32"), made_up()).to_dict()
    loaded = load_json(save_json(data, tmp_path / "run.json"))
    m = loaded["machine"]
    for key in ("cpu", "cores", "device", "dtype", "glibc_tunables", "load_average", "torch_threads"):
        assert key in m
    for dist in ("torch", "onnxruntime", "camshaft", "captum", "grad-cam", "torchcam"):
        assert dist in m["versions"]
    assert loaded["settings"]["timing"] == {"warmup": 1, "repeats": 2} and loaded["settings"]["quick"] is True
    method = next(f for f in loaded["figures"] if f["key"] == "m/gradcam/top1")
    assert method["images_per_second"] == 8.0 and method["ratio_to_limit"] == pytest.approx(0.5)
    assert method["seconds"] == [2.0, 3.0] and method["best_seconds"] == 2.0
    assert "limit" in format_table(loaded) and "pytorch-grad-cam 4.00x" in format_table(loaded)


def test_graphed_limits_are_columns_only_in_runs_that_have_them():
    settings = BenchSettings.preset(quick=True).to_dict()
    plain = format_table(BenchReport(settings, {"device": "cuda"}, made_up()).to_dict())
    assert "graph" not in plain and "CUDA graphs" not in plain
    graphed = made_up() + [fig("l/cl-graph", "limit", 0.5, variant="channels_last_graph")]  # 32 images/s
    data = BenchReport({**settings, "cuda_graphs": True}, {"device": "cuda"}, graphed).to_dict()
    table = format_table(data)
    assert "CUDA graphs" in table.splitlines()[0]
    header = next(line for line in table.splitlines() if line.startswith("model") and "limit" in line)
    assert header.split()[-2:] == ["channels_last_graph", "limit"]  # torchscript_cl_graph was not measured
    assert "32.0 (channels_last_graph)" in table
    method = next(f for f in data["figures"] if f["key"] == "m/gradcam/top1")
    assert method["ratio_to_limit"] == pytest.approx(0.25)  # held to the graphed forward


def test_load_json_refuses_other_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a camshaft benchmark result"):
        load_json(tmp_path / "x.json")


def test_compare_flags_drops_beyond_the_threshold_only():
    before = report_of(made_up())
    slower = [fig("m/gradcam/top1", "method", 2.5, method="gradcam", backend="eager", targets="top:1", gradient="tap")]
    slightly = [
        fig("m/gradcam/top1", "method", 2.1, method="gradcam", backend="eager", targets="top:1", gradient="tap")
    ]
    after = report_of([f for f in made_up() if f.key != "m/gradcam/top1"] + slower)
    result = compare(before, after, threshold=0.1)
    assert not result.ok and [c.key for c in result.regressions] == ["m/gradcam/top1"]
    assert result.regressions[0].relative == pytest.approx(2.0 / 2.5 - 1)
    within = report_of([f for f in made_up() if f.key != "m/gradcam/top1"] + slightly)
    assert compare(before, within, threshold=0.1).ok
    assert compare(before, within, threshold=0.01).regressions  # a 4.8% drop beyond a 1% threshold


# --- the command ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nonsense"], "unknown model 'nonsense'"),
        (["--method", "nope"], "invalid choice: 'nope'"),
        (["--batch-size", "0"], "expected a positive integer"),
        (["--targets", "label"], "needs dataset labels"),
        (["--targets", "top:x"], "K must be a positive integer"),
        (["--threshold", "1.5"], "--threshold must be between 0 and 1"),
        (["--compare", "missing.json"], "cannot read benchmark results"),
        (["--json", "no/such/folder/run.json"], "does not exist"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--cuda-graphs"], "CUDA graphs need a CUDA device; this benchmark runs on cpu"),
        (["--model", "resnet18", "demo", "--targets", "top:6"], "demo: --targets 'top:6': the model has only 5 classes"),
        (["--model", "demo", "nosuchpkg.mod:factory"], "cannot import 'nosuchpkg.mod'"),
        (["--recheck", "2"], "--recheck times again figures that dropped since a previous run: give --compare"),
        (["--recheck", "-1"], "expected an integer >= 0"),
        (["--threshold", "0.2"], "--threshold acts only with --compare"),
        (["--compare-metric", "throughput"], "--compare-metric acts only with --compare"),
        (["--pipeline-batches", "3"], "--pipeline-batches acts only with --pipeline"),
        (["--decode", "threads"], "--decode acts only with --pipeline"),
    ],
)
def test_bad_flags_exit_2_before_any_work(capsys, monkeypatch, argv, message):
    monkeypatch.setattr("camshaft.bench.runner.bench_model", lambda *a, **k: pytest.fail("work started"))
    code, _, err = _main(capsys, "bench", "--quick", *argv)
    assert code == 2 and message in err


def test_run_bench_checks_every_models_targets_before_timing_any(monkeypatch, tmp_path):
    """Called directly too: a later model that cannot serve the targets stops the run before the first."""
    monkeypatch.setattr("camshaft.bench.runner.bench_model", lambda *a, **k: pytest.fail("work started"))
    settings = BenchSettings(models=("resnet18", "demo"), targets=("top:6",), quick=True)
    with pytest.raises(ConfigError, match="demo: --targets 'top:6': the model has only 5 classes"):
        run_bench(settings, workdir=tmp_path)


@pytest.fixture
def stubbed_run(monkeypatch):
    """``camshaft bench`` whose measuring is replaced by the made-up figures."""

    def fake(settings, *, workdir, log, progress=None, recheck=None):
        return BenchReport(settings.to_dict(), {"cpu": "test", "device": "cpu", "dtype": "float32"}, made_up())

    monkeypatch.setattr("camshaft.bench.runner.run_bench", fake)


def _previous(tmp_path: Path, scale: float) -> Path:
    data = report_of(made_up())
    for f in data["figures"]:
        if f.get("ratio_to_limit"):
            f["ratio_to_limit"] *= scale
    return save_json(data, tmp_path / "previous.json")


def test_compare_exits_1_on_a_regression_beyond_the_threshold(capsys, stubbed_run, tmp_path):
    code, out, _ = _main(capsys, "bench", "--quick", "--compare", _previous(tmp_path, 1.5), "--threshold", "0.2")
    assert code == 1 and "REGRESSION m/gradcam/top1" in out


def test_compare_exits_0_within_the_threshold(capsys, stubbed_run, tmp_path):
    code, out, _ = _main(capsys, "bench", "--quick", "--compare", _previous(tmp_path, 1.05), "--threshold", "0.1")
    assert code == 0 and "0 regressions" in out


def test_compare_fails_when_nothing_was_compared_and_uses_throughput_without_a_limit(capsys, stubbed_run, tmp_path):
    empty = report_of([f for f in made_up() if f.role not in ("method", "pipeline")])
    path = save_json(empty, tmp_path / "empty.json")
    code, out, _ = _main(capsys, "bench", "--quick", "--compare", path)
    assert code == 1 and "NOTHING COMPARED" in out
    # figures without a ratio (a model file has no limit) are compared by their throughput
    before, after = report_of(made_up()), report_of(made_up())
    for data, scale in ((before, 10.0), (after, 1.0)):
        for f in data["figures"]:
            f.pop("ratio_to_limit", None)
            f.pop("ratio_to_method", None)
            if f.get("evaluations_per_second"):
                f["evaluations_per_second"] *= scale
    result = compare(before, after, threshold=0.1)
    assert not result.ok and result.regressions and {c.metric for c in result.regressions} == {"evaluations_per_second"}


def test_a_run_that_measured_nothing_of_camshafts_exits_1(capsys, monkeypatch):
    def fake(settings, *, workdir, log, progress=None, recheck=None):
        figures = [f for f in made_up() if f.role not in ("method", "pipeline")]
        return BenchReport(settings.to_dict(), {"cpu": "test", "device": "cpu", "dtype": "float32"}, figures)

    monkeypatch.setattr("camshaft.bench.runner.run_bench", fake)
    code, out, _ = _main(capsys, "bench", "--quick")
    assert code == 1 and "no figure of camshaft's was measured" in out


def test_a_tiny_quick_run_prints_a_table_and_saves_json(capsys, tmp_path):
    path = tmp_path / "bench.json"
    code, out, err = _main(
        capsys, "bench", "--quick", "--method", "cam", "gradcam", "--backend", "eager", "--json", path
    )
    assert code == 0, err
    assert "limit: plain batched forward" in out and "x limit" in out
    data = load_json(path)
    methods = {f["key"]: f for f in data["figures"] if f["role"] == "method"}
    assert set(methods) == {"demo/64x64/b2/cam/eager/top:1", "demo/64x64/b2/gradcam/eager/top:1"}
    assert all(f["ratio_to_limit"] > 0 for f in methods.values())
    assert methods["demo/64x64/b2/gradcam/eager/top:1"]["ratio_to_gradient_limit"] > 0
    assert {f["variant"] for f in data["figures"] if f["role"] == "limit"} >= {"eager", "channels_last", "torchscript"}
    assert data["complete"] is True and "INCOMPLETE" not in out


def test_pipeline_flags_set_the_images_per_pipeline_run_and_the_decoders():
    from camshaft.cli import build_parser
    from camshaft.commands.bench import settings_from

    def parse(*argv):
        return settings_from(build_parser(list(argv)).parse_args(list(argv)))

    assert parse("bench", "--quick", "--pipeline", "--pipeline-batches", "5").pipeline_batches == 5
    assert parse("bench", "--quick", "--pipeline").pipeline_batches == 2  # the quick preset's
    assert parse("bench", "--quick", "--pipeline", "--decode", "processes").decode == "processes"
    assert parse("bench", "--quick").decode == "auto"


def test_a_run_stopped_part_way_leaves_the_groups_it_measured(capsys, monkeypatch, tmp_path):
    """--json is written after each group: a run killed by a time limit keeps what it timed."""
    from camshaft.bench import runner

    real, calls = runner.measure, []

    def measure_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a time limit's signal would stop it
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "measure", measure_then_die)
    path = tmp_path / "bench.json"
    argv = ["--quick", "--method", "cam", "--backend", "eager", "--batch-size", "2", "4", "--json", path]
    code, _, err = _main(capsys, "bench", *argv)
    assert code == 130 and "interrupted" in err  # the CLI says it was stopped, without a traceback
    data = load_json(path)
    assert data["complete"] is False
    assert {f["key"] for f in data["figures"] if f["role"] == "method"} == {"demo/64x64/b2/cam/eager/top:1"}
    assert "INCOMPLETE" in format_table(data)


def test_a_peer_that_refuses_a_model_is_skipped_with_its_reason(monkeypatch):
    """torchcam's CAM refuses models with several linear layers (mobilenet_v3): the run goes on."""
    from camshaft.bench import peers
    from camshaft.bench.workload import Skipped

    def refuse(task):
        raise ValueError("This CAM method does not support multiple fully connected layers.")

    monkeypatch.setattr(peers, "peers_for", lambda method, batch, quick: [("torchcam", "", refuse)])
    monkeypatch.setattr(peers, "installed", lambda peer: True)
    items = peers.peer_workloads(
        "cam", model=torch.nn.Linear(2, 2), tap=None, x=torch.zeros(1, 2), targets={"top:1": 1}, options={},
        evaluations=1, key="g/cam/peer:{peer}/{targets}", attrs={}, quick=True,
    )
    assert len(items) == 1 and isinstance(items[0], Skipped)
    assert "torchcam cannot run this model: ValueError: This CAM method does not support" in items[0].reason


def test_the_eager_backend_lays_out_its_own_copy_and_the_rest_get_the_model_as_handed_over(tmp_path):
    """Limits, peers and the other backends get the model in its default layout; camshaft's eager
    backend lays its own copy's weights out channels-last."""
    from camshaft.bench.runner import ModelBench

    settings = BenchSettings(models=("demo",), backends=("eager",), input_size=(64, 64), peers=False)
    mb = ModelBench("demo", settings, tmp_path, log=lambda message: None)

    def weights(module):
        return [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]

    assert weights(mb.source.module) and all(p.is_contiguous() for p in weights(mb.source.module))
    assert all(p.is_contiguous() for p in weights(mb.plain))
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights(mb.backends["eager"].module))
