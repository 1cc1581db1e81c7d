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
    """Every plan tried: non-INT8 node count vs output loss; size as marker area.

    Screened plans (one session of the switch graph, a few feeds) are hollow circles; plans
    built for real are filled; the best screened plan that the time budget cut off before its
    verification is a black cross drawn on the budget line.
    """
    plt = _pyplot()
    timed = [p for p in points if p.get("latency_ms") is not None]
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(11.0 if timed else 6.0, 3.5), squeeze=False)
    sizes = [p["size_bytes"] for p in points if p.get("size_bytes")]
    biggest = max(sizes) if sizes else 1
    panels = [("nodes not INT8", points, "non_int8")] + ([("CPU latency (ms)", timed, "latency_ms")] if timed else [])
    line = budget_loss if budget_loss is not None and budget_loss > 0 else 1.0
    for ax, (label, rows, key) in zip(axes[0], panels, strict=True):
        for kind in ("screen", "built", "cut"):
            if kind == "cut":
                sel = [p for p in rows if p.get("cut_off")]
            elif kind == "screen":
                sel = [p for p in rows if p.get("data") == "screen" and not p.get("cut_off")]
            else:
                sel = [p for p in rows if p.get("data") != "screen" and not p.get("cut_off")]
            if not sel:
                continue
            xs = [p[key] for p in sel]
            if kind == "cut":
                ax.scatter(xs, [line] * len(sel), marker="x", c="k", s=60, label="cut off by the time budget")
                continue
            ys = [max(p["loss"], 1e-12) if _finite(p["loss"]) else 1.0 for p in sel]
            colors = ["#1a9641" if p["ok"] else "#d7191c" for p in sel]
            if kind == "screen":
                ax.scatter(xs, ys, s=24, facecolors="none", edgecolors=colors, alpha=0.6, label="screened")
            else:
                area = [20 + 80 * (p["size_bytes"] or 0) / biggest for p in sel]
                ax.scatter(xs, ys, s=area, c=colors, alpha=0.8, label="built and run")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("output loss")
        if budget_loss is not None and budget_loss > 0:
            ax.axhline(budget_loss, color="k", linestyle="--", linewidth=0.8)
        ax.legend(fontsize=7)
    fig.subplots_adjust(wspace=0.3)
    out = {"title": "frontier: every plan tried (green meets the budget; hollow: screened; area ~ size)",
           "png_base64": _png(fig)}  # fmt: skip
    plt.close(fig)
    return out


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)
