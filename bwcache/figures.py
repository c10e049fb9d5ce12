"""Plotly figures and CSV export for BWCache traces.

A trace is the JSON-able dict the cache records (``Trace.to_dict()``)::

    {"config": {"threshold": ..., ...}, "num_blocks": N, "block_names": [...],
     "branches": {"cond": {"indicator": [T], "distance": [T][N], "reused": [T][N],
                           "trigger_step": int | None, "timesteps": [T]}, ...}}

Every figure is built from ``plotly.graph_objects`` only (figure factories are
gone in plotly 7) and serialises with ``fig.to_json()``.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "heatmap_figure",
    "indicator_figure",
    "tuning_figure",
    "sweep_figure",
    "trace_to_csv",
    "pareto_front",
]

_REUSED_MARKER = dict(symbol="x-thin", size=7, line=dict(width=1.6, color="#ff2d55"))
_TRIGGER_COLOR = "#d62728"
_ROW_HEIGHTS = (0.72, 0.28)


# ----------------------------------------------------------------------------- trace access


def _branch(trace: Mapping[str, Any], branch: str, role: str = "trace") -> Mapping[str, Any]:
    branches = trace.get("branches")
    if not isinstance(branches, Mapping):
        raise ValueError(f"{role} has no 'branches' mapping")
    if branch not in branches:
        available = ", ".join(repr(b) for b in branches) or "none"
        raise ValueError(f"unknown branch {branch!r} in {role}; available branches: {available}")
    return branches[branch]


def _block_names(trace: Mapping[str, Any]) -> list[str]:
    names = trace.get("block_names")
    n = trace.get("num_blocks")
    if names is None:
        if n is None:
            raise ValueError("trace has neither 'block_names' nor 'num_blocks'")
        return [f"blocks.{i}" for i in range(int(n))]
    if n is not None and len(names) != int(n):
        raise ValueError(f"trace lists {len(names)} block_names but num_blocks = {n}")
    return [str(x) for x in names]


def _matrix(rows: Sequence[Sequence[Any]], n_blocks: int, what: str) -> list[Sequence[Any]]:
    for t, row in enumerate(rows):
        if len(row) != n_blocks:
            raise ValueError(f"{what}[{t}] has {len(row)} entries, expected one per block ({n_blocks})")
    return list(rows)


def _distance_array(branch: Mapping[str, Any], n_blocks: int) -> np.ndarray:
    """(T, N) float array with NaN where the trace has None."""
    rows = _matrix(branch.get("distance", []), n_blocks, "distance")
    out = np.full((len(rows), n_blocks), np.nan, dtype=float)
    for t, row in enumerate(rows):
        for i, v in enumerate(row):
            if v is not None:
                out[t, i] = float(v)
    return out


def _reused_array(branch: Mapping[str, Any], n_blocks: int) -> np.ndarray:
    rows = _matrix(branch.get("reused", []), n_blocks, "reused")
    return np.array([[bool(v) for v in row] for row in rows], dtype=bool).reshape(len(rows), n_blocks)


def _optional_floats(values: Iterable[Any] | None, length: int) -> list[float | None]:
    vals = list(values or [])
    vals = vals[:length] + [None] * max(0, length - len(vals))
    return [None if v is None else float(v) for v in vals]


def _threshold(*traces: Mapping[str, Any] | None) -> float | None:
    for tr in traces:
        if tr is not None:
            thr = (tr.get("config") or {}).get("threshold")
            if thr is not None:
                return float(thr)
    return None


def _fmt(v: float | None, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


# ----------------------------------------------------------------------------- heatmap


def _indicator_traces(
    fig: go.Figure,
    branch_data: Mapping[str, Any],
    threshold: float | None,
    row: int | None,
    col: int | None,
    *,
    steps: int,
    name: str = "indicator",
) -> None:
    """Indicator line, dashed δ line and trigger marker, added to one subplot (or the whole figure)."""
    where = {} if row is None else dict(row=row, col=col)
    x = list(range(steps))
    indicator = _optional_floats(branch_data.get("indicator"), steps)
    timesteps = _optional_floats(branch_data.get("timesteps"), steps)
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[np.nan if v is None else v for v in indicator],
            mode="lines+markers",
            name=name,
            line=dict(color="#1f77b4", width=2),
            marker=dict(size=5),
            connectgaps=False,
            customdata=[_fmt(t, ".1f") for t in timesteps],
            hovertemplate="step %{x}<br>timestep %{customdata}<br>indicator %{y:.4g}<extra></extra>",
        ),
        **where,
    )
    if threshold is not None:
        fig.add_hline(
            y=threshold,
            line=dict(dash="dash", color="#444", width=1.5),
            annotation_text=f"δ = {threshold:g}",
            annotation_position="top left",
            name="threshold",
            **where,
        )
    trigger = branch_data.get("trigger_step")
    if trigger is not None:
        k = int(trigger)
        fig.add_vline(x=k, line=dict(dash="dot", color=_TRIGGER_COLOR, width=1.5), name="trigger", **where)
        y_k = indicator[k] if 0 <= k < len(indicator) else None
        fig.add_trace(
            go.Scatter(
                x=[k],
                y=[threshold if y_k is None else y_k],
                mode="markers",
                name=f"trigger (step {k})",
                marker=dict(symbol="star", size=13, color=_TRIGGER_COLOR, line=dict(width=1, color="white")),
                hovertemplate=f"reuse triggered at step {k}<extra></extra>",
            ),
            **where,
        )


def heatmap_figure(
    distance_trace: Mapping[str, Any],
    decision_trace: Mapping[str, Any] | None = None,
    branch: str = "cond",
    log_color: bool = False,
    title: str | None = None,
) -> go.Figure:
    """Block x step map of relative-L1 distances with reuse decisions overlaid.

    Row 1: a Heatmap, one row per block (first block on top), one column per
    step, coloured by ``distance_trace``'s distance (NaN where it recorded None,
    not hoverable); a Scatter named "reused" puts a marker on every cell that
    ``decision_trace`` (default: ``distance_trace``) reused. Row 2: the
    decision trace's indicator per step, a dashed line at δ (its config
    threshold) and the trigger step (dotted vertical line and star).

    ``log_color`` colours by log10(distance) (hover keeps raw values). The
    colour range tops out at the 99th percentile so one outlier (often step 1)
    does not flatten the rest. Raises ValueError for a branch missing from either trace.
    """
    decision_trace = distance_trace if decision_trace is None else decision_trace
    dist_branch = _branch(distance_trace, branch, "distance_trace")
    dec_branch = _branch(decision_trace, branch, "decision_trace")
    names = _block_names(distance_trace)
    n = len(names)
    if len(_block_names(decision_trace)) != n:
        raise ValueError(
            f"distance_trace has {n} blocks but decision_trace has {len(_block_names(decision_trace))}"
        )

    dist = _distance_array(dist_branch, n)  # (T, N)
    reused = _reused_array(dec_branch, n)
    steps = max(dist.shape[0], reused.shape[0])
    if dist.shape[0] < steps:
        dist = np.vstack([dist, np.full((steps - dist.shape[0], n), np.nan)])
    if reused.shape[0] < steps:
        reused = np.vstack([reused, np.zeros((steps - reused.shape[0], n), dtype=bool)])
    # Both runs share a scheduler; take whichever trace recorded timesteps.
    ts_source = dec_branch.get("timesteps") or []
    if all(v is None for v in ts_source):
        ts_source = dist_branch.get("timesteps") or []
    timesteps = _optional_floats(ts_source, steps)

    finite = dist[np.isfinite(dist)]
    if log_color:
        positive = finite[finite > 0]
        floor = float(positive.min()) if positive.size else 1e-6
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.where(np.isfinite(dist), np.maximum(dist, floor), np.nan))
        zf = z[np.isfinite(z)]
        zmin = float(np.percentile(zf, 1)) if zf.size else None
        zmax = float(np.percentile(zf, 99)) if zf.size else None
        color_title = "log10 rel-L1"
    else:
        z = dist
        zmin = 0.0
        zmax = float(np.percentile(finite, 99)) if finite.size else None
        color_title = "rel-L1"
    if zmin is not None and zmax is not None and zmax <= zmin:
        zmax = zmin + (abs(zmin) * 0.1 or 1e-6)

    x = list(range(steps))
    # customdata[block][step] = (timestep, raw distance, decision)
    custom = [
        [
            [_fmt(timesteps[t], ".1f"), _fmt(None if math.isnan(dist[t, i]) else float(dist[t, i])), "reused" if reused[t, i] else "computed"]
            for t in range(steps)
        ]
        for i in range(n)
    ]

    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=list(_ROW_HEIGHTS),
        vertical_spacing=0.05,
    )
    fig.add_trace(
        go.Heatmap(
            z=z.T,
            x=x,
            y=names,
            colorscale="Viridis",
            zmin=zmin,
            zmax=zmax,
            customdata=custom,
            hoverongaps=False,
            xgap=0.5,
            ygap=0.5,
            name="rel-L1",
            colorbar=dict(title=dict(text=color_title), len=_ROW_HEIGHTS[0], y=1.0, yanchor="top"),
            hovertemplate=(
                "block %{y}<br>step %{x}<br>timestep %{customdata[0]}"
                "<br>rel-L1 %{customdata[1]}<br>%{customdata[2]}<extra></extra>"
            ),
        ),
        row=1,
        col=1,
    )

    tt, bb = np.nonzero(reused)  # step-major order
    fig.add_trace(
        go.Scatter(
            x=[int(t) for t in tt],
            y=[names[b] for b in bb],
            mode="markers",
            name="reused",
            marker=_REUSED_MARKER,
            customdata=[[_fmt(timesteps[t], ".1f"), custom[b][t][1]] for t, b in zip(tt, bb)],
            hovertemplate=(
                "block %{y}<br>step %{x}<br>timestep %{customdata[0]}"
                "<br>rel-L1 %{customdata[1]}<br>reused<extra></extra>"
            ),
        ),
        row=1,
        col=1,
    )

    separate = decision_trace is not distance_trace
    if separate:
        # The map's own run: its indicator at every step (the cached run's stops where it stopped measuring).
        uncached = _optional_floats(dist_branch.get("indicator"), steps)
        fig.add_trace(
            go.Scatter(
                x=list(range(steps)), y=[np.nan if v is None else v for v in uncached], mode="lines",
                name="indicator (uncached run)", line=dict(color="#9aa0a6", width=2),
                hovertemplate="step %{x}<br>uncached indicator %{y:.4g}<extra></extra>",
            ),
            row=2, col=1,
        )
    _indicator_traces(fig, dec_branch, _threshold(decision_trace, distance_trace), 2, 1, steps=steps,
                      name="indicator (BWCache run)" if separate else "indicator")
    if dec_branch.get("trigger_step") is not None:
        fig.add_vline(
            x=int(dec_branch["trigger_step"]), line=dict(dash="dot", color=_TRIGGER_COLOR, width=1.5), row=1, col=1
        )

    fig.update_yaxes(title_text="block", autorange="reversed", type="category", row=1, col=1)
    fig.update_yaxes(title_text="indicator", type="log" if log_color else "linear", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    fig.update_layout(
        title=dict(text=title or f"Block × step relative L1 ({branch})"),
        template="plotly_white",
        height=max(420, 160 + 14 * n),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
        margin=dict(l=70, r=20, t=70, b=50),
    )
    return fig


def indicator_figure(trace: Mapping[str, Any], branch: str = "cond", title: str | None = None) -> go.Figure:
    """The indicator per step with the dashed δ line and the trigger step, on its own."""
    data = _branch(trace, branch)
    steps = max(len(data.get("indicator") or []), len(data.get("distance") or []))
    fig = go.Figure()
    _indicator_traces(fig, data, _threshold(trace), None, None, steps=steps)
    fig.update_layout(
        title=dict(text=title or f"Indicator per step ({branch})"),
        template="plotly_white",
        xaxis_title="step",
        yaxis_title="mean rel-L1",
        height=320,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
    )
    return fig


# ----------------------------------------------------------------------------- tuning and sweep


def tuning_figure(
    points: Sequence[Mapping[str, Any]],
    chosen_threshold: float | None = None,
    *,
    mode: str = "paper",
    estimated: bool = False,
    measured: Sequence[Mapping[str, Any]] = (),
) -> go.Figure:
    """Effect of δ: reuse fraction (left axis) and speedup (right axis) against δ, with the chosen δ marked by a
    dashed vertical line.

    ``points``: dicts with ``threshold``, ``trigger_step``, ``reuse_fraction``, ``predicted_speedup``, for the
    cache's ``mode`` (as the title names it): an exact prediction or, with ``estimated``, an estimate (block-wise
    mode), as the title and legend say. ``measured``: reuse fractions measured by real runs (``threshold``,
    ``reuse_fraction``), drawn as markers.
    """
    pts = sorted(points, key=lambda p: float(p["threshold"]))
    x = [float(p["threshold"]) for p in pts]
    trig = ["none" if p.get("trigger_step") is None else str(int(p["trigger_step"])) for p in pts]
    kind = "estimated" if estimated else "predicted"
    step_name = "trigger step" if mode == "paper" else "first reuse step"
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[_none_to_nan(p.get("reuse_fraction")) for p in pts],
            mode="lines+markers",
            name=f"{kind} reuse fraction",
            customdata=trig,
            hovertemplate=f"δ = %{{x:.3g}}<br>{kind} reuse %{{y:.1%}}<br>{step_name} %{{customdata}}<extra></extra>",
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=[_none_to_nan(p.get("predicted_speedup")) for p in pts],
            mode="lines+markers",
            name=f"{kind} speedup",
            line=dict(dash="dot"),
            customdata=trig,
            hovertemplate=f"δ = %{{x:.3g}}<br>{kind} speedup ×%{{y:.2f}}<br>{step_name} %{{customdata}}<extra></extra>",
        ),
        secondary_y=True,
    )
    if measured:
        runs = sorted(measured, key=lambda p: float(p["threshold"]))
        fig.add_trace(
            go.Scatter(
                x=[float(p["threshold"]) for p in runs],
                y=[_none_to_nan(p.get("reuse_fraction")) for p in runs],
                mode="markers",
                name="measured reuse fraction",
                marker=dict(symbol="diamond", size=11, color=_TRIGGER_COLOR, line=dict(width=1, color="white")),
                hovertemplate="δ = %{x:.3g}<br>measured reuse %{y:.1%}<extra></extra>",
            ),
            secondary_y=False,
        )
    if chosen_threshold is not None:
        fig.add_vline(
            x=float(chosen_threshold),
            line=dict(dash="dash", color=_TRIGGER_COLOR),
            annotation_text=f"chosen δ = {float(chosen_threshold):g}",
            annotation_position="top",
            name="chosen",
        )
    fig.update_xaxes(title_text="δ (threshold)")
    fig.update_yaxes(title_text="reuse fraction", tickformat=".0%", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text=f"{kind} speedup (×)", rangemode="tozero", secondary_y=True)
    title = f"Threshold tuning ({'estimated' if estimated else 'predicted exactly'} for {mode} mode)"
    # The legend goes under the plot: above it, the chosen δ's label sits on the top edge.
    fig.update_layout(
        title=dict(text=title),
        template="plotly_white",
        height=420,
        margin=dict(b=110),
        legend=dict(orientation="h", yanchor="top", y=-0.22, xanchor="center", x=0.5),
    )
    return fig


def _none_to_nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both
    maximised), ordered by the first coordinate ascending."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front: list[int] = []
    best_y = -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def sweep_figure(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> go.Figure:
    """Measured speedup (x) against PSNR (y), one point per run labelled ``δ=…``,
    with a dashed Pareto frontier per group.

    ``rows``: dicts with ``threshold``, ``speedup``, ``psnr``, ``ssim``,
    ``reuse_fraction`` and optionally ``label`` (method name; one colour and one
    frontier per label). PSNR of ``inf`` (output identical to the uncached run)
    is drawn 3 dB above the highest finite PSNR, with "∞" in its label and hover.
    """
    finite_psnr = [float(r["psnr"]) for r in rows if r.get("psnr") is not None and math.isfinite(float(r["psnr"]))]
    inf_y = (max(finite_psnr) + 3.0) if finite_psnr else 60.0

    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get("label") or "BWCache"), []).append(r)

    fig = go.Figure()
    palette = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880"]
    for gi, (label, group) in enumerate(groups.items()):
        color = palette[gi % len(palette)]
        xs, ys, texts, hover = [], [], [], []
        for r in group:
            p = r.get("psnr")
            p = float("nan") if p is None else float(p)
            infinite = math.isinf(p) and p > 0
            xs.append(float(r["speedup"]))
            ys.append(inf_y if infinite else p)
            thr = r.get("threshold")
            texts.append(("δ=" + _fmt(None if thr is None else float(thr), "g")) + (" (∞ dB)" if infinite else ""))
            hover.append(
                [
                    _fmt(None if thr is None else float(thr), "g"),
                    "∞" if infinite else _fmt(p, ".2f"),
                    _fmt(None if r.get("ssim") is None else float(r["ssim"])),
                    _fmt(None if r.get("reuse_fraction") is None else 100.0 * float(r["reuse_fraction"]), ".1f"),
                    label,
                ]
            )
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers+text",
                name=label,
                text=texts,
                textposition="top center",
                marker=dict(size=10, color=color),
                customdata=hover,
                hovertemplate=(
                    "%{customdata[4]}<br>δ = %{customdata[0]}<br>speedup ×%{x:.2f}<br>PSNR %{customdata[1]} dB"
                    "<br>SSIM %{customdata[2]}<br>reuse %{customdata[3]}%<extra></extra>"
                ),
            )
        )
        pts = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        if len(pts) >= 2:
            front = pareto_front(pts)
            fig.add_trace(
                go.Scatter(
                    x=[pts[i][0] for i in front],
                    y=[pts[i][1] for i in front],
                    mode="lines",
                    name=f"{label} Pareto frontier",
                    line=dict(dash="dash", color=color, width=1.5),
                    hoverinfo="skip",
                )
            )
    fig.update_layout(
        title=dict(text=title or "Speed vs fidelity"),
        template="plotly_white",
        xaxis_title="measured speedup (×)",
        yaxis_title="PSNR vs uncached (dB)",
        height=420,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1),
    )
    return fig


# ----------------------------------------------------------------------------- CSV


CSV_COLUMNS = (
    "branch",
    "step",
    "timestep",
    "block_index",
    "block_name",
    "distance",
    "reused",
    "indicator",
    "trigger_step",
)


def trace_to_csv(trace: Mapping[str, Any]) -> str:
    """Long-format CSV, one row per branch x step x block, columns ``CSV_COLUMNS``.

    Missing values (None) are empty cells; ``reused`` is 1 or 0; floats keep full precision.
    """
    names = _block_names(trace)
    n = len(names)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def cell(v: Any) -> Any:
        return "" if v is None else (repr(float(v)) if isinstance(v, float) else v)

    for bname, data in (trace.get("branches") or {}).items():
        dist = _matrix(data.get("distance", []), n, "distance")
        reused = _matrix(data.get("reused", []), n, "reused")
        steps = max(len(dist), len(reused), len(data.get("indicator") or []))
        indicator = list(data.get("indicator") or [])
        timesteps = list(data.get("timesteps") or [])
        trigger = data.get("trigger_step")
        for t in range(steps):
            ts = timesteps[t] if t < len(timesteps) else None
            ind = indicator[t] if t < len(indicator) else None
            for i in range(n):
                d = dist[t][i] if t < len(dist) else None
                r = bool(reused[t][i]) if t < len(reused) else False
                w.writerow([bname, t, cell(ts), i, names[i], cell(d), int(r), cell(ind), cell(trigger)])
    return buf.getvalue()
