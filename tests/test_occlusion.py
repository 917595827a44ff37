"""Occlusion against closed forms, captum, and its invariances (batching, backends, modes)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from conftest import fixed, open_backend, randn, source_of
from torch import nn

import camshaft
from camshaft.engine.methods import get_method
from camshaft.engine.methods.occlusion import OcclusionSettings, parse_fill, parse_pair
from camshaft.engine.occlusion import Grid, fill_values, gaussian_blur, plain_evaluator
from camshaft.engine.occlusion.incremental import IncrementalModel, fold_batch_norms, incremental_evaluator, trace
from camshaft.engine.occlusion import incremental
from camshaft.engine.occlusion.refine import coarse_to_fine
from camshaft.engine.occlusion.regions import Region, boxes_of, plan_read, read, source
from camshaft.engine.occlusion.sweep import full_sweep, target_scores
from camshaft.engine.occlusion.windows import border_batches
from camshaft.errors import CapabilityError, ConfigError

OCCLUSION = get_method("occlusion")




class Linear(nn.Module):
    """1x1 conv + GAP + linear, no nonlinearity: logits = A @ mean_pixels(x) + bias with A = W_fc W_conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))

    def closed_form_drops(self, x, fill, grid):
        """Drop of every class per window, by hand: A @ sum over the window of (x - fill) / (H W)."""
        a = self.fc.weight @ self.conv.weight.view(4, 3)  # (N, 3)
        fill = fill.expand_as(x)
        rows, cols = grid.shape
        out = torch.zeros(x.shape[0], a.shape[0], rows, cols)
        for i in range(rows):
            for j in range(cols):
                y0, x0 = i * grid.stride[0], j * grid.stride[1]
                d = (x - fill)[:, :, y0 : y0 + grid.window[0], x0 : x0 + grid.window[1]].sum(dim=(2, 3))  # (B, 3)
                out[:, :, i, j] = d @ a.T / (x.shape[2] * x.shape[3])
        return out


class HalfBlind(nn.Module):
    """Reads only the left half of the image.

    The head is an explicit per-image product rather than ``nn.Linear``: matrix-multiply kernels
    differ with the batch size (by ~1e-7), and "changes nothing" is checked bit for bit.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        left = x[:, :, :, : x.shape[3] // 2]
        features = torch.relu(self.conv(left)).mean(dim=(2, 3))  # (B, 6)
        return (features[:, None, :] * self.head).sum(-1)


class Chain(nn.Module):
    """conv/bn/relu/pool chain with a residual block, strides, dilation, groups and ceil-mode pools."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 1))
        self.skip = nn.Conv2d(8, 8, 1, stride=2)
        self.tail = nn.Sequential(
            nn.AvgPool2d(2, 1, 1), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True)
        )
        self.fc = nn.Linear(8, 5)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x):
        a = self.stem(x)
        b = torch.relu(self.body(a) + self.skip(a))
        return self.fc(torch.flatten(self.tail(b).mean(dim=(2, 3), keepdim=True), 1))


def run(backend, x, targets, **options):
    return OCCLUSION.run(backend, x, fixed(targets), tap=None, options=options)[0]


def test_grid_layout_follows_captum():
    grid = Grid(size=(10, 16), window=(4, 6), stride=(4, 4))
    assert grid.shape == (math.ceil(6 / 4) + 1, math.ceil(10 / 4) + 1) == (3, 4)
    top, left, bottom, right = grid.boxes(torch.tensor([0, 11]))
    assert (top.tolist(), left.tolist(), bottom.tolist(), right.tolist()) == ([0, 8], [0, 12], [4, 10], [6, 16])
    masks = grid.masks(torch.arange(grid.count))
    assert masks.shape == (12, 1, 10, 16) and bool(masks.any(0).all())  # every pixel is covered


@pytest.mark.parametrize("mode", ["plain", "incremental"])
def test_a_region_the_model_cannot_see_changes_nothing(mode, tmp_path):
    backend = open_backend("eager", source_of(HalfBlind(), size=(16, 16)), tmp_path)
    x = randn(2, 3, 16, 16, seed=0)
    maps = run(backend, x, [[0, 3], [1, 2]], window=(4, 4), stride=(2, 2), occlusion_mode=mode)
    grid = Grid(size=(16, 16), window=(4, 4), stride=(2, 2))
    _, left, _, _ = grid.boxes(torch.arange(grid.count))
    blind = (left >= 8).view(grid.shape)
    assert torch.equal(maps[..., blind], torch.zeros_like(maps[..., blind]))
    assert maps[..., ~blind].abs().amin(-1).gt(0).all()  # the seen half does matter


@pytest.mark.parametrize("fill", ["zero", 0.5, "mean", "blur"])
def test_linear_model_equals_its_closed_form(fill, tmp_path):
    model = Linear()
    backend = open_backend("eager", source_of(model, size=(12, 12)), tmp_path)
    x = randn(2, 3, 12, 12, seed=1)
    maps = run(backend, x, [[0, 1, 2, 3, 4]] * 2, window=(4, 4), stride=(4, 4), fill=fill)
    grid = Grid(size=(12, 12), window=(4, 4), stride=(4, 4))
    expected = model.closed_form_drops(x, fill_values(x, parse_fill(fill), window=(4, 4)), grid)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)


def test_prob_score_is_the_drop_of_the_softmax(tmp_path):
    model = Linear()
    backend = open_backend("eager", source_of(model, size=(12, 12)), tmp_path)
    x = randn(1, 3, 12, 12, seed=2)
    maps = run(backend, x, [[3, 0]], window=(6, 6), stride=(3, 3), score="prob")
    grid = Grid(size=(12, 12), window=(6, 6), stride=(3, 3))
    logits = model(x)  # (1, N)
    occluded = logits[:, :, None, None] - model.closed_form_drops(x, torch.zeros(1, 1, 1, 1), grid)  # (1, N, r, c)
    p, q = torch.softmax(logits, 1), torch.softmax(occluded, 1)
    expected = torch.stack([p[:, t, None, None] - q[:, t] for t in (3, 0)], 1)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-7)


def test_blur_fill_known_answers():
    flat = torch.full((1, 3, 9, 11), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, sigma=(2.0, 1.0)), flat)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1.0
    g = torch.exp(-0.5 * (torch.arange(-6, 7.0) / 2.0) ** 2)
    expected = torch.zeros(21, 21)
    expected[4:17, 4:17] = torch.outer(g / g.sum(), g / g.sum())
    torch.testing.assert_close(gaussian_blur(impulse, sigma=(2.0, 2.0))[0, 0], expected)


def _chain_backend(tmp_path, name="eager", size=24):
    return open_backend(name, source_of(Chain(), size=(size, size)), tmp_path)


def test_same_result_for_every_batching(tmp_path):
    backend = _chain_backend(tmp_path)
    x = randn(3, 3, 24, 24, seed=3)
    targets = [[0, 1], [2, 3], [4, 0]]
    opts = dict(window=(8, 8), stride=(6, 6), fill="mean")
    count = Grid(size=(24, 24), window=(8, 8), stride=(6, 6)).count
    ref = run(backend, x, targets, positions_per_forward=3 * count, **opts)
    assert ref.shape == (3, 2, 4, 4)
    for ppf in (1, 7):
        torch.testing.assert_close(run(backend, x, targets, positions_per_forward=ppf, **opts), ref, rtol=1e-4, atol=1e-5)
    one_by_one = torch.cat([run(backend, x[i : i + 1], targets[i : i + 1], **opts) for i in range(3)])
    torch.testing.assert_close(one_by_one, ref, rtol=1e-4, atol=1e-5)
    for k in range(2):  # K targets at once = one target at a time
        single = run(backend, x, [[t[k]] for t in targets], **opts)
        torch.testing.assert_close(single, ref[:, k : k + 1], rtol=1e-4, atol=1e-5)
    for ppf in (2, 5, 64):  # incremental: each image in batches of positions near the same edges
        fast = run(backend, x, targets, positions_per_forward=ppf, occlusion_mode="incremental", **opts)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(13, 13), (5, 7), (2, 3), (1, 1)])
def test_border_batches_hold_every_position_once_grouped_by_edge(shape):
    (rows, cols), ppf = shape, 16
    grid = Grid(size=(rows * 4 + 4, cols * 4 + 4), window=(8, 8), stride=(4, 4))
    assert grid.shape == shape
    batches = border_batches(grid, ppf)
    assert sorted(torch.cat(batches).tolist()) == list(range(grid.count))
    assert all(0 < len(b) <= ppf for b in batches)

    def edges(p):
        r, c, mr, mc = p // cols, p % cols, max(1, rows // 6), max(1, cols // 6)
        return (r < mr or r >= rows - mr or 2 * mr >= rows, c < mc or c >= cols - mc or 2 * mc >= cols)

    assert all(len({edges(p) for p in b.tolist()}) == 1 for b in batches)  # one kind of window per batch
    if shape == (13, 13):  # 16 near corners, 36 near the top or bottom, 36 near the sides, 81 inside
        assert [len(b) for b in batches] == [16, 12, 12, 12, 12, 12, 12, 14, 14, 14, 13, 13, 13]


def test_inputs_are_left_unchanged(tmp_path):
    backend = _chain_backend(tmp_path)
    x = randn(2, 3, 24, 24, seed=4)
    before = x.clone()
    for mode in ("plain", "incremental", "coarse-to-fine"):
        run(backend, x, [[0], [1]], window=(8, 8), fill="blur", occlusion_mode=mode)
    assert torch.equal(x, before)


def test_backends_agree_and_incremental_needs_eager(tmp_path):
    x = randn(2, 3, 16, 16, seed=5)
    opts = dict(window=(5, 7), stride=(3, 4), fill=-0.5, score="prob")
    maps = {}
    for name in ("eager", "torchscript", "onnxruntime"):
        backend = _chain_backend(tmp_path / name, name, size=16)
        maps[name] = run(backend, x, [[1, 2], [3, 4]], **opts)
        if name != "eager":
            with pytest.raises(CapabilityError, match="eager"):
                run(backend, x, [[1], [2]], occlusion_mode="incremental", **opts)
    torch.testing.assert_close(maps["torchscript"], maps["eager"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(maps["onnxruntime"], maps["eager"], rtol=1e-4, atol=1e-6)


def _captum(model, x, targets, *, window, stride, baselines=0.0, softmax=False):
    from captum.attr import Occlusion

    forward = (lambda v: torch.softmax(model(v), 1)) if softmax else model
    occ = Occlusion(forward)
    return torch.stack(
        [
            occ.attribute(
                x, sliding_window_shapes=(3, *window), strides=(3, *stride), baselines=baselines,
                target=t.tolist(), perturbations_per_eval=32,
            )
            for t in targets.T
        ],
        1,
    )  # (B, K, 3, H, W)


def _per_pixel(maps, grid):
    """captum's per-pixel attribution from a map: mean drop of the windows covering each pixel."""
    masks = grid.masks(torch.arange(grid.count)).squeeze(1).float()  # (N, H, W)
    return torch.einsum("bkn,nhw->bkhw", maps.flatten(2), masks) / masks.sum(0)


@pytest.mark.parametrize(
    ("window", "stride", "fill", "score"),
    [((4, 4), (4, 4), "zero", "logit"), ((6, 5), (4, 3), "zero", "prob"), ((5, 5), (3, 3), "blur", "logit")],
)
def test_agrees_with_captum(window, stride, fill, score, tmp_path):
    model = Chain()
    backend = open_backend("eager", source_of(model, size=(16, 16)), tmp_path)
    x = randn(2, 3, 16, 16, seed=6)
    targets = torch.tensor([[0, 3], [2, 1]])
    maps = OCCLUSION.run(backend, x, fixed(targets), tap=None, options=dict(window=window, stride=stride, fill=fill, score=score))[0]
    baselines = gaussian_blur(x, sigma=(window[0] / 4, window[1] / 4)) if fill == "blur" else 0.0
    with torch.no_grad():
        ref = _captum(model, x, targets, window=window, stride=stride, baselines=baselines, softmax=score == "prob")
    assert torch.equal(ref[:, :, 0], ref[:, :, 2])
    grid = Grid(size=(16, 16), window=window, stride=stride)
    if window == stride:  # non-overlapping windows: each pixel's attribution is its window's drop
        torch.testing.assert_close(ref[:, :, 0, :: window[0], :: window[1]], maps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(_per_pixel(maps, grid), ref[:, :, 0], rtol=1e-4, atol=1e-6)


def _sweep(model_or_forward, x, grid, targets, *, incremental=None, per_forward=16):
    fill = fill_values(x, 0.25, window=grid.window)
    if incremental is not None:
        evaluate = incremental_evaluator(incremental, x, fill, grid)
    else:
        evaluate = plain_evaluator(model_or_forward, x, fill, grid)
    with torch.no_grad():
        base = target_scores(model_or_forward(x), targets, "logit")
    return full_sweep(evaluate, batch=x.shape[0], grid=grid, base=base, targets=targets, score="logit", per_forward=per_forward)


@pytest.mark.parametrize("full_fraction", [0.8, 1.01])
def test_incremental_equals_plain_on_a_chain(full_fraction):
    model = Chain()
    x = randn(2, 3, 32, 32, seed=7)
    grid = Grid(size=(32, 32), window=(7, 7), stride=(5, 5))  # last windows cut at the border
    targets = torch.tensor([[0, 1], [2, 4]])
    incremental = IncrementalModel(model, full_fraction=full_fraction)
    plain = _sweep(model, x, grid, targets)
    fast = _sweep(model, x, grid, targets, incremental=incremental, per_forward=13)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert {"stem_0", "stem_3", "body_0", "skip", "add"} <= set(incremental.last_regions)  # boxes, not full maps


def _read_by_hand(r, top, left, size, pad, value):
    """``read`` one variant at a time: the full map with the crop pasted, padded, then the box cut out."""
    out = []
    for v in range(r.crop.shape[0]):
        full = r.base[0].clone()
        t, le = int(r.top[v]), int(r.left[v])
        full[:, t : t + r.box[0], le : le + r.box[1]] = r.crop[v]
        padded = torch.nn.functional.pad(full, (pad[2], pad[3], pad[0], pad[1]), value=value)
        out.append(padded[:, int(top[v]) : int(top[v]) + size[0], int(left[v]) : int(left[v]) + size[1]])
    return torch.stack(out)


@pytest.mark.parametrize("case", ["inside", "overlapping", "disjoint", "own"])
def test_read_pastes_each_crop_over_its_base(case):
    """Boxes read from the cached map with each variant's crop pasted in, wherever the two lie."""
    c, (mh, mw), (ch, cw), p = 5, (12, 11), (4, 3), 9
    base = randn(1, c, mh, mw, seed=1)
    crop = randn(p, c, ch, cw, seed=2).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(3)
    draw = lambda high: torch.randint(0, high, (p,), generator=gen)  # noqa: E731
    r = Region(crop, draw(mh - ch + 1), draw(mw - cw + 1), base)
    pad, size = (1, 2, 2, 1), (6, 5)
    if case == "inside":  # every crop within its box (its corner at a different offset per variant)
        top, left = r.top + pad[0] - draw(3), r.left + pad[2] - draw(3)
    elif case == "overlapping":  # boxes cut through the crops
        top, left = r.top + pad[0] + 2, r.left + pad[2] - 3
    elif case == "disjoint":
        top, left = torch.zeros(p, dtype=torch.long), torch.zeros(p, dtype=torch.long)
        r = Region(crop, torch.full((p,), mh - ch), torch.full((p,), mw - cw), base)
    else:
        pad, size, top, left = (0, 0, 0, 0), (ch, cw), r.top, r.left
    hp, wp = mh + pad[0] + pad[1], mw + pad[2] + pad[3]
    top, left = top.clamp(0, hp - size[0]), left.clamp(0, wp - size[1])
    got = read(r, top, left, size, source(base, pad, -1.5), pad=pad)
    assert torch.equal(got, _read_by_hand(r, top, left, size, pad, -1.5))
    assert (got is crop) == (case == "own")
    if case == "overlapping":
        assert not torch.equal(got, boxes_of(source(base, pad, -1.5), top, left, size))  # crops show
    if case == "inside":  # a source that is a view, not contiguous, reads the same
        view = base[0].permute(1, 2, 0)
        assert torch.equal(boxes_of(view, r.top, r.left, r.box), boxes_of(source(base), r.top, r.left, r.box))


class SharedConv(nn.Module):
    """A conv output read by a ReLU (through an Identity) and again by an addition after it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.conv, self.ident, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.Identity(), nn.ReLU()
        self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 3)

    def forward(self, x):
        a = self.conv(x)
        b = self.relu(self.ident(a))
        return self.fc((self.conv2(b) + a).relu().mean((2, 3)))


def test_incremental_relu_in_place_only_on_crops_nobody_else_reads():
    model = SharedConv().eval()
    x = randn(1, 3, 24, 24, seed=8)
    grid = Grid(size=(24, 24), window=(5, 5), stride=(4, 4))
    targets = torch.tensor([[0, 2]])
    incremental = IncrementalModel(model, full_fraction=1.01)
    fast = _sweep(model, x, grid, targets, incremental=incremental, per_forward=9)
    torch.testing.assert_close(fast, _sweep(model, x, grid, targets), rtol=1e-4, atol=1e-5)
    assert {"conv", "relu", "add"} <= set(incremental.last_regions)


class ConvBranches(nn.Module):
    """A conv-bn pair to fold, a conv read by a bn and by a skip (not folded), a bn after a pool."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.pool, self.bn3 = nn.MaxPool2d(2), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        self.eval()

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        c = self.conv2(a)
        b = torch.relu(self.bn2(c) + c)
        return self.fc(self.bn3(self.pool(b)).mean(dim=(2, 3)))


def _bn_nodes(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)]


def test_batch_norms_fold_into_the_convolutions_before_them():
    model = ConvBranches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fold_batch_norms(model)
    assert _bn_nodes(gm) == ["bn2", "bn3"]  # bn2's conv also feeds the sum; bn3 follows a pool
    assert _bn_nodes(trace(model)) == ["bn1", "bn2", "bn3"]  # the memoised trace is left as it was
    x = randn(2, 3, 12, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())  # untouched
    model.train()
    assert _bn_nodes(fold_batch_norms(model)) == ["bn1", "bn2", "bn3"]  # batch statistics: nothing folds


def test_folding_first_under_inference_mode_serves_later_sweeps_outside_it():
    model = ConvBranches()
    with torch.inference_mode():
        fold_batch_norms(model)
    x = randn(1, 3, 12, 12, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(fold_batch_norms(model)(x), model(x), rtol=1e-5, atol=1e-6)


def test_incremental_follows_weights_changed_between_sweeps(tmp_path):
    """The folded weights are recomputed for each sweep: a model updated in place is never stale."""
    model = ConvBranches()
    backend = open_backend("eager", source_of(model, size=(16, 16)), tmp_path)
    x = randn(1, 3, 16, 16, seed=6)
    opts = dict(window=(4, 4), stride=(4, 4))
    first = run(backend, x, [[1]], occlusion_mode="incremental", **opts)
    with torch.no_grad():  # in place, even behind autograd's back
        model.bn1.running_var.mul_(4)
        model.conv1.weight.data.neg_()
    plain = run(backend, x, [[1]], **opts)
    fast = run(backend, x, [[1]], occlusion_mode="incremental", **opts)
    assert not torch.allclose(plain, first, rtol=1e-3, atol=1e-4)  # the change matters
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_incremental_equals_plain_on_resnet18(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    backend = open_backend("eager", source_of(model, size=(64, 64)), tmp_path)
    x = randn(2, 3, 64, 64, seed=8)
    opts = dict(window=(16, 16), stride=(12, 12), fill="blur", positions_per_forward=32)
    plain = run(backend, x, [[1, 4], [2, 7]], **opts)
    plans = []
    monkeypatch.setattr(incremental, "plan_read", lambda *a, **k: plans.append(1) or plan_read(*a, **k))
    first = run(backend, x[:1], [[1, 4]], occlusion_mode="incremental", **opts)
    per_image = len(plans)
    fast = run(backend, x, [[1, 4], [2, 7]], occlusion_mode="incremental", **opts)
    assert plain.shape == (2, 2, 5, 5)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(fast[:1], first, rtol=1e-4, atol=2e-5)
    assert per_image > 0 and len(plans) == 2 * per_image  # the second image reused the first's boxes and plans


def test_coarse_to_fine_is_exact_where_it_evaluates():
    model = Chain()
    x = randn(2, 3, 24, 24, seed=9)
    grid = Grid(size=(24, 24), window=(4, 4), stride=(2, 2))  # 11 x 11 cells
    targets = torch.tensor([[0], [3]])
    fill = fill_values(x, "zero", window=grid.window)
    calls = []

    def evaluate(img, pos):
        calls.append(img.numel())
        return plain_evaluator(model, x, fill, grid)(img, pos)

    with torch.no_grad():
        base = target_scores(model(x), targets, "logit")
        kw = dict(batch=2, grid=grid, base=base, targets=targets, score="logit", per_forward=50)
        exact = full_sweep(evaluate, **kw)
        calls.clear()
        assert torch.allclose(coarse_to_fine(evaluate, threshold=0.0, **kw), exact, rtol=1e-4, atol=1e-6)
        calls.clear()
        approx = coarse_to_fine(evaluate, threshold=0.9, **kw)
    assert sum(calls) < 2 * 121 / 2  # far fewer evaluations than the full sweep
    coarse = torch.tensor([0, 2, 4, 6, 8, 10])
    torch.testing.assert_close(approx[:, :, coarse][..., coarse], exact[:, :, coarse][..., coarse], rtol=1e-4, atol=1e-6)
    assert approx.isfinite().all()


def test_options_parse_and_fail_clearly(tmp_path):
    assert parse_pair("32") == (32, 32) and parse_pair("32,24") == (32, 24) and parse_pair(8) == (8, 8)
    assert parse_fill("blur") == "blur" and parse_fill("-1.5") == -1.5
    s = OcclusionSettings.from_options({"window": "10,6"})
    assert s.stride == (5, 3) and s.occlusion_mode == "plain" and s.positions_per_forward == 64
    with pytest.raises(ConfigError, match=r"window.*positive.*fill.*zero, mean, blur or a number"):
        OcclusionSettings.from_options({"window": "0", "fill": "purple"})
    with pytest.raises(ConfigError, match="occlusion mode must be one of plain, incremental, coarse-to-fine"):
        OcclusionSettings.from_options({"occlusion_mode": "fast"})
    backend = open_backend("eager", source_of(HalfBlind(), size=(16, 16)), tmp_path)
    with pytest.raises(ConfigError, match="larger than the 16x16 model input"):
        run(backend, torch.zeros(1, 3, 16, 16), [[0]], window=(20, 8))


@pytest.mark.parametrize(
    ("size", "window", "stride", "tiles"),
    [((16, 16), (4, 4), (4, 4), (4, 4)), ((16, 16), (6, 5), (4, 3), (8, 16)), ((96, 96), (40, 40), (40, 40), (12, 12)),
     ((224, 224), (32, 32), (16, 16), (14, 14)), ((10, 16), (4, 4), (3, 4), (10, 4))],
)
def test_tiles_are_each_pixels_mean_over_the_windows_covering_it(size, window, stride, tiles):
    grid = Grid(size=size, window=window, stride=stride)
    maps = randn(2, 3, *grid.shape, seed=8)
    got = grid.to_tiles(maps)
    assert grid.tile_shape == tiles and got.shape == (2, 3, *tiles)
    pixels = got.repeat_interleave(size[0] // tiles[0], 2).repeat_interleave(size[1] // tiles[1], 3)
    torch.testing.assert_close(pixels, _per_pixel(maps, grid), rtol=1e-5, atol=1e-6)


class Centre(nn.Module):
    """Reads only input pixels [40, 80) x [40, 80): the middle window of a 40-pixel grid over 96."""

    def forward(self, x):
        return x[:, :, 40:80, 40:80].sum(dim=(1, 2, 3))[:, None] * torch.tensor([1.0, -1.0])


def test_written_maps_sit_where_their_windows_are(tmp_path):
    """Windows of 40 at stride 40 over 96 px: [0, 40), [40, 80), [80, 96). The map a run writes puts
    the evidence on [40, 80); the window grid read as even tiles would put it on [32, 64)."""
    from camshaft.engine.postprocess import map_stats, to_original
    from camshaft.preprocess import Preprocess, geometry

    backend = open_backend("eager", source_of(Centre(), size=(96, 96)), tmp_path)
    x = torch.rand(1, 3, 96, 96) + 0.5
    options = {"window": (40, 40), "stride": (40, 40)}
    windows = OCCLUSION.run(backend, x, fixed([[0]]), tap=None, options=options)[0]
    maps = OCCLUSION.explain(backend, x, fixed([[0]]), tap=None, options=options)[0]
    assert windows.shape[-2:] == (3, 3) and maps.shape[-2:] == (12, 12)
    geom, pre = geometry((96, 96), Preprocess((96, 96), resize="stretch")), (96, 96)

    def centroid(m):
        heat = to_original(m[0, 0].numpy(), geom, pre)
        return float((heat.sum(0) * (torch.arange(96).numpy() + 0.5)).sum() / heat.sum())

    assert abs(centroid(maps) - 60) < 1.5, centroid(maps)
    assert abs(centroid(windows) - 48) < 1.5  # what outputs did with the window grid
    stats = map_stats(maps[0].numpy(), geom, pre)
    assert 40 <= stats["map_argmax_x"][0] < 80 and 40 <= stats["map_argmax_y"][0] < 80


def test_explain_writes_the_per_pixel_attribution_on_tiles(tmp_path):
    from camshaft.demo.shapes import write_demo_dataset

    manifest = write_demo_dataset(tmp_path / "images", n=2, seed=0)
    summary = camshaft.explain(
        None, manifest.parent, out=tmp_path / "out", method="occlusion", options={"window": (16, 16), "stride": (8, 8)}, progress=False
    )
    assert summary.ok == 2
    results = camshaft.load_results(tmp_path / "out")
    assert results.maps.shape == (2, 1, 12, 12)  # tiles of gcd(96, 16, 8) = 8 pixels
    assert results.map(0, upsample=True).shape[0] == 1
