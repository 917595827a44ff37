"""Batch norms folded into convolutions: same values, the user's model untouched, only safe pairs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from conftest import open_backend, source_of
from torch import fx, nn
from torchvision.ops import Conv2dNormActivation

from camshaft.engine.methods import get_method
from camshaft.models.fold import fold_batchnorms


def _norms(gm: fx.GraphModule) -> int:
    modules = dict(gm.named_modules())
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d))


def _resnet18() -> nn.Module:
    torch.manual_seed(0)  # the architecture's own initialisation: the same model in every run
    return torchvision.models.resnet18(num_classes=10)


def _trained_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters away from their initial values (else folding is trivial)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def test_resnet18_folds_every_pair_with_the_same_outputs_and_the_model_untouched():
    model = _trained_bn(_resnet18())
    before = copy.deepcopy(model.state_dict())
    gm = fx.symbolic_trace(model)
    assert _norms(gm) == 20
    assert fold_batchnorms(gm) == 20 and _norms(gm) == 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = model(x), gm(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # values and layers kept
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None
    assert not any(p.requires_grad for p in gm.conv1.parameters())  # an inference copy


class Pairs(nn.Module):
    """conv->bn pairs that must not fold: one whose conv output is also used, one whose conv is called twice."""

    def __init__(self):
        super().__init__()
        self.seen, self.bn_seen = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared, self.bn_shared = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn_again = nn.BatchNorm2d(4)
        self.plain, self.bn_plain = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.seen(x)
        b = self.bn_seen(a) + a  # the conv output is read twice
        c = self.bn_shared(self.shared(b)) + self.bn_again(self.shared(b))  # one conv module, two calls
        return self.bn_plain(self.plain(c))


def test_only_pairs_whose_convolution_nothing_else_sees_are_folded():
    model = _trained_bn(Pairs())
    gm = fx.symbolic_trace(model)
    assert fold_batchnorms(gm) == 1  # plain -> bn_plain only
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_model_in_training_mode_is_not_folded():
    gm = fx.symbolic_trace(torchvision.models.resnet18(num_classes=10).train())
    assert fold_batchnorms(gm) == 0


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_a_folded_eager_backend_gives_the_unfolded_maps(method, tmp_path):
    model = _trained_bn(_resnet18())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    select = lambda logits: torch.tensor([[3, 1], [5, 0]])  # noqa: E731
    plain = open_backend("eager", source_of(model, size=(64, 64)), tmp_path / "a")
    folded = open_backend("eager", source_of(copy.deepcopy(model), size=(64, 64)), tmp_path / "b", fold=True)
    assert _norms(folded._full.graph_module) == 0 and _norms(plain._full.graph_module) == 20
    want, _ = get_method(method).run(plain, x, select, tap="layer4", options={})
    got, _ = get_method(method).run(folded, x, select, tap="layer4", options={})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_the_pipeline_explains_with_folded_norms(tmp_path):
    from camshaft.demo.shapes import write_demo_dataset
    from camshaft.engine.explainer import build_explainer
    from camshaft.engine.job import ExplainJob

    data = write_demo_dataset(tmp_path / "data", n=2, seed=0).parent / "images"
    job = ExplainJob("resnet18", data, tmp_path / "out", method="gradcam", input_size=(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        backend = build_explainer(job, workdir=tmp_path / "artifacts").backend
    assert _norms(backend._full.graph_module) == 0
    assert all(_norms(part.gm) == 0 for part in backend._split)


@pytest.mark.parametrize("objective", ["class_logit", "channel"])
def test_activation_maximization_renders_through_folded_norms(objective, monkeypatch):
    """The same objective values (to float rounding) as through the model's own norms, which are left alone.

    Compared at the first step, where both start from the same image: after it, Adam turns rounding-level
    gradient differences near zero into steps of the learning rate, so later images may differ by more."""
    from camshaft.engine.actmax import RenderConfig, channel, class_logit, render
    from camshaft.models import fold as module  # render folds through fold_graphs, one graph at a time
    from camshaft.preprocess import Preprocess

    model = _trained_bn(_resnet18())
    before = copy.deepcopy(model.state_dict())
    objectives = [class_logit(3), class_logit(7)] if objective == "class_logit" else [channel("layer3", 5)]
    pre = Preprocess(input_size=(32, 32))
    # fast kernels fold; exact runs do not (a tap would change which norms fold: test_actmax)
    config = RenderConfig(steps=3, device="cpu", pad=0, jitter=0, scale=0.0, rotate=0.0, exact=False)
    folded = []
    fold = module.fold_batchnorms
    monkeypatch.setattr(module, "fold_batchnorms", lambda gm, **kw: folded.append(fold(gm, **kw)) or folded[-1])
    got = render(model, objectives, preprocess=pre, config=config)
    assert folded and folded[0] == 20
    monkeypatch.setattr(module, "fold_batchnorms", lambda gm, **kw: 0)  # the graphs as traced
    want = render(model, objectives, preprocess=pre, config=config)
    torch.testing.assert_close(got.losses[0], want.losses[0], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    folded.clear()
    monkeypatch.setattr(module, "fold_batchnorms", lambda gm, **kw: folded.append(fold(gm, **kw)) or folded[-1])
    render(model, objectives, preprocess=pre, config=RenderConfig(steps=1, device="cpu", exact=True))
    assert not folded


def _calibrated(name: str) -> nn.Module:
    """A seeded torchvision model whose running statistics are estimated on one seeded batch (else the
    activations of a random MobileNet vanish and every comparison holds trivially)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batch
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def _tree_norms(gm: nn.Module) -> int:
    """Norms the graph module's own module tree still holds, inside leaves of the trace included."""
    return sum(1 for m in gm.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_pairs_inside_torchvision_leaves_are_folded(name):
    """torchvision traces its ``Conv2dNormActivation`` as one node; its conv -> norm pair folds all the same."""
    from camshaft.models.taps import TappedModel

    model = _calibrated(name)
    tapped = TappedModel(model, ["features"])
    norms = _tree_norms(model)
    assert _norms(tapped.graph_module) == 0 and _tree_norms(tapped.graph_module) == norms  # all inside leaves
    assert fold_batchnorms(tapped.graph_module) == norms and _tree_norms(tapped.graph_module) == 0
    assert _tree_norms(model) == norms


def test_a_folded_mobilenet_gives_the_unfolded_logits_taps_and_maps_and_leaves_the_model_alone(tmp_path):
    model = _calibrated("mobilenet_v3_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [(n, type(m)) for n, m in model.named_modules()]
    taps = ["features.2.block.0", "features"]  # a Conv2dNormActivation's output, and the trunk's
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    plain = open_backend("eager", source_of(copy.deepcopy(model), size=(64, 64)), tmp_path / "a", taps=taps)
    folded = open_backend("eager", source_of(model, size=(64, 64)), tmp_path / "b", taps=taps, fold=True)
    graphs = [folded._full.graph_module, folded._full.leaf_module, *(part.gm for part in folded._split)]
    assert all(_tree_norms(gm) == 0 for gm in graphs) and _tree_norms(plain._full.graph_module) == 34
    with torch.no_grad():
        want_logits, want = plain._full(x)
        got_logits, got = folded._full(x)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())  # noqa: E731
    close(got_logits, want_logits)
    assert want_logits.std() > 1e-3 and set(got) == set(taps)
    for t in taps:
        close(got[t], want[t])
    select = lambda logits: torch.tensor([[3, 1], [5, 0]])  # noqa: E731
    for tap in taps:
        want_map, _ = get_method("gradcam").run(plain, x, select, tap=tap, options={})
        got_map, _ = get_method("gradcam").run(folded, x, select, tap=tap, options={})
        assert want_map.abs().max() > 0
        close(got_map, want_map)
    assert [(n, type(m)) for n, m in model.named_modules()] == types  # the user's layers, not the folded ones
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Conv2dNormActivation) or super().is_leaf_module(m, qualname)


class Leaves(nn.Module):
    """A leaf called twice (still folds: its copy computes the same) and one whose weight is also read (must not)."""

    def __init__(self):
        super().__init__()
        self.twice = Conv2dNormActivation(4, 4, 3)
        self.read = Conv2dNormActivation(4, 4, 3)

    def forward(self, x):
        y = self.twice(self.twice(x))
        return self.read(y) + nn.functional.conv2d(y, self.read[0].weight, padding=1)


def test_a_leaf_folds_where_nothing_reads_inside_it():
    model = _trained_bn(Leaves())
    gm = fx.GraphModule(model, _LeafTracer().trace(model))
    assert fold_batchnorms(gm) == 1  # twice, once: read's conv weight is a node of the graph
    assert isinstance(model.twice[1], nn.BatchNorm2d) and isinstance(gm.read[1], nn.BatchNorm2d)
    assert _tree_norms(gm.twice) == 0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_convolution_or_norm_the_user_hooked_is_not_folded_and_its_hooks_fire(tmp_path):
    """A folded copy would run no hook: a hooked conv, norm or leaf keeps its layers (the rest still folds)."""
    model = _calibrated("mobilenet_v3_small")
    seen = []
    hooks = [
        model.features[0][0].register_forward_hook(lambda m, i, o: seen.append("conv")),  # in a Conv2dNormActivation
        model.features[1].block[0][1].register_forward_pre_hook(lambda m, i: seen.append("norm")),
        model.features[2].block[0].register_forward_hook(lambda m, i, o: seen.append("leaf")),
    ]
    backend = open_backend("eager", source_of(model, size=(64, 64)), tmp_path, taps=["features"], fold=True)
    norms = _tree_norms(backend._full.graph_module)
    assert norms == 3  # the three hooked pairs; mobilenet_v3_small has 34
    seen.clear()
    with torch.no_grad():
        backend._full(torch.randn(1, 3, 64, 64))
    assert sorted(seen) == ["conv", "leaf", "norm"]
    for h in hooks:
        h.remove()


# --- graphs of ATen calls (a TorchScript or .pt2 file from elsewhere): norms are function calls -----------


def _calls(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.batch_norm.default)


def test_norm_calls_of_an_exported_graph_fold_where_the_convolution_call_feeds_them_alone():
    """In ATen form a module called twice is two convolution calls, each feeding its own norm: both fold.
    A convolution whose output is read twice does not; the tensors the graph read keep their values."""
    model = _trained_bn(Pairs())
    gm = torch.export.export(model, (torch.zeros(2, 3, 8, 8),)).module()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    assert _calls(gm) == 4
    assert fold_batchnorms(gm) == 3 and _calls(gm) == 1  # bn_seen stays: its convolution's output is read twice
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in before.items())
    assert not any(t.requires_grad for name, t in gm.named_buffers() if name.startswith("_camshaft_folded"))


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.bn = nn.ConvTranspose2d(3, 4, 2, stride=2), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.up(x))


def test_a_transposed_convolution_or_a_norm_in_training_mode_is_not_folded():
    gm = torch.export.export(_trained_bn(_Transposed()), (torch.zeros(2, 3, 4, 4),)).module()
    assert _calls(gm) == 1 and fold_batchnorms(gm) == 0  # its weight is laid out (in, out): another formula
    gm = torch.export.export(_resnet18().train(), (torch.zeros(2, 3, 32, 32),)).module()
    assert fold_batchnorms(gm) == 0


def test_a_converted_torchscript_file_runs_folded_on_the_eager_backend_with_the_unfolded_maps(tmp_path):
    """A TorchScript file from elsewhere: its norms fold in the backend's graphs (the forward, and the trunk and
    head of gradient methods) to the same logits and maps, and the converted model's tensors keep their values."""
    from camshaft.models.sources import resolve_model

    model = _trained_bn(_resnet18())
    path = tmp_path / "r18.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated upstream
        torch.jit.trace(model, torch.zeros(1, 3, 64, 64)).save(str(path))

    def backend(folder, fold):
        source = resolve_model(path, preprocess={"input_size": (64, 64), "mean": (0.0,) * 3, "std": (1.0,) * 3})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return open_backend("eager", source, tmp_path / folder, fold=fold)

    plain, folded = backend("a", False), backend("b", True)
    # its convolutions are aten.convolution calls: images still enter channels-last (was: contiguous, 1.3x slower)
    assert folded.memory_format == torch.channels_last
    graphs = [folded._full.graph_module, folded._full.leaf_module, *(part.gm for part in folded._split)]
    assert _calls(plain._full.graph_module) == 20 and all(_calls(gm) == 0 for gm in graphs)
    before = {k: v.clone() for k, v in folded.module.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    want, got = plain.forward(x), folded.forward(x)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4 * want.logits.abs().max().item())
    select = lambda logits: torch.tensor([[3, 1], [5, 0]])  # noqa: E731
    tap = folded.info.taps[0]
    for method in ("cam", "gradcam"):
        want_map, _ = get_method(method).run(plain, x, select, tap=tap, options={})
        got_map, _ = get_method(method).run(folded, x, select, tap=tap, options={})
        assert want_map.abs().max() > 0
        torch.testing.assert_close(got_map, want_map, rtol=1e-4, atol=1e-4 * want_map.abs().max().item())
    assert all(torch.equal(v, folded.module.state_dict()[k]) for k, v in before.items())
