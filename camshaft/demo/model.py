"""The embedded demo classifier: a small CNN with a CAM head, trained on `shapes` images.

Weights ship in `weights.pt` next to this file; `scripts/train_demo.py` re-creates them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from camshaft.demo.shapes import CLASS_NAMES

__all__ = [
    "CLASS_NAMES", "DEMO_INPUT_SIZE", "DEMO_MEAN", "DEMO_STD", "WEIGHTS_PATH",
    "DemoNet", "build_demo_model", "load_demo_model", "preprocess",
]

DEMO_INPUT_SIZE = (96, 96)  # (H, W)
DEMO_MEAN = (0.5, 0.5, 0.5)
DEMO_STD = (0.25, 0.25, 0.25)
WEIGHTS_PATH = Path(__file__).with_name("weights.pt")

# (channels, convs) of the four stages, a 2x2 max-pool before each but the first; the last
# stage's output, at 1/8 of the input, is the feature map CAM reads.
_STAGES = ((16, 1), (32, 2), (64, 2), (80, 2))


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class DemoNet(nn.Module):
    """Four conv stages (3 max-pools: features at 1/8 of the input), then GAP and a linear layer.

    `features(x)` is the last conv map, (B, 80, H/8, W/8); `forward` is
    `fc(flatten(avgpool(features(x))))`, the head CAM needs.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES)):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, (width, convs) in enumerate(_STAGES):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs):
                layers += _conv(cin, width)
                cin = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, C, h, w)
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, num_classes)


def build_demo_model(
    num_classes: int = len(CLASS_NAMES), *, generator: torch.Generator | None = None
) -> DemoNet:
    """A fresh demo model; with `generator`, its initial weights come from that generator only."""
    model = DemoNet(num_classes)
    if generator is not None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=generator)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01, generator=generator)
                nn.init.zeros_(m.bias)
    return model


def load_demo_model() -> DemoNet:
    """The trained demo model in eval mode, loaded from `WEIGHTS_PATH` (weights_only)."""
    state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    model = build_demo_model(state["fc.weight"].shape[0])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def preprocess(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images of `DEMO_INPUT_SIZE` -> a normalised float batch, (B, 3, H, W)."""
    h, w = DEMO_INPUT_SIZE
    arrays = [np.asarray(im.convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
              for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(DEMO_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD).view(1, 3, 1, 1)
    return (x - mean) / std
