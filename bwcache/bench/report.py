"""The benchmark's report: its table, the speed–PSNR Pareto frontier and its figures, and the markdown write-up."""

from __future__ import annotations

from ..svg import Drawing
from ..trace import format_bytes
from .run import OVERHEAD_PROMPTS, OVERHEAD_REPEATS

COLOURS = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#ff7f0e", "#17becf"]


def markdown_table(rows) -> str:
    lines = [
        "| method | speedup (median) | range | PSNR dB (mean) | SSIM (mean) | block compute skipped |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["speedup"] is None:
            lines.append(f"| {row['label']} | n/a | | | | {row.get('skipped_reason') or ''} |")
            continue
        psnr = "∞" if row["psnr"] is None else f"{row['psnr']:.2f}"
        lines.append(
            f"| {row['label']} | {row['speedup']:.2f}× | {row['speedup_min']:.2f}–{row['speedup_max']:.2f} | {psnr} | "
            f"{row['ssim']:.4f} | {row['skipped']:.1%} |"
        )
    return "\n".join(lines)


def timing_lines(rows) -> str:
    """A note on each row whose median speedup is far from what its skipped compute gives (empty when none is)."""
    words = {"below_ideal": "below: the cache's own work or other load slowed its runs",
             "above_ideal": "above: other load slowed the uncached runs, so it is overstated"}
    flagged = [f"- {row['label']}: {row['speedup']:.2f}× against about {row['ideal_speedup']:.2f}× from the compute "
               f"it skipped ({words[row['timing_flag']]})" for row in rows if row.get("timing_flag") in words]
    if not flagged:
        return ""
    return "\nSpeedups far from what the skipped compute gives:\n" + "\n".join(flagged) + "\n"


def pareto(rows):
    """Rows not beaten on both speedup and PSNR by another row."""
    points = [r for r in rows if r["speedup"] is not None and r["psnr"] is not None]
    return [
        r for r in points
        if not any(o["speedup"] >= r["speedup"] and o["psnr"] >= r["psnr"] and (o["speedup"], o["psnr"]) != (r["speedup"], r["psnr"]) for o in points)
    ]


def pareto_svg(rows, width=720, height=440) -> str:
    """A dependency-free speedup-vs-PSNR scatter with each family's Pareto frontier."""
    points = [r for r in rows if r["speedup"] is not None and r["psnr"] is not None]
    if not points:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    families = list(dict.fromkeys(r["family"] for r in points))
    left, right, top, bottom = 60, 190, 20, 50
    xs = [r["speedup"] for r in points]
    ys = [r["psnr"] for r in points]
    drawing = Drawing(width, height)
    chart = drawing.chart((left, top, width - right, height - bottom), (min(1.0, min(xs)) * 0.95, max(xs) * 1.05),
                          (min(ys) - 1, max(ys) + 1))
    chart.axes()
    chart.x_label("speedup over uncached (×)")
    chart.y_label("PSNR vs uncached (dB)")
    chart.x_ticks(".2f")
    chart.y_ticks(".1f")
    legend = []
    for k, family in enumerate(families):
        colour = COLOURS[k % len(COLOURS)]
        members = [r for r in points if r["family"] == family]
        front = sorted(pareto(members), key=lambda r: r["speedup"])
        if len(front) > 1:
            chart.polyline([(r["speedup"], r["psnr"]) for r in front], colour, dash="4 3")
        chart.points([(r["speedup"], r["psnr"]) for r in members], colour,
                     titles=[f"{r['label']}: {r['speedup']:.2f}×, {r['psnr']:.2f} dB" for r in members])
        legend.append((family, colour, "point"))
    drawing.legend(width - right + 10, top + 10, legend)
    return drawing.render()


def pareto_figure(rows):
    """The interactive (plotly) counterpart of `pareto_svg`: every row with a PSNR, grouped by family."""
    from ..figures import sweep_figure

    return sweep_figure([_sweep_row(r) for r in rows if r["psnr"] is not None])


def _sweep_row(row):
    return {
        "threshold": row.get("threshold"),
        "speedup": row["speedup"],
        "psnr": row["psnr"],
        "ssim": row["ssim"],
        "reuse_fraction": row["skipped"],
        "label": row["family"],
    }


def report_markdown(results: dict, svg_path: str) -> str:
    o = results["overheads"]
    front = {r["key"] for r in pareto(results["rows"])}
    table = markdown_table(results["rows"])
    frontier = ", ".join(r["label"] for r in results["rows"] if r["key"] in front)
    s = results["settings"]
    return f"""## {results['model']} on {results['device']}

Command: `{results.get('command') or 'python -m bwcache bench'}`

Machine: {results['machine']}. Settings: {s['num_frames']} frames at {s['width']}×{s['height']}, {s['num_inference_steps']} steps,
guidance {s['guidance_scale']}; {len(results['prompts'])} prompts × {results['repeats']} timed repeats; uncached generation
{results['uncached_seconds_median']:.2f} s (median). Total benchmark time {results['seconds_total'] / 60:.1f} min.

{table}
{timing_lines(results["rows"])}
On the speed–PSNR Pareto frontier: {frontier}.

![speedup vs PSNR]({svg_path})

Overheads (BWCache, this machine, on the first {o.get('prompts', OVERHEAD_PROMPTS)} prompts). The cache's own work is timed inside one run: the
time in the hooked transformer and blocks minus their own forward, less what the timers cost alone.
- indicator cost, distances on every block at every step (threshold 0, the preset's token stride): {o['indicator_share_of_step']:.1%} of generation time;
- the cache's own work with the preset default config: {o['cache_work_share_default']:.1%} of the cached generation's time, so
  achieved ÷ ideal speedup by accounting (1 − that share): {1 - o['cache_work_share_default']:.3f}; with cached tensors
  in {o['other_storage'] or "the model's dtype"} instead: {o['cache_work_share_other_storage']:.1%};
- DiT blocks' own forward: {o['block_share_of_time']:.1%} of an uncached generation's time;
- achieved ÷ ideal speedup, wall-clock (the per-step fastest of {o.get('repeats', OVERHEAD_REPEATS)} alternating uncached and cached runs): {_ratio(o)};
- extra peak tensor memory over the uncached run (its weights + activations, {format_bytes(o['weights_bytes'])} + {format_bytes(o['peak_activation_bytes_uncached'])}):
{_memory_lines(o)}
"""


def _ratio(o: dict) -> str:
    if o["achieved_over_ideal"] is None:
        return "n/a"
    low, high = o["achieved_over_ideal_range"]
    return f"{o['achieved_over_ideal']:.3f} (median over prompts; {low:.3f}–{high:.3f})"


def _memory_lines(o: dict) -> str:
    return "\n".join(
        f"  - {m['over_total']:+.2%} ({format_bytes(m['bytes'])}) with {m['label']};" for m in o["extra_peak"].values()
    )
