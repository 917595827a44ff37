"""Map similarity for drift (Spearman, top-region IoU) and the token renderer, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from camshaft.errors import ConfigError
from camshaft.report.drift import DriftThresholds
from camshaft.report.similarity import average_ranks, spearman, top_iou, top_region
from camshaft.report.tokens import render_tokens, token_alpha


def test_average_ranks_share_ties():
    np.testing.assert_allclose(average_ranks(np.array([[1, 2, 2, 3], [5, 5, 5, 5]])), [[0, 1.5, 1.5, 3], [1.5, 1.5, 1.5, 1.5]])


def test_spearman_by_hand():
    a = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0], [2, 2, 2, 2]], dtype=float)
    b = np.array([[10, 20, 30, 40], [4, 3, 2, 1], [1, 3, 2, 4], [0, 0, 0, 0], [1, 2, 3, 4]], dtype=float)
    rho = spearman(a, b)
    # third row: rank differences (0, 1, -1, 0): 1 - 6 * 2 / (4 * 15) = 0.8
    np.testing.assert_allclose(rho[:4], [1.0, -1.0, 0.8, 1.0])  # identical constant maps: 1
    assert np.isnan(rho[4])  # a constant map against a varying one


def test_identical_maps_give_exactly_one():
    rng = np.random.default_rng(0)
    a = rng.random((50, 49)).astype(np.float32)
    assert (spearman(a, a.copy()) == 1.0).all()
    assert (top_iou(a, a.copy()) == 1.0).all()


def test_top_region_iou_by_hand():
    a, b = np.array([[4.0, 3, 2, 1]]), np.array([[4.0, 1, 3, 2]])
    assert top_region(a, 0.5).tolist() == [[True, True, False, False]]
    assert top_iou(a, b, fraction=0.5)[0] == pytest.approx(1 / 3)  # {0, 1} vs {0, 2}
    assert top_region(np.zeros((1, 4)), 0.25).tolist() == [[True, False, False, False]]  # ties to the lower cell


def test_drift_thresholds_alert():
    summary = {"mean_rank_corr": 0.8, "mean_top_iou": 0.5, "prediction_changed": 0.1}
    assert DriftThresholds().alerts(summary) == []
    alerts = DriftThresholds(min_rank_corr=0.9, min_iou=0.5, max_changed=0.05).alerts(summary)
    assert alerts == ["mean rank correlation 0.8000 < 0.9", "share of changed predictions 0.1000 > 0.05"]
    assert DriftThresholds(min_rank_corr=0.9).alerts({**summary, "mean_rank_corr": float("nan")})  # NaN alerts


def test_tokens_render_shaded_and_escaped():
    out = render_tokens([("a<b", 2.0), ("good", 1.0), ("bad", -0.5), ("the", 0.0)])
    assert out.startswith('<div class="tokens">') and out.endswith("</div>")
    assert "a&lt;b" in out and "<b" not in out.replace("<b>", "")
    assert 'rgba(220, 38, 38, 1.000); color: #ffffff" title="2">a&lt;b' in out
    assert 'rgba(220, 38, 38, 0.500)" title="1">good' in out
    assert 'rgba(37, 99, 235, 0.250)" title="-0.5">bad' in out
    assert 'rgba(220, 38, 38, 0.000)" title="0">the' in out
    assert out.count("</span> <span") == 3
    assert token_alpha(3.0, 2.0) == 1.0 and token_alpha(1.0, 0.0) == 0.0
    assert "0.250" in render_tokens([("x", 1.0)], scale=4.0)
    assert render_tokens([]) == '<div class="tokens"></div>'


def test_tokens_reject_bad_weights():
    with pytest.raises(ConfigError, match=r"finite numbers; received 1: nan"):
        render_tokens([("a", 1.0), ("b", float("nan"))])
    with pytest.raises(ConfigError, match="scale must be positive"):
        render_tokens([("a", 1.0)], scale=0)
