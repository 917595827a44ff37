"""Audit of layer feature maps and dataset exemplars on a colour model whose channel k is colour k.

``ColourNet``'s tap ``features`` is a 1x1 convolution: channel 0 = R, 1 = G, 2 = B, 3 = -R of the
[0, 1] input (mean 0, std 1), so every activation, score and ranking is known in closed form.
``NaNNet`` is the same model whose maps are all NaN for an image with a strong blue pixel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

import camshaft
from camshaft.engine.featmaps import FeatureMaps
from camshaft.errors import ConfigError
from camshaft.preprocess import Preprocess, normalize, prepare
from camshaft.report.exemplars import ExemplarCollector, ExemplarSpec, merge_tables
from camshaft.report.topk import TopK
from conftest import run_cli

PLAIN = {"mean": 0.0, "std": 1.0}  # the input is the [0, 1] pixels: activations are colour values
COLOUR_MODEL = "test_featmaps_exemplars_audit:build_colour"
NAN_MODEL = "test_featmaps_exemplars_audit:build_nan"
NAN = float("nan")


class ColourNet(nn.Module):
    """features: channel k = colour k (R, G, B), channel 3 = -R; GAP + linear head (class 0 = R, 1 = G)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            w = torch.zeros(4, 3, 1, 1)
            w[0, 0] = w[1, 1] = w[2, 2] = 1.0
            w[3, 0] = -1.0
            self.features.weight.copy_(w)
            self.features.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class _Poisoned(nn.Module):
    """The colour convolution, all NaN for an image whose blue channel passes 0.5 anywhere."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        flag = x[:, 2:3].amax(dim=(2, 3), keepdim=True) > 0.5  # (B, 1, 1, 1)
        return self.conv(x).masked_fill(flag, NAN)


def build_colour() -> nn.Module:
    return ColourNet()


def build_dead() -> nn.Module:
    """Twelve channels, eleven of them dead (all zero): only channel 5 (= R) is alive."""
    net = nn.Sequential()
    net.features = nn.Conv2d(3, 12, 1)
    with torch.no_grad():
        net.features.weight.zero_()
        net.features.bias.zero_()
        net.features.weight[5, 0] = 1.0
    net.pool, net.flat, net.fc = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 2)
    return net


def build_nan() -> nn.Module:
    net = ColourNet()
    net.features = _Poisoned(net.features)
    return net


# ------------------------------------------------------------------------------------------ exemplars


def test_a_nan_image_never_pushes_a_real_exemplar_out():
    """Old code: a descending sort put NaN first, so a NaN image took a place in every partition's top k."""
    acts = torch.tensor([NAN, 3.0, 2.0, 1.0]).view(4, 1, 1, 1)
    acc = TopK(k=2)
    acc.update(acts, [0, 1, 2, 3])
    r = acc.result()
    assert r.indices.tolist() == [[1, 2]] and r.scores.tolist() == [[3.0, 2.0]]
    # fewer real images than k: the NaN one comes last, and the table leaves it out
    collector = ExemplarCollector([ExemplarSpec("t")], k=5)
    collector.update({"t": acts[:2]}, [0, 1])
    collector.update({"t": torch.tensor([float("-inf")]).view(1, 1, 1, 1)}, [7])
    table = collector.table()
    assert table[["rank", "index"]].values.tolist() == [[0, 1], [1, 7]]
    # a table holding a NaN row (written by an older version) is merged without it
    stale = pd.DataFrame({**table.iloc[0].to_dict(), "index": 0, "score": NAN, "rank": 0}, index=[0])
    merged = merge_tables([stale, table], k=5)
    assert merged["index"].tolist() == [1, 7] and merged["rank"].tolist() == [0, 1]


def test_a_channel_given_twice_lists_each_image_once():
    """Old code: ``layer4:3,3`` kept both, and the merged table showed every image of channel 3 twice."""
    assert ExemplarSpec.parse("t:3,1,3").channels == (3, 1)
    collector = ExemplarCollector([ExemplarSpec.parse("t:0,0")], k=2)
    collector.update({"t": torch.tensor([1.0, 3.0, 2.0]).view(3, 1, 1, 1)}, [0, 1, 2])
    merged = merge_tables([collector.table()], k=2)
    assert merged[["channel", "rank", "index"]].values.tolist() == [[0, 0, 1], [0, 1, 2]]


# image i: solid colour (R, G, B); image 0 is poisoned (blue) and has the highest red; 1-3 are the
# next reds, all in the first partition (of 4) with it; image 10 cannot be read.
REDS = [250, 240, 230, 220, 200, 50, 120, 10, 180, 90]


def _colour_data(folder):
    folder.mkdir()
    for i, r in enumerate(REDS):
        colour = (r, 0, 255) if i == 0 else (r, 255 - r, 0)
        Image.fromarray(np.full((12, 18, 3), colour, np.uint8)).save(folder / f"{i:02d}.png")
    (folder / "zz_bad.png").write_text("not an image")
    return folder


def _expected(k: int) -> list[list]:
    """(channel, rank, index, score) in closed form: image 0 (NaN) and the bad file never appear."""
    real = range(1, len(REDS))
    scores = {
        0: {i: REDS[i] / 255 for i in real},
        1: {i: (255 - REDS[i]) / 255 for i in real},
        2: {i: 0.0 for i in real},  # a tie everywhere: the lowest indices win
        3: {i: -REDS[i] / 255 for i in real},
    }
    rows = []
    for c, by_image in scores.items():
        best = sorted(by_image, key=lambda i: (-by_image[i], i))[:k]
        rows += [[c, rank, i, by_image[i]] for rank, i in enumerate(best)]
    return rows


def _exemplar_rows(out) -> list[list]:
    table = pd.read_parquet(out / "exemplars.parquet")
    return [[int(c), int(r), int(i), float(s)] for c, r, i, s in table[["channel", "rank", "index", "score"]].values]


def test_exemplars_rank_exactly_across_partitions_resume_and_fresh_runs(tmp_path):
    data = _colour_data(tmp_path / "data")
    kw = dict(method="cam", input_size=8, resize="stretch", exemplars="features", exemplar_k=2, progress=False, **PLAIN)
    out = tmp_path / "run"
    s = camshaft.explain(NAN_MODEL, data, out=out, partition_size=4, batch_size=3, **kw)
    assert (s.images, s.failed) == (11, 2)  # the bad file, and image 0 (its scores are NaN)
    got, want = _exemplar_rows(out), _expected(2)
    assert [g[:3] for g in got] == [w[:3] for w in want]
    np.testing.assert_allclose([g[3] for g in got], [w[3] for w in want], rtol=1e-6, atol=1e-7)
    table = pd.read_parquet(out / "exemplars.parquet")
    assert table["map"].map(lambda m: bool(np.isfinite(m).all())).all() and set(table["reduce"]) == {"max"}

    # a run killed before its first partition was marked done, then rerun: the same exemplars
    (out / "_camshaft" / "done" / "part-000000.json").unlink()
    (out / "exemplars.parquet").unlink()
    again = camshaft.explain(NAN_MODEL, data, out=out, partition_size=4, batch_size=3, **kw)
    assert again.mode == "resume" and again.explained == 4 and _exemplar_rows(out) == got

    # one partition, another batch size: the same exemplars
    whole = tmp_path / "whole"
    camshaft.explain(NAN_MODEL, data, out=whole, batch_size=32, **kw)
    assert _exemplar_rows(whole) == got


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--exemplars", "features:1,4"],
         "exemplars of tap 'features': channels [4] out of range: this tap has channels 0..3"),
        (["--exemplars", "features:1", "--exemplars", "features:2"], "taps ['features'] given more than once"),
        (["--exemplars", "nosuch"], "unknown tap 'nosuch'"),
    ],
)
def test_bad_exemplar_flags_fail_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    """Old code: a channel out of range or a tap given twice failed in the first partition, leaving a run folder."""
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")
    image = tmp_path / "a.png"
    Image.new("RGB", (10, 10), (200, 10, 10)).save(image)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "explain", "test_featmaps_exemplars_audit:build_colour", image, "--out", out,
                           "--method", "cam", "--input-size", "8", "--no-progress", *flags)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


# --------------------------------------------------------------------------------------- feature maps


def _picture(path, size=(70, 30)):
    """A wide image: background (150, 80, 20) and a brighter red block on the right."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[...] = (150, 80, 20)
    a[4:12, size[0] - 20 : size[0] - 8, 0] = 250
    Image.fromarray(a).save(path)
    return path


def test_featmaps_are_the_tap_channels_and_top_is_in_order(tmp_path):
    path = _picture(tmp_path / "wide.png")
    pre = {"input_size": (16, 24), "resize": "letterbox", **PLAIN}
    fm = camshaft.feature_maps("test_featmaps_exemplars_audit:build_colour", path, tap="features", top=3, **pre)
    assert fm.channels == [0, 1, 2]  # R, G, B means in order (channel 3 = -R is negative)
    everything = camshaft.feature_maps("test_featmaps_exemplars_audit:build_colour", path, channels=[3, 1], **pre)
    assert everything.channels == [3, 1] and everything.maps.shape == (2, 16, 24)

    net, seen = ColourNet().eval(), {}
    handle = net.features.register_forward_hook(lambda m, i, o: seen.setdefault("a", o.detach()))
    try:
        x, geom = prepare(Image.open(path).convert("RGB"), Preprocess(input_size=(16, 24), mean=(0.0,) * 3,
                                                                       std=(1.0,) * 3, resize="letterbox"))
        with torch.no_grad():
            net(normalize(x[None], fm.preprocess))
    finally:
        handle.remove()
    np.testing.assert_allclose(fm.maps, seen["a"][0, [0, 1, 2]].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(everything.maps[0], -x[0].float().numpy() / 255, rtol=1e-6, atol=1e-7)  # no off-by-one
    assert fm.geometry == geom and [o.size for o in fm.overlays()] == [(70, 30)] * 3


def test_top_breaks_ties_to_the_lower_channel(tmp_path):
    """Old code: torch.topk returned tied (dead) channels in an arbitrary order, e.g. [5, 8, 6, 7]."""
    path = _picture(tmp_path / "wide.png")
    fm = camshaft.feature_maps("test_featmaps_exemplars_audit:build_dead", path, tap="features", top=6,
                               input_size=8, **PLAIN)
    assert fm.channels == [5, 0, 1, 2, 3, 4]


@pytest.mark.parametrize("resize", ["letterbox", "center-crop"])
def test_featmap_overlays_equal_the_explain_overlays_of_the_same_map(tmp_path, resize):
    """CAM of class 0 is channel 0 here: the two paths must draw the same pixels on a wide image."""
    data = tmp_path / "data"
    data.mkdir()
    path = _picture(data / "wide.png")
    pre = {"input_size": (16, 24), "resize": resize, **PLAIN}
    fm = camshaft.feature_maps("test_featmaps_exemplars_audit:build_colour", path, tap="features", channels=[0], **pre)
    camshaft.explain("test_featmaps_exemplars_audit:build_colour", data, out=tmp_path / "run", method="cam",
                     targets="0", overlays=True, progress=False, **pre)
    [written] = sorted((tmp_path / "run" / "overlays").rglob("*.png"))
    np.testing.assert_array_equal(np.asarray(fm.overlays()[0]), np.asarray(Image.open(written).convert("RGB")))
    np.testing.assert_array_equal(np.asarray(camshaft.load_results(tmp_path / "run").maps[0, 0]), fm.maps[0])


def test_featmap_overlay_is_jet_blended_0_6_image_0_4_heat(tmp_path):
    """A stretch to the image's own size: the overlay is 0.6 image + 0.4 jet(map / max) pixel for pixel."""
    import matplotlib

    path = _picture(tmp_path / "wide.png", size=(24, 16))
    fm = camshaft.feature_maps("test_featmaps_exemplars_audit:build_colour", path, tap="features", channels=[0],
                               input_size=(16, 24), resize="stretch", **PLAIN)
    image = np.asarray(Image.open(path).convert("RGB")).astype(np.float32)
    m = fm.maps[0] / fm.maps[0].max()  # the map is already at the image's size: bicubic resizes change nothing
    heat = matplotlib.colormaps["jet"](m, bytes=True)[..., :3].astype(np.float32)
    want = np.clip(np.rint(0.6 * image + 0.4 * heat), 0, 255)
    assert np.abs(np.asarray(fm.overlays()[0]).astype(np.float32) - want).max() <= 1


@pytest.mark.parametrize(("n", "columns", "rows"), [(1, 1, 1), (3, 2, 2), (16, 4, 4), (17, 5, 4)])
def test_the_grid_is_near_square_row_by_row(n, columns, rows):
    pre = Preprocess(input_size=(8, 16), mean=(0.0,) * 3, std=(1.0,) * 3, resize="stretch")
    picture = Image.new("RGB", (32, 16))
    maps = np.zeros((n, 4, 8), np.float32)
    maps[:, 0, 0] = 1.0  # a hot top-left corner in every tile
    fm = FeatureMaps("t", list(range(n)), maps, picture, prepare(picture, pre)[1], pre)
    grid = np.asarray(fm.grid(tile=40))
    tile_w, tile_h, pad = 40, 20, 2
    assert grid.shape[1] == columns * tile_w + (columns + 1) * pad
    caption = (grid.shape[0] - (rows + 1) * pad) / rows - tile_h
    assert caption == int(caption) and 0 < caption < 20  # a caption under each row of tiles
    for i in range(n + 1):
        row, col = divmod(i, columns)
        x, y = pad + col * (tile_w + pad), pad + row * (tile_h + int(caption) + pad)
        corner = grid[y + 1, x + 1] if row < rows else None
        if i < n:  # jet's hot end (red) at the corner of tile i, its cold end (blue) away from it
            assert corner[0] > 100 and corner[2] < 50 and grid[y + tile_h - 2, x + tile_w - 2][2] > 100
        elif corner is not None and col < columns:
            assert corner.tolist() == [255, 255, 255]  # the empty cells stay white


def test_featmap_selection_errors_are_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")
    path = _picture(tmp_path / "wide.png")
    model = "test_featmaps_exemplars_audit:build_colour"
    with pytest.raises(ConfigError, match="channels is empty"):  # old code: a grid that could not be drawn, later
        camshaft.feature_maps(model, path, channels=[])
    with pytest.raises(ConfigError, match=r"channels \[4, -1\] out of range: this tap has channels 0\.\.3"):
        camshaft.feature_maps(model, path, tap="features", channels=[0, 4, -1])
    out = tmp_path / "fm"
    for flags, message in [
        (["--top", "0"], "--top: expected a positive integer"),
        (["--tap", "nosuch"], "unknown tap 'nosuch'"),
        (["--channels", "2,x"], "expected channel indices"),
    ]:
        code, _, err = run_cli(capsys, "featmaps", model, path, "--out", out, *flags)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not out.exists()


def test_letterbox_padding_never_scores_an_exemplar(tmp_path):
    """Channel 3 (= -R) is 0 on the black padding and below 0 on any red image: old code ranked a padded
    image by its padding (0) above a square one; now only the cells showing an image score, in explain's
    exemplars and in the report's compute_exemplars alike (as the table's map statistics already did)."""
    from camshaft.report.exemplars import compute_exemplars

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (16, 16), (40, 0, 0)).save(data / "a_square.png")  # -0.16 everywhere
    Image.new("RGB", (32, 8), (200, 0, 0)).save(data / "b_wide.png")  # -0.78 on the image, 0 on the padding
    kw = dict(method="cam", input_size=8, resize="letterbox", exemplars="features:3", exemplar_k=2,
              progress=False, **PLAIN)
    camshaft.explain(COLOUR_MODEL, data, out=tmp_path / "run", **kw)
    got = _exemplar_rows(tmp_path / "run")
    assert [g[:3] for g in got] == [[3, 0, 0], [3, 1, 1]]
    np.testing.assert_allclose([g[3] for g in got], [-40 / 255, -200 / 255], rtol=1e-5)
    later = compute_exemplars(tmp_path / "run", specs=[ExemplarSpec.parse("features:3")], k=2)
    assert later[["channel", "rank", "index"]].values.tolist() == [[3, 0, 0], [3, 1, 1]]


def build_padding_fan() -> nn.Module:
    """features: channel 0 = R, channel 1 = 0.5 - R: on black letterbox padding channel 1 is 0.5."""
    net = ColourNet()
    with torch.no_grad():
        net.features.weight.zero_()
        net.features.weight[0, 0], net.features.weight[1, 0] = 1.0, -1.0
        net.features.bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
    return net


def test_featmaps_top_ranks_channels_by_the_image_not_its_padding(tmp_path):
    """A wide image letterboxed into 8x8 fills a quarter of it: over the whole map channel 1 (0.35) beat
    channel 0 (0.15); over the cells showing the image channel 0 (0.6) leads channel 1 (-0.1)."""
    image = tmp_path / "wide.png"
    Image.new("RGB", (32, 8), (153, 0, 0)).save(image)
    fm = camshaft.feature_maps("test_featmaps_exemplars_audit:build_padding_fan", image, tap="features", top=4,
                               input_size=8, resize="letterbox", **PLAIN)
    assert fm.channels == [0, 2, 3, 1]  # channels 2 and 3 are 0 everywhere (ties to the lower one)
