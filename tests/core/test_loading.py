"""Presets load real checkpoints as their model cards and diffusers' docs say: the loading arguments each shipped
preset produces, the schema's checks of its `loading` section, and tiny random Wan pipelines saved with
`save_pretrained` and loaded back through $BWCACHE_MODEL_DIR as the real ones would be."""

import json

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

from bwcache import pipelines
from bwcache.pipelines import build_pipeline, call_kwargs, loading_plan
from bwcache.presets import PRESETS_DIR, Preset, load_preset, preset_names
from bwcache.runner import run_comparison
from testing_utils.tiny_wan import TEXT_DIM, build_wan_pipeline, small_preset, tiny_text_encoder

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# What each shipped preset loads with: the dtype of named components (the rest take "default"), the scheduler's
# shift at 480x832 and at 720x1280 (None: the checkpoint's own), VAE tiling, offload, extra call arguments.
EXPECTED = {
    "cogvideox-2b": dict(dtypes={"default": F16}, shift=(None, None), tiling=True, offload=None, extra={}),
    "cogvideox-5b": dict(dtypes={"default": BF16}, shift=(None, None), tiling=True, offload=None, extra={}),
    "hunyuanvideo": dict(dtypes={"default": F16, "transformer": BF16, "vae": F16, "text_encoder": F16,
                                 "text_encoder_2": F16}, shift=(None, None), tiling=True, offload=None, extra={}),
    "latte-1": dict(dtypes={"default": F16}, shift=(None, None), tiling=False, offload=None, extra={}),
    "ltx-video": dict(dtypes={"default": BF16}, shift=(None, None), tiling=False, offload=None, extra={}),
    "wan2.1-t2v-1.3b": dict(dtypes={"default": BF16, "transformer": BF16, "text_encoder": BF16, "vae": F32},
                            shift=(3.0, 5.0), tiling=False, offload=None, extra={}),
    "wan2.1-t2v-14b": dict(dtypes={"default": BF16, "transformer": BF16, "text_encoder": BF16, "vae": F32},
                           shift=(3.0, 5.0), tiling=False, offload=None, extra={}),
    "wan2.2-t2v-a14b": dict(dtypes={"default": BF16, "transformer": BF16, "transformer_2": BF16, "vae": F32},
                            shift=(12.0, 12.0), tiling=False, offload="model", extra={"guidance_scale_2": 3.0}),
    "wan2.2-ti2v-5b": dict(dtypes={"default": BF16, "transformer": BF16, "vae": F32}, shift=(5.0, 5.0),
                           tiling=False, offload=None, extra={}),
    # Image-to-video: the CLIP image encoder in float32 too, as WanImageToVideoPipeline's example loads it.
    "wan2.1-i2v-14b-480p": dict(dtypes={"default": BF16, "transformer": BF16, "text_encoder": BF16, "vae": F32,
                                        "image_encoder": F32}, shift=(3.0, 5.0), tiling=False, offload=None, extra={}),
    "wan2.1-i2v-14b-720p": dict(dtypes={"default": BF16, "transformer": BF16, "text_encoder": BF16, "vae": F32,
                                        "image_encoder": F32}, shift=(3.0, 5.0), tiling=False, offload=None, extra={}),
    "wan2.2-i2v-a14b": dict(dtypes={"default": BF16, "transformer": BF16, "transformer_2": BF16, "vae": F32},
                            shift=(5.0, 5.0), tiling=False, offload="model", extra={"guidance_scale_2": 3.5}),
    "cogvideox-5b-i2v": dict(dtypes={"default": BF16}, shift=(None, None), tiling=True, offload=None, extra={}),
}


def test_every_shipped_model_preset_has_its_loading_spelled_out():
    assert set(EXPECTED) == set(preset_names()) - {"tiny-shapes"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_loads_with_its_documented_arguments(name):
    preset, want = load_preset(name), EXPECTED[name]
    plan = loading_plan(preset, "cuda")
    assert plan.source == preset.hub_id and plan.pipeline_class == preset.pipeline_class
    # One dtype argument, handed to from_pretrained (which keeps each model's float32 modules) and nothing else.
    assert set(plan.from_pretrained) == {"dtype"}
    for component, dtype in want["dtypes"].items():
        assert plan.dtype_of(component) == dtype, component
    assert plan.flow_shift is None or preset.flow_shift(480, 832) is not None
    assert (preset.flow_shift(480, 832), preset.flow_shift(720, 1280)) == want["shift"]
    assert plan.vae_tiling is want["tiling"] and plan.cpu_offload == want["offload"]
    steps = plan.steps()
    assert ("pipe.vae.enable_tiling()" in steps) is want["tiling"]
    assert steps[-1] == ("pipe.enable_model_cpu_offload(device='cuda')" if want["offload"] else "pipe.to('cuda')")
    settings = {key: preset.defaults[key] for key in ("prompt", "negative_prompt", "height", "width", "num_frames",
                                                      "num_inference_steps", "guidance_scale", "fps")}
    kwargs = call_kwargs(preset, settings)
    assert {k: kwargs[k] for k in want["extra"]} == want["extra"]
    assert not set(kwargs) & ({"guidance_scale_2"} - set(want["extra"]))


def test_the_shift_follows_the_size_class_nearest_the_pixel_count():
    preset = load_preset("wan2.1-t2v-1.3b")
    assert preset.flow_shift(480, 832) == preset.flow_shift(832, 480) == preset.flow_shift(256, 256) == 3.0
    assert preset.flow_shift(576, 1024) == 3.0  # 589,824 px: nearer 480x832's 399,360 than 720x1280's 921,600 by ratio
    assert preset.flow_shift(640, 1024) == preset.flow_shift(832, 832) == preset.flow_shift(720, 1280) == 5.0


def test_the_tiny_preset_is_left_as_it_was():
    preset = load_preset("tiny-shapes")
    assert dict(preset.loading) == {} and preset.dtype == "float32" and "loading" not in json.loads(
        (PRESETS_DIR / "tiny-shapes.json").read_text())


def test_a_request_may_change_guidance_scale_2_where_the_preset_has_two_experts():
    a14b, small = load_preset("wan2.2-t2v-a14b"), load_preset("wan2.1-t2v-1.3b")
    settings = {"prompt": "a cat", "height": 480, "width": 832, "num_frames": 33, "num_inference_steps": 40,
                "guidance_scale": 4.0}
    assert call_kwargs(a14b, settings)["guidance_scale_2"] == 3.0
    assert call_kwargs(a14b, {**settings, "guidance_scale_2": 2.0})["guidance_scale_2"] == 2.0
    assert a14b.validate_request(guidance_scale_2=2.0) == {"guidance_scale_2": 2.0}
    with pytest.raises(ValueError, match="Guidance scale 2 = 11.0 is outside the allowed range 1.0 to 10.0"):
        a14b.validate_request(guidance_scale_2=11.0)
    with pytest.raises(ValueError, match="one guidance scale"):
        small.validate_request(guidance_scale_2=3.0)


# ----------------------------------------------------------------------------- the schema


def with_loading(loading, name="wan2.2-t2v-a14b"):
    data = load_preset(name).to_dict()
    data["loading"] = loading
    return Preset.from_dict(data, source="test.json")


@pytest.mark.parametrize("loading, pattern", [
    ([], "'loading' must be an object"),
    ({"offload": "model"}, r"unknown loading key\(s\) \['offload'\]"),
    ({"component_dtypes": {"vae": "fp32"}}, "loading.component_dtypes.vae must be one of float32, float16, bfloat16"),
    ({"component_dtypes": {"default": "float32"}}, "'default' is not a component name"),
    ({"flow_shift": {"1080p": 7.0}}, r"loading.flow_shift.1080p: unknown size class; use one of 480p, 720p"),
    ({"flow_shift": {"480p": 0}}, r"loading.flow_shift.480p must be a number > 0"),
    ({"flow_shift": {}}, "must name at least one size class"),
    ({"flow_shift": "3"}, "loading.flow_shift must be a number > 0"),
    ({"vae_tiling": "yes"}, "loading.vae_tiling must be true or false"),
    ({"cpu_offload": "sequential"}, r"loading.cpu_offload must be null or one of \['model'\]"),
    ({"call_defaults": {"fps": 16}}, r"unknown loading.call_defaults key\(s\) \['fps'\]"),
    ({"call_defaults": {"guidance_scale_2": 30.0}}, r"guidance_scale_2 must be a number from 1.0 to 10.0"),
])
def test_the_loading_section_is_checked_and_errors_name_the_key(loading, pattern):
    with pytest.raises(ValueError, match=pattern) as excinfo:
        with_loading(loading)
    assert str(excinfo.value).startswith("test.json: ")


def test_the_preset_dtype_is_checked_too():
    data = load_preset("latte-1").to_dict()
    data["dtype"] = "half"
    with pytest.raises(ValueError, match="dtype 'half' must be one of float32, float16, bfloat16"):
        Preset.from_dict(data, source="test.json")


def test_a_shift_on_a_scheduler_without_one_fails_at_load():
    pipe = build_wan_pipeline()
    pipe.scheduler.register_to_config(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="takes no fixed flow shift"):
        pipelines.set_flow_shift(pipe, 3.0)


# ----------------------------------------------------------------------------- real loading, tiny weights


def tiny_transformer(seed: int) -> WanTransformer3DModel:
    # rope_max_seq_len 96: room for 720x1280 (45 x 80 patches).
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=96,
    ).eval()


def save_tiny_wan(root, name, experts=1):
    """A random-weight WanPipeline laid out as the hub's (UniPC with flow sigmas and flow_shift 3.0, as the
    Wan-AI Diffusers repositories ship it; float32 weights), saved as `$BWCACHE_MODEL_DIR/<name>`."""
    tokenizer, encoder = tiny_text_encoder()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    extra = {"transformer_2": tiny_transformer(1), "boundary_ratio": 0.875} if experts == 2 else {}
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=tiny_transformer(0),
                       vae=build_wan_pipeline().vae, scheduler=scheduler, **extra)
    pipe.save_pretrained(root / name)


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BWCACHE_MODEL_DIR", str(tmp_path))
    return tmp_path


def test_a_wan_checkpoint_loads_with_its_vae_in_float32_and_the_shift_for_each_size(model_dir):
    save_tiny_wan(model_dir, "wan2.1-t2v-1.3b")
    preset = load_preset("wan2.1-t2v-1.3b")
    plan = loading_plan(preset, "cpu")
    assert plan.source == str(model_dir / "wan2.1-t2v-1.3b")
    pipe = build_pipeline(plan, preset)
    assert isinstance(pipe, WanPipeline)
    assert pipe.vae.dtype == F32 and pipe.text_encoder.dtype == BF16
    # The transformer in bfloat16 except the modules diffusers keeps in float32: loaded, not cast.
    keep = WanTransformer3DModel._keep_in_fp32_modules
    assert keep and pipe.transformer.scale_shift_table.dtype == F32
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == BF16
    assert pipe.transformer.blocks[0].scale_shift_table.dtype == F32
    for name, parameter in pipe.transformer.named_parameters():
        assert parameter.dtype == (F32 if set(name.split(".")) & set(keep) else BF16), name
    # The shift is the 480P one right after loading, and follows each call's size.
    assert pipe.scheduler.config.flow_shift == 3.0
    pipe.set_progress_bar_config(disable=True)
    request = {"prompt": "a cat", "height": 720, "width": 1280, "num_frames": 1, "num_inference_steps": 2}
    pipe(**pipelines.prepare_call(pipe, preset, request), output_type="latent", max_sequence_length=8)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and pipe.scheduler.config.flow_shift == 5.0
    reference = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=5.0)
    reference.set_timesteps(2)
    assert torch.equal(pipe.scheduler.sigmas, reference.sigmas)
    request = {"prompt": "a cat on the grass", "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
    frames = pipe(**pipelines.prepare_call(pipe, preset, request), output_type="np", max_sequence_length=8).frames
    assert pipe.scheduler.config.flow_shift == 3.0 and frames.shape == (1, 5, 32, 32, 3)


def test_loading_everything_in_one_dtype_would_cast_the_vae(model_dir):
    """What the plan's per-component dtype prevents: the preset's dtype alone puts the VAE in bfloat16."""
    save_tiny_wan(model_dir, "wan2.1-t2v-1.3b")
    pipe = WanPipeline.from_pretrained(str(model_dir / "wan2.1-t2v-1.3b"), dtype=BF16)
    assert pipe.vae.dtype == BF16


def test_a_two_expert_checkpoint_loads_offloaded_and_gets_its_second_guidance(model_dir):
    save_tiny_wan(model_dir, "wan2.2-t2v-a14b", experts=2)
    preset = load_preset("wan2.2-t2v-a14b")
    pipe = build_pipeline(loading_plan(preset, "cpu"), preset)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.dtype == F32 and pipe.transformer_2.dtype == BF16
    assert pipe.scheduler.config.flow_shift == 12.0
    # enable_model_cpu_offload, not .to(device): accelerate's hooks move each model in when it runs.
    assert getattr(pipe, "_offload_device", None) is not None
    assert all(hasattr(getattr(pipe, name), "_hf_hook") for name in ("transformer", "transformer_2", "vae"))
    settings = {"prompt": "a cat", "negative_prompt": "", "height": 32, "width": 32, "num_frames": 5,
                "num_inference_steps": 4, "guidance_scale": 4.0}
    kwargs = call_kwargs(preset, settings)
    assert kwargs["guidance_scale_2"] == 3.0
    pipe(**kwargs, output_type="np", max_sequence_length=8)
    assert pipe._guidance_scale_2 == 3.0
    # BWCache runs on the offloaded experts as on resident ones.
    comparison = run_comparison(small_preset("wan2.2-t2v-a14b"), prompt="a cat", pipe=pipe, device="cpu",
                                num_inference_steps=8, threshold=0.5)
    assert comparison.record["warmup_identical"] and comparison.record["reuse_fraction"] > 0
