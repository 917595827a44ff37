"""Real-world image files and dataset listings (third audit): each one decodes to the picture a
viewer shows, or becomes an error row with its reason while the rest of the dataset is explained.

Every reference is the same picture saved as a plain RGB file (or computed in closed form).
"""

from __future__ import annotations

import io
import os
import re
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

import camshaft
from camshaft.data import decode
from camshaft.data.decode import load_rgb
from camshaft.data.jpeg import device_decodable
from camshaft.data.sources import list_images
from camshaft.errors import ConfigError, ImageDecodeError

H, W = 6, 9  # landscape, odd sizes: a swapped or mirrored picture shows up
REFERENCE = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
T = Image.Transpose
# the transposition that, applied by a viewer for each EXIF orientation, undoes the stored one
STORED_AS = {1: None, 2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE,
             6: T.ROTATE_90, 7: T.TRANSVERSE, 8: T.ROTATE_270}
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{} loop\nshowpage\n"  # a program that never ends


def _png(path: Path, a: np.ndarray, *, bits: int, colour_type: int, chunks: bytes = b"") -> Path:
    """A PNG written chunk by chunk (Pillow writes no 16-bit colour), ``a`` (H, W[, C]) big-endian samples."""
    h, w = a.shape[:2]
    raw = b"".join(b"\0" + a[y].astype(">u2" if bits == 16 else np.uint8).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, colour_type, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunks + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _trns(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + b"tRNS" + value + struct.pack(">I", zlib.crc32(b"tRNS" + value))


# --- transparency is composited onto white for every kind that carries it -----------------------


def test_a_sixteen_bit_grey_png_with_a_transparent_level_is_composited_on_white(tmp_path):
    grey = np.full((H, W), 100 * 257, np.uint16)
    grey[:, :3] = 7  # the transparent level
    path = _png(tmp_path / "g16t.png", grey, bits=16, colour_type=0, chunks=_trns(struct.pack(">H", 7)))
    with Image.open(path) as im:
        assert im.mode == "I;16" and im.info["transparency"] == 7
    got = np.asarray(load_rgb(path))
    assert (got[:, :3] == 255).all()  # was black: the transparent level was drawn as grey 0
    assert (got[:, 3:] == 100).all()


def test_an_rgb_png_with_a_transparent_colour_is_composited_on_white(tmp_path):
    a = REFERENCE.copy()
    a[:, :3] = (200, 10, 10)  # the transparent colour
    Image.fromarray(a).save(tmp_path / "key.png", transparency=(200, 10, 10))
    with Image.open(tmp_path / "key.png") as im:
        assert im.mode == "RGB" and im.info["transparency"] == (200, 10, 10)
    got = np.asarray(load_rgb(tmp_path / "key.png"))
    assert (got[:, :3] == 255).all()  # was kept red, where an 8-bit grey key became white
    np.testing.assert_array_equal(got[:, 3:], a[:, 3:])


def test_an_eight_bit_grey_key_and_a_sixteen_bit_one_give_the_same_picture(tmp_path):
    grey = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (H, 1))  # 8 levels, 0 transparent
    Image.fromarray(grey).save(tmp_path / "g8.png", transparency=0)
    g16 = _png(tmp_path / "g16.png", grey.astype(np.uint16) * 257, bits=16, colour_type=0, chunks=_trns(b"\0\0"))
    np.testing.assert_array_equal(np.asarray(load_rgb(g16)), np.asarray(load_rgb(tmp_path / "g8.png")))


# --- 16-bit images: exact, and without float copies ------------------------------------------------


def test_every_sixteen_bit_level_rounds_to_the_nearest_eight_bit_level(tmp_path):
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(load_rgb(_png(tmp_path / "all.png", levels, bits=16, colour_type=0)))[..., 0]
    np.testing.assert_array_equal(got, np.rint(levels / 257.0).astype(np.uint8))


def test_a_sixteen_bit_image_costs_no_float64_copies():
    """A 16-bit picture in Pillow's warning range (90-180 Mpx) is decoded: at 8 bytes a pixel per copy
    its float conversion took 2.7 GB for a 200 MB image (measured), per decode worker."""
    im = Image.fromarray(np.random.default_rng(1).integers(0, 65536, (500, 400), dtype=np.uint16))
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        decode._high_depth_to_rgb(im)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the pixels as an array (2 bytes a pixel), one uint32 copy (4) and the result (1); float64 copies took 18+
    assert peak < 8 * im.width * im.height


# --- orientation, colour spaces, formats ------------------------------------------------------------


@pytest.mark.parametrize("ext", ["png", "tif", "webp", "jpg"])
def test_every_exif_orientation_shows_the_picture_upright(tmp_path, ext):
    for o, stored_as in STORED_AS.items():
        stored = Image.fromarray(REFERENCE) if stored_as is None else Image.fromarray(REFERENCE).transpose(stored_as)
        exif = Image.Exif()
        exif[0x0112] = o
        path = tmp_path / f"o{o}.{ext}"
        kw = {"tif": {"tiffinfo": {274: o}}, "webp": {"lossless": True, "exif": exif},
              "jpg": {"quality": 100, "subsampling": 0, "exif": exif}}.get(ext, {"exif": exif})
        stored.save(path, **kw)
        got = np.asarray(load_rgb(path)).astype(int)
        assert got.shape == REFERENCE.shape, (ext, o)
        assert np.abs(got - REFERENCE).max() <= (8 if ext == "jpg" else 0), (ext, o)


def _ycck_jpeg(cmyk: np.ndarray) -> bytes:
    """``cmyk`` as a YCCK JPEG (Adobe transform 2), as Photoshop writes them; Pillow writes none."""
    rgb = cmyk[..., :3].astype(float)  # YCCK: C, M, Y taken as R, G, B and stored as YCbCr; K as is
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    cb = -0.168736 * rgb[..., 0] - 0.331264 * rgb[..., 1] + 0.5 * rgb[..., 2] + 128
    cr = 0.5 * rgb[..., 0] - 0.418688 * rgb[..., 1] - 0.081312 * rgb[..., 2] + 128
    # Pillow writes CMYK inverted (Adobe's convention); libjpeg inverts the YCC->RGB result back
    stored = np.stack([255 - y, 255 - cb, 255 - cr, cmyk[..., 3].astype(float)], -1)
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(stored), 0, 255).astype(np.uint8), "CMYK").save(out, "JPEG", quality=100)
    data = bytearray(out.getvalue())
    at = data.index(b"Adobe")
    assert data[at + 11] == 0  # Pillow's CMYK: transform 0
    data[at + 11] = 2
    return bytes(data)


def test_a_ycck_jpeg_decodes_as_its_cmyk_picture_and_stays_off_the_device(tmp_path):
    cmyk = np.zeros((16, 24, 4), np.uint8)
    cmyk[..., 0] = np.linspace(0, 255, 24)[None]
    cmyk[..., 1] = np.linspace(0, 255, 16)[:, None]
    cmyk[..., 2], cmyk[..., 3] = 60, 40
    data = _ycck_jpeg(cmyk)
    (tmp_path / "ycck.jpg").write_bytes(data)
    expected = np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB")).astype(int)
    assert np.abs(np.asarray(load_rgb(tmp_path / "ycck.jpg")).astype(int) - expected).max() <= 3
    assert device_decodable(data) is None


def test_a_jpeg_whose_components_are_named_rgb_is_left_to_pillow():
    """libjpeg (Pillow) reads three components named R, G, B, without JFIF marker, as RGB, not YCbCr."""
    out = io.BytesIO()
    Image.fromarray(REFERENCE).save(out, "JPEG", keep_rgb=True, quality=100)
    data = out.getvalue()
    at = data.index(b"\xff\xee")  # drop the Adobe marker: only the component names say RGB
    data = data[:at] + data[at + 2 + int.from_bytes(data[at + 2 : at + 4], "big") :]
    assert b"Adobe" not in data and b"JFIF" not in data
    assert np.abs(np.asarray(Image.open(io.BytesIO(data))).astype(int) - REFERENCE).max() <= 2  # read as RGB
    assert device_decodable(data) is None


def test_postscript_named_as_an_image_never_starts_ghostscript(tmp_path, monkeypatch):
    """Pillow hands EPS to Ghostscript, which would run the file's endless loop with no time limit."""
    started = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: started.append(a) or Image.new("RGB", (8, 8)))
    (tmp_path / "photo.jpg").write_bytes(EPS)
    with pytest.raises(ImageDecodeError, match=r"^not an image \(cannot identify image file\)$"):
        load_rgb(tmp_path / "photo.jpg")
    assert not started
    Image.fromarray(REFERENCE).save(tmp_path / "real.jpg")
    load_rgb(tmp_path / "real.jpg")  # every other format is still read


# --- manifests ---------------------------------------------------------------------------------------


def _manifest(folder: Path, text: str) -> Path:
    path = folder / "m.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_manifest_names_a_file_whose_name_starts_with_a_space(tmp_path):
    names = [" lead.png", "plain.png", "new\nline, comma.png", "ünï cødé.png"]
    for name in names:
        Image.fromarray(REFERENCE).save(tmp_path / name)
    text = 'path,label\n" lead.png",a\nplain.png , b\n"new\nline, comma.png",c\nünï cødé.png,d\n'
    records = list_images(_manifest(tmp_path, text))
    assert [os.path.basename(r.path) for r in records] == names  # the first was "lead.png": not found
    assert [r.label for r in records] == ["a", "b", "c", "d"]
    assert all(r.size for r in records)


def test_a_manifest_path_with_a_nul_character_is_a_bad_row_not_a_crash(tmp_path):
    Image.fromarray(REFERENCE).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match=r"(?s)1 bad row.*line 3: path 'b\\x00c.png' holds a NUL character"):
        list_images(_manifest(tmp_path, 'path\na.png\n"b\0c.png"\n'))  # was ValueError: embedded null byte


def test_an_unquoted_comma_in_a_path_is_a_bad_row_not_a_wrong_path(tmp_path):
    Image.fromarray(REFERENCE).save(tmp_path / "a,b.png")
    with pytest.raises(ConfigError, match=r"line 2: more cells than the header has columns \(extra: \['b.png'\]\)"):
        list_images(_manifest(tmp_path, "path\na,b.png\n"))  # was a record for the file "a"
    assert [os.path.basename(r.path) for r in list_images(_manifest(tmp_path, 'path\n"a,b.png"\n'))] == ["a,b.png"]
    assert len(list_images(_manifest(tmp_path, "path,label\na,b.png,\n"))) == 1  # an empty extra cell is no harm


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n\n"])
def test_an_empty_manifest_says_it_is_empty(tmp_path, content):
    (tmp_path / "m.csv").write_bytes(content)
    with pytest.raises(ConfigError, match=r"manifest '.*m\.csv' is empty \(no header, no rows\)"):
        list_images(tmp_path / "m.csv")


# --- a whole run over the awkward files ---------------------------------------------------------------


def _huge_png(path: Path) -> None:
    """A 40 000 x 40 000 PNG in a few bytes: a decompression bomb (1.6 Gpx, 4.8 GB decoded)."""
    _png(path, np.zeros((1, 1), np.uint8), bits=8, colour_type=0)  # one pixel, then the size is made huge
    data = bytearray(path.read_bytes())
    data[16:29] = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_a_run_over_awkward_files_explains_the_good_ones_and_names_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript started"))
    data = tmp_path / "data"
    (data / "dir.jpg").mkdir(parents=True)  # a folder named like an image: walked into, not read
    plain = ("dir.jpg/inner.png", "ünï cødé.png", "new\nline, comma.png", " lead.png")
    ok = {*plain, "key.png", "g16t.png", "ycck.jpg"}
    for name in plain:
        Image.fromarray(REFERENCE).save(data / name)
    Image.fromarray(REFERENCE).save(data / "key.png", transparency=tuple(int(v) for v in REFERENCE[0, 0]))
    grey = np.full((H, W), 30000, np.uint16)
    _png(data / "g16t.png", grey, bits=16, colour_type=0, chunks=_trns(struct.pack(">H", 30000)))
    cmyk = np.zeros((16, 24, 4), np.uint8)
    (data / "ycck.jpg").write_bytes(_ycck_jpeg(cmyk))
    _huge_png(data / "bomb.png")
    (data / "eps.jpg").write_bytes(EPS)
    os.symlink("loop_b.jpg", data / "loop_a.jpg")
    os.symlink("loop_a.jpg", data / "loop_b.jpg")
    reasons = {"bomb.png": r"^image too large: 1600000000 pixels exceeds the decompression-bomb limit",
               "eps.jpg": r"^not an image", "loop_a.jpg": r"^cannot read the file: Too many levels of symbolic links",
               "loop_b.jpg": r"^cannot read the file"}
    out = tmp_path / "run"
    camshaft.explain(None, data, out=out, progress=False, batch_size=4)
    rows = {os.path.relpath(r["path"], data): r for r in camshaft.load_results(out).table.to_dict("records")}
    assert set(rows) == ok | set(reasons)
    for name in ok:
        assert rows[name]["status"] == "ok", (name, rows[name]["error"])
    for name, reason in reasons.items():
        assert rows[name]["status"] == "error" and re.match(reason, rows[name]["error"]), (name, rows[name]["error"])
