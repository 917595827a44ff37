"""The dataset-wide audit of one run, as data frames: per map, per class, flags, mean maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from camshaft.report.classes import class_table, summary_numbers
from camshaft.report.flags import FlagRules, flag_classes, flag_images
from camshaft.report.metrics import load_metrics
from camshaft.report.scan import MeanMaps, scan
from camshaft.report.spatial import SpatialSpec
from camshaft.results import Results, load_results


@dataclass
class Audit:
    """The audit of a run.

    ``images``: one row per (image, target) with every statistic (and the faithfulness areas when
    the run has ``metrics.parquet``); ``classes``: one row per class, flagged classes worst first
    by ``severity``; ``flags``: one row per (image, target, flag), worst first; ``mean_maps``:
    class -> mean max-normalised map (h, w); ``summary``: headline numbers.
    """

    results: Results
    images: pd.DataFrame
    classes: pd.DataFrame
    flags: pd.DataFrame
    mean_maps: MeanMaps
    summary: dict
    curves: dict = field(default_factory=dict)  # kind -> mean curve (n + 1,), when metrics exist
    metric_specs: list = field(default_factory=list)

    @property
    def has_boxes(self) -> bool:
        return "pointing" in self.images.columns

    def quality(self) -> tuple[pd.Series, str]:
        """Per map, how good the explanation looks (higher is better), and what it is.

        Energy in box where boxes exist; else insertion - deletion AUC where metrics exist; else
        the top-5% mass times the mass off the border.
        """
        im = self.images
        if "energy_in_box" in im and im["energy_in_box"].notna().any():
            return im["energy_in_box"], "energy in box"
        if {"insertion_auc", "deletion_auc"} <= set(im.columns):
            return im["insertion_auc"] - im["deletion_auc"], "insertion AUC − deletion AUC"
        return im["top_mass"] * (1.0 - im["border_mass"]), "top-mass × (1 − border mass)"

    @property
    def flagged_classes(self) -> pd.DataFrame:
        c = self.classes
        if c.empty:  # no image was explained
            return c
        return c[c["flags"] != ""].sort_values(["severity", "class"], ascending=[False, True])


def audit(
    run: str | Path | Results,
    *,
    spec: SpatialSpec = SpatialSpec(),
    rules: FlagRules = FlagRules(),
    boxes: bool = True,
) -> Audit:
    """Audit the run at ``run``: one streaming pass over its maps, then tables."""
    results = run if isinstance(run, Results) else load_results(run)
    images, means = scan(results, spec=spec, boxes=boxes)
    curves, specs = {}, []
    loaded = load_metrics(results.out)
    if loaded is not None and len(images):
        metrics, specs = loaded
        images, curves = _join_metrics(images, metrics)
    names = results.attrs.get("class_names")
    classes = flag_classes(class_table(images, names), rules) if len(images) else pd.DataFrame()
    flags = flag_images(images, rules) if len(images) else pd.DataFrame()
    summary = summary_numbers(images, results.table)
    summary["flagged_images"] = int(flags["index"].nunique()) if len(flags) else 0
    summary["flagged_classes"] = int((classes["flags"] != "").sum()) if len(classes) else 0
    return Audit(results, images, classes, flags, means, summary, curves, specs)


def _join_metrics(images: pd.DataFrame, metrics: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Add the ``*_auc`` columns to ``images``; the mean curve of each metric."""
    aucs = [c for c in metrics.columns if c.endswith("_auc")]
    joined = images.merge(metrics[["index", "k", *aucs]], on=["index", "k"], how="left")
    curves = {}
    for column in metrics.columns:
        if column.endswith("_curve") and len(metrics):
            curves[column.removesuffix("_curve")] = np.stack(metrics[column].to_numpy()).mean(axis=0)
    return joined, curves
