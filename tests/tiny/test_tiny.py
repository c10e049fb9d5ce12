"""Tests for the embedded Tiny Shapes model: data, vocabulary, pipeline contract with cache hooks, judge."""

from __future__ import annotations

import json
import os
import re
import socket
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from bwcache.tiny import LIMITS, TinyShapesPipeline, load_pipeline
from bwcache.tiny.data import COLOURS, DIRECTIONS, SHAPES, make_batch, make_clip
from bwcache.tiny.judge import judge
from bwcache.tiny.pipeline import ASSETS_DIR
from bwcache.tiny.text import DEFAULT_VOCAB, TinyTokenizer

FEW_STEPS = 4  # enough to exercise the loop; quality checks use the defaults


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


@pytest.fixture(scope="module")
def no_network():
    """Fail loudly if anything tries to open a network connection."""
    original = socket.socket.connect

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    socket.socket.connect = refuse
    try:
        yield
    finally:
        socket.socket.connect = original


@pytest.fixture(scope="module")
def pipe(no_network):
    p = load_pipeline(device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


# ------------------------------------------------------------------ data


def test_clips_are_deterministic_and_well_formed():
    a, b, c = make_clip(7), make_clip(7), make_clip(8)
    assert np.array_equal(a.frames, b.frames) and a.prompt == b.prompt
    assert not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (16, 32, 32, 3) and a.frames.dtype == np.float32
    assert a.frames.min() >= 0.0 and a.frames.max() <= 1.0
    # Anti-aliased edges: some pixels are partly covered.
    assert ((a.frames.max(-1) > 0.05) & (a.frames.max(-1) < 0.95)).any()
    pattern = re.compile(rf"^a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moving ({'|'.join(DIRECTIONS)})$")
    for seed in range(50):
        clip = make_clip(seed)
        assert pattern.match(clip.prompt), clip.prompt
        assert clip.prompt == f"a {clip.spec.colour} {clip.spec.shape} moving {clip.spec.direction}"


def test_clip_attributes_and_sizes():
    clip = make_clip(3, num_frames=8, height=24, width=40, shape="circle", colour="cyan", direction="up")
    assert clip.frames.shape == (8, 24, 40, 3)
    assert clip.prompt == "a cyan circle moving up"
    # Cyan: no red at all, green and blue equal.
    assert clip.frames[..., 0].max() == 0.0 and np.allclose(clip.frames[..., 1], clip.frames[..., 2])
    videos, prompts = make_batch(np.random.default_rng(0), 5)
    assert videos.shape == (5, 16, 32, 32, 3) and len(prompts) == 5


def test_paths_start_on_the_far_side_and_cross_the_middle():
    # The direction decides where the object is in every frame: that is what the model learns from the prompt.
    for seed in range(100):
        clip = make_clip(seed, num_frames=16, height=24, width=40)
        spec = clip.spec
        ux, uy = DIRECTIONS[spec.direction]
        extent = 40 if ux else 24
        position = spec.x0 if ux else spec.y0
        # Distance from the edge the object moves away from, at the first and the last frame.
        first = position if (ux or uy) > 0 else extent - position
        last = first + spec.speed * 15
        assert 0.1 * extent <= first < 0.5 * extent < last <= 0.9 * extent, (seed, spec)
        across = spec.y0 / 24 if ux else spec.x0 / 40
        assert 0.3 <= across <= 0.7, (seed, spec)


def test_position_channels_are_ramps_along_frames_rows_and_columns():
    from bwcache.tiny.pipeline import position_channels

    video = torch.zeros(2, 3, 4, 5, 6)
    pos = position_channels(video)
    assert pos.shape == (2, 3, 4, 5, 6)
    assert torch.equal(pos[0, 0, :, 0, 0], torch.linspace(-1, 1, 4))
    assert torch.equal(pos[1, 1, 0, :, 0], torch.linspace(-1, 1, 5))
    assert torch.equal(pos[0, 2, 3, 4, :], torch.linspace(-1, 1, 6))
    # Constant where they should be: frames channel along rows, columns channel along frames.
    assert torch.equal(pos[0, 0, 2], torch.full((5, 6), pos[0, 0, 2, 0, 0].item()))
    assert torch.equal(position_channels(torch.zeros(1, 3, 1, 2, 2))[0, 0], torch.zeros(1, 2, 2))


def test_judge_accepts_ground_truth_and_rejects_wrong_prompts():
    for seed in range(60):
        clip = make_clip(seed)
        assert judge(clip.frames, clip.prompt).ok, (seed, clip.prompt)
    clip = make_clip(0, colour="red", direction="right", shape="square")
    assert judge(clip.frames, "a red square moving right").ok
    wrong_colour = judge(clip.frames, "a blue square moving right")
    assert not wrong_colour.ok and wrong_colour.colour == "red" and wrong_colour.direction_ok
    for direction in ("left", "up", "down"):
        verdict = judge(clip.frames, f"a red square moving {direction}")
        assert not verdict.ok and not verdict.direction_ok and verdict.direction == "right"
    # A still object has no direction.
    still = np.repeat(clip.frames[:1], 16, axis=0)
    assert not judge(still, "a red square moving right").ok
    # An empty clip passes nothing.
    assert not judge(np.zeros_like(clip.frames), "a red square moving right").ok


# ------------------------------------------------------------------ vocabulary


def test_unknown_words_raise_with_vocabulary():
    tok = TinyTokenizer(DEFAULT_VOCAB, 16)
    assert tok.encode("A Red square, moving RIGHT!") == tok.encode("a red square moving right")
    with pytest.raises(ValueError) as info:
        tok.encode("a purple triangle moving right")
    message = str(info.value)
    assert "purple" in message and "triangle" in message
    for word in ("red", "circle", "left", "moving"):
        assert word in message
    with pytest.raises(ValueError, match="at most 16"):
        tok.encode(" ".join(["red"] * 17))


def test_empty_prompt_is_the_learned_null_sequence(pipe):
    enc = pipe.text_encoder
    with torch.no_grad():
        null = enc.encode("")
        cond = enc.encode("a red square moving right")
    assert torch.equal(null[0], enc.null_embedding)
    assert not torch.allclose(null, cond)
    with pytest.raises(ValueError, match="purple"):
        pipe("a purple square moving right", num_inference_steps=FEW_STEPS)


# ------------------------------------------------------------------ pipeline


def test_load_is_fast_and_offline(no_network):
    start = time.perf_counter()
    p = load_pipeline(device="cpu")
    elapsed = time.perf_counter() - start
    assert isinstance(p, TinyShapesPipeline)
    assert type(p.transformer).__name__ == "WanTransformer3DModel"
    assert p.transformer.config.num_layers >= 6  # enough blocks for a block × step heatmap
    assert elapsed < 4.0, f"loading took {elapsed:.2f}s"
    total = sum(f.stat().st_size for f in ASSETS_DIR.glob("*.safetensors"))
    assert total <= 20 * 1024 * 1024


def test_output_types(pipe):
    out = pipe(num_inference_steps=FEW_STEPS, generator=_gen(0))
    frames = out.frames
    assert isinstance(frames, np.ndarray) and frames.dtype == np.float32
    assert frames.shape == (1, 16, 32, 32, 3)
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    latents = pipe(num_inference_steps=FEW_STEPS, generator=_gen(0), output_type="latent").frames
    assert latents.shape == (1, pipe.transformer.config.out_channels, 16, 32, 32)

    pt = pipe(num_inference_steps=FEW_STEPS, generator=_gen(0), output_type="pt").frames
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 16, 32, 32, 3) and pt.dtype == torch.float32
    assert np.array_equal(pt.numpy(), frames)

    pil = pipe(num_inference_steps=FEW_STEPS, generator=_gen(0), output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 16 and pil[0][0].size == (32, 32) and pil[0][0].mode == "RGB"

    batch = pipe(
        prompt=["a red square moving right", "a blue circle moving up"],
        num_frames=8, height=24, width=40, num_inference_steps=FEW_STEPS, generator=_gen(0),
    ).frames
    assert batch.shape == (2, 8, 24, 40, 3)


def test_seeds(pipe):
    a = pipe(num_inference_steps=FEW_STEPS, generator=_gen(11)).frames
    b = pipe(num_inference_steps=FEW_STEPS, generator=_gen(11)).frames
    c = pipe(num_inference_steps=FEW_STEPS, generator=_gen(12)).frames
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"height": 30}, "height"),
        ({"width": 64}, "width"),
        ({"num_frames": 10}, "num_frames"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": 50.0}, "guidance_scale"),
        ({"output_type": "gif"}, "output_type"),
        ({"prompt": "a red square " * 30}, "prompt"),
    ],
)
def test_invalid_arguments(pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


def test_limits_are_data_and_match_the_preset(pipe):
    import json

    preset = json.loads((ASSETS_DIR.parents[1] / "presets" / "tiny-shapes.json").read_text())
    assert preset["limits"] == pipe.limits == LIMITS
    for key, value in preset["defaults"].items():
        assert pipe.defaults[key] == value
    assert preset["pipeline_class"] == "bwcache.tiny.TinyShapesPipeline"


class _ProbeState(BaseState):
    def __init__(self):
        self.calls = 0

    def reset(self):
        self.calls = 0


class _ProbeHook(ModelHook):
    """A stateful hook that records the cache context of every call, like a cache hook would read it."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.state_manager = StateManager(_ProbeState)
        self.seen: list[tuple] = []
        self.resets = 0

    def pre_forward(self, module, *args, **kwargs):
        ctx = self.state_manager.context
        self.state_manager.get_state().calls += 1
        self.seen.append((ctx.name, ctx.step_index, ctx.num_inference_steps, ctx.timestep, ctx.sigma))
        return args, kwargs

    def reset_state(self, module):
        self.resets += 1
        self.state_manager.reset()
        return module


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_cache_context_and_reset(pipe, guidance_scale):
    hook = _ProbeHook()
    block = pipe.transformer.blocks[0]
    root = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, "probe")
    # cache_context() reaches child hooks through a cached registry list; refresh it after adding one.
    root.invalidate_child_registries_cache()
    try:
        pipe(num_inference_steps=3, guidance_scale=guidance_scale, generator=_gen(0))
    finally:
        HookRegistry.check_if_exists_or_initialize(block).remove_hook("probe")
        root.invalidate_child_registries_cache()
    names = ["cond", "uncond"] if guidance_scale > 1 else ["cond"]
    assert [(n, i, k) for n, i, k, _, _ in hook.seen] == [(n, i, 3) for i in range(3) for n in names]
    sigmas = pipe.scheduler.sigmas
    for name, i, _, timestep, sigma in hook.seen:
        assert sigma == pytest.approx(float(sigmas[i]))
        assert timestep == pytest.approx(float(pipe.scheduler.timesteps[i]))
    # maybe_free_model_hooks() reset the stateful hook once, at the end of the generation.
    assert hook.resets == 1 and hook.state_manager._state_cache == {}


def test_callback_on_step_end(pipe):
    steps = []

    def callback(p, i, t, kwargs):
        steps.append(i)
        assert set(kwargs) == {"latents"}
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == FEW_STEPS - 1 else kwargs

    frames = pipe(num_inference_steps=FEW_STEPS, generator=_gen(0), callback_on_step_end=callback).frames
    assert steps == list(range(FEW_STEPS))
    assert np.allclose(frames, 0.5)  # latents zeroed on the last step decode to mid-grey


# ------------------------------------------------------------------ quality


FIXED_CASES = [
    ("a red square moving right", 0),
    ("a green circle moving up", 1),
    ("a blue square moving left", 2),
    ("a yellow circle moving down", 3),
]


@pytest.fixture(scope="module")
def fixed_clips(pipe):
    """Default-settings generations for the fixed cases, made once for the tests below."""
    return {(p, s): pipe(prompt=p, generator=_gen(s)).frames[0] for p, s in FIXED_CASES}


@pytest.mark.parametrize("prompt, seed", FIXED_CASES)
def test_generated_clips_show_the_prompted_colour_in_motion(fixed_clips, prompt, seed):
    frames = fixed_clips[(prompt, seed)]
    verdict = judge(frames, prompt)
    assert verdict.colour_ok, (verdict.colour, verdict.details)
    assert verdict.details["visible_fraction"] == 1.0
    travel = max(abs(verdict.details["dx"]), abs(verdict.details["dy"]))
    assert travel >= 0.1 * 32, verdict.details


@pytest.mark.parametrize("prompt, seed", FIXED_CASES)
def test_generated_clips_follow_the_prompt(fixed_clips, prompt, seed):
    frames = fixed_clips[(prompt, seed)]
    verdict = judge(frames, prompt)
    assert verdict.ok, (verdict.colour, verdict.direction, verdict.details)


def test_the_direction_comes_from_the_prompt_not_the_noise(pipe, fixed_clips):
    # Same seed (same initial noise), opposite direction: the clip must follow the words.
    prompt = "a red square moving left"
    verdict = judge(pipe(prompt=prompt, generator=_gen(0)).frames[0], prompt)
    assert verdict.ok, (verdict.direction, verdict.details)
    assert judge(fixed_clips[("a red square moving right", 0)], "a red square moving right").direction == "right"


# ------------------------------------------------------------------ image-to-video


def _example(seed: int = 7_000_000):
    from bwcache.tiny.data import make_example_image
    from bwcache.tiny.pipeline import load_config

    scene = load_config().get("data", {}).get("scene", "v1")
    return make_example_image(seed, scene)


def test_the_shipped_model_takes_a_first_frame(pipe):
    from bwcache.tiny.pipeline import input_layout

    assert input_layout(pipe.transformer.config) == (True, "replace")


def test_image_to_video_starts_from_the_image(pipe):
    image, prompt = _example()
    frames = pipe(prompt, image=image, num_inference_steps=FEW_STEPS, generator=_gen(0)).frames[0]
    # Frame 0 is never denoised: it is the image (to float rounding), the rest of the clip is generated.
    assert np.abs(frames[0] - image).max() < 1e-5
    assert not np.allclose(frames[1], frames[0], atol=0.05)
    without = pipe(prompt, num_inference_steps=FEW_STEPS, generator=_gen(0)).frames[0]
    mse = float(np.mean((without[0] - image) ** 2))
    assert 10 * np.log10(1 / mse) < 25  # the same prompt and seed without the image does not reproduce it
    # One image per prompt, or one for all; PIL images and uint8 arrays as well as floats.
    from PIL import Image

    uint8 = (image * 255).round().astype(np.uint8)
    batch = pipe([prompt, prompt], image=[Image.fromarray(uint8), uint8], num_inference_steps=2,
                 generator=_gen(1)).frames
    assert np.abs(batch[:, 0] - uint8 / 255.0).max() < 1e-5
    with pytest.raises(ValueError, match="images for 3 prompts"):
        pipe([prompt] * 3, image=[image, image], num_inference_steps=2)


def test_image_to_video_follows_the_prompt(pipe):
    # Default settings: the clip starts from the image and moves the way the prompt says.
    image, prompt = _example(7_000_001)
    frames = pipe(prompt, image=image, generator=_gen(2001)).frames[0]
    verdict = judge(frames, prompt)
    assert verdict.ok, (verdict.colour, verdict.direction, verdict.details)


def test_example_images_are_the_data_modules(tmp_path):
    from PIL import Image

    from bwcache.tiny.data import EXAMPLE_IMAGES, example_image_name, make_prompt, write_example_images
    from bwcache.tiny.pipeline import load_config

    shipped = ASSETS_DIR.parent / "first-frames"
    config = load_config()
    written = write_example_images(tmp_path, config["data"]["scene"])
    assert [prompt for _, prompt in written] == [make_prompt(c, s, d) for _, c, s, d in EXAMPLE_IMAGES]
    for path, prompt in written:
        assert path.name == example_image_name(prompt)
        ours, theirs = np.asarray(Image.open(path)), np.asarray(Image.open(shipped / path.name))
        assert ours.shape == (32, 32, 3) and np.array_equal(ours, theirs), path.name
        # The named object is in the image (its colour is there).
        assert judge(np.repeat(ours[None] / 255.0, 2, axis=0), prompt).colour_ok


def test_the_vocabulary_is_still_accepted(pipe):
    # Every prompt the first model took is still a valid prompt, in any case and with punctuation.
    enc = pipe.text_encoder
    for colour in ("red", "green", "blue", "yellow", "magenta", "cyan", "white"):
        for shape in ("square", "circle"):
            for direction in ("left", "right", "up", "down"):
                prompt = f"a {colour} {shape} moving {direction}"
                ids = enc.tokenizer.encode(prompt)
                assert ids == enc.tokenizer.encode(prompt.upper() + ".")
    pipe("A RED circle, moving up!", num_inference_steps=1)


# ------------------------------------------------------------------ training


def test_training_script_writes_a_loadable_model(tmp_path, no_network):
    from bwcache.tiny.train import main as train

    out = tmp_path / "tiny"
    # The shipped model's architecture: recipe v2 (8 blocks) with a replaced first frame.
    train(["--recipe", "v2", "--image-conditioning", "replace", "--steps", "2", "--out", str(out), "--threads", "1",
           "--log-every", "1", "--batch-size", "2", "--default-size-fraction", "1"])
    for name in ("config.json", "transformer.safetensors", "text_encoder.safetensors", "training.json", "README.md"):
        assert (out / name).is_file(), name
    log = json.loads((out / "training.json").read_text())["log"]
    assert [e["step"] for e in log] == [1, 2] and all(np.isfinite(e["loss"]) for e in log)
    pipe = load_pipeline(device="cpu", path=out)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(num_frames=8, height=24, width=24, num_inference_steps=2, generator=_gen(0)).frames
    assert frames.shape == (1, 8, 24, 24, 3) and np.isfinite(frames).all()
    shipped = load_pipeline(device="cpu")
    assert dict(pipe.transformer.config) == dict(shipped.transformer.config)


def test_fine_tuning_records_the_stages_before(tmp_path, no_network):
    # A model trained from another one's weights (--init-from) keeps the commands of the stages behind it, and a
    # concat-conditioned model's weights fit a replace-conditioned one (the conditioning video's channels go).
    from bwcache.tiny.train import main as train

    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--recipe", "v2", "--layers", "2", "--steps", "1", "--threads", "1", "--batch-size", "2",
              "--default-size-fraction", "1", "--scene", "v1"]
    train([*common, "--out", str(first), "--image-conditioning", "concat"])
    train([*common, "--out", str(second), "--image-conditioning", "replace", "--init-from", str(first)])
    recipe = json.loads((second / "training.json").read_text())["recipe"]
    assert [st["init"] for st in recipe["stages"]] == [str(first)]
    assert "--image-conditioning concat" in recipe["stages"][0]["command"]
    assert "--init-from" in recipe["command"]
    from safetensors.torch import load_file

    a = load_file(str(first / "transformer.safetensors"))["patch_embedding.weight"]
    b = load_file(str(second / "transformer.safetensors"))["patch_embedding.weight"]
    assert a.shape[1] == 10 and b.shape[1] == 7
    assert "Trained in stages" in (second / "README.md").read_text()


def test_training_never_replaces_a_model_unasked(tmp_path, capsys):
    from bwcache.tiny.train import main as train

    out = tmp_path / "model"
    out.mkdir()
    (out / "transformer.safetensors").write_bytes(b"weights")
    with pytest.raises(SystemExit):
        train(["--out", str(out), "--steps", "1"])
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert (out / "transformer.safetensors").read_bytes() == b"weights"
