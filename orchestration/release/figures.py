"""Plotly figures of the run's curves and data mix, as JSON the page draws with plotly.js.

Every curve is against the global step, with the same marks: stage starts (dashed lines),
skipped batches (red crosses; a spike far above the accepted steps' range is drawn at the top
edge with its value in the hover, so one spike never flattens the curve), windows deferred to
the end of their stage (shaded) and rollbacks (dotted lines). Long runs are thinned to
``MAX_POINTS`` per line (every k-th step, the last one kept); marks are never thinned. Plots
are SVG (no WebGL: it needs a GPU or a software fallback that headless browsers may lack).
"""

from __future__ import annotations

import json
import math
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

MAX_POINTS = 10_000
SKIP_COLOR = "#d62728"


def _thin(points: list[list[float]]) -> list[list[float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _xy(points: list[list[float]]) -> tuple[list, list]:
    points = _thin(points)
    return [p[0] for p in points], [p[1] for p in points]


def _scatter(points, name: str, **kwargs) -> go.Scatter:
    x, y = _xy(points)
    return go.Scatter(x=x, y=y, name=name, **kwargs)


def _marks(fig: go.Figure, c: dict[str, Any]) -> None:
    for s in c["stages"]:
        if isinstance(s.get("step"), (int, float)):
            fig.add_vline(x=s["step"], line_dash="dash", line_color="grey", line_width=1,
                          annotation_text=str(s.get("stage", "")), annotation_position="top left",
                          annotation_font_size=10)
    for d in c["deferred"]:
        fig.add_vrect(x0=d["first_step"] - 0.5, x1=d["last_step"] + 0.5, fillcolor="orange",
                      opacity=0.15, line_width=0,
                      annotation_text=f"deferred to {d.get('to', 'stage end')}",
                      annotation_position="bottom left", annotation_font_size=10)
    for r in c["rollbacks"]:
        if isinstance(r.get("to_step"), (int, float)):
            fig.add_vline(x=r["to_step"], line_dash="dot", line_color="purple", line_width=1)


def _skip_trace(c: dict[str, Any], key: str, lo: float | None, hi: float | None):
    """Red crosses at the skipped steps' values, clipped into [lo, hi]."""
    by_step = {int(s): v for s, v in c["train"].get(key, [])}
    xs, ys, text = [], [], []
    for skip in c["skipped"]:
        value = by_step.get(skip["step"])
        shown = value if value is not None else lo
        if value is not None and hi is not None and value > hi:
            shown = hi
        if shown is None:
            continue
        xs.append(skip["step"])
        ys.append(shown)
        text.append(f"step {skip['step']}: {skip.get('reason')}"
                    + (f"<br>{key} {value:.4g}" if value is not None else ""))
    if not xs:
        return None
    return go.Scatter(x=xs, y=ys, mode="markers", name=f"skipped ({len(xs)})", text=text,
                      hoverinfo="text", marker={"symbol": "x", "color": SKIP_COLOR, "size": 9})


def _layout(fig: go.Figure, title: str, ytitle: str, log_y: bool = False) -> dict[str, Any]:
    fig.update_layout(title=title, xaxis_title="step", yaxis_title=ytitle, template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 50, "b": 45}, height=380,
                      legend={"orientation": "h", "y": -0.2}, hovermode="closest")
    if log_y:
        fig.update_yaxes(type="log")
    return json.loads(pio.to_json(fig))


def _accepted(c: dict[str, Any], key: str) -> list[list[float]]:
    skipped = {s["step"] for s in c["skipped"]}
    return [p for p in c["train"].get(key, []) if p[0] not in skipped]


def _range(values: list[float], log_y: bool = False) -> tuple[float | None, float | None]:
    values = [v for v in values if not log_y or v > 0]
    if not values:
        return None, None
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return (lo, hi) if log_y else (lo - pad, hi + pad)


def loss_figure(c: dict[str, Any]) -> dict[str, Any]:
    fig = go.Figure()
    train = _accepted(c, "loss")
    fig.add_trace(_scatter(train, "train", line={"width": 1, "color": "#1f77b4"}))
    values = [p[1] for p in train]
    for key, points in c["val"].items():
        label = "held-out" if key == "val_loss" else "held-out " + key.split("/", 1)[1]
        fig.add_trace(_scatter(points, label, mode="lines+markers",
                               line={"width": 2 if key == "val_loss" else 1}))
        values += [p[1] for p in points]
    lo, hi = _range(values)
    skips = _skip_trace(c, "loss", lo, hi)
    if skips is not None:
        fig.add_trace(skips)
    if lo is not None:
        fig.update_yaxes(range=[lo, hi])
    _marks(fig, c)
    return _layout(fig, "Loss: train and held-out per source", "loss (nats/token)")


def metric_figure(c: dict[str, Any], key: str, title: str, ytitle: str,
                  log_y: bool = False, skipped_in_line: bool = False) -> dict[str, Any]:
    """One series; skipped steps are marked, and left out of the line unless
    ``skipped_in_line`` (the LR schedule moves on through a skipped batch)."""
    fig = go.Figure()
    points = c["train"].get(key, []) if skipped_in_line else _accepted(c, key)
    fig.add_trace(_scatter(points, key, line={"width": 1}))
    lo, hi = _range([p[1] for p in points], log_y)
    skips = _skip_trace(c, key, lo, hi)
    if skips is not None:
        fig.add_trace(skips)
    _marks(fig, c)
    return _layout(fig, title, ytitle, log_y)


def throughput_figure(c: dict[str, Any]) -> dict[str, Any]:
    fig = go.Figure()
    fig.add_trace(_scatter(_accepted(c, "tokens_per_s"), "tokens/s", line={"width": 1}))
    if c["train"].get("mfu"):
        fig.add_trace(_scatter(_accepted(c, "mfu"), "MFU", yaxis="y2", line={"width": 1}))
        fig.update_layout(yaxis2={"title": "MFU", "overlaying": "y", "side": "right",
                                  "tickformat": ".0%"})
    _marks(fig, c)
    return _layout(fig, "Throughput", "tokens / s")


def curve_figures(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The curves view: loss, LR, grad norm, throughput (empty series give empty plots)."""
    return {
        "loss": loss_figure(c),
        "lr": metric_figure(c, "lr", "Learning rate", "lr", skipped_in_line=True),
        "grad_norm": metric_figure(c, "grad_norm", "Gradient norm (before clipping)",
                                   "grad norm", log_y=True),
        "throughput": throughput_figure(c),
    }


def mix_figure(mix: dict[str, Any]) -> dict[str, Any] | None:
    """Each stage's blend as one stacked horizontal bar of the sources' shares."""
    stages = [s for s in mix["stages"] if s["sources"] and "share" in s["sources"][0]]
    if not stages:
        return None
    fig = go.Figure()
    names = list(dict.fromkeys(src["name"] for s in stages for src in s["sources"]))
    labels = [f"{s['index']}: {s['name']}" for s in stages]
    for name in names:
        shares = [next((src["share"] for src in s["sources"] if src["name"] == name), 0.0)
                  for s in stages]
        fig.add_trace(go.Bar(y=labels, x=shares, name=name, orientation="h",
                             hovertemplate=f"{name}: %{{x:.1%}}<extra></extra>"))
    fig.update_layout(barmode="stack", xaxis={"tickformat": ".0%", "range": [0, 1]},
                      yaxis={"autorange": "reversed"})
    out = _layout(fig, "Data mix per stage (share of the stage's tokens)", "stage")
    out["layout"]["xaxis"]["title"] = {"text": "share"}
    out["layout"]["height"] = 160 + 50 * len(stages)
    return out
