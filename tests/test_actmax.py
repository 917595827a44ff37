"""Activation maximization: the objective algebra and its spec strings, transforms, parameterizations,
and the render loop (every objective lowers its loss; a batch equals its singles; no side effects).

The demo model at 48 px and a 10-class resnet18 at 32 px keep every test to a few seconds.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torchvision

from camshaft.engine.actmax import (
    Activations,
    Compose,
    Jitter,
    LossPlan,
    Objective,
    Pad,
    RenderConfig,
    Rotate,
    Scale,
    Term,
    channel,
    class_logit,
    class_prob,
    direction,
    diversity,
    fourier_image,
    frequency_penalty,
    l2,
    layer_norm,
    neuron,
    parse_objective,
    parse_objectives,
    pixel_image,
    render,
    total_variation,
)
from camshaft.engine.actmax.render import EXACT_GROUP, grouped
from camshaft.engine.actmax.relu import redirected_relus
from camshaft.engine.actmax.transforms import _affine_grid
from camshaft.errors import ConfigError
from camshaft.models.sources import resolve_model
from camshaft.preprocess import Preprocess

STILL = {"pad": 0, "jitter": 0, "scale": 0.0, "rotate": 0.0}  # no transforms: losses fall monotonically


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for this module


@pytest.fixture(scope="module")
def demo():
    source = resolve_model("demo")
    return source.module, source.preprocess.replace(input_size=(48, 48))


def _cfg(**kw) -> RenderConfig:
    return RenderConfig(**{"steps": 8, "device": "cpu", **kw})


def _acts(b=2, n=5, c=4):
    g = torch.Generator().manual_seed(0)
    taps = {"t": torch.randn(b, c, 3, 3, generator=g)}
    return Activations(torch.randn(b, n, generator=g), taps, torch.rand(b, 3, 8, 8, generator=g))


# ---- the algebra and the spec strings ---------------------------------------------------------------


def test_algebra_adds_scales_negates_in_closed_form():
    a = _acts()
    logit, ch = class_logit(3), channel("t", 1)
    combo = 2 * logit - 0.5 * ch
    expected = -2 * a.logits[:, 3] + 0.5 * a.taps["t"][:, 1].mean((1, 2))
    torch.testing.assert_close(combo(a), expected)
    torch.testing.assert_close((-logit)(a), a.logits[:, 3])
    torch.testing.assert_close(sum([logit, ch])(a), logit(a) + ch(a))
    assert combo.spec == "2*class:3+-0.5*channel:t:1"
    assert combo.taps == {"t"} and combo.target == 3 and ch.target is None


def test_every_spec_reads_back_to_the_same_objective():
    a = _acts()
    for spec in ("class:3", "-prob:1", "channel:t:2", "neuron:t:1:2:0", "neuron:t:3", "layer:t",
                 "0.5*class:1+-2*l2+tv+freq", "direction:t:1,0,0,1"):
        (o,) = parse_objective(spec)
        (again,) = parse_objective(o.spec)
        assert again.spec == o.spec
        torch.testing.assert_close(again(a), o(a))


def test_specs_expand_ranges_lists_and_names():
    names = ["circle", "square", "triangle", "cross", "ring"]
    specs = [o.spec for o in parse_objectives(["class:0-2", "class:ring,1"], class_names=names, num_classes=5)]
    assert specs == ["class:0", "class:1", "class:2", "class:4", "class:1"]
    assert [o.spec for o in parse_objective("-channel:layer4:7,9")] == ["-channel:layer4:7", "-channel:layer4:9"]
    summed = parse_objective("class:0-2+0.1*layer:layer3")  # one-unit terms join every objective
    assert [o.spec for o in summed] == [f"class:{c}+0.1*layer:layer3" for c in range(3)]


def test_closed_form_values_of_each_objective():
    a = _acts()
    t = a.taps["t"]
    torch.testing.assert_close(class_prob(2)(a), -torch.log_softmax(a.logits, -1)[:, 2])
    torch.testing.assert_close(neuron("t", 1, 0, 2)(a), -t[:, 1, 0, 2])
    torch.testing.assert_close(neuron("t", 1)(a), -t[:, 1, 1, 1])  # the centre
    torch.testing.assert_close(layer_norm("t")(a), -t.pow(2).mean((1, 2, 3)))
    torch.testing.assert_close(direction("t", [0, 3.0, 0, 4.0])(a), -(0.6 * t[:, 1] + 0.8 * t[:, 3]).mean((1, 2)))
    torch.testing.assert_close(l2()(a), (a.images - 0.5).pow(2).mean((1, 2, 3)))


def test_channel_and_direction_read_vector_taps():
    a = Activations(torch.randn(2, 5), {"fc": torch.randn(2, 4)}, torch.rand(2, 3, 8, 8))
    fc = a.taps["fc"]
    torch.testing.assert_close(channel("fc", 3)(a), -fc[:, 3])
    torch.testing.assert_close(direction("fc", [0, 3.0, 0, 4.0])(a), -(0.6 * fc[:, 1] + 0.8 * fc[:, 3]))


def _per_objective(objectives, acts, group):
    """The reference: each objective on its own images, as Objective.__call__ computes it."""
    return torch.cat([o(acts.rows(j * group, (j + 1) * group)) for j, o in enumerate(objectives)])


def _mixed():
    """Every kind, weighted, negated, summed, repeated in one objective, and terms of no family."""
    custom = Objective.of(Term("custom", lambda a: a.images.mean((1, 2, 3)) * a.logits[:, 0]))
    return [
        class_logit(3), 2 * class_logit(0), class_prob(1) - 0.5 * l2(), channel("t", 2), -channel("t", 0),
        neuron("t", 1), neuron("t", 3, 0, 2) + class_logit(3) + class_logit(4), layer_norm("t"),
        direction("t", [1.0, 0, 2, 0]) + 0.1 * total_variation(), 0.01 * frequency_penalty() + custom,
        0 * class_logit(2), class_logit(1) + 0.5 * diversity("t"), diversity("t"), custom - class_logit(2),
    ]


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("choose", ["mixed", "classes", "classes+regularizers", "channels"])
def test_a_loss_plan_equals_each_objective_on_its_own_images_with_the_same_gradients(group, choose):
    objectives = {
        "mixed": _mixed(),
        "classes": [class_logit(c) for c in (4, 0, 2, 2)],
        "classes+regularizers": [class_logit(c) + 0.1 * l2() + 0.5 * diversity("t") for c in (4, 0, 2)],
        "channels": [channel("t", c) for c in range(4)],
    }[choose]
    b = len(objectives) * group
    g = torch.Generator().manual_seed(1)
    leaves = [torch.randn(b, 5, generator=g), torch.randn(b, 4, 3, 3, generator=g), torch.rand(b, 3, 8, 8, generator=g)]
    leaves = [t.requires_grad_(True) for t in leaves]
    acts = Activations(leaves[0], {"t": leaves[1]}, leaves[2])
    expected = _per_objective(objectives, acts, group)
    got = LossPlan(objectives, group, torch.device("cpu"))(acts)
    torch.testing.assert_close(got, expected)
    weights = torch.randn(b, generator=g)  # a different weight per image: every row's gradient is checked
    grad = lambda y: torch.autograd.grad((y * weights).sum(), leaves, allow_unused=True, materialize_grads=True)
    for have, ref in zip(grad(got), grad(expected), strict=True):
        torch.testing.assert_close(have, ref)


def _dispatched(fn) -> int:
    """How many tensor operations ``fn`` runs (views excluded): kernel launches on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def test_a_loss_plan_runs_as_many_operations_for_eight_objectives_as_for_two_hundred():
    def step(n):
        objectives = [class_logit(c % 5) + 0.1 * l2() for c in range(n)] + [channel("t", c % 4) for c in range(n)]
        g = torch.Generator().manual_seed(0)
        b = 2 * n
        acts = Activations(torch.randn(b, 5, generator=g).requires_grad_(True), {"t": torch.randn(b, 4, 3, 3)},
                           torch.rand(b, 3, 8, 8).requires_grad_(True))
        plan = LossPlan(objectives, 1, torch.device("cpu"))
        return _dispatched(lambda: plan(acts).sum().backward())

    assert step(8) == step(200) < 40


@pytest.mark.parametrize(
    "spec, message",
    [
        ("klass:3", "unknown kind 'klass'"),
        ("class:5-2", "range '5-2' is empty"),
        ("class:99", r"out of range 0\.\.4"),
        ("class:dog", r"unknown classes \['dog'\]"),
        ("channel:layer3", "expected channel:TAP:C"),
        ("neuron:layer4:1:2", "expected TAP:C or TAP:C:Y:X"),
        ("class:0-2+channel:t:0,1", "the same number of units"),
        ("direction:t:0,0", "non-zero vector"),
        ("", "empty objective"),
    ],
)
def test_bad_specs_name_the_problem_and_the_syntax(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_objectives([spec], class_names=["circle"], num_classes=5)
    assert "valid syntax" in str(e.value) and "class:I[-J]" in str(e.value)


def test_objectives_that_do_not_fit_the_model_are_all_named(demo, capsys):
    model, pre = demo
    objs = [class_logit(1), channel("features", 999), neuron("features", 0, 40, 0), class_logit(7)]
    with pytest.raises(ConfigError) as e:  # a later chunk's objectives too: all are checked before any step
        render(model, objs, preprocess=pre, config=_cfg(steps=1, batch_size=1), progress=True)
    for part in ("channel 999 is out of range 0..79", "position (40, 0) is outside tap 'features'",
                 "class 7 is out of range 0..4"):
        assert part in str(e.value)
    assert "actmax" not in capsys.readouterr().err  # the error comes alone: no progress bar was opened
    with pytest.raises(ConfigError, match="unknown tap 'nope'; valid choices: features"):
        render(model, [layer_norm("nope")], preprocess=pre, config=_cfg(steps=1))


# ---- transforms and parameterizations ----------------------------------------------------------------


def test_transforms_draw_per_image_so_a_batch_equals_its_images():
    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(1))
    t = Compose([Pad(2), Jitter(3), Scale(0.1), Rotate(10)])
    batch = t(x, [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    singles = torch.cat([t(x[i:i + 1], [torch.Generator().manual_seed(5 + i)]) for i in range(3)])
    torch.testing.assert_close(batch, singles, rtol=1e-6, atol=1e-6)
    assert batch.shape == (3, 3, 24, 28)


@pytest.mark.parametrize("size", [(5, 7), (16, 16), (1, 3)])
def test_sampling_grids_are_torchs_affine_grids(size):
    theta = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expected = torch.nn.functional.affine_grid(theta, [3, 1, *size], align_corners=False)
    torch.testing.assert_close(_affine_grid(theta, *size), expected, rtol=0, atol=1e-12)


def test_jitter_is_an_exact_shift_and_affine_runs_resample_once():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(-3, 4, (2,), generator=torch.Generator().manual_seed(0)).tolist()
    y = Jitter(3)(x, [g])
    shifted = torch.roll(x, (-dy, -dx), dims=(2, 3))  # the output samples the input at p + d
    inner = (slice(None), slice(None), slice(4, 12), slice(4, 12))
    torch.testing.assert_close(y[inner], shifted[inner])
    merged = Compose([Jitter(0), Rotate(0), Scale(0)])(x, [torch.Generator()])
    torch.testing.assert_close(merged, x, rtol=1e-6, atol=1e-6)


def test_a_sized_compose_shows_the_model_its_input_size_and_the_frame_only_at_the_edges():
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(4))
    still = Compose([Pad(4), Jitter(0)], size=(16, 20))(x, [torch.Generator(), torch.Generator()])
    torch.testing.assert_close(still, x, rtol=1e-5, atol=1e-5)  # identity affine: the image itself
    torch.testing.assert_close(Compose([Pad(4)], size=(16, 20))(x, [torch.Generator()] * 2), x)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    moved = Compose([Pad(4), Jitter(3), Rotate(10)], size=(16, 20))(x, gens)
    unsized = Compose([Pad(4), Jitter(3), Rotate(10)])(x, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert moved.shape == x.shape and unsized.shape == (2, 3, 24, 28)
    torch.testing.assert_close(moved, unsized[..., 4:20, 4:24], rtol=1e-5, atol=1e-5)  # the centre of the frame


@pytest.mark.parametrize("make", [pixel_image, fourier_image])
def test_parameterizations_start_from_given_images_and_blur(make):
    img = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05
    p = make((16, 12), generators=[torch.Generator(), torch.Generator()], init=img)
    torch.testing.assert_close(p.image_fn(), img, rtol=1e-4, atol=1e-4)
    rough = p.image_fn().diff(dim=-1).abs().mean()
    p.blur_(1.0)
    assert p.image_fn().diff(dim=-1).abs().mean() < 0.7 * rough
    params, image_fn = make((16, 12), generators=[torch.Generator().manual_seed(0)])  # lucent's unpacking
    assert image_fn().shape == (1, 3, 16, 12) and params[0].requires_grad
    assert 0.45 < float(image_fn().detach().mean()) < 0.55  # seeded noise around grey


# ---- the render loop ---------------------------------------------------------------------------------

OBJECTIVES = [
    "class:1", "prob:2", "channel:features:5", "neuron:features:3", "neuron:features:7:1:4", "layer:features",
    "direction:features:" + ",".join(["1", "-1"] * 40), "-class:1", "2*class:0+-0.5*channel:features:1",
]


@pytest.mark.parametrize("spec", OBJECTIVES)
def test_every_objective_lowers_its_loss(demo, spec):
    model, pre = demo
    r = render(model, parse_objective(spec, num_classes=5), preprocess=pre, config=_cfg(steps=6, **STILL))
    assert r.losses.shape == (6, 1)
    assert r.losses[-1, 0] < r.losses[0, 0] - 1e-3, r.losses[:, 0].tolist()
    assert math.isclose(-float(r.values[0]), float(r.losses[-1, 0]), rel_tol=0.5, abs_tol=5.0)


@pytest.mark.parametrize("spec", ["l2", "tv", "freq"])
def test_every_image_regularizer_lowers_its_loss(demo, spec):
    model, pre = demo
    start = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    r = render(model, parse_objective(spec), preprocess=pre, init=start, config=_cfg(steps=6, param="pixel", **STILL))
    assert r.losses[-1, 0] < 0.9 * r.losses[0, 0], r.losses[:, 0].tolist()


def test_diversity_lowers_its_loss_and_makes_copies_differ(demo):
    model, pre = demo
    r = render(model, [diversity("features")], preprocess=pre, config=_cfg(steps=6, copies=3, init_sd=0.5, **STILL))
    assert r.losses.shape == (6, 3)
    assert r.losses[-1].mean() < r.losses[0].mean() - 1e-3, r.losses.mean(1).tolist()


def test_a_batch_equals_its_singles_and_chunking_changes_nothing(demo):
    model, pre = demo
    objs = parse_objective("class:0-1") + [channel("features", 4), layer_norm("features"), neuron("features", 2)]
    settings = {"steps": 12, "l2": 0.01, "tv": 0.01, "blur_every": 5}  # exact kernels: the CPU default
    whole = render(model, objs, preprocess=pre, config=_cfg(seed=11, **settings))
    singles = [render(model, [o], preprocess=pre, config=_cfg(seed=11 + i, **settings)) for i, o in enumerate(objs)]
    torch.testing.assert_close(whole.images, torch.cat([s.images for s in singles]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.values, torch.cat([s.values for s in singles]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.losses, torch.cat([s.losses for s in singles], 1), rtol=1e-5, atol=1e-6)
    for size in (2, 4):
        chunked = render(model, objs, preprocess=pre, config=_cfg(seed=11, batch_size=size, **settings))
        torch.testing.assert_close(chunked.images, whole.images, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked.losses, whole.losses, rtol=1e-5, atol=1e-6)


def test_an_image_does_not_depend_on_the_taps_of_the_other_objectives(demo):
    """Folding a batch norm into its convolution is skipped where a tap reads the convolution: exact
    runs do not fold, so the taps another objective adds change nothing for the others."""
    model, pre = demo
    together = render(model, [class_logit(3), channel("features.4", 5)], preprocess=pre, config=_cfg(steps=12, seed=7))
    alone = render(model, [class_logit(3)], preprocess=pre, config=_cfg(steps=12, seed=7))
    assert torch.equal(together.images[:1], alone.images)


def test_an_objective_of_weight_zero_renders_nothing_and_breaks_nothing(demo):
    model, pre = demo
    objs = parse_objective("class:0") + parse_objective("0*class:1")
    for size in (2, 1):  # alone in its chunk too
        r = render(model, objs, preprocess=pre, config=_cfg(steps=3, batch_size=size))
        assert torch.equal(r.losses[:, 1], torch.zeros(3)) and r.losses[-1, 0] < r.losses[0, 0]


def test_a_batch_of_16_or_more_equals_its_chunks(demo):
    """Without oneDNN torch hands convolutions of 16 or more images to NNPACK, whose rounding differs."""
    model, pre = demo
    objs = parse_objective("class:0-1") * 8
    whole = render(model, objs, preprocess=pre, config=_cfg(steps=4))
    chunked = render(model, objs, preprocess=pre, config=_cfg(steps=4, batch_size=8))
    torch.testing.assert_close(whole.losses, chunked.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.images, chunked.images, rtol=1e-5, atol=1e-6)
    assert torch.backends.mkldnn.enabled and torch._C._get_nnpack_enabled()  # restored


@pytest.mark.parametrize("first, n", [(0, 8), (0, 3), (5, 6), (13, 11)])
def test_grouped_calls_the_model_on_whole_groups_with_each_image_at_its_slot(first, n):
    calls = []

    def forward(x):
        calls.append(x.detach().clone())
        return x.sum((2, 3)) * 2, {"t": x[:, :1] + 1}

    x = torch.randn(n, 3, 2, 2, requires_grad=True)
    logits, taps = grouped(forward, group=4, first=first)(x)
    assert all(len(c) == 4 for c in calls)  # one shape for every call
    slots = torch.cat(calls)[first % 4:first % 4 + n]  # image first + i at slot (first + i) % 4
    assert torch.equal(slots, x.detach())
    assert torch.equal(logits, x.sum((2, 3)) * 2) and torch.equal(taps["t"], x[:, :1] + 1)
    (logits.sum() + taps["t"].sum()).backward()  # the fillers are detached: each image gets its own gradient
    from_tap = torch.cat([torch.ones(n, 1, 2, 2), torch.zeros(n, 2, 2, 2)], 1)
    assert torch.equal(x.grad, torch.full_like(x, 2.0) + from_tap)


def test_exact_convnet_renders_are_bitwise_the_same_whatever_the_batch():
    """oneDNN's kernels, blocking and thread splits follow the batch size (resnet18's logits differ for
    1, 2, 3, 5 and 4+ images on 2 cores); exact runs call it on fixed groups, so no chunking shows."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=12).eval()
    pre = Preprocess(input_size=(40, 40))
    objs = [class_logit(c) for c in range(EXACT_GROUP + 3)]
    cfg = {"steps": 3, "device": "cpu", "seed": 5}
    whole = render(model, objs, preprocess=pre, config=RenderConfig(**cfg))
    for size in (3, 1):
        chunked = render(model, objs, preprocess=pre, config=RenderConfig(batch_size=size, **cfg))
        assert torch.equal(chunked.images, whole.images), (chunked.images - whole.images).abs().max()
        assert torch.equal(chunked.values, whole.values)
    last = render(model, objs[-1:], preprocess=pre, config=RenderConfig(**{**cfg, "seed": 5 + len(objs) - 1}))
    assert torch.equal(last.images, whole.images[-1:])


def test_fast_kernels_agree_to_rounding_before_the_first_step(demo):
    """oneDNN's batch-size-specific kernels round differently; only the first step is comparable."""
    model, pre = demo
    objs = [class_logit(0), layer_norm("features")]
    fast = [render(model, objs, preprocess=pre, config=_cfg(steps=1, batch_size=b, exact=False)) for b in (1, 2)]
    torch.testing.assert_close(fast[0].losses, fast[1].losses, rtol=1e-5, atol=1e-6)
    assert torch.backends.mkldnn.enabled  # restored after every run
    # the exact kernels call the model on groups of 8 images: the same numbers
    exact = render(model, objs, preprocess=pre, config=_cfg(steps=1, exact=True))
    torch.testing.assert_close(fast[1].losses, exact.losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[1].values, exact.values, rtol=1e-4, atol=1e-4)
    assert all(p.is_contiguous() for p in model.parameters())  # the model's layout is restored


@pytest.mark.parametrize("exact", [True, False])
def test_render_leaves_the_model_as_it_found_it(demo, exact):
    model, pre = demo
    model.train()
    model.fc.weight.requires_grad_(False)
    model.register_buffer("planes", torch.ones(1, 2, 3, 3))  # 4-d, like the weights the fast kernels lay out
    storage = {name: t.data_ptr() for name, t in (*model.named_parameters(), *model.named_buffers())}
    try:
        r = render(model, [channel("features", 0), class_logit(1)], preprocess=pre,
                   config=_cfg(steps=2, exact=exact))
        # the same tensors, in their own memory and layout
        assert {name: t.data_ptr() for name, t in (*model.named_parameters(), *model.named_buffers())} == storage
        assert all(t.is_contiguous() for t in (*model.parameters(), *model.buffers()))
        assert model.training and all(m.training for m in model.modules())
        assert not model.fc.weight.requires_grad and model.fc.bias.requires_grad
        assert all(p.grad is None for p in model.parameters())
        assert not any(m._forward_hooks for m in model.modules())
        assert r.images.shape == (2, 3, 48, 48) and 0 <= r.images.min() and r.images.max() <= 1
        assert math.isnan(r.target_probs[0]) and 0 <= r.target_probs[1] <= 1
    finally:
        model.eval()
        model.fc.weight.requires_grad_(True)
        del model.planes


@pytest.fixture(params=["sum first", "direct", "sync-free"])
def relu_path(request, monkeypatch):
    """Every backward path: large CPU gradients' (a sum read on the host finds candidates first),
    small ones' and the one without a host sync (GPUs), which test every channel directly."""
    from camshaft.engine.actmax import relu

    if request.param == "sum first":
        monkeypatch.setattr(relu, "SUM_FIRST", 0)
    elif request.param == "sync-free":
        monkeypatch.setattr(relu, "SUM_FIRST", 0)
        monkeypatch.setattr(relu, "_sync_free", lambda device: True)
    return request.param


def test_dead_relu_channels_leak_only_the_gradient_that_wakes_them(relu_path):
    relu = torch.nn.ReLU(inplace=True)
    model = torch.nn.Sequential(relu)
    x = torch.tensor([[[[-1.0, 2.0]], [[-1.0, -2.0]]]], requires_grad=True)  # (1, 2, 1, 2): channel 1 is dead
    g = torch.tensor([[[[-3.0, 5.0]], [[-3.0, 5.0]]]])
    with redirected_relus(model, leak=0.5) as count:
        assert count == 1
        y = model(x * 1)  # in place, as the module is
        (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(y, x.clamp(min=0))
    # channel 0 passes a gradient (its unit at 2.0): exact ReLU; channel 1 is dead: -3 leaks at 0.5, +5 does not
    torch.testing.assert_close(grad, torch.tensor([[[[0.0, 5.0]], [[-1.5, 0.0]]]]))
    assert "forward" not in relu.__dict__  # the module is itself again
    torch.testing.assert_close(model(x.clone()), x.clamp(min=0))


def test_dead_relu_vectors_and_alive_units_without_gradient(relu_path):
    model = torch.nn.Sequential(torch.nn.ReLU())
    x = torch.tensor([[1.0, -1.0, -2.0], [1.0, -1.0, 3.0], [1.0, 2.0, -1.0]], requires_grad=True)  # (B, N)
    g = torch.tensor([[0.0, -4.0, 2.0], [0.0, -4.0, 2.0], [3.0, -3.0, -4.0]])
    # row 0: its alive unit gets no gradient: stalled; row 2 passes a gradient that sums to 0: not stalled
    with redirected_relus(model, leak=0.25):
        (grad,) = torch.autograd.grad(model(x), x, g)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 2.0], [3.0, -3.0, 0.0]]))


def test_a_channel_whose_gradient_sums_to_zero_or_is_infinite_keeps_it(relu_path):
    model = torch.nn.Sequential(torch.nn.ReLU())
    x = torch.tensor([[[[1.0, -1.0, 2.0]], [[-1.0, -1.0, -1.0]]]], requires_grad=True)  # channel 1 is dead
    g = torch.tensor([[[[3.0, -math.inf, -3.0]], [[2.0, -4.0, -math.inf]]]])
    with redirected_relus(model, leak=0.5):
        (grad,) = torch.autograd.grad(model(x), x, g)
    # channel 0 passes 3 and -3 (summing to 0): exact ReLU, its dead unit's -inf leaks nothing (no NaN);
    # channel 1 is dead: -4 leaks, -inf leaks as the lowest finite value
    lowest = torch.finfo(torch.float32).min
    torch.testing.assert_close(grad, torch.tensor([[[[3.0, 0.0, -3.0]], [[0.0, -2.0, 0.5 * lowest]]]]))


class _ReluOnAView(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        h = x * 1
        self.relu(h[:, 1:])  # in place on a view: channels 1.. of h change
        return h


def test_dead_relu_on_a_view_changes_the_base_and_leaks_per_channel(relu_path):
    model = _ReluOnAView()
    x = torch.tensor([[[[-1.0, 2.0]], [[-1.0, 2.0]], [[-1.0, -2.0]]]], requires_grad=True)  # channel 2 is dead
    g = torch.tensor([[[[-3.0, 5.0]], [[-3.0, 5.0]], [[-3.0, 5.0]]]])
    with redirected_relus(model, leak=0.5):
        y = model(x)
        (grad,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(y, torch.cat([x[:, :1], x[:, 1:].clamp(min=0)], 1))
    # channel 0 is no ReLU's: g; channel 1 passes a gradient: exact ReLU; channel 2 is dead: -3 leaks
    torch.testing.assert_close(grad, torch.tensor([[[[-3.0, 5.0]], [[0.0, 5.0]], [[-1.5, 0.0]]]]))


class _AlwaysDead(torch.nn.Module):
    """One ReLU whose input is below -9 for any image in [0, 1]: no true gradient ever reaches the image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.relu = torch.nn.ReLU()
        self.fc = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(0.1)
            self.conv.bias.fill_(-10.0)
            self.fc.weight.fill_(1.0)  # raising the dead channel would raise each logit: the leak wakes it
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def test_dead_relus_leak_only_during_the_first_relu_leak_steps_of_each_chunk(monkeypatch):
    render_module = importlib.import_module("camshaft.engine.actmax.render")  # the package exports the function
    model, pre = _AlwaysDead(), Preprocess(input_size=(8, 8), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    start = torch.full((1, 3, 8, 8), 0.5)
    kw = {"steps": 3, "param": "pixel", **STILL}
    # without the leak no gradient reaches the image: it stays where it started (Adam moves nothing)
    still = render(model, [class_logit(0)], preprocess=pre, init=start, config=_cfg(relu_leak_steps=0, **kw))
    torch.testing.assert_close(still.images, start, rtol=0, atol=1e-6)
    woken = render(model, [class_logit(0)], preprocess=pre, init=start, config=_cfg(relu_leak_steps=1, **kw))
    assert (woken.images - start).abs().amax() > 1e-3  # one leaky step moved it

    leaks = []  # the leak each step's forward ran with
    real = render_module.redirected_relus
    monkeypatch.setattr(render_module, "redirected_relus",
                        lambda m, *, leak: leaks.append(leak) or real(m, leak=leak))
    render(model, [class_logit(0), class_logit(1)], preprocess=pre,
           config=_cfg(relu_leak=0.25, relu_leak_steps=2, batch_size=1, **kw))
    assert leaks == [0.25, 0.25, 0.0] * 2  # two chunks of one image, each starting with the leak


def test_mixed_precision_forward_runs(demo):
    model, pre = demo
    r = render(model, [class_logit(2)], preprocess=pre, config=_cfg(steps=6, dtype="bfloat16", **STILL))
    assert torch.isfinite(r.images).all() and r.losses[-1, 0] < r.losses[0, 0]


def test_a_torchvision_model_with_module_taps():
    model = torchvision.models.resnet18(num_classes=10).eval()
    pre = Preprocess(input_size=(32, 32))
    objs = [class_logit(3), channel("layer3", 7), layer_norm("layer2")]
    r = render(model, objs, preprocess=pre, config=_cfg(steps=4, batch_size=2, **STILL))
    assert (r.losses[-1] < r.losses[0]).all(), r.losses.tolist()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"param": "wavelet"}, "unknown parameterization 'wavelet'"),
        ({"diversity": 1.0}, "diversity needs copies >= 2"),
        ({"copies": 4, "batch_size": 2}, "must hold the 4 copies"),
        ({"scale": 1.5}, r"scale must lie in \[0, 1\)"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"exact": "yes"}, "exact must be True, False or None"),
        ({"relu_leak_steps": -1}, "relu_leak_steps must be an integer >= 0"),
        ({"seed": 2**64}, r"seed must be below 2\*\*63"),
        ({"lr": 1e300}, "lr must be a positive number at most 3.4e"),
        ({"relu_leak": 2.0}, "relu_leak is a share of the gradient, at most 1"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(kw, message):
    with pytest.raises(ConfigError, match=message):
        RenderConfig(**kw)


def test_start_images_must_fit(demo):
    model, pre = demo
    with pytest.raises(ConfigError, match="give 1 initial image or one per image"):
        render(model, [class_logit(0)], preprocess=pre, init=torch.rand(3, 3, 48, 48), config=_cfg(steps=1))
    with pytest.raises(ConfigError, match=r"\(M, 3, 48, 48\)"):
        render(model, [class_logit(0)], preprocess=pre, init=torch.rand(1, 3, 20, 20), config=_cfg(steps=1))


def test_a_pad_as_large_as_the_image_is_refused(demo):
    model, pre = demo
    with pytest.raises(ConfigError, match=r"pad \(48\) must be smaller than the input size 48x48"):
        render(model, [class_logit(0)], preprocess=pre, config=_cfg(steps=1, pad=48))


@pytest.mark.parametrize("make", [pixel_image, fourier_image])
def test_any_finite_blur_is_a_blur(make):
    """A huge sigma smooths the image to (about) its mean: no overflow, no NaN, no giant kernel."""
    p = make((12, 10), generators=[torch.Generator().manual_seed(0)], sd=1.0)
    before = p.image_fn().detach().std((2, 3))
    p.blur_(1e308)
    after = p.image_fn().detach()
    assert after.isfinite().all() and (after.std((2, 3)) < before / 2).all()
    x = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    from camshaft.engine.actmax.transforms import gaussian_blur

    torch.testing.assert_close(gaussian_blur(x, 1e300), gaussian_blur(x, 1e3))  # a box: the kernel is cropped


def test_an_infinite_weight_in_a_spec_is_refused():
    with pytest.raises(ConfigError, match="weight 1e400 is too large"):
        parse_objective("1e400*class:0")


def test_diverged_images_are_written_grey_and_labelled_without_a_probability(tmp_path):
    from PIL import Image

    from camshaft.engine.actmax import Rendering, write_outputs

    nan = torch.tensor([math.nan])
    r = Rendering(torch.full((1, 3, 8, 8), math.nan), (class_logit(1),), nan, nan, torch.zeros(1, 1))
    rows = write_outputs(tmp_path, r, class_names=["a", "b"])
    assert rows[0]["target_prob"] is None and rows[0]["target_name"] == "b"
    assert Image.open(tmp_path / rows[0]["image"]).getpixel((4, 4)) == (128, 128, 128)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "results.parquet").is_file()
