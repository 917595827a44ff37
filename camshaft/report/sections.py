"""The sections of the report's index page, each from the aggregated tables and a sample of maps."""

from __future__ import annotations

import numpy as np

from camshaft.report import html as h
from camshaft.report import plots
from camshaft.report.exemplars import shown_channels
from camshaft.report.samples import IMG_DIR
from camshaft.report.tokens import render_tokens

UNIT = (0.0, 1.0)


def _plot(ctx, name: str) -> tuple:
    """(where plots.* writes ``name``, its link from the page)."""
    return ctx.out / IMG_DIR / name, f"{IMG_DIR}/{name}"


def overview(ctx) -> str:
    a, rules = ctx.audit, ctx.options.rules
    s = a.summary
    items = [
        h.Card("images", f"{s['images']:,}"),
        h.Card("explained / failed", f"{s['explained']:,} / {s['failed']:,}", "bad" if s["failed"] else ""),
        h.Card("accuracy", h.pct(s["accuracy"])),
        h.Card("flagged images", f"{s['flagged_images']:,}", "bad" if s["flagged_images"] else "good"),
        h.Card("flagged classes", f"{s['flagged_classes']:,}", "bad" if s["flagged_classes"] else "good"),
        h.Card("mean border mass", h.num(s["border_mass"]), "bad" if s["border_mass"] >= rules.border else ""),
        h.Card("mean entropy", h.num(s["entropy"]), "bad" if s["entropy"] >= rules.entropy else ""),
    ]
    if a.has_boxes:
        items += [h.Card("pointing game", h.pct(s["pointing"])), h.Card("energy in box", h.num(s["energy_in_box"]))]
    if a.curves:
        items += [h.Card("deletion AUC ↓", h.num(s["deletion_auc"])), h.Card("insertion AUC ↑", h.num(s["insertion_auc"]))]
    body = h.cards(items)
    if len(a.images):
        im = a.images
        panels = [
            ("border mass", im["border_mass"], rules.border, UNIT),
            ("entropy (normalised)", im["entropy"], rules.entropy, UNIT),
            ("top-5% mass", im["top_mass"], None, UNIT),
        ]
        hist, hist_src = _plot(ctx, "plot_shortcut_hist.png")
        plots.histograms(hist, panels)
        flagged = im["index"].isin(a.flags["index"]) if len(a.flags) else np.zeros(len(im), bool)
        sc, sc_src = _plot(ctx, "plot_border_entropy.png")
        title = "Border mass vs entropy (flagged in red)"
        plots.scatter(sc, im["entropy"], im["border_mass"], title=title, xlabel="entropy", ylabel="border mass", highlight=flagged)
        body += "<h3>Shortcut signals, per map</h3>" + h.plots([hist_src, sc_src])
    failed = a.results.table[a.results.table["status"] != "ok"]
    if len(failed):
        body += f"<h3>Images that could not be explained ({len(failed):,}), first 20</h3>"
        body += h.table(failed.head(20), [("index", "index"), ("path", "path"), ("reason", "error")])
    note = (
        f"Border mass: share of the map's positive mass within {ctx.options.spatial.border:.0%} of the image edge "
        f"(a uniform map: {1 - (1 - 2 * ctx.options.spatial.border) ** 2:.2f}). Entropy: of the map as a distribution "
        f"over its cells, normalised to [0, 1] (1 = uniform). Red dashed lines: flag thresholds."
    )
    return h.section("overview", "Overview", body, note=note)


def flags(ctx) -> str:
    a = ctx.audit
    if not len(a.images):
        return h.section("flags", "Flags", '<p class="note">No image was explained.</p>')
    fc = a.flagged_classes
    shown = fc if ctx.options.class_pages is None else fc.head(ctx.options.class_pages)
    cls = h.table(
        shown,
        [
            ("class", lambda r: ctx.class_link(r["class"], r["class_name"])),
            ("mean map", lambda r: _mini(ctx, r["class"])),
            ("flags", lambda r: h.badges(r["flags"])),
            ("severity", "severity"),
            ("maps", "maps"),
            ("border mass", "mean_border_mass"),
            ("entropy", "mean_entropy"),
            ("accuracy", "accuracy"),
        ],
    )
    worst = a.flags.drop_duplicates(["index", "k"]).head(ctx.options.flagged)
    figs = []
    for _, f in worst.iterrows():
        row = a.images[(a.images["index"] == f["index"]) & (a.images["k"] == f["k"])].iloc[0]
        tags = a.flags[(a.flags["index"] == f["index"]) & (a.flags["k"] == f["k"])]
        stats = f" border {h.num(row['border_mass'], 2)} · entropy {h.num(row['entropy'], 2)}"
        extra = h.badges(",".join(tags["flag"])) + stats
        figs.append(h.figure(ctx.sampler.overlay(row), ctx.caption(row, extra=extra)))
    n_img = a.flags["index"].nunique() if len(a.flags) else 0
    body = f"<h3>Flagged classes ({len(fc):,}), worst first</h3>{more_note(len(shown), len(fc))}{cls}"
    body += f"<h3>Flagged images ({n_img:,}), worst first — showing {len(figs)}</h3>{h.gallery(figs)}"
    rules = ctx.options.rules
    note = (
        f"border-heavy: border mass ≥ {rules.border}; diffuse: entropy ≥ {rules.entropy}; empty: no positive "
        "mass. A class is flagged on the mean over its maps (empty: all of them). All flags: tables/flags.csv."
    )
    return h.section("flags", "Flags: explanations that look off", body, note=note)


def more_note(shown: int, total: int, *, table: str = "tables/classes.csv") -> str:
    """A note when a class table shows only the worst rows: the page stays small whatever the class count."""
    if shown >= total:
        return ""
    return f'<p class="note">Showing the {shown:,} worst of {total:,} classes; all are in {table}.</p>'


def _mini(ctx, c: int) -> str:
    src = ctx.mean_tile(c)
    return f'<img class="mini" src="{src}" alt="mean map">' if src else "–"


def classes(ctx) -> str:
    a = ctx.audit
    if not len(a.classes):
        return h.section("classes", "Classes", '<p class="note">No class to show.</p>')
    shown = a.classes["class"].isin(ctx.paged)
    c = a.classes[shown].sort_values("class")
    cols = [
        ("class", lambda r: ctx.class_link(r["class"], r["class_name"])),
        ("mean map", lambda r: _mini(ctx, r["class"])),
        ("maps", "maps"),
        ("labelled", "labelled"),
        ("accuracy", "accuracy"),
        ("border", "mean_border_mass"),
        ("entropy", "mean_entropy"),
        ("top-5%", "mean_top_mass"),
    ]
    if a.has_boxes:
        cols += [("pointing", "mean_pointing"), ("energy in box", "mean_energy_in_box")]
    if a.curves:
        cols += [("deletion", "mean_deletion_auc"), ("insertion", "mean_insertion_auc")]
    cols.append(("flags", lambda r: h.badges(r["flags"])))
    worst = a.classes.sort_values(["mean_border_mass", "class"], ascending=[False, True]).head(30)
    bars, src = _plot(ctx, "plot_class_border.png")
    title = "Mean border mass by class (highest 30)"
    plots.class_bars(bars, worst["class_name"].tolist(), worst["mean_border_mass"].to_numpy(), title=title, threshold=ctx.options.rules.border)
    body = h.plots([src])
    if len(c) < len(a.classes):
        body += f'<p class="note">Showing the {len(c):,} worst of {len(a.classes):,} classes (flagged first); all are in tables/classes.csv.</p>'
    body += h.table(c, cols)
    note = "A map's class is the class it explains; accuracy is over the images labelled with the class. Click a class for its page."
    return h.section("classes", "Classes", body, note=note)


def localization(ctx) -> str:
    a, s = ctx.audit, ctx.audit.summary
    body = h.cards([h.Card("pointing game", h.pct(s["pointing"])), h.Card("energy in box", h.num(s["energy_in_box"]))])
    panels = [("energy in box", a.images["energy_in_box"], None, UNIT)]
    hist, hist_src = _plot(ctx, "plot_localization_hist.png")
    plots.histograms(hist, panels)
    c = a.classes.dropna(subset=["mean_pointing"]).sort_values(["mean_pointing", "class"]).head(30)
    bars, bars_src = _plot(ctx, "plot_class_pointing.png")
    plots.class_bars(bars, c["class_name"].tolist(), c["mean_pointing"].to_numpy(), title="Pointing game by class (lowest 30)")
    body += h.plots([hist_src, bars_src])
    note = (
        f"Pointing game (Zhang et al. 2016): the centre of the map's maximum cell inside the box grown by "
        f"{ctx.options.spatial.tolerance:g} px. Energy in box: share of the positive map mass inside the box."
    )
    return h.section("localization", "Localization", body, note=note)


def faithfulness(ctx) -> str:
    a = ctx.audit
    aucs = {k: float(a.images[f"{k}_auc"].mean()) for k in a.curves}
    curve, curve_src = _plot(ctx, "plot_curves.png")
    plots.mean_curves(curve, a.curves, aucs)
    hist, hist_src = _plot(ctx, "plot_auc_hist.png")
    plots.histograms(hist, [(f"{k} AUC", a.images[f"{k}_auc"], None, None) for k in a.curves])
    body = h.cards([h.Card(f"{k} AUC", h.num(v)) for k, v in aucs.items()]) + h.plots([curve_src, hist_src])
    specs = "; ".join(f"{s['kind']}: {s['steps']} steps, baseline {s['baseline']}, score {s['score']}" for s in a.metric_specs)
    note = (
        "Petsiuk et al. 2018: pixels removed (deletion, lower is better) or inserted (insertion, higher is "
        f"better) in the order of the map. {h.esc(specs)}."
    )
    return h.section("faithfulness", "Faithfulness", body, note=note)


def exemplars(ctx) -> str:
    ex = ctx.report.exemplars
    table = ctx.audit.results.table.set_index("index")
    body = []
    for tap in dict.fromkeys(ex["tap"]):
        body.append(f"<h3>tap {h.esc(tap)}</h3>")
        for channel in shown_channels(ex, tap, limit=ctx.options.channels):
            rows = ex[(ex["tap"] == tap) & (ex["channel"] == channel)].sort_values("rank")
            figs = []
            for _, r in rows.iterrows():
                m = np.asarray(r["map"], dtype=np.float32).reshape(int(r["map_h"]), int(r["map_w"]))
                path = str(table.loc[int(r["index"]), "path"])
                src = ctx.sampler.activation(int(r["index"]), path, m, tag=f"ex_{tap}_{channel}")
                figs.append(h.figure(src, f"#{int(r['index'])} · {r['score']:.3g}"))
            body.append(h.strip(f"channel {int(channel)}", figs))
    reduce = str(ex["reduce"].iloc[0]) if "reduce" in ex.columns and len(ex) else "max"
    note = f"For each channel, the images of the dataset that activate it most (spatial {reduce}), the activation map overlaid."
    return h.section("exemplars", "Dataset exemplars", "".join(body), note=note)


def tokens(pairs_by_name) -> str:
    body = "".join(f"<h3>{h.esc(name)}</h3>{render_tokens(list(pairs))}" for name, pairs in pairs_by_name.items())
    return h.section("tokens", "Token attributions", body, note="Words shaded by attribution weight: red positive, blue negative.")


def tables(ctx) -> str:
    files = sorted(p.name for p in (ctx.out / "tables").iterdir() if not p.name.startswith("."))
    items = "".join(f'<li><a href="tables/{h.esc(f)}">{h.esc(f)}</a></li>' for f in files)
    note = "Machine-readable numbers behind this report; images.parquet has one row per (image, target)."
    return h.section("tables", "Tables", f"<ul>{items}</ul>", note=note)
