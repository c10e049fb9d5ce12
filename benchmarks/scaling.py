"""How BWCache's speedup, its own share of the time and its extra memory grow with the work (frames and frame size).

    python benchmarks/scaling.py --json benchmarks/results/scaling-tiny-shapes.json \
        --svg benchmarks/results/scaling-tiny-shapes.svg

On the embedded Tiny Shapes model with a preset profile's settings (default: the preset default): for each number
of frames (at the preset's size) and each frame size (at the preset's frame count), the uncached and the cached
generation alternate `--repeats` times after a warm-up, each kind's time taken at its fastest, so the speedup is a
ratio measured side by side in one process. The cache's own share is timed inside one cached run (the time in its
hooks, as `python -m bwcache bench` reports it); the extra memory is the cached run's peak tensor memory over the
uncached run's (its weights and activations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bwcache.apply import cached  # noqa: E402
from bwcache.bench import cache_work_shares  # noqa: E402
from bwcache.instruments import peak_tensor_bytes, pipeline_weight_bytes  # noqa: E402
from bwcache.pipelines import default_device, device_name, get_pipeline  # noqa: E402
from bwcache.runner import generate, resolve_config, resolve_preset, resolve_settings  # noqa: E402
from bwcache.svg import Drawing  # noqa: E402

FRAMES = (8, 16, 24)
SIZES = (24, 32, 40)


def measure(pipe, preset, settings, config, device, repeats) -> dict:
    generate(pipe, preset, settings, device)  # warm-up at this shape
    plain, cached_times = [], []
    for _ in range(repeats):
        plain.append(generate(pipe, preset, settings, device)[1])
        with cached(pipe, config) as handle:
            cached_times.append(generate(pipe, preset, settings, device)[1])
    share = cache_work_shares(pipe.transformer, lambda: generate(pipe, preset, settings, device)[1], (config,),
                              device)[0]
    weights = pipeline_weight_bytes(pipe)
    plain_peak = peak_tensor_bytes(lambda: generate(pipe, preset, settings, device), device)
    with cached(pipe, config):
        cached_peak = peak_tensor_bytes(lambda: generate(pipe, preset, settings, device), device)
    return {
        "num_frames": settings["num_frames"],
        "size": settings["height"],
        "uncached_seconds": min(plain),
        "cached_seconds": min(cached_times),
        "speedup": min(plain) / min(cached_times),
        "reuse_fraction": handle.trace.reuse_fraction,
        "cache_work_share": share,
        "extra_peak_bytes": cached_peak - plain_peak,
        "extra_peak_over_total": (cached_peak - plain_peak) / (plain_peak + weights),
    }


def scaling_svg(rows: list[dict], width: int = 760, height: int = 300) -> str:
    """Two panels (frames, frame size), each with speedup (left axis) and the cache's time and memory shares
    (right axis, %)."""
    series = (("speedup", "speedup (×)", "#1f77b4"), ("cache_work_share", "cache's own time (%)", "#d62728"),
              ("extra_peak_over_total", "extra peak memory (%)", "#2ca02c"))
    panels = (("num_frames", "frames (at 32×32)", [r for r in rows if r["size"] == 32]),
              ("size", "frame size, px (at 16 frames)", [r for r in rows if r["num_frames"] == 16]))
    drawing = Drawing(width, height)
    panel_w, left, top, bottom = width / 2, 50, 20, 70
    top_speed = max(2.5, max(r["speedup"] for r in rows) * 1.1)
    top_share = max(25.0, max(100 * max(r["cache_work_share"], r["extra_peak_over_total"]) for r in rows) * 1.1)
    for p, (key, title, members) in enumerate(panels):
        members = sorted(members, key=lambda r: r[key])
        if not members:
            continue
        xs = [r[key] for r in members]
        speed = drawing.chart((p * panel_w + left, top, (p + 1) * panel_w - 40, height - bottom), (min(xs), max(xs)),
                              (0, top_speed))
        share = speed.twin((0, top_share))
        speed.axes(right=True)
        speed.x_label(title, below=28)
        speed.x_ticks("", values=xs)
        speed.y_ticks(".1f")
        share.y_ticks(".0f", side="right")
        for name, label, colour in series:
            chart, scale = (speed, 1) if name == "speedup" else (share, 100)
            points = [(r[key], scale * r[name]) for r in members]
            chart.polyline(points, colour, width=2)
            chart.points(points, colour, radius=3, titles=[f"{label}: {r[name]:.3g}" for r in members])
    drawing.legend(60, height - 20, [(label, colour, "bar") for _, label, colour in series], step=(230, 0))
    return drawing.render()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-shapes")
    parser.add_argument("--profile", default=None, help="the preset's cache profile (default: its default)")
    parser.add_argument("--frames", default=",".join(map(str, FRAMES)))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--svg", type=Path, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be ≥ 1")
    for path in (args.json, args.svg):
        if path is not None and path.exists() and not args.overwrite:
            parser.error(f"{path} exists; pass --overwrite or choose another path")
    preset = resolve_preset(args.preset)
    preset.profile_settings(args.profile)
    frames = [int(v) for v in args.frames.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]
    base = resolve_settings(preset)
    shapes = [(f, base["height"]) for f in frames] + [(base["num_frames"], s) for s in sizes]
    shapes = list(dict.fromkeys(shapes))
    # Every shape is checked against the preset's limits before any model work.
    settings_list = [resolve_settings(preset, num_frames=f, height=s, width=s) for f, s in shapes]
    device = args.device or default_device()
    pipe = get_pipeline(preset, device)
    rows = []
    for settings in settings_list:
        config = resolve_config(preset, settings["num_inference_steps"], profile=args.profile)
        row = measure(pipe, preset, settings, config, device, args.repeats)
        rows.append(row)
        print(f"{row['num_frames']:>3} frames at {row['size']}²: {row['speedup']:.2f}×, cache's own time "
              f"{row['cache_work_share']:.1%}, extra peak memory {row['extra_peak_over_total']:+.1%}", flush=True)
    result = {"preset": preset.name, "profile": args.profile or "default", "device": device_name(device),
              "repeats": args.repeats, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    if args.svg is not None:
        args.svg.write_text(scaling_svg(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
