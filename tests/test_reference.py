"""CAM and Grad-CAM agree with captum and torchcam on the same weights and inputs, on every backend.

Models are seeded random-init torchvision architectures. Their BatchNorm running statistics are
re-estimated on a seeded random batch: with the default (mean 0, var 1) statistics the activations
of mobilenet_v3_small and efficientnet_b0 shrink to ~1e-10 and every comparison would be vacuous.
Inputs are not square (96 x 128) so that a swap of the map's h and w axes cannot go unnoticed.
Every comparison is ``allclose`` with rtol 1e-4 and atol 1e-5 x the reference map's max.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from captum.attr import LayerGradCam
from torch import nn
from torchcam.methods import CAM as TorchcamCAM
from torchcam.methods import GradCAM as TorchcamGradCAM

from camshaft.engine.backends import backend_factory
from camshaft.engine.methods import get_method
from camshaft.engine.targets import Targets
from camshaft.errors import CapabilityError
from camshaft.models.sources import ModelSource
from camshaft.preprocess import Preprocess

SIZE = (96, 128)  # (H, W)
RTOL = 1e-4
ATOL_FRACTION = 1e-5  # atol = ATOL_FRACTION x the reference map's max |value|

# architecture -> (tap, module path of the CAM linear head or None)
ARCHS = {
    "resnet18": ("layer4", "fc"),
    "mobilenet_v3_small": ("features", None),  # MLP head: Grad-CAM only
    "efficientnet_b0": ("features", "classifier.1"),
}

SELECTORS = {
    "top3": Targets.parse("top:3").selector(),
    "top1": Targets.parse("top:1").selector(),  # K = 1 takes the unbatched backward
    # different classes per image, a class repeated within an image, the first and last class
    "explicit": lambda logits: torch.tensor([[3, 7, 999], [500, 3, 3]], device=logits.device),
}


def _calibrate_batchnorm(model: nn.Module, *, seed: int) -> nn.Module:
    """Running statistics estimated (cumulative average) on one seeded random batch; eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)  # torchvision's initialisers (and train-mode dropout) use the global RNG
    return _calibrate_batchnorm(torchvision.models.get_model(name, weights=None), seed=1)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: _build(name) for name in ARCHS}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))  # (B, 3, H, W)


def _backend(kind: str, model: nn.Module, taps: list[str], workdir=None):
    source = ModelSource(kind="torch", spec="x", module=model, preprocess=Preprocess(input_size=SIZE))
    return backend_factory(kind)(
        source, taps=taps, preprocess={}, device=torch.device("cpu"), dtype=torch.float32, workdir=workdir
    )


@pytest.fixture(scope="module")
def eager(models, tmp_path_factory):
    """``eager(arch)``: one eager backend per architecture at its tap, shared by the tests."""
    backends = {}

    def get(arch: str):
        if arch not in backends:
            backends[arch] = _backend("eager", models[arch], [ARCHS[arch][0]], tmp_path_factory.mktemp(arch))
        return backends[arch]

    return get


def _assert_clean(model: nn.Module) -> None:
    """No hooks left behind and every parameter still requires grad (as torchvision built it)."""
    for name, m in model.named_modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), f"hook left on {name!r}"
    assert all(p.requires_grad for p in model.parameters())


def _assert_nontrivial(maps: torch.Tensor, *, positive_fraction: float = 0.5) -> None:
    """Maps (B, K, h, w) of a sensible size, most of them positive: the comparison is not vacuous."""
    assert maps.abs().amax() > 1e-3, f"maps are ~0 (max {maps.abs().amax().item():.3g})"
    assert (maps > 0).float().mean() >= positive_fraction


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """Assert allclose (rtol, atol scaled to the map's max); return (max abs, max abs / max |want|)."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    scale = want.abs().amax().item()
    diff = (got - want).abs().amax().item()
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL_FRACTION * scale), (
        f"max abs difference {diff:.3g} for maps of max {scale:.3g}"
    )
    return diff, diff / scale


def captum_gradcam(model: nn.Module, tap: str, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """captum's LayerGradCam, one call per target column: (B, K, h, w)."""
    layer = model.get_submodule(tap)
    gc = LayerGradCam(model, layer)
    maps = [gc.attribute(x, target=targets[:, k], relu_attributions=True) for k in range(targets.shape[1])]
    return torch.cat(maps, dim=1).detach()  # K x (B, 1, h, w) -> (B, K, h, w)


def torchcam_maps(method: str, model: nn.Module, tap: str, fc: str | None, x, targets) -> torch.Tensor:
    """torchcam's unnormalised GradCAM or CAM on a copy of ``model``: (B, K, h, w)."""
    model = copy.deepcopy(model)
    maps = []
    for k in range(targets.shape[1]):
        class_idx = targets[:, k].tolist()
        if method == "gradcam":
            with TorchcamGradCAM(model, target_layer=tap) as extractor:
                scores = model(x)
                (cam,) = extractor(class_idx=class_idx, scores=scores, normalized=False)
        else:
            with TorchcamCAM(model, target_layer=tap, fc_layer=fc) as extractor, torch.no_grad():
                model(x)
                (cam,) = extractor(class_idx=class_idx, normalized=False)
        maps.append(cam.detach())  # (B, h, w)
    _assert_clean(model)  # torchcam's context manager removed its hooks
    return torch.stack(maps, dim=1)


def _cells(model: nn.Module, tap: str, x: torch.Tensor) -> tuple[int, int]:
    with torch.no_grad():
        return tuple(torchvision.models.feature_extraction.create_feature_extractor(model, [tap])(x)[tap].shape[-2:])


# --- 1. Grad-CAM vs captum -------------------------------------------------------------------------


# every architecture with top:3; the K=1 and explicit-target paths do not depend on the architecture
CAPTUM_CASES = [(arch, "top3") for arch in ARCHS] + [("resnet18", "top1"), ("resnet18", "explicit")]


@pytest.mark.parametrize(("arch", "selector"), CAPTUM_CASES)
def test_gradcam_matches_captum(models, eager, x, arch, selector):
    model, (tap, _) = models[arch], ARCHS[arch]
    maps, out = get_method("gradcam").run(eager(arch), x, SELECTORS[selector], tap=tap)
    _assert_clean(model)

    k = 1 if selector == "top1" else 3
    assert maps.shape == (2, k, *_cells(model, tap, x))  # native resolution, not upsampled
    if selector == "explicit":
        assert out.targets.tolist() == [[3, 7, 999], [500, 3, 3]]
    else:
        with torch.no_grad():
            assert torch.equal(out.targets, model(x).topk(k, dim=-1).indices)
    want = captum_gradcam(model, tap, x, out.targets)
    _assert_nontrivial(want)
    compare(maps, want)


def test_gradcam_matches_captum_at_every_tap_of_a_multi_tap_backend(models, x):
    """Given out of execution order, the later tap's gradients flow through the head above the first."""
    model = models["resnet18"]
    backend = _backend("eager", model, ["layer4", "layer3"])
    assert backend.info.taps == ("layer3", "layer4")
    for tap, cells in (("layer3", (6, 8)), ("layer4", (3, 4))):
        maps, out = get_method("gradcam").run(backend, x, SELECTORS["explicit"], tap=tap)
        assert maps.shape == (2, 3, *cells)
        want = captum_gradcam(model, tap, x, out.targets)
        _assert_nontrivial(want)
        compare(maps, want)
    _assert_clean(model)


# --- 2. Grad-CAM and CAM vs torchcam ---------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradcam_matches_torchcam(models, eager, x, arch):
    model, (tap, _) = models[arch], ARCHS[arch]
    maps, out = get_method("gradcam").run(eager(arch), x, SELECTORS["top3"], tap=tap)
    want = torchcam_maps("gradcam", model, tap, None, x, out.targets)
    _assert_nontrivial(want)
    compare(maps, want)


@pytest.mark.parametrize("arch", [a for a, (_, fc) in ARCHS.items() if fc])
def test_cam_matches_torchcam(models, eager, x, arch):
    model, (tap, fc) = models[arch], ARCHS[arch]
    backend = eager(arch)
    assert backend.info.cam_tap == tap
    assert torch.equal(backend.info.cam_weight, model.get_submodule(fc).weight)
    maps, out = get_method("cam").run(backend, x, SELECTORS["explicit"], tap=tap)
    want = torchcam_maps("cam", model, tap, fc, x, out.targets)  # torchcam's CAM applies no ReLU either
    assert (want < 0).any() and (want > 0).any()  # signed maps: a stray ReLU would show
    compare(maps, want)


class Untraceable(nn.Module):
    """Wraps a model behind data-dependent control flow: FX cannot trace it, camshaft uses hooks."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > -1e9:
            return self.net(x)
        return -self.net(x)


@pytest.mark.parametrize(
    "taps",
    [
        pytest.param(["net.layer3", "net.layer4"], id="execution-order"),
        pytest.param(["net.layer4", "net.layer3"], id="reverse-order"),
    ],
)
def test_cam_and_gradcam_match_references_on_an_untraceable_model(models, x, taps):
    model = Untraceable(models["resnet18"]).eval()
    backend = _backend("eager", model, taps)
    for tap in taps:
        maps, out = get_method("gradcam").run(backend, x, SELECTORS["explicit"], tap=tap)
        compare(maps, captum_gradcam(model, tap, x, out.targets))
    maps, out = get_method("cam").run(backend, x, SELECTORS["explicit"], tap="net.layer4")
    compare(maps, torchcam_maps("cam", model, "net.layer4", "net.fc", x, out.targets))
    assert backend.info.taps == ("net.layer3", "net.layer4")  # execution order, as ModelInfo documents
    _assert_clean(model)


def test_cam_without_gap_linear_head_is_refused(eager, x):
    backend = eager("mobilenet_v3_small")
    with pytest.raises(CapabilityError, match="CAM needs a global-average-pool"):
        get_method("cam").run(backend, x, SELECTORS["top3"], tap="features")


# --- 3. the same agreement on the exported backends ------------------------------------------------


@pytest.mark.parametrize("kind", ["torchscript", "onnxruntime"])
def test_exported_backends_match_eager_and_references(models, eager, x, tmp_path, kind):
    model, (tap, fc) = models["resnet18"], ARCHS["resnet18"]
    select = SELECTORS["explicit"]
    exported = _backend(kind, model, [tap], tmp_path)
    assert {"forward", "tap_gradients"} <= exported.capabilities

    for method in ("gradcam", "cam"):
        got, out = get_method(method).run(exported, x, select, tap=tap)
        ref, _ = get_method(method).run(eager("resnet18"), x, select, tap=tap)
        assert out.targets.tolist() == [[3, 7, 999], [500, 3, 3]]
        compare(got, ref)
        if method == "gradcam":
            compare(got, captum_gradcam(model, tap, x, out.targets))
        else:
            compare(got, torchcam_maps("cam", model, tap, fc, x, out.targets))
    _assert_clean(model)


# --- 4. an analytic identity: Grad-CAM = ReLU(CAM) / (h w) under a GAP + linear head ---------------


def test_gradcam_is_relu_cam_over_cells_for_gap_linear_head(models, eager, x):
    model = models["resnet18"]
    backend = eager("resnet18")
    targets = Targets.parse("3,17,281,500,999", num_classes=1000)
    grad, out = get_method("gradcam").run(backend, x, targets.selector(), tap="layer4")
    cam, _ = get_method("cam").run(backend, x, targets.selector(), tap="layer4")
    assert grad.shape == cam.shape == (2, 5, 3, 4)
    assert out.targets.tolist() == [[3, 17, 281, 500, 999]] * 2

    # CAM by hand from the tap and the fc weights (logits = fc(mean_hw(A)))
    a = out.taps["layer4"]  # (B, C, h, w)
    w = model.fc.weight.detach()[out.targets]  # (B, K, C)
    compare(cam, (w[..., None, None] * a[:, None]).sum(dim=2))
    # dy_c/dA_k(i, j) = W[c, k] / (h w) everywhere, so alpha_k^c = W[c, k] / (h w)
    assert (cam < 0).any() and (cam > 0).any()  # the ReLU matters
    assert grad.amax() > 1e-3
    compare(grad, torch.relu(cam) / (3 * 4))
