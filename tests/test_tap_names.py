"""A tap named by a module path is that module's output, whatever torchvision's FX names say; a transformer's
tokens that tile a square are a map.

torchvision names a graph node by its module's path with any ``_N`` ending dropped, then numbers repeats:
modules ``conv_1`` and ``conv_2`` were the nodes ``conv`` and ``conv_1``, so ``--tap conv_1`` explained
``conv_2`` (silently: another layer's maps), and ViT's ``ln_1`` was its ``ln_2``."""

from __future__ import annotations

import pytest
import torch
from conftest import open_backend, source_of
from torch import nn
from torchvision.models import VisionTransformer

from camshaft.cli import main
from camshaft.engine.backends.base import Output
from camshaft.engine.methods import get_method
from camshaft.engine.methods.base import feature_map
from camshaft.errors import ConfigError
from camshaft.models.inspect import describe
from camshaft.models.layout import token_grid
from camshaft.models.taps import TappedModel, plan_taps


class Numbered(nn.Module):
    """Layers named as many people name them: ``conv_1``, ``conv_2``; the second ReLU module called twice."""

    def __init__(self):
        super().__init__()
        self.conv_1, self.conv_2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
        self.relu_1, self.fc = nn.ReLU(), nn.Linear(6, 3)

    def forward(self, x):
        x = self.relu_1(self.conv_2(self.relu_1(self.conv_1(x))))
        return self.fc(x.mean((2, 3)))


def numbered() -> nn.Module:
    torch.manual_seed(0)
    return Numbered().eval()


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every gradient would be 0
    return model.eval()


def _hooked_outputs(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules, seen = dict(model.named_modules()), {}
    handles = [modules[p].register_forward_hook(lambda m, i, o, p=p: seen.setdefault(p, o)) for p in paths]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def test_a_module_path_taps_that_module():
    model = numbered()
    plan = plan_taps(model)
    assert plan.traceable and plan.nodes[:4] == ("x", "conv_1", "relu_1", "conv_2")
    assert plan.fx("conv_1") == "conv" and plan.fx("conv_2") == "conv_1"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    want = _hooked_outputs(model, ["conv_1", "conv_2"], x)
    with torch.no_grad():
        _, taps = TappedModel(model, ["conv_2", "conv_1"], plan=plan)(x)
    assert taps["conv_1"].shape == (2, 4, 8, 8) and taps["conv_2"].shape == (2, 6, 8, 8)
    for name in ("conv_1", "conv_2"):
        torch.testing.assert_close(taps[name], want[name])


def test_inspect_names_each_layer_by_its_path_and_the_default_tap_is_the_last_map():
    report = describe(numbered(), input_size=(8, 8))
    shapes = {layer.name: (layer.kind, layer.shape) for layer in report.layers}
    assert shapes["conv_1"] == ("Conv2d", (1, 4, 8, 8)) and shapes["conv_2"] == ("Conv2d", (1, 6, 8, 8))
    assert shapes["relu_1"] == ("ReLU", (1, 4, 8, 8))  # its first call
    assert report.default_tap == "relu_1_1"  # its second call, torchvision's name: after conv_2
    assert report.cam_head is not None and report.cam_head.weight.shape == (3, 6)


def test_gradcam_at_a_numbered_layer_is_that_layers(tmp_path):
    model = numbered()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    backend = open_backend("eager", source_of(numbered(), size=(8, 8)), tmp_path, taps=["conv_1"])
    maps, _ = get_method("gradcam").run(backend, x, lambda logits: torch.tensor([[0], [2]]), tap="conv_1")
    store = {}
    handle = model.conv_1.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    logits = model(x)
    a = store["a"]
    grads = torch.autograd.grad(logits[[0, 1], [0, 2]].sum(), a)[0]
    handle.remove()
    want = torch.relu((grads.mean((2, 3))[:, :, None, None] * a).sum(1))[:, None]
    torch.testing.assert_close(maps, want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens, grid", [(197, (1, 14)), (196, (0, 14)), (17, (1, 4)), (50, (1, 7)), (10, (1, 3)),
                                          (12, None), (2, None), (1, None)])
def test_token_grids(tokens, grid):
    assert token_grid(tokens) == grid


def test_tokens_that_tile_no_square_are_refused_with_their_shape():
    out = Output(torch.zeros(1, 3), {"t": torch.zeros(1, 12, 8)})
    with pytest.raises(ConfigError, match=r"tap 't' outputs 12x8 per image, not a \(C, h, w\) feature map nor tokens"):
        feature_map(out, "t", "Grad-CAM", (224, 224))


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_gradcam_on_vit_tokens_is_the_token_grid_reference(method, tmp_path):
    """At ``ln_1`` of the last block (the layer pytorch-grad-cam's ViT example taps), the class token dropped
    and the 16 patch tokens laid out 4x4 as the patch embedding reads them."""
    tap = "encoder.layers.encoder_layer_1.ln_1"
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    backend = open_backend("eager", source_of(tiny_vit(), size=(32, 32)), tmp_path, taps=[tap])
    targets = torch.tensor([[1, 3], [0, 2]])
    maps, out = get_method(method).run(backend, x, lambda logits: targets, tap=tap)
    assert maps.shape == (2, 2, 4, 4) and out.taps[tap].shape == (2, 16, 4, 4)
    store = {}
    handle = model.encoder.layers.encoder_layer_1.ln_1.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    logits = model(x)
    handle.remove()
    a = store["a"][:, 1:].transpose(1, 2).reshape(2, 16, 4, 4)
    want = []
    for k in range(2):
        g = torch.autograd.grad(logits[[0, 1], targets[:, k]].sum(), store["a"], retain_graph=True)[0]
        g = g[:, 1:].transpose(1, 2).reshape(2, 16, 4, 4)
        weights = g.mean((2, 3))[:, :, None, None] if method == "gradcam" else torch.relu(g)
        want.append(torch.relu((weights * a).sum(1)))
    want = torch.stack(want, 1).detach()
    assert want.abs().max() > 0
    torch.testing.assert_close(maps, want, rtol=1e-4, atol=1e-6)


def test_inspect_lists_vit_norms_by_their_paths(capsys):
    assert main(["inspect", f"{__name__}:tiny_vit", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "encoder.layers.encoder_layer_1.ln_1" in out and "encoder.layers.encoder_layer_1.ln_2" in out
    assert "encoder.layers.encoder_layer_1.ln " not in out
