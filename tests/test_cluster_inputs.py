"""A dask.distributed run hands its workers the model and class names the client loaded.

The workers read the data and write the results on storage they share; the checkpoint and the
class-names file the user named may be on the client's disk only, or be replaced while the run
goes on. Here both are deleted as soon as the client has loaded them: the workers must not need them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

import camshaft
from camshaft.demo.shapes import write_demo_dataset
from camshaft.pipeline import run as pipeline_run

NAMES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    images = write_demo_dataset(folder / "data", n=6, seed=5).parent / "images"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=len(NAMES)).state_dict(), folder / "tuned.pth")
    (folder / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return images, folder / "tuned.pth", folder / "classes.txt"


def _explain(images, weights, names, out, scheduler):
    return camshaft.explain("resnet18", images, out=out, weights=weights, class_names=names, input_size=64,
                            targets="top:2", scheduler=scheduler, partition_size=2, batch_size=2, progress=False)


def test_workers_need_neither_the_users_checkpoint_nor_class_names_file(inputs, tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    images, weights, names = inputs
    _explain(images, weights, names, tmp_path / "local", "threads")
    local = camshaft.load_results(tmp_path / "local")

    hidden = {p: tmp_path / f"hidden-{p.name}" for p in (weights, names)}
    original = pipeline_run._worker_job

    def hide_the_users_files(job, explainer, state):  # the client has loaded them: the workers must not read them
        worker_job = original(job, explainer, state)
        for path, aside in hidden.items():
            path.rename(aside)
        return worker_job

    monkeypatch.setattr(pipeline_run, "_worker_job", hide_the_users_files)
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
            summary = _explain(images, weights, names, tmp_path / "cluster", cluster.scheduler_address)
    finally:
        for path, aside in hidden.items():
            aside.rename(path)
    assert (summary.explained, summary.failed) == (6, 0)
    cluster_results = camshaft.load_results(tmp_path / "cluster")
    np.testing.assert_allclose(cluster_results.maps[:], local.maps[:], rtol=1e-5, atol=1e-7)
    assert cluster_results.table["target_names"].map(list).tolist() == local.table["target_names"].map(list).tolist()
    assert set(np.concatenate(cluster_results.table["target_names"].to_numpy())) <= set(NAMES)
    assert list(cluster_results.class_names) == NAMES
