"""An image whose scores or map come out NaN or infinite is a failure with its reason, not an 'ok' row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import camshaft
from camshaft.results import load_results

FACTORY = '''
import torch
from torch import nn


class Gate(nn.Module):
    """NaN where the mean red input passes 1 (the log of a negative number), finite below."""

    def forward(self, x):
        return x * (1.0 + torch.log(1.0 - x[:, :1].mean(dim=(2, 3), keepdim=True)))


class RedNaN(nn.Module):
    """A tiny CAM model (GAP + linear after the tap 'features') whose scores are NaN for red images."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(Gate(), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def red_nan():
    torch.manual_seed(0)
    return RedNaN()


class Spike(nn.Module):
    """Two 4x4 channels, zero but for 3e38 at (0, 0) in both when the image is mostly red."""

    def forward(self, x):
        red = (x[:, 0].mean(dim=(1, 2)) > 0.5).float()[:, None, None, None]
        a = torch.zeros(x.shape[0], 2, 4, 4, dtype=x.dtype, device=x.device)
        return a + nn.functional.pad(red.expand(-1, 2, 1, 1) * 3e38, (0, 3, 0, 3))


class RedSpike(nn.Module):
    """Finite scores (3e38 * 2 / 16), but CAM's sum over the two channels (6e38) overflows float32."""

    def __init__(self):
        super().__init__()
        self.features = Spike()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [0.5, 0.5], [-1.0, -1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def red_spike():
    return RedSpike()
'''


@pytest.fixture
def red_nan(tmp_path, monkeypatch):
    (tmp_path / "nonfinite_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "images"
    data.mkdir()
    for name, colour in [("a_dark", (10, 40, 90)), ("b_red", (255, 0, 0)), ("c_grey", (120, 120, 120)),
                         ("d_red", (140, 5, 5))]:
        Image.new("RGB", (20, 16), colour).save(data / f"{name}.png")
    return "nonfinite_models:red_nan", data


def test_nan_scores_make_the_image_a_failure_with_its_reason(red_nan, tmp_path):
    model, data = red_nan
    camshaft.explain(model, data, out=tmp_path / "run", method=["cam", "gradcam"], input_size=16,
                     mean=0.0, std=0.5, metrics="deletion", metric_steps=4, progress=False, workers=1)
    for method in ("cam", "gradcam"):
        r = load_results(tmp_path / "run" / method)
        table = r.table.set_index(r.table["path"].map(lambda p: p.rsplit("/", 1)[-1]))
        assert list(table.loc[["b_red.png", "d_red.png"], "status"]) == ["error", "error"]
        assert table.loc["b_red.png", "error"] == "the model's scores are not finite (NaN or infinity)"
        assert list(table.loc[["a_dark.png", "c_grey.png"], "status"]) == ["ok", "ok"]
        for name in table.index:
            i = int(table.loc[name, "index"])
            ok = table.loc[name, "status"] == "ok"
            assert np.isfinite(r.maps[i]).all() == ok and np.isnan(r.maps[i]).all() != ok
            assert (r.targets[i] >= 0).all() == ok
        curves = pd.read_parquet(tmp_path / "run" / method / "metrics.parquet")
        assert set(curves["index"]) == set(table.loc[table["status"] == "ok", "index"])


def test_a_map_that_overflows_fails_its_method_only(red_nan, tmp_path):
    _, data = red_nan
    camshaft.explain("nonfinite_models:red_spike", data, out=tmp_path / "run", method=["cam", "gradcam"],
                     input_size=16, mean=0.0, std=1.0, progress=False, workers=1, metrics="deletion", metric_steps=4)
    status = {}
    for method in ("cam", "gradcam"):
        r = load_results(tmp_path / "run" / method)
        table = r.table.set_index(r.table["path"].map(lambda p: p.rsplit("/", 1)[-1]))
        status[method] = dict(table["status"])
        curves = pd.read_parquet(tmp_path / "run" / method / "metrics.parquet")
        assert set(curves["index"]) == set(table.loc[table["status"] == "ok", "index"])  # none for a failed map
        if method == "cam":
            assert table.loc["b_red.png", "error"] == "the cam map is not finite (NaN or infinity)"
            assert np.isnan(r.maps[int(table.loc["b_red.png", "index"])]).all()
    assert status["cam"] == {"a_dark.png": "ok", "b_red.png": "error", "c_grey.png": "ok", "d_red.png": "error"}
    assert set(status["gradcam"].values()) == {"ok"}  # the same image's Grad-CAM (3.75e37) is finite
