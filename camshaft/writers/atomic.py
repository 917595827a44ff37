"""Files that appear whole or not at all: write to a temporary name, rename when complete."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

_TEMPORARY = re.compile(r"\..+\.\d+\.\d+\.tmp")  # the names atomic_path makes: .NAME.PID.ID.tmp


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(path)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cannot_write(folder: str | Path) -> str | None:
    """Why no file can be created in ``folder`` (None: one can), found by creating one that vanishes on close.

    Found before any work; permission bits alone would not tell (root, read-only mounts, /proc).
    """
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def out_folder_problem(out: str | Path) -> str | None:
    """Why ``out`` cannot be (or become) an output folder (None: it can): a file is there, or nothing can be
    written in it or in its nearest existing parent (where it would be made)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    folder = next(p for p in [out.absolute(), *out.absolute().parents] if p.exists())
    why = cannot_write(folder)
    return None if why is None else f"cannot write there: {why} ({folder})"


def remove_temporaries(folder: str | Path, *, recursive: bool = True) -> int:
    """Delete what writers killed mid-write (``kill -9``, a lost machine) left in ``folder``.

    Only names ``atomic_path`` makes are touched; returns how many went. Call it while nothing
    writes into ``folder``: a live writer's temporary would go too.
    """
    return remove_named(folder, ".*.tmp", _TEMPORARY, recursive=recursive)


def remove_named(folder: str | Path, glob: str, name: re.Pattern, *, recursive: bool = True) -> int:
    """Delete the files under ``folder`` that ``glob`` finds and whose whole name ``name`` matches."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    candidates = folder.rglob(glob) if recursive else folder.glob(glob)
    found = [p for p in candidates if name.fullmatch(p.name) and p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
