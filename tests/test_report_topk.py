"""The running top-k of dataset exemplars: hand-computed winners, batch invariance, ties."""

from __future__ import annotations

import pytest
import torch

from camshaft.errors import ConfigError
from camshaft.report.exemplars import ExemplarCollector, ExemplarSpec, merge_tables
from camshaft.report.topk import TopK

# 4 images x 2 channels x (1 x 2) maps; channel 0 max per image: 1, 5, 3, 5; channel 1: 4, 0, 2, 1
ACTS = torch.tensor(
    [
        [[[1.0, 0.0]], [[4.0, 2.0]]],
        [[[5.0, -1.0]], [[0.0, 0.0]]],
        [[[2.0, 3.0]], [[2.0, 2.0]]],
        [[[0.0, 5.0]], [[1.0, 0.0]]],
    ]
)
INDEX = [10, 11, 12, 13]


def _run(batches, **kwargs):
    acc = TopK(**kwargs)
    for lo, hi in batches:
        acc.update(ACTS[lo:hi], INDEX[lo:hi])
    return acc.result()


def test_top2_by_spatial_max_by_hand():
    r = _run([(0, 4)], k=2)
    assert r.channels == (0, 1)
    assert r.indices.tolist() == [[11, 13], [10, 12]]  # channel 0: 5 (11) and 5 (13), the tie to the lower index
    assert r.scores.tolist() == [[5.0, 5.0], [4.0, 2.0]]
    assert r.maps[0, 0].tolist() == [[5.0, -1.0]] and r.maps[1, 1].tolist() == [[2.0, 2.0]]


def test_same_result_for_any_batching_and_order():
    whole = _run([(0, 4)], k=3)
    for batches in ([(0, 1), (1, 2), (2, 3), (3, 4)], [(2, 4), (0, 2)], [(3, 4), (0, 3)]):
        r = _run(batches, k=3)
        assert r.indices.tolist() == whole.indices.tolist()
        torch.testing.assert_close(r.maps, whole.maps)


def test_partitions_merge_into_the_whole():
    """A partitioned pass: one accumulator per partition, merged at the end."""
    whole = _run([(0, 4)], k=2)
    first, second = TopK(k=2), TopK(k=2)
    first.update(ACTS[:1], INDEX[:1])
    second.update(ACTS[1:], INDEX[1:])
    merged = TopK(k=2)
    merged.merge(second.result())
    merged.merge(first.result())
    r = merged.result()
    assert r.indices.tolist() == whole.indices.tolist() and r.channels == whole.channels
    torch.testing.assert_close(r.maps, whole.maps)
    with pytest.raises(ConfigError, match=r"cannot merge exemplars of channels \[0, 1\] into channels \[1\]"):
        TopK(k=2, channels=[1]).merge(whole)


def test_partition_tables_merge_into_the_whole():
    def table(lo, hi):
        c = ExemplarCollector([ExemplarSpec("t")], k=2)
        c.update({"t": ACTS[lo:hi]}, INDEX[lo:hi])
        return c.table()

    whole = table(0, 4)
    merged = merge_tables([table(2, 4), table(0, 1), table(1, 2)], k=2)
    columns = ["tap", "channel", "rank", "index", "score"]
    assert merged[columns].values.tolist() == whole[columns].values.tolist()
    assert merged.empty is False and merge_tables([], k=2).empty


def test_mean_reduction_channel_subset_and_fewer_images_than_k():
    r = _run([(0, 2)], k=5, channels=[1], reduce="mean")
    assert r.channels == (1,)
    assert r.indices.tolist() == [[10, 11]] and r.scores.tolist() == [[3.0, 0.0]]


def test_errors_are_clear():
    with pytest.raises(ConfigError, match="k must be at least 1"):
        TopK(k=0)
    with pytest.raises(ConfigError, match="unknown reduction 'median'"):
        TopK(k=1, reduce="median")
    with pytest.raises(ConfigError, match=r"channels \[7\] out of range: this tap has channels 0..1"):
        TopK(k=1, channels=[0, 7]).update(ACTS, INDEX)
    with pytest.raises(ConfigError, match="got 3 indices for a batch of 4 images"):
        TopK(k=1).update(ACTS, INDEX[:3])
    with pytest.raises(ConfigError, match="no activations were added"):
        TopK(k=1).result()


def test_exemplar_specs_and_collector_table():
    assert ExemplarSpec.parse("layer4") == ExemplarSpec("layer4")
    assert ExemplarSpec.parse("features.29:3,7") == ExemplarSpec("features.29", (3, 7))
    with pytest.raises(ConfigError, match="expected TAP or TAP:C1,C2"):
        ExemplarSpec.parse("layer4:a,b")
    collector = ExemplarCollector([ExemplarSpec("t", (1,))], k=2)
    collector.update({"t": ACTS}, INDEX)
    table = collector.table()
    assert table[["tap", "channel", "rank", "index", "score"]].values.tolist() == [["t", 1, 0, 10, 4.0], ["t", 1, 1, 12, 2.0]]
    assert table["map"][0].tolist() == [4.0, 2.0] and (table["map_h"][0], table["map_w"][0]) == (1, 2)
    with pytest.raises(ConfigError, match=r"no activations for taps \['t'\]"):
        collector.update({"other": ACTS}, INDEX)
