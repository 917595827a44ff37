"""Occlusion (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks").

Slide a window over the input, replace what it covers (``fill``), and record for every target the
drop of its score: ``map[b, k, i, j] = score_k(x_b) - score_k(x_b with window (i, j) filled)``, so a
positive cell supports the class. ``run``'s map has one cell per window position (layout: see
``camshaft.engine.occlusion.windows``; the same as captum's ``Occlusion``). Windows overlap and do
not tile the input, so what runs write (``explain``) is each pixel's mean drop over the windows
covering it, captum's per-pixel attribution, on even tiles of ``gcd(size, window, stride)`` pixels
(``Grid.to_tiles``): placed, upsampled and scored like any map. Forward only: occluded variants
are built on the device and evaluated in batches of ``positions_per_forward``; one unoccluded
forward is shared and all K targets come from the same forwards.

Modes: ``plain`` (batched forwards, any backend), ``incremental`` (exact, eager only: recomputes
only each patch's receptive-field cone, Nakandala et al. 2019; on the CPU each image's positions
go in batches of windows near the same edges, ``border_batches``; a CPU's mode: on a GPU the many
small cone convolutions are launch-bound, resnet18 on an H200 ran it at 0.19x plain) and ``coarse-to-fine``
(APPROXIMATE: see ``camshaft.engine.occlusion.refine``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from camshaft.engine.backends.base import FORWARD, MODULE_HOOKS, Backend, Selector, replays_graphs
from camshaft.engine.methods.base import Method, Option, register_method
from camshaft.engine.methods.options import finite_float, positive_int
from camshaft.engine.occlusion.fills import FILL_MODES, fill_values
from camshaft.engine.occlusion.incremental import IncrementalModel, incremental_evaluator
from camshaft.engine.occlusion.refine import coarse_to_fine
from camshaft.engine.occlusion.sweep import SCORES, full_sweep, plain_evaluator, target_scores
from camshaft.engine.occlusion.windows import Grid, border_batches
from camshaft.errors import CapabilityError, ConfigError

MODES = ("plain", "incremental", "coarse-to-fine")


def parse_pair(text) -> tuple[int, int]:
    """``N`` or ``N,M`` (height, width) positive pixel counts; ints and pairs pass through."""
    try:
        items = [text] if isinstance(text, int) else (text.split(",") if isinstance(text, str) else list(text))
        values = () if isinstance(text, bool) else tuple(int(str(v).strip()) for v in items)
    except (TypeError, ValueError):
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or N,M (height,width) positive pixel counts, received {text!r}")
    return values


def parse_fill(text) -> str | float:
    """``zero``, ``mean``, ``blur`` or a finite number (a constant in the model's input space)."""
    if isinstance(text, str) and text in FILL_MODES:
        return text
    try:
        return finite_float(text)
    except ValueError:
        choices = ", ".join(FILL_MODES)
        raise argparse.ArgumentTypeError(f"fill must be {choices} or a number (finite), received {text!r}") from None


def _choice(choices: tuple[str, ...], what: str):
    def parse(text) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{what} must be one of {', '.join(choices)}, received {text!r}")
        return text

    return parse


def parse_count(text) -> int:
    try:
        return positive_int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_fraction(text) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, received {text!r}")
    return value


OPTIONS = (
    Option("window", parse_pair, (32, 32), "occlusion window in input pixels: N or N,M (height,width)"),
    Option(
        "stride", parse_pair, None,
        "step between occlusion windows in input pixels, at most the window: N or N,M (None: half window)",
    ),
    Option(
        "fill", parse_fill, "zero",
        "what covers the occlusion window, in the model's normalised input space: zero | mean (the image's "
        "mean colour) | blur (a Gaussian-blurred copy, sigma = window/4) | a number",
    ),
    Option("score", _choice(SCORES, "score"), "logit", "occlusion score whose drop is recorded: logit | prob"),
    Option(
        "positions_per_forward", parse_count, 64,
        "occluded images per forward pass, over all images of a batch (memory vs speed; results do not change)",
        memory=True,
    ),
    Option(
        "occlusion_mode", _choice(MODES, "occlusion mode"), "plain",
        "plain | incremental (exact; eager backend, recomputes only each patch's receptive field: faster on a CPU, "
        "slower on a GPU) "
        "| coarse-to-fine (APPROXIMATE: interpolates cells far from large drops)",
    ),
    Option(
        "refine_threshold", parse_fraction, 0.5,
        "coarse-to-fine only: evaluate exactly the cells next to coarse drops of at least this fraction of the "
        "image's largest (0: every cell)",
    ),
)


@dataclass(frozen=True)
class OcclusionSettings:
    """The method's options, checked; built from the CLI's parsed values or the API's raw ones."""

    window: tuple[int, int] = (32, 32)
    stride: tuple[int, int] | None = None  # None: half the window
    fill: str | float = "zero"
    score: str = "logit"
    positions_per_forward: int = 64
    occlusion_mode: str = "plain"
    refine_threshold: float = 0.5

    @classmethod
    def from_options(cls, options: dict) -> OcclusionSettings:
        """Parse every option (strings, numbers or pairs); all offenders are reported at once."""
        values, problems = {}, []
        for o in OPTIONS:
            raw = options.get(o.name, o.default)
            try:
                values[o.name] = raw if raw is None else o.parse(raw)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                problems.append(f"{o.name}: {e}")
        if not problems and values["stride"] is not None:
            problems += stride_problems(values["window"], values["stride"])
        if problems:
            raise ConfigError("invalid occlusion options: " + "; ".join(problems))
        if values["stride"] is None:
            values["stride"] = tuple(max(1, w // 2) for w in values["window"])
        return cls(**values)


def stride_problems(window: tuple[int, int], stride: tuple[int, int]) -> list[str]:
    """A stride longer than the window leaves pixels between windows that none covers (captum refuses it too)."""
    if all(s <= w for s, w in zip(stride, window, strict=True)):
        return []
    return [
        f"stride {stride[0]},{stride[1]} is longer than the window {window[0]},{window[1]}: pixels between windows "
        "would be covered by none; use a stride at most the window"
    ]


def check_options(options: dict) -> None:
    """The options against each other, when they are resolved (before any work): see ``from_options``."""
    OcclusionSettings.from_options(options)


def check_input(input_size: tuple[int, int], options: dict) -> None:
    """The window and stride against the model input: a window larger than the input is refused here, after the
    model loads and before an export or any image (the start-up probe refused it only after both)."""
    s = OcclusionSettings.from_options(options)
    Grid(size=tuple(input_size), window=s.window, stride=s.stride)


def _check_incremental(backend: Backend) -> None:
    if MODULE_HOOKS not in backend.capabilities or getattr(backend, "module", None) is None:
        raise CapabilityError(
            f"--occlusion-mode incremental needs a live torch model: the eager backend; the {backend.name} "
            "backend cannot serve it. Use --backend eager, or --occlusion-mode plain"
        )


def _autocast(backend: Backend):
    """The context the backend runs its model in (mixed precision, CPU linears), for the incremental model."""
    running = getattr(backend, "running", None)
    if running is not None:
        return running
    dtype = getattr(backend, "dtype", torch.float32)
    return lambda: torch.autocast(backend.device.type, dtype=dtype, enabled=dtype != torch.float32)


def run_occlusion(backend: Backend, x: torch.Tensor, select: Selector, tap: str | None, options: dict):
    """Maps (B, K, rows, cols) of score drops, and the unoccluded forward's output."""
    s = OcclusionSettings.from_options(options)
    if s.occlusion_mode == "incremental":
        _check_incremental(backend)
    grid = Grid(size=tuple(x.shape[-2:]), window=s.window, stride=s.stride)
    model = None
    if s.occlusion_mode == "incremental":
        layout = getattr(backend, "memory_format", torch.contiguous_format)
        model = IncrementalModel(backend.module, autocast=_autocast(backend), memory_format=layout)
    out = backend.forward(x)
    out.targets = select(out.logits)
    targets = out.targets.to(out.logits.device)  # (B, K)
    base = target_scores(out.logits, targets, s.score)  # (B, K)
    fill = fill_values(x, s.fill, window=s.window)
    if model is not None:
        evaluate = incremental_evaluator(model, x, fill, grid)
    else:
        forward = lambda v: backend.forward(v).logits  # noqa: E731
        if replays_graphs(backend):
            forward = _padded(forward, s.positions_per_forward)
        evaluate = plain_evaluator(forward, x, fill, grid)
    kw = dict(batch=x.shape[0], grid=grid, base=base, targets=targets, score=s.score)
    kw["per_forward"] = s.positions_per_forward
    if s.occlusion_mode == "coarse-to-fine":
        return coarse_to_fine(evaluate, threshold=s.refine_threshold, **kw), out
    if model is not None and backend.device.type == "cpu":
        # windows near the same edges share a batch: their cones are cut alike, so its boxes are
        # smaller (CPU convolutions cost by the cell; on a GPU the larger batches are kept)
        kw["batches"] = border_batches(grid, s.positions_per_forward)
    return full_sweep(evaluate, **kw), out


def _padded(forward, size: int):
    """``forward`` of a chunk padded to ``size`` variants with copies of its first (``replays_graphs``)."""

    def run(v: torch.Tensor) -> torch.Tensor:
        n = v.shape[0]
        if n >= size:
            return forward(v)
        return forward(torch.cat([v, v[:1].expand(size - n, *v.shape[1:])]))[:n]

    return run


def occlusion_tiles(maps: torch.Tensor, size: tuple[int, int], options: dict) -> torch.Tensor:
    """Drops per window -> each pixel's mean drop over the windows covering it, on even tiles (``Grid.to_tiles``)."""
    s = OcclusionSettings.from_options(options)
    return Grid(size=size, window=s.window, stride=s.stride).to_tiles(maps)


OCCLUSION = register_method(
    Method(
        "occlusion",
        frozenset({FORWARD}),
        run_occlusion,
        "score drop per occluded window (forward only)",
        options=OPTIONS,
        uses_tap=False,
        paper="Zeiler & Fergus 2014; incremental: Nakandala et al. 2019",
        tiles=occlusion_tiles,
        check=check_options,
        check_input=check_input,
    )
)
