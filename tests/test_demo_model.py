"""The embedded demo classifier: shipped weights, accuracy, CAM localisation, data generator."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import torch.fx

from camshaft.demo.model import (
    CLASS_NAMES, DEMO_INPUT_SIZE, WEIGHTS_PATH, build_demo_model, load_demo_model, preprocess,
)
from camshaft.demo.shapes import IMAGE_SIZE, render_sample, write_demo_dataset
from camshaft.errors import ConfigError


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_demo_model()


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(12345)
    samples = [render_sample(rng) for _ in range(200)]
    x = preprocess([s[0] for s in samples])  # (200, 3, H, W)
    return x, torch.tensor([s[1] for s in samples]), torch.tensor([s[2] for s in samples])


def test_weights_file_is_small_and_loads_weights_only():
    assert WEIGHTS_PATH.is_file()
    assert WEIGHTS_PATH.stat().st_size < 1_000_000
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    assert state.keys() == build_demo_model().state_dict().keys()


def test_loaded_model_is_in_eval_mode_with_cam_head(model):
    assert not model.training
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d)
    assert model.fc.out_features == len(CLASS_NAMES)
    feats = model.features(torch.zeros(1, 3, *DEMO_INPUT_SIZE))
    assert feats.shape == (1, model.fc.in_features, DEMO_INPUT_SIZE[0] // 8, DEMO_INPUT_SIZE[1] // 8)
    assert sum(p.numel() for p in model.parameters()) < 250_000


def test_accuracy_and_cam_pointing_game(model, held_out):
    x, y, boxes = held_out
    with torch.no_grad():
        feats = model.features(x)  # (B, K, h, w)
        logits = model.fc(torch.flatten(model.avgpool(feats), 1))
        torch.testing.assert_close(logits, model(x))
    pred = logits.argmax(1)
    assert (pred == y).float().mean().item() >= 0.9

    cams = torch.einsum("bk,bkhw->bhw", model.fc.weight[pred], feats)  # (B, h, w)
    h, w = cams.shape[1:]
    peak = cams.flatten(1).argmax(1)
    cy = (peak // w + 0.5) * x.shape[2] / h
    cx = (peak % w + 0.5) * x.shape[3] / w
    x0, y0, x1, y1 = boxes.float().unbind(1)
    tol = 8.0
    hit = (cx >= x0 - tol) & (cx <= x1 + tol) & (cy >= y0 - tol) & (cy <= y1 + tol)
    assert hit.float().mean().item() >= 0.8


def test_model_is_fx_traceable(model):
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, *DEMO_INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_seeded_init_is_reproducible():
    a = build_demo_model(generator=torch.Generator().manual_seed(3)).state_dict()
    b = build_demo_model(generator=torch.Generator().manual_seed(3)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_render_sample_is_deterministic_and_box_is_inside():
    for seed in range(20):
        im_a, label_a, box_a = render_sample(np.random.default_rng(seed))
        im_b, label_b, box_b = render_sample(np.random.default_rng(seed))
        assert np.array_equal(np.asarray(im_a), np.asarray(im_b))
        assert (label_a, box_a) == (label_b, box_b)
        assert im_a.mode == "RGB" and im_a.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert 0 <= label_a < len(CLASS_NAMES)
        x0, y0, x1, y1 = box_a
        assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
        side = max(x1 - x0, y1 - y0)
        assert 0.2 * IMAGE_SIZE <= side <= 0.5 * IMAGE_SIZE


def test_render_sample_honours_label_and_size():
    rng = np.random.default_rng(0)
    for label in range(len(CLASS_NAMES)):
        image, got, box = render_sample(rng, label=label, size=64)
        assert got == label and image.size == (64, 64)
        assert box[2] <= 64 and box[3] <= 64
    with pytest.raises(ConfigError, match="label must be in"):
        render_sample(rng, label=len(CLASS_NAMES))


def test_write_demo_dataset(tmp_path):
    manifest = write_demo_dataset(tmp_path / "demo", n=7, seed=1)
    assert manifest == tmp_path / "demo" / "manifest.csv"
    with manifest.open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["path", "label", "x0", "y0", "x1", "y1"]
        rows = list(reader)
    assert len(rows) == 7
    assert len(list((tmp_path / "demo" / "images").rglob("*.*"))) == 7
    suffixes = set()
    for path, label, *box in rows:
        assert label in CLASS_NAMES
        assert (manifest.parent / path).is_file()
        assert path.startswith(f"images/{label}/")
        x0, y0, x1, y1 = map(int, box)
        assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
        suffixes.add(path.rsplit(".", 1)[1])
    assert suffixes == {"jpg", "png"}

    again = write_demo_dataset(tmp_path / "again", n=7, seed=1)
    assert again.read_text() == manifest.read_text()
