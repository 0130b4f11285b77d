"""Loss vs. cumulative training FLOPs, the compute-efficiency view for comparing model variants.

matplotlib is optional (not a declared dependency): without it plotting is skipped.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from mod_train.tracking import keys as K

log = logging.getLogger(__name__)


def plot_loss_vs_flops(metrics_rows: Sequence[Mapping[str, Any]], out_png: Union[str, os.PathLike],
                       loss_key: str = K.LM_LOSS, flops_key: str = K.TOTAL_FLOPS) -> Optional[Path]:
    """Write a log-x plot of ``loss_key`` against ``flops_key`` (e.g. rows of read_metrics).

    Returns the PNG path, or None when matplotlib is missing or no row has both finite values.
    """
    try:
        # The object-oriented API: no pyplot, so no global figure state and no GUI backend.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed; skipping %s", out_png)
        return None

    points = []
    for row in metrics_rows:
        x, y = row.get(flops_key), row.get(loss_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if math.isfinite(x) and math.isfinite(y) and x > 0:
                points.append((float(x), float(y)))
    if not points:
        log.info("no rows with both %r and %r; skipping %s", flops_key, loss_key, out_png)
        return None
    points.sort()

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
    ax.set_xscale("log")
    ax.set_xlabel(f"{flops_key}")
    ax.set_ylabel(loss_key)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
