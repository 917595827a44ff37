"""One class's page: accuracy, mean map, metric distributions, best and worst examples."""

from __future__ import annotations

import pandas as pd

from camshaft.report import html as h
from camshaft.report import plots
from camshaft.report.samples import IMG_DIR
from camshaft.report.sections import UNIT


def render(ctx, row: pd.Series) -> str:
    """The body of the page of class ``row`` (a row of the class table)."""
    c = int(row["class"])
    a = ctx.audit
    mine = a.images["target"] == c
    im, quality = a.images[mine], ctx.quality[mine]
    items = [
        h.Card("maps", f"{int(row['maps']):,}"),
        h.Card("labelled images", f"{int(row['labelled']):,}"),
        h.Card("accuracy", h.pct(row["accuracy"])),
        h.Card("border mass", h.num(row["mean_border_mass"]), "bad" if "border-heavy" in row["flags"] else ""),
        h.Card("entropy", h.num(row["mean_entropy"]), "bad" if "diffuse" in row["flags"] else ""),
    ]
    if a.has_boxes:
        items += [h.Card("pointing game", h.pct(row["mean_pointing"])), h.Card("energy in box", h.num(row["mean_energy_in_box"]))]
    if a.curves:
        items += [h.Card("deletion AUC", h.num(row["mean_deletion_auc"])), h.Card("insertion AUC", h.num(row["mean_insertion_auc"]))]
    flags = h.badges(row["flags"]) or '<span class="note">no flags</span>'
    head = f'<p><a href="index.html#classes">← all classes</a> &nbsp; {flags}</p>' + h.cards(items)
    if im.empty:
        body = head + '<p class="note">No map explains this class (it appears only as a label).</p>'
        return h.section("class", f"Class {row['class_name']} ({c})", body)
    mean = h.figure(ctx.mean_tile(c), f"mean map over {len(im):,} maps", css="wide")
    dist = _distributions(ctx, c, im)
    order = quality.dropna().sort_values(kind="stable")  # NaN (an empty map, an image without a box) ranks nowhere
    n = ctx.options.examples
    best = [_example(ctx, im.loc[i], quality[i]) for i in order.index[::-1][:n]]
    worst = [_example(ctx, im.loc[i], quality[i]) for i in order.index[:n]]
    body = head + f'<div class="row">{mean}{h.plots([dist])}</div>'
    body += f"<h3>Best examples, by {h.esc(ctx.quality_name)}</h3>{h.gallery(best)}"
    body += f"<h3>Worst examples, by {h.esc(ctx.quality_name)}</h3>{h.gallery(worst)}"
    wrong = im[(im["correct"] == 0)]
    if len(wrong):
        figs = [_example(ctx, r, quality[i]) for i, r in wrong.head(n).iterrows()]
        body += f"<h3>Misclassified ({len(wrong):,}), first {len(figs)}</h3>{h.gallery(figs)}"
    return h.section("class", f"Class {row['class_name']} ({c})", body)


def _example(ctx, row: pd.Series, quality: float) -> str:
    extra = f"{h.esc(ctx.quality_name)} {h.num(quality)} · score {h.num(row['score'], 2)}"
    return h.figure(ctx.sampler.overlay(row), ctx.caption(row, extra=extra))


def _distributions(ctx, c: int, im: pd.DataFrame) -> str:
    rules = ctx.options.rules
    panels = [("border mass", im["border_mass"], rules.border, UNIT), ("entropy", im["entropy"], rules.entropy, UNIT)]
    if ctx.audit.has_boxes:
        panels.append(("energy in box", im["energy_in_box"], None, UNIT))
    for kind in ctx.audit.curves:
        panels.append((f"{kind} AUC", im[f"{kind}_auc"], None, None))
    path = plots.histograms(ctx.out / IMG_DIR / f"plot_class_{c}.png", panels, columns=3)
    return f"{IMG_DIR}/{path.name}"
