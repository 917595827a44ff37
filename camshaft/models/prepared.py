"""A torch model made ready to explain: taps resolved, split at the first tap, CAM head found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from camshaft.engine.backends.base import ModelInfo
from camshaft.errors import ConfigError
from camshaft.models.inspect import CamHead, describe, find_cam_head, input_checked, model_device, probe_input
from camshaft.models.sources import ModelSource, kind_name
from camshaft.models.split import SplitModel, split_at_first_tap
from camshaft.models.taps import TappedModel, plan_taps
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
