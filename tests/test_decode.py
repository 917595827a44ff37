"""load_rgb / decode_batch: every kind of image decodes to 8-bit RGB; every failure says why."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from camshaft.data import decode
from camshaft.data.decode import decode_batch, load_rgb
from camshaft.errors import ConfigError, ImageDecodeError

W, H = 24, 16  # landscape: a swapped size shows up


def _save(tmp_path, name: str, im: Image.Image, **kw) -> str:
    path = str(tmp_path / name)
    im.save(path, **kw)
    return path


def _gradient_rgb() -> Image.Image:
    a = np.zeros((H, W, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, H, dtype=np.uint8)[:, None]
    a[..., 2] = 90
    return Image.fromarray(a)


def _assert_rgb(im: Image.Image, size=(W, H)) -> np.ndarray:
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    assert im.size == size
    return np.asarray(im)


# --- every kind decodes ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.jpg", "a.png", "a.bmp", "a.webp", "a.tif", "a.ppm"])
def test_rgb_files(tmp_path, name):
    src = _gradient_rgb()
    got = _assert_rgb(load_rgb(_save(tmp_path, name, src)))
    tol = 12 if name.endswith(("jpg", "webp")) else 0
    assert np.abs(got.astype(int) - np.asarray(src).astype(int)).mean() <= tol


def test_grey_l(tmp_path):
    got = _assert_rgb(load_rgb(_save(tmp_path, "g.png", Image.new("L", (W, H), 77))))
    assert (got == 77).all()


def test_grey_alpha_la_composited_on_white(tmp_path):
    a = np.zeros((H, W, 2), np.uint8)
    a[..., 0] = 0  # black ...
    a[:, : W // 2, 1] = 255  # ... opaque on the left, fully transparent on the right
    got = _assert_rgb(load_rgb(_save(tmp_path, "la.png", Image.fromarray(a, "LA"))))
    assert (got[:, : W // 2] == 0).all()
    assert (got[:, W // 2 :] == 255).all()


def test_one_bit(tmp_path):
    im = Image.new("1", (W, H), 0)
    im.paste(1, (0, 0, W // 2, H))
    got = _assert_rgb(load_rgb(_save(tmp_path, "b.png", im)))
    assert (got[:, : W // 2] == 255).all() and (got[:, W // 2 :] == 0).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (W, H), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red, 1: blue
    im.paste(1, (0, 0, W // 2, H))
    path = _save(tmp_path, "p.png", im, transparency=0)  # red is the transparent colour
    assert Image.open(path).mode == "P"
    got = _assert_rgb(load_rgb(path))
    assert (got[:, : W // 2] == (0, 0, 255)).all()
    assert (got[:, W // 2 :] == 255).all()  # transparent -> white, not red


def test_palette_gif(tmp_path):
    src = _gradient_rgb().convert("P", palette=Image.Palette.ADAPTIVE)
    _assert_rgb(load_rgb(_save(tmp_path, "p.gif", src)))


def test_cmyk_jpeg(tmp_path):
    path = _save(tmp_path, "c.jpg", Image.new("CMYK", (W, H), (0, 255, 255, 0)), quality=95)
    assert Image.open(path).mode == "CMYK"
    got = _assert_rgb(load_rgb(path)).astype(int)
    assert np.abs(got - (255, 0, 0)).max() <= 8  # cyan 0, magenta+yellow full: red


def test_cmyk_unusable_icc_profile_falls_back_to_formula(tmp_path):
    path = _save(tmp_path, "c.tif", Image.new("CMYK", (W, H), (0, 0, 0, 128)))
    im = Image.open(path)
    im.load()
    im.info["icc_profile"] = b"not a profile"
    with pytest.warns(UserWarning, match="ICC profile"):
        got = np.asarray(decode._cmyk_to_rgb(im))
    assert np.abs(got.astype(int) - 127).max() <= 1  # (255 - 0) * (255 - 128) / 255


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, W * H).round().astype(np.uint16).reshape(H, W)
    path = _save(tmp_path, "g16.png", Image.fromarray(ramp))
    assert Image.open(path).mode.startswith("I")
    got = _assert_rgb(load_rgb(path))
    assert got[0, 0, 0] == 0 and got[-1, -1, 0] == 255
    expected = np.rint(ramp / 257.0)
    assert np.abs(got[..., 0].astype(int) - expected).max() <= 1
    assert (got == 255).mean() < 0.05  # a clipping conversion would saturate almost everything


def test_sixteen_bit_big_endian_pgm(tmp_path):
    path = str(tmp_path / "g16.pgm")
    data = np.array([[0, 16384, 32768, 65535]], dtype=">u2")
    with open(path, "wb") as f:
        f.write(b"P5\n4 1\n65535\n" + data.tobytes())
    got = _assert_rgb(load_rgb(path), size=(4, 1))
    assert got[0, :, 0].tolist() == [0, 64, 128, 255]


def test_float_image(tmp_path):
    a = np.linspace(0.0, 1.0, W * H, dtype=np.float32).reshape(H, W)
    got = _assert_rgb(load_rgb(_save(tmp_path, "f.tif", Image.fromarray(a))))
    assert got[0, 0, 0] == 0 and got[-1, -1, 0] == 255


def test_float_image_outside_unit_range_is_stretched(tmp_path):
    a = np.linspace(-5.0, 20.0, W * H, dtype=np.float32).reshape(H, W)
    got = _assert_rgb(load_rgb(_save(tmp_path, "f.tif", Image.fromarray(a))))
    assert got[0, 0, 0] == 0 and got[-1, -1, 0] == 255


def test_rgba_composited_on_white(tmp_path):
    a = np.zeros((H, W, 4), np.uint8)
    a[..., 0] = 200
    a[:, : W // 2, 3] = 255
    a[:, W // 2 :, 3] = 0
    got = _assert_rgb(load_rgb(_save(tmp_path, "rgba.png", Image.fromarray(a, "RGBA"))))
    assert (got[:, : W // 2] == (200, 0, 0)).all()
    assert (got[:, W // 2 :] == 255).all()


def test_exif_orientation_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red mark on the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save(tmp_path, "rot.jpg", stored, exif=exif, quality=95)
    got = _assert_rgb(load_rgb(path), size=(20, 40))  # portrait now
    red = got[..., 0].astype(int) - got[..., 2].astype(int) > 100
    ys, xs = np.nonzero(red)
    assert xs.min() >= 10 and ys.max() < 10  # the mark sits at the top-right corner


def test_multi_frame_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (W, H), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    path = str(tmp_path / "anim.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    got = _assert_rgb(load_rgb(path))
    assert (got == (255, 0, 0)).all()


def test_result_is_detached_from_the_file(tmp_path):
    path = _save(tmp_path, "a.png", _gradient_rgb())
    im = load_rgb(path)
    os.remove(path)
    assert np.asarray(im).shape == (H, W, 3)


# --- failures, each with its reason -----------------------------------------------------------


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"^empty file \(0 bytes\)$"):
        load_rgb(path)


def test_text_file_with_image_extension(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n")
    reason = r"^not an image \(cannot identify image file\)$"
    with pytest.raises(ImageDecodeError, match=reason) as info:
        load_rgb(path)
    assert info.value.__cause__ is not None  # raised from the Pillow error


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated(tmp_path, name):
    full = _save(tmp_path, "full" + name[-4:], Image.effect_noise((64, 64), 60).convert("RGB"))
    data = open(full, "rb").read()
    cut = tmp_path / name
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"^truncated or corrupt image data: .+"):
        load_rgb(cut)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"^file not found$"):
        load_rgb(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"is a directory"):
        load_rgb(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    path = _save(tmp_path, "locked.png", _gradient_rgb())
    os.chmod(path, 0)
    try:
        with pytest.raises(ImageDecodeError, match=r"^permission denied$"):
            load_rgb(path)
    finally:
        os.chmod(path, 0o644)


def test_permission_error_reason(tmp_path, monkeypatch):
    """The same reason without relying on file modes (root ignores them)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(decode.Image, "open", refuse)
    with pytest.raises(ImageDecodeError, match=r"^permission denied$"):
        load_rgb(tmp_path / "x.png")


def test_decompression_bomb(tmp_path, monkeypatch):
    path = _save(tmp_path, "big.png", Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    reason = r"^image too large: 10000 pixels exceeds the decompression-bomb limit of 2000"
    with pytest.raises(ImageDecodeError, match=reason):
        load_rgb(path)


# --- decode_batch -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_workers", [1, 2, 4])
def test_decode_batch_keeps_order_and_returns_errors_in_place(tmp_path, max_workers):
    sizes = [(10 + i, 5 + i) for i in range(6)]
    paths = [_save(tmp_path, f"{i}.png", Image.new("RGB", s)) for i, s in enumerate(sizes)]
    (tmp_path / "empty.png").write_bytes(b"")
    paths.insert(2, str(tmp_path / "missing.png"))
    paths.insert(5, str(tmp_path / "empty.png"))
    out = decode_batch(paths, max_workers=max_workers)
    assert len(out) == len(paths)
    assert isinstance(out[2], ImageDecodeError) and str(out[2]) == "file not found"
    assert isinstance(out[5], ImageDecodeError) and str(out[5]) == "empty file (0 bytes)"
    images = [o for o in out if isinstance(o, Image.Image)]
    assert [im.size for im in images] == sizes


def test_decode_batch_empty_and_bad_workers():
    assert decode_batch([]) == []
    with pytest.raises(ConfigError, match=r"max_workers must be an integer >= 1, got 0"):
        decode_batch([], max_workers=0)
