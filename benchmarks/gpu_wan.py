"""BWCache on the full-size Wan2.1-T2V-1.3B transformer (random weights): what the cache costs and what the Wan
preset's profiles gain, in one run of about 2.5–4 minutes on one H200, printed as one JSON object at the end.

    python benchmarks/gpu_wan.py --json benchmarks/results/gpu-wan2.1-1.3b.json   # CUDA: the defaults below
    python benchmarks/gpu_wan.py --frames 81 --steps 50                           # WanPipeline's own length (~6.5×)
    python benchmarks/gpu_wan.py --tiny --device cpu                              # seconds: the same code, tiny

Defaults: bf16, 33 frames of 480×832 (9 × 30 × 52 = 14,040 tokens), 30 steps with CFG: the Wan2.1-1.3B preset's
demo request, 2 repeats. A step is 1.46·10¹⁴ FLOPs there (`bwcache.ui.budget`'s model, within 0.1% of torch's
count), about 0.3–0.5 s on an H200; the script runs about 15 generations' worth of steps (below), so about 2.5–4
minutes with start-up. 81 frames of 480×832 (32,760 tokens) cost 3.9× as much per step.

The model is built as `from_pretrained(..., dtype=torch.bfloat16)` leaves a checkpoint: bf16, except the modules
diffusers keeps in float32 (`WanTransformer3DModel._keep_in_fp32_modules`: rope, time embedder, scale-shift tables,
norms), never cast whole. The denoising loop calls the transformer as WanPipeline does (cond and uncond passes, each
inside `cache_context(..., step_index, num_inference_steps)`), with random latents and text embeddings. Weights and
inputs are random: speed and memory do not depend on them, but which steps an indicator reuses does, so the
profiles' reuse here is not a real prompt's (their speedup at that reuse is real).

Per repeat, interleaved: uncached; threshold 0 (the indicator on every block at every step, nothing reused); a
forced schedule (trigger at step 1, R = 3); the Wan2.1-1.3B preset's default and fast profiles
(`resolve_config(load_preset("wan2.1-t2v-1.3b"), steps, profile=...)`). Then one run timing the DiT blocks, three
timing the cache's own hooks, and five short runs (`--memory-steps`) for peak memory. Reported (medians over
repeats): uncached seconds per step and achieved TFLOP/s; threshold 0's wall-clock overhead over uncached; for the
forced schedule and each profile, seconds per step, speedup and reuse; the blocks' share of step time; achieved ÷
ideal speedup, wall-clock and by the cache's own accounting; the indicator's and the cache's work as shares of step
time; and the extra peak memory over the uncached run (weights + activations) for paper mode as the Wan preset runs
it (every block, every token), a lean paper mode (every other block, every 8th token, as `--lean-*` sets),
block-wise mode and threshold 0.
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
from bwcache.presets import load_preset  # noqa: E402
from bwcache.runner import resolve_config  # noqa: E402
from bwcache.ui.budget import WanShape  # noqa: E402

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=4, text_dim=16, rope_max_seq_len=32)
PRESET = "wan2.1-t2v-1.3b"
PROFILES = ("default", "fast")


def latent_shape(frames: int, height: int, width: int) -> tuple[int, ...]:
    """Wan's VAE: 4× temporal and 8× spatial compression, 16 channels."""
    return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def flop_shape(config: dict) -> WanShape:
    """The budget's FLOP model for a transformer config."""
    return WanShape(layers=config["num_layers"], dim=config["num_attention_heads"] * config["attention_head_dim"],
                    ffn=config["ffn_dim"], text_dim=config["text_dim"])


def add_video_arguments(parser: argparse.ArgumentParser, frames: int = 33, repeats: int = 2) -> None:
    """The video and the run's length, as this script and gpu_cp.py take them: frames, frame size, steps, repeats."""
    parser.add_argument("--frames", type=int, default=frames)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=repeats)


def shrink_if_tiny(args) -> None:
    """With `--tiny`, a video small enough for the tiny config: at most 5 frames of at most 32×32."""
    if args.tiny:
        args.frames, args.height, args.width = min(args.frames, 5), min(args.height, 32), min(args.width, 32)


def build_transformer(config: dict, device, dtype: torch.dtype):
    """A WanTransformer3DModel with random weights, in the dtypes `from_pretrained(..., dtype=dtype)` gives a
    checkpoint's: every floating tensor of its state dict in `dtype` except those of the modules the class keeps in
    float32 (`_keep_in_fp32_modules`, matched against the name's parts, as diffusers' loader does)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config)
    keep = set(model._keep_in_fp32_modules or ())
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model.eval()


def float32_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)


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


def _versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__}


def main(argv=None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny config (a smoke run of the same code)")
    add_video_arguments(parser)
    parser.add_argument("--reuse-interval", type=int, default=3, help="R of the forced schedule (trigger at step 1)")
    parser.add_argument("--memory-steps", type=int, default=6,
                        help="steps of the peak-memory runs (every setting reaches its largest state by then)")
    parser.add_argument("--lean-token-stride", type=int, default=8, help="token stride of the lean paper-mode row")
    parser.add_argument("--lean-indicator-blocks", default="every_other", help="indicator blocks of the lean row")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    shrink_if_tiny(args)
    device = args.device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    config = TINY if args.tiny else WAN_1_3B
    model = build_transformer(config, device, dtype)
    shape = latent_shape(args.frames, args.height, args.width)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    text = torch.randn(1, 512, config["text_dim"], generator=generator, device=device, dtype=dtype)
    negative = torch.randn(1, 512, config["text_dim"], generator=generator, device=device, dtype=dtype)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    flops_per_step = 2 * flop_shape(config).pass_flops(args.frames, args.height, args.width)

    def plain(steps=args.steps):
        return denoise(model, latents, text, negative, steps, device)

    def with_cache(cache_config, steps=args.steps):
        def run():
            with bwcache.cached(model, cache_config) as handle:
                return denoise(model, latents, text, negative, steps, device), handle

        return run

    full_trace = BWCacheConfig(threshold=0.0)
    forced = BWCacheConfig(threshold=1e9, reuse_interval=args.reuse_interval)
    lean = BWCacheConfig(threshold=1e9, reuse_interval=args.reuse_interval, indicator_token_stride=args.lean_token_stride,
                         indicator_blocks=args.lean_indicator_blocks)
    blockwise = BWCacheConfig(threshold=1e9, reuse_interval=args.reuse_interval, mode="blockwise", warmup_steps=1)
    preset = load_preset(PRESET)
    profiles = {name: resolve_config(preset, args.steps, profile=name) for name in PROFILES}

    warmup_steps = min(args.steps, 3)
    plain(warmup_steps)
    with_cache(full_trace, warmup_steps)()
    timed = {"uncached": [], "threshold_zero": [], "forced": [], **{name: [] for name in PROFILES}}
    handles = {}
    for _ in range(args.repeats):
        timed["uncached"].append(plain())
        for name, cache_config in (("threshold_zero", full_trace), ("forced", forced), *profiles.items()):
            seconds, handles[name] = with_cache(cache_config)()
            timed[name].append(seconds)
    median = {name: statistics.median(values) for name, values in timed.items()}

    timer = block_timer(model, device)
    try:
        plain_once = plain()
    finally:
        timer.remove()
    block_share = min(1.0, timer.seconds / plain_once)
    indicator, cache_work = cache_work_shares(model, plain, (full_trace, forced), device)

    weights = parameter_bytes(model)
    memory_steps = min(args.memory_steps, args.steps)
    peaks = {"uncached": peak_tensor_bytes(lambda: plain(memory_steps), device)}
    for name, cache_config in (("paper", forced), ("paper_lean", lean), ("blockwise", blockwise),
                               ("full_trace", full_trace)):
        peaks[name] = peak_tensor_bytes(with_cache(cache_config, memory_steps), device)

    t_plain = median["uncached"]

    def schedule_row(name):
        trace = handles[name].trace
        reuse = trace.reuse_fraction
        ideal = 1.0 / (1.0 - reuse * block_share)
        return {
            "seconds_per_step": median[name] / args.steps,
            "speedup": t_plain / median[name],
            "reuse_fraction": reuse,
            "ideal_speedup": ideal,
            "achieved_over_ideal": (t_plain / median[name]) / ideal,
            "trigger_steps": {b: v["trigger_step"] for b, v in trace.to_dict()["branches"].items()},
        }

    forced_row = schedule_row("forced")
    results = {
        "device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "versions": _versions(),
        "config": "tiny" if args.tiny else "Wan2.1-T2V-1.3B",
        "dtype": str(dtype),
        "float32_parameters": float32_parameters(model),
        "kept_in_float32": list(model._keep_in_fp32_modules or ()),
        "video": f"{args.frames} frames at {args.width}x{args.height}",
        "latent_shape": list(shape),
        "tokens": tokens,
        "steps": args.steps,
        "repeats": args.repeats,
        "memory_steps": memory_steps,
        "flops_per_step": flops_per_step,
        "uncached_seconds_per_step": t_plain / args.steps,
        "uncached_tflops_per_second": flops_per_step * args.steps / t_plain / 1e12,
        "threshold_zero": {
            "seconds_per_step": median["threshold_zero"] / args.steps,
            "wall_clock_overhead": median["threshold_zero"] / t_plain - 1.0,
            "reuse_fraction": handles["threshold_zero"].trace.reuse_fraction,
        },
        # The forced schedule, at the top level as earlier records have it.
        "bwcache_seconds_per_step": forced_row["seconds_per_step"],
        "speedup": forced_row["speedup"],
        "reuse_fraction": forced_row["reuse_fraction"],
        "block_share_of_step": block_share,
        "ideal_speedup": forced_row["ideal_speedup"],
        "achieved_over_ideal": forced_row["achieved_over_ideal"],
        "achieved_over_ideal_by_accounting": 1.0 - cache_work,
        "indicator_share_of_step": indicator,
        "cache_work_share_of_step": cache_work,
        "profiles": {
            name: {"preset": PRESET, "config": {k: v for k, v in profiles[name].to_dict().items()
                                                 if k in ("mode", "threshold", "reuse_interval", "indicator_blocks")},
                   **schedule_row(name)}
            for name in PROFILES
        },
        "weights_bytes": weights,
        "peak_activation_bytes": peaks,
        "extra_peak_memory_over_total": {
            name: (peak - peaks["uncached"]) / (peaks["uncached"] + weights) for name, peak in peaks.items() if name != "uncached"
        },
        "lean": {"indicator_token_stride": args.lean_token_stride, "indicator_blocks": args.lean_indicator_blocks},
        "wall_seconds": time.perf_counter() - started,
    }
    text_out = json.dumps(results, indent=1, ensure_ascii=False)
    if args.json:
        args.json.write_text(text_out)
    print(text_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
