"""Per-class summary: accuracy (by label) and the mean of every map statistic (by explained class).

A map's class is the class it explains (its target): with ``--targets top:1`` the predicted
class, with ``--targets label`` the label. Accuracy is over the images labelled with the class.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

STATS = ("border_mass", "entropy", "top_mass", "pointing", "energy_in_box", "deletion_auc", "insertion_auc")


def class_table(images: pd.DataFrame, class_names) -> pd.DataFrame:
    """One row per class seen as a target or a label: counts, accuracy and mean statistics."""
    per_image = images.drop_duplicates("index")
    labelled = per_image[per_image["label_index"] >= 0]
    acc = labelled.groupby("label_index").agg(labelled=("correct", "size"), accuracy=("correct", "mean"))
    present = [s for s in STATS if s in images.columns]
    agg = {"maps": ("index", "size"), "empty": ("empty", "mean")}
    agg.update({f"mean_{s}": (s, "mean") for s in present})
    maps = images.groupby("target").agg(**agg)
    out = maps.join(acc, how="outer")
    out.index.name = "class"
    out = out.reset_index()
    out["class_name"] = [class_names[c] if class_names and 0 <= c < len(class_names) else str(c) for c in out["class"]]
    out["maps"] = out["maps"].fillna(0).astype(np.int64)
    out["labelled"] = out["labelled"].fillna(0).astype(np.int64)
    for s in STATS:  # the same columns whatever the run has
        if f"mean_{s}" not in out:
            out[f"mean_{s}"] = np.nan
    first = ["class", "class_name", "maps", "labelled", "accuracy", "empty"]
    return out[first + [f"mean_{s}" for s in STATS]]


def summary_numbers(images: pd.DataFrame, table: pd.DataFrame) -> dict:
    """Dataset-wide headline numbers of the report."""
    per_image = images.drop_duplicates("index")
    labelled = per_image[per_image["label_index"] >= 0]
    out = {
        "images": int(len(table)),
        "explained": int((table["status"] == "ok").sum()),
        "failed": int((table["status"] != "ok").sum()),
        "maps": int(len(images)),
        "accuracy": float(labelled["correct"].mean()) if len(labelled) else float("nan"),
    }
    for s in STATS:
        out[s] = float(images[s].mean()) if s in images.columns and len(images) else float("nan")
    return out
