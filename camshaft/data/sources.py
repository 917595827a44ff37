"""Turn a dataset argument (folder, ImageFolder tree, CSV/Parquet manifest, one image) into records.

Records carry absolute paths, the file's size and modification time (to spot changed files between
runs). A listed file that does not exist is not an error here: it becomes an error row when
decoding fails. A manifest row pointing outside the manifest's folder is never read: it becomes an
error row. Problems with the argument itself raise ConfigError.
"""

from __future__ import annotations

import csv
import math
import os
import re
import warnings
from dataclasses import dataclass, replace

from camshaft.errors import ConfigError

__all__ = ["IMAGE_EXTENSIONS", "ImageRecord", "file_path", "is_image_file", "list_images", "path_text"]

#: Lower-case file-name suffixes (with the dot) taken as images; matched case-insensitively. A
#: format this Pillow cannot decode (AVIF before Pillow 11.2) is an error row saying so, not skipped.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
_ACCEPTED = (
    "a folder of images (searched recursively), a .csv or .parquet manifest with a 'path' column "
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
    size: int | None = None  # bytes, at listing time (None: missing)
    mtime_ns: int | None = None
    error: str | None = None  # why it must not be read (outside the dataset root)


def path_text(path: str) -> str:
    """A file name as text that UTF-8 tables (Parquet, JSON) can hold.

    Names that are not UTF-8 on disk (Python keeps their bytes as lone surrogates) get each such byte
    written ``\\xNN``; every other name is unchanged. :func:`file_path` reverses it.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def file_path(text: str) -> str:
    """The file a results-table ``path`` names: :func:`path_text` reversed (a name that exists as
    written, ``\\x`` and all, is taken as it is)."""
    if "\\x" not in text or os.path.lexists(text):
        return text
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


def _stat(record: ImageRecord) -> ImageRecord:
    try:
        st = os.stat(record.path)
    except OSError:
        return record
    return replace(record, size=st.st_size, mtime_ns=st.st_mtime_ns)


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether the file name ends with one of IMAGE_EXTENSIONS (any case)."""
    return os.path.splitext(os.fspath(name))[1].lower() in IMAGE_EXTENSIONS


def list_images(
    data: str | os.PathLike, *, labels_from_folders: bool = False, exclude: str | os.PathLike | None = None
) -> list[ImageRecord]:
    """List a dataset's images: a folder, a .csv/.parquet manifest or one image file.

    With ``labels_from_folders`` a folder is read as an ImageFolder tree: each image's label is
    the name of its top-level sub-folder. ``exclude``: a folder inside it whose files are not listed
    (a run's output folder, whose overlays are images); the output folders of other runs (those holding
    a ``_camshaft`` folder) are not listed either.

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
        return [_stat(r) for r in _list_folder(path, labels_from_folders=labels_from_folders, exclude=exclude)]
    if labels_from_folders:
        raise ConfigError(f"labels from folders need a folder (an ImageFolder tree), received {path!r}")
    if not os.path.exists(path):
        raise ConfigError(f"data {path!r} does not exist; expected {_ACCEPTED}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".csv", ".parquet"):
        return [r if r.error else _stat(r) for r in _read_manifest(path)]
    if suffix in IMAGE_EXTENSIONS:
        return [_stat(ImageRecord(os.path.abspath(path)))]
    kind = f"a {suffix!r} file" if suffix else "a file without extension"
    raise ConfigError(f"unsupported data {path!r} ({kind}); expected {_ACCEPTED}")


def _first(items: list[str], sep: str) -> str:
    """The first ``_MAX_LISTED`` items joined, and how many more there are."""
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return sep.join(items[:_MAX_LISTED]) + more


RUN_STATE_DIR = "_camshaft"  # the bookkeeping folder of a camshaft explain run (camshaft.pipeline.state.STATE_DIR)


def _list_folder(folder: str, *, labels_from_folders: bool = False, exclude=None) -> list[ImageRecord]:
    """Recursive listing in path order; hidden entries skipped, symlinked folders not followed, and a
    camshaft run's output folder (its overlays are PNG files: explaining them is never what was meant)
    skipped, this run's or another's (last night's run written into the dataset's folder)."""
    root = os.path.abspath(folder)
    skip = None if exclude is None else os.path.abspath(exclude)
    found: list[tuple[str, ...]] = []
    unlisted: list[OSError] = []  # folders that could not be listed: their images would vanish unseen
    linked: list[str] = []  # symlinked folders, not followed (a link may loop): said, not silently dropped
    for current, dirs, files in os.walk(root, onerror=unlisted.append):
        # prune hidden folders, the excluded one and the output folders of camshaft runs in place
        dirs[:] = [d for d in dirs if not d.startswith(".") and os.path.join(current, d) != skip
                   and not os.path.isdir(os.path.join(current, d, RUN_STATE_DIR))]
        linked += [os.path.join(current, d) for d in dirs if os.path.islink(os.path.join(current, d))]
        rel = os.path.relpath(current, root)
        parts = () if rel == os.curdir else tuple(rel.split(os.sep))
        found += [(*parts, f) for f in files if not f.startswith(".") and is_image_file(f)]
    unreadable = [f"{e.filename}: {e.strerror or e}" for e in unlisted]
    if unlisted and not found:
        raise ConfigError(f"cannot list the images of folder {folder!r}: {'; '.join(unreadable[:_MAX_LISTED])}")
    if unlisted:
        warnings.warn(
            f"{len(unlisted)} folder(s) under {folder!r} could not be listed, their images are left out: "
            f"{_first(unreadable, '; ')}",
            stacklevel=3,
        )
    if linked:
        warnings.warn(
            f"{len(linked)} symbolic link(s) to folders under {folder!r} are not followed, their images are left "
            f"out: {_first(linked, ', ')}; list the images in a manifest to include them",
            stacklevel=3,
        )
    if not found:
        raise ConfigError(
            f"no images found in folder {folder!r} (searched recursively for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}; hidden files and folders, links to folders and camshaft run folders are skipped)"
        )
    if labels_from_folders:
        loose = [os.path.join(*p) for p in found if len(p) == 1]
        if loose:
            raise ConfigError(
                f"an ImageFolder tree keeps each image in a class folder; {len(loose)} image(s) sit at the "
                f"top of {folder!r}: {', '.join(sorted(loose)[:5])}"
            )
        return [ImageRecord(os.path.join(root, *parts), parts[0]) for parts in sorted(found)]
    return [ImageRecord(os.path.join(root, *parts)) for parts in sorted(found)]


def _read_manifest(manifest: str) -> list[ImageRecord]:
    """Read a CSV or Parquet manifest; relative paths are taken from the manifest's folder."""
    root = os.path.dirname(os.path.abspath(manifest))
    try:
        if manifest.lower().endswith(".parquet"):
            rows, columns = _parquet_rows(manifest)
            columns = _check_header(manifest, columns)
            records, problems = _parse_rows(rows, root=root, has_box=BOX_COLUMNS[0] in columns)
        else:
            with open(manifest, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                columns = _check_header(manifest, reader.fieldnames)
                reader.fieldnames = columns
                numbered = ((reader.line_num, row) for row in reader)
                records, problems = _parse_rows(numbered, root=root, has_box=BOX_COLUMNS[0] in columns)
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
    if not columns:
        raise ConfigError(f"manifest {manifest!r} is empty (no header, no rows); {expected}")
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


def _parquet_rows(manifest: str):
    """Numbered rows of a Parquet manifest as strings, with lower-case column names."""
    import pyarrow.parquet as pq

    table = pq.read_table(manifest)
    names = [n.strip().lower() for n in table.column_names]
    data = table.rename_columns(names).to_pylist()
    rows = ((i + 1, {k: _text(v) for k, v in row.items()}) for i, row in enumerate(data))
    return rows, names


def _text(value) -> str | None:
    """A manifest value as text; a whole float is an integer (an int column with a missing value is double).

    NaN is a missing value (as a null is), and bytes (a binary path column) are a file name.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return os.fsdecode(value)
    return str(value)


def _inside(root: str, path: str) -> bool:
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return os.path.commonpath([real_root, real]) == real_root


def _parse_rows(rows, *, root: str, has_box: bool) -> tuple[list[ImageRecord], list[str]]:
    """Records from numbered rows ``(line, {column: text})``, and the problems found."""
    records: list[ImageRecord] = []
    problems: list[str] = []
    for line, row in rows:
        where = f"line {line}"
        path = _row_path(row.get("path") or "", root)
        box, box_problem = _parse_box(row) if has_box else (None, None)
        row_problems = [p for p in (_path_problem(path), _extra_cells(row), box_problem) if p]
        problems += [f"{where}: {p}" for p in row_problems]
        if not row_problems:
            label = (row.get("label") or "").strip() or None
            full = os.path.normpath(os.path.join(root, path))
            outside = None if _inside(root, full) else f"outside the dataset root {root}: not read"
            records.append(ImageRecord(full, label, box, error=outside))
    return records, problems


def _row_path(cell: str, root: str) -> str:
    """The cell without the blanks around it, unless the file is named with them (`` a.jpg`` exists)."""
    path = cell.strip()
    if path != cell and "\0" not in cell and os.path.lexists(os.path.join(root, cell)):
        return cell
    return path


def _path_problem(path: str) -> str | None:
    if not path:
        return "empty path"
    if "\0" in path:
        return f"path {path!r} holds a NUL character, which no file name can hold"
    return None


def _extra_cells(row: dict) -> str | None:
    """More cells than the header names: an unquoted comma in a path (csv.DictReader keeps them under None)."""
    extra = [c for c in row.get(None) or () if c.strip()]
    if not extra:
        return None
    return f"more cells than the header has columns (extra: {extra}); quote a path that holds a comma"


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
