"""BWCache on diffusers' stock image-to-video pipelines (tiny random-weight builds): exact at δ = 0, reusing
otherwise, the step count read from the pipeline, CFG branches and experts apart (also where a pipeline runs
guidance's two calls without cache contexts), no leak from aborted calls, per-token timesteps read as the denoised
tokens'; and the image-to-video presets."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

import bwcache
from bwcache import BWCacheConfig, apply_bwcache
from bwcache.pipelines import call_kwargs, loading_plan, pipeline_for
from bwcache.plan import preset_shape, recommended_gpu_memory_gb
from bwcache.presets import Preset, list_presets, load_preset
from bwcache.runner import run_comparison
from testing_utils.tiny_pipelines import I2V_PIPELINES, PIPELINES, conditioning_image, generate_i2v
from testing_utils.tiny_wan import build_wan22_ti2v_pipeline, tiny_text_encoder

# Short runs keep the tests fast; the library's few-step notes (bwcache.guardrails) are tested where they are made.
pytestmark = pytest.mark.filterwarnings("ignore:.*few-step run:UserWarning", "ignore:with \\d+ steps:UserWarning")

NAMES = sorted(I2V_PIPELINES)
# Reuse every other step from step 2 on, in every branch.
REUSE = BWCacheConfig(threshold=1e9, reuse_interval=1)
# The branches each pipeline's calls run in: its cache contexts, or the order of its calls in a step where it names
# none (HunyuanVideo I2V and Framepack with true CFG).
BRANCHES = {
    "wan_i2v": {"cond", "uncond"},
    "wan22_i2v": {"cond", "uncond"},
    "wan22_ti2v_i2v": {"cond", "uncond"},
    "cogvideox_i2v": {"cond_uncond"},
    "ltx_i2v": {"cond_uncond"},
    "hunyuan_i2v": {"default", "default_2"},
    "framepack": {"default", "default_2"},
}
# One expert: a plain schedule. Wan2.2 I2V A14B's experts each run their own (see below).
ONE_EXPERT = [name for name in NAMES if name != "wan22_i2v"]


class Abort(Exception):
    pass


def abort_at(step):
    def callback(pipe, i, t, kwargs):
        if i == step:
            raise Abort
        return kwargs

    return callback


def pattern(branch):
    return "".join("r" if all(row) else "C" for row in branch["reused"])


@pytest.fixture(scope="module")
def pipes():
    return {name: I2V_PIPELINES[name]() for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_threshold_zero_is_exact_and_a_cached_run_reuses_in_each_branch(pipes, name):
    pipe = pipes[name]
    uncached = generate_i2v(name, pipe, num_inference_steps=6)
    with bwcache.cached(pipe, BWCacheConfig(threshold=0.0)) as handle:
        assert torch.equal(generate_i2v(name, pipe, num_inference_steps=6), uncached)
    assert set(handle.trace.to_dict()["branches"]) == BRANCHES[name]
    with bwcache.cached(pipe, REUSE) as handle:
        cached = generate_i2v(name, pipe, num_inference_steps=10)
    assert handle.trace.reuse_fraction > 0
    assert set(handle.trace.to_dict()["branches"]) == BRANCHES[name]
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, generate_i2v(name, pipe, num_inference_steps=10))


@pytest.mark.parametrize("name", ONE_EXPERT)
def test_the_step_count_comes_from_the_pipeline_and_follows_each_call(pipes, name):
    pipe = pipes[name]
    with bwcache.cached(pipe, REUSE) as handle:
        for steps, expected in ((6, "CCrCrC"), (4, "CCrC")):
            generate_i2v(name, pipe, num_inference_steps=steps)
            for branch in handle.trace.to_dict()["branches"].values():
                assert pattern(branch) == expected
                assert branch["trigger_step"] == 1


@pytest.mark.parametrize("name", NAMES)
def test_the_call_after_an_aborted_one_is_a_fresh_generation(pipes, name):
    pipe = pipes[name]
    uncached = generate_i2v(name, pipe, num_inference_steps=6, seed=1)
    with bwcache.cached(pipe, REUSE) as handle:
        fresh = generate_i2v(name, pipe, num_inference_steps=6, seed=1)
        fresh_trace = handle.trace.to_dict()
    with bwcache.cached(pipe, REUSE) as handle:
        # Stopped at step 3 of 6 (a reused step follows), then at step 0.
        for step in (3, 0):
            with pytest.raises(Abort):
                generate_i2v(name, pipe, num_inference_steps=6, callback_on_step_end=abort_at(step))
        assert torch.equal(generate_i2v(name, pipe, num_inference_steps=6, seed=1), fresh)
        assert handle.trace.to_dict() == fresh_trace
    with bwcache.cached(pipe, BWCacheConfig(threshold=0.0)) as handle:
        with pytest.raises(Abort):
            generate_i2v(name, pipe, num_inference_steps=6, callback_on_step_end=abort_at(3))
        assert torch.equal(generate_i2v(name, pipe, num_inference_steps=6, seed=1), uncached)
        assert all(len(branch["reused"]) == 6 for branch in handle.trace.to_dict()["branches"].values())


def test_wan22_i2v_experts_each_run_their_own_schedule(pipes):
    pipe = pipes["wan22_i2v"]
    held = {}

    def look(pipe, i, t, kwargs):
        held.update({hook.expert: bool(hook.states) for hook in handle.hooks} if i == 9 else {})
        return kwargs

    with bwcache.cached(pipe, REUSE) as handle:
        generate_i2v("wan22_i2v", pipe, num_inference_steps=10, callback_on_step_end=look)
    # UniPC (shift 5) puts steps 0–3 at timesteps >= 900 (boundary_ratio 0.9): the high-noise expert's.
    assert pipe.scheduler.timesteps[3] >= 900 > pipe.scheduler.timesteps[4]
    for branch in handle.trace.to_dict()["branches"].values():
        assert branch["experts"] == ["transformer"] * 4 + ["transformer_2"] * 6
        assert pattern(branch) == "CCrC" + "CCrCrC"
        assert branch["triggers"] == {"transformer": 1, "transformer_2": 5}
    assert held == {"transformer": False, "transformer_2": True}


@pytest.mark.parametrize("name", ["hunyuan_i2v", "framepack"])
def test_guidance_calls_without_cache_contexts_keep_their_own_residuals(pipes, name):
    """HunyuanVideo I2V and Framepack run true CFG as two transformer calls per step and name no cache context: the
    second call of each step is a branch of its own, and a reused step of either adds that branch's residual."""
    pipe = pipes[name]
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    calls = []  # per transformer call: [first block's input, last block's output]
    handles = [
        blocks[0].register_forward_pre_hook(lambda module, args: calls.append([args[0], None])),
        blocks[-1].register_forward_hook(lambda module, args, output: calls[-1].__setitem__(1, output[0])),
    ]
    try:
        with bwcache.cached(pipe, REUSE):
            generate_i2v(name, pipe, num_inference_steps=6)
    finally:
        for h in handles:
            h.remove()
    calls = calls[-12:]  # the last section's 6 steps (Framepack denoises one loop per section)
    residual = [output - start for start, output in calls]  # step s: calls 2s (prompt) and 2s + 1 (negative)
    for call in (0, 1):
        # Step 2 is reused: each call adds its own branch's residual of step 1, not the other branch's.
        torch.testing.assert_close(residual[4 + call], residual[2 + call], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(residual[4 + call], residual[3 - call], rtol=1e-2, atol=1e-3)


def test_framepack_caches_every_section_as_a_generation_of_its_own(pipes):
    pipe = pipes["framepack"]
    attentions = [block.attn for block in (*pipe.transformer.transformer_blocks,
                                           *pipe.transformer.single_transformer_blocks)]
    ran = []
    handles = [attn.register_forward_pre_hook(lambda module, args: ran.append(1)) for attn in attentions]
    try:
        generate_i2v("framepack", pipe, num_inference_steps=6)
        uncached, ran[:] = len(ran), []
        with bwcache.cached(pipe, REUSE) as handle:
            generate_i2v("framepack", pipe, num_inference_steps=6)
    finally:
        for h in handles:
            h.remove()
    sections, calls_per_step = 2, 2
    assert uncached == sections * 6 * calls_per_step * len(attentions)
    # Each section: steps 0, 1, 3, 5 computed, 2 and 4 reused.
    assert len(ran) == sections * 4 * calls_per_step * len(attentions)
    # The trace is the last section's.
    assert all(pattern(branch) == "CCrCrC" for branch in handle.trace.to_dict()["branches"].values())


@pytest.mark.parametrize("name", ["wan22_ti2v_i2v", "ltx_i2v"])
def test_a_per_token_timestep_is_read_as_the_denoised_tokens(pipes, name):
    """Wan2.2 TI2V and LTX I2V give the conditioning frame's tokens timestep 0. The trace's timesteps are the
    scheduler's, and a cache on the transformer alone (which reads the timestep tensor) extrapolates residuals over
    the same timesteps as one applied to the pipeline (which reads the scheduler's list)."""
    pipe = pipes[name]
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    extrapolating = BWCacheConfig(threshold=1e9, reuse_interval=1, extrapolation=1.0)
    try:
        with bwcache.cached(pipe, extrapolating) as handle:
            on_pipeline = generate_i2v(name, pipe, num_inference_steps=6)
    finally:
        hook.remove()
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert all(t.min() == 0 and t.amax() > 0 for t in seen)  # conditioning tokens at 0
    for branch in handle.trace.to_dict()["branches"].values():
        assert branch["timesteps"] == timesteps
    alone = apply_bwcache(pipe.transformer, BWCacheConfig(threshold=1e9, reuse_interval=1, extrapolation=1.0,
                                                          num_inference_steps=6))
    try:
        assert torch.equal(generate_i2v(name, pipe, num_inference_steps=6), on_pipeline)
        for branch in alone.trace.to_dict()["branches"].values():
            assert branch["timesteps"] == timesteps
    finally:
        alone.remove()
    with bwcache.cached(pipe, REUSE):
        assert not torch.equal(generate_i2v(name, pipe, num_inference_steps=6), on_pipeline)


def test_the_modulated_indicator_knows_hunyuanvideo_i2v_token_replace_blocks(pipes):
    pipe = pipes["hunyuan_i2v"]
    uncached = generate_i2v("hunyuan_i2v", pipe)
    with bwcache.cached(pipe, BWCacheConfig(threshold=0.0, indicator_feature="modulated")) as handle:
        assert torch.equal(generate_i2v("hunyuan_i2v", pipe), uncached)
    branch = handle.trace.to_dict()["branches"]["default"]
    assert all(value is not None for value in branch["indicator"][1:])


# ----------------------------------------------------------------------------- presets

# Checkpoints made for image-to-video: their pipeline needs an image.
I2V_PRESETS = {
    "wan2.1-i2v-14b-480p": "WanImageToVideoPipeline",
    "wan2.1-i2v-14b-720p": "WanImageToVideoPipeline",
    "wan2.2-i2v-a14b": "WanImageToVideoPipeline",
    "cogvideox-5b-i2v": "CogVideoXImageToVideoPipeline",
}
# Checkpoints that make a video from text, or from text and a first frame (one preset per checkpoint): without an
# image their pipeline_class runs, with one the image pipeline on the same components.
OPTIONAL_IMAGE_PRESETS = {
    "wan2.2-ti2v-5b": ("WanPipeline", "WanImageToVideoPipeline"),
    "ltx-video": ("LTXPipeline", "LTXImageToVideoPipeline"),
}


def test_the_image_to_video_presets_say_they_take_an_image_and_the_others_none():
    for preset in list_presets():
        expected = ("required" if preset.name in I2V_PRESETS
                    else "optional" if preset.name in OPTIONAL_IMAGE_PRESETS or preset.kind == "tiny" else None)
        assert preset.image == expected, preset.name
        assert (preset.name in I2V_PRESETS) == (preset.pipeline_class in I2V_PRESETS.values())
        # The embedded pipeline takes the image itself; the real checkpoints' image pipeline is a second class.
        image_class = preset.loading.get("image_pipeline_class")
        assert (image_class is None) == (preset.name not in OPTIONAL_IMAGE_PRESETS), preset.name
    for name, classes in OPTIONAL_IMAGE_PRESETS.items():
        preset = load_preset(name)
        assert (preset.pipeline_class, preset.loading["image_pipeline_class"]) == classes
        assert loading_plan(preset, "cpu").image_pipeline_class == classes[1]


def test_an_image_pipeline_class_is_only_for_an_optional_image_and_must_name_a_pipeline():
    data = load_preset("wan2.2-ti2v-5b").to_dict()
    with pytest.raises(ValueError, match=r"test.json: loading.image_pipeline_class must name a diffusers pipeline "
                                         r"class \(such as 'WanImageToVideoPipeline'\), got 'wan'"):
        Preset.from_dict({**data, "loading": {**data["loading"], "image_pipeline_class": "wan"}}, source="test.json")
    for image in ("required", None):
        with pytest.raises(ValueError, match=rf"loading.image_pipeline_class is for presets whose image is "
                                             rf"\"optional\".*this preset's image is {image!r}"):
            Preset.from_dict({**data, "image": image}, source="test.json")


@pytest.mark.parametrize("name, build", [("wan2.2-ti2v-5b", "ti2v"), ("ltx-video", "ltx_video")])
def test_an_optional_image_runs_the_checkpoints_image_pipeline_on_the_same_components(name, build):
    preset = load_preset(name)
    pipe = build_wan22_ti2v_pipeline(num_layers=1) if build == "ti2v" else PIPELINES[build]()
    assert pipeline_for(pipe, preset, {"image": None}) is pipe
    assert pipeline_for(pipe, load_preset("wan2.1-t2v-1.3b"), {"image": conditioning_image(32)}) is pipe
    image_pipe = pipeline_for(pipe, preset, {"image": conditioning_image(32)})
    assert type(image_pipe).__name__ == preset.loading["image_pipeline_class"]
    for component in ("transformer", "vae", "scheduler"):
        assert getattr(image_pipe, component) is getattr(pipe, component)
    if build == "ti2v":
        assert image_pipe.config.expand_timesteps  # the conditioning frame's tokens at timestep 0
    assert pipeline_for(image_pipe, preset, {"image": conditioning_image(32)}) is image_pipe


def test_a_comparison_with_a_first_frame_runs_ti2v_through_its_image_pipeline():
    """python -m bwcache compare --preset wan2.2-ti2v-5b --image PATH, on a tiny checkpoint: the image reaches the
    pipeline, both videos are compared with it, and the cached run reuses."""
    data = load_preset("wan2.2-ti2v-5b").to_dict()
    data["defaults"].update(height=64, width=64, num_frames=5, num_inference_steps=6, negative_prompt="")
    data["limits"].update(height=[32, 64, 32], width=[32, 64, 32], num_frames=[5, 9, "4k+1"],
                          num_inference_steps=[2, 12])
    preset = Preset.from_dict(data, source="small wan2.2-ti2v-5b")
    base = build_wan22_ti2v_pipeline(num_layers=1)
    tokenizer, encoder = tiny_text_encoder()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, transformer=base.transformer, vae=base.vae,
                       scheduler=base.scheduler, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    image = conditioning_image(64)
    with_image = run_comparison(preset, prompt="a cat", pipe=pipe, device="cpu", image=image, threshold=10.0,
                                reuse_interval=1)
    record = with_image.record
    assert record["image"]["size"] == [64, 64]
    assert set(record["image"]["first_frame_psnr"]) == {"uncached", "bwcache"}
    assert record["reuse_fraction"] > 0 and record["warmup_identical"]
    text_only = run_comparison(preset, prompt="a cat", pipe=pipe, device="cpu", threshold=0.0)
    assert text_only.record["image"] is None
    assert not np.array_equal(text_only.baseline_frames, with_image.baseline_frames)
    assert np.array_equal(text_only.baseline_frames, text_only.bwcache_frames)


def test_an_image_field_other_than_required_optional_or_null_is_refused():
    data = load_preset("cogvideox-5b-i2v").to_dict()
    assert Preset.from_dict({**data, "image": "optional"}).image == "optional"
    assert Preset.from_dict({key: value for key, value in data.items() if key != "image"}).image is None
    with pytest.raises(ValueError, match=r"test.json: image must be null or one of \['required', 'optional'\], "
                                         r"got 'yes'"):
        Preset.from_dict({**data, "image": "yes"}, source="test.json")
    json.dumps(load_preset("wan2.2-i2v-a14b").to_dict())


def test_a_request_with_an_image_passes_it_to_the_pipeline():
    image = conditioning_image(32)
    settings = {"prompt": "a cat", "height": 512, "width": 704, "num_frames": 161, "num_inference_steps": 50,
                "guidance_scale": 3.0, "fps": 25}
    ltx = load_preset("ltx-video")
    assert call_kwargs(ltx, {**settings, "image": image})["image"] is image
    assert call_kwargs(ltx, settings)["frame_rate"] == 25 and "image" not in call_kwargs(ltx, settings)
    assert call_kwargs(load_preset("wan2.2-i2v-a14b"), {**settings, "image": image})["guidance_scale_2"] == 3.5


def test_the_presets_describe_what_the_image_adds_to_the_model():
    # Wan2.1 I2V: 16 noise + 4 mask + 16 image-latent channels in; CLIP ViT-H/14's 257 tokens (16 × 16 patches of a
    # 224-pixel image, and its class token) join the 512 text tokens; its ~632M-parameter encoder loads in float32.
    for name in ("wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"):
        preset = load_preset(name)
        shape, weights = preset_shape(preset)
        assert preset.model["transformer"]["in_channels"] == 16 + 4 + 16
        assert shape.text_tokens == 512 + (224 // 14) ** 2 + 1
        assert weights["image_encoder"] == {"parameters": 632_000_000, "dtype": "float32", "bytes": 2_528_000_000}
        assert 16e9 < weights["transformer"]["parameters"] < 17e9  # the image tokens' key/value projections
    assert load_preset("wan2.2-i2v-a14b").model["transformer"]["in_channels"] == 36
    assert "image_dim" not in load_preset("wan2.2-i2v-a14b").model["transformer"]  # no image encoder
    # CogVideoX-5B-I2V: the image latent on channels (TI2V and LTX put it in the first latent frame: no new shape).
    assert load_preset("cogvideox-5b-i2v").model["transformer"]["in_channels"] == 2 * 16


@pytest.mark.parametrize("name", [*I2V_PRESETS, *OPTIONAL_IMAGE_PRESETS])
def test_the_memory_plan_of_an_image_preset_needs_no_image_and_fits_its_recommended_gpu(name, capsys):
    from bwcache.cli import main

    assert main(["plan", "--preset", name, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] is True
    assert load_preset(name).recommended_gpu_memory_gb == recommended_gpu_memory_gb(load_preset(name))
