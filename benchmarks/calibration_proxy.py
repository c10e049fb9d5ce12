"""How well the calibration's fidelity proxy ranks real runs, on the embedded model.

    python benchmarks/calibration_proxy.py --json benchmarks/results/calibration-proxy-tiny-shapes.json

For the first `--prompts` tuning prompts: one uncached, traced run (threshold 0, every block's distance: the
calibration's pilot), then a spread of the calibration's own candidates (`bwcache.calibrate.candidates`: every mode,
across the compute they skip) run cached with the same seed. For each candidate: the PSNR of its video against the
pilot's, the compute its run skipped against the one predicted, and the proxy in six variants (each step's error
weighted by its share of the trajectory, by its noise level or alike; with the extrapolation's correction or not). Reported: each variant's
Spearman rank correlation with the measured PSNR (mean over prompts; against that of the compute skipped
alone), and the fit PSNR = a − b·log10(proxy) with its
residual spread, which the calibration uses to aim its next run. Nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bwcache.apply import cached  # noqa: E402
from bwcache.bench import TINY_PROMPTS  # noqa: E402
from bwcache.calibrate.candidates import WEIGHTINGS, candidate_configs, drift_proxy, rank  # noqa: E402
from bwcache.metrics import psnr  # noqa: E402
from bwcache.pipelines import get_pipeline  # noqa: E402
from bwcache.policies import distance_map_config  # noqa: E402
from bwcache.runner import generate, resolve_config, resolve_preset, resolve_settings  # noqa: E402
from bwcache.schedule import schedule_for  # noqa: E402

VARIANTS = {f"{w}{', extrapolated' if e else ''}": (w, e) for w in WEIGHTINGS for e in (True, False)}


def spearman(x, y) -> float:
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def spread_sample(candidates, per_mode: int):
    """Per mode, `per_mode` candidates spread evenly over the compute they skip."""
    chosen = []
    for mode in ("paper", "static", "blockwise"):
        pool = sorted((c for c in candidates if c.config.mode == mode and c.predicted_skipped > 0),
                      key=lambda c: (c.predicted_skipped, c.proxy))
        if not pool:
            continue
        picks = {round(k * (len(pool) - 1) / max(1, per_mode - 1)) for k in range(per_mode)}
        chosen += [pool[k] for k in sorted(picks)]
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-shapes")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--per-mode", type=int, default=12)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    preset = resolve_preset(args.preset)
    pipe = get_pipeline(preset, "cpu")
    prompts = list(TINY_PROMPTS[: args.prompts])
    settings = [resolve_settings(preset, prompt=p, seed=k, num_inference_steps=args.steps)
                for k, p in enumerate(prompts)]
    steps = settings[0]["num_inference_steps"]
    base = resolve_config(preset, steps)
    pilot_config = distance_map_config(__import__("dataclasses").replace(base, indicator_blocks=None, mode="blockwise"))
    traces, references = [], []
    for s in settings:
        with cached(pipe, pilot_config) as handle:
            frames, _ = generate(pipe, preset, s, "cpu")
        traces.append(handle.trace.to_dict())
        references.append(frames)
    candidates = rank(candidate_configs(traces, base, steps), traces)
    sample = spread_sample(candidates, args.per_mode)
    print(f"{len(candidates)} candidates; measuring {len(sample)} on {len(prompts)} prompts", file=sys.stderr)
    rows = []
    for n, candidate in enumerate(sample):
        row = {"config": candidate.config.to_dict(), "mode": candidate.config.mode,
               "predicted_skipped": candidate.predicted_skipped, "psnr": [], "skipped": [],
               **{f"proxy {name}": [] for name in VARIANTS}}
        for trace, reference, s in zip(traces, references, settings):
            with cached(pipe, candidate.config) as handle:
                frames, _ = generate(pipe, preset, s, "cpu")
            value = psnr(reference, frames)
            row["psnr"].append(value if math.isfinite(value) else None)
            row["skipped"].append(handle.trace.reuse_fraction)
            schedule = schedule_for(trace, candidate.config)
            for name, (weighting, extrapolated) in VARIANTS.items():
                row[f"proxy {name}"].append(drift_proxy(trace, schedule, candidate.config, weighting, extrapolated))
        rows.append(row)
        print(f"[{n + 1}/{len(sample)}] {candidate.config.mode} skipped {np.mean(row['skipped']):.3f} "
              f"psnr {np.mean([v for v in row['psnr'] if v is not None]):.2f}", file=sys.stderr)

    measured = [r for r in rows if all(v is not None for v in r["psnr"])]
    summary = {}
    for name in VARIANTS:
        per_prompt = [spearman([r[f"proxy {name}"][p] for r in measured], [-r["psnr"][p] for r in measured])
                      for p in range(len(prompts))]
        x = np.log10([max(1e-12, np.mean(r[f"proxy {name}"])) for r in measured])
        y = np.array([np.mean(r["psnr"]) for r in measured])
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (slope * x + intercept)
        summary[name] = {"spearman_per_prompt": per_prompt, "spearman_mean": float(np.mean(per_prompt)),
                         "fit_a": float(intercept), "fit_b": float(-slope),
                         "fit_residual_sd": float(residual.std()), "fit_residual_max": float(np.abs(residual).max())}
    baseline = [spearman([r["predicted_skipped"] for r in measured], [-r["psnr"][p] for r in measured])
                for p in range(len(prompts))]
    skipped_error = [abs(np.mean(r["skipped"]) - r["predicted_skipped"]) for r in rows]
    by_mode = {m: float(max([e for r, e in zip(rows, skipped_error) if r["mode"] == m], default=0.0))
               for m in ("paper", "static", "blockwise")}
    # Within-mode rank correlation of the chosen proxy: how well it orders candidates of one mode.
    within = {}
    for mode in ("paper", "static", "blockwise"):
        subset = [r for r in measured if r["mode"] == mode]
        if len(subset) >= 3:
            within[mode] = spearman([np.mean(r["proxy noise, extrapolated"]) for r in subset],
                                    [-np.mean(r["psnr"]) for r in subset])
    result = {"preset": preset.name, "prompts": prompts, "steps": steps, "candidates": len(candidates),
              "measured": len(rows), "variants": summary,
              "spearman_compute_skipped": float(np.mean(baseline)), "spearman_within_mode": within,
              "skipped_prediction_error_max": by_mode, "rows": rows,
              "seconds": time.perf_counter() - started}
    for name, s in summary.items():
        print(f"{name:<24} Spearman {s['spearman_mean']:.3f} (per prompt {', '.join(f'{v:.3f}' for v in s['spearman_per_prompt'])}); "
              f"PSNR ≈ {s['fit_a']:.1f} − {s['fit_b']:.1f}·log10(proxy), residual sd {s['fit_residual_sd']:.2f} dB "
              f"(max {s['fit_residual_max']:.2f})")
    print(f"compute skipped alone: Spearman {np.mean(baseline):.3f}")
    print(f"within mode: {within}; compute-skipped prediction error (max) by mode: {by_mode}")
    print(f"{result['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
