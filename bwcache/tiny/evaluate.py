"""Measure the shipped Tiny Shapes model: prompt adherence judged from pixels, generation time and, for a model that
takes a first frame, image-to-video (the first frame against the image, motion judged).

    python -m bwcache.tiny.evaluate                  # measures the shipped model and prints the results
    python -m bwcache.tiny.evaluate --write          # also writes eval.json and refreshes the model card in --path
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .data import COLOURS, DIRECTIONS, SHAPES, make_clip, make_example_image, make_prompt
from .judge import judge
from .pipeline import ASSETS_DIR, input_layout, load_config, load_pipeline

I2V_SEED_BASE = 7_000_000  # held-out (image, prompt) pairs: clip seeds far from any training stream
I2V_NOISE_SEED = 2000


def adherence_cases(n: int, seed: int) -> list[tuple[str, int]]:
    """n (prompt, seed) pairs: every attribute combination in turn (shuffled), each with a random seed."""
    rng = np.random.default_rng(seed)
    combos = [make_prompt(c, s, d) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]
    order = []
    while len(order) < n:
        order.extend(rng.permutation(len(combos)).tolist())
    return [(combos[i], int(rng.integers(2**31))) for i in order[:n]]


def measure_adherence(pipe, n: int = 56, seed: int = 1234, **call_kwargs) -> dict:
    rows = []
    for prompt, s in adherence_cases(n, seed):
        frames = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(s), **call_kwargs).frames[0]
        j = judge(frames, prompt)
        rows.append({"prompt": prompt, "seed": s, "ok": j.ok, "colour": j.colour, "direction": j.direction,
                     "colour_ok": j.colour_ok, "direction_ok": j.direction_ok})
    ok = sum(r["ok"] for r in rows)
    return {
        "n": n,
        "passed": ok,
        "rate": ok / n,
        "colour_rate": sum(r["colour_ok"] for r in rows) / n,
        "direction_rate": sum(r["direction_ok"] for r in rows) / n,
        "settings": call_kwargs,
        "failures": [r for r in rows if not r["ok"]],
    }


def psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def i2v_cases(n: int, scene, height: int = 32, width: int = 32, num_frames: int = 16) -> list[tuple[str, int, np.ndarray]]:
    """n held-out (prompt, noise seed, first frame) triples: frame 0 of a clip of `scene` and that clip's prompt."""
    out = []
    for i in range(n):
        image, prompt = make_example_image(I2V_SEED_BASE + i, scene, height, width, num_frames=num_frames)
        out.append((prompt, I2V_NOISE_SEED + i, image))
    return out


def model_scene(path: Path):
    """The scene a model was trained on (its saved options), for its example images; v1 clips if not recorded."""
    return load_config(path).get("data", {}).get("scene") or "v1"


def measure_i2v(pipe, scene, n: int = 24, batch: int = 8, **call_kwargs) -> dict:
    """Image-to-video on held-out pairs: PSNR of the first generated frame to the image; the same prompt and seed
    without the image (it must not match); the motion judged from pixels as for text-to-video."""
    d = pipe.defaults
    cases = i2v_cases(n, scene, call_kwargs.get("height", d["height"]), call_kwargs.get("width", d["width"]),
                      call_kwargs.get("num_frames", d["num_frames"]))
    with_image, without, rows = [], [], []
    for i in range(0, n, batch):
        chunk = cases[i:i + batch]
        common = dict(prompt=[p for p, _, _ in chunk], output_type="np", **call_kwargs)
        gens = lambda: [torch.Generator("cpu").manual_seed(s) for _, s, _ in chunk]  # noqa: E731
        a = pipe(**common, image=[im for _, _, im in chunk], generator=gens()).frames
        b = pipe(**common, generator=gens()).frames
        for (prompt, s, image), fa, fb in zip(chunk, a, b):
            with_image.append(psnr(fa[0], image))
            without.append(psnr(fb[0], image))
            j = judge(fa, prompt)
            rows.append({"prompt": prompt, "seed": s, "ok": j.ok, "colour_ok": j.colour_ok,
                         "direction_ok": j.direction_ok, "direction": j.direction})
    finite = lambda v: round(v, 2) if math.isfinite(v) else None  # noqa: E731
    return {
        "n": n,
        "scene": scene,
        "first_frame_psnr": {"median": finite(statistics.median(with_image)), "min": finite(min(with_image)),
                             "share_at_least_25": sum(v >= 25 for v in with_image) / n},
        "first_frame_psnr_without_image": {"median": finite(statistics.median(without)),
                                           "max": finite(max(without))},
        "adherence": {"passed": sum(r["ok"] for r in rows), "rate": sum(r["ok"] for r in rows) / n,
                      "colour_rate": sum(r["colour_ok"] for r in rows) / n,
                      "direction_rate": sum(r["direction_ok"] for r in rows) / n,
                      "failures": [r for r in rows if not r["ok"]]},
    }


def measure_ground_truth(n: int = 200) -> dict:
    ok = sum(judge(c.frames, c.prompt).ok for c in (make_clip(s) for s in range(n)))
    return {"n": n, "passed": ok, "rate": ok / n}


def measure_speed(pipe, repeats: int = 3) -> dict:
    gen = lambda s: torch.Generator("cpu").manual_seed(s)  # noqa: E731
    pipe(generator=gen(0))  # warm-up
    single = []
    for r in range(repeats):
        t0 = time.perf_counter()
        pipe(generator=gen(r))
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    pipe(generator=gen(0))
    pipe(generator=gen(0))
    pair = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe(generator=gen(0), guidance_scale=1.0)
    no_cfg = time.perf_counter() - t0
    return {
        "threads": torch.get_num_threads(),
        "default_generation_s": round(statistics.median(single), 3),
        "default_generation_runs_s": [round(x, 3) for x in single],
        "two_generations_s": round(pair, 3),
        "no_cfg_generation_s": round(no_cfg, 3),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", type=Path, default=ASSETS_DIR)
    p.add_argument("--n", type=int, default=56)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--i2v-n", type=int, default=24, help="held-out (image, prompt) pairs (models that take an image)")
    p.add_argument("--write", action="store_true", help="write eval.json and refresh the model card in --path")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    pipe = load_pipeline(device="cpu", path=args.path)
    load_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    result = {"load_s": round(load_s, 3)}
    result["speed"] = measure_speed(pipe)
    print(json.dumps(result, indent=1), flush=True)
    result["ground_truth"] = measure_ground_truth()
    print("ground truth:", result["ground_truth"], flush=True)
    result["adherence"] = measure_adherence(pipe, args.n, args.seed)
    a = result["adherence"]
    print(f"adherence: {a['passed']}/{a['n']} = {a['rate']:.1%} (colour {a['colour_rate']:.1%}, "
          f"direction {a['direction_rate']:.1%})", flush=True)
    for f in a["failures"]:
        print("  failed:", f, flush=True)
    if input_layout(pipe.transformer.config)[1] is not None and args.i2v_n:
        result["i2v"] = measure_i2v(pipe, model_scene(args.path), args.i2v_n)
        i = result["i2v"]
        print(f"image-to-video: first-frame PSNR median {i['first_frame_psnr']['median']} dB (min "
              f"{i['first_frame_psnr']['min']}), without the image {i['first_frame_psnr_without_image']['median']} dB; "
              f"motion {i['adherence']['passed']}/{i['n']} = {i['adherence']['rate']:.1%}", flush=True)
    if args.write:
        (args.path / "eval.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        from .card import write_card

        write_card(args.path)
        print(f"wrote {args.path / 'eval.json'} and the model card", flush=True)


if __name__ == "__main__":
    main()
