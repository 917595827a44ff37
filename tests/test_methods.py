"""CAM and Grad-CAM against closed forms, identities and invariants."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import TinyCam, Untraceable, fixed, open_backend, source_of

from camshaft.engine.methods import check_backend, get_method
from camshaft.engine.targets import Targets
from camshaft.errors import CapabilityError, ConfigError



def closed_form_cam(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """By hand for TinyCam: A0 = R - B, A1 = G; CAM_c = W[c,0] A0 + W[c,1] A1."""
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]])
    a0, a1 = x[:, 0] - x[:, 2], x[:, 1]
    maps = [[w[c, 0] * a0[b] + w[c, 1] * a1[b] for c in targets[b].tolist()] for b in range(x.shape[0])]
    return torch.stack([torch.stack(m) for m in maps])


@pytest.mark.parametrize("model_cls", [TinyCam, Untraceable])
def test_cam_equals_closed_form(model_cls, tmp_path):
    backend = open_backend("eager", source_of(model_cls()), tmp_path)
    assert backend.info.taps == ("features",) and backend.info.cam_tap == "features"
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    targets = [[0, 2], [1, 0], [2, 1]]
    maps, out = get_method("cam").run(backend, x, fixed(targets), tap="features")
    assert maps.shape == (3, 2, 8, 8)
    torch.testing.assert_close(maps, closed_form_cam(x, torch.tensor(targets)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_cls", [TinyCam, Untraceable])
def test_gradcam_equals_relu_cam_over_hw(model_cls, tmp_path):
    """With a GAP + linear head, dy_c/dA_k = W[c,k] / (h w): Grad-CAM = ReLU(CAM) / (h w)."""
    backend = open_backend("eager", source_of(model_cls()), tmp_path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    targets = [[0, 1, 2], [2, 1, 0]]
    grad, _ = get_method("gradcam").run(backend, x, fixed(targets), tap="features")
    cam, _ = get_method("cam").run(backend, x, fixed(targets), tap="features")
    torch.testing.assert_close(grad, torch.relu(cam) / 64, rtol=1e-5, atol=1e-7)
    assert grad.abs().max() > 0


def _resnet(tmp_path, taps=None):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return open_backend("eager", source_of(model, size=(64, 64)), tmp_path, taps=taps)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_k_targets_at_once_equal_single_runs(method, tmp_path):
    backend = _resnet(tmp_path)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    targets = [[1, 4, 7], [0, 9, 3], [5, 5, 2]]
    together, _ = get_method(method).run(backend, x, fixed(targets), tap="layer4")
    for k in range(3):
        single, _ = get_method(method).run(backend, x, fixed([[t[k]] for t in targets]), tap="layer4")
        torch.testing.assert_close(together[:, k : k + 1], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_results_do_not_depend_on_batch_size(method, tmp_path):
    backend = _resnet(tmp_path)
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    select = Targets.parse("top:2").selector()
    whole, _ = get_method(method).run(backend, x, select, tap="layer4")
    parts = [get_method(method).run(backend, x[i : i + 2], select, tap="layer4")[0] for i in range(0, 5, 2)]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-4, atol=1e-6)


def test_top_k_targets_are_the_top_predictions(tmp_path):
    backend = _resnet(tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    _, out = get_method("gradcam").run(backend, x, Targets.parse("top:3").selector(), tap="layer4")
    assert torch.equal(out.targets, out.logits.topk(3).indices)


def test_gradcam_never_computes_weight_gradients_and_restores_flags(tmp_path):
    model = TinyCam()
    backend = open_backend("eager", source_of(model), tmp_path)
    get_method("gradcam").run(backend, torch.randn(1, 3, 8, 8), fixed([[0]]), tap="features")
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are back


def test_no_hooks_remain_after_success_or_failure(tmp_path):
    model = Untraceable()
    backend = open_backend("eager", source_of(model), tmp_path)
    get_method("gradcam").run(backend, torch.randn(1, 3, 8, 8), fixed([[0]]), tap="features")
    with pytest.raises(RuntimeError):
        get_method("gradcam").run(backend, torch.randn(1, 5, 8, 8), fixed([[0]]), tap="features")
    assert all(not m._forward_hooks for m in model.modules())


def test_cam_without_cam_head_fails_with_a_clear_message(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=4).eval()
    backend = open_backend("eager", source_of(model, size=(32, 32)), tmp_path)
    with pytest.raises(CapabilityError, match="gradcam"):  # refused before any work ...
        check_backend(get_method("cam"), backend, tap=backend.info.taps[-1])
    with pytest.raises(CapabilityError, match="gradcam"):  # ... and by the method itself
        get_method("cam").run(backend, torch.randn(1, 3, 32, 32), fixed([[0]]), tap=backend.info.taps[-1])


def test_targets_parse_and_validate():
    names = ["cat", "dog", "bird"]
    assert Targets.parse("top:2").k == 2
    assert Targets.parse("1,cat", class_names=names, num_classes=3).classes == (1, 0)
    with pytest.raises(ConfigError, match="unknown classes"):
        Targets.parse("7,cow", class_names=names, num_classes=3)
    with pytest.raises(ConfigError, match="positive integer"):
        Targets.parse("top:0")
    with pytest.raises(ConfigError, match="only 3 classes"):
        Targets.parse("top:5", num_classes=3)


def test_bfloat16_autocast_stays_close_to_float32(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    maps = {}
    for dtype in (torch.float32, torch.bfloat16):
        from camshaft.engine.backends import backend_factory

        backend = backend_factory("eager")(
            source_of(model, size=(64, 64)), taps=None, preprocess={}, device=torch.device("cpu"), dtype=dtype, workdir=tmp_path
        )
        maps[dtype], out = get_method("gradcam").run(backend, x, fixed([[1], [2]]), tap="layer4")
        assert out.logits.dtype == torch.float32
    scale = maps[torch.float32].abs().max()
    assert (maps[torch.bfloat16] - maps[torch.float32]).abs().max() < 0.1 * scale
