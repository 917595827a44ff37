"""What a benchmark ran on: the machine, the software versions, the allocator and threads."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _commit() -> str | None:
    """The git commit of camshaft's checkout ('+dirty' with uncommitted changes); None outside a checkout."""
    here = Path(__file__).resolve().parents[1]  # the camshaft package

    def run(*args):
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)

    try:
        found = run("rev-parse", "--show-toplevel", "HEAD").stdout.split()
        if len(found) != 2 or Path(found[0]).resolve() != here.parent:  # installed into some other repository
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found[1] + ("+dirty" if dirty else "")


def machine_info(device: str, dtype: str) -> dict:
    """A JSON-ready description of where and with what the figures were measured."""
    from camshaft import __version__
    from camshaft.bench.peers import versions as peer_versions

    dev = torch.device(device)
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_model(),
        "dtype": dtype,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "versions": {
            "camshaft": __version__,
            "camshaft_commit": _commit(),  # the version string does not change between nightly runs
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
            "numpy": _version("numpy"),
            **peer_versions(),
        },
    }
    if dev.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        info["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    return info
