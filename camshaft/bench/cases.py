"""The matrix — model × batch × method × backend × targets — and camshaft's own timed work.

Methods come from the registry, so a method registered tomorrow is benchmarked tomorrow. A case a
backend cannot serve (``check_backend`` raises), or a method whose options cannot all be
defaulted, becomes a ``Skipped`` entry with the reason, never a failure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camshaft.bench.workload import Skipped, Workload
from camshaft.engine.backends.base import INPUT_GRADIENTS, TAP_GRADIENTS, Backend
from camshaft.engine.methods import Method, check_backend, get_method
from camshaft.engine.targets import Targets
from camshaft.errors import CamshaftError
from camshaft.models.layout import map_shape

# Options the benchmark sets where the issue fixes them; the rest keep each method's defaults. A
# method with several entries is benchmarked once per variant (occlusion: plain and incremental).
BENCH_OPTIONS: dict[str, dict[str, dict]] = {
    "occlusion": {
        "": {"window": (32, 32), "stride": (16, 16)},
        "incremental": {"window": (32, 32), "stride": (16, 16), "occlusion_mode": "incremental"},
    },
}


@dataclass(frozen=True)
class Group:
    """What limits are measured for: one model at one input size and batch size."""

    model: str
    input_size: tuple[int, int]
    batch: int

    @property
    def key(self) -> str:
        h, w = self.input_size
        return f"{short_name(self.model)}/{h}x{w}/b{self.batch}"

    def attrs(self) -> dict:
        return {"model": self.model, "input_size": list(self.input_size), "batch": self.batch}


@dataclass(frozen=True)
class Case:
    group: Group
    method: str
    backend: str
    targets: str  # top:K or classes
    variant: str = ""  # a key of BENCH_OPTIONS[method]; "" the default

    @property
    def label(self) -> str:
        return f"{self.method}[{self.variant}]" if self.variant else self.method

    @property
    def key(self) -> str:
        return f"{self.group.key}/{self.label}/{self.backend}/{self.targets}"

    def attrs(self) -> dict:
        attrs = {**self.group.attrs(), "method": self.method, "backend": self.backend, "targets": self.targets}
        return {**attrs, "variant": self.variant} if self.variant else attrs


def short_name(model: str) -> str:
    """A key-friendly model name (a file's stem)."""
    return model.replace("\\", "/").rsplit("/", 1)[-1]


def groups(settings) -> list[Group]:
    return [Group(m, tuple(settings.input_size), b) for m in settings.models for b in settings.batch_sizes]


def variants(method: str) -> list[str]:
    return list(BENCH_OPTIONS.get(method, {"": {}}))


def cases(settings, group: Group) -> list[Case]:
    return [
        Case(group, m, b, t, v)
        for m in settings.method_names()
        for v in variants(m)
        for b in settings.backends
        for t in settings.targets
    ]


def target_count(text: str) -> int:
    return Targets.parse(text).k


def gradient_kind(method: Method) -> str | None:
    """Which gradient limit a method is compared with: 'tap', 'input' or None (forward only)."""
    if TAP_GRADIENTS in method.needs:
        return "tap"
    if INPUT_GRADIENTS in method.needs:
        return "input"
    return None


def bench_options(method: Method, variant: str = "") -> dict:
    """The method's options for a benchmark: its defaults, with the issue's settings where given."""
    names = {o.name for o in method.options}
    given = {k: v for k, v in BENCH_OPTIONS.get(method.name, {}).get(variant, {}).items() if k in names}
    return method.resolve_options(given)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int | float) else (int(v[0]), int(v[-1]))


def evaluations_per_image(
    method: str, options: dict, input_size: tuple[int, int], *, channels: int | None = None
) -> int:
    """Forward evaluations a method makes per image (1 unless it perturbs or samples).

    Occlusion counts its window positions as captum does (floor((H - h) / s) + 1 per axis) plus
    the clean forward; SmoothGrad and integrated gradients count their samples plus the clean one;
    Score-CAM one masked forward per channel of the tap plus the clean one.
    """
    if method == "scorecam" and channels:
        return channels + 1
    if method == "occlusion" and "window" in options:
        window = _pair(options["window"])
        (wh, ww), (sh, sw) = window, _pair(options.get("stride") or (max(1, window[0] // 2), max(1, window[1] // 2)))
        h, w = input_size
        return (max(0, (h - wh) // sh) + 1) * (max(0, (w - ww) // sw) + 1) + 1
    for name in ("samples", "steps"):
        if name in options and isinstance(options[name], int):
            return options[name] + 1
    return 1


def forward_batch(
    method: str, options: dict, input_size: tuple[int, int], batch: int, *, channels: int | None = None
) -> int:
    """Images in the largest forward a method makes for a batch of ``batch`` images.

    A single-forward method runs the batch itself. A method that perturbs or samples runs its copies in
    forwards of ``*_per_forward`` images over the whole batch (occlusion's positions, Score-CAM's masks),
    or of ``samples_per_forward // batch`` samples of every image (SmoothGrad, integrated gradients): its
    evaluations/s are compared with the limit measured at that batch, which a forward of 1 or 2 images
    would understate.
    """
    perturbed = evaluations_per_image(method, options, input_size, channels=channels) - 1
    if perturbed <= 0:
        return batch
    if isinstance(options.get("samples_per_forward"), int):
        return batch * min(max(1, options["samples_per_forward"] // batch), perturbed)
    per = next((v for k, v in options.items() if k.endswith("_per_forward") and isinstance(v, int)), None)
    return batch if per is None else max(batch, min(per, batch * perturbed))


def tap_channels(backend: Backend, tap: str | None, size: tuple[int, int]) -> int | None:
    """The channels of ``tap`` as the methods read it (a channels-last map's last axis, a token's features)."""
    shape = backend.info.tap_shapes.get(tap) if tap else None
    grid = map_shape(shape, size) if shape else None
    return grid[0] if grid else None


def method_tap(method: Method, backend: Backend) -> str | None:
    """The tap a method reads by default (as ``camshaft explain`` picks it)."""
    if not method.uses_tap:
        return None
    info = backend.info
    return info.cam_tap if method.name == "cam" and info.cam_tap else info.taps[-1]


def input_batch(group: Group, *, device: torch.device, seed: int) -> torch.Tensor:
    """A normalised random batch (B, 3, H, W), the same for every workload of a group."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(group.batch, 3, *group.input_size, generator=gen).to(device)


def method_workload(case: Case, backend: Backend, x: torch.Tensor) -> Workload | Skipped:
    """camshaft's ``method.run`` on ``backend`` for the batch ``x`` (or why it cannot run)."""
    method = get_method(case.method)
    try:
        options = bench_options(method, case.variant)
    except CamshaftError as e:
        return Skipped(case.key, f"options cannot be defaulted: {e}")
    tap = method_tap(method, backend)
    try:
        check_backend(method, backend, tap=tap)
    except CamshaftError as e:
        return Skipped(case.key, str(e))
    targets = Targets.parse(case.targets, num_classes=backend.info.num_classes)
    select = targets.selector()

    def fn():
        method.run(backend, x, select, tap=tap, options=options)

    b, k = x.shape[0], targets.k
    channels = tap_channels(backend, tap, case.group.input_size)
    evals = b * evaluations_per_image(method.name, options, case.group.input_size, channels=channels)
    attrs = {**case.attrs(), "k": k, "tap": tap, "gradient": gradient_kind(method), "options": _jsonable(options),
             "forward_batch": forward_batch(method.name, options, case.group.input_size, b, channels=channels)}
    return Workload(case.key, "method", fn, b, b * k, evals, attrs)


def _jsonable(options: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
