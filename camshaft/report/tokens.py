"""Token attributions as HTML: each token shaded by its weight (the seeds' text view).

Positive weights shade red, negative ones blue, with opacity ``|w| / scale`` (``scale`` defaults
to the largest ``|w|``); each token's weight is in its tooltip. Tokens are HTML-escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from camshaft.errors import ConfigError

POSITIVE, NEGATIVE = (220, 38, 38), (37, 99, 235)


def token_alpha(weight: float, scale: float) -> float:
    """Opacity in [0, 1] of a token of ``weight``: ``min(1, |weight| / scale)``, 0 when scale is 0."""
    return 0.0 if scale <= 0 else min(1.0, abs(weight) / scale)


def render_tokens(pairs: Sequence[tuple[str, float]], *, scale: float | None = None, separator: str = " ") -> str:
    """(token, weight) pairs -> an HTML ``<div>`` of shaded ``<span>`` elements.

    Args:
        pairs: the tokens in order with their attribution weights (finite numbers).
        scale: the weight shown at full opacity (default: the largest absolute weight).
        separator: put between tokens (" " for words; "" for sub-word tokens that carry spaces).
    """
    bad = [f"{i}: {w!r}" for i, (_, w) in enumerate(pairs) if not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ConfigError(f"token weights must be finite numbers; received {', '.join(bad[:10])}")
    if scale is not None and not scale > 0:
        raise ConfigError(f"scale must be positive, received {scale}")
    top = scale if scale is not None else max((abs(w) for _, w in pairs), default=0.0)
    spans = []
    for token, weight in pairs:
        r, g, b = POSITIVE if weight >= 0 else NEGATIVE
        alpha = token_alpha(weight, top)
        style = f"background-color: rgba({r}, {g}, {b}, {alpha:.3f})"
        if alpha > 0.6:
            style += "; color: #ffffff"
        spans.append(f'<span class="token" style="{style}" title="{weight:.4g}">{html.escape(str(token))}</span>')
    return f'<div class="tokens">{html.escape(separator).join(spans)}</div>'
