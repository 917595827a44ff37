"""The input-gradient family and the CAM relatives: closed forms, references, invariants."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from conftest import TinyCam, fixed, open_backend, source_of
from torch import nn

from camshaft.engine.methods import check_backend, get_method
from camshaft.engine.methods.guided_backprop import guided
from camshaft.errors import CapabilityError

W_CONV = torch.tensor([[1.0, 0, -1], [0, 1, 0]])  # TinyCam: A0 = R - B, A1 = G
W_FC = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]])



@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # BatchNorm statistics of real activations: non-trivial maps
        model.train()
        model(torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        model.eval()
    return model


def test_saliency_of_a_linear_model_is_its_weights(tmp_path):
    """TinyCam is linear: dy_c/dx[ch, i, j] = (W_fc[c] @ W_conv)[ch] / (H W) at every pixel."""
    backend = open_backend("eager", source_of(TinyCam()), tmp_path)
    maps, _ = get_method("saliency").run(backend, torch.randn(2, 3, 8, 8), fixed([[0, 1], [2, 0]]), tap=None)
    per_channel = (W_FC @ W_CONV).abs().amax(dim=1) / 64  # (3 classes,)
    expected = per_channel[torch.tensor([[0, 1], [2, 0]])][..., None, None].expand(2, 2, 8, 8)
    torch.testing.assert_close(maps, expected)


def test_integrated_gradients_of_a_linear_model_is_exact(tmp_path):
    backend = open_backend("eager", source_of(TinyCam()), tmp_path)
    x = torch.randn(1, 3, 8, 8)
    maps, _ = get_method("integrated_gradients").run(backend, x, fixed([[1]]), tap=None, options={"steps": 3})
    grad = (W_FC[1] @ W_CONV)[:, None, None] / 64  # (3, 1, 1)
    torch.testing.assert_close(maps[0, 0], (x[0] * grad).sum(0))


def test_integrated_gradients_completeness(resnet, tmp_path):
    """Attributions sum to F(x) - F(baseline) for enough steps (Sundararajan et al., axiom)."""
    backend = open_backend("eager", source_of(resnet, size=(64, 64)), tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps, out = get_method("integrated_gradients").run(backend, x, fixed([[3], [5]]), tap=None, options={"steps": 128})
    with torch.no_grad():
        delta = out.logits.gather(1, out.targets) - resnet(torch.zeros_like(x)).gather(1, out.targets)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), delta, rtol=0.03, atol=0.01)


def test_integrated_gradients_agree_with_captum(resnet, tmp_path):
    from captum.attr import IntegratedGradients

    backend = open_backend("eager", source_of(resnet, size=(64, 64)), tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    maps, _ = get_method("integrated_gradients").run(
        backend, x, fixed([[3, 1], [5, 0]]), tap=None, options={"steps": 12, "samples_per_forward": 7}
    )
    for k in range(2):
        ref = IntegratedGradients(resnet).attribute(x, target=torch.tensor([[3, 1], [5, 0]])[:, k], n_steps=12, method="riemann_middle")
        torch.testing.assert_close(maps[:, k], ref.sum(1), rtol=1e-3, atol=1e-4 * ref.abs().max().item())


def test_sampled_methods_do_not_depend_on_chunking(resnet, tmp_path):
    backend = open_backend("eager", source_of(resnet, size=(64, 64)), tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for method, options in [("smoothgrad", {"samples": 5}), ("integrated_gradients", {"steps": 5})]:
        one, _ = get_method(method).run(backend, x, fixed([[1], [2]]), tap=None, options={**options, "samples_per_forward": 2})
        all_, _ = get_method(method).run(backend, x, fixed([[1], [2]]), tap=None, options={**options, "samples_per_forward": 64})
        torch.testing.assert_close(one, all_, rtol=1e-4, atol=1e-7)


def test_an_images_sampled_map_does_not_depend_on_its_batch(resnet, tmp_path):
    backend = open_backend("eager", source_of(resnet, size=(64, 64)), tmp_path)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    for method, options in [("smoothgrad", {"samples": 4}), ("integrated_gradients", {"steps": 4})]:
        batch, _ = get_method(method).run(backend, x, fixed([[1], [2], [3]]), tap=None, options=options)
        for i in range(3):
            alone, _ = get_method(method).run(backend, x[i : i + 1], fixed([[i + 1]]), tap=None, options=options)
            torch.testing.assert_close(alone[0], batch[i], rtol=1e-4, atol=1e-6)


def test_smoothgrad_without_noise_is_saliency(resnet, tmp_path):
    backend = open_backend("eager", source_of(resnet, size=(64, 64)), tmp_path)
    x = torch.randn(1, 3, 64, 64)
    smooth, _ = get_method("smoothgrad").run(backend, x, fixed([[4]]), tap=None, options={"samples": 3, "noise": 0.0})
    plain, _ = get_method("saliency").run(backend, x, fixed([[4]]), tap=None)
    torch.testing.assert_close(smooth, plain, rtol=1e-5, atol=1e-8)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        return self.net(x)


def test_guided_backprop_closed_form_and_cleanup(tmp_path):
    """f = w2 . relu(W1 x): guided gradient = W1^T (relu(w2) * [W1 x > 0])."""
    model = TwoLayer()
    backend = open_backend("eager", source_of(model, size=(2, 2)), tmp_path, taps=["net.2"])
    x = torch.randn(1, 3, 2, 2)
    maps, out = get_method("guided_backprop").run(backend, x, fixed([[1]]), tap=None)
    w1, w2 = model.net[1].weight, model.net[3].weight[1]
    active = (model.net[1](x.flatten(1)) > 0).float()[0]
    guided_grad = (w1.T @ (torch.relu(w2) * active)).view(3, 2, 2)
    torch.testing.assert_close(maps[0, 0], guided_grad.abs().amax(0))
    assert all(not m._forward_hooks for m in model.modules())
    with guided(model) as n:
        assert n == 1


def test_guided_backprop_needs_a_live_model(tmp_path):
    backend = open_backend("torchscript", source_of(TinyCam()), tmp_path)
    with pytest.raises(CapabilityError, match="eager"):
        check_backend(get_method("guided_backprop"), backend)


def test_onnxruntime_gives_no_input_gradients(tmp_path):
    backend = open_backend("onnxruntime", source_of(TinyCam()), tmp_path)
    with pytest.raises(CapabilityError, match="eager, inductor, torchscript and pt2"):
        check_backend(get_method("saliency"), backend)


def test_torchscript_input_gradients_match_eager(resnet, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    maps = {}
    for name in ("eager", "torchscript"):
        backend = open_backend(name, source_of(resnet, size=(64, 64)), tmp_path / name)
        maps[name], _ = get_method("integrated_gradients").run(backend, x, fixed([[1], [2]]), tap=None, options={"steps": 4})
    torch.testing.assert_close(maps["torchscript"], maps["eager"], rtol=1e-3, atol=1e-6)


def test_cam_relatives_closed_form_with_a_gap_linear_head(tmp_path):
    """With GAP + linear, g = W[c,k]/(hw) everywhere: every relative has a closed form."""
    backend = open_backend("eager", source_of(TinyCam()), tmp_path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    t = [[0, 2], [1, 1]]
    a = torch.stack([x[:, 0] - x[:, 2], x[:, 1]], dim=1)  # (B, 2, 8, 8)
    g = W_FC[torch.tensor(t)] / 64  # (B, K, C)
    layer = torch.relu(torch.einsum("bkc,bchw->bkhw", torch.relu(g), a))
    xgrad = torch.relu(torch.einsum("bkc,bchw->bkhw", g, a))  # activation-weighted mean of a constant
    s = a.sum(dim=(-2, -1)).unsqueeze(1)  # (B, 1, C)
    alpha = g**2 / (2 * g**2 + s * g**3)
    pp = torch.relu(torch.einsum("bkc,bchw->bkhw", 64 * alpha * torch.relu(g), a))
    for name, expected in [("layercam", layer), ("xgradcam", xgrad), ("gradcam++", pp)]:
        maps, _ = get_method(name).run(backend, x, fixed(t), tap="features")
        torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("name", "cls"), [("layercam", "LayerCAM"), ("xgradcam", "XGradCAM")])
def test_cam_relatives_agree_with_torchcam(name, cls, resnet, tmp_path):
    import torchcam.methods

    backend = open_backend("eager", source_of(resnet, size=(64, 64)), tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    ours, _ = get_method(name).run(backend, x, fixed([[3], [5]]), tap="layer4")
    model = copy.deepcopy(resnet)
    with getattr(torchcam.methods, cls)(model, target_layer="layer4") as extractor:
        for i, c in enumerate((3, 5)):
            ref = extractor(class_idx=c, scores=model(x[i : i + 1]), normalized=False)[0][0]
            torch.testing.assert_close(ours[i, 0], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert ours.abs().max() > 0


def test_scorecam_equals_a_plain_loop_over_channels(resnet, tmp_path):
    import torch.nn.functional as F

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    maps = {}
    for backend_name in ("eager", "onnxruntime"):
        backend = open_backend(backend_name, source_of(resnet, size=(64, 64)), tmp_path / backend_name, taps=["layer3"])
        maps[backend_name], out = get_method("scorecam").run(
            backend, x, fixed([[3], [5]]), tap="layer3", options={"masks_per_forward": 37}
        )
    a = out.taps["layer3"]
    expected = torch.zeros(2, 1, *a.shape[-2:])
    with torch.no_grad():
        for b, c in enumerate((3, 5)):
            masks = []
            for k in range(a.shape[1]):
                up = F.interpolate(a[b : b + 1, k : k + 1], size=(64, 64), mode="bilinear", align_corners=False)
                masks.append((up - up.min()) / (up.max() - up.min()) if up.max() > up.min() else up - up.min())
            p = torch.softmax(resnet(x[b : b + 1] * torch.cat(masks)), dim=-1)[:, c]  # one masked image per channel
            expected[b, 0] = (p[:, None, None] * a[b]).sum(dim=0)
    torch.testing.assert_close(maps["eager"], torch.relu(expected), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(maps["onnxruntime"], maps["eager"], rtol=1e-3, atol=1e-4)
