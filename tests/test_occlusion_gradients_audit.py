"""Audit of occlusion and the input-gradient family: closed forms, captum, uneven grids, option checks.

What tests/test_occlusion.py and tests/test_gradient_family.py already hold is not repeated: here,
grids that do not tile the input (224 px with 32/24 windows, 7x5 images), strides longer than the
window, a nonlinear closed form for integrated gradients and for SmoothGrad (which fixes the space
and scale of its noise), completeness from non-zero baselines, and options refused rather than
rounded before any work.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import fixed, open_backend, randn, source_of
from torch import nn

from camshaft.engine.job import ExplainJob
from camshaft.engine.methods import get_method
from camshaft.engine.methods.input_gradients import baseline_for
from camshaft.engine.occlusion import Grid
from camshaft.errors import ConfigError

OCCLUSION = get_method("occlusion")




class ReluNet(nn.Module):
    """Two convs sharing one in-place ReLU module (called twice), max-pool, GAP, linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.relu, self.pool, self.fc = nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.relu(self.c2(self.pool(self.relu(self.c1(x))))).mean((2, 3)))


class Quadratic(nn.Module):
    """logit_n = sum_{c,i,j} W[n,c,i,j] x[c,i,j]^2: its input gradient 2 W x is linear in x."""

    def __init__(self, size):
        super().__init__()
        self.w = nn.Parameter(randn(4, 3, *size, seed=11))

    def forward(self, x):
        return (self.w[None] * x[:, None] ** 2).flatten(2).sum(-1)


class Smooth(nn.Module):
    """conv -> tanh -> GAP -> linear: smooth, so a fine Riemann sum converges to the integral."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


# --- occlusion: layouts that do not tile the input -------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "window", "stride"),
    [((224, 224), (32, 32), (24, 24)), ((30, 30), (8, 8), (6, 6)), ((7, 5), (3, 2), (2, 1)), ((7, 5), (7, 5), (1, 1)),
     ((13, 11), (5, 3), (4, 3))],
)
def test_every_pixel_is_covered_and_written_maps_match_captum(size, window, stride, tmp_path):
    """The per-pixel map explain() writes is captum's Occlusion attribution, also where windows overhang."""
    captum = pytest.importorskip("captum.attr")
    grid = Grid(size=size, window=window, stride=stride)
    assert bool(grid.masks(torch.arange(grid.count)).any(0).all())  # edges included
    model = ReluNet().eval()
    backend = open_backend("eager", source_of(model, size=size), tmp_path)
    images = 1 if size[0] > 100 else 2  # (time)
    x = randn(images, 3, *size, seed=1)
    targets = torch.tensor([[0, 3], [2, 1]])[:images]
    maps, _ = OCCLUSION.explain(backend, x, fixed(targets), tap=None, options=dict(window=window, stride=stride))
    th, tw = size[0] // maps.shape[-2], size[1] // maps.shape[-1]
    pixels = maps.repeat_interleave(th, 2).repeat_interleave(tw, 3)  # (B, K, H, W)
    with torch.no_grad():
        ref = torch.stack(
            [
                captum.Occlusion(model).attribute(
                    x, sliding_window_shapes=(3, *window), strides=(3, *stride), baselines=0.0, target=targets[:, k],
                    perturbations_per_eval=64,
                )[:, 0]
                for k in range(2)
            ],
            1,
        )
    assert pixels.isfinite().all()
    torch.testing.assert_close(pixels, ref, rtol=1e-4, atol=1e-6)


def test_incremental_equals_plain_on_a_non_square_input_with_a_full_axis_window(tmp_path):
    backend = open_backend("eager", source_of(ReluNet().eval(), size=(13, 11)), tmp_path)
    x = randn(2, 3, 13, 11, seed=2)
    for window, stride in [((5, 3), (4, 2)), ((13, 4), (1, 3))]:  # cut border windows; a window the full height
        opts = dict(window=window, stride=stride, fill="blur", positions_per_forward=5)
        plain, _ = OCCLUSION.run(backend, x, fixed([[0, 1], [3, 2]]), tap=None, options=opts)
        fast, _ = OCCLUSION.run(
            backend, x, fixed([[0, 1], [3, 2]]), tap=None, options={**opts, "occlusion_mode": "incremental"}
        )
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-6)


def test_a_stride_longer_than_the_window_is_refused_before_any_work():
    """Windows 8 apart by 12 leave pixels no window covers: their per-pixel mean was 0/0 = NaN in the written
    map, and the last window started past the border (an empty occlusion). captum refuses it too."""
    with pytest.raises(ConfigError, match="stride 12,12 is longer than the window 8,8"):
        Grid(size=(32, 32), window=(8, 8), stride=(12, 12))
    Grid(size=(8, 32), window=(8, 8), stride=(12, 8))  # one position along an axis the window fills: no gap
    with pytest.raises(ConfigError, match="stride 4,12 is longer than the window 8,8"):
        OCCLUSION.resolve_options({"window": 8, "stride": "4,12"})
    with pytest.raises(ConfigError, match="invalid explain job: .*stride 40,40 is longer than the window 32,32"):
        ExplainJob(None, Path("data"), Path("out"), method="occlusion", options={"stride": 40})  # default window 32
    assert OCCLUSION.resolve_options({"window": 8, "stride": 8})["stride"] == (8, 8)


# --- integrated gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", ["zero", "0.7", "blur"])
def test_integrated_gradients_of_a_quadratic_is_exact_with_the_midpoint_rule(baseline, tmp_path):
    """IG_i = (x_i - x'_i) * int_0^1 2 W_i (x'_i + a (x_i - x'_i)) da = W_i (x_i^2 - x'_i^2): the integrand is
    linear in a, so the midpoint rule is exact for any number of steps."""
    model = Quadratic((6, 5))
    backend = open_backend("eager", source_of(model, size=(6, 5)), tmp_path)
    x = randn(2, 3, 6, 5, seed=4)
    targets = torch.tensor([[0, 3], [2, 1]])
    method = get_method("integrated_gradients")
    maps, _ = method.run(backend, x, fixed(targets), tap=None, options={"steps": 3, "baseline": baseline})
    xb = baseline_for(x, method.resolve_options({"baseline": baseline})["baseline"])
    with torch.no_grad():
        per_class = (model.w[None] * (x[:, None] ** 2 - xb[:, None] ** 2)).sum(2)  # (B, N, H, W)
    expected = per_class.gather(1, targets[..., None, None].expand(-1, -1, 6, 5))
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("baseline", ["blur", "-0.5"])
def test_integrated_gradients_completeness_from_non_zero_baselines(baseline, tmp_path):
    model = Smooth().eval()
    backend = open_backend("eager", source_of(model, size=(12, 10)), tmp_path)
    x = randn(2, 3, 12, 10, seed=5)
    method = get_method("integrated_gradients")
    maps, out = method.run(backend, x, fixed([[1, 2], [0, 3]]), tap=None, options={"steps": 64, "baseline": baseline})
    xb = baseline_for(x, method.resolve_options({"baseline": baseline})["baseline"])
    with torch.no_grad():
        delta = model(x).gather(1, out.targets) - model(xb).gather(1, out.targets)
    assert delta.abs().min() > 1e-3  # the check means something
    torch.testing.assert_close(maps.sum((-2, -1)), delta, rtol=1e-3, atol=1e-5)


# --- SmoothGrad ----------------------------------------------------------------------------------------


def test_smoothgrad_closed_form_fixes_the_noise_space_scale_and_seed(tmp_path):
    """grad = 2 W (x + s n): the map is mean_n max_c |2 W_c (x_c + s n_c)|, where the noise n is drawn once for
    the batch from the seed and s = noise * (max - min of the image in the model's input space)."""
    model = Quadratic((6, 5))
    backend = open_backend("eager", source_of(model, size=(6, 5)), tmp_path)
    x = torch.stack([randn(3, 6, 5, seed=6), 3 * randn(3, 6, 5, seed=7) + 1])  # different ranges
    targets = torch.tensor([[1], [2]])
    opts = {"samples": 5, "noise": 0.2, "seed": 9, "samples_per_forward": 3}
    maps, _ = get_method("smoothgrad").run(backend, x, fixed(targets), tap=None, options=opts)
    noise = torch.randn((5, 3, 6, 5), generator=torch.Generator().manual_seed(9))
    spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(2, 1, 1, 1, 1)
    noisy = x[:, None] + 0.2 * spread * noise[None]  # (B, S, 3, H, W)
    with torch.no_grad():
        grads = 2 * model.w[targets[:, 0]][:, None] * noisy  # (B, S, 3, H, W)
    expected = grads.abs().amax(2).mean(1)[:, None]  # (B, 1, H, W)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-5)
    again, _ = get_method("smoothgrad").run(backend, x, fixed(targets), tap=None, options=opts)
    other, _ = get_method("smoothgrad").run(backend, x, fixed(targets), tap=None, options={**opts, "seed": 10})
    assert torch.equal(again, maps) and not torch.allclose(other, maps)


# --- guided backpropagation ------------------------------------------------------------------------------


def test_guided_backprop_through_a_reused_in_place_relu_matches_captum(tmp_path):
    captum = pytest.importorskip("captum.attr")
    model = ReluNet().eval()
    backend = open_backend("eager", source_of(model, size=(10, 9)), tmp_path)
    x = randn(2, 3, 10, 9, seed=8)
    targets = torch.tensor([[0, 3], [2, 1]])
    maps, _ = get_method("guided_backprop").run(backend, x, fixed(targets), tap=None)
    ref = torch.stack([captum.GuidedBackprop(model).attribute(x, target=targets[:, k]) for k in range(2)], 1)
    torch.testing.assert_close(maps, ref.abs().amax(2), rtol=1e-5, atol=1e-8)
    assert not model.relu._forward_hooks


# --- options: refused, not rounded, before any work ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("integrated_gradients", {"steps": 2.5}, "steps: expected a positive integer, received 2.5"),
        ("integrated_gradients", {"steps": 0}, "steps: expected a positive integer"),
        ("integrated_gradients", {"baseline": "nan"}, "baseline must be zero, blur or a finite number"),
        ("integrated_gradients", {"baseline": float("inf")}, "baseline must be zero, blur or a finite number"),
        ("smoothgrad", {"noise": "inf"}, "noise: expected a finite number >= 0"),
        ("smoothgrad", {"noise": -0.1}, "noise: expected a finite number >= 0"),
        ("smoothgrad", {"seed": 1.5}, "seed: expected an integer seed"),
        ("smoothgrad", {"seed": 2**64}, "seed: expected an integer seed"),
        ("smoothgrad", {"samples_per_forward": True}, "samples_per_forward: expected a positive integer"),
        ("occlusion", {"fill": "nan"}, "fill must be zero, mean, blur or a number"),
        ("occlusion", {"fill": float("-inf")}, "fill must be zero, mean, blur or a number"),
        ("occlusion", {"window": 2.5}, r"window: expected N or N,M \(height,width\) positive pixel counts"),
        ("occlusion", {"positions_per_forward": True}, "positions_per_forward: expected a positive integer"),
        ("occlusion", {"stride": 0}, "stride: expected N or N,M"),
    ],
)
def test_bad_options_are_refused_with_their_fix(method, options, message):
    with pytest.raises(ConfigError, match=message):
        get_method(method).resolve_options(options)


def test_good_options_parse_from_text_and_numbers():
    ig = get_method("integrated_gradients").resolve_options({"steps": "8", "baseline": "-0.25"})
    assert ig["steps"] == 8 and ig["baseline"] == -0.25
    sg = get_method("smoothgrad").resolve_options({"samples": 4.0, "noise": "0", "seed": "-3"})
    assert (sg["samples"], sg["noise"], sg["seed"]) == (4, 0.0, -3)
    occ = OCCLUSION.resolve_options({"window": "6,4", "fill": 1, "positions_per_forward": "9"})
    assert occ["window"] == (6, 4) and occ["fill"] == 1.0 and occ["positions_per_forward"] == 9
