"""--decode device: which files the device decodes, and that it gives what Pillow gives.

On the CPU the device's decoder is torchvision's libjpeg-turbo, which decodes exactly as Pillow
does, so these tests pin the resize, the orientation and the routing down to rounding: two
levels in 255 at most, a fraction of a level on average.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import camshaft
from camshaft.data.device_decode import decode_on_device, orient, resample_weights, resize
from camshaft.data.jpeg import device_decodable, exif_orientation, read_encoded
from camshaft.data.workers import Decoder, decode_resized, read_for_device
from camshaft.preprocess import Preprocess

CPU = torch.device("cpu")


def smooth(rng, h, w):
    """A photo-like image (smooth, so that JPEG keeps it close)."""
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def jpeg_bytes(a: np.ndarray, **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(a).save(out, "JPEG", **save)
    return out.getvalue()


def with_orientation(o: int) -> dict:
    exif = Image.Exif()
    exif[0x0112] = o
    return {"exif": exif.tobytes()}


# --- which files go to the device ---------------------------------------------------------------


def test_plain_jpegs_go_to_the_device_with_their_size():
    a = smooth(np.random.default_rng(0), 30, 50)
    for save in ({}, {"progressive": True}, {"subsampling": 0, "quality": 95}):
        info = device_decodable(jpeg_bytes(a, **save))
        assert (info.height, info.width, info.orientation) == (30, 50, 1)
    grey = io.BytesIO()
    Image.fromarray(a).convert("L").save(grey, "JPEG")
    assert device_decodable(grey.getvalue()).width == 50


def test_every_other_file_is_left_to_pillow():
    a = smooth(np.random.default_rng(1), 30, 50)
    data = jpeg_bytes(a)
    png, cmyk, mpo = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(a).save(png, "PNG")
    Image.fromarray(a).convert("CMYK").save(cmyk, "JPEG")
    Image.fromarray(a).save(mpo, "MPO", save_all=True, append_images=[Image.fromarray(a[::-1].copy())])
    for refused in (png.getvalue(), cmyk.getvalue(), mpo.getvalue(), data[:-100], data + b"trailing", data[:2], b""):
        assert device_decodable(refused) is None
    adobe_rgb = data[:2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00" + data[2:]  # transform 0: RGB
    assert device_decodable(adobe_rgb) is None
    xmp = b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><rdf:Description tiff:Orientation=\"6\"/></x:xmpmeta>"
    with_xmp = data[:2] + b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp + data[2:]
    assert Image.open(io.BytesIO(with_xmp)).getexif().get(0x0112) == 6  # Pillow turns it: so Pillow reads it
    assert device_decodable(with_xmp) is None
    adobe_ycc = data[:2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x01" + data[2:]
    assert device_decodable(adobe_ycc) is not None


def test_a_jpeg_over_pillows_pixel_limit_is_left_to_pillow(monkeypatch):
    data = jpeg_bytes(smooth(np.random.default_rng(2), 30, 50))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30 * 50 - 1)
    assert device_decodable(data) is None


@pytest.mark.parametrize("order", ["<", ">"])
def test_the_exif_orientation_is_read_as_pillow_reads_it(order):
    a = smooth(np.random.default_rng(3), 20, 30)
    for o in range(1, 9):
        data = jpeg_bytes(a, **with_orientation(o))
        assert device_decodable(data).orientation == o == Image.open(io.BytesIO(data)).getexif().get(0x0112)
    # big- and little-endian EXIF blocks, the tag among others; out-of-range values mean "as stored"
    mark = b"II" if order == "<" else b"MM"
    for value, expected in ((6, 6), (0, 1), (9, 1)):
        entries = [(0x010F, 2, 1, b"x\0\0\0"), (0x0112, 3, 1, struct.pack(order + "H", value) + b"\0\0")]
        tiff = mark + struct.pack(order + "HI", 42, 8) + struct.pack(order + "H", len(entries))
        tiff += b"".join(struct.pack(order + "HHI", t, k, n) + v for t, k, n, v in entries)
        assert exif_orientation(tiff) == expected
    assert exif_orientation(b"garbage") == 1


def test_unreadable_and_non_jpeg_files_are_decoded_by_pillow_in_the_threads(tmp_path):
    pre = Preprocess((24, 32))
    Image.fromarray(smooth(np.random.default_rng(4), 30, 40)).save(tmp_path / "a.png")
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(smooth(np.random.default_rng(4), 30, 40)))
    png, jpg, missing = (str(tmp_path / n) for n in ("a.png", "a.jpg", "missing.jpg"))
    assert read_encoded(missing) is None and read_encoded(png) is None
    assert read_for_device(missing, pre).error == "file not found"
    np.testing.assert_array_equal(read_for_device(png, pre).pixels, decode_resized(png, pre).pixels)
    r = read_for_device(jpg, pre)
    assert r.pixels is None and r.encoded is not None and r.header.width == 40


# --- the resize and the orientation -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["stretch", "center-crop", "letterbox"])
def test_the_resize_gives_pillows_pixels_within_one_level(mode):
    rng = np.random.default_rng(5)
    shapes = [(300, 410, (224, 224)), (410, 300, (100, 160)), (37, 23, (64, 48)), (64, 64, (64, 64)), (90, 200, (31, 17))]
    for h, w, out in shapes:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pre = Preprocess(out, resize=mode)
        expected, geom = decode_resized_array(a, pre)
        got = resize(torch.from_numpy(a).permute(2, 0, 1)[None], geom, pre)[0].numpy()
        assert got.shape == expected.shape
        assert_close_to_pillow(got, expected, (h, w, out, mode))


def assert_close_to_pillow(got: np.ndarray, expected: np.ndarray, what) -> None:
    """Rounding differences only (a level per pass), not a shifted, turned or blurred image."""
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.3, (what, diff.max(), diff.mean())


def decode_resized_array(a: np.ndarray, pre: Preprocess):
    from camshaft.preprocess import resize_rgb

    pixels, geom = resize_rgb(Image.fromarray(a), pre)
    return pixels.astype(int), geom


def test_the_weights_are_a_normalised_triangle_over_the_box():
    w = resample_weights(8, 4, 0.0, 8.0)  # halving: each output averages a 4-cell triangle
    np.testing.assert_allclose(w.sum(1), 1.0)
    np.testing.assert_allclose(w[1], [0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(resample_weights(5, 5, 0.0, 5.0), np.eye(5))  # same size: the identity
    assert not resample_weights(10, 4, 2.0, 6.0)[:, :1].any()  # a box starting at 2 never reads column 0


@pytest.mark.parametrize("o", range(1, 9))
def test_orientation_turns_the_image_as_exif_transpose(o):
    a = np.random.default_rng(6).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = o
    im.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(im))
    got = orient(torch.from_numpy(a).permute(2, 0, 1), o).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


# --- the whole path -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """JPEGs of several sizes and all orientations, a PNG, a CMYK JPEG and a corrupt one."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate([(60, 80), (80, 60), (60, 80), (45, 45), (120, 90), (60, 80), (33, 70), (60, 80)]):
        path = folder / f"{i}.jpg"
        path.write_bytes(jpeg_bytes(smooth(rng, h, w), **with_orientation(i + 1)))
        paths.append(str(path))
    Image.fromarray(smooth(rng, 50, 40)).save(folder / "p.png")
    Image.fromarray(smooth(rng, 50, 40)).convert("CMYK").save(folder / "cmyk.jpg")
    corrupt = bytearray(jpeg_bytes(smooth(rng, 64, 64)))
    corrupt[corrupt.index(b"\xff\xda") + 6] = 0x33  # its scan reads Huffman tables never defined: headers intact
    (folder / "corrupt.jpg").write_bytes(bytes(corrupt))
    return paths + [str(folder / n) for n in ("p.png", "cmyk.jpg", "corrupt.jpg")]


@pytest.mark.parametrize("mode", ["stretch", "center-crop", "letterbox"])
def test_device_decoding_gives_what_pillow_gives_and_pillows_reasons(files, mode):
    pre = Preprocess((40, 48), resize=mode)
    decoder = Decoder("device", 2, device="cpu")
    read = list(decoder.map(files, pre))
    assert [r.encoded is not None for r in read] == [True] * 8 + [False, False, True]  # corrupt: its header is fine
    done = decoder.finish(files, read, pre)
    for path, r in zip(files, done, strict=True):
        expected = decode_resized(path, pre)
        assert r.error == expected.error and r.geometry == expected.geometry, path
        if expected.error is None:
            got = np.asarray(r.pixels.cpu() if isinstance(r.pixels, torch.Tensor) else r.pixels)
            assert got.shape == (40, 48, 3) and got.dtype == np.uint8
            assert_close_to_pillow(got, expected.pixels, path)
    assert done[-1].error  # torchvision refused it, Pillow gave the reason
    assert isinstance(done[0].pixels, torch.Tensor) and isinstance(done[8].pixels, np.ndarray)


def test_images_of_one_size_are_resized_together_and_kept_in_order(files, monkeypatch):
    import camshaft.data.device_decode as dd

    calls = []
    real = dd.resize
    monkeypatch.setattr(dd, "resize", lambda images, geom, pre: calls.append(len(images)) or real(images, geom, pre))
    pre = Preprocess((40, 48))
    read = [read_for_device(p, pre) for p in files[:8]]
    out = decode_on_device([(p, r.encoded, r.header) for p, r in zip(files, read)], pre, CPU)
    # 60x80 stored: orientations 1 and 3 stay 60x80, 6 and 8 turn to 80x60 (as the 80x60 one with 2)
    assert sorted(calls) == sorted([2, 3, 1, 1, 1])
    for path, r in zip(files, out):
        assert_close_to_pillow(r.pixels.numpy(), decode_resized(path, pre).pixels, path)
    calls.clear()
    monkeypatch.setattr(dd, "CHUNK_PIXELS", 2 * 60 * 80)  # two 80x60 images at a time, at most
    again = decode_on_device([(p, r.encoded, r.header) for p, r in zip(files, read)], pre, CPU)
    assert sorted(calls) == sorted([2, 2, 1, 1, 1, 1])
    for r, s in zip(out, again):
        assert torch.equal(r.pixels, s.pixels)


def test_a_run_with_device_decoding_matches_one_with_threads(files, tmp_path):
    from camshaft.engine.explainer import STAGES

    folder = os.path.dirname(files[0])
    size = dict(input_size=(64, 64), method="gradcam", batch_size=4, partition_size=6, progress=False)
    threads = camshaft.explain(None, folder, out=tmp_path / "threads", decode="threads", **size)
    device = camshaft.explain(None, folder, out=tmp_path / "device", decode="device", workers=2, **size)
    assert device.decoding == "cpu (JPEG) + 2 threads" and list(device.stages) == list(STAGES)
    assert device.stages["decoding_on_device"] > 0 and threads.stages["decoding_on_device"] == 0
    a, b = camshaft.load_results(tmp_path / "threads"), camshaft.load_results(tmp_path / "device")
    assert a.table[["path", "status", "error"]].equals(b.table[["path", "status", "error"]])
    assert (a.table["status"] == "ok").sum() == 10
    ok = (a.table["status"] == "ok").to_numpy()
    maps_a, maps_b = a.maps[:][ok], b.maps[:][ok]  # inputs within two levels in 255: maps alike
    assert np.abs(maps_a - maps_b).max() < 0.05 * np.abs(maps_a).max()


def test_the_device_decoder_is_chosen_on_the_command_line(files, tmp_path, capsys):
    from camshaft.cli import main

    assert main(["explain", "demo", os.path.dirname(files[0]), "--out", str(tmp_path / "run"), "--method", "cam",
                 "--device", "cpu", "--decode", "device", "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "11 images, 10 ok, 1 failed" in out
    assert "time in stages (decoding in cpu (JPEG) + 2 threads): " in out and "decoding on device" in out
