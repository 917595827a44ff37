"""README claims that go stale silently: its command lines parse, its lists match the code, its snippet runs."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch

from camshaft.cli import build_parser
from camshaft.errors import ConfigError

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")  # main() would otherwise execve over pytest


def _command_lines() -> list[list[str]]:
    """Every `camshaft ...` line of the README's bash blocks, as argv (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", TEXT, re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("camshaft ")]


def _command(name: str) -> object:
    return build_parser([name]).commands[name]


@pytest.mark.parametrize("argv", _command_lines(), ids=lambda argv: " ".join(argv)[:60])
def test_every_readme_command_line_parses(argv):
    """Flags, choices and value types of each example are the parser's (a renamed flag fails here)."""
    args = build_parser(argv).parse_args(argv)
    assert args.command == argv[0]


def _section(start: str, end: str) -> str:
    return TEXT[TEXT.index(start):TEXT.index(end, TEXT.index(start))]


def test_the_methods_table_is_the_registry():
    from camshaft.engine.methods import get_method, method_names

    rows = re.findall(r"^  \| (`.*?) \| (.*?) \|", TEXT, re.M)
    listed = {name: needs for names, needs in rows for name in re.findall(r"`([^`]+)`", names)}
    assert sorted(listed) == sorted(method_names())
    tap_gradients = {n for n in method_names() if "tap_gradients" in get_method(n).needs}
    assert {n for n, needs in listed.items() if needs == "tap gradients"} == tap_gradients


def _names(text: str) -> set[str]:
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", text))


def test_the_results_columns_named_in_the_readme_are_the_tables():
    from camshaft.writers.table import SCHEMA

    bullet = _section("- `results.parquet`:", "- `_camshaft/`")
    assert _names(bullet) == set(SCHEMA.names)  # every column named, and nothing that is not one


def test_the_actmax_table_has_the_columns_the_readme_names():
    from camshaft.engine.actmax.outputs import SCHEMA

    text = _section("the dead-ReLU stall", "On the CPU the default")
    assert {"spec", "target_prob"} <= set(SCHEMA.names) and "`target_prob`" in text
    assert "DIR" not in text  # said "DIR gets one PNG...": no example names its output folder DIR


@pytest.mark.parametrize(
    "phrase, command, dest, value",
    [
        ("(`--partition-size`, default 256 images)", "explain", "partition_size", 256),
        ("`top:K` (default `top:1`)", "explain", "targets", "top:1"),
        ("`--batch-size` (default 32;", "explain", "batch_size", 32),
        ("(`--relu-leak-steps`; Lucid: 16)", "actmax", "relu_leak_steps", 32),
        ("(`--relu-leak 0.1`;", "actmax", "relu_leak", 0.1),
        ("(`--param fourier`, the default)", "actmax", "param", "fourier"),
        ("# every class, one batch per 64", "actmax", "batch_size", 64),
    ],
)
def test_the_defaults_the_readme_states_are_the_parsers(phrase, command, dest, value):
    assert phrase in TEXT
    assert _command(command).get_default(dest) == value


def test_the_default_decode_workers_are_what_the_readme_says(monkeypatch):
    from camshaft.data import workers

    assert "default all cores but one, at least 2" in TEXT and "threads (4 by default)" in TEXT
    monkeypatch.setattr(workers, "usable_cores", lambda: 1)
    assert workers.default_workers() == 2
    monkeypatch.setattr(workers, "usable_cores", lambda: 9)
    assert workers.default_workers() == 8 and workers.READERS == 4


def _help_of(command: str, flag: str) -> str:
    action = next(a for a in _command(command)._actions if flag in a.option_strings)
    return action.help or ""


@pytest.mark.parametrize("command", ["explain", "featmaps"])
def test_the_backend_help_says_a_file_runs_on_its_formats_backend_as_it_does(command, tmp_path):
    from camshaft.engine.backends import backend_factory
    from camshaft.engine.backends.registry import auto_backend, open_onnxruntime
    from camshaft.models.sources import ModelSource

    text = _help_of(command, "--backend")
    assert "default: auto" in text and _command(command).get_default("backend") == "auto"
    source = ModelSource("onnx", "model.onnx")
    assert auto_backend(source) == "onnxruntime" and backend_factory("auto", source) is open_onnxruntime
    with pytest.raises(ConfigError, match=r"eager backend needs a torch model.*use --backend onnxruntime, or auto"):
        backend_factory("eager")(source, taps=None, preprocess={}, device=torch.device("cpu"), dtype=torch.float32,
                                 workdir=tmp_path)  # asked for by name: refused, not switched
    assert "run on the backend of its format (`--backend auto`, the default" in " ".join(TEXT.split())


def test_help_states_the_defaults_it_applies():
    assert "(default: 1e-3)" in _help_of("export", "--rtol") and _command("export").get_default("rtol") == 1e-3
    assert "default: cuda when available" in _help_of("featmaps", "--device")
    assert "`--history N` (default 7)" in TEXT and "(default: 7)" in _help_of("bench", "--history")


def test_job_file_paths_are_relative_to_the_job_file_as_its_comment_says(tmp_path, monkeypatch):
    from camshaft.engine.jobfile import load_job

    assert "# paths are relative to this job file" in TEXT
    (tmp_path / "jobs" / "val").mkdir(parents=True)
    (tmp_path / "jobs" / "val" / "manifest.csv").write_text("path\n")
    (tmp_path / "jobs" / "job.toml").write_text('data = "val/manifest.csv"\nout = "runs/today"\n')
    monkeypatch.chdir(tmp_path)  # elsewhere than the job file's folder
    job = load_job("jobs/job.toml")
    folder = tmp_path.resolve() / "jobs"
    assert Path(job.data) == folder / "val" / "manifest.csv" and Path(job.out) == folder / "runs" / "today"


def test_the_python_snippet_runs_on_the_demo_model(tmp_path, monkeypatch):
    """The README's snippet as written, with the built-in model for resnet18 (no weights, small, fast)."""
    from camshaft.demo.shapes import write_demo_dataset

    code = re.search(r"```python\n(.*?)```", TEXT, re.S).group(1)
    code = code.replace('"resnet18"', '"demo"').replace('"layer4"', '"features"').replace("resnet18.onnx", "demo.onnx")
    code = code.replace('targets="top:3"', 'targets="top:3", progress=False')
    manifest = write_demo_dataset(tmp_path / "gen", n=2, seed=0)
    (tmp_path / "images").mkdir()
    for i, image in enumerate(sorted((manifest.parent / "images").rglob("*.*"))):
        image.rename(tmp_path / "images" / ("cat.jpg" if i == 0 else image.name))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    results = namespace["results"]
    assert len(results.table) == 2 and results.map(0, upsample=True).shape[0] == 3
    assert results.map("images/cat.jpg").shape[0] == 3 and (tmp_path / "demo.onnx").is_file()
