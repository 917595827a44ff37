"""Which files the device may decode: plain 8-bit JPEGs, recognised from their headers alone.

``--decode device`` reads each file in a thread and hands its bytes to the device's JPEG decoder
(torchvision, nvJPEG on a GPU). Only the JPEGs whose decoding is certain to agree with Pillow's
take that path; every other file goes through :func:`camshaft.data.workers.decode_resized`
(Pillow), which also gives every failure its reason. So the device gets:

- a complete file: it starts with SOI and ends with EOI. A truncated file, or one with bytes after
  its image, is Pillow's to read or to refuse;
- a baseline, extended or progressive frame with Huffman coding at 8 bits per sample (SOF0-2):
  lossless, hierarchical, arithmetic-coded and 12-bit frames are Pillow's;
- one component (grey) or three (YCbCr). Four-component (CMYK / YCCK) files need the colour
  conversions of :mod:`camshaft.data.decode`, and a three-component file whose channels may be
  stored as RGB, not YCbCr, is left to Pillow: its Adobe marker says so, or its components are
  named ``R``, ``G``, ``B`` (libjpeg, and so Pillow, reads such a file without JFIF marker as RGB);
- no more pixels than Pillow's decompression-bomb limit allows without a warning;
- one picture: a multi-picture file (MPO, an APP2 ``MPF`` segment) is Pillow's;
- no orientation in XMP metadata (Pillow reads one there when EXIF has none): such a file is Pillow's.

The EXIF orientation is read here (IFD0's tag 274 in the first APP1 ``Exif`` segment, as Pillow
reads it) and applied on the device as ``ImageOps.exif_transpose`` applies it: torchvision's GPU
decoder ignores it.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["JpegInfo", "device_decodable", "exif_orientation", "read_encoded"]

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"
_XMP = b"http://ns.adobe.com/xap/1.0/\0"
_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive; Huffman coded
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field
# EXIF value types Pillow reads as numbers: SHORT, LONG, RATIONAL, SBYTE, SSHORT, SLONG, SRATIONAL, FLOAT,
# DOUBLE, IFD, LONG8 (BYTE, ASCII and UNDEFINED values it reads as bytes or text)
_EXIF_NUMBERS = {3: "H", 4: "I", 5: "II", 6: "b", 8: "h", 9: "i", 10: "ii", 11: "f", 12: "d", 13: "I", 16: "Q"}


@dataclass(frozen=True)
class JpegInfo:
    height: int  # as stored, before the orientation
    width: int
    orientation: int = 1  # EXIF orientation, 1..8 (1: as stored)


def device_decodable(data: bytes | np.ndarray) -> JpegInfo | None:
    """The size and orientation of a JPEG the device may decode (see the module's rules), else None."""
    data = memoryview(data).cast("B")
    n = len(data)
    if n < 8 or bytes(data[:2]) != _SOI or bytes(data[-2:]) != _EOI:
        return None
    i, adobe_rgb, orientation, frame = 2, False, None, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker == 0xDA:  # the first scan: Pillow has read every header it reads (some may follow the frame's)
            if frame is None or (frame[2] == 3 and (adobe_rgb or frame[3])):
                return None
            return JpegInfo(frame[0], frame[1], orientation or 1)
        length = (data[i + 2] << 8) | data[i + 3]
        segment = data[i + 4 : i + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == 0xE1 and orientation is None and bytes(segment[:6]) == b"Exif\0\0":
            orientation = exif_orientation(bytes(segment[6:]))
        elif marker == 0xE1 and bytes(segment[:29]) == _XMP and b"Orientation" in bytes(segment):
            return None  # Pillow also takes an orientation from XMP metadata: its reading, not ours
        elif marker == 0xE2 and bytes(segment[:4]) == b"MPF\0":
            return None
        elif marker == 0xEE and bytes(segment[:5]) == b"Adobe" and len(segment) >= 12:
            adobe_rgb = segment[11] == 0  # colour transform 0: three channels stored as RGB
        elif marker in _FRAMES:
            if frame is not None or len(segment) < 6:
                return None  # a second frame, or a short one
            precision, components = segment[0], segment[5]
            height, width = (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4]
            if precision != 8 or components not in (1, 3):
                return None
            if not height or not width or (Image.MAX_IMAGE_PIXELS and height * width > Image.MAX_IMAGE_PIXELS):
                return None
            rgb_ids = components == 3 and bytes(segment[6:15:3]) == b"RGB"  # component ids 'R', 'G', 'B'
            frame = (height, width, components, rgb_ids)
        elif (0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xD9:
            return None  # another kind of frame, or the end before any scan
        i += 2 + length
    return None


def exif_orientation(tiff: bytes) -> int:
    """IFD0's orientation (tag 274) in an EXIF block (a TIFF header and IFDs), as Pillow reads it; else 1.

    Pillow reads any numeric type (a rational or a float counts when it is a whole 1..8); a byte, text
    or undefined value, or one whose data lies past the block, turns nothing.
    """
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for k in range(count):
            tag, kind, n, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * k)
            if tag != 0x0112:
                continue
            fmt = _EXIF_NUMBERS.get(kind)
            if fmt is None or n < 1:
                return 1
            size = struct.calcsize(order + fmt)
            if n * size > 4:  # stored elsewhere in the block, at this offset
                (at,) = struct.unpack(order + "I", value)
                if at + n * size > len(tiff):
                    return 1
                value = tiff[at : at + size]
            number = struct.unpack_from(order + fmt, value)
            o = number[0] / number[1] if len(number) == 2 else number[0]
            return int(o) if o in range(1, 9) else 1
    except (KeyError, struct.error, ZeroDivisionError):
        pass  # malformed EXIF: the image as stored, as camshaft.data.decode does
    return 1


def read_encoded(path: str | os.PathLike) -> tuple[np.ndarray, JpegInfo] | None:
    """The file's bytes and header when the device may decode it, else None (unreadable, or not such a JPEG)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # a pipe would block the read; a folder: Pillow says why
        with open(path, "rb") as f:
            if f.read(2) != _SOI:
                return None  # not a JPEG: not read any further here
            f.seek(0)
            data = np.fromfile(f, dtype=np.uint8)
    except (OSError, ValueError):
        return None  # Pillow will say why
    info = device_decodable(data)
    return None if info is None else (data, info)
