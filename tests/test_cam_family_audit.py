"""Audit of the CAM family: closed forms where the gradient is not uniform, Score-CAM by hand,
K targets per image (repeated, reordered, labels, a shared batch), degenerate taps, options.

test_gradient_family.py has the closed forms under a GAP + linear head, where every relative
collapses to Grad-CAM's weight W / (h w); here a head that weighs each cell differently makes
the gradient vary over the map, so each method's own formula shows.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from conftest import fixed, open_backend, source_of
from torch import nn

from camshaft.engine.methods import get_method
from camshaft.engine.shared import SharedBatch
from camshaft.engine.targets import Targets
from camshaft.errors import ConfigError

CAMS = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "scorecam"]
GRADIENT_CAMS = ["gradcam", "gradcam++", "xgradcam", "layercam"]
W_CONV = torch.tensor([[1.0, 0.5, -1.0], [-0.5, 1.0, 0.25]])  # (C=2, 3)
W_FC = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-2.0, 0.25]])  # (N=3, C=2)
V = torch.tensor([[1.0, -0.5, 2.0, 0.0], [0.25, 1.5, -1.0, 0.5], [0.0, 1.0, 0.75, -2.0], [3.0, -0.25, 0.5, 1.0]])



class SpatialHead(nn.Module):
    """features = 1x1 conv (+ ReLU), then logits_c = sum_k W[c, k] sum_xy V[x, y] A_k[x, y] + b_c.

    So dy_c / dA_k[x, y] = W[c, k] V[x, y]: a gradient that varies over the map, by hand.
    """

    def __init__(self, relu: bool = True):
        super().__init__()
        conv = nn.Conv2d(3, 2, 1, bias=False)
        self.features = nn.Sequential(conv, nn.ReLU()) if relu else nn.Sequential(conv)
        self.fc = nn.Linear(2, 3)
        self.register_buffer("v", V.clone())
        with torch.no_grad():
            conv.weight.copy_(W_CONV.view(2, 3, 1, 1))
            self.fc.weight.copy_(W_FC)
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        return self.fc((self.features(x) * self.v).sum(dim=(-2, -1)))


def _spatial(tmp_path, relu=True):
    return open_backend("eager", source_of(SpatialHead(relu), size=(4, 4)), tmp_path, taps=["features"])


def _activations(x, relu):
    a = torch.einsum("kc,bchw->bkhw", W_CONV, x)
    return torch.relu(a) if relu else a


@pytest.mark.parametrize("relu", [True, False], ids=["after-relu", "before-relu"])
def test_gradient_cams_closed_form_with_a_spatially_varying_gradient(relu, tmp_path):
    backend = _spatial(tmp_path, relu)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([[0, 2, 1], [1, 1, 0]])  # different orders, a repeated target
    a = _activations(x, relu)  # (B, C, h, w)
    g = W_FC[t][..., None, None] * V  # (B, K, C, h, w): dy/dA by hand
    s = a.sum(dim=(-2, -1))[:, None, :, None, None]  # (B, 1, C, 1, 1)

    def combine(w):  # (B, K, C) -> ReLU(sum_k w_k A_k)
        return torch.relu(torch.einsum("bkc,bchw->bkhw", w, a))

    alpha = torch.where(g != 0, g**2 / (2 * g**2 + s * g**3), 0.0)  # 0 where V is 0: no gradient, no weight
    expected = {
        "gradcam": combine(W_FC[t] * V.mean()),
        "xgradcam": combine(W_FC[t] * (a * V).sum(dim=(-2, -1))[:, None] / s[..., 0, 0]),
        "layercam": torch.relu((torch.relu(g) * a[:, None]).sum(dim=2)),
        "gradcam++": combine((alpha * torch.relu(g)).sum(dim=(-2, -1))),
    }
    for name, want in expected.items():
        got, out = get_method(name).run(backend, x, fixed(t), tap="features")
        torch.testing.assert_close(out.grads["features"], g, rtol=1e-5, atol=1e-6, msg=f"{name}: gradients")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
        assert got.amax() > 0, name
    # the formulas differ here (under a GAP head they all agree): the comparison is not vacuous
    assert not torch.allclose(expected["gradcam"], expected["xgradcam"], rtol=1e-2)
    assert not torch.allclose(expected["gradcam"] / expected["gradcam"].amax(),
                              expected["gradcam++"] / expected["gradcam++"].amax(), rtol=1e-2)


# --- Score-CAM by hand ---------------------------------------------------------------------------------


class Pointwise(nn.Module):
    """A 1x1 conv (channel 2 constant: weights 0, bias 1) at full resolution, then GAP + linear.

    Channels 0 and 1 are linear in the input, so A_k(x * m) = m * A_k(x) and a masked forward has a
    closed form; channel 2 is 1 everywhere, for every input.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 3, 1))
        self.fc = nn.Linear(3, 3)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.cat([W_CONV, torch.zeros(1, 3)]).view(3, 3, 1, 1))
            self.features[0].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [0.5, 2.0, -1.0], [-2.0, 0.25, 2.0]]))
            self.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(-2, -1)))


def _scorecam_by_hand(model: Pointwise, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The authors' released loop, with the masked forward in closed form (a constant channel is skipped)."""
    a = _activations(x, relu=False)  # channels 0, 1: (B, 2, h, w); the tap is at input resolution
    w, bias = model.fc.weight.detach(), model.fc.bias.detach()
    maps = torch.zeros(x.shape[0], targets.shape[1], *x.shape[-2:])
    for b in range(x.shape[0]):
        for k in range(2):
            m = (a[b, k] - a[b, k].min()) / (a[b, k].max() - a[b, k].min())
            logits = w[:, :2] @ (m * a[b]).mean(dim=(-2, -1)) + w[:, 2] + bias  # channel 2 is 1 everywhere
            p = torch.softmax(logits, dim=-1)
            for j, c in enumerate(targets[b].tolist()):
                maps[b, j] += p[c] * a[b, k]
        # channel 2 is constant: no mask, weight 0 (its min-max scaling would divide by zero)
    return torch.relu(maps)


@pytest.mark.parametrize("per", [1, 4, 64])
def test_scorecam_closed_form_and_constant_channels(per, tmp_path):
    model = Pointwise()
    backend = open_backend("eager", source_of(model), tmp_path, taps=["features"])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([[2, 0], [1, 1]])
    maps, out = get_method("scorecam").run(backend, x, fixed(t), tap="features", options={"masks_per_forward": per})
    assert torch.equal(out.targets, t)
    torch.testing.assert_close(maps, _scorecam_by_hand(model, x, t), rtol=1e-4, atol=1e-6)
    assert maps.amax() > 0


class _Spy:
    """A backend view that records the batch size of every forward."""

    def __init__(self, backend):
        self._backend, self.sizes = backend, []

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self._backend.forward(x)


def test_scorecam_never_runs_or_builds_more_masks_than_asked(tmp_path, monkeypatch):
    """``masks_per_forward`` bounds memory: at most that many masked images per forward, even when the
    batch is larger, and masks at input resolution built per chunk, not for every image x channel at once."""
    import camshaft.engine.methods.scorecam as scorecam

    built = []
    original = scorecam.channel_masks

    def counting(a, size):
        built.append(a.shape[0] * a.shape[1])
        return original(a, size)

    monkeypatch.setattr(scorecam, "channel_masks", counting)
    backend = open_backend("eager", source_of(Pointwise()), tmp_path, taps=["features"])
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    spy = _Spy(backend)
    small, _ = get_method("scorecam").run(spy, x, fixed([[0]] * 5), tap="features", options={"masks_per_forward": 2})
    assert spy.sizes[0] == 5 and max(spy.sizes[1:]) <= 2
    assert sum(spy.sizes[1:]) == 5 * 2, "a masked forward per image and varying channel (channel 2 is constant)"
    assert max(built) <= 2
    whole, _ = get_method("scorecam").run(backend, x, fixed([[0]] * 5), tap="features",
                                          options={"masks_per_forward": 99})
    torch.testing.assert_close(small, whole, rtol=1e-5, atol=1e-7)


def test_scorecam_pads_its_last_chunk_when_the_forward_replays_cuda_graphs(tmp_path):
    """Under --cuda-graphs one graph is recorded per input shape: a last chunk whose size follows the batch's live
    channels recorded a graph per batch. It is padded to ``masks_per_forward``; the scores stay those unpadded."""
    backend = open_backend("eager", source_of(Pointwise()), tmp_path, taps=["features"])
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    plain, graphed = _Spy(backend), _Spy(backend)
    graphed.graphs = {"full": None}  # what a backend opened with cuda_graphs=True holds (CUDA only)
    options = {"masks_per_forward": 4}
    ref, _ = get_method("scorecam").run(plain, x, fixed([[0, 2]] * 5), tap="features", options=options)
    got, _ = get_method("scorecam").run(graphed, x, fixed([[0, 2]] * 5), tap="features", options=options)
    assert plain.sizes == [5, 4, 4, 2]  # 10 live (image, channel) pairs
    assert graphed.sizes == [5, 4, 4, 4]
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_occlusion_pads_its_last_chunk_when_the_forward_replays_cuda_graphs(tmp_path):
    """As Score-CAM: 5 images x 9 windows in chunks of 20 left a last chunk of 5 (and another size per batch)."""
    backend = open_backend("eager", source_of(SmallNet(), size=(16, 16)), tmp_path)
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    plain, graphed = _Spy(backend), _Spy(backend)
    graphed.graphs = {"full": None}
    options = {"window": 8, "stride": 4, "positions_per_forward": 20}
    ref, _ = get_method("occlusion").run(plain, x, fixed([[0, 3]] * 5), tap=None, options=options)
    got, _ = get_method("occlusion").run(graphed, x, fixed([[0, 3]] * 5), tap=None, options=options)
    assert plain.sizes == [5, 20, 20, 5] and graphed.sizes == [5, 20, 20, 20]
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


# --- K targets per image ----------------------------------------------------------------------------------


class SmallNet(nn.Module):
    """Two taps: ``features`` (the head above it is non-linear: gradients vary over the map) and
    ``body`` (read by a GAP + linear head: CAM applies). 16 px in, 8 x 8 maps, 10 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, 2, 1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(self.body(self.features(x)).mean(dim=(-2, -1)))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    backend = open_backend("eager", source_of(SmallNet(), size=(16, 16)), tmp_path_factory.mktemp("small"),
                           taps=["features", "body"])
    assert backend.info.cam_tap == "body"
    return backend


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))


def _tap(name):
    return "body" if name == "cam" else "features"


def _options(name):
    return {"masks_per_forward": 5} if name == "scorecam" else None  # chunks that split images


@pytest.mark.parametrize("name", CAMS)
def test_k_targets_repeated_and_reordered_equal_each_target_alone(name, small, images):
    t = torch.tensor([[7, 2, 7, 9], [0, 9, 5, 0], [3, 3, 3, 3]])  # repeats, other orders
    maps, out = get_method(name).run(small, images, fixed(t), tap=_tap(name), options=_options(name))
    assert maps.shape == (3, 4, 8, 8) and torch.isfinite(maps).all()
    assert torch.equal(out.targets, t)
    for b in range(3):
        for k in range(4):
            one, _ = get_method(name).run(small, images[b : b + 1], fixed([[t[b, k].item()]]), tap=_tap(name),
                                          options=_options(name))
            torch.testing.assert_close(maps[b, k], one[0, 0], rtol=1e-4, atol=1e-6, msg=f"{name} {b} {k}")
    assert torch.equal(maps[0, 0], maps[0, 2]), "the same target twice gives the same map"
    assert (maps.flatten(2).amax(-1) > 0).float().mean() > 0.5, "most maps are non-zero"


def test_label_targets_equal_the_same_classes_given_explicitly(small, images):
    labels = torch.tensor([4, 0, 9])
    select = Targets.parse("label").selector(labels)
    for name in CAMS:
        by_label, out = get_method(name).run(small, images, select, tap=_tap(name), options=_options(name))
        assert torch.equal(out.targets, labels.view(-1, 1))
        explicit, _ = get_method(name).run(small, images, fixed(labels.view(-1, 1)), tap=_tap(name),
                                           options=_options(name))
        torch.testing.assert_close(by_label, explicit, rtol=0, atol=0, msg=name)


def test_methods_on_one_shared_batch_equal_each_method_alone(small, images):
    """The pipeline runs every method of a job on one SharedBatch: one forward + backward for all."""
    select = Targets.parse("top:3").selector()
    shared = SharedBatch(small, images, select, gradients=True)
    for name in CAMS:
        together, out = get_method(name).run(shared, images, select, tap=_tap(name), options=_options(name))
        alone, out_alone = get_method(name).run(small, images, select, tap=_tap(name), options=_options(name))
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(out.targets, out_alone.targets) and torch.equal(out.targets, out.logits.topk(3).indices)
    assert shared.calls == 1


def test_top_k_beyond_the_classes_is_refused_before_work():
    with pytest.raises(ConfigError, match="only 10 classes"):
        Targets.parse("top:11", num_classes=10)
    assert Targets.parse("3,3,3,3,3,3,3,3,3,3,3,3", num_classes=10).k == 12  # repeats: K may exceed N


# --- degenerate taps: dead, negative, 1x1 -----------------------------------------------------------------


class Degenerate(nn.Module):
    """A dead tap (all zero: ReLU of a zero conv) or a 1x1 tap (a pooled feature map), then a linear head."""

    def __init__(self, kind: str):
        super().__init__()
        conv = nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            if kind == "dead":
                conv.weight.zero_()
                conv.bias.fill_(-1.0)
        pool = nn.AdaptiveAvgPool2d(1)
        self.features = nn.Sequential(conv, nn.ReLU(), pool) if kind == "1x1" else nn.Sequential(conv, nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


@pytest.mark.parametrize("kind", ["dead", "1x1"])
def test_degenerate_taps_give_finite_maps(kind, tmp_path):
    torch.manual_seed(0)
    backend = open_backend("eager", source_of(Degenerate(kind)), tmp_path, taps=["features"])
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    for name in CAMS:
        if name == "cam" and backend.info.cam_weight is None:
            continue
        spy = _Spy(backend)
        maps, _ = get_method(name).run(spy, x, fixed([[0, 2], [1, 1]]), tap="features")
        assert min(spy.sizes, default=1) > 0, f"{name}: a forward of an empty batch (ONNX Runtime may refuse it)"
        assert maps.shape == (2, 2, *((8, 8) if kind == "dead" else (1, 1))), name
        assert torch.isfinite(maps).all(), name
        if kind == "dead" or name == "scorecam":  # nothing active; a 1x1 channel is constant: no mask
            assert torch.equal(maps, torch.zeros_like(maps)), name


def test_negative_activations_of_a_tap_before_relu_give_finite_maps(tmp_path):
    backend = _spatial(tmp_path, relu=False)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    assert (backend.forward(x).taps["features"] < 0).any()
    for name in GRADIENT_CAMS + ["scorecam"]:
        maps, _ = get_method(name).run(backend, x, fixed([[0, 1, 2]] * 4), tap="features")
        assert torch.isfinite(maps).all() and (maps >= 0).all(), name


# --- options ------------------------------------------------------------------------------------------


def test_an_option_given_as_none_takes_its_default():
    """None means "the method's default" (as an unset CLI flag does), not a None that fails mid-batch."""
    assert get_method("scorecam").resolve_options({"masks_per_forward": None}) == {"masks_per_forward": 64}


@pytest.mark.parametrize("value", [2.5, True, "2.5", 0, -1, "x"])
def test_masks_per_forward_refuses_what_is_not_a_positive_integer(value):
    with pytest.raises(ConfigError, match=r"masks_per_forward: expected a positive integer, received"):
        get_method("scorecam").resolve_options({"masks_per_forward": value})


# --- peers ---------------------------------------------------------------------------------------------


def _pytorch_grad_cam(pgc, model, x, targets) -> dict[str, torch.Tensor]:
    """pytorch-grad-cam's maps (its hooks, its weights) at the tap, ReLU'd, unnormalised: name -> (B, K, h, w).

    Grad-CAM++ is given (c g, A / c): its weights are invariant under that, and it shrinks the share
    of the eps (1e-6) in its denominator next to g^2 (see test_architectures.gradcam_pp_reference).
    """
    classes = {"gradcam": (pgc.GradCAM, 1.0), "gradcam++": (pgc.GradCAMPlusPlus, 1e4),
               "xgradcam": (pgc.XGradCAM, 1.0), "layercam": (pgc.LayerCAM, 1.0)}
    model = copy.deepcopy(model)
    cams = {name: cls(model=model, target_layers=[model.layer4]) for name, (cls, _) in classes.items()}
    hooks = cams["gradcam"].activations_and_grads
    maps = {name: [] for name in classes}
    try:
        for k in range(targets.shape[1]):
            logits = hooks(x)
            model.zero_grad()
            logits.gather(1, targets[:, k : k + 1]).sum().backward()
            a, g = hooks.activations[0].numpy(), hooks.gradients[0].numpy()
            for name, (_, c) in classes.items():
                img = cams[name].get_cam_image(x, model.layer4, None, a / c, g * c, eigen_smooth=False)
                maps[name].append(torch.from_numpy(np.maximum(img, 0)))
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()
    return {name: torch.stack(m, dim=1) for name, m in maps.items()}


@pytest.mark.slow  # ~20 s here: importing pytorch-grad-cam and opening resnet18 dominate
def test_gradient_cams_match_pytorch_grad_cam_on_resnet18(tmp_path):
    pgc = pytest.importorskip("pytorch_grad_cam")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # BatchNorm statistics of a seeded batch: activations that do not vanish
        model.train()
        model(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    model.eval()
    backend = open_backend("eager", source_of(copy.deepcopy(model), size=(64, 64)), tmp_path)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([[3, 5, 3], [5, 0, 9]])
    references = _pytorch_grad_cam(pgc, model, x, t)
    for name, want in references.items():
        ours, _ = get_method(name).run(backend, x, fixed(t), tap="layer4")
        scale = want.abs().amax().item()
        assert scale > 1e-3 and (want > 0).float().mean() > 0.3, name
        torch.testing.assert_close(ours, want.float(), rtol=1e-4, atol=1e-5 * scale, msg=name)
