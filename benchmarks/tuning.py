"""The quality study behind the embedded preset's profiles: PSNR and reuse of cache settings on the tuning prompts.

    python benchmarks/tuning.py --json benchmarks/results/tuning-tiny-shapes.json \
        --markdown benchmarks/results/tuning-tiny-shapes.md

For each setting below, every tuning prompt (`bwcache.bench.TINY_PROMPTS`, the first `--prompts`) runs uncached and
cached with the same seed; reported are the mean PSNR of the cached video against the uncached one and the mean
share of block evaluations reused. Nothing is timed (the figures do not depend on the machine's load), so the study
can run beside other work; speed is measured by `python -m bwcache bench`, on held-out prompts.

Settings change the preset default (distances on every 4th token, residuals extrapolated half-way), grouped by the
question they answer: what the static schedules give (warm-up, R and tail alone); whether the indicator can start
reusing early and hold back where the inputs move (the left arm); whether δ improves on a schedule at R = 2 and
R = 3; the accumulated distance with longer reuse runs; and the paper's method (`BWCacheConfig.official`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bwcache.apply import cached  # noqa: E402
from bwcache.bench import TINY_PROMPTS  # noqa: E402
from bwcache.metrics import psnr  # noqa: E402
from bwcache.pipelines import get_pipeline  # noqa: E402
from bwcache.runner import generate, resolve_config, resolve_preset, resolve_settings  # noqa: E402

def schedule(warmup: int, r: int, tail: int, **more) -> dict:
    """A block-wise or static schedule with the preset's extrapolation (0.5)."""
    return {"warmup_steps": warmup, "reuse_interval": r, "tail_steps": tail, "extrapolation": 0.5, **more}


# (group, label, overrides of the preset's default cache settings)
STUDY = [
    *[("static schedule", f"static, {w} warm-up, R={r}, {t} tail", schedule(w, r, t, mode="static"))
      for w, r, t in [(6, 2, 2), (4, 2, 2), (3, 2, 2), (2, 2, 2), (6, 3, 1), (5, 3, 1), (4, 3, 1), (3, 3, 1),
                      (4, 3, 2)]],
    *[("indicator, early start", f"block-wise δ={d}, 2 warm-up, R=2, 2 tail", schedule(2, 2, 2, mode="blockwise",
                                                                                  threshold=d))
      for d in (0.1, 0.15, 0.2, 0.25, 0.3)],
    *[("indicator, early start", f"block-wise δ={d}, 2 warm-up, R=3, 1 tail", schedule(2, 3, 1, mode="blockwise",
                                                                                  threshold=d))
      for d in (0.15, 0.2, 0.25, 0.3, 0.4)],
    *[("indicator, R=2", f"block-wise δ={d}, {w} warm-up, R=2, {t} tail", schedule(w, 2, t, mode="blockwise",
                                                                              threshold=d))
      for w, t, d in [(4, 2, 0.1), (4, 2, 0.15), (4, 2, 0.2), (4, 2, 0.25), (6, 2, 0.06), (6, 2, 0.08), (6, 2, 0.1),
                      (6, 1, 0.06), (6, 1, 0.08), (6, 0, 0.06), (6, 0, 0.08)]],
    *[("indicator, R=3", f"block-wise δ={d}, {w} warm-up, R=3, 1 tail", schedule(w, 3, 1, mode="blockwise",
                                                                            threshold=d))
      for w, d in [(4, 0.2), (4, 0.3), (5, 0.2), (5, 0.3)]],
    *[("accumulated distance", f"accumulated δ={d}, 6 warm-up, R up to 4, 1 tail",
       schedule(6, 4, 1, mode="blockwise", threshold=d, accumulate_distance=True)) for d in (0.08, 0.1, 0.12)],
    *[("the paper's method", f"official δ={d}", {"mode": "paper", "threshold": d, "reuse_interval": 3,
                                                 "indicator_feature": "modulated", "tail_rule": "official",
                                                 "tail_fraction": 0.5, "indicator_token_stride": 1,
                                                 "extrapolation": 0.0}) for d in (0.045, 0.05)],
]


def run(prompts: list[str], device: str = "cpu", progress=print) -> list[dict]:
    preset = resolve_preset("tiny-shapes")
    pipe = get_pipeline(preset, device)
    baselines = {}
    for p, prompt in enumerate(prompts):
        settings = resolve_settings(preset, prompt=prompt, seed=p)
        baselines[prompt] = (settings, generate(pipe, preset, settings, device)[0])
    rows = []
    started = time.perf_counter()
    for k, (group, label, overrides) in enumerate(STUDY):
        psnrs, reuse = [], []
        for prompt, (settings, baseline) in baselines.items():
            config = resolve_config(preset, settings["num_inference_steps"], **overrides)
            with cached(pipe, config) as handle:
                frames = generate(pipe, preset, settings, device)[0]
            psnrs.append(psnr(baseline, frames))
            reuse.append(handle.trace.reuse_fraction)
        rows.append({"group": group, "label": label, "overrides": overrides, "psnr": float(np.mean(psnrs)),
                     "psnr_per_prompt": psnrs, "reuse_fraction": float(np.mean(reuse))})
        if progress:
            elapsed = time.perf_counter() - started
            left = elapsed / (k + 1) * (len(STUDY) - k - 1)
            progress(f"[{k + 1}/{len(STUDY)}] {label}: {rows[-1]['psnr']:.2f} dB, {rows[-1]['reuse_fraction']:.1%} "
                     f"reused · {elapsed:.0f} s elapsed, about {left:.0f} s left")
    return rows


def block_spread(prompts: list[str], device: str = "cpu") -> dict:
    """How much the blocks' input distances differ from each other at a step: from threshold-0 runs (every
    distance measured, nothing reused), per step of the default's reuse window, (largest − smallest) ÷ mean over
    the 6 blocks, and the mean distance itself; averaged over prompts and CFG branches."""
    preset = resolve_preset("tiny-shapes")
    pipe = get_pipeline(preset, device)
    default = resolve_config(preset, preset.defaults["num_inference_steps"])
    spreads, means = [], []
    for p, prompt in enumerate(prompts):
        settings = resolve_settings(preset, prompt=prompt, seed=p)
        config = resolve_config(preset, settings["num_inference_steps"], threshold=0.0)
        with cached(pipe, config) as handle:
            generate(pipe, preset, settings, device)
        for branch in handle.trace.to_dict()["branches"].values():
            rows = branch["distance"][default.warmup_steps: len(branch["distance"]) - default.tail_steps]
            spreads.append([(max(row) - min(row)) / np.mean(row) for row in rows])
            means.append([float(np.mean(row)) for row in rows])
    spread = np.mean(spreads, axis=0)
    mean = np.mean(means, axis=0)
    first = default.warmup_steps
    return {"steps": list(range(first, first + len(spread))), "spread": spread.tolist(), "mean_distance": mean.tolist()}


def markdown(rows: list[dict], prompts: int) -> str:
    lines = [f"Mean over {prompts} tuning prompts (seeds 0–{prompts - 1}), 30 steps, 16 frames at 32×32.", "",
             "| question | setting | block evaluations reused | PSNR dB (mean) |", "|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['group']} | {row['label']} | {row['reuse_fraction']:.1%} | {row['psnr']:.2f} |")
    return "\n".join(lines) + "\n"


def spread_markdown(spread: dict) -> str:
    values, means = np.array(spread["spread"]), np.array(spread["mean_distance"])
    return (f"\nBlocks' input distances at a step of the default's reuse window (steps {spread['steps'][0]}–"
            f"{spread['steps'][-1]}), threshold-0 runs: mean distance {means.min():.3f}–{means.max():.3f} from step "
            f"to step; (largest − smallest) ÷ mean over the blocks {values.mean():.2f} on average "
            f"({values.min():.2f}–{values.max():.2f}).\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(TINY_PROMPTS):
        parser.error(f"--prompts must be 1 to {len(TINY_PROMPTS)}")
    for path in (args.json, args.markdown):
        if path is not None and path.exists() and not args.overwrite:
            parser.error(f"{path} exists; pass --overwrite or choose another path")
    prompts = list(TINY_PROMPTS[: args.prompts])
    rows = run(prompts)
    spread = block_spread(prompts)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"prompts": prompts, "rows": rows, "block_spread": spread}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(rows, len(prompts)) + spread_markdown(spread))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
