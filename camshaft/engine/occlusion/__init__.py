"""Occlusion sweeps (Zeiler & Fergus 2014): window layout, fills, batched and incremental evaluation.

``windows`` lays out the window positions, ``fills`` says what covers them, ``sweep`` evaluates
occluded variants in bounded batches with plain forwards, ``incremental`` (exact) recomputes only
each patch's receptive-field cone, ``refine`` is the approximate coarse-to-fine sweep. The method
itself (options, registration) is ``camshaft.engine.methods.occlusion``.
"""

from camshaft.engine.occlusion.fills import FILL_MODES, fill_values, gaussian_blur
from camshaft.engine.occlusion.sweep import SCORES, full_sweep, plain_evaluator, sweep_drops, target_scores
from camshaft.engine.occlusion.windows import Grid, all_pairs, occlude

__all__ = [
    "FILL_MODES",
    "SCORES",
    "Grid",
    "all_pairs",
    "fill_values",
    "full_sweep",
    "gaussian_blur",
    "occlude",
    "plain_evaluator",
    "sweep_drops",
    "target_scores",
]
