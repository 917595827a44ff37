"""One run at a time in an output folder: a second run would delete the first's temporaries, reset
its store or take its partitions' markers for its own (mixing two jobs' results).

The lock is the operating system's (``flock`` on ``OUT/.camshaft.lock``), so a run killed at any
moment releases it; the file goes when the run ends. It names the holder's process and machine. On
NFS, Linux takes ``flock`` as a lock the server keeps, so runs on two machines exclude each other (a
client killed outright holds it until the server's lease ends, a minute or two); a mount with
``nolock`` or ``local_lock=flock`` excludes only runs on the same machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from camshaft.errors import ConfigError

LOCK_FILE = ".camshaft.lock"


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold ``out``'s lock for the block (``out`` must exist).

    Raises:
        ConfigError: another run (in this process or another) holds it.
    """
    path = Path(out) / LOCK_FILE
    fd = _acquire(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())  # a shared folder: another machine's
        yield
    finally:
        if _still_at(fd, path):
            path.unlink(missing_ok=True)  # before the lock goes: whoever opened it meanwhile starts again
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            holder = os.read(fd, 300).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"another camshaft run (process {holder}) is writing into {path.parent}: "
                "wait for it to end, or choose another --out"
            ) from e
        except OSError as e:  # a file system without locks (some network mounts): run, but say so
            warnings.warn(f"cannot lock {path.parent} ({e}): a second run into it at once would not be refused",
                          stacklevel=4)
            return fd
        if _still_at(fd, path):
            return fd
        os.close(fd)  # the run that held it removed the file as it ended: lock a new one


def _still_at(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


__all__ = ["LOCK_FILE", "run_lock"]
