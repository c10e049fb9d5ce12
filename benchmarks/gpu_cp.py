"""BWCache under context parallelism: seconds per step, uncached and cached, and what the synchronisation costs.

    torchrun --nproc_per_node=N benchmarks/gpu_cp.py --json benchmarks/results/gpu-cp-N.json   # N GPUs, Ulysses
    torchrun --nproc_per_node=2 benchmarks/gpu_cp.py --tiny     # CPU: 2 gloo processes, a tiny config

One process runs the model unsharded; N processes shard the sequence with diffusers' context parallelism
(`--kind`, default Ulysses). Full-size Wan2.1 transformer with random weights, built as gpu_wan.py builds it (bf16,
the modules diffusers keeps in float32 kept so): `--model 1.3b` (default), whose 12 heads Ulysses splits over 2, 3,
4 or 6 processes, or `--model 14b`, 40 heads, over 2, 4, 5 or 8. The video (`--frames`, `--height`, `--width`;
default 81 frames of 480×832, 30 steps, 3 repeats) and the cache settings run (`--settings`, default all three) are the caller's to fit
to the GPUs: the weights are not sharded, the activations and the cache are (BENCHMARKS.md gives the arithmetic).
Driven like gpu_wan.py: a CFG denoising loop over the transformer, random latents and text embeddings. Reported
(rank 0): uncached and cached seconds per step (medians over repeats), the speedup, and for each cache setting the
all-reduces BWCache made per step, with their share of step time (each timed between device synchronisations, so it
includes the wait for the slowest process):

- paper_forced: paper mode with a forced schedule (trigger at step 1, R = 3): one all-reduce per branch at step 1,
  none after;
- paper_every_step: paper mode at δ = 0: the indicator every step, one all-reduce per branch and step (the most paper
  mode needs), holding every block's input feature throughout;
- blockwise_forced: block-wise mode with a forced schedule: one all-reduce per block that decides on its distance,
  holding a feature and a residual per block.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bwcache  # noqa: E402
from bwcache import BWCacheConfig, parallel  # noqa: E402
from bwcache.instruments import synchronize  # noqa: E402
from gpu_wan import TINY, WAN_1_3B, add_video_arguments, build_transformer, denoise, latent_shape, shrink_if_tiny  # noqa: E402

WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
MODELS = {"1.3b": WAN_1_3B, "14b": WAN_14B}
SETTINGS = {
    "paper_forced": BWCacheConfig(threshold=1e9, reuse_interval=3),
    "paper_every_step": BWCacheConfig(threshold=0.0),
    "blockwise_forced": BWCacheConfig(threshold=1e9, reuse_interval=3, mode="blockwise", warmup_steps=1),
}


class AllReduceTimer:
    """Counts BWCache's all-reduces and the seconds they take (synchronised before and after each)."""

    def __init__(self, device: str):
        self.device, self.calls, self.seconds = device, 0, 0.0
        self._original = None

    def __enter__(self):
        self._original = parallel.all_reduce_sum

        def timed(values, group):
            synchronize(self.device)
            start = time.perf_counter()
            result = self._original(values, group)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return result

        parallel.all_reduce_sum = timed
        return self

    def __exit__(self, *exc):
        parallel.all_reduce_sum = self._original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="1.3b")
    parser.add_argument("--kind", choices=parallel.KINDS, default="ulysses", help="context parallelism (N > 1)")
    parser.add_argument("--tiny", action="store_true", help="tiny config (a smoke run of the same code; CPU)")
    add_video_arguments(parser, frames=81, repeats=3)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated cache settings to run, of {', '.join(SETTINGS)}")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shrink_if_tiny(args)
    chosen = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown or not chosen:
        parser.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")

    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        device = parallel.init_distributed()
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    config = TINY if args.tiny else MODELS[args.model]
    model = build_transformer(config, device, dtype)
    if processes > 1:
        bwcache.enable_context_parallel(model, args.kind)
    shape = latent_shape(args.frames, args.height, args.width)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    text = torch.randn(1, 512, config["text_dim"], generator=generator, device=device, dtype=dtype)
    negative = torch.randn(1, 512, config["text_dim"], generator=generator, device=device, dtype=dtype)

    def plain():
        return denoise(model, latents, text, negative, args.steps, device)

    def cached(cache_config):
        with bwcache.cached(model, cache_config) as handle, AllReduceTimer(device) as timer:
            seconds = denoise(model, latents, text, negative, args.steps, device)
        return seconds, timer, handle.trace.reuse_fraction

    settings = {name: SETTINGS[name] for name in chosen}
    plain()  # warm-up
    uncached = [plain() for _ in range(args.repeats)]
    t_plain = statistics.median(uncached)
    rows = {}
    for name, cache_config in settings.items():
        runs = [cached(cache_config) for _ in range(args.repeats)]
        seconds = statistics.median(s for s, _, _ in runs)
        _, timer, reuse = runs[-1]
        rows[name] = {
            "seconds_per_step": seconds / args.steps,
            "speedup": t_plain / seconds,
            "reuse_fraction": reuse,
            "all_reduces_per_step": timer.calls / args.steps,
            "all_reduce_share_of_step": timer.seconds / runs[-1][0],
        }
    results = {
        "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "processes": processes,
        "context_parallel": parallel.describe(parallel.context_parallel_config(model)) if processes > 1 else None,
        "config": "tiny" if args.tiny else f"Wan2.1-T2V-{args.model.upper()}",
        "dtype": str(dtype),
        "video": f"{args.frames} frames at {args.width}x{args.height}",
        "tokens": shape[2] * (shape[3] // 2) * (shape[4] // 2),
        "steps": args.steps,
        "repeats": args.repeats,
        "uncached_seconds_per_step": t_plain / args.steps,
        "cached": rows,
    }
    if parallel.is_main_process():
        text_out = json.dumps(results, indent=1, ensure_ascii=False)
        print(text_out)
        if args.json:
            args.json.write_text(text_out)
    if processes > 1:
        parallel.close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
