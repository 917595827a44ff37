"""A process that calls camshaft many times (a notebook, a service, a dask worker living for weeks):
what a run leaves behind in module state once it ended, whether it finished, failed or was interrupted."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import camshaft
from camshaft.demo.shapes import write_demo_dataset
from camshaft.engine.explainer import Explainer
from camshaft.pipeline import run as run_module
from camshaft.pipeline import tasks

SMALL = dict(progress=False, partition_size=2, batch_size=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("data"), n=4, seed=5).parent / "images"


@pytest.fixture
def built(monkeypatch):
    """Weak references to the explainers (and their models) that runs build."""
    refs, real = [], run_module.build_explainer

    def build(job, **kwargs):
        explainer = real(job, **kwargs)
        refs.append((weakref.ref(explainer), weakref.ref(explainer.source.module)))
        return explainer

    monkeypatch.setattr(run_module, "build_explainer", build)
    return refs


@pytest.mark.parametrize("scheduler", ["threads", "sync"])
def test_runs_into_a_new_folder_each_keep_nothing_per_folder(data, tmp_path, built, scheduler):
    """A service explaining each request into its own folder kept one stop event per folder forever."""
    outs = [tmp_path / f"request{i}" for i in range(3)]
    for out in outs:
        assert camshaft.explain(None, data, out=out, scheduler=scheduler, **SMALL).ok == 4
    gc.collect()
    assert not [p for p in tasks._STOPS if p in outs]
    assert len(built) == 3 and all(r() is None for pair in built for r in pair)  # models of finished runs freed
    assert not tasks._EXPLAINERS


def test_a_run_stopped_by_ctrl_c_leaves_the_process_usable(data, tmp_path, built, monkeypatch):
    out, real, launches = tmp_path / "run", Explainer._launch, []
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()

    def launch(self, *args, **kwargs):
        launches.append(1)
        if len(launches) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Explainer, "_launch", launch)
    with pytest.raises(KeyboardInterrupt):
        camshaft.explain(None, data, out=out, scheduler="sync", **SMALL)
    assert tasks._STOPS[out].is_set()  # a partition still in flight must see it
    monkeypatch.setattr(Explainer, "_launch", real)
    summary = camshaft.explain(None, data, out=out, scheduler="sync", **SMALL)  # the lock was released
    assert summary.ok == 4 and summary.mode == "resume"
    assert out not in tasks._STOPS  # the next run cleared the stale event and, once done, dropped it
    assert camshaft.explain(None, data, out=tmp_path / "other", scheduler="threads", **SMALL).ok == 4
    assert (torch.get_num_threads(), torch.is_grad_enabled()) == (threads, grad)
    gc.collect()
    assert not tasks._EXPLAINERS and all(r() is None for pair in built for r in pair)
