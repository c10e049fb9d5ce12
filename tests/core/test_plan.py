"""The memory plan: its cache figures equal what runs hold, every preset fits its GPU or is refused by name, and
the lean storage (int8 residuals) keeps what it promises."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

import bwcache
from bwcache import BWCacheConfig
from bwcache.pipelines import call_kwargs, get_pipeline
from bwcache.plan import (
    check_fits,
    largest_settings,
    plan_memory,
    preset_shape,
    recommended_gpu_memory_gb,
)
from bwcache.policies import distance_map_config
from bwcache.presets import list_presets, load_preset
from bwcache.runner import resolve_config, resolve_settings
from bwcache.storage import Int8Tensor
from testing_utils.checkout import ROOT

GB = 1e9


def test_int8_residuals_are_within_a_step_of_each_tokens_largest_value():
    x = torch.randn(2, 50, 64) * torch.linspace(0.01, 10, 50).view(1, 50, 1)
    kept = Int8Tensor(x)
    assert kept.data.dtype == torch.int8 and kept.scale.shape == (2, 50, 1)
    error = (kept.value() - x).abs().amax(dim=-1)
    # Half a step of 1/127 of the token's largest magnitude, and bfloat16's rounding of the scale (2^-8).
    assert (error <= x.abs().amax(dim=-1) * (0.5 / 127 + 2**-8 * 1.01)).all()
    assert kept.value().dtype == x.dtype


@pytest.mark.parametrize("profile", ["default", "fast"])
@pytest.mark.parametrize("size", [(16, 32, 32), (8, 24, 40)])
def test_the_plan_is_what_an_embedded_run_holds(profile, size):
    preset = load_preset("tiny-shapes")
    pipe = get_pipeline(preset, "cpu")
    frames, height, width = size
    settings = resolve_settings(preset, num_frames=frames, height=height, width=width, num_inference_steps=12)
    config = dataclasses.replace(resolve_config(preset, 12, profile=profile), warmup_steps=3, tail_steps=1)
    plan = plan_memory(preset, config, settings)
    held = {}
    for name, run_config in (("cache", config), ("map", distance_map_config(config))):
        with bwcache.cached(pipe, run_config) as handle:
            pipe(**call_kwargs(preset, settings), generator=torch.Generator().manual_seed(0))
        held[name] = handle.trace.held_bytes_peak
    assert plan.cache_bytes_peak == pytest.approx(held["cache"], rel=0.02)
    assert plan.map_bytes_peak == pytest.approx(held["map"], rel=0.02)
    assert plan.map_bytes_peak < plan.cache_bytes_peak


@pytest.fixture(scope="module")
def wan_1_3b():
    """The full-config Wan2.1-1.3B transformer of the preset, random weights, in bfloat16 (its float32 modules so)."""
    preset = load_preset("wan2.1-t2v-1.3b")
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**json.loads(json.dumps(dict(preset.model["transformer"]),
                                                              default=list)))
    keep = set(model._keep_in_fp32_modules)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            dtype = torch.float32 if keep & set(name.split(".")) else torch.bfloat16
            parameter.data = (torch.randn(parameter.shape, generator=generator) * 0.02).to(dtype)
    return preset, model.eval()


def _denoise(model, steps: int, latents: tuple[int, ...]):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(latents, generator=generator).to(torch.bfloat16)
    text = torch.randn(1, 8, 4096, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([1000.0 * (1 - i / steps)])
            for branch in ("cond", "uncond"):
                with model.cache_context(branch, step_index=i, num_inference_steps=steps):
                    model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
            x = x * 0.9
    model._reset_stateful_cache()


@pytest.mark.parametrize("config", [
    BWCacheConfig(threshold=10.0, mode="blockwise", reuse_interval=2, warmup_steps=2, tail_steps=0,
                  extrapolation=0.5, indicator_token_stride=2),
    # Paper mode before a trigger (δ too small to fire): every indicator block's feature, and with extrapolation
    # the stack's last two residuals.
    BWCacheConfig(threshold=1e-12, indicator_blocks="every_other", indicator_token_stride=3, extrapolation=0.5),
    BWCacheConfig(threshold=10.0, mode="blockwise", reuse_interval=2, warmup_steps=2, tail_steps=0,
                  cache_dtype="int8"),
    BWCacheConfig(threshold=1e-12),
], ids=["blockwise", "paper-extrapolating", "blockwise-int8", "paper"])
def test_the_plan_is_what_a_full_size_wan_transformer_holds(wan_1_3b, config):
    preset, model = wan_1_3b
    steps = 5
    config = dataclasses.replace(config, num_inference_steps=steps)
    # One latent frame of 8 × 8: 16 tokens of 1,536 after (1, 2, 2) patches.
    settings = {"num_frames": 1, "height": 64, "width": 64, "guidance_scale": 5.0}
    plan = plan_memory(preset, config, settings)
    assert plan.tokens == 16
    for run_config, planned in ((config, plan.cache_bytes_peak), (distance_map_config(config), plan.map_bytes_peak)):
        with bwcache.cached(model, run_config) as handle:
            _denoise(model, steps, (1, 16, 1, 8, 8))
        assert planned == pytest.approx(handle.trace.held_bytes_peak, rel=0.02), run_config


def test_the_14b_at_720p_holds_its_cache_in_a_tenth_of_80_gb():
    preset = load_preset("wan2.1-t2v-14b")
    settings = {**dict(preset.defaults), "num_frames": 81, "height": 720, "width": 1280}
    plan = plan_memory(preset, resolve_config(preset, 50), settings, gpu_memory_gb=80)
    assert plan.tokens == 75_600
    assert plan.cache_bytes_peak <= 0.10 * 80 * GB and plan.fits


@pytest.mark.parametrize("preset", [p for p in list_presets() if p.kind != "tiny"], ids=lambda p: p.name)
def test_every_preset_fits_its_gpu_or_its_largest_size_is_refused_by_name(preset):
    shape, weights = preset_shape(preset)
    assert weights["transformer"]["parameters"] > 1e9
    # The recommendation is the plan's, not a guess.
    assert preset.recommended_gpu_memory_gb == recommended_gpu_memory_gb(preset)
    for profile in preset.profile_names:
        defaults = dict(preset.defaults)
        config = resolve_config(preset, defaults["num_inference_steps"], profile=profile)
        assert check_fits(preset, config, defaults).fits
        largest = largest_settings(preset)
        plan = plan_memory(preset, resolve_config(preset, largest["num_inference_steps"], profile=profile), largest)
        if plan.fits:
            continue
        with pytest.raises(ValueError, match=rf"{preset.name} at {largest['num_frames']} frames .* more than the "
                                             r"GPU's .* Use fewer frames or a smaller size"):
            check_fits(preset, resolve_config(preset, largest["num_inference_steps"], profile=profile), largest)


def test_the_command_line_prints_the_plan_as_json_and_refuses_before_loading():
    done = subprocess.run([sys.executable, "-m", "bwcache", "plan", "--preset", "wan2.1-t2v-14b", "--height", "720",
                           "--width", "1280", "--frames", "81", "--gpu-memory-gb", "80", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    for key in ("weights_bytes", "cache_bytes_peak", "map_bytes_peak", "total_bytes_peak", "gpu_memory_bytes", "fits"):
        assert key in plan
    assert plan["fits"] is True and plan["gpu_memory_bytes"] == 80 * GB
    assert math.isclose(plan["total_bytes_peak"], plan["weights_bytes"] + plan["activation_bytes"]
                        + max(plan["cache_bytes_peak"], plan["map_bytes_peak"]))
    # A run that cannot fit says so, with the numbers and what to change (exit status 1).
    done = subprocess.run([sys.executable, "-m", "bwcache", "plan", "--preset", "wan2.1-t2v-1.3b", "--frames", "81",
                           "--gpu-memory-gb", "12"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "does NOT fit" in done.stdout and "Use fewer frames" in done.stdout


def test_the_app_refuses_a_run_that_will_not_fit_before_loading_a_model(monkeypatch):
    import gradio as gr

    import app

    loaded = []
    monkeypatch.setattr(app, "_gpu_memory_gb", lambda: 12.0)
    monkeypatch.setattr(app, "_run_comparison", lambda *args, **kwargs: loaded.append(args))
    with pytest.raises(gr.Error, match=r"wan2.1-t2v-1.3b at 81 frames of 832×480 needs about .* more than the GPU's 12 GB"):
        app.compare("a cat", "wan2.1-t2v-1.3b", 0.15, 0, num_frames=81, height=480, width=832)
    assert not loaded
