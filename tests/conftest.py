"""Shared fixtures: tiny hand-weighted models and helpers to open backends on them."""

from __future__ import annotations

import torch
from torch import nn

import pytest

from camshaft.engine.backends import backend_factory
from camshaft.models.sources import ModelSource
from camshaft.preprocess import Preprocess

torch.set_num_threads(2)


class TinyCam(nn.Module):
    """features = 1x1 conv (channel 0 = R - B, channel 1 = G), then GAP + linear: CAM in closed form."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([[1.0, 0, -1], [0, 1, 0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]]))
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


class Untraceable(TinyCam):
    """The same model, but with data-dependent control flow: FX cannot trace it, hooks are used."""

    def forward(self, x):
        a = self.features(x)
        if bool(a.sum() > -1e30):  # always true, but FX cannot know
            a = a * 1.0
        return self.fc(torch.flatten(self.avgpool(a), 1))


def source_of(model: nn.Module, *, size=(8, 8), names=None) -> ModelSource:
    pre = Preprocess(input_size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="stretch")
    return ModelSource("torch", type(model).__name__, module=model.eval(), preprocess=pre, class_names=names)


def fixed(targets):
    """A target selector that ignores the logits: always ``targets`` (B, K), on the logits' device."""
    t = torch.as_tensor(targets)
    return lambda logits: t.to(logits.device)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def open_backend(name: str, source: ModelSource, tmp_path, *, taps=None, **options):
    return backend_factory(name)(
        source, taps=taps, preprocess={}, device=torch.device("cpu"), dtype=torch.float32, workdir=tmp_path, **options
    )


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny images parallelise badly, far worse on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyCam().eval()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``camshaft ARGV`` in-process: (exit code, stdout, stderr); argparse exits count as codes."""
    from camshaft.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
