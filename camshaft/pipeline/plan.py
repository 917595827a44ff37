"""Planning a run: partitions of the dataset, and fingerprints that decide what can be reused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from camshaft.data.sources import ImageRecord
from camshaft.engine.explainer import Explainer


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # first row in the maps store / table
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.number:06d}"


def plan(n_images: int, partition_size: int) -> list[Partition]:
    return [Partition(i, s, min(n_images, s + partition_size)) for i, s in enumerate(range(0, n_images, partition_size))]


def model_fingerprint(explainer: Explainer) -> str:
    """Content hash of the model: its parameters and buffers, or the artifact file's bytes."""
    h = hashlib.sha256()
    source = explainer.source
    if source.module is not None:
        for name, tensor in sorted(source.module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        with open(source.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def job_fingerprint(explainer: Explainer, model: str) -> str:
    """What makes two runs' maps comparable: model, method and its options, targets, preprocessing."""
    job = explainer.job
    identity = {
        "model": model,
        "backend": job.backend,
        "dtype": job.dtype,
        "methods": [(r.name, r.tap, _result_options(r), list(r.map_shape)) for r in explainer.runs],
        "targets": str(explainer.targets),
        "preprocess": explainer.preprocess.to_dict(),
        "metrics": [repr(s) for s in explainer.metric_specs],
        "exemplars": [repr(s) for s in explainer.exemplar_specs] + [explainer.job.exemplar_k],
    }
    if job.class_names is not None:  # the table's names come from the file (runs without one keep their identity)
        identity["class_names"] = list(explainer.backend.info.class_names or ())
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _result_options(run) -> dict:
    """The options the maps depend on: not those that only set how much runs at once (``Option.memory``, as the
    batch size): a run stopped for memory resumes with a smaller ``--samples-per-forward``, not from scratch."""
    memory = {o.name for o in run.method.options if o.memory}
    return {k: repr(v) for k, v in run.options.items() if k not in memory}


def file_key(record: ImageRecord) -> tuple:
    """How a file is recognised between runs: path, size and modification time."""
    return (record.path, record.size, record.mtime_ns)


def listing_fingerprint(records: list[ImageRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([*file_key(r), r.label, r.box, r.error]).encode())
    return h.hexdigest()


def records_to_json(records: list[ImageRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def records_from_json(items: list[dict]) -> list[ImageRecord]:
    return [ImageRecord(**{**d, "box": tuple(d["box"]) if d["box"] else None}) for d in items]


__all__ = ["Partition", "plan", "model_fingerprint", "job_fingerprint", "listing_fingerprint", "file_key"]
