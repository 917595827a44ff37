"""Preprocessing geometry (maps land where the model looked), normalisation, OOM back-off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from camshaft.engine.postprocess import map_stats, to_original
from camshaft.engine.explainer import BackOff
from camshaft.errors import ConfigError
from camshaft.preprocess import Preprocess, geometry, normalize, prepare


def marked_image(w: int, h: int, x: int, y: int) -> Image.Image:
    """Black image with one white 4x4 square whose top-left corner is (x, y)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[y : y + 4, x : x + 4] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("resize", ["stretch", "center-crop", "letterbox"])
def test_a_point_maps_back_to_where_it_was(resize):
    pre = Preprocess(input_size=(32, 48), resize=resize)
    image = marked_image(100, 60, 46, 28)  # the mark is near the centre, seen in every mode
    tensor, geom = prepare(image, pre)
    assert tensor.shape == (3, 32, 48) and tensor.dtype == torch.uint8
    ys, xs = np.nonzero(tensor[0].numpy() > 128)
    x0, y0 = geom.to_original(xs.mean() + 0.5, ys.mean() + 0.5)
    assert abs(x0 - 48) < 2.5 and abs(y0 - 30) < 2.5


def test_center_crop_sees_the_middle_and_letterbox_sees_everything():
    crop = geometry((200, 100), Preprocess(input_size=(50, 50), resize="center-crop"))
    assert crop.region == (50.0, 0.0, 150.0, 100.0)
    box = geometry((200, 100), Preprocess(input_size=(50, 50), resize="letterbox"))
    assert box.region == (0, 0, 200, 100) and box.content == (0, 12, 50, 37)


def test_letterbox_padding_normalises_to_zero():
    pre = Preprocess(input_size=(20, 20), resize="letterbox")
    tensor, _ = prepare(Image.new("RGB", (40, 10), (200, 10, 10)), pre)
    x = normalize(tensor.unsqueeze(0), pre)
    assert x[0, :, 0, :].abs().max() < 0.02  # top padding rows


def test_map_on_the_original_image_follows_the_crop():
    """A map hot in its left column lands at the left edge of the centre crop, not the image."""
    pre = Preprocess(input_size=(8, 8), resize="center-crop")
    geom = geometry((32, 16), pre)  # the model sees x in [8, 24)
    m = np.zeros((4, 4), np.float32)
    m[:, 0] = 1.0
    placed = to_original(m, geom, pre.input_size)
    assert placed.shape == (16, 32)
    assert placed[:, :8].max() == 0 and placed[:, 24:].max() == 0  # outside the crop: nothing
    assert placed[:, 8:12].mean() > placed[:, 16:24].mean()
    stats = map_stats(m[None], geom, pre.input_size)
    assert stats["map_argmax_x"] == [10.0] and stats["map_argmax_y"] == [2.0]  # cell centre (1, 1) of the 8x8 input


def test_preprocess_validation_collects_every_problem():
    with pytest.raises(ConfigError, match="std must be positive.*resize must be one of"):
        Preprocess(std=(1.0, 0.0, 1.0), resize="zoom")


def test_back_off_halves_batches_on_out_of_memory():
    seen = []

    def fn(batch):
        seen.append(len(batch))
        if len(batch) > 3:
            raise torch.OutOfMemoryError("simulated")
        return [{"index": b} for b in batch], {b: b for b in batch}

    run = BackOff(fn)
    with pytest.warns(UserWarning, match="out of memory at batch size 8"):
        rows, maps = run(list(range(8)))
    assert [r["index"] for r in rows] == list(range(8)) and len(maps) == 8
    rows, _ = run(list(range(8, 16)))  # later batches start at the size that fitted
    assert [r["index"] for r in rows] == list(range(8, 16))
    assert seen == [8, 4, 2, 2, 2, 2, 2, 2, 2, 2]


def test_back_off_gives_up_at_one_image():
    def fn(batch):
        raise torch.OutOfMemoryError("simulated")

    with pytest.raises(torch.OutOfMemoryError), pytest.warns(UserWarning):
        BackOff(fn)([1, 2])


def test_normalize_takes_a_channels_last_view_and_returns_the_layout_asked_for():
    """The explainer uploads decoded (B, H, W, 3) pixels as one block and changes layout after."""
    pre = Preprocess((5, 7), mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    nhwc = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    view = nhwc.permute(0, 3, 1, 2)  # NCHW indices over NHWC memory
    expected = (view.contiguous().float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
    plain = normalize(view, pre)
    assert plain.is_contiguous()
    torch.testing.assert_close(plain, expected, rtol=1e-6, atol=1e-6)
    cl = normalize(view, pre, memory_format=torch.channels_last)
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    torch.testing.assert_close(cl, expected, rtol=1e-6, atol=1e-6)


def test_map_statistics_leave_out_the_letterbox_padding():
    """A map hottest over the padding: its argmax, max and mean come from the cells on the image."""
    pre = Preprocess(input_size=(8, 8), resize="letterbox")
    geom = geometry((32, 16), pre)  # the image fills rows 2..6 of the 8x8 input
    assert geom.content == (0, 2, 8, 6)
    m = np.zeros((4, 4), np.float32)
    m[0, :] = 5.0  # the top row of cells: centre y = 1, padding
    m[2, 3] = 1.0  # on the image: centre (7, 5) in the input
    stats = map_stats(m[None], geom, pre.input_size)
    assert stats["map_max"] == [1.0] and stats["map_mean"] == [1.0 / 8]
    assert stats["map_argmax_x"] == [28.0] and stats["map_argmax_y"] == [12.0]
    coarse = map_stats(np.array([[[0.0, 2.0]]], np.float32), geometry((16, 64), pre), pre.input_size)
    assert 0 <= coarse["map_argmax_y"][0] <= 64 and 0 <= coarse["map_argmax_x"][0] <= 16
