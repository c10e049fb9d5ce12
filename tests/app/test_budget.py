"""The Space's GPU budget: the FLOP model behind a request's GPU seconds, the duration asked of ZeroGPU, and the
refusal of requests over ZeroGPU's per-call limit before any GPU is scheduled."""

import math

import gradio as gr
import pytest
import torch

import app
from bwcache import space, ui
from bwcache.presets import frames_rule_ok, load_preset
from bwcache.ui import budget

WAN = "wan2.1-t2v-1.3b"
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def settings_of(preset, **changes):
    return {**{k: preset.defaults[k] for k in ("height", "width", "num_frames", "num_inference_steps",
                                                "guidance_scale")}, **changes}


def test_the_step_flops_are_torchs_count_of_the_real_transformer():
    """Wan2.1-1.3B's real config on the meta device (no weights, no compute): one pass at 33 frames of 480x832."""
    from diffusers import WanTransformer3DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN_1_3B)
        latents = torch.randn(1, 16, 9, 60, 104)
        text = torch.randn(1, 512, 4096)
        timestep = torch.tensor([500.0])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text, return_dict=False)
    shape = budget.WAN_SHAPES["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]
    assert shape.tokens(33, 480, 832) == 9 * 30 * 52
    assert shape.pass_flops(33, 480, 832) == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_the_vae_decode_flops_per_pixel_are_torchs_count():
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # Wan2.1's VAE config
        latents = torch.randn(1, 16, 3, 30, 52)  # 9 frames of 240x416
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(latents)
    shape = budget.WAN_SHAPES["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]
    assert shape.decode_flops(9, 240, 416) == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_a_comparison_costs_its_runs_at_the_sustained_throughput():
    preset = load_preset(WAN)
    settings = settings_of(preset)  # 33 frames of 480x832, 30 steps, CFG
    shape = budget.WAN_SHAPES[preset.hub_id]
    step = 2 * shape.pass_flops(33, 480, 832) / budget.SUSTAINED_BF16_FLOPS
    assert budget.step_seconds(preset, settings) == pytest.approx(step)
    assert 1.0 < step < 1.3  # about 1.17 s per step
    run = 30 * step + shape.decode_flops(33, 480, 832) / budget.SUSTAINED_VAE_FLOPS + budget.GPU_RUN_OVERHEAD_SECONDS
    assert budget.estimate_seconds(preset, settings, 3) == pytest.approx(
        budget.GPU_CALL_OVERHEAD_SECONDS + budget.GPU_MARGIN * 3 * run)
    # One pass per step without guidance.
    assert budget.step_seconds(preset, {**settings, "guidance_scale": 1.0}) == pytest.approx(step / 2)
    # The attention grows with the square of the tokens: 81 frames (21 latent frames) cost more than 21/9 of 33's.
    assert budget.step_seconds(preset, settings_of(preset, num_frames=81)) > 21 / 9 * step


def test_the_duration_asked_is_the_estimate_over_zerogpus_hardware_factor():
    preset = load_preset(WAN)
    settings = settings_of(preset)
    estimate = budget.estimate_seconds(preset, settings, 3)
    assert ui.gpu_seconds(preset, settings, runs=3, factor=1.0) == math.ceil(estimate)
    assert ui.gpu_seconds(preset, settings, runs=3, factor=1.5) == math.ceil(estimate / 1.5)
    assert budget.duration_factor() == 1.0  # off ZeroGPU
    assert ui.gpu_seconds(preset, settings, runs=3) == math.ceil(estimate)


def test_on_zerogpu_the_factor_is_zerogpus_own(monkeypatch):
    import spaces.config
    import spaces.zero.config as zerogpu_config

    monkeypatch.setattr(spaces.config.Config, "zero_gpu", True)
    monkeypatch.setattr(zerogpu_config, "get_config", lambda: {"duration_factor": 1.5})
    assert budget.duration_factor() == 1.5
    preset = load_preset(WAN)
    settings = settings_of(preset)
    assert ui.gpu_seconds(preset, settings) == math.ceil(budget.estimate_seconds(preset, settings, 3) / 1.5)


def test_the_spaces_defaults_fit_a_zerogpu_call():
    """Every preset the Space serves has a FLOP model, and its default comparison fits the per-call limit, with the
    duration ZeroGPU schedules (asked × factor) within it on either hardware."""
    card = space.card()
    assert card["suggested_hardware"] == "zero-a10g"
    served = [p for p in space.served(ui.available_presets(), card).values() if ui.needs_gpu(p)]
    assert served
    for preset in served:
        assert preset.hub_id in budget.WAN_SHAPES
        settings = settings_of(preset)
        ui.check_gpu_budget(preset, settings, runs=ui.comparison_runs(None))
        for factor in (1.0, 1.5):
            scheduled = ui.gpu_seconds(preset, settings, runs=3, factor=factor) * factor
            assert scheduled <= ui.ZEROGPU_CALL_LIMIT_SECONDS + factor


def test_a_request_over_the_limit_is_refused_naming_it_and_what_fits():
    preset = load_preset(WAN)
    settings = settings_of(preset, num_frames=81, num_inference_steps=50)
    with pytest.raises(ValueError) as excinfo:
        ui.check_gpu_budget(preset, settings, runs=3)
    message = str(excinfo.value)
    assert "A comparison of 81 frames at 832×480 with 50 steps needs about" in message
    assert "more than the 300 s a ZeroGPU call may take" in message
    frames = int(message.split("up to ")[1].split(" frames")[0])
    steps = int(message.split("up to ")[2].split(" steps")[0])
    # What it offers fits, and is the most that does.
    assert frames_rule_ok(frames, preset.limits["num_frames"][2])
    assert budget.fits(preset, {**settings, "num_frames": frames}, 3)
    assert not budget.fits(preset, {**settings, "num_frames": frames + 4}, 3)
    assert budget.fits(preset, {**settings, "num_inference_steps": steps}, 3)
    assert not budget.fits(preset, {**settings, "num_inference_steps": steps + 1}, 3)


def test_a_sweep_over_the_limit_is_told_how_many_thresholds_fit():
    preset = load_preset(WAN)
    settings = settings_of(preset)
    with pytest.raises(ValueError, match=r"A sweep of 5 δ values .* \(7 generations\).* up to (\d) δ values") as info:
        ui.check_gpu_budget(preset, settings, runs=ui.sweep_runs([0.05, 0.1, 0.15, 0.2, 0.3]), sweep=True)
    most = int(info.value.args[0].rsplit("up to ", 1)[1].split(" δ")[0])
    assert budget.fits(preset, settings, 2 + most) and not budget.fits(preset, settings, 3 + most)


def test_the_cpu_preset_is_never_refused():
    preset = load_preset("tiny-shapes")
    ui.check_gpu_budget(preset, settings_of(preset, num_inference_steps=100), runs=10)


# ----------------------------------------------------------------------------- in the app


@pytest.fixture
def on_zero_gpu(monkeypatch, tmp_path):
    scheduled = []

    def run(*args, **kwargs):
        scheduled.append(args)
        raise gr.Error("scheduled", title="test")

    monkeypatch.setattr(app, "ON_ZERO_GPU", True)
    monkeypatch.setattr(app, "_run_comparison", run)
    monkeypatch.setattr(app, "_run_sweep", run)
    monkeypatch.setattr(app, "OUTPUT_ROOT", tmp_path)
    return scheduled


def test_on_zerogpu_a_long_comparison_is_refused_before_scheduling(on_zero_gpu):
    with pytest.raises(gr.Error) as excinfo:
        app.compare("a cat", WAN, 0.15, 0, num_frames=81, num_inference_steps=50)
    assert "81 frames at 832×480 with 50 steps" in str(excinfo.value) and "What fits" in str(excinfo.value)
    assert on_zero_gpu == []
    # The default settings fit and reach the GPU function.
    with pytest.raises(gr.Error, match="scheduled"):
        app.compare("a cat", WAN, 0.15, 0)
    assert len(on_zero_gpu) == 1


def test_on_zerogpu_a_long_sweep_is_refused_before_scheduling(on_zero_gpu):
    with pytest.raises(gr.Error, match="A sweep of 5 δ values"):
        app.sweep("a cat", WAN, "0.05, 0.1, 0.15, 0.2, 0.3", 0)
    assert on_zero_gpu == []
    with pytest.raises(gr.Error, match="scheduled"):
        app.sweep("a cat", WAN, "0.1, 0.2", 0)
    assert len(on_zero_gpu) == 1
