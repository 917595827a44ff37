"""Every method on the torchvision architectures the benchmarks use, against references and invariants.

Seeded random-init models with BatchNorm running statistics re-estimated on a seeded batch (as in
test_reference.py: otherwise the activations of MobileNet and EfficientNet vanish). Inputs are 64 x 96,
not square, so a swap of h and w shows. References: captum (Grad-CAM, saliency, guided backprop,
integrated gradients), torchcam (LayerCAM, XGrad-CAM), pytorch-grad-cam (Grad-CAM++, the paper's
closed form). The default run covers the small architectures; resnet50, vgg16_bn and convnext_tiny,
every exported backend and the CLI are ``slow``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torchvision
from conftest import fixed
from torch import nn

from camshaft.engine.backends import backend_factory
from camshaft.engine.methods import check_backend, get_method, method_names
from camshaft.engine.targets import Targets
from camshaft.errors import CapabilityError
from camshaft.models.inspect import describe
from camshaft.models.sources import ModelSource
from camshaft.preprocess import Preprocess

SIZE = (64, 96)  # (H, W): every architecture here reduces by 32, so taps are (C, 2, 3)
CELLS = (2, 3)
RTOL = 1e-4
ATOL_FRACTION = 1e-5  # atol = ATOL_FRACTION x the reference's max |value|

# architecture -> (default tap, CAM linear layer or None, channels at the tap)
ARCHS = {
    "resnet18": ("layer4", "fc", 512),
    "mobilenet_v3_large": ("features", None, 960),  # Linear-Hardswish-Dropout-Linear head
    "efficientnet_b0": ("features", "classifier.1", 1280),  # Dropout-Linear head: CAM applies
    "resnet50": ("layer4", "fc", 2048),
    "vgg16_bn": ("features", None, 512),  # a 7x7 adaptive pool, then a 3-layer MLP
    "convnext_tiny": ("features", None, 768),  # LayerNorm2d between the pool and the linear layer
}
# 50 and 16 layers of random weights: float32 rounding differences between kernels (layouts, batch sizes,
# runtimes) grow through the depth and flip ReLU gates near zero, so their comparisons allow more (the fraction of
# the reference's max |value| as atol; the others keep the tight defaults). Measured on torch 2.14 / oneDNN 3.12,
# 2 AMD cores: integrated gradients 0.8% (resnet50) and 1% (vgg16_bn) of the max against captum, resnet50
# logits 3e-5 channels-last vs contiguous, resnet50 Grad-CAM 3e-4 TorchScript / ONNX Runtime vs eager.
DEEP_ATOL = {"resnet50": {"integrated_gradients": 2e-2, "logits": 1e-4, "maps": 1e-3},
             "vgg16_bn": {"integrated_gradients": 2e-2, "logits": 1e-4, "maps": 1e-3}}


def atol_for(arch: str, what: str, default: float) -> float:
    return DEEP_ATOL.get(arch, {}).get(what, default)


# the default run: the two cheapest, one with an MLP head (and ReLU + Hardswish), one with a CAM head (SiLU)
DEFAULT = ("mobilenet_v3_large", "efficientnet_b0")
MLP_HEAD = ("mobilenet_v3_large",)


def arch_params(default=(), names=tuple(ARCHS), *, where=lambda arch: True):
    """Parameters over ``names`` that satisfy ``where``; those not in ``default`` marked slow."""
    return [a if a in default else pytest.param(a, marks=pytest.mark.slow) for a in names if where(a)]


def _calibrate_batchnorm(model: nn.Module, *, seed: int) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the one batch
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, *SIZE, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


_MODELS: dict[str, nn.Module] = {}


def model_of(arch: str) -> nn.Module:
    """The calibrated model, built once per session (the backends below convert their own copies)."""
    if arch not in _MODELS:
        torch.manual_seed(0)  # torchvision's initialisers use the global RNG
        _MODELS[arch] = _calibrate_batchnorm(torchvision.models.get_model(arch, weights=None), seed=1)
    return _MODELS[arch]


def open_backend(kind: str, model: nn.Module, workdir, *, taps=None, **options):
    source = ModelSource(kind="torch", spec="m", module=model, preprocess=Preprocess(input_size=SIZE))
    return backend_factory(kind)(
        source, taps=taps, preprocess={}, device=torch.device("cpu"), dtype=torch.float32, workdir=workdir, **options
    )


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """``eager(arch)``: an eager backend at the default tap, on a copy of the model (it goes channels-last)."""
    backends = {}

    def get(arch: str):
        if arch not in backends:
            backends[arch] = open_backend("eager", copy.deepcopy(model_of(arch)), tmp_path_factory.mktemp(arch))
        return backends[arch]

    return get


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(2))  # (B, 3, H, W)


TOP3 = Targets.parse("top:3").selector()
# different classes per image, a class repeated within an image, the first and the last class
EXPLICIT = fixed([[3, 7, 999], [500, 3, 3]])


def compare(got: torch.Tensor, want: torch.Tensor, *, rtol=RTOL, atol_fraction=ATOL_FRACTION, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, reference {tuple(want.shape)}"
    scale = want.abs().amax().item()
    assert scale > 1e-6, f"{what}: the reference is ~0 (max {scale:.3g}): the comparison would be vacuous"
    diff = (got - want).abs().amax().item()
    assert torch.allclose(got, want, rtol=rtol, atol=atol_fraction * scale), (
        f"{what}: max abs difference {diff:.3g} for maps of max {scale:.3g}"
    )


# --- references ------------------------------------------------------------------------------------


def per_target(fn, targets: torch.Tensor) -> torch.Tensor:
    """``fn(column of targets) -> (B, ...)`` stacked over the K columns: (B, K, ...)."""
    return torch.stack([fn(targets[:, k]).detach() for k in range(targets.shape[1])], dim=1)


def captum_gradcam(model, tap, x, targets):
    from captum.attr import LayerGradCam

    gc = LayerGradCam(model, model.get_submodule(tap))
    return per_target(lambda t: gc.attribute(x, target=t, relu_attributions=True)[:, 0], targets)


def torchcam_maps(cls_name: str, model, tap, x, targets):
    import torchcam.methods

    model = copy.deepcopy(model)
    maps = []
    with getattr(torchcam.methods, cls_name)(model, target_layer=tap) as extractor:
        for k in range(targets.shape[1]):
            (cam,) = extractor(class_idx=targets[:, k].tolist(), scores=model(x), normalized=False)
            maps.append(cam.detach())
    return torch.stack(maps, dim=1)


def gradcam_pp_reference(model, tap, x, targets):
    """pytorch-grad-cam's Grad-CAM++ (its hooks, its weights), unnormalised at the tap's resolution.

    Its denominator carries an eps of 1e-6, large next to g^2 for small gradients. The paper's
    weights are invariant under (g, A) -> (c g, A / c), which shrinks eps's share by c^2 and leaves
    the map sum_k w_k A_k unchanged: it is given (c g, A / c).
    """
    GradCAMPlusPlus = pytest.importorskip("pytorch_grad_cam", reason="pip install -e '.[bench]'").GradCAMPlusPlus

    model = copy.deepcopy(model)
    layer = model.get_submodule(tap)
    c = 1e4
    maps = []
    cam = GradCAMPlusPlus(model=model, target_layers=[layer])
    try:
        for k in range(targets.shape[1]):
            logits = cam.activations_and_grads(x)
            model.zero_grad()
            logits.gather(1, targets[:, k : k + 1]).sum().backward()
            a = cam.activations_and_grads.activations[0].numpy()
            g = cam.activations_and_grads.gradients[0].numpy()
            img = cam.get_cam_image(x, layer, None, a / c, g * c)  # (B, h, w)
            maps.append(torch.from_numpy(np.maximum(img, 0)))
    finally:
        cam.activations_and_grads.release()
    return torch.stack(maps, dim=1)


def channels_last_copy(model: nn.Module) -> nn.Module:
    """The model as the eager backend runs it: weights channels-last.

    A ReLU network's input gradient jumps at its kinks, and the two layouts round differently: on
    resnet18 at 1/12 of the way from a zero baseline, 3% of the pixels' gradients differ by up to
    0.6% of the max between the layouts of plain torch. References for input gradients run on the
    backend's layout (and inputs, made channels-last by ``_input``), so such a jump cannot show.
    """
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _input(x: torch.Tensor) -> torch.Tensor:
    return x.clone().contiguous(memory_format=torch.channels_last)


def captum_saliency(model, x, targets):
    from captum.attr import Saliency

    sal = Saliency(model)
    return per_target(lambda t: sal.attribute(_input(x), target=t, abs=True).amax(dim=1), targets)


def captum_guided(model, x, targets):
    from captum.attr import GuidedBackprop

    gbp = GuidedBackprop(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "setting backward hooks on ReLU activations"
        return per_target(lambda t: gbp.attribute(_input(x), target=t).abs().amax(dim=1), targets)


def captum_integrated(model, x, targets, *, steps):
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    return per_target(
        lambda t: ig.attribute(_input(x), baselines=0.0, target=t, n_steps=steps, method="riemann_middle").sum(dim=1),
        targets,
    )


# --- 1. what a model offers: default tap, CAM head ---------------------------------------------------


@pytest.mark.parametrize("arch", arch_params(DEFAULT))
def test_default_tap_and_cam_head(arch):
    tap, linear, _ = ARCHS[arch]
    report = describe(model_of(arch), input_size=SIZE)
    assert report.default_tap == tap
    assert report.num_classes == 1000
    assert report.layers[-1].shape == (1, 1000)
    if linear is None:
        assert report.cam_head is None
    else:
        assert (report.cam_head.tap, report.cam_head.linear) == (tap, linear)
        assert torch.equal(report.cam_head.weight, model_of(arch).get_submodule(linear).weight)


@pytest.mark.parametrize("arch", arch_params(DEFAULT))
def test_cam_is_served_exactly_where_there_is_a_gap_linear_head(eager, x, arch):
    tap, linear, _ = ARCHS[arch]
    backend = eager(arch)
    assert backend.info.taps == (tap,)
    assert backend.info.tap_shapes[tap] == (ARCHS[arch][2], *CELLS)
    cam = get_method("cam")
    if linear is None:
        with pytest.raises(CapabilityError, match="CAM needs a global-average-pool"):
            check_backend(cam, backend, tap=tap)
        return
    check_backend(cam, backend, tap=tap)
    maps, out = cam.run(backend, x, EXPLICIT, tap=tap)
    # by hand: logits = W mean_hw(A) + b, so M_c = sum_k W[c, k] A_k; its mean over cells is logit - bias
    head = model_of(arch).get_submodule(linear)
    a = out.taps[tap]
    want = torch.einsum("bkc,bchw->bkhw", head.weight.detach()[out.targets], a)
    compare(maps, want, what="cam")
    compare(maps.mean(dim=(-2, -1)) + head.bias.detach()[out.targets], out.logits.gather(1, out.targets),
            rtol=1e-4, atol_fraction=1e-5, what="cam mean + bias vs logits")
    assert (maps < 0).any() and (maps > 0).any()  # signed: a stray ReLU would show


# --- 2. the Grad-CAM family against references --------------------------------------------------------

REFERENCES = {
    "gradcam": lambda m, tap, x, t: captum_gradcam(m, tap, x, t),
    "gradcam++": gradcam_pp_reference,
    "layercam": lambda m, tap, x, t: torchcam_maps("LayerCAM", m, tap, x, t),
    "xgradcam": lambda m, tap, x, t: torchcam_maps("XGradCAM", m, tap, x, t),
}


GRADIENT_CASES = [
    # the default run's case needs only the dev extra's references (pytorch-grad-cam comes with the bench extra)
    pytest.param(arch, method, marks=() if (arch, method) == ("mobilenet_v3_large", "layercam") else pytest.mark.slow)
    for arch in ARCHS
    for method in REFERENCES
]


@pytest.mark.parametrize(("arch", "method"), GRADIENT_CASES)
def test_gradient_cams_match_references(eager, x, arch, method):
    tap = ARCHS[arch][0]
    maps, out = get_method(method).run(eager(arch), x, TOP3, tap=tap)
    assert maps.shape == (2, 3, *CELLS)
    with torch.no_grad():
        assert torch.equal(out.targets, model_of(arch)(x).topk(3, dim=-1).indices)
    want = REFERENCES[method](model_of(arch), tap, x, out.targets)
    assert (want > 0).float().mean() >= 0.3, "most of the reference map is zero: a weak comparison"
    compare(maps, want, rtol=1e-3 if method == "gradcam++" else RTOL, what=f"{arch} {method}")


@pytest.mark.parametrize("arch", arch_params(DEFAULT, where=lambda a: ARCHS[a][1] is not None))
def test_gradcam_is_relu_cam_over_cells_under_a_gap_linear_head(eager, x, arch):
    """dy_c/dA_k(i, j) = W[c, k] / (h w) everywhere, so Grad-CAM = ReLU(CAM) / (h w), per cell."""
    tap = ARCHS[arch][0]
    grad, out = get_method("gradcam").run(eager(arch), x, EXPLICIT, tap=tap)
    cam, _ = get_method("cam").run(eager(arch), x, EXPLICIT, tap=tap)
    assert (cam < 0).any() and (cam > 0).any()  # the ReLU matters
    compare(grad, torch.relu(cam) / (CELLS[0] * CELLS[1]), what=arch)
    # and every gradient cell of a target is the same: W[c] / (h w)
    g = out.grads[tap]  # (B, K, C, h, w)
    compare(g, g[..., :1, :1].expand_as(g), what="gradient constant over cells")


# --- 3. the input-gradient family against captum --------------------------------------------------------


@pytest.mark.parametrize("arch", arch_params(MLP_HEAD))
def test_saliency_and_guided_backprop_match_captum(eager, x, arch):
    model = channels_last_copy(model_of(arch))
    sal, out = get_method("saliency").run(eager(arch), x, EXPLICIT, tap=None)
    assert sal.shape == (2, 3, *SIZE)
    compare(sal, captum_saliency(model, x, out.targets), what=f"{arch} saliency")

    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    with pytest.warns(UserWarning, match="no nn.ReLU modules") if not relus else contextlib.nullcontext():
        guided, out = get_method("guided_backprop").run(eager(arch), x, EXPLICIT, tap=None)
    compare(guided, captum_guided(model, x, out.targets), what=f"{arch} guided backprop")
    # guided differs from plain saliency exactly when the model has ReLU modules to rewire
    assert torch.equal(guided, sal) == (relus == 0)


@pytest.mark.parametrize("arch", arch_params())
def test_integrated_gradients_match_captum(eager, x, arch):
    steps = 6
    maps, out = get_method("integrated_gradients").run(
        eager(arch), x, EXPLICIT, tap=None, options={"steps": steps, "samples_per_forward": 5}
    )
    assert maps.shape == (2, 3, *SIZE)
    want = captum_integrated(channels_last_copy(model_of(arch)), x, out.targets, steps=steps)
    compare(maps, want, rtol=1e-3, atol_fraction=atol_for(arch, "integrated_gradients", 1e-4), what=arch)


class SiLUNet(nn.Module):
    """conv -> SiLU -> GAP -> linear: nothing for guided backpropagation to rewire."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean(dim=(-2, -1)))


def test_guided_backprop_says_when_there_is_no_relu_to_guide(tmp_path):
    torch.manual_seed(0)
    backend = open_backend("eager", SiLUNet().eval(), tmp_path)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    with pytest.warns(UserWarning, match=r"'m' has no nn.ReLU modules to guide .* the plain input gradient"):
        guided, _ = get_method("guided_backprop").run(backend, x, fixed([[0, 2], [1, 1]]), tap=None)
    saliency, _ = get_method("saliency").run(backend, x, fixed([[0, 2], [1, 1]]), tap=None)
    assert guided.abs().amax() > 0
    assert torch.equal(guided, saliency)


def test_onnxruntime_refuses_input_gradients_with_a_capability_error(tmp_path):
    """Methods run without ``check_backend`` (the API's ``Method.run``) get the specific error too."""
    from conftest import TinyCam, source_of

    source = source_of(TinyCam().eval())
    backend = backend_factory("onnxruntime")(
        source, taps=None, preprocess={}, device=torch.device("cpu"), dtype=torch.float32, workdir=tmp_path
    )
    for name in ("saliency", "smoothgrad", "integrated_gradients"):
        match = "onnxruntime backend cannot give input_gradients .* eager, inductor, torchscript"
        with pytest.raises(CapabilityError, match=match):
            get_method(name).run(backend, torch.randn(1, 3, 8, 8), fixed([[0]]), tap=None)


# --- 4. invariants: K targets at once, batch, layout -------------------------------------------------------

BATCHED = ["gradcam", "saliency", "cam"]  # the batched backward to the tap and to the input, and CAM's contraction


@pytest.mark.parametrize("arch", arch_params(MLP_HEAD))
def test_k_targets_and_batch_do_not_change_an_images_maps(eager, x, arch):
    """Top-3 at once == each target alone, image by image (the batched backward, the head's ops)."""
    tap, linear, _ = ARCHS[arch]
    backend = eager(arch)
    for method in BATCHED:
        if method == "cam" and linear is None:
            continue
        m = get_method(method)
        maps, out = m.run(backend, x, TOP3, tap=tap)
        for b, k in ((0, 2), (1, 0)):  # the last target of the first image, the first of the second
            one, _ = m.run(backend, x[b : b + 1], fixed([[out.targets[b, k].item()]]), tap=tap)
            compare(one[0, 0], maps[b, k], rtol=1e-4, atol_fraction=1e-5, what=f"{method} image {b} target {k}")


@pytest.mark.parametrize("arch", arch_params(MLP_HEAD))
def test_channels_last_and_contiguous_layouts_agree(x, tmp_path, arch):
    """The eager default (channels-last batches and weights) against the plain layout."""
    tap = ARCHS[arch][0]
    maps = {}
    for layout in ("channels_last", "contiguous"):
        backend = open_backend("eager", copy.deepcopy(model_of(arch)), tmp_path / layout, memory_format=layout)
        assert backend.memory_format == getattr(torch, layout + "_format" if layout == "contiguous" else layout)
        out = backend.forward(x)
        assert out.taps[tap].is_contiguous()  # methods never see the layout
        maps[layout] = (out, get_method("gradcam").run(backend, x, EXPLICIT, tap=tap)[0])
    (cl, cl_maps), (plain, plain_maps) = maps["channels_last"], maps["contiguous"]
    compare(cl.logits, plain.logits, atol_fraction=atol_for(arch, "logits", ATOL_FRACTION), what="logits")
    compare(cl.taps[tap], plain.taps[tap], atol_fraction=atol_for(arch, "logits", ATOL_FRACTION), what="tap")
    compare(cl_maps, plain_maps, rtol=1e-3, atol_fraction=atol_for(arch, "maps", 1e-4), what="gradcam")


# --- 5. every method runs on every architecture (maps finite, placed, not all zero) -----------------------

FAST_OPTIONS = {
    "smoothgrad": {"samples": 2},
    "integrated_gradients": {"steps": 2},
    "occlusion": {"window": 32, "stride": 32},
    "scorecam": {"masks_per_forward": 512},
}


def _every_method_runs(backend, arch, x, methods):
    tap, linear, _ = ARCHS[arch]
    for name in methods:
        method = get_method(name)
        if name == "cam" and linear is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a method that warns on a standard architecture is a finding
            warnings.filterwarnings("ignore", "guided backpropagation: .* no nn.ReLU modules")  # EfficientNet, ConvNeXt
            maps, out = method.explain(backend, x, TOP3, tap=tap, options=FAST_OPTIONS.get(name))
        assert maps.shape[:2] == (2, 3), name
        if method.uses_tap:
            assert maps.shape[-2:] == CELLS, name
        elif name == "occlusion":
            assert maps.shape[-2:] == (2, 3), name  # 32-pixel tiles of a 64 x 96 input
        else:
            assert maps.shape[-2:] == SIZE, name
        assert torch.isfinite(maps).all(), name
        assert (maps.flatten(2).abs().amax(-1) > 0).all(), f"{name}: a map is all zero"


# the default run checks those no other default test runs; the slow one all but Score-CAM (below)
UNCOVERED = ["smoothgrad", "integrated_gradients", "occlusion", "layercam", "xgradcam"]


@pytest.mark.parametrize("arch", arch_params(MLP_HEAD))
def test_every_method_runs(eager, x, arch, request):
    slow = request.node.get_closest_marker("slow") is not None
    methods = [m for m in method_names() if m != "scorecam" and (slow or m in UNCOVERED)]
    _every_method_runs(eager(arch), arch, x, methods)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_scorecam_runs_and_does_not_depend_on_chunking(eager, x, arch):
    tap = ARCHS[arch][0]
    m = get_method("scorecam")
    a, out = m.run(eager(arch), x, TOP3, tap=tap, options={"masks_per_forward": 512})
    b, _ = m.run(eager(arch), x, TOP3, tap=tap, options={"masks_per_forward": 333})
    assert a.shape == (2, 3, *CELLS) and (a > 0).any()
    compare(b, a, what="chunking")


# --- 6. every exported backend agrees with eager ----------------------------------------------------------

PARITY_METHODS = ["cam", "gradcam", "gradcam++", "layercam", "xgradcam", "saliency", "smoothgrad", "occlusion"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchscript", "pt2", "onnxruntime"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_exported_backends_agree_with_eager(eager, x, tmp_path, arch, kind):
    tap, linear, _ = ARCHS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exporting or loading a standard architecture warns of nothing
        exported = open_backend(kind, copy.deepcopy(model_of(arch)), tmp_path)
    assert exported.info.taps == (tap,) and exported.info.cam_tap == (tap if linear else None)
    assert "tap_gradients" in exported.capabilities  # the head travels (VGG's too: the run's own file)
    for name in PARITY_METHODS:
        method = get_method(name)
        if (name == "cam" and linear is None) or not method.needs <= exported.capabilities:
            continue
        opts = FAST_OPTIONS.get(name)
        got, out = method.run(exported, x, EXPLICIT, tap=tap, options=opts)
        want, ref = method.run(eager(arch), x, EXPLICIT, tap=tap, options=opts)
        compare(out.logits, ref.logits, rtol=1e-4, atol_fraction=1e-4, what=f"{kind} logits")
        compare(got, want, rtol=1e-3, atol_fraction=atol_for(arch, "maps", 1e-4), what=f"{kind} {name}")


# --- 7. the CLI on each architecture ----------------------------------------------------------------------

CLI_CASES = {
    "resnet18": ("eager", "cam,gradcam,guided_backprop"),
    "mobilenet_v3_large": ("pt2", "gradcam++,xgradcam"),
    "efficientnet_b0": ("torchscript", "cam,layercam,saliency"),
    "resnet50": ("torchscript", "gradcam,cam"),
    "vgg16_bn": ("onnxruntime", "gradcam"),
    "convnext_tiny": ("onnxruntime", "gradcam,occlusion"),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CLI_CASES))
def test_cli_explains_each_architecture_quietly(tmp_path, arch):
    from PIL import Image

    backend, methods = CLI_CASES[arch]
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(80, 120), (120, 80)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    env = {**os.environ, "CAMSHAFT_NO_REEXEC": "1", "PYTHONWARNINGS": "default"}
    argv = [sys.executable, "-m", "camshaft", "explain", arch, str(images), "--input-size", "64,96", "--method",
            methods, "--backend", backend, "--out", str(out), "--targets", "top:2", "--no-progress"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"camshaft: warning: {arch}: no weights given (--weights, or weights= in Python), "
                     "using random weights: results are meaningless"], done.stderr
    import zarr

    for method in methods.split(","):  # a run of one method writes into the folder itself
        store = zarr.open(str((out / method if "," in methods else out) / "maps.zarr"), mode="r")
        maps = np.asarray(store["maps"])  # (images, targets, h, w)
        assert maps.shape[:2] == (2, 2) and np.isfinite(maps).all() and (maps != 0).any(), method
