"""Data ingestion, second audit: cases where the decoders disagreed, or a bad input cost the run."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from camshaft.data.jpeg import device_decodable, exif_orientation
from camshaft.data.workers import Decoder, decode_resized
from camshaft.preprocess import Preprocess


def jpeg_bytes(h: int, w: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(a).save(out, "JPEG", quality=95)
    return out.getvalue()


def exif_block(order: str, kind: int, count: int, field: bytes, tail: bytes = b"") -> bytes:
    """A TIFF header and an IFD0 holding only the orientation tag; ``tail`` follows the IFD (offset 26)."""
    mark = b"II" if order == "<" else b"MM"
    tiff = mark + struct.pack(order + "HI", 42, 8) + struct.pack(order + "H", 1)
    return tiff + struct.pack(order + "HHI", 0x0112, kind, count) + field + struct.pack(order + "I", 0) + tail


def app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def pillow_orientation(tiff: bytes) -> int:
    """The orientation ``ImageOps.exif_transpose`` acts on, for this EXIF block."""
    exif = Image.Exif()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns of a value past the block's end, and drops it
        exif.load(tiff)
    value = exif.get(0x0112, 1)
    return {o: o for o in range(2, 9)}.get(value, 1) if not isinstance(value, (list, tuple)) else 1


def _orientation_blocks():
    for order in "<>":
        yield order, "SHORT", exif_block(order, 3, 1, struct.pack(order + "H", 6) + b"\0\0")
        yield order, "BYTE", exif_block(order, 1, 1, b"\x06\0\0\0")  # Pillow reads bytes: no turn
        yield order, "UNDEFINED", exif_block(order, 7, 1, b"\x06\0\0\0")
        yield order, "SSHORT", exif_block(order, 8, 1, struct.pack(order + "h", 6) + b"\0\0")
        yield order, "SLONG", exif_block(order, 9, 1, struct.pack(order + "i", 6))
        at = struct.pack(order + "I", 26)  # where a value of more than 4 bytes lies
        yield order, "RATIONAL", exif_block(order, 5, 1, at, struct.pack(order + "II", 12, 2))  # 6.0: turns
        yield order, "RATIONAL/0", exif_block(order, 5, 1, at, struct.pack(order + "II", 6, 0))
        yield order, "DOUBLE", exif_block(order, 12, 1, at, struct.pack(order + "d", 8.0))
        yield order, "DOUBLE past the end", exif_block(order, 12, 1, at, b"\0\0\0")


@pytest.mark.parametrize("order, kind, tiff", [pytest.param(*b, id=f"{b[0]}{b[1]}") for b in _orientation_blocks()])
def test_the_fast_path_reads_every_exif_orientation_type_as_pillow(order, kind, tiff):
    assert exif_orientation(tiff) == pillow_orientation(tiff), kind


@pytest.mark.parametrize("segment", ["exif", "xmp"])
def test_an_orientation_after_the_frame_header_is_seen_by_both_decoders(tmp_path, segment):
    """Pillow reads every header up to the first scan; the device path read only up to the frame's."""
    data = jpeg_bytes(20, 36)
    if segment == "exif":
        extra = app1(b"Exif\0\0" + exif_block("<", 3, 1, struct.pack("<H", 6) + b"\0\0"))
    else:
        extra = app1(b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><rdf:Description tiff:Orientation=\"6\"/></x:xmpmeta>")
    sof = data.index(b"\xff\xc0")
    end = sof + 2 + struct.unpack(">H", data[sof + 2 : sof + 4])[0]
    data = data[:end] + extra + data[end:]
    with Image.open(io.BytesIO(data)) as im:
        assert ImageOps.exif_transpose(im).size == (20, 36)  # Pillow turns it
    info = device_decodable(data)
    assert info is None or info.orientation == 6
    path = tmp_path / "turned.jpg"
    path.write_bytes(data)
    pre = Preprocess((18, 10), resize="stretch")
    decoder = Decoder("device", 1, device="cpu")
    (done,) = decoder.finish([str(path)], list(decoder.map([str(path)], pre)), pre)
    expected = decode_resized(str(path), pre)
    assert done.geometry == expected.geometry and done.geometry.original_size == (20, 36)
    got = np.asarray(done.pixels).astype(int)
    assert np.abs(got - expected.pixels.astype(int)).max() <= 2


def test_a_second_frame_header_or_a_file_without_a_scan_is_left_to_pillow():
    data = jpeg_bytes(8, 8)
    sof = data.index(b"\xff\xc0")
    end = sof + 2 + struct.unpack(">H", data[sof + 2 : sof + 4])[0]
    assert device_decodable(data[:end] + data[sof:end] + data[end:]) is None
    assert device_decodable(data[: data.index(b"\xff\xda")] + b"\xff\xd9") is None


def test_a_parquet_manifests_nan_cells_are_missing_values_and_binary_paths_are_file_names(tmp_path):
    """pyarrow keeps a NumPy NaN as NaN (pandas writes it as a null): it meant "no label", "no box"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from camshaft.data.sources import list_images

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 6)).save(tmp_path / name)
    nan = float("nan")
    table = pa.table({
        "path": pa.array([b"a.png", b"b.png"]),
        "label": pa.array(np.array([3.0, nan])),
        **{c: pa.array(np.array([1.0, nan])) for c in ("x0", "y0", "x1", "y1")},
    })
    pq.write_table(table, tmp_path / "m.parquet")
    records = list_images(tmp_path / "m.parquet")
    assert [r.path for r in records] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert [r.label for r in records] == ["3", None]
    assert [r.box for r in records] == [(1.0, 1.0, 1.0, 1.0), None]
    assert all(r.size is not None and r.error is None for r in records)


@pytest.mark.parametrize(
    "changes",
    [
        {"std": (float("nan"),) * 3},  # every input NaN: maps and scores NaN in rows marked ok
        {"mean": (float("inf"), 0.0, 0.0)},
        {"std": (float("inf"),) * 3},
        {"input_size": (224.5, 224)},
        {"input_size": (True, 3)},
    ],
)
def test_preprocessing_refuses_non_finite_statistics_and_fractional_sizes(changes):
    from camshaft.errors import ConfigError

    with pytest.raises(ConfigError, match="received"):
        Preprocess(**changes)


def test_preprocessing_takes_numpy_integers_and_numbers():
    pre = Preprocess((np.int64(20), 30), mean=(0, 0.5, np.float32(1)), std=(1, 1, 1))
    assert pre.input_size == (20, 30)


def test_worker_processes_decode_under_the_callers_pillow_settings(tmp_path, monkeypatch):
    """A script that changes Image.MAX_IMAGE_PIXELS (up, for big scans) or ImageFile.LOAD_TRUNCATED_IMAGES
    changes them for every decoder: a worker process has its own Pillow."""
    from PIL import ImageFile

    big, truncated = str(tmp_path / "big.png"), str(tmp_path / "truncated.jpg")
    Image.new("RGB", (50, 40)).save(big)
    (tmp_path / "truncated.jpg").write_bytes(jpeg_bytes(40, 50)[:-200])
    pre = Preprocess((8, 8))

    def both(path):
        (threads,) = Decoder("threads", 1).map([path], pre)
        (processes,) = Decoder("processes", 1).map([path], pre)
        return threads, processes

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # refused past twice the limit: 2000 > 1000
    threads, processes = both(big)
    assert threads.error and threads.error.startswith("image too large")
    assert processes.error == threads.error
    monkeypatch.undo()
    assert both(truncated)[1].error.startswith("truncated or corrupt")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    threads, processes = both(truncated)
    assert threads.error is None and processes.error is None
    np.testing.assert_array_equal(processes.pixels, threads.pixels)


def test_a_folder_that_cannot_be_listed_is_named_not_silently_left_out(tmp_path, monkeypatch):
    import os

    from camshaft.data.sources import list_images
    from camshaft.errors import ConfigError

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (8, 6)).save(tmp_path / sub / "x.png")
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith(os.sep + "b"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.warns(UserWarning, match=r"1 folder\(s\) .* could not be listed.*b: Permission denied"):
        records = list_images(tmp_path)
    assert [r.path for r in records] == [str(tmp_path / "a" / "x.png")]
    with pytest.raises(ConfigError, match="cannot list the images of folder .*Permission denied"):
        list_images(tmp_path / "b")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
@pytest.mark.parametrize("reader", ["pillow", "device"])
def test_a_named_pipe_becomes_an_error_row_instead_of_hanging_the_run(tmp_path, reader):
    import os
    import threading

    from camshaft.data.workers import read_for_device

    pipe = str(tmp_path / "pipe.jpg")
    os.mkfifo(pipe)
    read = decode_resized if reader == "pillow" else read_for_device
    result = []
    worker = threading.Thread(target=lambda: result.append(read(pipe, Preprocess((8, 8)))), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked in open(): a writer that closes at once lets it go
        with open(pipe, "wb"):
            pass
        worker.join(10)
        pytest.fail("opening the pipe waited for a writer")
    assert result[0].error == "not a regular file (a pipe, socket or device)"


def test_symlinked_folders_are_not_followed_but_named(tmp_path):
    """An ImageFolder tree whose class folders are links (a common way to make subsets) lost them unseen."""
    import os

    from camshaft.data.sources import list_images

    (tmp_path / "store" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(tmp_path / "store" / "cat" / "x.png")
    tree = tmp_path / "tree"
    (tree / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(tree / "dog" / "y.png")
    os.symlink(tmp_path / "store" / "cat", tree / "cat")
    os.symlink(".", tree / "dog" / "loop")
    with pytest.warns(UserWarning, match=r"2 symbolic link\(s\) to folders .* not followed") as caught:
        records = list_images(tree, labels_from_folders=True)
    assert str(tree / "cat") in str(caught[0].message) and str(tree / "dog" / "loop") in str(caught[0].message)
    assert [(r.path, r.label) for r in records] == [(str(tree / "dog" / "y.png"), "dog")]


def test_a_file_system_error_is_not_reported_as_corrupt_image_data(tmp_path):
    """A link to itself (listed: it is no folder) said "truncated or corrupt image data: [Errno 40] ..."."""
    import os

    from camshaft.data.decode import load_rgb
    from camshaft.errors import ImageDecodeError

    os.symlink("self.png", tmp_path / "self.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    os.symlink("a.png/x.png", tmp_path / "through_a_file.png")
    with pytest.raises(ImageDecodeError, match=r"^cannot read the file: Too many levels of symbolic links$"):
        load_rgb(tmp_path / "self.png")
    with pytest.raises(ImageDecodeError, match=r"^cannot read the file: Not a directory$"):
        load_rgb(tmp_path / "through_a_file.png")
    assert decode_resized(str(tmp_path / "self.png"), Preprocess((8, 8))).error.startswith("cannot read the file")
