"""Figures built from trace dicts: content, hover data, overlays and serialisation."""

import csv
import io
import json
import math

import numpy as np
import plotly.graph_objects as go
import pytest

from bwcache.figures import (
    CSV_COLUMNS,
    heatmap_figure,
    indicator_figure,
    pareto_front,
    sweep_figure,
    trace_to_csv,
    tuning_figure,
)

T, N = 8, 4


def make_trace(branches=("cond", "uncond"), trigger=3, threshold=0.15, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for b in branches:
        reused = [[t > trigger and t % 2 == 0 for _ in range(N)] for t in range(T)]
        reused[5][1] = True  # a lone per-block reuse
        dist = [
            [None if t == 0 or reused[t][i] else round(float(rng.uniform(0.01, 0.5)), 6) for i in range(N)]
            for t in range(T)
        ]
        out[b] = {
            "indicator": [None] + [round(float(rng.uniform(0.05, 0.4)), 6) for _ in range(T - 1)],
            "distance": dist,
            "reused": reused,
            "trigger_step": trigger,
            "timesteps": [1000.0 - 125 * t for t in range(T)],
        }
    return {
        "config": {"threshold": threshold, "reuse_interval": 1, "tail_fraction": 0.5, "mode": "paper", "num_inference_steps": T},
        "num_blocks": N,
        "block_names": [f"blocks.{i}" for i in range(N)],
        "branches": out,
    }


def by_name(fig, name):
    return [tr for tr in fig.data if tr.name == name]


def test_heatmap_cells_nan_and_hover():
    tr = make_trace()
    fig = heatmap_figure(tr, branch="cond")
    heat = [d for d in fig.data if isinstance(d, go.Heatmap)]
    assert len(heat) == 1
    h = heat[0]
    z = np.asarray(h.z, dtype=float)
    assert z.shape == (N, T)  # rows = blocks, columns = steps
    assert list(h.y) == tr["block_names"] and list(h.x) == list(range(T))
    assert h.hoverongaps is False
    dist = tr["branches"]["cond"]["distance"]
    for t in range(T):
        for i in range(N):
            if dist[t][i] is None:
                assert math.isnan(z[i, t])
            else:
                assert z[i, t] == pytest.approx(dist[t][i])
    # customdata[block][step] = timestep, distance, decision
    cd = h.customdata
    assert list(cd[2][1]) == ["875.0", format(dist[1][2], ".4g"), "computed"]
    assert list(cd[1][5])[2] == "reused" and list(cd[1][5])[1] == "n/a"
    assert "customdata[2]" in h.hovertemplate and "%{y}" in h.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"  # first block on top


def test_reused_scatter_points_are_exactly_the_reused_cells():
    tr = make_trace()
    fig = heatmap_figure(tr, branch="uncond")
    (sc,) = by_name(fig, "reused")
    assert isinstance(sc, go.Scatter)
    got = set(zip(sc.x, sc.y))
    reused = tr["branches"]["uncond"]["reused"]
    expected = {(t, f"blocks.{i}") for t in range(T) for i in range(N) if reused[t][i]}
    assert got == expected and len(sc.x) == len(expected)
    assert all(row[0] == format(1000.0 - 125 * t, ".1f") for t, row in zip(sc.x, sc.customdata))


def test_decision_trace_overrides_decisions_and_indicator():
    dist_tr = make_trace(trigger=99)  # observe-only run: nothing reused
    for b in dist_tr["branches"].values():
        b["reused"] = [[False] * N for _ in range(T)]
        b["distance"] = [[None if t == 0 else 0.01 * (t + 1) + 0.001 * i for i in range(N)] for t in range(T)]
        b["trigger_step"] = None
    dec_tr = make_trace(trigger=3, threshold=0.2, seed=1)
    fig = heatmap_figure(dist_tr, dec_tr, branch="cond")
    (sc,) = by_name(fig, "reused")
    expected = {(t, f"blocks.{i}") for t in range(T) for i in range(N) if dec_tr["branches"]["cond"]["reused"][t][i]}
    assert set(zip(sc.x, sc.y)) == expected
    (ind,) = by_name(fig, "indicator (BWCache run)")
    assert ind.y[1] == pytest.approx(dec_tr["branches"]["cond"]["indicator"][1])
    (own,) = by_name(fig, "indicator (uncached run)")
    assert list(own.y[1:]) == pytest.approx(dist_tr["branches"]["cond"]["indicator"][1:])
    assert any(s.y0 == 0.2 and s.y1 == 0.2 for s in fig.layout.shapes)  # δ from the decision trace
    # colour still comes from the distance trace, including cells the decision trace reused
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z[1, 5] == pytest.approx(dist_tr["branches"]["cond"]["distance"][5][1])
    assert fig.data[0].customdata[1][5][2] == "reused"


def test_indicator_row_threshold_line_and_trigger():
    tr = make_trace(trigger=3, threshold=0.15)
    fig = heatmap_figure(tr)
    (ind,) = by_name(fig, "indicator")
    assert ind.yaxis == "y2" and math.isnan(ind.y[0])
    hlines = [s for s in fig.layout.shapes if s.y0 == 0.15 and s.y1 == 0.15]
    assert len(hlines) == 1 and hlines[0].line.dash == "dash" and hlines[0].yref == "y2"
    assert any(s.x0 == 3 and s.x1 == 3 for s in fig.layout.shapes)
    trig = [d for d in fig.data if (d.name or "").startswith("trigger")]
    assert len(trig) == 1 and list(trig[0].x) == [3]


def test_log_colour_and_robust_zmax():
    tr = make_trace()
    tr["branches"]["cond"]["distance"][1][0] = 1000.0  # one outlier must not set the scale
    lin = heatmap_figure(tr)
    assert lin.data[0].zmax < 1.0 * 1000 and lin.data[0].zmin == 0
    log = heatmap_figure(tr, log_color=True)
    z = np.asarray(log.data[0].z, dtype=float)
    assert z[2, 1] == pytest.approx(math.log10(tr["branches"]["cond"]["distance"][1][2]))
    assert log.data[0].customdata[2][1][1] == format(tr["branches"]["cond"]["distance"][1][2], ".4g")  # raw in hover
    assert log.layout.yaxis2.type == "log"


def test_unknown_branch_lists_available():
    tr = make_trace(branches=("cond", "uncond"))
    with pytest.raises(ValueError, match=r"'default'.*'cond', 'uncond'"):
        heatmap_figure(tr, branch="default")
    with pytest.raises(ValueError, match="cond"):
        indicator_figure(tr, branch="nope")


def test_figures_serialise_to_json():
    tr = make_trace(branches=("default",))
    for fig in (
        heatmap_figure(tr, branch="default", title="t"),
        heatmap_figure(tr, branch="default", log_color=True),
        indicator_figure(tr, branch="default"),
        tuning_figure(
            [{"threshold": d, "trigger_step": None if d == 0 else 5, "reuse_fraction": d, "predicted_speedup": 1 + d} for d in (0.0, 0.1, 0.2)],
            0.1,
        ),
        sweep_figure([{"threshold": 0.0, "speedup": 1.0, "psnr": math.inf, "ssim": 1.0, "reuse_fraction": 0.0}]),
    ):
        assert isinstance(fig, go.Figure)
        data = json.loads(fig.to_json())
        assert data["data"]


def test_heatmap_of_trace_with_no_distances():
    tr = make_trace(branches=("default",))
    b = tr["branches"]["default"]
    b["distance"] = [[None] * N for _ in range(T)]
    b["indicator"] = [None] * T
    b["trigger_step"] = None
    json.loads(heatmap_figure(tr, branch="default").to_json())


def test_indicator_figure_standalone():
    tr = make_trace()
    fig = indicator_figure(tr, "cond")
    assert [d.name for d in fig.data][0] == "indicator"
    assert any(s.y0 == 0.15 and s.line.dash == "dash" for s in fig.layout.shapes)


def test_tuning_figure_axes_and_chosen_marker():
    pts = [
        {"threshold": 0.2, "trigger_step": 4, "reuse_fraction": 0.5, "predicted_speedup": 1.9},
        {"threshold": 0.05, "trigger_step": 12, "reuse_fraction": 0.1, "predicted_speedup": 1.1},
        {"threshold": 0.1, "trigger_step": 8, "reuse_fraction": 0.3, "predicted_speedup": 1.4},
    ]
    fig = tuning_figure(pts, 0.1)
    reuse, speed = fig.data
    assert list(reuse.x) == [0.05, 0.1, 0.2] and list(reuse.y) == [0.1, 0.3, 0.5]
    assert list(speed.y) == [1.1, 1.4, 1.9] and speed.yaxis == "y2"
    assert any(s.x0 == 0.1 and s.x1 == 0.1 for s in fig.layout.shapes)


def test_tuning_figure_says_predicted_or_estimated_and_marks_measured_runs():
    pts = [
        {"threshold": 0.05, "trigger_step": 12, "reuse_fraction": 0.1, "predicted_speedup": 1.1},
        {"threshold": 0.1, "trigger_step": 8, "reuse_fraction": 0.3, "predicted_speedup": 1.4},
    ]
    exact = tuning_figure(pts, 0.1)
    assert exact.layout.title.text == "Threshold tuning (predicted exactly for paper mode)"
    assert [d.name for d in exact.data] == ["predicted reuse fraction", "predicted speedup"]
    assert "trigger step" in exact.data[0].hovertemplate
    estimate = tuning_figure(pts, 0.1, mode="block-wise", estimated=True,
                             measured=[{"threshold": 0.1, "reuse_fraction": 0.35}])
    assert estimate.layout.title.text == "Threshold tuning (estimated for block-wise mode)"
    reuse, speed, runs = estimate.data
    assert (reuse.name, speed.name, runs.name) == ("estimated reuse fraction", "estimated speedup",
                                                   "measured reuse fraction")
    assert "first reuse step" in reuse.hovertemplate and estimate.layout.yaxis2.title.text == "estimated speedup (×)"
    # On the reuse axis, next to the estimate it checks.
    assert list(runs.x) == [0.1] and list(runs.y) == [0.35] and runs.yaxis == reuse.yaxis == "y"


def test_pareto_front():
    pts = [(1.0, 40.0), (1.5, 35.0), (1.4, 30.0), (2.0, 20.0), (2.0, 25.0)]
    assert pareto_front(pts) == [0, 1, 4]


def test_sweep_figure_groups_labels_and_frontier():
    rows = [
        {"threshold": 0.05, "speedup": 1.2, "psnr": 35.0, "ssim": 0.95, "reuse_fraction": 0.2, "label": "BWCache"},
        {"threshold": 0.15, "speedup": 1.8, "psnr": 28.0, "ssim": 0.9, "reuse_fraction": 0.4, "label": "BWCache"},
        {"threshold": 0.25, "speedup": 1.7, "psnr": 25.0, "ssim": 0.85, "reuse_fraction": 0.5, "label": "BWCache"},
        {"threshold": 0.1, "speedup": 1.5, "psnr": 24.0, "ssim": 0.8, "reuse_fraction": 0.3, "label": "TeaCache"},
        {"threshold": 0.2, "speedup": 2.0, "psnr": 20.0, "ssim": 0.7, "reuse_fraction": 0.5, "label": "TeaCache"},
    ]
    fig = sweep_figure(rows)
    names = [d.name for d in fig.data]
    assert names == ["BWCache", "BWCache Pareto frontier", "TeaCache", "TeaCache Pareto frontier"]
    bw = fig.data[0]
    assert list(bw.text) == ["δ=0.05", "δ=0.15", "δ=0.25"]
    assert list(bw.x) == [1.2, 1.8, 1.7] and list(bw.y) == [35.0, 28.0, 25.0]
    assert bw.customdata[1][2] == "0.9" and "SSIM" in bw.hovertemplate
    front = fig.data[1]
    assert list(front.x) == [1.2, 1.8] and front.line.dash == "dash"  # δ=0.25 is dominated
    assert fig.data[0].marker.color != fig.data[2].marker.color


def test_sweep_infinite_psnr_drawn_above_finite():
    rows = [
        {"threshold": 0.0, "speedup": 1.0, "psnr": math.inf, "ssim": 1.0, "reuse_fraction": 0.0},
        {"threshold": 0.1, "speedup": 1.5, "psnr": 30.0, "ssim": 0.9, "reuse_fraction": 0.3},
    ]
    fig = sweep_figure(rows)
    assert fig.data[0].name == "BWCache"
    assert list(fig.data[0].y) == [33.0, 30.0] and "∞" in fig.data[0].text[0]


def test_trace_to_csv_rows_and_values():
    tr = make_trace(branches=("cond", "uncond"))
    text = trace_to_csv(tr)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) == 2 * T * N
    row = next(r for r in rows if r["branch"] == "uncond" and r["step"] == "1" and r["block_index"] == "2")
    b = tr["branches"]["uncond"]
    assert row["block_name"] == "blocks.2"
    assert float(row["distance"]) == b["distance"][1][2]
    assert float(row["timestep"]) == 875.0
    assert float(row["indicator"]) == b["indicator"][1]
    assert row["reused"] == "0" and row["trigger_step"] == "3"
    first = rows[0]
    assert first["distance"] == "" and first["indicator"] == ""  # None -> empty
    assert sum(r["reused"] == "1" for r in rows) == sum(sum(map(sum, br["reused"])) for br in tr["branches"].values())
