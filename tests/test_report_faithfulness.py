"""Deletion / insertion curves against hand-computed values on a constructed model.

The model scores class 0 with the mean of the red channel (1x1 conv, global average pool, linear
head), so every point of every curve is a sum of pixels we can write down.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import open_backend, source_of
from torch import nn

from camshaft.errors import ConfigError
from camshaft.report.faithfulness import CurveSpec, area, blur, curves, parse_metrics, pixel_ranks, step_counts
from camshaft.report.metrics import MetricsCollector, load_metrics, write_metrics


class MeanRed(nn.Module):
    """logit 0 = mean(R), logit 1 = -mean(R)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.features[0].weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return open_backend("eager", source_of(MeanRed(), size=(2, 2)), tmp_path_factory.mktemp("meanred"))


def _red(values) -> torch.Tensor:
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = torch.tensor(values, dtype=torch.float32)
    return x


RED = [[4.0, 0.0], [1.0, 2.0]]  # mean 7/4
TARGET = torch.tensor([[0]])


def test_step_counts_floor_convention():
    assert step_counts(4, 4).tolist() == [0, 1, 2, 3, 4]
    assert step_counts(4, 3).tolist() == [0, 1, 2, 4]  # floor(i * 4 / 3)
    assert step_counts(10, 1).tolist() == [0, 10]


def test_pixel_ranks_orders_by_value_and_breaks_ties_row_major():
    ranks = pixel_ranks(torch.tensor(RED).view(1, 1, 2, 2), (2, 2))
    assert ranks.tolist() == [[[0, 3, 2, 1]]]  # 4 first, then 2, 1, 0
    flat = pixel_ranks(torch.ones(1, 1, 1, 1), (2, 2))  # a constant map upsampled: all ties
    assert flat.tolist() == [[[0, 1, 2, 3]]]


def test_deletion_curve_and_area_by_hand(backend):
    spec = CurveSpec("deletion", steps=4, score="logit")
    c = curves(backend, _red(RED), torch.tensor(RED).view(1, 1, 2, 2), TARGET, spec=spec)
    # remove 4, then 2, then 1, then 0: mean red 7/4, 3/4, 1/4, 0, 0
    assert c[0, 0].tolist() == pytest.approx([1.75, 0.75, 0.25, 0.0, 0.0])
    assert area(c).item() == pytest.approx((1.75 / 2 + 0.75 + 0.25 + 0.0 + 0.0 / 2) / 4)  # 0.46875


def test_insertion_curve_and_area_by_hand(backend):
    spec = CurveSpec("insertion", steps=4, score="logit", baseline="zero")
    c = curves(backend, _red(RED), torch.tensor(RED).view(1, 1, 2, 2), TARGET, spec=spec)
    assert c[0, 0].tolist() == pytest.approx([0.0, 1.0, 1.5, 1.75, 1.75])
    assert area(c).item() == pytest.approx((0.0 + 1.0 + 1.5 + 1.75 + 1.75 / 2) / 4)  # 1.28125


def test_uneven_steps_follow_the_floor_convention(backend):
    spec = CurveSpec("deletion", steps=3, score="logit")
    c = curves(backend, _red(RED), torch.tensor(RED).view(1, 1, 2, 2), TARGET, spec=spec)
    assert c[0, 0].tolist() == pytest.approx([1.75, 0.75, 0.25, 0.0])  # 0, 1, 2, 4 pixels removed
    assert area(c).item() == pytest.approx((0.875 + 0.75 + 0.25) / 3)


def test_probability_score_is_the_softmax_of_the_target(backend):
    spec = CurveSpec("deletion", steps=4)
    c = curves(backend, _red(RED), torch.tensor(RED).view(1, 1, 2, 2), TARGET, spec=spec)
    expected = [1 / (1 + math.exp(-2 * m)) for m in (1.75, 0.75, 0.25, 0.0, 0.0)]  # logits (m, -m)
    assert c[0, 0].tolist() == pytest.approx(expected, abs=1e-6)


def test_decisive_map_deletes_faster_than_a_random_map(backend):
    """On a 16x16 image whose red mass sits in a few pixels, the map of those pixels wins."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 3, 16, 16)
    x[0, 0] = torch.rand(16, 16, generator=g) ** 8 * 10  # a few decisive pixels
    truth = x[:, :1].clone()  # the map that ranks the decisive pixels first
    spec = CurveSpec("deletion", steps=16, score="logit", batch_size=7)
    decisive = area(curves(backend, x, truth, TARGET, spec=spec)).item()
    randoms = [area(curves(backend, x, torch.rand(1, 1, 16, 16, generator=g), TARGET, spec=spec)).item() for _ in range(5)]
    assert decisive < min(randoms)
    insertion = CurveSpec("insertion", steps=16, score="logit", baseline="zero")
    assert area(curves(backend, x, truth, TARGET, spec=insertion)).item() > area(curves(backend, x, -truth, TARGET, spec=insertion)).item()


def test_curves_do_not_depend_on_batch_size_and_take_k_targets(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 4, 4, generator=g)
    maps = torch.rand(3, 2, 2, 2, generator=g)  # low resolution: upsampled bilinearly
    targets = torch.tensor([[0, 1], [1, 0], [0, 0]])
    a = curves(backend, x, maps, targets, spec=CurveSpec("insertion", steps=5, batch_size=1))
    b = curves(backend, x, maps, targets, spec=CurveSpec("insertion", steps=5, batch_size=1000))
    assert a.shape == (3, 2, 6)
    torch.testing.assert_close(a, b)
    one = curves(backend, x[1:2], maps[1:2, 1:], targets[1:2, 1:], spec=CurveSpec("insertion", steps=5))
    torch.testing.assert_close(one[0, 0], a[1, 1])


def test_blur_baseline_keeps_a_constant_image():
    x = torch.full((1, 3, 5, 7), 0.3)
    torch.testing.assert_close(blur(x, sigma=5.0), x)
    assert blur(torch.rand(2, 3, 2, 2), sigma=5.0).shape == (2, 3, 2, 2)  # kernel shrinks to fit


def test_specs_are_validated():
    with pytest.raises(ConfigError, match="unknown metric 'delete'.*deletion, insertion"):
        CurveSpec("delete")
    with pytest.raises(ConfigError, match="steps must be at least 1"):
        CurveSpec("deletion", steps=0)
    with pytest.raises(ConfigError, match="unknown baseline 'noise'"):
        CurveSpec("insertion", baseline="noise")
    with pytest.raises(ConfigError, match=r"unknown metrics \['auc'\]"):
        parse_metrics("deletion,auc")
    specs = parse_metrics("insertion, deletion,insertion", steps=7)
    assert [(s.kind, s.steps, s.resolved_baseline) for s in specs] == [("insertion", 7, "blur"), ("deletion", 7, "zero")]


def test_collector_writes_one_row_per_image_and_target(backend, tmp_path):
    collector = MetricsCollector(parse_metrics("deletion,insertion", steps=4, score="logit"))
    x = torch.cat([_red(RED), _red([[0.0, 0.0], [0.0, 8.0]])])
    maps = torch.stack([torch.tensor(RED), torch.tensor([[0.0, 0.0], [0.0, 1.0]])]).view(2, 1, 2, 2)
    collector.update(backend, x, maps, torch.tensor([[0], [0]]), [5, 3])
    path = collector.write(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    table, specs = load_metrics(tmp_path)
    assert table["index"].tolist() == [3, 5]
    assert table["deletion_auc"].tolist() == pytest.approx([(2.0 / 2) / 4, 0.46875])  # 8/4 = 2, then 0
    assert len(table["insertion_curve"][0]) == 5
    assert [s["kind"] for s in specs] == ["deletion", "insertion"] and specs[1]["baseline"] == "blur"
    twice = pd.concat([collector.table(), collector.table()])  # a batch retried after out-of-memory
    write_metrics(twice, tmp_path, collector.specs)
    assert load_metrics(tmp_path)[0]["index"].tolist() == [3, 5]
    with pytest.raises(ConfigError, match="give each metric once"):
        MetricsCollector([CurveSpec("deletion"), CurveSpec("deletion")])
