"""Tiny, seeded, random-weight builds of the diffusers video transformers supported by BWCache.

Each :class:`Family` builds the real diffusers transformer class with a tiny config (2-4 blocks per list, 2 heads,
head dims of 12-16, a 2-frame 8x8 latent) and provides the keyword arguments of one forward call, shaped the way the
matching diffusers pipeline calls the transformer. ``step_inputs`` derives the inputs of a later denoising step
(lower timestep, slightly changed latents) so that :func:`run_steps` resembles a sampling loop.

All builds are float32, in eval mode and deterministic: the weights depend only on the fixed build seed, the inputs only
on the seed passed to ``inputs``. Neither touches the global RNG state seen by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


from diffusers import (
    AllegroTransformer3DModel,
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LatteTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    SkyReelsV2Transformer3DModel,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

__all__ = [
    "BUILD_SEED",
    "FAMILIES",
    "Family",
    "expected_output_shape",
    "run_steps",
]

BUILD_SEED = 0
"""Seed of every build; two builds of a family have bit-identical weights."""

STEP_NOISE_SEED = 10_000
"""Base seed of the per-step latent perturbation used by ``step_inputs``."""

# Shared tiny geometry: one video of 2 latent frames of 8x8 (4x4 tokens per frame after a 2x2 patch), and a
# text prompt of 6 tokens of which the last 2 are padding where the family takes an attention mask.
BATCH = 1
FRAMES = 2
HEIGHT = 8
WIDTH = 8
LATENT_CHANNELS = 4
TEXT_LEN = 6
TEXT_PAD = 2
TEXT_DIM = 16

FIRST_TIMESTEP = 937.0
TIMESTEP_DECREMENT = 45.0


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]
    step_inputs: Callable[[dict, int], dict]
    block_lists: tuple[str, ...]
    # Output shape for given inputs; ``None`` means "same shape as ``hidden_states``".
    output_shape: Callable[[dict], tuple[int, ...]] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def _build(cls, post: Callable[[torch.nn.Module], None] | None = None, **config) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        model = cls(**config)
        if post is not None:
            post(model)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    return model.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _text_mask(dtype=torch.long) -> torch.Tensor:
    mask = torch.ones(BATCH, TEXT_LEN, dtype=dtype)
    mask[:, TEXT_LEN - TEXT_PAD :] = 0
    return mask


def _timestep(s: int) -> float:
    return max(FIRST_TIMESTEP - TIMESTEP_DECREMENT * s, 1.0)


def _step_timestep(base_timestep: torch.Tensor, s: int) -> torch.Tensor:
    t = torch.full_like(base_timestep, _timestep(s), dtype=torch.float32)
    return t.to(base_timestep.dtype)


def _step_inputs(base: dict, s: int) -> dict:
    """Inputs of denoising step ``s``: latents scaled down and mixed with a fixed per-step noise, lower timestep.

    Always returns fresh ``hidden_states`` and ``timestep`` tensors (also for ``s == 0``), so in-place changes made
    during a forward call cannot leak into ``base``. The other entries are shared with ``base``, like the prompt
    embeddings of a real sampling loop.
    """
    out = dict(base)
    hs = base["hidden_states"]
    noise = torch.randn(hs.shape, generator=_gen(STEP_NOISE_SEED + s), dtype=hs.dtype)
    out["hidden_states"] = hs * (1.0 - 0.03 * s) + (0.02 * s) * noise
    out["timestep"] = _step_timestep(base["timestep"], s)
    return out


def _video_latents(gen: torch.Generator, channels: int = LATENT_CHANNELS) -> torch.Tensor:
    """(B, C, F, H, W) latents, the layout of Wan, SkyReels-V2, HunyuanVideo, Mochi, Allegro and Latte."""
    return _randn(gen, BATCH, channels, FRAMES, HEIGHT, WIDTH)


def _float_timestep() -> torch.Tensor:
    return torch.full((BATCH,), FIRST_TIMESTEP, dtype=torch.float32)


def _long_timestep() -> torch.Tensor:
    return torch.full((BATCH,), int(FIRST_TIMESTEP), dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------------
# Wan 2.1 / SkyReels-V2 (same layout: one `blocks` list, Conv3d patchify, rope over the token grid)

_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    text_dim=TEXT_DIM,
    freq_dim=16,
    ffn_dim=32,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=32,
)


def _build_wan() -> torch.nn.Module:
    return _build(WanTransformer3DModel, **_WAN_CONFIG)


def _build_skyreels_v2() -> torch.nn.Module:
    return _build(SkyReelsV2Transformer3DModel, **_WAN_CONFIG)


def _inputs_wan(seed: int) -> dict:
    gen = _gen(seed)
    return {
        "hidden_states": _video_latents(gen),
        "timestep": _float_timestep(),
        "encoder_hidden_states": _randn(gen, BATCH, TEXT_LEN, TEXT_DIM),
    }


# ---------------------------------------------------------------------------------------------------------------------
# CogVideoX (1.0 / 2b layout: sincos positional embeddings, text tokens joined to the patch sequence)

_COG_TEMPORAL_COMPRESSION = 4


def _build_cogvideox() -> torch.nn.Module:
    return _build(
        CogVideoXTransformer3DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        time_embed_dim=16,
        text_embed_dim=TEXT_DIM,
        num_layers=4,
        sample_width=WIDTH,
        sample_height=HEIGHT,
        sample_frames=(FRAMES - 1) * _COG_TEMPORAL_COMPRESSION + 1,
        patch_size=2,
        temporal_compression_ratio=_COG_TEMPORAL_COMPRESSION,
        # The sincos positional embedding covers exactly `max_text_seq_length` text tokens.
        max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=False,
    )


def _inputs_cogvideox(seed: int) -> dict:
    gen = _gen(seed)
    return {
        # (B, F, C, H, W)
        "hidden_states": _randn(gen, BATCH, FRAMES, LATENT_CHANNELS, HEIGHT, WIDTH),
        "encoder_hidden_states": _randn(gen, BATCH, TEXT_LEN, TEXT_DIM),
        "timestep": _long_timestep(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# HunyuanVideo (dual-stream `transformer_blocks`, then single-stream `single_transformer_blocks`)

_HUNYUAN_POOLED_DIM = 8


def _build_hunyuan_video() -> torch.nn.Module:
    return _build(
        HunyuanVideoTransformer3DModel,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        qk_norm="rms_norm",
        guidance_embeds=True,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=_HUNYUAN_POOLED_DIM,
        rope_axes_dim=(4, 6, 6),
    )


def _inputs_hunyuan_video(seed: int) -> dict:
    gen = _gen(seed)
    return {
        "hidden_states": _video_latents(gen),
        "timestep": _float_timestep(),
        "encoder_hidden_states": _randn(gen, BATCH, TEXT_LEN, TEXT_DIM),
        "encoder_attention_mask": _text_mask(),
        "pooled_projections": _randn(gen, BATCH, _HUNYUAN_POOLED_DIM),
        "guidance": torch.full((BATCH,), 6.0 * 1000.0),
    }


# ---------------------------------------------------------------------------------------------------------------------
# LTX-Video (patchified token sequence in, token sequence out)

_LTX_CHANNELS = 8
_LTX_INNER = 2 * 16


def _build_ltx_video() -> torch.nn.Module:
    return _build(
        LTXVideoTransformer3DModel,
        in_channels=_LTX_CHANNELS,
        out_channels=_LTX_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=16,
        cross_attention_dim=_LTX_INNER,
        num_layers=4,
        caption_channels=TEXT_DIM,
    )


_LTX_GRID = (FRAMES, HEIGHT // 2, WIDTH // 2)


def _inputs_ltx_video(seed: int) -> dict:
    gen = _gen(seed)
    f, h, w = _LTX_GRID
    return {
        # (B, F*H*W, C), as produced by the LTX pipeline's `_pack_latents`
        "hidden_states": _randn(gen, BATCH, f * h * w, _LTX_CHANNELS),
        "encoder_hidden_states": _randn(gen, BATCH, TEXT_LEN, TEXT_DIM),
        "timestep": _float_timestep(),
        "encoder_attention_mask": _text_mask(),
        "num_frames": f,
        "height": h,
        "width": w,
        # (temporal compression / frame rate, spatial compression, spatial compression), as in the pipeline
        "rope_interpolation_scale": (8 / 25, 32.0, 32.0),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Mochi (dual-stream blocks; the last one is `context_pre_only`)


def _randomize_mochi_rope(model: torch.nn.Module) -> None:
    # `pos_frequencies` is zero-initialized (learned in the checkpoint); give it values so the rope is not a no-op.
    with torch.no_grad():
        model.pos_frequencies.normal_(0.0, 0.5)


def _build_mochi() -> torch.nn.Module:
    return _build(
        MochiTransformer3DModel,
        post=_randomize_mochi_rope,
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=4,
        pooled_projection_dim=16,
        in_channels=LATENT_CHANNELS,
        qk_norm="rms_norm",
        text_embed_dim=TEXT_DIM,  # pooled by an 8-head attention pool: must be a multiple of 8
        time_embed_dim=16,
        max_sequence_length=TEXT_LEN,
    )


def _inputs_mochi(seed: int) -> dict:
    gen = _gen(seed)
    return {
        "hidden_states": _video_latents(gen),
        "encoder_hidden_states": _randn(gen, BATCH, TEXT_LEN, TEXT_DIM),
        "timestep": _float_timestep(),
        "encoder_attention_mask": _text_mask(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Allegro (one `transformer_blocks` list; rope computed outside the model, as in the pipeline)

_ALLEGRO_HEAD_DIM = 12  # split in three even rope parts
_ALLEGRO_PATCH = 2
_ALLEGRO_INTERPOLATION = (2.2, 2.0, 2.0)  # (t, h, w): the model's defaults


def _build_allegro() -> torch.nn.Module:
    return _build(
        AllegroTransformer3DModel,
        patch_size=_ALLEGRO_PATCH,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=_ALLEGRO_HEAD_DIM,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=4,
        cross_attention_dim=2 * _ALLEGRO_HEAD_DIM,
        sample_height=HEIGHT,
        sample_width=WIDTH,
        sample_frames=FRAMES,
        caption_channels=TEXT_DIM,
        interpolation_scale_t=_ALLEGRO_INTERPOLATION[0],
        interpolation_scale_h=_ALLEGRO_INTERPOLATION[1],
        interpolation_scale_w=_ALLEGRO_INTERPOLATION[2],
    )


def _allegro_rotary_emb() -> tuple:
    """Mirror of `AllegroPipeline._prepare_rotary_positional_embeddings` for the latent grid."""
    grid_height = HEIGHT // _ALLEGRO_PATCH
    grid_width = WIDTH // _ALLEGRO_PATCH
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=_ALLEGRO_HEAD_DIM,
        crops_coords=((0, 0), (grid_height, grid_width)),
        grid_size=(grid_height, grid_width),
        temporal_size=FRAMES,
        interpolation_scale=_ALLEGRO_INTERPOLATION,
    )
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    grid_t, grid_h, grid_w = pos
    return (freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w)


def _inputs_allegro(seed: int) -> dict:
    gen = _gen(seed)
    return {
        "hidden_states": _video_latents(gen),
        "encoder_hidden_states": _randn(gen, BATCH, TEXT_LEN, TEXT_DIM),
        "timestep": _float_timestep(),
        "encoder_attention_mask": _text_mask(),
        "image_rotary_emb": _allegro_rotary_emb(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Latte (spatial `transformer_blocks` interleaved with `temporal_transformer_blocks`)

_LATTE_OUT_CHANNELS = 2 * LATENT_CHANNELS  # learned sigma, as in Latte-1


def _build_latte() -> torch.nn.Module:
    return _build(
        LatteTransformer3DModel,
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CHANNELS,
        out_channels=_LATTE_OUT_CHANNELS,
        num_layers=2,
        cross_attention_dim=32,
        attention_bias=True,
        sample_size=HEIGHT,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=TEXT_DIM,
        video_length=FRAMES,  # the temporal positional embedding is added for exactly `video_length` frames
    )


def _inputs_latte(seed: int) -> dict:
    gen = _gen(seed)
    return {
        "hidden_states": _video_latents(gen),
        "timestep": _long_timestep(),
        "encoder_hidden_states": _randn(gen, BATCH, TEXT_LEN, TEXT_DIM),
        "enable_temporal_attentions": True,
    }


def _output_shape_latte(inputs: dict) -> tuple[int, ...]:
    b, _, f, h, w = inputs["hidden_states"].shape
    return (b, _LATTE_OUT_CHANNELS, f, h, w)


# ---------------------------------------------------------------------------------------------------------------------
# registry

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("wan", _build_wan, _inputs_wan, _step_inputs, ("blocks",)),
        Family("skyreels_v2", _build_skyreels_v2, _inputs_wan, _step_inputs, ("blocks",)),
        Family("cogvideox", _build_cogvideox, _inputs_cogvideox, _step_inputs, ("transformer_blocks",)),
        Family(
            "hunyuan_video",
            _build_hunyuan_video,
            _inputs_hunyuan_video,
            _step_inputs,
            ("transformer_blocks", "single_transformer_blocks"),
        ),
        Family("ltx_video", _build_ltx_video, _inputs_ltx_video, _step_inputs, ("transformer_blocks",)),
        Family("mochi", _build_mochi, _inputs_mochi, _step_inputs, ("transformer_blocks",)),
        Family("allegro", _build_allegro, _inputs_allegro, _step_inputs, ("transformer_blocks",)),
        Family(
            "latte",
            _build_latte,
            _inputs_latte,
            _step_inputs,
            # Executed interleaved: spatial[0], temporal[0], spatial[1], temporal[1], ...
            ("transformer_blocks", "temporal_transformer_blocks"),
            output_shape=_output_shape_latte,
        ),
    )
}


def expected_output_shape(family: Family, inputs: dict) -> tuple[int, ...]:
    """Shape of the sample tensor the family's transformer returns for ``inputs``."""
    if family.output_shape is not None:
        return tuple(family.output_shape(inputs))
    return tuple(inputs["hidden_states"].shape)


def run_steps(
    transformer: torch.nn.Module,
    family: Family,
    num_steps: int,
    seed: int = 0,
    context: str | None | bool = None,
) -> list[torch.Tensor]:
    """Call ``transformer`` for ``num_steps`` denoising steps and return the sample tensor of each step.

    Each call is wrapped in ``transformer.cache_context(context or "cond", step_index=s,
    num_inference_steps=num_steps)``; pass ``context=False`` to call the transformer without a cache context.
    """
    base = family.inputs(seed)
    outputs = []
    with torch.no_grad():
        for s in range(num_steps):
            kwargs = family.step_inputs(base, s)
            if context is False:
                out = transformer(**kwargs, return_dict=False)[0]
            else:
                with transformer.cache_context(context or "cond", step_index=s, num_inference_steps=num_steps):
                    out = transformer(**kwargs, return_dict=False)[0]
            outputs.append(out)
    return outputs
