"""Image-to-video on the embedded model: the preset's profiles from held-out first frames, next to text-to-video.

    python benchmarks/image_to_video.py --json benchmarks/results/image-to-video.json \
        --markdown benchmarks/results/image-to-video.md

For each example first frame (`bwcache.tiny.data.EXAMPLE_IMAGES`: frame 0 of clips the model never saw, with the
prompt of the clip), one comparison per profile (`run_comparison`: an uncached and a cached run timed side by side,
after a warm-up) reports the speedup, PSNR and SSIM against the uncached video, the share of block evaluations
reused, how closely each video's first frame matches the image (PSNR; identical frames count as 99 dB), and whether
the motion follows the prompt by the embedded judge (`bwcache.tiny.judge`), for both videos.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bwcache.outputs import check_writable  # noqa: E402
from bwcache.presets import load_preset  # noqa: E402
from bwcache.runner import run_comparison  # noqa: E402
from bwcache.tiny.data import EXAMPLE_IMAGES, make_example_image  # noqa: E402
from bwcache.tiny.judge import judge  # noqa: E402
from bwcache.tiny.pipeline import load_config  # noqa: E402

IDENTICAL_DB = 99.0  # a first frame equal to the image to the last bit (PSNR infinite) counts as this


def run(profiles: list[str], progress=print) -> list[dict]:
    preset = load_preset("tiny-shapes")
    scene = load_config().get("data", {}).get("scene", "v1")
    rows = []
    for profile in profiles:
        for seed, colour, shape, direction in EXAMPLE_IMAGES:
            image, prompt = make_example_image(seed, scene, colour=colour, shape=shape, direction=direction)
            comparison = run_comparison(preset, prompt=prompt, seed=seed % 1000, image=image, profile=profile)
            record = comparison.record
            first = record["image"]["first_frame_psnr"]
            rows.append({
                "profile": profile, "prompt": prompt, "seed": record["seed"], "speedup": record["speedup"],
                "psnr": record["psnr"], "ssim": record["ssim"], "reuse_fraction": record["reuse_fraction"],
                "first_frame_psnr": {k: IDENTICAL_DB if v is None else v for k, v in first.items()},
                "follows_prompt": {"uncached": bool(judge(comparison.baseline_frames, prompt).ok),
                                   "bwcache": bool(judge(comparison.bwcache_frames, prompt).ok)},
            })
            if progress:
                r = rows[-1]
                progress(f"{profile:8s} {prompt:32s} {r['speedup']:.2f}x  {r['psnr']:.2f} dB  "
                         f"reuse {r['reuse_fraction']:.1%}  first frame {r['first_frame_psnr']['bwcache']:.0f} dB")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for profile in dict.fromkeys(r["profile"] for r in rows):
        mine = [r for r in rows if r["profile"] == profile]
        out.append({
            "profile": profile, "pairs": len(mine),
            "speedup_median": float(np.median([r["speedup"] for r in mine])),
            "speedup_range": [min(r["speedup"] for r in mine), max(r["speedup"] for r in mine)],
            "psnr_mean": float(np.mean([r["psnr"] for r in mine])),
            "ssim_mean": float(np.mean([r["ssim"] for r in mine])),
            "reuse_mean": float(np.mean([r["reuse_fraction"] for r in mine])),
            "first_frame_min": {k: min(r["first_frame_psnr"][k] for r in mine) for k in ("uncached", "bwcache")},
            "follows_prompt": {k: sum(r["follows_prompt"][k] for r in mine) for k in ("uncached", "bwcache")},
        })
    return out


def markdown(summary: list[dict]) -> str:
    lines = ["| profile | pairs | speedup (median) | range | PSNR dB (mean) | SSIM (mean) | block evaluations reused "
             "| first frame vs image, dB (lowest: uncached / BWCache) | motion follows the prompt (uncached / BWCache) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lo, hi = s["speedup_range"]
        ff = s["first_frame_min"]
        fp = s["follows_prompt"]
        lines.append(f"| {s['profile']} | {s['pairs']} | {s['speedup_median']:.2f}× | {lo:.2f}–{hi:.2f} | "
                     f"{s['psnr_mean']:.2f} | {s['ssim_mean']:.4f} | {s['reuse_mean']:.1%} | "
                     f"{ff['uncached']:.0f} / {ff['bwcache']:.0f} | {fp['uncached']}/{s['pairs']} / "
                     f"{fp['bwcache']}/{s['pairs']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="default,fast", help="comma-separated preset profiles")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    args = parser.parse_args(argv)
    for path, name in ((args.json, "--json"), (args.markdown, "--markdown")):
        if path is not None:
            if path.exists() and not args.overwrite:
                parser.error(f"{path} exists; pass --overwrite or choose another path")
            check_writable(path, name, folder=False)
    rows = run([p.strip() for p in args.profiles.split(",") if p.strip()])
    summary = summarise(rows)
    args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
