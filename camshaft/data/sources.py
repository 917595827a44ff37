"""Turn a dataset argument (folder, CSV manifest or one image file) into image records.

Records carry absolute paths. A listed file that does not exist is not an error here: it becomes
an error row when decoding fails. Problems with the argument itself raise ConfigError.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass

from camshaft.errors import ConfigError

__all__ = ["IMAGE_EXTENSIONS", "ImageRecord", "is_image_file", "list_images"]

#: Lower-case file-name suffixes (with the dot) taken as images; matched case-insensitively.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
_ACCEPTED = (
    "a folder of images (searched recursively), a .csv manifest with a 'path' column "
    "(optional 'label' and 'x0,y0,x1,y1' box columns), or a single image file "
    f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
)
_MAX_LISTED = 20


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: its path, and optionally its label and a box (x0, y0, x1, y1)."""

    path: str
    label: str | None = None
    box: tuple[float, float, float, float] | None = None


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether the file name ends with one of IMAGE_EXTENSIONS (any case)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def list_images(data: str | os.PathLike) -> list[ImageRecord]:
    """List a dataset's images: a folder, a .csv manifest or one image file.

    Raises:
        ConfigError: the argument does not exist, is of an unsupported kind, the folder holds
            no images, or the manifest is malformed (every bad row is named).
    """
    try:
        path = os.fspath(data)
    except TypeError as e:
        received = type(data).__name__
        raise ConfigError(f"data must be a path, got {received}; expected {_ACCEPTED}") from e
    if os.path.isdir(path):
        return _list_folder(path)
    if not os.path.exists(path):
        raise ConfigError(f"data {path!r} does not exist; expected {_ACCEPTED}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".csv":
        return _read_manifest(path)
    if suffix in IMAGE_EXTENSIONS:
        return [ImageRecord(os.path.abspath(path))]
    kind = f"a {suffix!r} file" if suffix else "a file without extension"
    raise ConfigError(f"unsupported data {path!r} ({kind}); expected {_ACCEPTED}")


def _list_folder(folder: str) -> list[ImageRecord]:
    """Recursive listing in path order; hidden entries skipped, symlinked folders not followed."""
    root = os.path.abspath(folder)
    found: list[tuple[str, ...]] = []
    for current, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune hidden folders in place
        rel = os.path.relpath(current, root)
        parts = () if rel == os.curdir else tuple(rel.split(os.sep))
        found += [(*parts, f) for f in files if not f.startswith(".") and is_image_file(f)]
    if not found:
        raise ConfigError(
            f"no images found in folder {folder!r} (searched recursively for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}; hidden files and folders are skipped)"
        )
    return [ImageRecord(os.path.join(root, *parts)) for parts in sorted(found)]


def _read_manifest(manifest: str) -> list[ImageRecord]:
    """Read a CSV manifest; relative paths are taken from the manifest's folder."""
    root = os.path.dirname(os.path.abspath(manifest))
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = _check_header(manifest, reader.fieldnames)
            reader.fieldnames = columns
            records, problems = _parse_rows(reader, root=root, has_box=BOX_COLUMNS[0] in columns)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"cannot read manifest {manifest!r}: {e}") from e
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:_MAX_LISTED])
        extra = len(problems) - _MAX_LISTED
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise ConfigError(f"manifest {manifest!r} has {len(problems)} bad row(s):\n{shown}{more}")
    if not records:
        raise ConfigError(f"manifest {manifest!r} lists no images (a header and no rows)")
    return records


def _check_header(manifest: str, fieldnames: list[str] | None) -> list[str]:
    columns = [c.strip().lower() for c in fieldnames or []]
    expected = "expected a header with 'path' and optionally 'label' and 'x0,y0,x1,y1'"
    if "path" not in columns:
        raise ConfigError(
            f"manifest {manifest!r} has no 'path' column (columns: {columns}); {expected}"
        )
    box = [c for c in BOX_COLUMNS if c in columns]
    if box and len(box) != len(BOX_COLUMNS):
        missing = [c for c in BOX_COLUMNS if c not in columns]
        raise ConfigError(
            f"manifest {manifest!r} has box columns {box} but lacks {missing}; {expected}"
        )
    return columns


def _parse_rows(
    reader: csv.DictReader, *, root: str, has_box: bool
) -> tuple[list[ImageRecord], list[str]]:
    records: list[ImageRecord] = []
    problems: list[str] = []
    for row in reader:
        where = f"line {reader.line_num}"
        path = (row.get("path") or "").strip()
        box, box_problem = _parse_box(row) if has_box else (None, None)
        if not path:
            problems.append(f"{where}: empty path")
        if box_problem:
            problems.append(f"{where}: {box_problem}")
        if path and not box_problem:
            label = (row.get("label") or "").strip() or None
            records.append(ImageRecord(os.path.normpath(os.path.join(root, path)), label, box))
    return records, problems


def _parse_box(row: dict) -> tuple[tuple[float, float, float, float] | None, str | None]:
    """A row's box, or None when its four cells are empty; or the problem with it."""
    cells = [(row.get(c) or "").strip() for c in BOX_COLUMNS]
    if not any(cells):
        return None, None
    try:
        x0, y0, x1, y1 = (float(c) for c in cells)
    except ValueError:
        return None, f"box x0,y0,x1,y1 must be four numbers, got {cells}"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None, f"box x0,y0,x1,y1 must be finite numbers, got {cells}"
    if x1 < x0 or y1 < y0:
        return None, f"box must have x0 <= x1 and y0 <= y1, got {cells}"
    return (x0, y0, x1, y1), None
