"""Plots of a mixed-precision plan for the HTML report: per-node sensitivity and the frontier."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["frontier_figure", "sensitivity_figure"]

_COLORS = {"int8": "#2b8cbe", "fp16": "#f0a30a", "fp32": "#d7301f"}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sensitivity_figure(
    loss: Mapping[str, float], precision: Mapping[str, str], budget_loss: float | None
) -> dict[str, str]:
    """Bar per node (most sensitive first): output loss when that node alone is INT8."""
    plt = _pyplot()
    names = sorted(loss, key=lambda n: -loss[n] if math.isfinite(loss[n]) else -math.inf)
    values = [max(loss[n], 1e-12) if math.isfinite(loss[n]) else 1.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(names)), 3.5))
    ax.bar(range(len(names)), values, color=[_COLORS.get(precision.get(n, "int8"), "#888") for n in names])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("output loss, node alone INT8")
    if budget_loss is not None and budget_loss > 0:
        ax.axhline(budget_loss, color="k", linestyle="--", linewidth=0.8, label="budget")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, list(_COLORS), fontsize=7, title="chosen", title_fontsize=7)
    out = {"title": "per-node sensitivity (colour: chosen precision)", "png_base64": _png(fig)}
    plt.close(fig)
    return out


def frontier_figure(points: Sequence[Mapping[str, Any]], budget_loss: float | None) -> dict[str, str]:
    """Every plan tried: non-INT8 node count vs output loss; size as marker area."""
    plt = _pyplot()
    timed = [p for p in points if p.get("latency_ms") is not None]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11.0 if timed else 6.0, 3.5), squeeze=False)
    sizes = [p["size_bytes"] for p in points]
    biggest = max(sizes) if sizes else 1
    panels = [("nodes not INT8", points, "non_int8")] + ([("CPU latency (ms)", timed, "latency_ms")] if timed else [])
    for ax, (label, rows, key) in zip(axes[0], panels, strict=True):
        ys = [max(p["loss"], 1e-12) if math.isfinite(p["loss"]) else 1.0 for p in rows]
        colors = ["#1a9641" if p["ok"] else "#d7191c" for p in rows]
        area = [20 + 80 * p["size_bytes"] / biggest for p in rows]
        ax.scatter([p[key] for p in rows], ys, s=area, c=colors, alpha=0.7)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("output loss")
        if budget_loss is not None and budget_loss > 0:
            ax.axhline(budget_loss, color="k", linestyle="--", linewidth=0.8)
    fig.subplots_adjust(wspace=0.3)
    out = {"title": "frontier: every plan tried (green meets the budget; area ~ size)", "png_base64": _png(fig)}
    plt.close(fig)
    return out
