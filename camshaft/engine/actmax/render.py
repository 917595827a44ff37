"""Multi-objective activation maximization: N objectives -> a batch of N images, one step for all.

Image ``i`` is optimised for objective ``i`` only: the batch's loss is the sum of each image's own
loss, so one forward and one backward per step serve every objective, and the result equals N
single runs with the same seeds (image ``i`` draws its noise and transforms from ``seed + i``) —
bitwise with ``exact`` kernels (see ``grouped`` and ``batch_invariant``), else to rounding at first.
Simonyan et al. 2013; Mordvintsev et al. 2015; Olah et al. 2017.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from camshaft.engine.actmax.objectives import Activations, LossPlan, Objective
from camshaft.engine.actmax.param import get_param, param_names
from camshaft.engine.actmax.regularizers import (
    diversity,
    frequency_penalty,
    l2,
    total_variation,
)
from camshaft.engine.actmax.relu import redirected_relus
from camshaft.engine.actmax.transforms import Compose, Jitter, Pad, Rotate, Scale
from camshaft.engine.backends.base import DTYPES, resolve_device, resolve_dtype, resolve_memory_format
from camshaft.engine.backends.torch_backend import frozen
from camshaft.errors import ConfigError
from camshaft.models.cpu_linear import cpu_linears
from camshaft.models.fold import fold_graphs
from camshaft.models.inspect import probe_input
from camshaft.models.layout import as_maps
from camshaft.models.taps import TappedModel
from camshaft.preprocess import Preprocess

__all__ = [
    "EXACT_GROUP", "RenderConfig", "Rendering", "as_saved", "batch_invariant", "forward_fn", "grouped", "render",
    "tap_shapes",
]


@dataclass(frozen=True)
class RenderConfig:
    """How images are optimised; the CLI's flags map onto these fields."""

    steps: int = 128  # optimiser steps per image
    lr: float = 0.05  # Adam learning rate (pre-sigmoid units: a step moves pixels about this much)
    param: str = "fourier"  # pixel | fourier (decorrelated colour)
    init_sd: float = 0.01  # standard deviation of the initial noise (pre-sigmoid)
    pad: int = 4  # mirrored frame, pixels (robustness transforms, applied in this order)
    jitter: int = 4  # random shift, pixels
    scale: float = 0.05  # random zoom in [1 - scale, 1 + scale]
    rotate: float = 5.0  # random rotation in [-rotate, rotate] degrees
    l2: float = 0.0  # weight of L2 decay toward grey
    tv: float = 0.0  # weight of total variation
    freq: float = 0.0  # weight of the high-frequency penalty
    blur_every: int = 0  # blur the image every this many steps (0: never)
    blur_sigma: float = 0.5  # pixels
    diversity: float = 0.0  # weight of the diversity term among the copies of one objective
    diversity_tap: str | None = None  # default: the objective's tap, else the model's last feature map
    copies: int = 1  # images per objective (diversity needs 2 or more)
    seed: int = 0  # image i uses a generator seeded with seed + i
    batch_size: int = 64  # images optimised at once; a chunk always holds whole groups of copies
    device: str | None = None  # cpu | cuda[:N]; None = cuda when available
    dtype: str = "float32"  # float16 / bfloat16: autocast for the model's forward
    exact: bool | None = None  # results never depend on batch_size; None: on the CPU only, where the model
    # runs on fixed groups of 8 images, batch norms unfolded (0.8-0.9x the speed); on CUDA cuDNN goes off (much slower)
    # dead ReLU channels get this share of the gradient that wakes them (relu.py), in each chunk's first
    # relu_leak_steps steps; then gradients are exact (Lucid: 16 steps). Measured on the demo model's two
    # hardest classes, 128 steps: 0.03 for 16 steps left 11 of 256 renders below 0.9 probability, 0.03 for
    # 32 steps 3; 0.1 for 32 steps none of 384 (nor of 320 of the other classes and the prob objective)
    relu_leak: float = 0.1
    relu_leak_steps: int = 32

    def __post_init__(self):
        problems = []
        for name in ("steps", "copies", "batch_size"):
            if _bad_int(getattr(self, name), 1):
                problems.append(f"{name} must be an integer >= 1, received {getattr(self, name)!r}")
        for name in ("pad", "jitter", "blur_every", "seed", "relu_leak_steps"):
            if _bad_int(getattr(self, name), 0):
                problems.append(f"{name} must be an integer >= 0, received {getattr(self, name)!r}")
        for name in ("init_sd", "relu_leak", "l2", "tv", "freq", "diversity", "blur_sigma", "rotate"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be a finite number >= 0, received {getattr(self, name)!r}")
        if not _bad_int(self.seed, 0) and self.seed >= 2**63:  # image i's generator takes seed + i
            problems.append(f"seed must be below 2**63, received {self.seed!r}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= _FLOAT32_MAX):  # Adam's step is a float32
            problems.append(f"lr must be a positive number at most {_FLOAT32_MAX:.3g}, received {self.lr!r}")
        if self.relu_leak > 1:
            problems.append(f"relu_leak is a share of the gradient, at most 1, received {self.relu_leak!r}")
        if not 0 <= self.scale < 1:
            problems.append(f"scale must lie in [0, 1), received {self.scale!r}")
        if self.rotate > 180:
            problems.append(f"rotate must be at most 180 degrees, received {self.rotate!r}")
        if self.param not in param_names():
            problems.append(f"unknown parameterization {self.param!r} (choose from {', '.join(param_names())})")
        try:
            resolve_device(self.device)
        except ConfigError as e:
            problems.append(str(e))
        if self.exact not in (None, True, False):
            problems.append(f"exact must be True, False or None (automatic), received {self.exact!r}")
        if self.dtype not in DTYPES:
            problems.append(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.diversity > 0 and self.copies < 2:
            problems.append(f"diversity needs copies >= 2 images per objective, received copies={self.copies}")
        if self.batch_size < self.copies:
            problems.append(f"batch_size ({self.batch_size}) must hold the {self.copies} copies of an objective")
        if problems:
            raise ConfigError("invalid actmax settings: " + "; ".join(problems))

    def transforms(self, size: tuple[int, int] | None = None) -> Compose:
        """Pad, jitter, scale, rotate: those with a non-zero amount; cut back to ``size`` when given."""
        ts = [Pad(self.pad), Jitter(self.jitter), Scale(self.scale), Rotate(self.rotate)]
        return Compose([t for t, on in zip(ts, (self.pad, self.jitter, self.scale, self.rotate)) if on], size=size)

    def regularizer(self, tap: str | None) -> Objective | None:
        """The weighted sum of the regularizers switched on; ``tap`` is where diversity reads."""
        parts = [(self.l2, l2), (self.tv, total_variation), (self.freq, frequency_penalty)]
        terms = [w * make() for w, make in parts if w > 0]
        if self.diversity > 0:
            if tap is None:
                raise ConfigError("diversity needs a tap: set diversity_tap (--diversity-tap)")
            terms.append(self.diversity * diversity(tap))
        return sum(terms) if terms else None


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _bad_int(value, low: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < low


@dataclass(frozen=True)
class Rendering:
    """The images and how well they do. Row i is copy ``i % copies`` of objective ``i // copies``."""

    images: torch.Tensor  # (N * copies, 3, H, W) in [0, 1], float32 on the CPU (saved as ``as_saved`` rounds them)
    objectives: tuple[Objective, ...]  # (N,)
    values: torch.Tensor  # (N * copies,) -objective(final image as saved), regularizers excluded
    target_probs: torch.Tensor  # (N * copies,) softmax probability of the target class as saved; NaN without one
    losses: torch.Tensor  # (steps, N * copies) each image's loss (regularizers included) at each step
    copies: int = 1


Forward = Callable[[torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


def forward_fn(
    model: nn.Module, taps: Sequence[str], *, fold: bool = False, layout: torch.memory_format = torch.contiguous_format
) -> Forward:
    """``x -> (logits, {tap: activation})`` through ``TappedModel`` (the bare model without taps).

    With ``fold``, where the model traces, batch norms are folded into the convolutions of the
    traced graph (``fold_batchnorms``; the model itself is left alone): a render's weights are
    frozen for its duration, and every step's forward and backward then skip the norms.
    """
    if not taps:
        if not fold:
            return lambda x: (model(x), {})
        try:
            gm = fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001 - any tracing failure: the model as it is
            return lambda x: (model(x), {})
        fold_graphs([gm], memory_format=layout)
        return lambda x: (gm(x), {})
    tapped = TappedModel(model, sorted(taps))
    if fold and tapped.traceable:
        fold_graphs([tapped.graph_module, tapped.leaf_module], memory_format=layout)
    return tapped


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the duration; the caller's modes are restored."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with frozen(model):
            yield
    finally:
        for m, mode in modes:
            m.train(mode)


@contextlib.contextmanager
def _laid_out(model: nn.Module, layout: torch.memory_format) -> Iterator[None]:
    """The model's 4-d parameters and buffers in ``layout`` meanwhile; each gets its own tensor back after.

    The originals are swapped back, not copied back: no second copy, and storage that tensors
    shared (views, tied weights) is shared again.
    """
    swapped: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        if layout != torch.contiguous_format:
            for t in (*model.parameters(), *model.buffers()):
                if t.dim() == 4 and not t.is_contiguous(memory_format=layout):
                    swapped.append((t, t.data))
                    t.data = t.data.contiguous(memory_format=layout)
        yield
    finally:
        for t, data in swapped:
            t.data = data


def _in_layout(forward: Forward, layout: torch.memory_format) -> Forward:
    if layout == torch.contiguous_format:
        return forward
    return lambda x: forward(x.contiguous(memory_format=layout))


def _with_cpu_linears(forward: Forward, device: torch.device) -> Forward:
    def run(x: torch.Tensor):
        with cpu_linears(device):
            return forward(x)

    return run


def _channels_first(forward: Forward) -> Forward:
    """Every tap as (B, C, h, w) where it has a grid (``camshaft.models.layout``), as the explanations read it:
    channel objectives index axis 1 of Swin's channels-last maps too, and a ViT's tokens are its patches' grid
    (a channel's mean is over the patch tokens, the class token left out, as Ghiasi et al. 2022 visualize
    ViT features)."""

    def run(x: torch.Tensor):
        logits, taps = forward(x)
        return logits, {t: as_maps(a, x.shape[-2:]) for t, a in taps.items()}

    return run


EXACT_GROUP = 8  # images per model call under exact kernels on the CPU


@contextlib.contextmanager
def batch_invariant(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """CUDA: convolution kernels whose result for an image does not depend on the batch size.

    cuDNN picks kernels by batch size; their rounding differs, and gradient ascent amplifies rounding
    (max-pool and ReLU near-ties) until a batch no longer matches its single runs. Inside, cuDNN is
    off and torch's own per-image kernels run instead (much slower). The switch is process-wide.
    The CPU needs no switch: there exact runs call the model on fixed groups of images (``grouped``).
    """
    previous = torch.backends.cudnn.enabled
    try:
        if enabled and device.type == "cuda":
            torch.backends.cudnn.enabled = False
        yield
    finally:
        torch.backends.cudnn.enabled = previous


def grouped(forward: Forward, group: int = EXACT_GROUP, first: int = 0) -> Forward:
    """``forward`` called on groups of exactly ``group`` images, image ``first + i`` at slot ``(first + i) % group``.

    oneDNN (and MKL) pick kernels, blocking and thread splits by batch size, so an image's rounding
    depends on how many images share its call: gradient ascent amplifies that until a batch no longer
    matches its single runs. Every call here has the same shape, and every image of a run sits at the
    same slot of its group however the run is chunked (``first`` is the chunk's first image in the
    run); the slots around a chunk's images are filled with detached copies of its edge images, and
    kernels compute each image of a call on its own. Measured on 2 CPU cores, resnet18 at 128 px, 64
    classes: 0.86-0.92x the speed of one call on the whole batch (larger groups are faster, and cost
    more for short runs), 2.2x torch's per-image kernels (oneDNN off); logits and input gradients
    bitwise the same whatever the batch, the neighbours and the slot.
    """

    def run(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lead = first % group
        tail = -(lead + len(x)) % group
        edges = [x[:1].detach().expand(lead, *x.shape[1:]), x, x[-1:].detach().expand(tail, *x.shape[1:])]
        padded = torch.cat(edges) if lead or tail else x
        outs = [forward(part) for part in padded.split(group)]  # split: one backward for all the parts
        keep = slice(lead, lead + len(x))
        logits = torch.cat([o[0] for o in outs])[keep] if len(outs) > 1 else outs[0][0][keep]
        taps = {t: torch.cat([o[1][t] for o in outs])[keep] for t in outs[0][1]}
        return logits, taps

    return run


def tap_shapes(forward: Forward, preprocess: Preprocess, device: torch.device) -> tuple[dict, int]:
    """Per-image tap shapes and the number of classes, from one forward of a grey image."""
    x = probe_input(preprocess.input_size, device)
    with torch.no_grad():
        logits, taps = forward(x)
    return {k: tuple(v.shape[1:]) for k, v in taps.items()}, int(logits.shape[-1])


def render(model: nn.Module, objectives: Sequence[Objective], *, preprocess: Preprocess,
           config: RenderConfig = RenderConfig(), init: torch.Tensor | None = None,
           progress: bool = False) -> Rendering:
    """Optimise ``config.copies`` images per objective, ``config.batch_size`` images at a time.

    Args:
        model: a torch classifier (moved to the device; its modes and grad flags are restored).
        preprocess: input size and normalisation (mean, std on [0, 1] pixels).
        init: start images (M, 3, H, W) in [0, 1], M = 1 or one per image; default: seeded noise.
    Raises:
        ConfigError: bad settings, an objective that does not fit the model (all are named).
    """
    from tqdm.auto import tqdm

    objectives = list(objectives)
    if not objectives:
        raise ConfigError("give at least one objective")
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    if config.pad >= min(preprocess.input_size):  # the mirrored frame reflects the image itself
        h, w = preprocess.input_size
        raise ConfigError(f"pad ({config.pad}) must be smaller than the input size {h}x{w}")
    n_images = len(objectives) * config.copies
    init = _expand_init(init, n_images, preprocess.input_size)
    model.to(device)
    exact = device.type == "cpu" if config.exact is None else config.exact
    groups = exact and device.type == "cpu"  # the CPU's exact runs: fixed groups of images (``grouped``)
    # convnets run channels-last (faster, as in the backends); torch's own batch-invariant CUDA
    # kernels are written for contiguous tensors
    layout = torch.contiguous_format if exact and not groups else resolve_memory_format("auto", model)
    with _frozen_eval(model), _laid_out(model, layout), batch_invariant(device, exact):
        full = _with_regularizers(model, objectives, config, preprocess, device)
        taps = sorted(set().union(*(o.taps for o in full)))
        # folding skips a batch norm whose convolution a tap reads, so exact runs do not fold: an image's
        # result must not depend on the taps of the other objectives in its run (~3% slower, resnet18)
        forward = _in_layout(forward_fn(model, taps, fold=not exact, layout=layout), layout)
        if not exact:  # linears through oneDNN on the CPU (camshaft.models.cpu_linear), as the eager backend
            forward = _with_cpu_linears(forward, device)
        forward = _channels_first(forward)
        _check(objectives + full, forward, preprocess, device)
        per_chunk = config.batch_size // config.copies  # objectives per chunk
        chunks = [range(i, min(i + per_chunk, len(objectives))) for i in range(0, len(objectives), per_chunk)]
        parts = []
        with tqdm(total=len(chunks) * config.steps, desc="actmax", unit="step", disable=not progress) as bar:
            for chunk in chunks:
                rows = slice(chunk[0] * config.copies, (chunk[-1] + 1) * config.copies)
                run = grouped(forward, first=rows.start) if groups else forward
                parts.append(_render_chunk(model, run, [objectives[i] for i in chunk], [full[i] for i in chunk],
                                           rows, init=None if init is None else init[rows], config=config,
                                           preprocess=preprocess, device=device, dtype=dtype, bar=bar))
    images, values, probs, losses = (torch.cat(t, dim=1 if k == 3 else 0) for k, t in enumerate(zip(*parts)))
    return Rendering(images, tuple(objectives), values, probs, losses, config.copies)


def _expand_init(init: torch.Tensor | None, n: int, size: tuple[int, int]) -> torch.Tensor | None:
    if init is None:
        return None
    if init.dim() != 4 or init.shape[1] != 3 or tuple(init.shape[2:]) != tuple(size):
        raise ConfigError(f"initial images must be (M, 3, {size[0]}, {size[1]}), received {tuple(init.shape)}")
    if init.shape[0] not in (1, n):
        raise ConfigError(f"give 1 initial image or one per image ({n}), received {init.shape[0]}")
    return init.float().cpu().expand(n, -1, -1, -1)


def _with_regularizers(model, objectives, config, preprocess, device) -> list[Objective]:
    """Each objective plus the configured regularizers (diversity at its own tap by default)."""
    fallback: list[str | None] = []

    def default_tap() -> str | None:
        if not fallback:
            from camshaft.models.inspect import describe

            fallback.append(describe(model.to("cpu"), input_size=preprocess.input_size).default_tap)
            model.to(device)
        return fallback[0]

    out = []
    for o in objectives:
        tap = config.diversity_tap
        if config.diversity > 0 and tap is None:
            tap = next(iter(o.taps)) if len(o.taps) == 1 else default_tap()
        reg = config.regularizer(tap)
        out.append(o if reg is None else o + reg)
    return out


def _check(objectives: Sequence[Objective], forward: Forward, preprocess: Preprocess, device) -> None:
    shapes, num_classes = tap_shapes(forward, preprocess, device)
    problems = sorted({p for o in objectives for p in o.check(shapes, num_classes)})
    if problems:
        raise ConfigError("objectives do not fit the model: " + "; ".join(problems))


def _render_chunk(model, forward, objectives, full, rows: slice, *, init, config: RenderConfig,
                  preprocess: Preprocess, device, dtype, bar):
    """Optimise one chunk: images ``rows`` of the whole run; returns images, values, probs, losses."""
    k = config.copies
    generators = [torch.Generator().manual_seed(config.seed + i) for i in range(rows.start, rows.stop)]
    param = get_param(config.param)(preprocess.input_size, generators=generators, sd=config.init_sd,
                                    init=init, device=device)
    # on a GPU the fused kernel: one launch per step instead of a dozen (each element's update is its own)
    optimizer = torch.optim.Adam(param.params, lr=config.lr, fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)
    transform = config.transforms(preprocess.input_size)  # the model sees its own input size
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (preprocess.mean, preprocess.std))
    losses_of, values_of = LossPlan(full, k, device), LossPlan(objectives, k, device)
    history = []
    for step in range(config.steps):
        optimizer.zero_grad(set_to_none=True)
        images = param.image_fn()  # (B, 3, H, W)
        # the leak's hooks are set on the forward's ReLU nodes: the backward runs them after the with
        leak = config.relu_leak if step < config.relu_leak_steps else 0.0
        with (redirected_relus(model, leak=leak),
              torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)):
            logits, taps = forward((transform(images, generators) - mean) / std)
        losses = losses_of(Activations(logits.float(), {t: a.float() for t, a in taps.items()}, images))
        scaler.scale(losses.sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        history.append(losses.detach())  # stays on the device: no sync per step
        if config.blur_every and (step + 1) % config.blur_every == 0:
            param.blur_(config.blur_sigma)
        bar.update(1)
    with torch.no_grad():
        images = param.image_fn()
        saved = as_saved(images)  # measured as the PNG holds it
        logits, taps = forward((saved - mean) / std)  # the final image, untransformed, in float32
        acts = Activations(logits.float(), {t: a.float() for t, a in taps.items()}, saved)
        values = -values_of(acts)
        probs = _target_probs(objectives, logits.float().softmax(-1), k)
    return images.float().cpu(), values.cpu(), probs.cpu(), torch.stack(history).cpu()


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """Images rounded to the 8 bits per channel a PNG holds (NaN stays NaN).

    The final values and target probabilities are measured on these: what the model gives the saved
    PNG, not a float image that was never saved (rounding moves a pixel render's probability).
    """
    return torch.round(images.float() * 255.0) / 255.0


def _target_probs(objectives: Sequence[Objective], probs: torch.Tensor, copies: int) -> torch.Tensor:
    out = torch.full((probs.shape[0],), math.nan)
    for j, o in enumerate(objectives):
        if o.target is not None:
            out[j * copies:(j + 1) * copies] = probs[j * copies:(j + 1) * copies, o.target].cpu()
    return out
