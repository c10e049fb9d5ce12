"""BWCache overheads on the full-size Wan2.1-T2V-1.3B transformer (random weights), with a forced reuse schedule.

    python benchmarks/gpu_wan.py                      # on a CUDA GPU: bf16, 480×832, 81 frames, 30 steps, CFG
    python benchmarks/gpu_wan.py --tiny --device cpu  # a seconds-long run of the same code on a tiny config

The denoising loop calls the transformer the way WanPipeline does (cond and uncond passes, each inside
`cache_context(..., step_index, num_inference_steps)`), with random latents and text embeddings. Weights are random:
speed and memory do not depend on them. Reported: uncached and cached seconds per step (medians over repeats); the
DiT blocks' share of step time; the cache's own work (its hooks, timed inside one run) as a share of step time, at
threshold 0 (the indicator on every block at every step) and with the forced schedule; achieved ÷ ideal speedup,
wall-clock and by that accounting; and the extra peak memory over the uncached run (weights + activations) for paper
mode as the Wan preset runs it (every block, every token), a lean paper mode (every other block, every 8th token,
as `--lean-*` sets) and block-wise mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bwcache  # noqa: E402
from bwcache import BWCacheConfig  # noqa: E402
from bwcache.bench import cache_work_shares  # noqa: E402
from bwcache.instruments import block_timer, parameter_bytes, peak_tensor_bytes, synchronize  # noqa: E402

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=4, text_dim=16, rope_max_seq_len=32)


def latent_shape(frames: int, height: int, width: int) -> tuple[int, ...]:
    """Wan's VAE: 4× temporal and 8× spatial compression, 16 channels."""
    return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """The video and the run's length, as this script and gpu_cp.py take them: frames, frame size, steps, repeats."""
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)


def shrink_if_tiny(args) -> None:
    """With `--tiny`, a video small enough for the tiny config: at most 5 frames of at most 32×32."""
    if args.tiny:
        args.frames, args.height, args.width = min(args.frames, 5), min(args.height, 32), min(args.width, 32)


def denoise(model, latents, text, negative, steps, device):
    """Seconds of a CFG denoising loop; the latents follow a simple Euler path so features evolve like sampling."""
    x = latents.clone()
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((1,), 1000.0 * (1 - i / steps), device=device)
            with model.cache_context("cond", step_index=i, num_inference_steps=steps):
                cond = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            with model.cache_context("uncond", step_index=i, num_inference_steps=steps):
                uncond = model(hidden_states=x, timestep=t, encoder_hidden_states=negative, return_dict=False)[0]
            x = x - (1.0 / steps) * (uncond + 5.0 * (cond - uncond))
    synchronize(device)
    model._reset_stateful_cache()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny config (a smoke run of the same code)")
    add_video_arguments(parser)
    parser.add_argument("--reuse-interval", type=int, default=3, help="R of the forced schedule (trigger at step 1)")
    parser.add_argument("--lean-token-stride", type=int, default=8, help="token stride of the lean paper-mode row")
    parser.add_argument("--lean-indicator-blocks", default="every_other", help="indicator blocks of the lean row")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shrink_if_tiny(args)
    device = args.device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    config = TINY if args.tiny else WAN_1_3B
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    shape = latent_shape(args.frames, args.height, args.width)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    text = torch.randn(1, 512, config["text_dim"], generator=generator, device=device, dtype=dtype)
    negative = torch.randn(1, 512, config["text_dim"], generator=generator, device=device, dtype=dtype)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)

    def plain():
        return denoise(model, latents, text, negative, args.steps, device)

    def with_cache(cache_config):
        def run():
            with bwcache.cached(model, cache_config) as handle:
                return denoise(model, latents, text, negative, args.steps, device), handle

        return run

    full_trace = BWCacheConfig(threshold=0.0)
    forced = BWCacheConfig(threshold=1e9, reuse_interval=args.reuse_interval)
    lean = BWCacheConfig(threshold=1e9, reuse_interval=args.reuse_interval, indicator_token_stride=args.lean_token_stride,
                         indicator_blocks=args.lean_indicator_blocks)
    blockwise = BWCacheConfig(threshold=1e9, reuse_interval=args.reuse_interval, mode="blockwise", warmup_steps=1)

    plain()  # warm-up
    uncached, cached = [], []
    reuse = None
    for _ in range(args.repeats):
        uncached.append(plain())
        seconds, handle = with_cache(forced)()
        cached.append(seconds)
        reuse = handle.trace.reuse_fraction
    timer = block_timer(model, device)
    try:
        plain_once = plain()
    finally:
        timer.remove()
    block_share = min(1.0, timer.seconds / plain_once)
    indicator, cache_work = cache_work_shares(model, plain, (full_trace, forced), device)

    weights = parameter_bytes(model)
    peaks = {"uncached": peak_tensor_bytes(plain, device)}
    for name, cache_config in (("paper", forced), ("paper_lean", lean), ("blockwise", blockwise),
                               ("full_trace", full_trace)):
        peaks[name] = peak_tensor_bytes(with_cache(cache_config), device)
    t_plain, t_cached = statistics.median(uncached), statistics.median(cached)
    ideal = 1.0 / (1.0 - reuse * block_share)
    results = {
        "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "config": "tiny" if args.tiny else "Wan2.1-T2V-1.3B",
        "dtype": str(dtype),
        "video": f"{args.frames} frames at {args.width}x{args.height}",
        "latent_shape": list(shape),
        "tokens": tokens,
        "steps": args.steps,
        "repeats": args.repeats,
        "uncached_seconds_per_step": t_plain / args.steps,
        "bwcache_seconds_per_step": t_cached / args.steps,
        "speedup": t_plain / t_cached,
        "reuse_fraction": reuse,
        "block_share_of_step": block_share,
        "ideal_speedup": ideal,
        "achieved_over_ideal": (t_plain / t_cached) / ideal,
        "achieved_over_ideal_by_accounting": 1.0 - cache_work,
        "indicator_share_of_step": indicator,
        "cache_work_share_of_step": cache_work,
        "weights_bytes": weights,
        "peak_activation_bytes": peaks,
        "extra_peak_memory_over_total": {
            name: (peak - peaks["uncached"]) / (peaks["uncached"] + weights) for name, peak in peaks.items() if name != "uncached"
        },
        "lean": {"indicator_token_stride": args.lean_token_stride, "indicator_blocks": args.lean_indicator_blocks},
    }
    text_out = json.dumps(results, indent=1)
    print(text_out)
    if args.json:
        args.json.write_text(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
