"""Speed at quality: BWCache against diffusers' own caches over many prompts, plus the cache's overheads.

`python -m bwcache bench` runs, for each prompt: a warm-up, then per repeat the uncached run and every method's
cached run, in one process, so each speedup is a ratio of two runs taken side by side. Reported per method: median
speedup over prompts × repeats, mean PSNR and SSIM against the uncached video (float frames, before encoding), and
the share of the DiT blocks' compute that the method skipped: the FLOPs of their linear layers and of their attention
(from the shapes of each attention call that runs), measured the same way for every method.

By default the prompts are ones no default was tuned on (`HELD_OUT_PROMPTS`), and the results go to a new folder;
an existing result file is overwritten only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import peers
from .blocks import find_blocks
from .config import BWCacheConfig
from .apply import apply_bwcache, cached
from .memory import peak_tensor_bytes, pipeline_weight_bytes
from .metrics import compare_videos
from .pipelines import default_device, device_name, get_pipeline
from .runner import AUTO, ForwardTimer, _synchronize, block_timer, check_prompt, generate, resolve_config, resolve_preset, resolve_settings
from .trace import format_bytes

# Overheads are measured on the first few prompts only: they vary little between prompts.
OVERHEAD_PROMPTS = 3
OVERHEAD_REPEATS = 5

# The prompts the embedded preset's defaults and profiles were tuned on.
TINY_PROMPTS = (
    "a red square moving right",
    "a blue circle moving left",
    "a green circle moving up",
    "a yellow square moving down",
    "a magenta circle moving right",
    "a cyan square moving left",
    "a white circle moving down",
    "a red circle moving up",
    "a white square moving right",
    "a blue square moving up",
)

# Prompts no default or profile was tuned on: the benchmark's default set, where its targets are read.
HELD_OUT_PROMPTS = (
    "a green square moving left",
    "a yellow circle moving right",
    "a magenta square moving up",
    "a cyan circle moving down",
    "a blue circle moving down",
    "a red square moving up",
    "a white circle moving left",
    "a yellow square moving right",
)
PROMPT_SETS = {"held-out": HELD_OUT_PROMPTS, "tuning": TINY_PROMPTS}


@dataclass
class Method:
    """One row of the table: BWCache with a config, or a peer with its parameters."""

    key: str
    label: str
    kind: str  # "bwcache", "steps" (uncached with fewer steps) or a peer key
    params: dict = field(default_factory=dict)
    family: str | None = None  # the plot's group; derived from kind and mode when None
    profile: str | None = None  # a BWCache row: the preset profile its params override
    parent: str | None = None  # a row this one varies: left out where it would run the parent's very config

    def enable(self, pipe, preset, settings, calibration):
        if self.kind == "bwcache":
            config = resolve_config(preset, settings["num_inference_steps"], profile=self.profile, **self.params)
            handle = apply_bwcache(pipe, config)
            return handle.remove, handle
        if self.kind == "steps":
            return (lambda: None), None
        peer = peers.enable_peer(self.kind, pipe, settings, params=self.params, mag_ratios=calibration)
        return peer.remove, None

    def settings_for(self, settings: dict, steps: dict[str, int]) -> dict:
        """The generation settings of this row: the prompt's, with fewer steps for a "steps" row."""
        if self.kind != "steps":
            return settings
        return {**settings, "num_inference_steps": steps[self.key]}


def default_methods() -> list[Method]:
    # The preset's own profiles first: the rows the targets are read from.
    methods = [Method("bw-default", "BWCache preset default", "bwcache", {}, family="BWCache profiles"),
               Method("bw-fast", "BWCache fast profile", "bwcache", {}, family="BWCache profiles", profile="fast")]
    # Ablations: each profile with its residuals reused unchanged (no extrapolation), its schedule without the
    # indicator, and the uncached pipeline with fewer steps in about the same compute (the paper's Table 3 baseline).
    for profile in ("default", "fast"):
        methods.append(Method(f"bw-{profile}-unchanged", f"BWCache {profile} profile, residuals unchanged", "bwcache",
                              {"extrapolation": 0.0}, family="Ablations", profile=profile, parent=f"bw-{profile}"))
    methods.append(Method("static-default", "Static schedule (default's warm-up, R, tail)", "bwcache",
                          {"mode": "static"}, family="Ablations"))
    methods.append(Method("static-fast", "Static schedule (fast profile's warm-up, R, tail)", "bwcache",
                          {"mode": "static"}, family="Ablations", profile="fast"))
    for matched in ("bw-default", "bw-fast"):
        methods.append(Method(f"steps-as-{matched}", f"Fewer steps, {matched}'s compute", "steps",
                              {"match": matched}, family="Ablations"))
    # Paper rows pin the published method (mode and R = 10% of the steps), whatever the preset's default is.
    paper = {"mode": "paper", "reuse_interval": AUTO}
    for delta in (0.02, 0.03, 0.05, 0.1, 0.15):
        methods.append(Method(f"bw-paper-{delta:g}", f"BWCache paper δ={delta:g}", "bwcache", {**paper, "threshold": delta}))
    for r in (1, 2):
        methods.append(
            Method(f"bw-paper-0.15-r{r}", f"BWCache paper δ=0.15 R={r}", "bwcache",
                   {**paper, "threshold": 0.15, "reuse_interval": r})
        )
    # The official code's decisions (BWCacheConfig.official): modulated feature, R = 3 steps, its tail rule.
    official = {"mode": "paper", "reuse_interval": 3, "indicator_feature": "modulated", "tail_rule": "official",
                "tail_fraction": 0.5, "indicator_token_stride": 1}
    for delta in (0.05, 0.1, 0.15):
        methods.append(Method(f"bw-official-{delta:g}", f"BWCache official δ={delta:g}", "bwcache",
                              {**official, "threshold": delta}, family="BWCache official"))
    for r in (1, 2):
        methods.append(Method(f"bw-official-0.15-r{r}", f"BWCache official δ=0.15 R={r}", "bwcache",
                              {**official, "threshold": 0.15, "reuse_interval": r}, family="BWCache official"))
    # Block-wise rows keep the preset's other settings (R, warm-up and tail steps) and vary δ.
    for delta in (0.1, 0.2, 0.3, 0.4):
        methods.append(
            Method(f"bw-block-{delta:g}", f"BWCache block-wise δ={delta:g}", "bwcache", {"threshold": delta, "mode": "blockwise"})
        )
    for r in (1, 3):
        methods.append(
            Method(f"bw-block-0.3-r{r}", f"BWCache block-wise δ=0.3 R={r}", "bwcache",
                   {"threshold": 0.3, "mode": "blockwise", "reuse_interval": r})
        )
    methods.append(
        Method("bw-block-0.3-w2", "BWCache block-wise δ=0.3, 2 warm-up steps", "bwcache",
               {"threshold": 0.3, "mode": "blockwise", "warmup_steps": 2})
    )
    for t in (0.05, 0.1, 0.2):
        methods.append(Method(f"fbc-{t:g}", f"FirstBlockCache {t:g}", "fbc", {"threshold": t}))
    for t in (0.06, 0.12):
        methods.append(Method(f"magcache-{t:g}", f"MagCache {t:g}", "magcache", {"threshold": t}))
    for n in (3, 5):
        methods.append(Method(f"taylorseer-{n}", f"TaylorSeer interval {n}", "taylorseer", {"cache_interval": n}))
    for t in (0.25, 0.5):
        methods.append(Method(f"seacache-{t:g}", f"SeaCache {t:g}", "seacache", {"threshold": t}))
    methods.append(Method("pab-2", "PAB spatial 2", "pab", {}))
    # cache-dit's DBCache at its Wan settings (F1B0, 2 warm-up steps, at most 2 cached steps in a row), alone and
    # with its TaylorSeer calibrator, at its recommended residual-difference threshold and two faster ones.
    for key in ("cachedit", "cachedit-taylorseer"):
        for t in (0.08, 0.12, 0.16):
            label = f"{peers.cachedit.METHODS[key]} {t:g}"
            methods.append(Method(f"{key}-{t:g}", label, key, {"residual_diff_threshold": t}))
    return methods


class ComputeProbe:
    """Counts the FLOPs the DiT blocks actually execute: their linear layers (2 per multiply-add, from each call's
    input) and their attention (QKᵀ and the weighted sum of V, 4·|Q|·L_k, from the shapes of each call to torch's
    `scaled_dot_product_attention`, which no FLOP counter sees on a CPU). Use as a context manager: while it is
    active, that function is wrapped (and called unchanged, so the outputs are those of an unprobed run)."""

    def __init__(self, transformer):
        blocks = [spec.module for spec in find_blocks(transformer)]
        prefixes = tuple(spec.name + "." for spec in find_blocks(transformer))
        self.linear_flops = 0
        self.attention_flops = 0
        self._depth = 0
        self._original = None
        self._handles = [
            module.register_forward_hook(self._count)
            for name, module in transformer.named_modules()
            if name.startswith(prefixes) and isinstance(module, torch.nn.Linear)
        ]
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._enter))
            self._handles.append(block.register_forward_hook(self._leave, always_call=True))

    @property
    def flops(self) -> int:
        return self.linear_flops + self.attention_flops

    def _enter(self, module, args):
        self._depth += 1

    def _leave(self, module, args, output):
        self._depth -= 1

    def _count(self, module, args, output):
        self.linear_flops += 2 * args[0].numel() * module.out_features

    def __enter__(self):
        original = self._original = F.scaled_dot_product_attention

        def counted(*args, **kwargs):
            if self._depth > 0:
                query = kwargs.get("query", args[0] if args else None)
                key = kwargs.get("key", args[1] if len(args) > 1 else None)
                self.attention_flops += 4 * query.numel() * key.shape[-2]
            return original(*args, **kwargs)

        F.scaled_dot_product_attention = counted
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._original
        return False

    def remove(self):
        for handle in self._handles:
            handle.remove()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny-shapes")
    parser.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="held-out",
                        help="held-out: prompts no default was tuned on (default); tuning: the ones they were tuned on")
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts (from the prompt set)")
    parser.add_argument("--prompt-file", type=Path, help="one prompt per line, instead of a prompt set")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per prompt (median taken)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", help="comma-separated method keys (default: all); see --list-methods")
    parser.add_argument("--list-methods", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("--out", type=Path,
                        help="folder for JSON, SVG and HTML (default: a new folder benchmarks/runs/<preset>-<time>)")
    parser.add_argument("--markdown", type=Path, help="also write the report (e.g. BENCHMARKS.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace result files that already exist")


def select_methods(keys: str | None) -> list[Method]:
    """The methods named in a comma-separated list (all when None), in table order; each "steps" row needs the row
    whose compute it matches."""
    methods = default_methods()
    if keys:
        wanted = [k.strip() for k in keys.split(",") if k.strip()]
        unknown = sorted(set(wanted) - {m.key for m in methods})
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; see --list-methods.")
        methods = [m for m in methods if m.key in wanted]
    chosen = {m.key for m in methods}
    for m in methods:
        if m.kind == "steps" and m.params["match"] not in chosen:
            raise ValueError(f"Method {m.key} runs as many steps as {m.params['match']}'s compute allows: add "
                             f"{m.params['match']} to --methods.")
    return methods


def output_paths(out: Path | None, preset_name: str, overwrite: bool, markdown: Path | None = None) -> dict[str, Path]:
    """Where the results go, checked before any work: a new folder by default; an existing file only with
    `overwrite`."""
    if out is None:
        out = Path("benchmarks/runs") / f"{preset_name}-{datetime.now():%Y%m%d-%H%M%S}"
    paths = {"json": out / f"{preset_name}.json", "svg": out / f"{preset_name}-pareto.svg",
             "html": out / f"{preset_name}-pareto.html"}
    if markdown is not None:
        paths["markdown"] = markdown
    for path in paths.values():
        if path.is_dir():
            raise ValueError(f"{path} is a folder; the benchmark writes a file there.")
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another --out.")
    return paths


def run_from_args(args) -> int:
    if args.list_methods:
        for m in default_methods():
            print(f"{m.key:<22} {m.label}")
        return 0
    methods = select_methods(args.methods)
    if args.prompt_file:
        prompts = [line.strip() for line in args.prompt_file.read_text().splitlines() if line.strip()]
    else:
        prompts = list(PROMPT_SETS[args.prompt_set])
    if args.prompts < 1:
        raise ValueError(f"--prompts must be ≥ 1, got {args.prompts}.")
    prompts = prompts[: args.prompts]
    if args.repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {args.repeats}.")
    preset_name = resolve_preset(args.preset).name
    paths = output_paths(args.out, preset_name, args.overwrite, args.markdown)
    command = "python -m bwcache bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    results = run_benchmark(args.preset, prompts, methods, repeats=args.repeats, seed=args.seed, device=args.device)
    results["command"] = command
    results["prompt_set"] = "file" if args.prompt_file else args.prompt_set
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["svg"].write_text(pareto_svg(results["rows"]))
    from .figures import sweep_figure

    sweep_figure([_sweep_row(r) for r in results["rows"] if r["psnr"] is not None]).write_html(
        paths["html"], include_plotlyjs="cdn"
    )
    print(markdown_table(results["rows"]))
    if args.markdown:
        args.markdown.write_text(report_markdown(results, svg_path=str(paths["svg"])))
        print(f"wrote {args.markdown}")
    print(f"results in {paths['json'].parent}")
    return 0


class Progress:
    """Progress lines with an ETA, from the generations done so far and those still planned."""

    def __init__(self, report, planned: int):
        self.report = report
        self.planned = planned
        self.done = 0
        self.started = time.perf_counter()

    def advance(self, generations: int, where: str) -> None:
        self.done += generations
        if self.report is None:
            return
        elapsed = time.perf_counter() - self.started
        left = max(self.planned - self.done, 0) * elapsed / max(self.done, 1)
        self.report(f"{where} · {_minutes(elapsed)} elapsed, about {_minutes(left)} left")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _planned_generations(prompts: int, methods: list[Method], repeats: int) -> int:
    """Generations a benchmark runs, for its ETA (the overheads' and memory passes included)."""
    per_prompt = 3 + any(m.kind == "magcache" for m in methods) + len(methods) * (1 + repeats) + repeats
    overheads = 1 + 4 + 2 * OVERHEAD_REPEATS
    return prompts * per_prompt + min(prompts, OVERHEAD_PROMPTS) * overheads + 1 + len(MEMORY_KEYS)


def _sweep_row(row):
    return {
        "threshold": row.get("threshold"),
        "speedup": row["speedup"],
        "psnr": row["psnr"],
        "ssim": row["ssim"],
        "reuse_fraction": row["skipped"],
        "label": row["family"],
    }


def run_benchmark(preset_name, prompts, methods, repeats=3, seed=0, device=None, progress=print, pipe=None,
                  overhead_repeats=OVERHEAD_REPEATS) -> dict:
    preset = resolve_preset(preset_name)
    device = device or default_device()
    pipe = pipe if pipe is not None else get_pipeline(preset, device)
    per_method: dict[str, dict[str, list]] = {m.key: {"speedup": [], "psnr": [], "ssim": [], "skipped": [], "seconds": []} for m in methods}
    skipped_reasons: dict[str, str] = {}
    overheads = {"indicator": [], "cache_work": [], "cache_work_other_storage": [], "ideal_ratio": [], "block_share": []}
    uncached_seconds = []
    steps_used: dict[str, list[int]] = {m.key: [] for m in methods if m.kind == "steps"}
    started = time.perf_counter()
    tracker = Progress(progress, _planned_generations(len(prompts), methods, repeats))
    # A "steps" row is measured after the row whose compute it matches.
    methods_in_order = [m for m in methods if m.kind != "steps"] + [m for m in methods if m.kind == "steps"]
    for p, prompt in enumerate(prompts):
        where = f"[prompt {p + 1}/{len(prompts)}]"
        settings = resolve_settings(preset, prompt=prompt, seed=seed + p)
        check_prompt(pipe, preset, settings)
        generate(pipe, preset, settings, device)  # warm-up
        baseline, _ = generate(pipe, preset, settings, device)
        plain_flops = _probe_flops(pipe, lambda: generate(pipe, preset, settings, device))
        calibration = None
        if any(m.kind == "magcache" for m in methods):
            calibration = peers.calibrate_magcache(
                pipe, lambda: generate(pipe, preset, settings, device), settings["num_inference_steps"]
            )
        tracker.advance(3 + (calibration is not None), f"{where} {prompt!r}: uncached run")
        active = []
        steps: dict[str, int] = {}
        for k, m in enumerate(methods_in_order):
            reason = _not_applicable(m, methods, pipe, preset, settings)
            if m.kind == "steps" and m.params["match"] in skipped_reasons:
                reason = f"It runs as many steps as {m.params['match']}'s compute allows, and that row did not run."
            if reason:
                skipped_reasons[m.key] = reason
                continue
            if m.kind == "steps":
                # As many uncached steps as the matched row's compute buys.
                matched = per_method[m.params["match"]]["skipped"][-1]
                steps[m.key] = max(1, round(settings["num_inference_steps"] * (1.0 - matched)))
                steps_used[m.key].append(steps[m.key])
            run_settings = m.settings_for(settings, steps)
            try:
                remove, _ = m.enable(pipe, preset, run_settings, calibration)
                try:
                    frames_holder = {}
                    flops = _probe_flops(
                        pipe, lambda: frames_holder.setdefault("f", generate(pipe, preset, run_settings, device)[0])
                    )
                finally:
                    remove()
            except Exception as error:
                if m.kind in ("bwcache", "steps"):
                    raise
                # A peer that fails here fails for every prompt: its row says why, the others go on.
                skipped_reasons[m.key] = f"failed on this pipeline: {type(error).__name__}: {error}"
                tracker.advance(1, f"{where} [method {k + 1}/{len(methods)}] {m.label}: failed ({error})")
                continue
            quality = compare_videos(baseline, frames_holder["f"], device=device)
            per_method[m.key]["psnr"].append(quality["psnr"])
            per_method[m.key]["ssim"].append(quality["ssim"])
            per_method[m.key]["skipped"].append(1.0 - flops / plain_flops)
            active.append(m)
            tracker.advance(1, f"{where} [method {k + 1}/{len(methods)}] {m.label}: quality")
        for r in range(repeats):
            _, t_plain = generate(pipe, preset, settings, device)
            uncached_seconds.append(t_plain)
            for m in active:
                run_settings = m.settings_for(settings, steps)
                remove, _ = m.enable(pipe, preset, run_settings, calibration)
                try:
                    _, t = generate(pipe, preset, run_settings, device)
                finally:
                    remove()
                per_method[m.key]["seconds"].append(t)
                per_method[m.key]["speedup"].append(t_plain / t)
            tracker.advance(1 + len(active), f"{where} timed repeat {r + 1}/{repeats} of every method")
        if p < OVERHEAD_PROMPTS:
            overheads_for_prompt(pipe, preset, settings, device, overheads, overhead_repeats)
            tracker.advance(1 + 4 + 2 * overhead_repeats, f"{where} the cache's overheads")

    rows = []
    for m in methods:
        data = per_method[m.key]
        if not data["speedup"]:
            rows.append({"key": m.key, "label": m.label, "family": _family(m), "skipped_reason": skipped_reasons.get(m.key),
                         "speedup": None, "psnr": None, "ssim": None, "skipped": None})
            continue
        label = m.label
        if m.key in steps_used:
            used = sorted(set(steps_used[m.key]))
            label += f" ({used[0]} steps)" if len(used) == 1 else f" ({used[0]}–{used[-1]} steps)"
        rows.append(
            {
                "key": m.key,
                "label": label,
                "family": _family(m),
                "threshold": m.params.get("threshold"),
                "params": m.params,
                **({"steps": steps_used[m.key]} if m.key in steps_used else {}),
                "speedup": statistics.median(data["speedup"]),
                "speedup_min": min(data["speedup"]),
                "speedup_max": max(data["speedup"]),
                "psnr": _finite_mean(data["psnr"]),
                "psnr_min": min(data["psnr"]),
                "ssim": float(np.mean(data["ssim"])),
                "skipped": float(np.mean(data["skipped"])),
            }
        )
    memory = memory_overhead(pipe, preset, resolve_settings(preset, prompt=prompts[0], seed=seed), device)
    settings = resolve_settings(preset, prompt=prompts[0], seed=seed)
    tracker.advance(1 + len(MEMORY_KEYS), "memory")
    return {
        "preset": preset.name,
        "model": preset.label,
        "device": device_name(device),
        "machine": f"{platform.machine()}, {platform.processor() or 'unknown CPU'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "settings": {k: settings[k] for k in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")},
        "prompts": prompts,
        "repeats": repeats,
        "uncached_seconds_median": statistics.median(uncached_seconds),
        "rows": rows,
        "overheads": {
            "indicator_share_of_step": statistics.median(overheads["indicator"]),
            "block_share_of_time": statistics.median(overheads["block_share"]),
            "cache_work_share_default": statistics.median(overheads["cache_work"]),
            "other_storage": other_storage(resolve_config(preset, settings["num_inference_steps"])).cache_dtype,
            "cache_work_share_other_storage": statistics.median(overheads["cache_work_other_storage"]),
            "achieved_over_ideal": statistics.median(overheads["ideal_ratio"]) if overheads["ideal_ratio"] else None,
            "achieved_over_ideal_range": [min(overheads["ideal_ratio"]), max(overheads["ideal_ratio"])]
            if overheads["ideal_ratio"] else None,
            "prompts": min(OVERHEAD_PROMPTS, len(prompts)),
            "repeats": overhead_repeats,
            **memory,
        },
        "seconds_total": time.perf_counter() - started,
    }


def _not_applicable(method: Method, methods: list[Method], pipe, preset, settings) -> str | None:
    """Why a row is left out on this pipeline and preset (None when it runs)."""
    if method.kind in peers.UNAVAILABLE:
        return peers.UNAVAILABLE[method.kind]
    if method.kind == "steps":
        return None
    if method.kind != "bwcache":
        return peers.applicability(method.kind, pipe, settings)
    if method.profile is not None and method.profile not in preset.profile_names:
        return f"{preset.label} names no {method.profile} profile."
    parent = next((m for m in methods if m.key == method.parent), None)
    if parent is not None:
        steps = settings["num_inference_steps"]
        mine = resolve_config(preset, steps, profile=method.profile, **method.params)
        if mine == resolve_config(preset, steps, profile=parent.profile, **parent.params):
            return f"The same config as {parent.label} on this preset."
    return None


def _family(method: Method) -> str:
    if method.family:
        return method.family
    if method.kind == "bwcache":
        return "BWCache block-wise" if method.params.get("mode") == "blockwise" else "BWCache paper"
    if method.kind == "steps":
        return "Ablations"
    return peers.METHODS.get(method.kind) or peers.cachedit.METHODS[method.kind]


def _finite_mean(values):
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def _probe_flops(pipe, work) -> int:
    """The DiT blocks' FLOPs (linear layers and attention) executed during `work()`."""
    probe = ComputeProbe(pipe.transformer)
    try:
        with probe:
            work()
    finally:
        probe.remove()
    return probe.flops


def overheads_for_prompt(pipe, preset, settings, device, overheads, repeats=OVERHEAD_REPEATS):
    """The cache's overheads on one prompt.

    * block share: the DiT blocks' own forward over an uncached generation's time;
    * the cache's own work (its hooks, timed inside one run as the time in the hooked transformer and blocks minus
      their own forward) over generation time, at threshold 0 (distances every step: the indicator's cost) and with
      the default config;
    * achieved ÷ ideal speedup of the default config, wall-clock: `repeats` times an uncached and a cached run follow
      each other, and each kind's time is the sum over denoising steps of that step's fastest repeat (plus the
      fastest remainder outside the steps): interference from the machine only ever adds time.
    """
    steps = settings["num_inference_steps"]
    timer = block_timer(pipe.transformer, device)
    try:
        _, seconds = generate(pipe, preset, settings, device)
    finally:
        timer.remove()
    share = timer.seconds / seconds
    overheads["block_share"].append(share)

    config = resolve_config(preset, steps)
    # The indicator the preset measures, on every block at every step.
    observe = BWCacheConfig(threshold=0.0, num_inference_steps=steps, indicator_token_stride=config.indicator_token_stride)
    def run():
        return generate(pipe, preset, settings, device)[1]

    indicator, cache_work, other = cache_work_shares(
        pipe.transformer, run, (observe, config, other_storage(config)), device
    )
    overheads["indicator"].append(indicator)
    overheads["cache_work"].append(cache_work)
    overheads["cache_work_other_storage"].append(other)

    plain, cached = [], []
    for _ in range(repeats):
        plain.append(_step_seconds(pipe, preset, settings, device))
        with _applied(pipe, config) as handle:
            cached.append(_step_seconds(pipe, preset, settings, device))
    reuse = handle.trace.reuse_fraction
    if reuse > 0:
        speedup = _fastest(plain) / _fastest(cached)
        overheads["ideal_ratio"].append(speedup * (1.0 - reuse * share))


def cache_work_shares(transformer, run, configs, device) -> list[float]:
    """For each config: BWCache's own time during `run()` (its hooks, outside the transformer's and blocks' own
    forward) over the seconds `run()` returns, less what the two timers cost when nothing sits between them."""
    timers_alone = _hook_share(transformer, run, None, device)
    return [_hook_share(transformer, run, config, device) - timers_alone for config in configs]


def _hook_share(transformer, run, config: BWCacheConfig | None, device) -> float:
    modules = [transformer] + [spec.module for spec in find_blocks(transformer)]
    inner = ForwardTimer(modules, device)
    try:
        with _applied(transformer, config):
            outer = ForwardTimer(modules, device, around_call=True)
            try:
                seconds = run()
            finally:
                outer.remove()
    finally:
        inner.remove()
    return (outer.seconds - inner.seconds) / seconds


@contextmanager
def _applied(target, config: BWCacheConfig | None):
    """BWCache with `config` on a pipeline or transformer for the block (nothing when `config` is None); yields the handle."""
    if config is None:
        yield None
        return
    with cached(target, config) as handle:
        yield handle


def _step_seconds(pipe, preset, settings, device) -> tuple[float, list[float]]:
    """One generation: its total seconds and the seconds of denoising steps 1…T−1 (end of one step to the next)."""
    marks = []

    def mark(step: int) -> None:
        _synchronize(device)
        marks.append(time.perf_counter())

    _, total = generate(pipe, preset, settings, device, mark)
    return total, list(np.diff(marks))


def _fastest(runs: list[tuple[float, list[float]]]) -> float:
    """Per-step minimum over repeats, summed, plus the minimum of the time outside those steps."""
    per_step = np.min([steps for _, steps in runs], axis=0)
    rest = min(total - sum(steps) for total, steps in runs)
    return float(per_step.sum() + rest)


def other_storage(config: BWCacheConfig) -> BWCacheConfig:
    """`config` with the other storage choice: bfloat16 where it keeps the model's dtype, else the model's dtype."""
    return dataclasses.replace(config, cache_dtype="bfloat16" if config.cache_dtype is None else None)


def _storage_text(config: BWCacheConfig) -> str:
    return f"cached tensors in {config.cache_dtype}" if config.cache_dtype else "cached tensors in the model's dtype"


MEMORY_KEYS = ("default", "default_other_storage", "full_trace", "paper", "paper_other_storage")


def memory_configs(config: BWCacheConfig) -> dict[str, tuple[str, BWCacheConfig]]:
    """The configs whose extra peak memory is reported, by key: (description, config)."""
    # Paper mode forced to trigger at step 1: its features until the trigger, then one residual per branch.
    paper = BWCacheConfig(mode="paper", threshold=1e9, num_inference_steps=config.num_inference_steps,
                          indicator_token_stride=config.indicator_token_stride, cache_dtype=config.cache_dtype)
    return {
        "default": (f"the preset default config ({_storage_text(config)})", config),
        "default_other_storage": (f"the preset default, {_storage_text(other_storage(config))}", other_storage(config)),
        "full_trace": ("the preset default at threshold 0 (every distance measured, nothing reused)",
                       dataclasses.replace(config, threshold=0.0)),
        "paper": (f"paper mode triggered at step 1, the preset's token stride, {_storage_text(paper)}", paper),
        "paper_other_storage": (f"paper mode as above, {_storage_text(other_storage(paper))}", other_storage(paper)),
    }


def memory_overhead(pipe, preset, settings, device) -> dict:
    """Peak tensor memory of one generation, uncached and with each of `memory_configs`."""
    weights = pipeline_weight_bytes(pipe)

    def peak(cache_config: BWCacheConfig | None) -> int:
        with _applied(pipe, cache_config):
            return peak_tensor_bytes(lambda: generate(pipe, preset, settings, device), device)

    plain = peak(None)
    extra = {}
    for key, (label, config) in memory_configs(resolve_config(preset, settings["num_inference_steps"])).items():
        cached = peak(config)
        extra[key] = {"label": label, "bytes": cached - plain, "over_total": (cached - plain) / (plain + weights)}
    return {"weights_bytes": weights, "peak_activation_bytes_uncached": plain, "extra_peak": extra}


def markdown_table(rows) -> str:
    lines = [
        "| method | speedup (median) | range | PSNR dB (mean) | SSIM (mean) | block compute skipped |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["speedup"] is None:
            lines.append(f"| {row['label']} | n/a | | | | {row.get('skipped_reason') or ''} |")
            continue
        psnr = "∞" if row["psnr"] is None else f"{row['psnr']:.2f}"
        lines.append(
            f"| {row['label']} | {row['speedup']:.2f}× | {row['speedup_min']:.2f}–{row['speedup_max']:.2f} | {psnr} | "
            f"{row['ssim']:.4f} | {row['skipped']:.1%} |"
        )
    return "\n".join(lines)


def pareto(rows):
    """Rows not beaten on both speedup and PSNR by another row."""
    points = [r for r in rows if r["speedup"] is not None and r["psnr"] is not None]
    return [
        r for r in points
        if not any(o["speedup"] >= r["speedup"] and o["psnr"] >= r["psnr"] and (o["speedup"], o["psnr"]) != (r["speedup"], r["psnr"]) for o in points)
    ]


def pareto_svg(rows, width=720, height=440) -> str:
    """A dependency-free speedup-vs-PSNR scatter with each family's Pareto frontier."""
    points = [r for r in rows if r["speedup"] is not None and r["psnr"] is not None]
    if not points:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    colours = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#ff7f0e", "#17becf"]
    families = list(dict.fromkeys(r["family"] for r in points))
    left, right, top, bottom = 60, 190, 20, 50
    xs = [r["speedup"] for r in points]
    ys = [r["psnr"] for r in points]
    x0, x1 = min(1.0, min(xs)) * 0.95, max(xs) * 1.05
    y0, y1 = min(ys) - 1, max(ys) + 1

    def sx(v):
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def sy(v):
        return height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
           f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">speedup over uncached (×)</text>',
           f'<text x="14" y="{(top + height - bottom) / 2}" transform="rotate(-90 14 {(top + height - bottom) / 2})" text-anchor="middle">PSNR vs uncached (dB)</text>']
    for tick in np.linspace(x0, x1, 6):
        out.append(f'<text x="{sx(tick):.1f}" y="{height - bottom + 15}" text-anchor="middle">{tick:.2f}</text>')
    for tick in np.linspace(y0, y1, 6):
        out.append(f'<text x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:.1f}</text>')
    for k, family in enumerate(families):
        colour = colours[k % len(colours)]
        members = [r for r in points if r["family"] == family]
        front = sorted(pareto(members), key=lambda r: r["speedup"])
        if len(front) > 1:
            path = " ".join(f"{sx(r['speedup']):.1f},{sy(r['psnr']):.1f}" for r in front)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-dasharray="4 3"/>')
        for r in members:
            out.append(f'<circle cx="{sx(r["speedup"]):.1f}" cy="{sy(r["psnr"]):.1f}" r="4" fill="{colour}"><title>{r["label"]}: {r["speedup"]:.2f}×, {r["psnr"]:.2f} dB</title></circle>')
        out.append(f'<circle cx="{width - right + 15}" cy="{top + 10 + 16 * k}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{width - right + 24}" y="{top + 14 + 16 * k}">{family}</text>')
    out.append("</svg>")
    return "\n".join(out)


def report_markdown(results: dict, svg_path: str) -> str:
    o = results["overheads"]
    front = {r["key"] for r in pareto(results["rows"])}
    table = markdown_table(results["rows"])
    frontier = ", ".join(r["label"] for r in results["rows"] if r["key"] in front)
    s = results["settings"]
    return f"""## {results['model']} on {results['device']}

Command: `{results.get('command') or 'python -m bwcache bench'}`

Machine: {results['machine']}. Settings: {s['num_frames']} frames at {s['width']}×{s['height']}, {s['num_inference_steps']} steps,
guidance {s['guidance_scale']}; {len(results['prompts'])} prompts × {results['repeats']} timed repeats; uncached generation
{results['uncached_seconds_median']:.2f} s (median). Total benchmark time {results['seconds_total'] / 60:.1f} min.

{table}

On the speed–PSNR Pareto frontier: {frontier}.

![speedup vs PSNR]({svg_path})

Overheads (BWCache, this machine, on the first {o.get('prompts', OVERHEAD_PROMPTS)} prompts). The cache's own work is timed inside one run: the
time in the hooked transformer and blocks minus their own forward, less what the timers cost alone.
- indicator cost, distances on every block at every step (threshold 0, the preset's token stride): {o['indicator_share_of_step']:.1%} of generation time;
- the cache's own work with the preset default config: {o['cache_work_share_default']:.1%} of the cached generation's time, so
  achieved ÷ ideal speedup by accounting (1 − that share): {1 - o['cache_work_share_default']:.3f}; with cached tensors
  in {o['other_storage'] or "the model's dtype"} instead: {o['cache_work_share_other_storage']:.1%};
- DiT blocks' own forward: {o['block_share_of_time']:.1%} of an uncached generation's time;
- achieved ÷ ideal speedup, wall-clock (the per-step fastest of {o.get('repeats', OVERHEAD_REPEATS)} alternating uncached and cached runs): {_ratio(o)};
- extra peak tensor memory over the uncached run (its weights + activations, {format_bytes(o['weights_bytes'])} + {format_bytes(o['peak_activation_bytes_uncached'])}):
{_memory_lines(o)}
"""


def _ratio(o: dict) -> str:
    if o["achieved_over_ideal"] is None:
        return "n/a"
    low, high = o["achieved_over_ideal_range"]
    return f"{o['achieved_over_ideal']:.3f} (median over prompts; {low:.3f}–{high:.3f})"


def _memory_lines(o: dict) -> str:
    return "\n".join(
        f"  - {m['over_total']:+.2%} ({format_bytes(m['bytes'])}) with {m['label']};" for m in o["extra_peak"].values()
    )
