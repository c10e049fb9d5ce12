"""A stock WanPipeline with tiny random components, and a copy of a real preset sized for it."""

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from bwcache.presets import Preset, load_preset

TEXT_DIM = 32


class EmbeddingTextEncoder(torch.nn.Module):
    """Stands in for UMT5: hashes prompt characters into a fixed random embedding table."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(256, TEXT_DIM)

    @property
    def dtype(self):
        return self.table.weight.dtype


def build_wan_pipeline(num_layers: int = 3) -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer.eval(), vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_transformer(num_layers: int, channels: int = 16) -> WanTransformer3DModel:
    """The same tiny transformer config as build_wan_pipeline's, with `channels` latent channels in and out."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=channels, out_channels=channels,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def build_wan22_pipeline(num_layers: int = 3, boundary_ratio: float = 0.875) -> WanPipeline:
    """Wan2.2 A14B in miniature: a stock WanPipeline with two experts of different random weights.

    `transformer` runs the steps whose timestep is >= boundary_ratio * 1000 (high noise), `transformer_2` the rest.
    With FlowMatchEulerDiscreteScheduler(shift=5.0) and 6 steps the timesteps are 1000, 952.7, 883.2, 771.4, 561.6,
    24.4: at 0.875 the switch comes at step 3 (steps 0-2 run `transformer`, steps 3-5 `transformer_2`).
    """
    base = build_wan_pipeline(num_layers)  # the VAE and the first expert, built under seed 0 exactly as there
    torch.manual_seed(1)
    transformer_2 = _tiny_transformer(num_layers)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, transformer=base.transformer, transformer_2=transformer_2, vae=base.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), boundary_ratio=boundary_ratio,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_wan22_ti2v_pipeline(num_layers: int = 3) -> WanPipeline:
    """Wan2.2 TI2V-5B in miniature: a stock WanPipeline with expand_timesteps=True (one timestep per token),
    one transformer with 48 latent channels and a tiny Wan2.2 VAE (residual blocks, 2x2 patchify, z_dim 48,
    16x spatial compression: sizes must be multiples of 32). The VAE config is diffusers' own Wan2.2-5B test VAE."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
        latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
    )
    transformer = _tiny_transformer(num_layers, channels=48)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), expand_timesteps=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PromptEmbeddingWanPipeline(WanPipeline):
    """WanPipeline whose prompts are embedded by a tiny table instead of UMT5, so `prompt=` works offline."""

    def encode_prompt(self, prompt, negative_prompt=None, do_classifier_free_guidance=True, num_videos_per_prompt=1,
                      prompt_embeds=None, negative_prompt_embeds=None, max_sequence_length=226, device=None,
                      dtype=None):
        def embed(text):
            codes = torch.tensor([[ord(c) % 256 for c in (text or " ")[:8].ljust(8)]])
            return self._table(codes).detach()

        prompt = prompt if isinstance(prompt, str) else prompt[0]
        negative = embed(negative_prompt if isinstance(negative_prompt, str) else "") if do_classifier_free_guidance else None
        return embed(prompt), negative


def build_prompt_wan_pipeline() -> PromptEmbeddingWanPipeline:
    base = build_wan_pipeline()
    pipe = PromptEmbeddingWanPipeline(
        tokenizer=None, text_encoder=None, transformer=base.transformer, vae=base.vae, scheduler=base.scheduler
    )
    torch.manual_seed(1)
    pipe._table = torch.nn.Embedding(256, TEXT_DIM)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def small_preset(name: str = "wan2.1-t2v-1.3b") -> Preset:
    data = load_preset(name).to_dict()
    data["defaults"].update(height=16, width=16, num_frames=5, num_inference_steps=6, fps=8, negative_prompt="")
    data["limits"].update(height=[16, 32, 16], width=[16, 32, 16], num_frames=[5, 9, "4k+1"], num_inference_steps=[2, 12])
    return Preset.from_dict(data, source=f"small {name}")


def tiny_text_encoder():
    """A tiny UMT5 encoder and a word-level tokenizer: what the real repositories ship, in miniature."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "grass"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(2)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1,
                                          num_heads=4, relative_attention_num_buckets=8))
    return tokenizer, encoder.eval()
