"""Files that appear whole or not at all: write to a temporary name, rename when complete."""

from __future__ import annotations

import contextlib
import json
import os
import re
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


def remove_temporaries(folder: str | Path, *, recursive: bool = True) -> int:
    """Delete what writers killed mid-write (``kill -9``, a lost machine) left in ``folder``.

    Only names ``atomic_path`` makes are touched; returns how many went. Call it while nothing
    writes into ``folder``: a live writer's temporary would go too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = [p for p in (folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"))
             if _TEMPORARY.fullmatch(p.name) and p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return len(found)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
