"""The stock diffusers pipelines of the BWCache families, built from tiny random-weight components.

``PIPELINES[name]()`` builds the real pipeline class (``WanPipeline``, ``CogVideoXPipeline``, ...) around the tiny
transformer of :mod:`families` (same class, same config, same weights), a tiny instance of the pipeline's real VAE class
and the scheduler the released checkpoint ships with. There is no tokenizer or text encoder (``None``):
:func:`generate` passes precomputed random prompt embeddings (and the masks / pooled embeddings each pipeline needs),
so generation goes through the pipeline's own ``__call__`` -- its denoising loop, its ``cache_context`` calls, its
callbacks and its final ``maybe_free_model_hooks()`` -- without any text model.

:func:`generate` asks for ``output_type="latent"`` (all eight pipelines support it: the VAE decode is skipped, the
``maybe_free_model_hooks()`` call at the end of ``__call__`` still runs) and returns the pipeline's ``frames`` as a float
tensor: the final latents, in the pipeline's own layout (see the table). Guidance is > 1 everywhere, so classifier-free
guidance runs (cond + uncond). Generation depends only on ``seed`` (a ``torch.Generator().manual_seed(seed)`` passed to
the pipeline: initial latents, and the ancestral noise of Allegro's sampler); the prompt embeddings are fixed. Builders
and :func:`generate` leave the caller's global RNG state untouched.

Per family (diffusers 0.42.1; "calls/step" is transformer forward calls per denoising step with the default
arguments of :func:`generate`; "cond_uncond" calls run one batch of 2 = [uncond, cond]):

=============  ====================  =================================================  =========  =====================
family         pipeline class        transformer.cache_context(...) around each call    per step   scheduler (checkpoint)
=============  ====================  =================================================  =========  =====================
wan            WanPipeline           "cond", then "uncond"; kwargs step_index=i,         2          UniPCMultistepScheduler
                                     sigma=float(scheduler.sigmas[i]),                              (flow_prediction,
                                     num_inference_steps=len(timesteps)                             use_flow_sigmas,
                                                                                                    flow_shift=3.0)
skyreels_v2    SkyReelsV2Pipeline    "cond", then "uncond"; no kwargs                    2          UniPCMultistepScheduler
                                                                                                    (flow_prediction,
                                                                                                    use_flow_sigmas,
                                                                                                    flow_shift=8.0)
cogvideox      CogVideoXPipeline     "cond_uncond" (one batched call); no kwargs         1 (B=2)    CogVideoXDDIMScheduler
                                                                                                    (CogVideoX-2b:
                                                                                                    v_prediction, zero-SNR,
                                                                                                    trailing, snr_shift 3)
hunyuan_video  HunyuanVideoPipeline  "cond", then "uncond" (only with true CFG:          2          FlowMatchEuler
                                     true_cfg_scale > 1 and negative embeds; else                   DiscreteScheduler
                                     "cond" only, 1 call/step); no kwargs                           (shift=7.0)
ltx_video      LTXPipeline           "cond_uncond" (one batched call); no kwargs         1 (B=2)    FlowMatchEuler
                                                                                                    DiscreteScheduler
                                                                                                    (LTX 0.9.0/0.9.1:
                                                                                                    dynamic shifting,
                                                                                                    shift_terminal=0.1)
mochi          MochiPipeline         "cond_uncond" (one batched call); no kwargs         1 (B=2)    FlowMatchEuler
                                                                                                    DiscreteScheduler
                                                                                                    (invert_sigmas=True)
allegro        AllegroPipeline       none (plain call, no cache context)                 1 (B=2)    EulerAncestral
                                                                                                    DiscreteScheduler()
latte          LattePipeline         none (plain call, no cache context)                 1 (B=2)    DDIMScheduler (linear
                                                                                                    betas 1e-4..0.02,
                                                                                                    clip_sample=False)
=============  ====================  =================================================  =========  =====================

The same facts, machine-readable, are in :data:`PIPELINE_FACTS`.

Notes:

* HunyuanVideo is guidance-distilled: ``guidance_scale`` (6.0 here, the pipeline default) only feeds the transformer's
  guidance embedding. Its true CFG (a second, "uncond" call) runs only with ``true_cfg_scale > 1`` *and* negative
  prompt embeddings; :func:`generate` passes both (``true_cfg_scale=3.0``), so 2 calls per step. Pass
  ``true_cfg_scale=1.0`` for the stock single-call path.
* Wan's ``cache_context`` kwargs: ``num_inference_steps`` is ``len(timesteps)`` (equal to the requested number of
  steps for the UniPC scheduler); ``sigma`` is the scheduler's sigma at step ``i`` (flow sigma in [0, 1]).
* Latent shapes of :func:`generate`'s output (batch 1): wan / skyreels_v2 / hunyuan_video / mochi / allegro / latte
  ``(1, C, F, H, W)``; cogvideox ``(1, F, C, H, W)``; ltx_video packed tokens ``(1, F*H*W, C)``. Latte's transformer
  predicts a learned sigma (8 channels); the pipeline keeps the first 4 because the DDIM scheduler has no
  ``variance_type``, so the latents have 4 channels.
* Geometry: the same latent grid as :mod:`families` (2 latent frames of 8x8 with 4 channels; LTX 2 frames of 4x4 with
  8 channels), i.e. pixel sizes ``64x64`` (``128x128`` for LTX, whose VAE compresses 32x) and 5 / 5 / 5 / 9 / 7 / 8
  frames for Wan-like / CogVideoX / HunyuanVideo / LTX / Mochi / Allegro (Latte: ``video_length=2``).
* With CFG off (``guidance_scale=1.0``; for HunyuanVideo ``true_cfg_scale=1.0``) every pipeline makes 1 call per
  step with batch 1; the batched pipelines still name that call's context "cond_uncond", the others "cond".
* Allegro and Latte never call ``cache_context``: a stateful diffusers hook sees no context there (BWCache records
  them under its "default" branch).
* The tiny VAEs are the pipelines' real VAE classes, sized so that the compression ratios match the real models (8x
  spatial and 4x temporal; LTX 32x / 8x; Mochi 8x / 6x) and their latent channels match the transformer, so
  ``output_type="pt"`` / ``"np"`` decodes too (0.1-1 s). Allegro's VAE only decodes tiled: its builder calls
  ``vae.enable_tiling()``, as diffusers' own Allegro docs do.
* ``pipe.enable_model_cpu_offload(device="cpu")`` works for all eight (needs ``accelerate``; the execution device
  becomes ``cpu:0``); the outputs are then bit-identical to the un-offloaded ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    AllegroPipeline,
    AutoencoderKL,
    AutoencoderKLAllegro,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoFramepackPipeline,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LattePipeline,
    LTXImageToVideoPipeline,
    LTXPipeline,
    MochiPipeline,
    SkyReelsV2Pipeline,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)

from testing_utils.families import _WAN_CONFIG, BUILD_SEED, FAMILIES, LATENT_CHANNELS, TEXT_DIM, TEXT_LEN, TEXT_PAD

__all__ = [
    "I2V_PIPELINES", "PIPELINES", "PIPELINE_FACTS", "PipelineFacts", "conditioning_image", "generate", "generate_i2v",
]

VAE_SEED = 1
"""Seed of every tiny VAE build (the transformers use :data:`families.BUILD_SEED`)."""

EMBED_SEED = 1234
"""Seed of the fixed random prompt embeddings passed by :func:`generate`."""


@dataclass(frozen=True)
class PipelineFacts:
    """How a stock pipeline calls its transformer in each denoising step (with :func:`generate`'s defaults)."""

    pipeline_class: type
    # Names passed to `transformer.cache_context(name, ...)`, in call order within a step; () = no cache context.
    contexts: tuple[str, ...]
    # Keyword arguments of `cache_context` besides the name (names only; values change per step).
    context_kwargs: tuple[str, ...]
    calls_per_step: int
    # Batch size of each transformer call (2 = uncond and cond batched together).
    call_batch: int
    scheduler_class: type


PIPELINE_FACTS: dict[str, PipelineFacts] = {
    "wan": PipelineFacts(
        WanPipeline, ("cond", "uncond"), ("step_index", "sigma", "num_inference_steps"), 2, 1, UniPCMultistepScheduler
    ),
    "skyreels_v2": PipelineFacts(SkyReelsV2Pipeline, ("cond", "uncond"), (), 2, 1, UniPCMultistepScheduler),
    "cogvideox": PipelineFacts(CogVideoXPipeline, ("cond_uncond",), (), 1, 2, CogVideoXDDIMScheduler),
    "hunyuan_video": PipelineFacts(
        HunyuanVideoPipeline, ("cond", "uncond"), (), 2, 1, FlowMatchEulerDiscreteScheduler
    ),
    "ltx_video": PipelineFacts(LTXPipeline, ("cond_uncond",), (), 1, 2, FlowMatchEulerDiscreteScheduler),
    "mochi": PipelineFacts(MochiPipeline, ("cond_uncond",), (), 1, 2, FlowMatchEulerDiscreteScheduler),
    "allegro": PipelineFacts(AllegroPipeline, (), (), 1, 2, EulerAncestralDiscreteScheduler),
    "latte": PipelineFacts(LattePipeline, (), (), 1, 2, DDIMScheduler),
}


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _vae(cls, **config) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(VAE_SEED)
        vae = cls(**config)
    return vae.eval()  # built in float32


def _pipeline(cls, vae: torch.nn.Module, family: str, scheduler, **components) -> DiffusionPipeline:
    transformer = FAMILIES[family].build()  # seeded inside, eval mode, float32
    pipe = cls(vae=vae, transformer=transformer, scheduler=scheduler, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embeds(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(1, TEXT_LEN, TEXT_DIM, generator=gen, dtype=torch.float32)


def _mask() -> torch.Tensor:
    mask = torch.ones(1, TEXT_LEN, dtype=torch.long)
    mask[:, TEXT_LEN - TEXT_PAD :] = 0
    return mask


def _text(masked: bool = False, pooled_dim: int | None = None) -> dict:
    """Fixed random positive and negative prompt embeddings (plus masks / pooled embeddings)."""
    gen = torch.Generator().manual_seed(EMBED_SEED)
    out = {"prompt_embeds": _embeds(gen), "negative_prompt_embeds": _embeds(gen)}
    if masked:
        out["prompt_attention_mask"] = _mask()
        out["negative_prompt_attention_mask"] = _mask()
    if pooled_dim is not None:
        out["pooled_prompt_embeds"] = torch.randn(1, pooled_dim, generator=gen)
        out["negative_pooled_prompt_embeds"] = torch.randn(1, pooled_dim, generator=gen)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# builders


def _wan_vae() -> torch.nn.Module:
    # 8x spatial, 4x temporal (2 temporal downsamples), like Wan 2.1's VAE; z_dim = the transformer's channels.
    return _vae(
        AutoencoderKLWan,
        base_dim=3,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )


def _build_wan() -> WanPipeline:
    # Wan-AI/Wan2.1-T2V-*-Diffusers (scripts/convert_wan_to_diffusers.py): UniPC, flow prediction, flow_shift 3.0.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    return _pipeline(WanPipeline, _wan_vae(), "wan", scheduler, tokenizer=None, text_encoder=None)


def _build_skyreels_v2() -> SkyReelsV2Pipeline:
    # UniPC with flow sigmas (scripts/convert_skyreelsv2_to_diffusers.py); flow_shift 8.0 for T2V, as in the
    # pipeline's documented example.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=8.0
    )
    return _pipeline(SkyReelsV2Pipeline, _wan_vae(), "skyreels_v2", scheduler, tokenizer=None, text_encoder=None)


def _build_cogvideox() -> CogVideoXPipeline:
    vae = _vae(
        AutoencoderKLCogVideoX,
        block_out_channels=(8, 8, 8, 8),  # 4 blocks: 8x spatial
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_height=64,
        sample_width=64,
    )
    # THUDM/CogVideoX-2b (scripts/convert_cogvideox_to_diffusers.py, snr_shift_scale 3.0 for 2B).
    scheduler = CogVideoXDDIMScheduler(
        snr_shift_scale=3.0,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    return _pipeline(CogVideoXPipeline, vae, "cogvideox", scheduler, tokenizer=None, text_encoder=None)


def _build_hunyuan_video() -> HunyuanVideoPipeline:
    vae = _vae(
        AutoencoderKLHunyuanVideo,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    # hunyuanvideo-community/HunyuanVideo (scripts/convert_hunyuan_video_to_diffusers.py, --flow_shift 7.0).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    return _pipeline(
        HunyuanVideoPipeline,
        vae,
        "hunyuan_video",
        scheduler,
        tokenizer=None,
        text_encoder=None,
        tokenizer_2=None,
        text_encoder_2=None,
    )


def _build_ltx_video() -> LTXPipeline:
    vae = _vae(
        AutoencoderKLLTXVideo,
        latent_channels=8,  # = the tiny LTX transformer's in_channels
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        # patch 4 x three 2x scalings: 32x spatial, 8x temporal, like LTX-Video's VAE
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        patch_size=4,
        patch_size_t=1,
    )
    # Lightricks/LTX-Video 0.9.0 / 0.9.1 (scripts/convert_ltx_to_diffusers.py).
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return _pipeline(LTXPipeline, vae, "ltx_video", scheduler, tokenizer=None, text_encoder=None)


def _build_mochi() -> MochiPipeline:
    # MochiPipeline hard-codes 8x spatial / 6x temporal; the VAE's defaults have the same expansions. Its group norms
    # need multiples of 32 channels. latents_mean/std are None: the real ones have 12 channels, the tiny latents 4.
    vae = _vae(
        AutoencoderKLMochi,
        latent_channels=LATENT_CHANNELS,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
        add_attention_block=(False, False, False, False, False),
        latents_mean=None,
        latents_std=None,
    )
    # genmo/mochi-1-preview (scripts/convert_mochi_to_diffusers.py).
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    return _pipeline(MochiPipeline, vae, "mochi", scheduler, tokenizer=None, text_encoder=None)


def _build_allegro() -> AllegroPipeline:
    vae = _vae(
        AutoencoderKLAllegro,
        block_out_channels=(8, 8, 8, 8),  # 4 blocks: 8x spatial
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        sample_size=64,
    )
    # rhymes-ai/Allegro: the reference inference code builds `EulerAncestralDiscreteScheduler()`.
    vae.enable_tiling()  # AutoencoderKLAllegro only decodes tiled (as in diffusers' own Allegro docs and tests)
    scheduler = EulerAncestralDiscreteScheduler()
    return _pipeline(AllegroPipeline, vae, "allegro", scheduler, tokenizer=None, text_encoder=None)


def _build_latte() -> LattePipeline:
    vae = _vae(
        AutoencoderKL,  # Latte decodes frame by frame with an image VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),  # 4 blocks: 8x spatial
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=2,
        sample_size=64,
    )
    # maxin-cn/Latte-1: DDIM with linear betas 1e-4..0.02 (Latte's configs/t2v/t2v_sample.yaml).
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    return _pipeline(LattePipeline, vae, "latte", scheduler, tokenizer=None, text_encoder=None)


PIPELINES: dict[str, Callable[[], DiffusionPipeline]] = {
    "wan": _build_wan,
    "skyreels_v2": _build_skyreels_v2,
    "cogvideox": _build_cogvideox,
    "hunyuan_video": _build_hunyuan_video,
    "ltx_video": _build_ltx_video,
    "mochi": _build_mochi,
    "allegro": _build_allegro,
    "latte": _build_latte,
}


# ---------------------------------------------------------------------------------------------------------------------
# generation


def _call_kwargs(name: str, pipe: DiffusionPipeline) -> dict:
    """Per-family keyword arguments of `pipe(...)`, without generator / steps / callback / output type."""
    if name in ("wan", "skyreels_v2"):
        return dict(_text(), height=64, width=64, num_frames=5, guidance_scale=5.0 if name == "wan" else 6.0)
    if name == "cogvideox":
        # Exactly TEXT_LEN text tokens: the tiny model's sincos embedding covers `max_text_seq_length` tokens.
        return dict(_text(), height=64, width=64, num_frames=5, guidance_scale=6.0)
    if name == "hunyuan_video":
        return dict(
            _text(masked=True, pooled_dim=pipe.transformer.config.pooled_projection_dim),
            height=64,
            width=64,
            num_frames=5,
            guidance_scale=6.0,  # embedded guidance
            true_cfg_scale=3.0,  # real CFG: a second ("uncond") call per step
        )
    if name == "ltx_video":
        return dict(_text(masked=True), height=128, width=128, num_frames=9, guidance_scale=3.0)
    if name == "mochi":
        return dict(_text(masked=True), height=64, width=64, num_frames=7, guidance_scale=4.5)
    if name == "allegro":
        # negative_prompt defaults to "" and may not be combined with negative_prompt_embeds
        return dict(
            _text(masked=True), negative_prompt=None, height=64, width=64, num_frames=8, guidance_scale=7.5
        )
    if name == "latte":
        return dict(_text(), negative_prompt=None, height=64, width=64, video_length=2, guidance_scale=7.5)
    raise KeyError(f"unknown pipeline family {name!r}; known: {sorted(PIPELINES)}")


def generate(
    name: str,
    pipe: DiffusionPipeline,
    seed: int = 0,
    num_inference_steps: int = 4,
    callback_on_step_end=None,
    **overrides,
) -> torch.Tensor:
    """Run ``pipe(...)`` (a pipeline from ``PIPELINES[name]()``) and return its frames as a float32 tensor.

    By default the frames are the final latents (``output_type="latent"``). ``overrides`` replace or add any keyword
    argument of the call (e.g. ``guidance_scale=1.0`` to switch CFG off, ``output_type="pt"`` to decode).
    """
    kwargs = _call_kwargs(name, pipe)
    kwargs.update(
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(int(seed)),
        output_type="latent",
    )
    if callback_on_step_end is not None:
        kwargs["callback_on_step_end"] = callback_on_step_end
    kwargs.update(overrides)
    out = pipe(**kwargs)
    frames = out[0] if isinstance(out, tuple) else out.frames
    if not isinstance(frames, torch.Tensor):
        frames = torch.as_tensor(frames)  # e.g. output_type="np"
    return frames.float()


# ---------------------------------------------------------------------------------------------------------------------
# image-to-video
#
# The stock image-to-video pipelines, built the same way: the real pipeline class, a tiny transformer of the real class
# configured as the I2V checkpoint's is (its extra input channels, image embedder, conditioning mode), the tiny VAE of
# its family (which now also encodes the conditioning image), a tiny image encoder where the pipeline has one, and the
# scheduler the checkpoint ships with. :func:`generate_i2v` passes a fixed 8-colour image and precomputed prompt
# embeddings. How each conditions on the image, and how it calls its transformer per step:
#
# * wan_i2v (WanImageToVideoPipeline, Wan2.1 I2V): CLIP image tokens before the text tokens (257 + 512 in the real
#   model), for cross-attention only; the VAE-encoded first frame and a 4-channel mask as extra input channels.
#   Calls "cond", then "uncond".
# * wan22_i2v (WanImageToVideoPipeline, Wan2.2 I2V A14B): the extra channels only (no image encoder); two experts
#   split at boundary_ratio 0.9. "cond", then "uncond", on the step's expert.
# * wan22_ti2v_i2v (WanImageToVideoPipeline with expand_timesteps, Wan2.2 TI2V-5B, built from its WanPipeline as the
#   preset does): the image's latents are the first latent frame, whose tokens get timestep 0 (one timestep per
#   token) and are put back after every step.
#   "cond", then "uncond".
# * cogvideox_i2v (CogVideoXImageToVideoPipeline, CogVideoX-5B-I2V): the image latent (then zero frames) as extra
#   channels; learned positional embeddings (fixed to the sample size) and RoPE. One "cond_uncond" call, batch 2.
# * ltx_i2v (LTXImageToVideoPipeline): the image's latents are the first latent frame, its tokens at timestep 0 and
#   never stepped. One "cond_uncond" call, batch 2.
# * hunyuan_i2v (HunyuanVideoImageToVideoPipeline, HunyuanVideo-I2V's "token_replace"): the image's latents are the
#   first frame, its tokens modulated at timestep 0 in every block (in the real model the image's LLaVA tokens also
#   join the text). With true CFG two calls per step, in no cache context.
# * framepack (HunyuanVideoFramepackPipeline): SigLIP image tokens joined to the text, clean history latents as extra
#   video tokens; one denoising loop, with its own set_timesteps, per section of frames (two sections here). With
#   true CFG two calls per step, in no cache context.

I2V_SEED = 2
"""Seed of the image encoders and second experts of the I2V builds."""

WAN_TEXT_TOKENS = 512
"""Wan2.1 I2V's attention takes the last 512 tokens of its cross-attention input as text and the rest as image
tokens (hard-coded in diffusers), so its prompts have exactly 512 tokens."""

CLIP_DIM = 16
SIGLIP_DIM = 32


def _seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.eval()


def conditioning_image(size: int) -> "PIL.Image.Image":
    """A fixed `size` × `size` RGB image: blocks of eight colours, so the VAE and the image encoders see structure."""
    from PIL import Image

    colours = torch.tensor([[230, 40, 40], [40, 200, 60], [50, 70, 220], [240, 220, 50],
                            [250, 250, 250], [20, 20, 20], [200, 60, 200], [60, 200, 210]], dtype=torch.uint8)
    cells = torch.arange(64).view(8, 8) % 8
    cells = (cells + torch.arange(8).view(8, 1)) % 8
    pixels = colours[cells].repeat_interleave(max(size // 8, 1), 0).repeat_interleave(max(size // 8, 1), 1)
    return Image.fromarray(pixels[:size, :size].numpy())


def _wan_i2v_transformer(seed: int, in_channels: int, out_channels: int = LATENT_CHANNELS, **extra):
    config = {**_WAN_CONFIG, "in_channels": in_channels, "out_channels": out_channels, "num_layers": 3, **extra}
    return _seeded(lambda: WanTransformer3DModel(**config), seed)


# Wan2.1 I2V: the noise latents, a 4-channel first-frame mask (one per frame the VAE folds into a latent frame) and the
# first frame's latents, stacked on channels.
_WAN_I2V_CHANNELS = LATENT_CHANNELS + 4 + LATENT_CHANNELS


def _build_wan_i2v() -> WanImageToVideoPipeline:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    inner = _WAN_CONFIG["num_attention_heads"] * _WAN_CONFIG["attention_head_dim"]
    transformer = _wan_i2v_transformer(BUILD_SEED, _WAN_I2V_CHANNELS, image_dim=CLIP_DIM, added_kv_proj_dim=inner)
    clip = CLIPVisionConfig(hidden_size=CLIP_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=CLIP_DIM)
    image_encoder = _seeded(lambda: CLIPVisionModel(clip), I2V_SEED)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # Wan-AI/Wan2.1-I2V-14B-480P-Diffusers: UniPC, flow prediction, flow_shift 3.0 (5.0 for the 720P checkpoint).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=_wan_vae(), scheduler=scheduler, image_processor=processor,
        image_encoder=image_encoder, transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_wan22_i2v() -> WanImageToVideoPipeline:
    """Wan2.2 I2V A14B: two experts of different weights (no image encoder), split at boundary_ratio 0.9."""
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=_wan_vae(), scheduler=scheduler,
        transformer=_wan_i2v_transformer(BUILD_SEED, _WAN_I2V_CHANNELS),
        transformer_2=_wan_i2v_transformer(I2V_SEED, _WAN_I2V_CHANNELS), boundary_ratio=0.9,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


_TI2V_CHANNELS = 48


def _build_wan22_ti2v_i2v() -> WanImageToVideoPipeline:
    """Wan2.2 TI2V-5B given an image, as the wan2.2-ti2v-5b preset runs it: the checkpoint's WanPipeline (with
    expand_timesteps, 48 latent channels and the Wan2.2 VAE: 16x spatial, diffusers' own Wan2.2-5B test VAE config)
    turned into WanImageToVideoPipeline on the same components (`bwcache.pipelines.pipeline_for`: `from_pipe`)."""
    vae = _vae(
        AutoencoderKLWan, base_dim=3, z_dim=_TI2V_CHANNELS, in_channels=12, out_channels=12, is_residual=True,
        patch_size=2, latents_mean=[0.0] * _TI2V_CHANNELS, latents_std=[1.0] * _TI2V_CHANNELS, dim_mult=[1, 1, 1, 1],
        num_res_blocks=1, scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0
    )
    text_to_video = WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, expand_timesteps=True,
        transformer=_wan_i2v_transformer(BUILD_SEED, _TI2V_CHANNELS, _TI2V_CHANNELS),
    )
    pipe = WanImageToVideoPipeline.from_pipe(text_to_video)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_cogvideox_i2v() -> CogVideoXImageToVideoPipeline:
    """CogVideoX-5B-I2V's layout: twice the latent channels in, learned positional embeddings (fixed to the sample
    size) and RoPE."""
    transformer = _seeded(lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=2 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        time_embed_dim=16, text_embed_dim=TEXT_DIM, num_layers=4, sample_width=8, sample_height=8, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
    ), BUILD_SEED)
    base = _build_cogvideox()
    # THUDM/CogVideoX-5b-I2V: CogVideoXDDIMScheduler as the 2B's, with the 5B's snr_shift_scale 1.0.
    scheduler = CogVideoXDDIMScheduler.from_config(base.scheduler.config, snr_shift_scale=1.0)
    pipe = CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=base.vae, transformer=transformer,
                                         scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_ltx_i2v() -> LTXImageToVideoPipeline:
    """LTX-Video given an image, as the ltx-video preset runs it: LTXImageToVideoPipeline on the text-to-video
    pipeline's components (`from_pipe`)."""
    pipe = LTXImageToVideoPipeline.from_pipe(_build_ltx_video())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_hunyuan_i2v() -> HunyuanVideoImageToVideoPipeline:
    """HunyuanVideo-I2V (image_condition_type "token_replace": the first frame's tokens are the image's and are
    modulated at timestep 0)."""
    transformer = _seeded(lambda: HunyuanVideoTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=TEXT_DIM, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), image_condition_type="token_replace",
    ), BUILD_SEED)
    base = _build_hunyuan_video()
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=base.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        image_processor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_framepack() -> HunyuanVideoFramepackPipeline:
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    transformer = _seeded(lambda: HunyuanVideoFramepackTransformer3DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=16,
        num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=TEXT_DIM, pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6), image_condition_type=None, has_image_proj=True, image_proj_dim=SIGLIP_DIM,
        has_clean_x_embedder=True,
    ), BUILD_SEED)
    siglip = SiglipVisionConfig(hidden_size=SIGLIP_DIM, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, image_size=32, patch_size=8)
    image_encoder = _seeded(lambda: SiglipVisionModel(siglip), I2V_SEED)
    base = _build_hunyuan_video()
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=base.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
        image_encoder=image_encoder, feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


I2V_PIPELINES: dict[str, Callable[[], DiffusionPipeline]] = {
    "wan_i2v": _build_wan_i2v,
    "wan22_i2v": _build_wan22_i2v,
    "wan22_ti2v_i2v": _build_wan22_ti2v_i2v,
    "cogvideox_i2v": _build_cogvideox_i2v,
    "ltx_i2v": _build_ltx_i2v,
    "hunyuan_i2v": _build_hunyuan_i2v,
    "framepack": _build_framepack,
}


def _i2v_call_kwargs(name: str, pipe: DiffusionPipeline) -> dict:
    """Per-pipeline keyword arguments of `pipe(...)` with its conditioning image (no generator, steps or callback)."""
    if name == "wan_i2v":
        gen = torch.Generator().manual_seed(EMBED_SEED)
        text = {key: torch.randn(1, WAN_TEXT_TOKENS, TEXT_DIM, generator=gen)
                for key in ("prompt_embeds", "negative_prompt_embeds")}
        return dict(text, image=conditioning_image(32), height=32, width=32, num_frames=5, guidance_scale=5.0)
    if name == "wan22_i2v":
        return dict(_text(), image=conditioning_image(32), height=32, width=32, num_frames=5, guidance_scale=4.0,
                    guidance_scale_2=3.0)
    if name == "wan22_ti2v_i2v":
        return dict(_text(), image=conditioning_image(64), height=64, width=64, num_frames=9, guidance_scale=5.0)
    if name == "cogvideox_i2v":
        return dict(_text(), image=conditioning_image(64), height=64, width=64, num_frames=5, guidance_scale=6.0)
    if name == "ltx_i2v":
        return dict(_text(masked=True), image=conditioning_image(128), height=128, width=128, num_frames=17,
                    guidance_scale=3.0)
    if name in ("hunyuan_i2v", "framepack"):
        text = _text(masked=True, pooled_dim=pipe.transformer.config.pooled_projection_dim)
        size = 64 if name == "hunyuan_i2v" else 32
        extra = dict(num_frames=5) if name == "hunyuan_i2v" else dict(num_frames=17, latent_window_size=3)
        # Embedded guidance as the model takes it, and true CFG: a second (negative) call per step.
        return dict(text, image=conditioning_image(size), height=size, width=size, guidance_scale=6.0,
                    true_cfg_scale=3.0, **extra)
    raise KeyError(f"unknown image-to-video pipeline {name!r}; known: {sorted(I2V_PIPELINES)}")


def generate_i2v(
    name: str,
    pipe: DiffusionPipeline,
    seed: int = 0,
    num_inference_steps: int = 4,
    callback_on_step_end=None,
    **overrides,
) -> torch.Tensor:
    """Run ``pipe(...)`` (from ``I2V_PIPELINES[name]()``) on its conditioning image and return the final latents as a
    float32 tensor (Framepack: the whole history of its sections)."""
    kwargs = _i2v_call_kwargs(name, pipe)
    kwargs.update(num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(int(seed)),
                  output_type="latent")
    if callback_on_step_end is not None:
        kwargs["callback_on_step_end"] = callback_on_step_end
    kwargs.update(overrides)
    frames = pipe(**kwargs).frames
    if isinstance(frames, list):
        frames = frames[-1]  # Framepack's latent output: the history after each section
    return torch.as_tensor(frames).float()
