"""The audit on real runs: Grad-CAM of the demo model points at the objects, a planted corner
shortcut is flagged, metrics and exemplars come back from a run folder, drift between a model and
itself is zero, and the report folder is self-contained (and opens cleanly in Chromium).
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import camshaft
from camshaft.cli import main
from camshaft.demo.model import load_demo_model
from camshaft.demo.shapes import render_sample, write_demo_dataset
from camshaft.preprocess import normalize
from camshaft.report import ExemplarSpec, audit, build_report, compute_exemplars, compute_metrics, drift, parse_metrics
from camshaft.report.faithfulness import CurveSpec, area, curves
from camshaft.report.rerun import image_batches, open_run_backend
from camshaft.report.scan import ok_rows

REPO = Path(__file__).resolve().parents[1]
SHORTCUT_SIZE = 48
SMALL = {"input_size": (SHORTCUT_SIZE, SHORTCUT_SIZE), "mean": (0.5,) * 3, "std": (0.25,) * 3, "resize": "stretch"}
DEMO = {"input_size": (96, 96), "mean": (0.5,) * 3, "std": (0.25,) * 3, "resize": "stretch"}


@pytest.fixture(scope="module", autouse=True)
def _no_reexec():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAMSHAFT_NO_REEXEC", "1")
        yield


class ShortcutNet(nn.Module):
    """Three small conv layers (features at 1/4), GAP and a linear head: CAM-shaped."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def _marked(rng: np.random.Generator, label: int) -> tuple[np.ndarray, tuple]:
    """A shapes image of a random shape; the class is a 4x4 mark in the top-left corner only."""
    image, _, box = render_sample(rng, size=SHORTCUT_SIZE)
    a = np.asarray(image).copy()
    a[:4, :4] = (255, 0, 0) if label == 0 else (0, 0, 255)
    return a, box


def _train_shortcut(path: Path) -> None:
    """~5 s on one thread: the mark is the only signal, so the model learns the corner."""
    rng = np.random.default_rng(0)
    images = np.stack([_marked(rng, i % 2)[0] for i in range(256)])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    y = torch.arange(256) % 2
    g = torch.Generator().manual_seed(0)
    net = ShortcutNet()
    for p in net.parameters():
        nn.init.normal_(p, std=0.1, generator=g) if p.dim() > 1 else nn.init.zeros_(p)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is fastest on a busy machine
    try:
        for _ in range(100):
            idx = torch.randint(0, 256, (64,), generator=g)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    torch.save(net.state_dict(), path)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    manifest = write_demo_dataset(root / "data", n=15, seed=3)
    camshaft.explain(None, manifest, out=root / "run", progress=False, batch_size=8)
    return root / "run"


@pytest.fixture(scope="module")
def other_run(tmp_path_factory, demo_run) -> Path:
    """The demo model with noise on its weights, over the same images: another model."""
    root = tmp_path_factory.mktemp("other")
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if v.dim() > 1 else v for k, v in load_demo_model().state_dict().items()}
    torch.save(state, root / "w.pt")
    data = camshaft.load_results(demo_run).attrs["data"]
    camshaft.explain("camshaft.demo.model:build_demo_model", data, weights=root / "w.pt", out=root / "run", progress=False, **DEMO)
    return root / "run"


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shortcut")
    _train_shortcut(root / "w.pt")
    rng = np.random.default_rng(7)
    (root / "data").mkdir()
    with open(root / "data" / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "x0", "y0", "x1", "y1"])
        for i in range(24):
            a, box = _marked(rng, i % 2)
            Image.fromarray(a).save(root / "data" / f"{i}.png")
            writer.writerow([f"{i}.png", str(i % 2), *box])
    camshaft.explain("test_report_runs:ShortcutNet", root / "data" / "manifest.csv", weights=root / "w.pt", out=root / "run", progress=False, **SMALL)
    return root / "run"


def test_gradcam_of_the_demo_model_points_at_the_objects(demo_run):
    a = audit(demo_run)
    assert a.has_boxes and len(a.images) == 15
    assert a.summary["pointing"] >= 0.9
    box_share = ((a.images["box_x1"] - a.images["box_x0"]) * (a.images["box_y1"] - a.images["box_y0"]) / 96**2).mean()
    assert a.summary["energy_in_box"] > 2 * box_share  # far more mass on the object than its area
    assert "border-heavy" not in set(a.flags["flag"]) and a.summary["flagged_classes"] == 0


def test_a_planted_corner_shortcut_is_flagged(shortcut_run):
    a = audit(shortcut_run)
    assert a.summary["accuracy"] == 1.0  # the model reads the mark
    flagged = a.flagged_classes
    assert len(flagged) >= 1 and "border-heavy" in flagged["flags"].iloc[0]
    c = int(flagged["class"].iloc[0])
    assert flagged["mean_border_mass"].iloc[0] >= 0.5
    mean = a.mean_maps.mean(c)  # (12, 12): the class's mean map peaks in the corner
    assert np.unravel_index(mean.argmax(), mean.shape) in {(0, 0), (0, 1), (1, 0), (1, 1)}
    mine = a.images[a.images["target"] == c]
    heavy = a.flags[(a.flags["flag"] == "border-heavy") & a.flags["index"].isin(mine["index"])]
    assert len(heavy) >= 0.75 * len(mine)
    assert a.flags["severity"].is_monotonic_decreasing


def test_several_targets_per_image_and_a_text_view(shortcut_run, tmp_path):
    camshaft.explain("test_report_runs:ShortcutNet", camshaft.load_results(shortcut_run).attrs["data"], weights=shortcut_run.parent / "w.pt", out=tmp_path / "run", targets="top:2", progress=False, **SMALL)
    tokens = {"review 1": [("a", 0.1), ("great", 0.9), ("<film>", -0.4)]}
    report = build_report(tmp_path / "run", out=tmp_path / "report", tokens=tokens)
    images = report.audit.images
    assert len(images) == 48 and (images.groupby("index")["target"].nunique() == 2).all()
    assert sorted(report.audit.mean_maps.counts.values()) == [24, 24]  # each class explained in every image
    index = (tmp_path / "report" / "index.html").read_text()
    assert 'id="tokens"' in index and "&lt;film&gt;" in index and "rgba(37, 99, 235, 0.444)" in index
    assert '<span class="badge border-heavy">' in index  # the shortcut, flagged on the page


def test_a_bad_compare_run_is_refused_before_metrics_are_written(tmp_path, demo_run, capsys):
    metrics = demo_run / "metrics.parquet"
    before = metrics.read_bytes() if metrics.exists() else None
    code = main(["report", str(demo_run), "--out", str(tmp_path / "r"), "--metrics", "deletion", "--steps", "2",
                 "--compare", str(tmp_path / "no-such-run"), "--no-progress"])
    assert code == 2 and "is not a finished camshaft run" in capsys.readouterr().err
    assert (metrics.read_bytes() if metrics.exists() else None) == before


def test_cli_errors_are_clear(tmp_path, demo_run, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "is not a finished camshaft run" in capsys.readouterr().err
    assert main(["report", str(demo_run), "--out", str(demo_run)]) == 2
    assert "is the run folder itself" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # flags out of range: test_report_audit2
        main(["report", str(demo_run), "--out", str(tmp_path / "r"), "--flag-border", "1.5"])
    assert stop.value.code == 2 and "argument --flag-border" in capsys.readouterr().err


def test_a_run_where_no_image_was_readable_gets_a_report(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"not an image")
    (data / "b.png").write_bytes(b"")
    camshaft.explain(None, data, out=tmp_path / "run", progress=False)
    assert audit(tmp_path / "run").flagged_classes.empty
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    assert "audited 0 images" in capsys.readouterr().out
    assert (tmp_path / "report" / "index.html").is_file()


def test_faithfulness_from_a_run_folder(demo_run):
    table = compute_metrics(demo_run, specs=parse_metrics("deletion,insertion", steps=6), batch_size=8)
    assert (demo_run / "metrics.parquet").exists() and len(table) == 15
    assert set(audit(demo_run).images.columns) >= {"deletion_auc", "insertion_auc"}
    results = camshaft.load_results(demo_run)
    backend = open_run_backend(results)
    rows = ok_rows(results.table).head(6)
    (indices, images), *_ = list(image_batches(rows, results.preprocess, batch_size=6))
    x = normalize(images, results.preprocess)
    maps = torch.from_numpy(np.asarray(results.maps[:6]))
    targets = torch.from_numpy(results.targets[:6].astype(np.int64))
    spec = CurveSpec("deletion", steps=6)
    direct = area(curves(backend, x, maps, targets, spec=spec))[:, 0].numpy()
    np.testing.assert_allclose(table["deletion_auc"].to_numpy()[:6], direct, rtol=1e-5)  # same numbers as the pure function
    g = torch.Generator().manual_seed(0)
    random = [area(curves(backend, x, torch.rand(maps.shape, generator=g), targets, spec=spec)).mean().item() for _ in range(2)]
    assert direct.mean() < min(random)  # Grad-CAM deletes the evidence faster than random maps


def test_exemplars_from_a_run_folder(demo_run):
    table = compute_exemplars(demo_run, specs=[ExemplarSpec("features", (0, 5))], k=3, batch_size=8)
    assert table[["channel", "rank"]].values.tolist() == [[0, 0], [0, 1], [0, 2], [5, 0], [5, 1], [5, 2]]
    for _, rows in table.groupby("channel"):
        assert rows["score"].is_monotonic_decreasing
    best = table.iloc[0]
    results = camshaft.load_results(demo_run)
    path = results.table.set_index("index").loc[best["index"], "path"]
    a = camshaft.feature_maps(None, path, tap="features", channels=[0])
    assert best["score"] == pytest.approx(float(a.maps[0].max()), rel=1e-4)
    np.testing.assert_allclose(np.asarray(best["map"]).reshape(a.maps[0].shape), a.maps[0], rtol=1e-4, atol=1e-5)


def test_drift_between_a_model_and_itself_is_zero(demo_run, other_run):
    same = drift(demo_run, demo_run)
    assert same.summary["matched"] == 15
    assert (same.images["rank_corr"] == 1.0).all() and (same.images["top_iou"] == 1.0).all()
    assert (same.images["drift"] == 0.0).all() and same.summary["changed_images"] == 0
    other = drift(demo_run, other_run)
    assert other.summary["matched"] == 15
    assert other.summary["mean_drift"] > 0.01 and other.summary["mean_rank_corr"] < 0.99
    assert other.images["rank_corr"].iloc[0] <= other.images["rank_corr"].iloc[-1] or other.images["prediction_changed"].iloc[0]


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory, demo_run, other_run) -> tuple[Path, int, str]:
    """The CLI's report with metrics, exemplars and drift: (folder, exit code, stdout)."""
    out = tmp_path_factory.mktemp("report") / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([
            "report", str(demo_run), "--out", str(out), "--compare", str(other_run), "--metrics", "deletion,insertion",
            "--steps", "4", "--exemplars", "features:1,2", "--exemplar-k", "3", "--min-rank-corr", "0.99", "--no-progress",
        ])
    return out, code, printed.getvalue()


@pytest.fixture(scope="module")
def report_dir(cli_report) -> Path:
    return cli_report[0]


def test_exit_code_follows_the_drift_threshold(cli_report, demo_run, tmp_path, capsys):
    _, code, printed = cli_report
    assert code == 1 and "ALERT: mean rank correlation" in printed
    code = main(["report", str(demo_run), "--out", str(tmp_path / "same"), "--compare", str(demo_run), "--min-rank-corr", "0.999", "--no-progress"])
    assert code == 0
    assert "mean rank correlation 1.0000" in capsys.readouterr().out


def test_the_report_folder_is_self_contained(report_dir):
    pages = sorted(report_dir.glob("*.html"))
    assert [p.name for p in pages][-1] == "index.html" and len(pages) == 6  # index + 5 classes
    for page in pages:
        text = page.read_text()
        assert "http://" not in text and "https://" not in text and "<script" not in text
        for link in re.findall(r'(?:src|href)="([^"]+)"', text):
            if link.startswith("data:"):
                continue
            target = link.split("#")[0]
            assert not Path(target).is_absolute() and ".." not in target, link
            assert target == "" or (report_dir / target).exists(), f"{page.name}: {link}"
    index = (report_dir / "index.html").read_text()
    for anchor in ("overview", "flags", "classes", "localization", "faithfulness", "drift", "exemplars", "tables"):
        assert f'id="{anchor}"' in index
    tables = {p.name for p in (report_dir / "tables").iterdir()}
    assert {"images.parquet", "classes.csv", "flags.csv", "summary.json", "drift_images.parquet", "exemplars.csv"} <= tables
    assert len(list((report_dir / "img").glob("ov_*.png"))) >= 10


@pytest.mark.skipif(shutil.which("chromium") is None and shutil.which("google-chrome") is None, reason="no Chromium installed")
def test_the_report_opens_in_chromium_without_errors(report_dir, tmp_path):
    check = [sys.executable, str(REPO / "scripts" / "check_report.py")]
    ok = subprocess.run([*check, str(report_dir), "--screenshots", str(tmp_path / "shots"), "--pages", "2"], capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shot = Image.open(tmp_path / "shots" / "index.png")
    assert shot.width == 1280 and shot.height > 2000
    broken = tmp_path / "broken"
    shutil.copytree(report_dir, broken)
    next((broken / "img").glob("ov_*.png")).unlink()
    page = broken / "index.html"
    page.write_text(page.read_text().replace("</main>", "<script>console.error('boom')</script></main>"))
    bad = subprocess.run([*check, str(broken), "--pages", "1"], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 1
    assert "console error: boom" in bad.stdout and "broken image" in bad.stdout
