"""Block-feature dynamics and quality of an embedded (Tiny Shapes style) model, on held-out prompts.

    python benchmarks/embedded_dynamics.py --model assets/tiny-shapes --json /tmp/dyn.json
    python benchmarks/embedded_dynamics.py --model runs/x --device cuda --json runs/x/dynamics.json
    python benchmarks/embedded_dynamics.py --model assets/tiny-shapes --shift 5 --steps 50 --only curves

What it measures (each section can be chosen with --only):

- curves: per indicator feature ("hidden_states": the blocks' input; "modulated": their AdaLN-modulated attention
  input), one uncached run per held-out prompt with `BWCacheConfig(threshold=0, indicator_feature=...)` (its
  output is bit-identical to an uncached run) records every block's relative-L1 distance to the previous step.
  Reported: the mean curve over prompts and CFG branches, per block too; the left-arm ratio (mean over steps 1-2
  divided by the lowest value of the mean curve over the middle third of the steps); the right-arm ratio (last step
  over that minimum); the block spread at the middle step ((largest - smallest) / mean of the blocks' distances, per
  prompt and branch, then averaged).
- official: `BWCacheConfig.official(threshold=δ)` for a grid of δ derived from the modulated curve, predicted
  exactly from the recorded traces (`bwcache.schedule.predict_schedule`), and for the best few δ run for real
  (`bwcache.cached`, the handle's trace): per prompt the trigger step and the share of steps fully reused, and the
  share of prompts that trigger between 10% and 45% of the steps and reuse at least 25% of them; PSNR to uncached.
- adherence: text-to-video prompt following judged from pixels (`bwcache.tiny.judge`), every prompt combination.
- i2v (models that take a first frame): held-out (image, prompt) pairs from `bwcache.tiny.data.make_example_image`:
  first generated frame vs the image (PSNR, uncached and cached), the same prompt and seed without the image, motion
  judged; and the feature curves with the image given.
- speed: the median time of one uncached default generation on this device.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bwcache.bench import HELD_OUT_PROMPTS  # noqa: E402
from bwcache import BWCacheConfig, cached  # noqa: E402
from bwcache.schedule import predict_schedule  # noqa: E402
from bwcache.tiny.evaluate import adherence_cases  # noqa: E402
from bwcache.tiny.evaluate import i2v_cases as evaluate_i2v_cases  # noqa: E402
from bwcache.tiny.judge import judge  # noqa: E402
from bwcache.tiny.pipeline import build_scheduler, input_layout, load_config, load_pipeline  # noqa: E402

FEATURES = ("hidden_states", "modulated")
TRIGGER_WINDOW = (0.10, 0.45)
MIN_REUSED = 0.25
SECTIONS = ("curves", "official", "adherence", "i2v", "speed")


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _nan_list(values) -> list:
    return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else round(float(v), 6) for v in values]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def curve_metrics(traces: list[dict], num_steps: int) -> dict:
    """Mean curve, per-block curves, arm ratios and block spread from threshold-0 traces (one per prompt)."""
    per_branch, per_block, spreads_mid, spreads_all = [], [], [], []
    mid = num_steps // 2
    for tr in traces:
        for branch in tr["branches"].values():
            dist = np.array([[np.nan if v is None else v for v in row] for row in branch["distance"]], dtype=float)
            per_block.append(dist)
            per_branch.append(np.nanmean(dist, axis=1) if dist.size else np.array([]))
            row = dist[mid]
            spreads_mid.append(float((np.nanmax(row) - np.nanmin(row)) / np.nanmean(row)))
            with np.errstate(invalid="ignore", divide="ignore"):
                spreads_all.append((np.nanmax(dist, axis=1) - np.nanmin(dist, axis=1)) / np.nanmean(dist, axis=1))
    with np.errstate(invalid="ignore"):
        curve = np.nanmean(np.array(per_branch), axis=0)
        blocks = np.nanmean(np.array(per_block), axis=0)  # (T, blocks)
        spread_curve = np.nanmean(np.array(spreads_all), axis=0)
    lo, hi = num_steps // 3, -(-2 * num_steps // 3)
    middle = curve[lo:hi]
    mid_min = float(np.nanmin(middle))
    mid_argmin = int(lo + np.nanargmin(middle))
    left = float(np.nanmean(curve[1:3]))
    prompt_curves = np.array(per_branch)
    per_prompt_left = [float(np.nanmean(c[1:3]) / np.nanmin(c[lo:hi])) for c in prompt_curves]
    return {
        "mean": _nan_list(curve),
        "min": _nan_list(np.nanmin(prompt_curves, axis=0)),  # over prompts and CFG branches
        "max": _nan_list(np.nanmax(prompt_curves, axis=0)),
        "per_block": [_nan_list(r) for r in blocks.T],
        "left_arm_ratio": round(left / mid_min, 4),
        "left_arm_ratio_per_branch": [round(v, 3) for v in per_prompt_left],
        "right_arm_ratio": round(float(curve[-1]) / mid_min, 4),
        "step1": round(float(curve[1]), 5),
        "middle_min": round(mid_min, 5),
        "middle_min_step": mid_argmin,
        "last": round(float(curve[-1]), 5),
        "block_spread_mid": round(float(np.mean(spreads_mid)), 4),
        "block_spread_curve": _nan_list(spread_curve),
        "block_mean_mid": _nan_list(blocks[mid]),
    }


def official_outcome(trace: dict, num_steps: int) -> dict:
    """Trigger step and the share of fully reused steps, per branch, from a (real or predicted) paper-mode trace."""
    out = {}
    for name, b in trace["branches"].items():
        reused = b["reused"]
        full = sum(all(row) for row in reused)
        out[name] = {"trigger_step": b["trigger_step"], "reused_steps": full, "reused_fraction": full / num_steps}
    return out


def passes(outcome: dict, num_steps: int) -> bool:
    lo, hi = TRIGGER_WINDOW[0] * num_steps, TRIGGER_WINDOW[1] * num_steps
    return all(b["trigger_step"] is not None and lo <= b["trigger_step"] <= hi and b["reused_fraction"] >= MIN_REUSED
               for b in outcome.values())


def run(pipe, prompt, seed, steps, guidance, image=None, config=None):
    kwargs = dict(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, generator=_gen(seed),
                  output_type="np")
    if image is not None:
        kwargs["image"] = image
    if config is None:
        return pipe(**kwargs).frames[0], None
    with cached(pipe, config) as handle:
        frames = pipe(**kwargs).frames[0]
    return frames, handle.trace.to_dict()


def measure_curves(pipe, cases, steps, guidance, log) -> tuple[dict, dict, dict]:
    """Per feature the curve metrics; the threshold-0 traces; the uncached outputs per case."""
    traces, outputs, result = {}, {}, {}
    for feature in FEATURES:
        traces[feature] = []
        for k, (prompt, seed, image) in enumerate(cases):
            frames, tr = run(pipe, prompt, seed, steps, guidance, image,
                             BWCacheConfig(threshold=0.0, indicator_feature=feature))
            traces[feature].append(tr)
            outputs.setdefault(k, frames)
        result[feature] = curve_metrics(traces[feature], steps)
        c = result[feature]
        log(f"  {feature:<13} left arm {c['left_arm_ratio']:.2f}  right arm {c['right_arm_ratio']:.2f}  "
            f"spread@mid {c['block_spread_mid']:.2f}  step1 {c['step1']:.4f}  min {c['middle_min']:.4f}"
            f"@{c['middle_min_step']}  last {c['last']:.4f}")
    return result, traces, outputs


def delta_grid(curve: dict) -> list[float]:
    """δ values between the middle minimum and the left arm: where a mid-run trigger can happen."""
    lo, top = curve["middle_min"], max(curve["step1"], curve["middle_min"] * 1.05)
    grid = sorted({round(float(v), 5) for v in np.geomspace(lo * 1.02, top * 1.02, 12)})
    return grid


def measure_official(pipe, cases, mod_traces, uncached, steps, guidance, real_deltas, log,
                     deltas: list[float] | None = None) -> dict:
    grid = deltas or delta_grid(curve_metrics(mod_traces, steps))
    predicted = []
    for delta in grid:
        config = BWCacheConfig.official(threshold=delta)
        rows = []
        for tr in mod_traces:
            pred = predict_schedule(tr, config)
            outcome = {n: {"trigger_step": b["trigger_step"], "reused_steps": b["reused_steps"],
                           "reused_fraction": b["reused_steps"] / steps} for n, b in pred["branches"].items()}
            rows.append(outcome)
        ok = [passes(o, steps) for o in rows]
        predicted.append({
            "delta": delta,
            "pass_rate": sum(ok) / len(ok),
            "trigger_steps": [[b["trigger_step"] for b in o.values()] for o in rows],
            "reused_fraction": [round(float(np.mean([b["reused_fraction"] for b in o.values()])), 3) for o in rows],
        })
    ranked = sorted(predicted, key=lambda r: (-r["pass_rate"], -float(np.mean(r["reused_fraction"]))))
    real = []
    for entry in ranked[:real_deltas]:
        delta = entry["delta"]
        rows, psnrs = [], []
        for k, (prompt, seed, image) in enumerate(cases):
            frames, tr = run(pipe, prompt, seed, steps, guidance, image, BWCacheConfig.official(threshold=delta))
            rows.append(official_outcome(tr, steps))
            psnrs.append(psnr(frames, uncached[k]))
        ok = [passes(o, steps) for o in rows]
        real.append({
            "delta": delta,
            "pass_rate": sum(ok) / len(ok),
            "trigger_steps": [[b["trigger_step"] for b in o.values()] for o in rows],
            "reused_fraction": [round(float(np.mean([b["reused_fraction"] for b in o.values()])), 3) for o in rows],
            "psnr_vs_uncached": [round(p, 2) if math.isfinite(p) else None for p in psnrs],
            "predicted_pass_rate": entry["pass_rate"],
        })
        log(f"  official δ={delta:.4f}: pass {sum(ok)}/{len(ok)}  triggers {real[-1]['trigger_steps']}  "
            f"reused {real[-1]['reused_fraction']}  PSNR {statistics.median(psnrs) if psnrs else float('nan'):.1f}")
    best = max(real, key=lambda r: (r["pass_rate"], float(np.mean(r["reused_fraction"])))) if real else None
    return {"predicted": predicted, "real": real, "best": best}


def measure_adherence(pipe, n, seed, steps, guidance, batch) -> dict:
    cases = adherence_cases(n, seed)
    rows = []
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        frames = pipe(prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=[_gen(s) for _, s in chunk], output_type="np").frames
        for (prompt, s), clip in zip(chunk, frames):
            j = judge(clip, prompt)
            rows.append({"prompt": prompt, "seed": s, "ok": j.ok, "colour_ok": j.colour_ok,
                         "direction_ok": j.direction_ok})
    n = len(rows)
    return {"n": n, "rate": sum(r["ok"] for r in rows) / n, "colour_rate": sum(r["colour_ok"] for r in rows) / n,
            "direction_rate": sum(r["direction_ok"] for r in rows) / n,
            "failures": [r for r in rows if not r["ok"]][:20]}


def i2v_cases(n: int, scene, height: int, width: int, frames: int) -> list[tuple[str, int, np.ndarray]]:
    return evaluate_i2v_cases(n, scene, height, width, frames)  # the same held-out pairs as the model's evaluation


def measure_i2v(pipe, n, n_cached, scene, steps, guidance, batch, delta, defaults, log) -> dict:
    cases = i2v_cases(n, scene, defaults["height"], defaults["width"], defaults["num_frames"])
    with_img, without, judged = [], [], []
    for i in range(0, n, batch):
        chunk = cases[i:i + batch]
        common = dict(prompt=[p for p, _, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      output_type="np")
        a = pipe(**common, image=[im for _, _, im in chunk], generator=[_gen(s) for _, s, _ in chunk]).frames
        b = pipe(**common, generator=[_gen(s) for _, s, _ in chunk]).frames
        for (prompt, _, image), fa, fb in zip(chunk, a, b):
            with_img.append(psnr(fa[0], image))
            without.append(psnr(fb[0], image))
            j = judge(fa, prompt)
            judged.append({"prompt": prompt, "ok": j.ok, "direction_ok": j.direction_ok, "colour_ok": j.colour_ok})
    result = {
        "n": n,
        "scene": scene,
        "first_frame_psnr": {"median": round(statistics.median(with_img), 2), "min": round(min(with_img), 2),
                             "share_at_least_25": sum(p >= 25 for p in with_img) / n},
        "first_frame_psnr_without_image": {"median": round(statistics.median(without), 2),
                                           "max": round(max(without), 2)},
        "adherence": {"rate": sum(r["ok"] for r in judged) / n,
                      "direction_rate": sum(r["direction_ok"] for r in judged) / n,
                      "failures": [r for r in judged if not r["ok"]][:10]},
    }
    log(f"  i2v: first-frame PSNR median {result['first_frame_psnr']['median']} (min "
        f"{result['first_frame_psnr']['min']}), without image {result['first_frame_psnr_without_image']['median']}; "
        f"judge {result['adherence']['rate']:.0%}")
    if n_cached and delta is not None:
        rows, ff = [], []
        for prompt, seed, image in cases[:n_cached]:
            frames, tr = run(pipe, prompt, seed, steps, guidance, image, BWCacheConfig.official(threshold=delta))
            rows.append(official_outcome(tr, steps))
            ff.append(psnr(frames[0], image))
        result["cached"] = {"delta": delta, "first_frame_psnr_median": round(statistics.median(ff), 2),
                            "first_frame_psnr_min": round(min(ff), 2),
                            "reused_fraction": [round(float(np.mean([b["reused_fraction"] for b in o.values()])), 3)
                                                for o in rows],
                            "trigger_steps": [[b["trigger_step"] for b in o.values()] for o in rows]}
        log(f"  i2v cached δ={delta:.4f}: first-frame PSNR median {result['cached']['first_frame_psnr_median']}")
    return result


def measure_speed(pipe, steps, guidance, repeats=3) -> dict:
    pipe(num_inference_steps=steps, guidance_scale=guidance, generator=_gen(0))
    times = []
    for r in range(repeats):
        if torch.cuda.is_available() and pipe.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(num_inference_steps=steps, guidance_scale=guidance, generator=_gen(r))
        times.append(time.perf_counter() - t0)
    return {"device": str(pipe.device), "threads": torch.get_num_threads(),
            "default_generation_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}


def targets(result: dict) -> dict:
    """The done-when targets that this script can judge."""
    t = {}
    curves = result.get("curves")
    if curves:
        t["left_arm_both_ge_2"] = all(curves[f]["left_arm_ratio"] >= 2 for f in FEATURES)
        t["block_spread_ge_0.5"] = curves["hidden_states"]["block_spread_mid"] >= 0.5
    off = result.get("official", {}).get("best")
    if off:
        t["official_mid_run_on_80pct"] = off["pass_rate"] >= 0.8
    if "adherence" in result:
        t["adherence_ge_0.9"] = result["adherence"]["rate"] >= 0.9
    i2v = result.get("i2v")
    if i2v:
        t["i2v_first_frame_ge_25dB"] = i2v["first_frame_psnr"]["share_at_least_25"] >= 0.9
        t["i2v_without_image_differs"] = i2v["first_frame_psnr_without_image"]["median"] < 25
        t["i2v_motion_ge_0.9"] = i2v["adherence"]["rate"] >= 0.9
        if "cached" in i2v:
            t["i2v_cached_first_frame_ge_25dB"] = i2v["cached"]["first_frame_psnr_median"] >= 25
    if "speed" in result and result["speed"]["device"] == "cpu":
        t["cpu_generation_le_6s"] = result["speed"]["default_generation_s"] <= 6.0
    return t


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # step 0 has no distance: NaN means of empty slices
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="folder with config.json and the weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--shift", type=float, default=None, help="override the scheduler's shift")
    p.add_argument("--shifts", type=float, nargs="*", default=None,
                   help="measure the curves at each of these shifts, and the rest at the best of them")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts for curves and official runs")
    p.add_argument("--real-deltas", type=int, default=2, help="δ values run for real (the best predicted)")
    p.add_argument("--deltas", type=float, nargs="*", default=None, help="δ grid (default: from the curve)")
    p.add_argument("--adherence-n", type=int, default=56)
    p.add_argument("--i2v-n", type=int, default=24)
    p.add_argument("--i2v-cached", type=int, default=8)
    p.add_argument("--i2v-curves", type=int, default=4, help="(image, prompt) pairs for the curves with an image")
    p.add_argument("--scene", default=None, help="scene of the example images (default: the model's training scene)")
    p.add_argument("--batch", type=int, default=28, help="batch for the judged generations")
    p.add_argument("--only", nargs="*", choices=SECTIONS, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--svg", type=Path, default=None,
                   help="the curves of both features (mean, range over prompts and branches) as an SVG figure")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    sections = set(args.only or SECTIONS)

    config = load_config(args.model)
    pipe = load_pipeline(device=args.device, path=args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.shift is not None:
        pipe.scheduler = build_scheduler({**config["scheduler"], "shift": args.shift})
    d = pipe.defaults
    steps = args.steps or d["num_inference_steps"]
    guidance = d["guidance_scale"] if args.guidance is None else args.guidance
    conditioning = input_layout(pipe.transformer.config)[1]
    # The example images come from the model's own training scene (its options as saved, overrides included).
    scene = args.scene or config.get("data", {}).get("scene") or config.get("data", {}).get("scene_name") or "v2"
    result = {"model": str(args.model), "device": args.device, "steps": steps, "guidance": guidance,
              "shift": pipe.scheduler.config.shift, "image_conditioning": conditioning,
              "transformer": {k: config["transformer"][k] for k in ("num_layers", "num_attention_heads",
                                                                    "attention_head_dim", "ffn_dim")},
              "parameters": sum(p_.numel() for p_ in pipe.transformer.parameters())}
    t_start = time.perf_counter()

    def save():
        # After every section, so a run stopped by a deadline still leaves what it measured.
        if args.json:
            result["targets"] = targets(result)
            result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    cases = [(prompt, 1000 + i, None) for i, prompt in enumerate(HELD_OUT_PROMPTS[: args.prompts])]
    log(f"{args.model}: {steps} steps, shift {result['shift']}, guidance {guidance}, conditioning {conditioning}")
    if args.shifts:
        # The sampler's shift moves the curve (small steps early at a large shift): measure the curves at each, then
        # run everything else at the shift that meets most curve targets (ties: the larger left arm).
        by_shift, measured = {}, {}
        for shift in args.shifts:
            pipe.scheduler = build_scheduler({**config["scheduler"], "shift": shift})
            log(f" shift {shift}:")
            curves_s, traces_s, outputs_s = measure_curves(pipe, cases, steps, guidance, log)
            measured[shift] = (curves_s, traces_s, outputs_s)
            official_s = measure_official(pipe, cases, traces_s["modulated"], None, steps, guidance, 0, log)
            best_pred = max(official_s["predicted"], key=lambda r: r["pass_rate"])
            by_shift[shift] = {"curves": {f: {k: v for k, v in c.items() if k != "per_block"}
                                          for f, c in curves_s.items()},
                               "official_predicted_best": best_pred}
        def rank(item):
            c = item[1]["curves"]
            arms = min(c[f]["left_arm_ratio"] for f in FEATURES)
            return (sum([arms >= 2, c["hidden_states"]["block_spread_mid"] >= 0.5,
                         item[1]["official_predicted_best"]["pass_rate"] >= 0.8]),
                    min(arms, 2.5) + min(c[f]["right_arm_ratio"] for f in FEATURES) / 10)
        chosen = max(by_shift.items(), key=rank)[0]
        result["by_shift"] = {str(k): v for k, v in by_shift.items()}
        result["shift"] = chosen
        pipe.scheduler = build_scheduler({**config["scheduler"], "shift": chosen})
        log(f" chosen shift {chosen}")
        save()
    if sections & {"curves", "official"}:
        if args.shifts:
            result["curves"], traces, uncached = measured[result["shift"]]
        else:
            result["curves"], traces, uncached = measure_curves(pipe, cases, steps, guidance, log)
        if "official" in sections:
            save()
            result["official"] = measure_official(pipe, cases, traces["modulated"], uncached, steps, guidance,
                                                  args.real_deltas, log, args.deltas)
        save()
    if "adherence" in sections and args.adherence_n:
        result["adherence"] = measure_adherence(pipe, args.adherence_n, 1234, steps, guidance, args.batch)
        log(f"  adherence {result['adherence']['rate']:.0%} (colour {result['adherence']['colour_rate']:.0%}, "
            f"direction {result['adherence']['direction_rate']:.0%})")
        save()
    if "i2v" in sections and conditioning is not None and args.i2v_n:
        best = result.get("official", {}).get("best")
        result["i2v"] = measure_i2v(pipe, args.i2v_n, args.i2v_cached, scene, steps, guidance, args.batch,
                                    best["delta"] if best else None, d, log)
        if args.i2v_curves:
            icases = i2v_cases(args.i2v_curves, scene, d["height"], d["width"], d["num_frames"])
            save()
            result["i2v"]["curves"], _, _ = measure_curves(pipe, icases, steps, guidance,
                                                           lambda *a: log("   (with image)", *a))
        save()
    if "speed" in sections:
        result["speed"] = measure_speed(pipe, steps, guidance)
        log(f"  one generation: {result['speed']['default_generation_s']:.2f} s on {result['speed']['device']} "
            f"({result['speed']['threads']} threads)")
    if args.svg and result.get("curves"):
        from indicator_curves import svg  # benchmarks/indicator_curves.py: the same figure for the shipped model

        args.svg.parent.mkdir(parents=True, exist_ok=True)
        args.svg.write_text(svg({"features": {f: result["curves"][f] for f in FEATURES}}), encoding="utf-8")
        log(f"  wrote {args.svg}")
    result["complete"] = True
    save()
    result["targets"] = targets(result)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    log(f"  targets: {result['targets']}  ({result['elapsed_s']} s)")
    if args.json:
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
