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
