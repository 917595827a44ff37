"""A workload (one timed call of some work) and the figure measured for it.

Roles say what a figure is compared with:

- ``limit``: plain batched forward of the model (eager, channels_last, frozen TorchScript in both
  layouts, ONNX Runtime); the best of them is *the limit* of its group.
- ``head_backward``: the head above the tap, forward and a batched backward of K scores to the
  tap; *the gradient limit* is the limit's forward time plus this.
- ``input_backward``: a plain forward with a batched backward of K scores to the input pixels (the
  limit of input-gradient methods).
- ``method``: a camshaft method on a backend. ``peer``: the same work in another library.
- ``pipeline``: decode + explain + write on generated JPEGs (compared with its ``method`` figure).
- ``actmax_limit``: a plain batched Adam loop on N class logits (the limit of ``actmax``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from camshaft.bench.timing import Timing

ROLES = ("limit", "head_backward", "input_backward", "actmax_limit", "method", "peer", "pipeline")


@dataclass(frozen=True)
class Workload:
    key: str  # unique in a run, e.g. "resnet50/224px/b16/gradcam/eager/top:1"
    role: str  # one of ROLES
    fn: Callable[[], object] = field(repr=False, compare=False)  # one call (may return its own seconds)
    images: int  # images per call
    pairs: int  # (image, target) pairs per call
    evaluations: int  # forward evaluations per call (occlusion: one per occluded copy)
    attrs: dict = field(default_factory=dict, compare=False)  # model, input_size, batch, method, ...

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown workload role {self.role!r}; valid: {', '.join(ROLES)}")


@dataclass(frozen=True)
class Figure:
    """What was measured for one workload."""

    key: str
    role: str
    images: int
    pairs: int
    evaluations: int
    seconds: tuple[float, ...]  # one per timed round
    attrs: dict = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, workload: Workload, timing: Timing) -> Figure:
        w = workload
        return cls(w.key, w.role, w.images, w.pairs, w.evaluations, tuple(timing.seconds), dict(w.attrs))

    @property
    def best_seconds(self) -> float:
        return min(self.seconds)

    @property
    def images_per_second(self) -> float:
        return self.images / self.best_seconds

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.best_seconds

    @property
    def evaluations_per_second(self) -> float:
        return self.evaluations / self.best_seconds

    def get(self, name: str, default=None):
        return self.attrs.get(name, default)

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "role": self.role,
            **self.attrs,
            "images": self.images,
            "pairs": self.pairs,
            "evaluations": self.evaluations,
            "seconds": list(self.seconds),
            "best_seconds": self.best_seconds,
            "images_per_second": self.images_per_second,
            "pairs_per_second": self.pairs_per_second,
            "evaluations_per_second": self.evaluations_per_second,
        }


@dataclass(frozen=True)
class Skipped:
    """A combination that was not measured, and why (a backend cannot serve it, a peer is missing)."""

    key: str
    reason: str
    failed: bool = False  # True: an unexpected error, not a known incapability
    role: str = ""  # the role of the workload it replaces, where known

    def to_dict(self) -> dict:
        return {"key": self.key, "role": self.role, "reason": self.reason, "failed": self.failed}
