"""The drift section: how the explanations of the same images changed between two runs."""

from __future__ import annotations

import pandas as pd

from camshaft.report import html as h
from camshaft.report import plots
from camshaft.report.samples import IMG_DIR, Sampler
from camshaft.report.sections import UNIT, more_note
from camshaft.results import load_results


def drift_section(ctx, compare) -> str:
    d = ctx.report.drift
    s = d.summary
    alerts, limits, top = ctx.report.alerts, ctx.options.thresholds, ctx.options.drift_top
    changed = f"{s['changed_images']:,} ({h.pct(s['prediction_changed'])})"
    items = [  # each card judged by its own threshold (red past it, green within), uncoloured without one
        h.Card("matched images", f"{s['matched']:,}"),
        h.Card("mean rank correlation", h.num(s["mean_rank_corr"]), _tone(s["mean_rank_corr"], limits.min_rank_corr)),
        h.Card(f"mean top-{top:.0%} IoU", h.num(s["mean_top_iou"]), _tone(s["mean_top_iou"], limits.min_iou)),
        h.Card("changed predictions", changed, _tone(s["prediction_changed"], limits.max_changed, at_most=True)),
    ]
    body = h.cards(items)
    if alerts:
        body += '<p><span class="badge border-heavy">ALERT</span> ' + "; ".join(h.esc(x) for x in alerts) + "</p>"
    panels = [
        ("rank correlation", d.images["rank_corr"], limits.min_rank_corr, (-1.0, 1.0)),
        ("top-region IoU", d.images["top_iou"], limits.min_iou, UNIT),
    ]
    hist = plots.histograms(ctx.out / IMG_DIR / "plot_drift_hist.png", panels, columns=2)
    body += h.plots([f"{IMG_DIR}/{hist.name}"])
    limit = ctx.options.class_pages
    rows = d.classes if limit is None else d.classes.head(limit)
    body += "<h3>Per class (lowest similarity first)</h3>"
    body += more_note(len(rows), len(d.classes), table="tables/drift_classes.csv")
    body += h.table(
        rows,
        [
            ("class", lambda r: ctx.class_link(r["class"], r["class_name"])),
            ("maps", "maps"),
            ("rank correlation", "mean_rank_corr"),
            ("top-region IoU", "mean_top_iou"),
            ("changed predictions", "prediction_changed"),
        ],
    )
    mine = Sampler(ctx.out, ctx.audit.results, prefix="drift_a", size=ctx.options.thumb)
    other = Sampler(ctx.out, load_results(compare), prefix="drift_b", size=ctx.options.thumb)
    figs = [_pair(mine, other, r) for _, r in d.images.head(ctx.options.changed).iterrows()]
    body += f"<h3>Most changed, first {len(figs)} (left: this run, right: {h.esc(str(compare))})</h3>{h.gallery(figs)}"
    note = (
        "Same images (matched by path), k-th target of each run. Rank correlation: Spearman over map cells; "
        f"IoU of the top {ctx.options.drift_top:.0%} cells. Exit code 1 when a threshold is crossed."
    )
    return h.section("drift", "Explanation drift", body, note=note)


def _tone(value: float, limit: float | None, *, at_most: bool = False) -> str:
    """"good" within the alert threshold (at least ``limit``, or at most), "bad" past it (NaN too, as
    for the alerts), "" without a threshold; changed predictions are "bad" when any changed."""
    if limit is None:
        return "bad" if at_most and value > 0 else ""
    within = value <= limit if at_most else value >= limit
    return "good" if within else "bad"


def _pair(mine: Sampler, other: Sampler, r: pd.Series) -> str:
    row_a = pd.Series({"index": r["index"], "k": r["k"], "path": r["path"]})
    row_b = pd.Series({"index": r["index_b"], "k": r["k"], "path": r["path"]})
    src_a, src_b = mine.overlay(row_a), other.overlay(row_b)
    changed = '<span class="badge changed">prediction changed</span>' if r["prediction_changed"] else ""
    similarity = f"ρ {h.num(r['rank_corr'], 2)} · IoU {h.num(r['top_iou'], 2)}"
    cap = f"#{int(r['index'])} {h.esc(r['target_name'])} · {similarity} {changed}"
    pair = f'<div class="pair"><img src="{h.esc(src_a)}" alt="run A"><img src="{h.esc(src_b)}" alt="run B"></div>'
    return f'<figure class="pairfig">{pair}<figcaption>{cap}</figcaption></figure>'
