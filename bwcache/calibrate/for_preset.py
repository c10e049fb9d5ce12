"""A calibration on a preset's own pipeline and prompts: what `python -m bwcache calibrate` runs."""

from __future__ import annotations

from ..pipelines import default_device, get_pipeline, prepare_call
from ..presets import Preset
from ..runner import SETTING_KEYS, check_prompt, resolve_config, resolve_preset, resolve_settings
from .core import DEFAULT_BUDGET, Calibration, calibrate, check_targets

# How many of a preset's calibration prompts a calibration uses by default: about one per 4 cached generations of
# its budget, so that the search can run a few candidates on all of them.
GENERATIONS_PER_PROMPT = 4


def calibration_prompts(preset: Preset, budget: int = DEFAULT_BUDGET) -> list[str]:
    """A preset's own calibration prompts: the embedded model's are the benchmark's tuning prompts (the held-out
    ones stay unseen for the benchmark), as many as the budget runs a few candidates on; another preset's, its
    default prompt."""
    if preset.kind == "tiny":
        from ..bench.methods import TINY_PROMPTS

        return list(TINY_PROMPTS[: max(1, min(len(TINY_PROMPTS), budget // GENERATIONS_PER_PROMPT))])
    return [preset.defaults["prompt"]]


def calibrate_preset(preset: str | Preset = "tiny-shapes", prompts: list[str] | None = None, *,
                     target_psnr: float | None = None, target_speedup: float | None = None,
                     budget: int = DEFAULT_BUDGET, seed: int | None = None, profile: str | None = None,
                     device: str | None = None, pipe=None, progress=None, cancel=None, **overrides) -> Calibration:
    """`calibrate` on a preset's pipeline (loaded once, as the runner loads it) with its generation settings
    (`overrides`: `num_inference_steps=`, `height=`, `image=` (a first frame), … as in `run_comparison`) and its
    calibration prompts (`calibration_prompts`) unless `prompts` are given. Candidates keep the storage and token
    stride of the preset's `profile`. Prompts, settings, targets and budget are checked before any model work."""
    check_targets(target_psnr, target_speedup, budget)
    preset = resolve_preset(preset)
    prompts = list(prompts) if prompts is not None else calibration_prompts(preset, budget)
    if not prompts:
        raise ValueError("No calibration prompts: give at least one.")
    generation = {key: overrides.pop(key) for key in (*SETTING_KEYS, "image") if key in overrides}
    if overrides:
        raise ValueError(f"Unknown setting(s) {sorted(overrides)}; generation settings are "
                         f"{', '.join(SETTING_KEYS)}, image.")
    generation.pop("prompt", None)
    settings = [resolve_settings(preset, prompt=p, seed=seed, **generation) for p in prompts]
    first = settings[0]
    base = resolve_config(preset, first["num_inference_steps"], profile=profile, request=first)
    device = device or default_device()
    pipe = pipe if pipe is not None else get_pipeline(preset, device)
    for s in settings:
        check_prompt(pipe, preset, s)
    kwargs = prepare_call(pipe, preset, first)
    kwargs.pop("prompt", None)
    negative = kwargs.pop("negative_prompt", None)
    calls = [{"prompt": s["prompt"], **({"negative_prompt": negative} if negative is not None else {})} for s in settings]
    result = calibrate(pipe, calls, target_psnr=target_psnr, target_speedup=target_speedup, budget=budget,
                       seed=first["seed"], base=base, device=device, progress=progress, cancel=cancel,
                       setting={"preset": preset.name}, **kwargs)
    result.prompts = [s["prompt"] for s in settings][: len(result.prompts)]
    return result
