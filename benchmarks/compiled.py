"""BWCache's speedup with torch.compile next to eager, on the embedded Tiny Shapes model (or any preset on a GPU).

    python benchmarks/compiled.py --json benchmarks/results/compiled-tiny-shapes.json

For each way of running the transformer — eager, regional compile (`transformer.compile_repeated_blocks()`) and
whole-model compile (`transformer.compile()`) — the uncached and the cached generation (the preset's default
BWCache settings) alternate `--repeats` times after a warm-up that compiles; the fastest of each is kept, so the
speedup is a ratio measured side by side in one process. Also reported: PSNR of the cached video against the
uncached video of the same mode, and whether the compiled cached run took the eager cached run's decisions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bwcache  # noqa: E402
from bwcache.metrics import psnr  # noqa: E402
from bwcache.pipelines import default_device, device_name, load_pipeline  # noqa: E402
from bwcache.runner import generate, resolve_config, resolve_preset, resolve_settings  # noqa: E402

MODES = ("eager", "regional", "whole")


def measure(preset, settings, config, device, mode, repeats):
    torch._dynamo.reset()
    pipe = load_pipeline(preset, device)
    if mode == "regional":
        pipe.transformer.compile_repeated_blocks()
    elif mode == "whole":
        pipe.transformer.compile()
    # Warm-up: compiles (the cached run's graphs are the uncached run's: the cache's code is never compiled).
    generate(pipe, preset, settings, device)
    plain, cached = [], []
    for _ in range(repeats):
        frames, seconds = generate(pipe, preset, settings, device)
        plain.append(seconds)
        with bwcache.cached(pipe, config) as handle:
            cached_frames, seconds = generate(pipe, preset, settings, device)
        cached.append(seconds)
    return {
        "mode": mode,
        "uncached_seconds": min(plain),
        "cached_seconds": min(cached),
        "speedup": min(plain) / min(cached),
        "psnr": psnr(frames, cached_frames),
        "reuse_fraction": handle.trace.reuse_fraction,
        "decisions": {name: branch["reused"] for name, branch in handle.trace.to_dict()["branches"].items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-shapes")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (never overwritten)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; allowed: {', '.join(MODES)}")
    if args.repeats < 1:
        parser.error("--repeats must be ≥ 1")
    if args.json is not None and args.json.exists():
        parser.error(f"{args.json} exists; choose another path")

    device = args.device or default_device()
    preset = resolve_preset(args.preset)
    settings = resolve_settings(preset, prompt=args.prompt)
    config = resolve_config(preset, settings["num_inference_steps"])
    rows = [measure(preset, settings, config, device, mode, args.repeats) for mode in modes]
    eager = next((row["decisions"] for row in rows if row["mode"] == "eager"), None)
    print(f"{preset.label} on {device_name(device)}; {config.mode} mode, δ={config.threshold:g}; "
          f"fastest of {args.repeats} alternating runs")
    print("| mode | uncached s | cached s | speedup | PSNR dB | reuse | decisions as eager |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        same = "—" if eager is None or row["mode"] == "eager" else ("yes" if row["decisions"] == eager else "no")
        row["same_decisions_as_eager"] = None if same == "—" else same == "yes"
        print(f"| {row['mode']} | {row['uncached_seconds']:.3f} | {row['cached_seconds']:.3f} | {row['speedup']:.2f}× "
              f"| {row['psnr']:.2f} | {row['reuse_fraction']:.1%} | {same} |")
    if args.json is not None:
        record = {
            "preset": preset.name, "device": device_name(device), "settings": settings, "config": config.to_dict(),
            "repeats": args.repeats, "torch": torch.__version__,
            "rows": [{k: v for k, v in row.items() if k != "decisions"} for row in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
