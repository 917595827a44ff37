"""Linear layers on channels-last maps (ConvNeXt's pointwise layers) run as 1x1 convolutions on the CPU:
the same values, the user's layers shared and untouched, hooked layers and other inputs left to the layer."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import open_backend, source_of
from torch import fx, nn

from camshaft.engine.methods import get_method
from camshaft.models.pointwise import ChannelsLastLinear, linears_as_convolutions


def _convnext() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=10).eval()
    for block in model.modules():  # layer scales away from their 1e-6 start, so the pointwise layers count
        if hasattr(block, "layer_scale"):
            block.layer_scale.data.fill_(0.5)
    return model


def _wrapped(gm: fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    return sum(isinstance(modules[n.target], ChannelsLastLinear) for n in gm.graph.nodes if n.op == "call_module")


class Block(nn.Module):
    """A pointwise layer on (N, H, W, C), one on (N, C), and one the user hooked."""

    def __init__(self):
        super().__init__()
        self.conv, self.pw, self.hooked = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 6), nn.Linear(6, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.hooked(self.pw(self.conv(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.fc(y.mean((2, 3)))


def test_a_pointwise_layer_runs_as_a_convolution_with_the_same_values_and_the_model_untouched():
    torch.manual_seed(0)
    model = Block().eval()
    calls = []
    model.hooked.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    before = copy.deepcopy(model.state_dict())
    gm = fx.symbolic_trace(model)
    assert linears_as_convolutions(gm) == 2  # pw and fc; not the hooked one
    assert isinstance(gm.pw, ChannelsLastLinear) and gm.pw.linear is model.pw and gm.hooked is model.hooked
    assert isinstance(model.pw, nn.Linear)  # the user's tree keeps its layers
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), gm(x)
        calls.clear()
        gm(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert calls == [torch.Size([2, 9, 7, 6])]  # the hook still fires
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():  # the weights are shared: a change to the model shows through the wrapper
        model.pw.weight.mul_(2)
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_the_wrapper_takes_the_convolution_only_for_4d_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    wrapped = ChannelsLastLinear(layer)
    for shape in [(4, 5), (2, 6, 5), (2, 4, 3, 5)]:
        x = torch.randn(shape)
        out = wrapped(x)
        assert out.shape == (*shape[:-1], 3) and out.is_contiguous()
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_a_converted_convnext_gives_the_maps_of_its_own_layers(method, tmp_path):
    model = _convnext()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    select = lambda logits: torch.tensor([[3, 1], [5, 0]])  # noqa: E731
    plain = open_backend("eager", source_of(model, size=(64, 64)), tmp_path / "a")
    fast = open_backend("eager", source_of(copy.deepcopy(model), size=(64, 64)), tmp_path / "b", fold=True)
    # two pointwise layers in each of 18 blocks, and the classifier
    assert _wrapped(fast._full.graph_module) == 37 and _wrapped(plain._full.graph_module) == 0
    want, out_want = get_method(method).run(plain, x, select, tap="features", options={})
    got, out_got = get_method(method).run(fast, x, select, tap="features", options={})
    assert want.abs().max() > 0
    torch.testing.assert_close(out_got.logits, out_want.logits, rtol=1e-4, atol=1e-4 * out_want.logits.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
