"""Every plot of a run: loss vs. cumulative training FLOPs (the compute-efficiency view for
comparing model variants) and the MoE layers x experts routing heatmap.

matplotlib is optional (not a declared dependency): without it plotting is skipped. The
object-oriented API (no pyplot) keeps no global figure state and needs no GUI backend.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mod_train.tracking import keys as K

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _new_figure(figsize: Tuple[float, float], out_png: PathLike) -> Any:
    """A Figure on an Agg canvas, or None (logged) when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("matplotlib is not installed; skipping %s", out_png)
        return None
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_png: PathLike) -> Path:
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def plot_loss_vs_flops(metrics_rows: Sequence[Mapping[str, Any]], out_png: PathLike,
                       loss_key: str = K.LM_LOSS, flops_key: str = K.TOTAL_FLOPS) -> Optional[Path]:
    """Write a log-x plot of ``loss_key`` against ``flops_key`` (e.g. rows of read_metrics).

    Returns the PNG path, or None when matplotlib is missing or no row has both finite values.
    """
    points = []
    for row in metrics_rows:
        x, y = row.get(flops_key), row.get(loss_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if math.isfinite(x) and math.isfinite(y) and x > 0:
                points.append((float(x), float(y)))
    if not points:
        log.info("no rows with both %r and %r; skipping %s", flops_key, loss_key, out_png)
        return None
    fig = _new_figure((6, 4), out_png)
    if fig is None:
        return None
    points.sort()
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
    ax.set_xscale("log")
    ax.set_xlabel(f"{flops_key}")
    ax.set_ylabel(loss_key)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out_png)


def plot_routing_heatmap(loads: Dict[int, List[float]], out_png: PathLike,
                         column_labels: Sequence[str], title: str = "") -> Optional[Path]:
    """Layers x experts heatmap of routing shares (``{1-based layer: share per column}``, as
    ``mod_train.model.moe.gather_routing_loads`` returns) as a PNG; None when there is nothing
    to draw or matplotlib is missing."""
    if not loads:
        return None
    layers = sorted(loads)
    fig = _new_figure((2.5 + 0.6 * len(column_labels), 1.4 + 0.45 * len(layers)), out_png)
    if fig is None:
        return None
    data = [loads[layer][:len(column_labels)] for layer in layers]
    ax = fig.add_subplot(1, 1, 1)
    top = max(max(row) for row in data) or 1.0
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
    ax.set_xticks(range(len(column_labels)), labels=list(column_labels))
    ax.set_yticks(range(len(layers)), labels=[f"layer {n}" for n in layers])
    ax.set_xlabel("expert")
    if len(column_labels) * len(layers) <= 256:
        for r, row in enumerate(data):
            for c, value in enumerate(row):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="k" if value > 0.6 * top else "w")
    fig.colorbar(image, ax=ax, label="share of routing slots")
    if title:
        ax.set_title(title)
    return _save(fig, out_png)
