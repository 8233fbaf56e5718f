"""The run report's plots: matplotlib figures as SVG data URIs (shown with ``<img>``,
so a plot can neither run script nor clash with the page's ids)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.figure import Figure  # figures without pyplot: no GUI backend, no global figure state

COLORS = {"video": "#4c72b0", "audio": "#dd8452", "image": "#55a868", "text": "#8172b3"}
ACCENT = "#4c72b0"
FAIL = "#c44e52"
_RC: Any = {  # matplotlib types rcParams keys as literals
    "svg.fonttype": "path",
    "svg.hashsalt": "xmodal-index-report",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _figure(width_in: float = 6.4, height_in: float = 2.4) -> Figure:
    return Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")


def svg_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def throughput_plot(
    series: Sequence[tuple[float, float]], finished: Sequence[tuple[float, int]], failed: Sequence[tuple[float, int]]
) -> str:
    """Media-seconds decoded per second over the DAG's time, with items finished (cumulative)."""
    with matplotlib.rc_context(_RC):
        fig = _figure()
        ax = fig.add_subplot()
        xs = [t for t, _ in series]
        width = (xs[1] - xs[0]) if len(xs) > 1 else 1.0
        ax.bar(xs, [r for _, r in series], width=width * 0.95, color=ACCENT, alpha=0.8, label="media-s per s")
        ax.set_xlabel("seconds since the DAG started")
        ax.set_ylabel("media-seconds / second")
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        # failures are placed when their dead letters were written, which can trail the failure
        for points, color, label in ((finished, "#333333", "items done"), (failed, FAIL, "dead letters written")):
            if points:
                ax2.step(
                    [0.0] + [t for t, _ in points], [0] + [n for _, n in points], where="post", color=color, label=label
                )
        ax2.set_ylabel("items (cumulative)")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", frameon=False, fontsize=8)
        return svg_data_uri(fig)


def phases_plot(phases: Sequence[tuple[str, float, float]]) -> str:
    """Run phases as bars along the run's time axis: (name, start_s, seconds)."""
    with matplotlib.rc_context(_RC):
        fig = _figure(height_in=0.45 * len(phases) + 0.8)
        ax = fig.add_subplot()
        names = [p[0] for p in phases][::-1]
        ax.barh(names, [p[2] for p in phases][::-1], left=[p[1] for p in phases][::-1], color=ACCENT)
        for y, (_, start, secs) in enumerate(list(phases)[::-1]):
            ax.annotate(
                f"{secs:.2f} s", (start + secs, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8
            )
        ax.set_xlabel("seconds since the run started")
        ax.margins(x=0.15)
        return svg_data_uri(fig)


def counts_plot(counts: dict[str, int], xlabel: str, color_by_name: bool = True, color: str = ACCENT) -> str:
    """Horizontal bars, one per name (modality, stage, ...)."""
    with matplotlib.rc_context(_RC):
        fig = _figure(height_in=0.35 * len(counts) + 0.8)
        ax = fig.add_subplot()
        names = list(counts)[::-1]
        values = [counts[n] for n in names]
        colors = [COLORS.get(n, color) if color_by_name else color for n in names]
        ax.barh(names, values, color=colors)
        for y, v in enumerate(values):
            ax.annotate(str(v), (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_xlabel(xlabel)
        ax.margins(x=0.12)
        return svg_data_uri(fig)
