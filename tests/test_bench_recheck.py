"""``camshaft bench --compare``: a group whose figures dropped is timed again; only a lasting drop counts."""

from __future__ import annotations

import pytest
from conftest import run_cli

from camshaft.errors import ConfigError

from camshaft.bench import format_comparison, load_json, save_json
from camshaft.bench.report import BenchReport
from camshaft.bench.runner import Recheck, confirm
from camshaft.bench.timing import TimingConfig
from camshaft.bench.workload import Workload

ATTRS = {"model": "m", "input_size": [8, 8], "batch": 4}


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")


def _workload(key: str, role: str, seconds: list[float], **attrs) -> Workload:
    """A workload that reports its own times, one per call, from ``seconds``."""
    times = iter(seconds)
    return Workload(key, role, lambda: next(times), 4, 4, 4, {**ATTRS, **attrs})


def _first_pass(workloads: list[Workload]):
    from camshaft.bench.runner import measure

    return measure(workloads, TimingConfig(warmup=0, repeats=2), device="cpu")[0]


def _slow(data: dict) -> set[str]:
    return {f["key"] for f in data["figures"] if f["role"] == "method" and f["ratio_to_limit"] < 0.9}


def _report() -> BenchReport:
    return BenchReport({}, {"cpu": "test"})


def test_a_transient_drop_is_cleared_by_timing_the_group_again():
    limit = _workload("m/limit", "limit", [1.0] * 20, variant="eager")
    # the probe, then a first pass slowed by another tenant, then the method's usual speed
    method = _workload("m/cam", "method", [1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0], method="cam", backend="eager")
    figures = _first_pass([limit, method])
    assert _slow(BenchReport({}, {}, figures).to_dict()) == {"m/cam"}
    lines = []
    kept = confirm(figures, [limit, method], Recheck(_slow, passes=3), report=_report(),
                   timing=TimingConfig(repeats=2), device="cpu", log=lines.append)
    assert [f.seconds for f in kept] == [(1.0,) * 4, (2.0, 2.0, 1.0, 1.0)]  # the limit was timed again too
    assert [f.get("rechecks") for f in kept] == [1, 1]  # one pass was enough: no more were run
    assert not _slow(BenchReport({}, {}, kept).to_dict())
    assert len(lines) == 1 and "1 figures dropped beyond the threshold (m/cam): timing the group again" in lines[0]


def test_a_lasting_drop_survives_every_pass():
    limit = _workload("m/limit", "limit", [1.0] * 20, variant="eager")
    method = _workload("m/cam", "method", [2.0] * 20, method="cam", backend="eager")
    kept = confirm(_first_pass([limit, method]), [limit, method], Recheck(_slow, passes=2), report=_report(),
                   timing=TimingConfig(repeats=2), device="cpu", log=lambda _: None)
    assert [len(f.seconds) for f in kept] == [6, 6] and kept[1].get("rechecks") == 2
    assert _slow(BenchReport({}, {}, kept).to_dict()) == {"m/cam"}


def test_nothing_is_timed_again_without_a_drop():
    limit = _workload("m/limit", "limit", [1.0] * 3, variant="eager")
    method = _workload("m/cam", "method", [1.0] * 3, method="cam", backend="eager")
    figures = _first_pass([limit, method])
    assert confirm(figures, [limit, method], Recheck(_slow), report=_report(), timing=TimingConfig(repeats=2),
                   device="cpu", log=pytest.fail) == figures


def test_the_cli_times_a_regressed_group_again_and_still_fails_on_a_lasting_drop(capsys, tmp_path):
    first = tmp_path / "first.json"
    argv = ("bench", "--quick", "--method", "cam", "--backend", "eager", "--no-peers")
    code, _, err = run_cli(capsys, *argv, "--json", first)
    assert code == 0, err
    baseline = load_json(first)
    for f in baseline["figures"]:
        if f["role"] == "method":
            f["ratio_to_limit"] *= 10  # a baseline no real run reaches: the drop lasts
    save_json(baseline, tmp_path / "baseline.json")
    second = tmp_path / "second.json"
    code, out, err = run_cli(capsys, *argv, "--compare", tmp_path / "baseline.json", "--json", second)
    assert code == 1 and "REGRESSION demo/64x64/b2/cam/eager/top:1" in out, err
    assert "timing the group again (pass 1 of 1)" in err and "were timed again after a drop" in out
    again = {f["key"]: f for f in load_json(second)["figures"]}
    assert all(len(f["seconds"]) == 4 and f["rechecks"] == 1 for f in again.values())  # 2 rounds, then 2 more
    code, out, err = run_cli(capsys, *argv, "--compare", tmp_path / "baseline.json", "--recheck", "0")
    assert code == 1 and "timing the group again" not in err and "timed again" not in out


# --- a baseline of several runs -----------------------------------------------------------------------


def _run(created: str, scale: float, **settings) -> dict:
    from test_bench import made_up, report_of

    data = report_of(made_up())
    data["created"] = created
    data["settings"].update(settings)
    for f in data["figures"]:
        if f.get("ratio_to_limit"):
            f["ratio_to_limit"] *= scale
    return data


def test_several_runs_make_one_baseline_of_medians_so_one_lucky_run_does_not_set_the_bar():
    from camshaft.bench import compare
    from camshaft.bench.compare import baseline

    runs = [_run("2026-11-30", 1.0), _run("2026-12-01", 1.6), _run("2026-11-29", 1.05)]  # 12-01 was lucky
    current = _run("2026-12-02", 1.0)
    assert not compare(runs[1], current, threshold=0.1).ok  # against the lucky run alone: a false drop
    combined = baseline(runs)
    result = compare(combined, current, threshold=0.1)
    assert result.ok and result.runs == 3 and "the median of 3 previous runs" in format_comparison(result)
    key = "m/gradcam/top1"
    ratios = [next(f["ratio_to_limit"] for f in r["figures"] if f["key"] == key) for r in runs]
    assert next(f["ratio_to_limit"] for f in combined["figures"] if f["key"] == key) == sorted(ratios)[1]
    assert combined["created"] == "2026-12-01"  # the newest run's settings and machine
    assert baseline([runs[0]]) is runs[0]


def test_runs_of_other_work_are_not_combined():
    from camshaft.bench.compare import baseline

    with pytest.raises(ConfigError, match=r"the baseline runs measured different work \(dtype float32 -> bfloat16"):
        baseline([_run("2026-12-01", 1.0), _run("2026-12-02", 1.0, dtype="bfloat16")])


def test_the_cli_compares_with_several_runs(capsys, monkeypatch, tmp_path):
    from test_bench import made_up

    def fake(settings, *, workdir, log, progress=None, recheck=None):
        return BenchReport(settings.to_dict(), {"cpu": "test", "device": "cpu", "dtype": "float32"}, made_up())

    monkeypatch.setattr("camshaft.bench.runner.run_bench", fake)
    paths = [save_json(_run(f"2026-12-0{i}", scale), tmp_path / f"{i}.json") for i, scale in ((1, 1.0), (2, 1.6))]
    paths.append(save_json(_run("2026-11-30", 1.02), tmp_path / "0.json"))
    code, out, err = run_cli(capsys, "bench", "--quick", "--compare", *paths, "--json", tmp_path / "new.json")
    assert code == 0 and "compared with the median of 3 previous runs" in out and "0 regressions" in out, err
    code, out, _ = run_cli(capsys, "bench", "--quick", "--compare", paths[1])
    assert code == 1 and "compared with the previous run" in out and "REGRESSION" in out


# --- a folder of earlier runs (a nightly job's history) ------------------------------------------------


def _fake_run(monkeypatch):
    from test_bench import made_up

    def fake(settings, *, workdir, log, progress=None, recheck=None):
        return BenchReport(settings.to_dict(), {"cpu": "test", "device": "cpu", "dtype": "float32"}, made_up())

    monkeypatch.setattr("camshaft.bench.runner.run_bench", fake)


def test_a_folder_gives_its_newest_complete_runs_of_the_same_work(tmp_path):
    from camshaft.bench.compare import history, work_of

    folder = tmp_path / "runs"
    folder.mkdir()
    for day in range(1, 6):
        save_json(_run(f"2026-11-0{day}", 1.0), folder / f"{day}.json")
    save_json(_run("2026-11-09", 1.0, dtype="bfloat16"), folder / "bf16.json")
    save_json(_run("2026-11-09", 1.0, device="cuda:0"), folder / "gpu.json")
    save_json({**_run("2026-11-09", 1.0), "complete": False}, folder / "stopped.json")
    (folder / "notes.json").write_text('{"not": "a run"}')
    (folder / "readme.txt").write_text("not json")
    work = work_of(_run("2026-11-10", 1.0)["settings"])
    assert work == {"device": "cpu", "dtype": "float32", "cuda_graphs": False}
    found = history(folder, work=work, keep=3, exclude=(folder / "5.json",))
    assert [p.name for p, _ in found.runs] == ["2.json", "3.json", "4.json"]  # oldest first; 5.json is this run's own
    assert found.passed == ("1 older than the newest 3", "2 of other work (device type, dtype or CUDA graphs)",
                            "1 stopped part-way", "1 not camshaft benchmark results")
    assert [p.name for p, _ in history(folder, work={**work, "dtype": "bfloat16"}, keep=7).runs] == ["bf16.json"]
    with pytest.raises(ConfigError, match="is not a folder of saved runs"):
        history(folder / "1.json", work=work, keep=3)


def test_a_nightly_job_compares_with_its_folder_from_the_first_night_on(capsys, monkeypatch, tmp_path):
    _fake_run(monkeypatch)
    folder = tmp_path / "runs"
    folder.mkdir()
    nightly = lambda day, *more: run_cli(capsys, "bench", "--quick", "--json", folder / f"{day}.json",  # noqa: E731
                                         "--compare", folder, *more)
    code, out, err = nightly("01")  # nothing yet: nothing compared, and the night does not fail for it
    assert code == 0 and "nothing compared (this run starts the history)" in out, err
    assert "0 earlier runs of this work" in err and load_json(folder / "01.json")["complete"]
    code, out, err = nightly("02")
    assert code == 0 and "compared with the previous run" in out and "1 earlier runs of this work" in err
    # a lucky night, then an ordinary one: the median of the folder does not fail it, the lucky run alone would
    save_json(_run("2026-12-30", 1.6), folder / "lucky.json")
    code, out, err = nightly("03")
    assert code == 0 and "the median of 3 previous runs" in out, out
    code, out, err = nightly("04", "--history", "1")
    assert code == 1 and "REGRESSION" in out and "passed over: 3 older than the newest 1" in err


def test_history_needs_a_compare_folder(capsys, monkeypatch, tmp_path):
    _fake_run(monkeypatch)
    path = save_json(_run("2026-12-01", 1.0), tmp_path / "a.json")
    code, _, err = run_cli(capsys, "bench", "--quick", "--compare", path, "--history", "3")
    assert code == 2 and "--history chooses the runs of a --compare folder: give one" in err
    code, _, err = run_cli(capsys, "bench", "--quick", "--compare", tmp_path, "--history", "0")
    assert code == 2 and "--history" in err
