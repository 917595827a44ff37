"""A torch model made ready to explain: taps resolved, split at the first tap, CAM head found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from camshaft.engine.backends.base import ModelInfo
from camshaft.errors import ConfigError, UnknownNameError
from camshaft.models.inspect import CamHead, describe, find_cam_head, input_checked, model_device, probe_input
from camshaft.models.sources import ModelSource, kind_name
from camshaft.models.split import SplitModel, split_at_first_tap
from camshaft.models.taps import TapPlan, TappedModel, plan_taps
from camshaft.preprocess import Preprocess


@dataclass
class PreparedModel:
    module: nn.Module
    tapped: TappedModel
    split: SplitModel | None
    cam_head: CamHead | None
    tap_shapes: dict[str, list[int]]
    info: ModelInfo


def prepare_model(
    source: ModelSource, *, taps: Sequence[str] | None = None, preprocess: Preprocess | None = None
) -> PreparedModel:
    """Tap ``source`` (a torch model) at ``taps`` (default: its last spatial feature map)."""
    if source.kind != "torch" or source.module is None:
        raise ConfigError(f"{source.spec!r} is {kind_name(source.kind)}, not a torch model")
    model = source.module.eval()
    pre = preprocess or source.preprocess or Preprocess()
    source.check_input_size(pre.input_size)
    plan = plan_taps(model)
    if taps and source.path is not None:
        check_graph_taps(source, plan, taps)
    if not taps:
        report = describe(model, input_size=pre.input_size)
        if report.default_tap is None:
            h, w = pre.input_size
            raise ConfigError(f"{source.spec}: no feature map larger than 1x1 at a {h}x{w} input; "
                              "choose a larger --input-size, or name a tap with --tap")
        taps = [report.default_tap]
    tapped = TappedModel(model, list(taps), plan=plan)
    x = probe_input(pre.input_size, model_device(model))
    with torch.inference_mode(), input_checked(x):
        logits, acts = tapped(x)
    wrong = [t for t in tapped.taps if not isinstance(acts[t], torch.Tensor) or acts[t].dim() < 2]
    if wrong:
        received = ", ".join(f"{t} ({type(acts[t]).__name__})" for t in wrong)
        raise ConfigError(f"taps must be feature maps (N, C, ...): {received} is not; `camshaft inspect "
                          f"{source.spec}` lists the layers with their output shapes")
    shapes = {t: list(acts[t].shape[1:]) for t in tapped.taps}
    last = tapped.taps[-1]
    head = find_cam_head(model, last, plan=plan, x=x) if len(shapes[last]) == 3 else None
    info = ModelInfo(
        taps=tuple(tapped.taps),
        num_classes=int(logits.shape[-1]),
        preprocess=pre,
        class_names=tuple(source.class_names) if source.class_names else None,
        cam_weight=None if head is None else head.weight,
        cam_tap=None if head is None else head.tap,
        source=source.spec,
        tap_shapes={t: tuple(s) for t, s in shapes.items()},
    )
    return PreparedModel(model, tapped, split_at_first_tap(tapped), head, shapes, info)


def check_graph_taps(source: ModelSource, plan: TapPlan, taps: Sequence[str]) -> None:
    """A model converted from a file (``camshaft.models.foreign``) is tapped by node name: its module paths
    (``layer4``) only hold its weights, and the valid choices are its nodes, not those paths."""
    nodes = [n for n in plan.nodes if n != plan.output]
    for tap in taps:
        if tap not in plan.nodes:
            raise UnknownNameError(
                "tap", tap, nodes[::-1],
                hint=f"{source.spec} is a graph of ATen operations converted from the file: a tap is one of its "
                     f"nodes, last first (`camshaft inspect {source.spec}` lists them with shapes); module paths "
                     "such as layer4 name only where its weights are kept",
            )
