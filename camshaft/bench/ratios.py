"""Ratios between the figures of one run: to the limit, to the gradient limit, to peers, to the method.

Pure functions of the figures, so they are tested with made-up numbers.

- ratio to the limit = evaluations/s ÷ the best ``limit`` of the same group (model, input size,
  batch) in evaluations/s (``limit_per_second``; for a forward limit, images/s); for single-forward
  methods evaluations are images. A method that runs larger forwards than its batch (occlusion,
  Score-CAM, SmoothGrad: ``forward_batch``) is compared with the limit measured at that batch.
- gradient limit (``gradient == "tap"``) = batch ÷ (batch ÷ limit + best ``head_backward`` seconds
  for the same K); (``gradient == "input"``) = the best ``input_backward`` images/s for the same K
  (over its variants), at the method's forward batch.
- speed-up over a peer = camshaft pairs/s ÷ the peer's best pairs/s (best over its variants).
- a pipeline's ratio to its method = its images/s ÷ the same case's method images/s; its ratio to
  the limit = that × the method's ratio to the limit (what ``--compare`` judges: a faster method
  does not make the pipeline look slower).
- activation maximization (method ``actmax``) is compared with the ``actmax_limit`` of its group
  (classes/s: the inverse of seconds per class).
"""

from __future__ import annotations

from collections import defaultdict

from camshaft.bench.workload import Figure


def group_of(f: Figure) -> tuple:
    return (f.get("model"), tuple(f.get("input_size") or ()), f.get("batch"))


def limit_of(f: Figure) -> tuple:
    """Which limit ``f`` is compared with: its group, at the batch of its forwards (the group's batch unless
    it runs larger ones)."""
    return (*group_of(f), f.get("forward_batch") or f.get("batch"))


def limits(figures: list[Figure], role: str = "limit") -> dict[tuple, tuple[float, str]]:
    """``limit_of`` key -> (the limit in evaluations/s, the variant that reached it).

    A forward limit makes one evaluation per image, so there it is images/s.
    """
    best: dict[tuple, tuple[float, str]] = {}
    for f in figures:
        if f.role == role:
            g = limit_of(f)
            if g not in best or f.evaluations_per_second > best[g][0]:
                best[g] = (f.evaluations_per_second, f.get("variant"))
    return best


def gradient_limits(figures: list[Figure], lims: dict[tuple, tuple[float, str]]) -> dict[tuple, float]:
    """(``limit_of`` key, kind, k) -> the gradient limit in images/s (the best over an ``input_backward``'s variants)."""
    out: dict[tuple, float] = {}
    for f in figures:
        g = limit_of(f)
        if f.role == "head_backward" and g in lims:
            forward_s = f.images / lims[g][0]
            out[(g, "tap", f.get("k"))] = f.images / (forward_s + f.best_seconds)
        elif f.role == "input_backward":
            slot = (g, "input", f.get("k"))
            out[slot] = max(out.get(slot, 0.0), f.images_per_second)
    return out


def best_peers(figures: list[Figure]) -> dict[tuple, dict[str, float]]:
    """(group, method, targets) -> {peer: its best pairs/s over its variants}."""
    out: dict[tuple, dict[str, float]] = defaultdict(dict)
    for f in figures:
        if f.role == "peer":
            slot = out[(group_of(f), f.get("method"), f.get("targets"))]
            slot[f.get("peer")] = max(slot.get(f.get("peer"), 0.0), f.pairs_per_second)
    return out


def _case(f: Figure) -> tuple:
    return (group_of(f), f.get("method"), f.get("variant", ""), f.get("targets"), f.get("backend"))


def derive(figures: list[Figure]) -> dict[str, dict]:
    """key -> the derived numbers of that figure (only those that apply)."""
    lims = limits(figures)
    actmax = limits(figures, "actmax_limit")
    grads = gradient_limits(figures, lims)
    peers = best_peers(figures)
    methods = {_case(f): f for f in figures if f.role == "method"}
    out: dict[str, dict] = {}
    for f in figures:
        g = limit_of(f)
        d: dict = {}
        lim = (actmax if f.get("method") == "actmax" else lims).get(g)
        if f.role in ("method", "peer", "head_backward", "input_backward") and lim is not None:
            d["limit_per_second"], d["limit_variant"] = lim
            d["ratio_to_limit"] = f.evaluations_per_second / lim[0]
            if g[-1] != f.get("batch"):
                d["limit_batch"] = g[-1]
        if f.role == "method":
            grad = grads.get((g, f.get("gradient"), f.get("k")))
            if grad is not None:
                d["gradient_limit_per_second"] = grad
                d["ratio_to_gradient_limit"] = f.evaluations_per_second / grad
            others = peers.get((group_of(f), f.get("method"), f.get("targets")), {})
            d["peers"] = {
                p: {"pairs_per_second": v, "speedup": f.pairs_per_second / v} for p, v in sorted(others.items())
            }
        if f.role == "pipeline":
            m = methods.get(_case(f))
            if m is not None:
                d["method_images_per_second"] = m.images_per_second
                d["ratio_to_method"] = f.images_per_second / m.images_per_second
                lim = lims.get(limit_of(m))
                if lim is not None:  # the method's ratio to its limit, scaled by the pipeline's to the method
                    d["limit_per_second"], d["limit_variant"] = lim
                    d["ratio_to_limit"] = d["ratio_to_method"] * m.evaluations_per_second / lim[0]
        out[f.key] = d
    return out
