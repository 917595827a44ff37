"""Activation maximization against closed forms: a linear model's optimum under L2 decay, units read
at the index they name, composed values, regularizer signs and scales, the Fourier colour matrix,
and outputs that match what was measured (the saved PNGs, the grid, the table's rows).

Tiny hand-set models keep each test well under a second; the demo model only where a real
network matters.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from camshaft.engine.actmax import (
    Activations,
    RenderConfig,
    channel,
    class_logit,
    diversity,
    fourier_image,
    frequency_penalty,
    l2,
    parse_objective,
    parse_objectives,
    pixel_image,
    render,
    total_variation,
    write_outputs,
)
from camshaft.engine.actmax.param import COLOR_SQRT_COV
from camshaft.engine.actmax.render import as_saved
from camshaft.errors import ConfigError
from camshaft.models.sources import resolve_model
from camshaft.preprocess import Preprocess

STILL = {"pad": 0, "jitter": 0, "scale": 0.0, "rotate": 0.0, "relu_leak": 0.0, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread for this module


class _Linear(nn.Module):
    """Logit c = w_c . x + b_c on the normalised input."""

    def __init__(self, size: tuple[int, int], classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(3 * size[0] * size[1], classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=torch.Generator().manual_seed(0)))
            self.fc.bias.copy_(torch.tensor([0.5, -1.0, 2.0])[:classes])

    def forward(self, x):
        return self.fc(x.flatten(1))


class _OneByOne(nn.Module):
    """A 1x1 convolution tap ``feat``: channel k reads the input's colours through a known row."""

    ROWS = [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, -1.0, 0]]

    def __init__(self):
        super().__init__()
        self.feat = nn.Conv2d(3, 4, 1, bias=False)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.feat.weight.copy_(torch.tensor(self.ROWS).view(4, 3, 1, 1))

    def forward(self, x):
        return self.head(self.feat(x).mean((2, 3)))


GREY_UNIT = Preprocess(input_size=(5, 7), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


# ---- closed forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["pixel", "fourier"])
def test_a_linear_logit_under_l2_decay_converges_to_grey_plus_w_over_2_lambda(param):
    """loss = -w.(x - m)/s + lam * mean((x - 0.5)^2) over n values: x* = 0.5 + n w / (2 lam s)."""
    size, lam, std = (4, 3), 1000.0, 0.25
    model = _Linear(size)
    pre = Preprocess(input_size=size, mean=(0.5,) * 3, std=(std,) * 3)
    cfg = RenderConfig(steps=400, lr=0.05, param=param, l2=lam, **STILL)
    r = render(model, [class_logit(1)], preprocess=pre, config=cfg)
    n = 3 * size[0] * size[1]
    optimum = 0.5 + n * model.fc.weight[1].detach().view(3, *size) / (2 * lam * std)
    assert 0.05 < optimum.min() and optimum.max() < 0.95  # inside the sigmoid's range: no clamping
    torch.testing.assert_close(r.images[0], optimum, atol=1e-4, rtol=0)
    logit = model((as_saved(r.images) - 0.5) / std)[0, 1].detach()
    torch.testing.assert_close(r.values[0], logit)  # of the image as saved; the configured l2 is not in it


def test_unit_objectives_move_only_the_pixels_of_the_unit_they_name():
    """On a 1x1 convolution, neuron c:y:x reads pixel (y, x) through row c; non-square, so y/x cannot swap."""
    specs = ["neuron:feat:1:3:5", "neuron:feat:2", "channel:feat:0", "-neuron:feat:3:0:6"]
    cfg = RenderConfig(steps=10, lr=0.1, param="pixel", init_sd=0.0, **STILL)
    r = render(_OneByOne(), parse_objectives(specs), preprocess=GREY_UNIT, config=cfg)
    moved = [sorted(map(tuple, ((im - 0.5).abs() > 1e-6).nonzero().tolist())) for im in r.images]
    assert moved[0] == [(1, 3, 5)]
    assert moved[1] == [(2, 2, 3)]  # the centre of a 5 x 7 map
    assert moved[2] == [(0, y, x) for y in range(5) for x in range(7)]
    assert moved[3] == [(0, 0, 6), (1, 0, 6)]  # -(r - g): red down, green up
    assert r.images[3][0, 0, 6] < 0.5 < r.images[3][1, 0, 6]
    feat = _OneByOne().feat(as_saved(r.images)).detach()
    expected = [feat[0, 1, 3, 5], feat[1, 2, 2, 3], feat[2, 0].mean(), -feat[3, 3, 0, 6]]
    torch.testing.assert_close(r.values, torch.stack(expected))


def test_ranges_are_inclusive_and_negative_indices_are_refused():
    assert [o.spec for o in parse_objective("channel:t:0-63")][-1] == "channel:t:63"
    assert len(parse_objective("channel:t:0-63")) == 64
    with pytest.raises(ConfigError, match="'-1' is not an index"):
        parse_objective("channel:t:-1")
    with pytest.raises(ConfigError, match="range '5-2' is empty"):
        parse_objective("neuron:t:5-2")
    with pytest.raises(ConfigError, match=r"channel -1 is out of range 0\.\.3"):
        render(_OneByOne(), [channel("feat", -1)], preprocess=GREY_UNIT, config=RenderConfig(steps=1, **STILL))


def test_the_value_of_a_composed_objective_is_the_composition_of_its_parts():
    (o,) = parse_objective("2*class:1+-0.5*channel:feat:0+-neuron:feat:3:1:2")
    model = _OneByOne()
    r = render(model, [o], preprocess=GREY_UNIT, config=RenderConfig(steps=3, param="pixel", **STILL))
    saved = as_saved(r.images)
    feat, logits = model.feat(saved).detach(), model(saved).detach()
    expected = 2 * logits[0, 1] - 0.5 * feat[0, 0].mean() - feat[0, 3, 1, 2]
    torch.testing.assert_close(r.values[0], expected)


# ---- regularizers ------------------------------------------------------------------------------------


def test_configured_regularizers_penalise_with_the_documented_sign_and_scale():
    """The first step's loss is -objective + the weighted penalties of the start image, per image."""
    model = _OneByOne()
    init = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    cfg = RenderConfig(steps=1, param="pixel", l2=0.3, tv=0.2, freq=0.1, **STILL)
    objectives = [class_logit(0), channel("feat", 2)]
    r = render(model, objectives, preprocess=GREY_UNIT, config=cfg, init=init)
    start = pixel_image((5, 7), generators=[torch.Generator()] * 2, init=init).image_fn().detach()
    acts = Activations(model(start).detach(), {"feat": model.feat(start).detach()}, start)
    penalty = 0.3 * l2()(acts) + 0.2 * total_variation()(acts) + 0.1 * frequency_penalty()(acts)
    assert (penalty > 0).all()
    expected = torch.stack([o(acts.rows(i, i + 1))[0] for i, o in enumerate(objectives)]) + penalty
    torch.testing.assert_close(r.losses[0], expected)


@pytest.mark.parametrize("reg", [l2, total_variation, frequency_penalty])
def test_an_image_penalty_is_zero_on_grey_and_does_not_depend_on_the_other_images(reg):
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 6, 5, generator=g)
    images[1] = 0.5
    acts = Activations(torch.zeros(3, 2), {}, images)
    before = reg()(acts)
    assert before[1] == 0 and (before[[0, 2]] > 0).all()
    images2 = images.clone()
    images2[2] = torch.rand(3, 6, 5, generator=g)
    after = reg()(Activations(torch.zeros(3, 2), {}, images2))
    assert torch.equal(after[:2], before[:2])


def test_diversity_of_identical_copies_is_one_and_is_added_as_a_penalty():
    model = _OneByOne()
    init = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(3)) * 0.8 + 0.1
    cfg = RenderConfig(steps=2, param="pixel", copies=2, diversity=0.7, diversity_tap="feat", lr=0.05, **STILL)
    r = render(model, [class_logit(0)], preprocess=GREY_UNIT, config=cfg, init=init)
    start = pixel_image((5, 7), generators=[torch.Generator()], init=init).image_fn().detach()
    logit = model(start)[0, 0].detach()
    torch.testing.assert_close(r.losses[0], (-logit + 0.7).expand(2))  # cosine similarity 1 to the other copy
    taps = {"feat": torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(4))}
    acts = Activations(torch.zeros(4, 2), taps, torch.zeros(4, 3, 2, 2))
    sims = diversity("feat")(acts)
    assert ((sims > -1) & (sims < 1)).all()


# ---- parameterizations -------------------------------------------------------------------------------


def test_fourier_colour_mixing_uses_the_published_matrix_column_by_column():
    """A constant in decorrelated channel k becomes colour column k of sqrt(cov) (luminance for k = 0)."""
    size = (6, 5)
    p = fourier_image(size, generators=[torch.Generator()], sd=0.0)
    for k in range(3):
        with torch.no_grad():
            p.params[0].zero_()
            p.params[0][0, k, 0, 0, 0] = 1.0  # the DC coefficient of channel k
        pre_sigmoid = torch.logit(p.image_fn().detach()[0])  # (3, H, W), constant per channel
        assert torch.allclose(pre_sigmoid, pre_sigmoid[:, :1, :1], atol=1e-5)
        colour = pre_sigmoid[:, 0, 0]
        column = COLOR_SQRT_COV[:, k]
        torch.testing.assert_close(colour / colour.norm(), column / column.norm(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(7, 5), (5, 8), (9, 9), (1, 4)])
def test_fourier_images_are_in_range_of_the_right_shape_and_start_from_given_images(size):
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    loud = fourier_image(size, generators=gens, sd=5.0).image_fn()
    assert loud.shape == (2, 3, *size) and 0 <= loud.min() and loud.max() <= 1
    init = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(5)) * 0.9 + 0.05
    again = fourier_image(size, generators=gens, init=init).image_fn()
    torch.testing.assert_close(again, init, atol=1e-5, rtol=0)


def test_odd_non_square_renders_with_every_transform_keep_the_input_size():
    pre = Preprocess(input_size=(9, 13), mean=(0.5,) * 3, std=(0.25,) * 3)
    cfg = RenderConfig(steps=2, pad=2, jitter=2, scale=0.1, rotate=10.0, device="cpu", blur_every=1)
    r = render(_Linear((9, 13)), [class_logit(0), class_logit(2)], preprocess=pre, config=cfg)
    assert r.images.shape == (2, 3, 9, 13) and r.images.isfinite().all()


# ---- batches, outputs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    source = resolve_model("demo")
    return source.module, source.preprocess.replace(input_size=(32, 28))


def test_copies_with_diversity_and_blur_equal_their_single_runs_under_exact(demo):
    model, pre = demo
    objectives = parse_objectives(["class:0", "layer:features", "channel:features:3"])
    kw = dict(steps=4, device="cpu", exact=True, copies=2, diversity=0.5, blur_every=2)
    batch = render(model, objectives, preprocess=pre, config=RenderConfig(seed=3, batch_size=4, **kw))
    for j, o in enumerate(objectives):
        single = render(model, [o], preprocess=pre, config=RenderConfig(seed=3 + 2 * j, batch_size=2, **kw))
        assert torch.equal(single.images, batch.images[2 * j: 2 * j + 2]), o.spec
        assert torch.equal(single.losses, batch.losses[:, 2 * j: 2 * j + 2]), o.spec


def _png(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255.0


def test_target_prob_and_value_are_those_of_the_saved_png(demo, tmp_path):
    """Pixel renders are sensitive: rounding to 8 bits moves their probability unless measured after it."""
    model, pre = demo
    objectives = parse_objectives(["class:0-4", "prob:1"])
    r = render(model, objectives, preprocess=pre, config=RenderConfig(steps=24, param="pixel", device="cpu"))
    rows = write_outputs(tmp_path, r)
    table = pq.read_table(tmp_path / "results.parquet").to_pandas()
    assert table["image"].tolist() == [row["image"] for row in rows]
    saved = torch.stack([_png(tmp_path / name) for name in table["image"]])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    with torch.no_grad():
        logits = model((saved - mean) / std)
    targets = torch.tensor(table["target"].tolist())
    probs = logits.softmax(-1)[torch.arange(6), targets]
    np.testing.assert_allclose(table["target_prob"], probs.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(table["value"][:5], logits[torch.arange(5), targets[:5]].numpy(), rtol=0, atol=1e-5)
    assert torch.equal(saved, as_saved(r.images))  # the PNGs round as the measurement did
    assert table["spec"].tolist() == [o.spec for o in objectives]


def test_grid_tiles_and_table_rows_follow_the_objectives_order(tmp_path):
    objectives = parse_objectives(["neuron:feat:0:0:0", "neuron:feat:1:4:6", "channel:feat:2"])
    cfg = RenderConfig(steps=5, lr=0.2, param="pixel", init_sd=0.0, **STILL)
    r = render(_OneByOne(), objectives, preprocess=GREY_UNIT, config=cfg)
    rows = write_outputs(tmp_path, r, columns=2)
    grid = np.array(Image.open(tmp_path / "grid.png").convert("RGB"))
    pad, (h, w) = 2, GREY_UNIT.input_size
    caption = (grid.shape[0] - 3 * pad) // 2 - h
    for i, row in enumerate(rows):
        assert row["spec"] == objectives[i].spec and row["index"] == i
        tile_row, col = divmod(i, 2)
        y, x = pad + tile_row * (h + caption + pad), pad + col * (w + pad)
        tile = grid[y: y + h, x: x + w]
        assert np.array_equal(tile, np.array(Image.open(tmp_path / row["image"]))), row["spec"]
    assert _png(tmp_path / rows[1]["image"])[1, 4, 6] > 0.6  # the image of neuron 1 at (4, 6)


# ---- the spec language ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0.1234567, 1e20, -1e-5, 1 / 3, 2.0])
def test_weighted_specs_read_back_to_the_same_weight(weight):
    o = weight * class_logit(3) + 0.1 * l2()
    (back,) = parse_objective(o.spec)
    assert back.spec == o.spec and back.terms[0][0] == weight


def test_bad_weights_and_empty_fields_are_named():
    assert parse_objective("5.*class:1")[0].terms[0][0] == 5.0
    with pytest.raises(ConfigError, match="weight 'abc' is not a number"):
        parse_objective("abc*class:1")
    with pytest.raises(ConfigError, match="field 2 after the kind is empty"):
        parse_objective("channel:t:")
    with pytest.raises(ConfigError, match="field 1 after the kind is empty"):
        parse_objective("channel::3")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("abc*class:1", "weight 'abc' is not a number"),
        ("channel:features:", "field 2 after the kind is empty"),
        ("channel:nosuch:3", "unknown tap 'nosuch'"),
        ("channel:features:999", "channel 999 is out of range"),
        ("neuron:features:3-1", "range '3-1' is empty"),
    ],
)
def test_cli_refuses_bad_objectives_before_writing_anything(tmp_path, capsys, monkeypatch, spec, message):
    from conftest import run_cli

    monkeypatch.setenv("CAMSHAFT_NO_REEXEC", "1")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "actmax", "demo", f"--objective={spec}", "--out", out, "--steps", "1",
                           "--input-size", "32", "--no-progress", "--device", "cpu")
    assert code != 0 and message in err and not out.exists()


def test_transforms_are_seeded_so_a_rerun_repeats_and_another_seed_differs():
    pre = Preprocess(input_size=(9, 11), mean=(0.5,) * 3, std=(0.25,) * 3)
    kw = dict(steps=3, pad=2, jitter=2, scale=0.1, rotate=10.0, device="cpu", exact=False)
    runs = [render(_Linear((9, 11)), [class_logit(0)], preprocess=pre, config=RenderConfig(seed=s, **kw))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0].images, runs[1].images) and torch.equal(runs[0].losses, runs[1].losses)
    assert not torch.equal(runs[0].images, runs[2].images)
