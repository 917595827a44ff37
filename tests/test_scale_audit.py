"""The report and the run readers at dataset scale: no work per class per map, no table scan per lookup, no
re-reading of a run per chunk of the other, and index pages whose size does not grow with the class count.

Runs are built with the project's writers (a maps store, a results table), small: each test counts the work
(calls, chunk reads, rows shown) instead of timing it.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import camshaft
from camshaft.preprocess import Preprocess
from camshaft.report import ReportOptions, audit, build_report, drift
from camshaft.report import scan as scan_module
from camshaft.report.scan import MeanMaps, label_indices, normalize_maps, target_scores
from camshaft.results import Results
from camshaft.writers.maps_store import MAPS, create_store, write_rows
from camshaft.writers.table import write_table

K, H, W = 2, 4, 4


def _run(root: Path, n: int, *, classes: int, chunk: int, order=None, corner: bool = False) -> Path:
    """A finished run of ``n`` images in ``root``, their files beside it; row i holds image ``order[i]``."""
    image = np.arange(n) if order is None else np.asarray(order)
    names = [f"c{c}" for c in range(classes)]
    pre = Preprocess(input_size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1), resize="stretch")
    attrs = {"method": "cam", "tap": "t", "targets": f"top:{K}", "model": "m", "model_spec": "demo", "weights": None,
             "data": str(root / "data"), "backend": "eager", "preprocess": pre.to_dict(), "class_names": names}
    create_store(root / "maps.zarr", n_images=n, map_shape=(K, H, W), chunk=chunk, attrs=attrs)
    maps = np.random.default_rng(0).random((n, K, H, W)).astype(np.float32)[image]  # (n, K, h, w) per image
    if corner:  # every map hot in its top-left cell: border-heavy
        maps[:] = 0.01
        maps[:, :, 0, 0] = 1.0
    targets = ((image[:, None] * 7 + np.arange(K)[None]) % classes).astype(np.int32)
    for start in range(0, n, chunk):
        write_rows(root / "maps.zarr", start, maps[start : start + chunk], targets[start : start + chunk])
    rows = [{"index": i, "path": str(root.parent / f"img_{img}.png"), "status": "ok", "label": names[t[0]], "width": 32,
             "height": 32, "top5_classes": [int(t[0]), int(t[1]), (int(t[0]) + 3) % classes],
             "top5_scores": [0.5, 0.3, 0.2], "targets": t.tolist(), "target_names": [names[c] for c in t]}
            for i, (img, t) in enumerate(zip(image, targets, strict=True))]
    write_table(rows, root / "results.parquet")
    return root


class _Counting:
    """A maps array that counts the chunks its reads decode."""

    def __init__(self, array):
        self.array, self.decoded = array, 0
        self.shape, self.chunks = array.shape, array.chunks

    def get_orthogonal_selection(self, selection):
        self.decoded += len(np.unique(np.asarray(selection[0]) // self.chunks[0]))
        return self.array.get_orthogonal_selection(selection)

    def __getitem__(self, key):
        rows = np.arange(self.shape[0])[key if isinstance(key, slice) else np.s_[key:key + 1]]
        self.decoded += len(np.unique(rows // self.chunks[0]))
        return self.array[key]


class _Group:
    def __init__(self, group):
        self.group, self.attrs, self.maps = group, group.attrs, _Counting(group[MAPS])

    def __getitem__(self, name):
        return self.maps if name == MAPS else self.group[name]


def _counting(results: Results) -> Results:
    return Results(results.out, results.table, _Group(results.group))


def test_drift_decodes_each_chunk_of_a_run_listing_the_images_in_another_order_once(tmp_path):
    """Was: B read per chunk of A, and with B in another order each read touched all of B: 4 x 16 chunks here,
    (n / 256)^2 in general (175 s instead of 17 s at 10^5 images, hours at 10^6)."""
    n, chunk = 1024, 64
    a = _run(tmp_path / "a", n, classes=10, chunk=chunk)
    b = _run(tmp_path / "b", n, classes=10, chunk=chunk, order=np.random.default_rng(1).permutation(n))
    ra, rb = _counting(camshaft.load_results(a)), _counting(camshaft.load_results(b))
    d = drift(ra, rb)
    assert rb.group.maps.decoded == n // chunk and ra.group.maps.decoded == n // chunk
    assert d.summary["matched"] == n and np.all(d.images["rank_corr"] == 1.0)  # the same maps, matched by path
    assert np.array_equal(np.sort(d.images["index_b"].unique()), np.arange(n))


def test_drift_holds_a_bounded_share_of_the_other_run(tmp_path, monkeypatch):
    n, chunk = 1024, 64
    a = _run(tmp_path / "a", n, classes=10, chunk=chunk)
    b = _run(tmp_path / "b", n, classes=10, chunk=chunk, order=np.random.default_rng(2).permutation(n))
    whole = drift(a, b)
    drift_module = importlib.import_module("camshaft.report.drift")  # the package exports drift() by that name
    monkeypatch.setattr(drift_module, "READ_BYTES", 1)  # one chunk of A's rows at a time
    rb = _counting(camshaft.load_results(b))
    pd.testing.assert_frame_equal(drift(camshaft.load_results(a), rb).images, whole.images)
    assert rb.group.maps.decoded <= 4 * (n // chunk)  # 4 steps of 256 rows, each reading at most all of B


def test_mean_maps_select_each_class_once_not_every_map_per_class():
    """Was: a mask over all the chunk's maps for each class in it, O(maps x classes) per chunk."""

    class Targets(np.ndarray):
        compared = 0

        def __eq__(self, other):
            Targets.compared += 1
            return super().__eq__(other)

    rng = np.random.default_rng(0)
    maps = rng.standard_normal((600, 3, 3)).astype(np.float32)
    targets = rng.integers(0, 300, 600)
    means = MeanMaps((3, 3))
    means.add(maps[:250], targets[:250].view(Targets))
    means.add(maps[250:], targets[250:].view(Targets))
    assert Targets.compared == 0
    norm = normalize_maps(maps)
    for c in np.unique(targets):
        np.testing.assert_allclose(means.mean(c), norm[targets == c].mean(axis=0), rtol=1e-6)
        assert means.counts[int(c)] == int((targets == c).sum())


def test_labels_are_looked_up_once_each_not_once_per_image(monkeypatch):
    """Was: a lookup through the class names (a list scan) per image: O(images x classes)."""
    calls = []
    real = scan_module.class_index
    monkeypatch.setattr(scan_module, "class_index", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    names = [f"c{i}" for i in range(50)] + ["7"]
    table = pd.DataFrame({"label": ["c3", None, "7", "c3", "nope", "12", "c3", "7"] * 100})
    assert label_indices(table, names).tolist()[:8] == [3, -1, 50, 3, -1, 12, 3, 50]
    assert len(calls) == 4  # c3, 7, nope, 12


def test_target_scores_by_hand():
    classes = [np.array([3, 1, 2], np.int32), np.array([0, 2, 1], np.int32)]
    scores = [np.array([0.5, 0.3, 0.2], np.float32), np.array([0.6, 0.3, 0.1], np.float32)]
    got = target_scores(classes, scores, np.array([[1, 3], [9, 0]]))
    np.testing.assert_array_equal(got, [[np.float32(0.3), 0.5], [np.nan, np.float32(0.6)]])
    short = target_scores([np.array([3, 1]), np.array([0, 2, 1])], [np.array([0.5, 0.3]), np.array([0.6, 0.3, 0.1])],
                          np.array([[1, 2], [1, 0]]))  # top lists of other lengths
    np.testing.assert_array_equal(short, [[0.3, np.nan], [0.1, 0.6]])


def test_results_find_images_without_scanning_the_table_per_call(tmp_path, monkeypatch):
    """Was: ``isin`` over every path per ``index_of``, a copy of the table per ``map``: a loop over a run's
    images by path was quadratic (3 ms a call at 10^5 images, 0.04 ms now)."""
    root = _run(tmp_path / "r", 40, classes=5, chunk=16, order=np.arange(40)[::-1])
    results = camshaft.load_results(root)
    first = results.index_of(str(root.parent / "img_3.png"))
    scans = []
    for name in ("isin", "set_index"):
        cls = pd.Series if name == "isin" else pd.DataFrame
        real = getattr(cls, name)
        counted = lambda self, *a, real=real, name=name, **kw: scans.append(name) or real(self, *a, **kw)  # noqa: E731
        monkeypatch.setattr(cls, name, counted)
    found = [results.index_of(str(root.parent / f"img_{i}.png")) for i in range(40)]
    maps = [results.map(i, normalize=True) for i in range(40)]
    assert not scans
    assert first == 36 and found == list(range(39, -1, -1))
    assert maps[5].shape == (K, H, W) and np.allclose(maps[5].max(axis=(1, 2)), 1.0)
    results.table = results.table.iloc[::-1].reset_index(drop=True)  # a new table: lookups follow it
    assert results.index_of(str(root.parent / "img_3.png")) == 36
    assert results.map(36, upsample=True).shape == (K, 32, 32)
    with pytest.raises(camshaft.errors.ConfigError, match="no image"):
        results.index_of(str(root.parent / "img_99.png"))


def test_class_tables_on_the_index_are_bounded_whatever_the_class_count(tmp_path):
    """Was: every flagged class (a row and a rendered mean map each) and every class's drift on index.html."""
    a = _run(tmp_path / "a", 120, classes=60, chunk=32, corner=True)
    b = _run(tmp_path / "b", 120, classes=60, chunk=32, corner=True, order=np.arange(120)[::-1])
    report = build_report(a, out=tmp_path / "rep", compare=b, options=ReportOptions(class_pages=5, examples=1))
    assert len(report.audit.flagged_classes) == 60 and len(report.drift.classes) == 60
    page = (tmp_path / "rep" / "index.html").read_text()
    flags = page[page.index('id="flags"') : page.index('id="classes"')]
    drift_part = page[page.index('id="drift"') :]
    drift_table = drift_part[drift_part.index("Per class") : drift_part.index("Most changed")]
    assert flags.split("Flagged images")[0].count("<tr>") == 1 + 5  # the header and the 5 worst
    assert drift_table.count("<tr>") == 1 + 5
    assert "Showing the 5 worst of 60 classes; all are in tables/classes.csv" in flags
    assert "all are in tables/drift_classes.csv" in drift_table
    assert len(list((tmp_path / "rep" / "img").glob("mean_*.png"))) == 5
    assert len(pd.read_csv(tmp_path / "rep" / "tables" / "drift_classes.csv")) == 60  # the numbers stay whole
    assert re.search(r"Flagged classes \(60\)", flags)


@pytest.mark.slow  # about 15 s: two runs of 50,000 images, one in the order of the other shuffled
def test_audit_and_drift_of_a_large_run_read_each_chunk_once(tmp_path):
    n, chunk = 50_000, 256
    a = _run(tmp_path / "a", n, classes=1000, chunk=chunk)
    b = _run(tmp_path / "b", n, classes=1000, chunk=chunk, order=np.random.default_rng(3).permutation(n))
    ra, rb = _counting(camshaft.load_results(a)), _counting(camshaft.load_results(b))
    assert len(audit(ra).images) == n * K and ra.group.maps.decoded == n // chunk + 1
    d = drift(ra, rb)
    assert rb.group.maps.decoded == -(-n // chunk) and d.summary["matched"] == n
