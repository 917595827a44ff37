"""Job files: the explain fields in TOML, validated as a whole before any work."""

from __future__ import annotations

import pytest

import camshaft
from camshaft.cli import main
from camshaft.demo.shapes import write_demo_dataset
from camshaft.engine.jobfile import load_job
from camshaft.errors import ConfigError


def test_job_file_runs_like_the_cli(tmp_path, capsys):
    write_demo_dataset(tmp_path / "data", n=3, seed=0)
    job = tmp_path / "nightly.toml"
    job.write_text(
        'model = "demo"\ndata = "data/manifest.csv"\nout = "results"\nmethod = "smoothgrad"\n'
        'targets = "label"\nbatch-size = 2\npartition_size = 2\n[options]\nsamples = 2\n'
    )
    assert main(["run", str(job), "--no-progress"]) == 0
    assert "3 images, 3 ok" in capsys.readouterr().out
    results = camshaft.load_results(tmp_path / "results")
    assert results.attrs["method"] == "smoothgrad" and results.attrs["options"]["samples"] == 2
    assert load_job(job).batch_size == 2


def test_every_problem_is_reported_before_any_work(tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text('data = "nowhere"\nmethod = "gradcam"\nbatchsize = 3\ninput_size = [1, 2, 3]\n')
    with pytest.raises(ConfigError) as info:
        load_job(job)
    message = str(info.value)
    assert "unknown key 'batchsize'" in message and "missing key 'out'" in message and "input_size needs 2 values" in message
    job.write_text('data = "nowhere"\nout = "o"\nmethod = "nope"\n')
    with pytest.raises(ConfigError, match=r"unknown or repeated methods \['nope'\].*data not found"):
        load_job(job)
    assert not (tmp_path / "o").exists()


def test_method_options_are_parsed_as_the_cli_parses_its_flags(tmp_path):
    write_demo_dataset(tmp_path / "data", n=2, seed=0)
    job = tmp_path / "bad.toml"
    job.write_text('data = "data/manifest.csv"\nout = "o"\nmethod = "smoothgrad,integrated_gradients"\n'
                   '[options]\nsamples = 0\nsteps = "abc"\n')
    with pytest.raises(ConfigError, match=r"'smoothgrad': samples: expected a positive integer.*"
                                          r"'integrated_gradients': steps: expected a positive integer"):
        load_job(job)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match=r"'scorecam': masks_per_forward: expected a positive integer, received 0"):
        camshaft.explain(None, tmp_path / "data", out=tmp_path / "o", method="scorecam",
                         options={"masks_per_forward": 0}, progress=False)
    summary = camshaft.explain(None, tmp_path / "data", out=tmp_path / "o", method="smoothgrad",
                               options={"samples": "2"}, progress=False)  # text, as on the command line
    assert camshaft.load_results(summary.out).attrs["options"]["samples"] == 2


def test_comma_separated_fields_read_as_on_the_command_line(tmp_path):
    write_demo_dataset(tmp_path / "data", n=2, seed=0)
    job = tmp_path / "job.toml"
    job.write_text('data = "data/manifest.csv"\nout = "o"\nmethod = "cam,gradcam"\nmetrics = "deletion"\n'
                   'exemplars = "features:0,1"\n')
    loaded = load_job(job)
    assert loaded.methods == ("cam", "gradcam") and loaded.metrics == ("deletion",)
    assert loaded.exemplars == ("features:0,1",)
