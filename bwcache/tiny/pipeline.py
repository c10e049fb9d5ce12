"""The Tiny Shapes text-to-video pipeline: a small `WanTransformer3DModel` denoising in pixel space.

The denoising loop talks to the transformer exactly like diffusers' `WanPipeline` does (separate cond/uncond calls,
each inside `transformer.cache_context(...)`, `maybe_free_model_hooks()` at the end), so cache hooks written for
Wan models run unchanged on this model.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..resources import TINY_SHAPES_DIR
from .text import TinyTextEncoder

ASSETS_DIR = TINY_SHAPES_DIR
CONFIG_NAME = "config.json"
TRANSFORMER_WEIGHTS = "transformer.safetensors"
TEXT_ENCODER_WEIGHTS = "text_encoder.safetensors"

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": [2, 4, 4],
    # Hidden 144 leaves room beside the 96 values of a patch (2 x 4 x 4 x 3) that the velocity must carry.
    "num_attention_heads": 3,
    "attention_head_dim": 48,
    # RGB plus the three position channels of `with_positions`.
    "in_channels": 6,
    "out_channels": 3,
    "text_dim": 128,
    "freq_dim": 64,
    "ffn_dim": 432,
    "num_layers": 6,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    # RoPE tables are indexed per axis (frames, rows, columns of patches); 64 covers every allowed size.
    "rope_max_seq_len": 64,
    "pos_embed_seq_len": None,
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {"max_length": 16, "dim": 128, "num_layers": 2, "num_heads": 4, "ffn_dim": 256}
SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}

DEFAULTS: dict[str, Any] = {
    "prompt": "a red square moving right",
    "negative_prompt": "",
    "height": 32,
    "width": 32,
    "num_frames": 16,
    "num_inference_steps": 30,
    "guidance_scale": 5.0,
    "fps": 8,
    "seed": 0,
}
# [min, max, multiple] for sizes, [min, max] for the rest; sizes are the range the model was trained on.
LIMITS: dict[str, Any] = {
    "height": [24, 40, 4],
    "width": [24, 40, 4],
    "num_frames": [8, 24, 4],
    "num_inference_steps": [1, 100],
    "guidance_scale": [1.0, 10.0],
    "prompt_max_chars": 200,
}


def position_channels(video: torch.Tensor) -> torch.Tensor:
    """Ramps from -1 to 1 along frames, rows and columns, shaped like `video` (B, C, F, H, W) with C = 3.

    Wan's only position signal is RoPE, which is relative, and its patch embedding has no padding, so on its own
    the network cannot tell where in the frame a patch sits. These fixed channels, concatenated to the noisy video
    as extra input channels (the way Wan's image-to-video model takes its conditioning), tell it.
    """
    b, _, f, h, w = video.shape
    axes = [torch.linspace(-1.0, 1.0, n, device=video.device, dtype=video.dtype) if n > 1
            else torch.zeros(1, device=video.device, dtype=video.dtype) for n in (f, h, w)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, F, H, W)
    return grid.unsqueeze(0).expand(b, -1, -1, -1, -1)


# How a model takes a first frame (image-to-video), told apart by its extra input channels beyond the video's:
#   None       3 position channels only: text-to-video.
#   "concat"   positions, then the conditioning video (the image at frame 0, zeros elsewhere) and a mask channel
#              (1 at frame 0), as Wan2.1's image-to-video model takes them; all zeros when no image is given.
#   "replace"  positions, then a mask channel; the sampler overwrites frame 0 of the latents with the clean image
#              before every step and at the end (as Wan2.2's TI2V model does with its first latent frame).
IMAGE_CONDITIONING = (None, "concat", "replace")


def input_layout(config) -> tuple[bool, str | None]:
    """(takes position channels, image conditioning) of a transformer config, from its channel counts."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    out = get("out_channels")
    extra = get("in_channels") - out
    layouts = {0: (False, None), 3: (True, None), 3 + out + 1: (True, "concat"), 3 + 1: (True, "replace")}
    if extra not in layouts:
        raise ValueError(
            f"in_channels must be out_channels (+3 position channels, +{out + 1} or +1 image-conditioning channels), "
            f"got in_channels={get('in_channels')}, out_channels={out}"
        )
    return layouts[extra]


def in_channels_for(image_conditioning: str | None, out_channels: int = 3) -> int:
    if image_conditioning not in IMAGE_CONDITIONING:
        raise ValueError(f"image_conditioning must be one of {IMAGE_CONDITIONING}, got {image_conditioning!r}")
    return out_channels + 3 + {None: 0, "concat": out_channels + 1, "replace": 1}[image_conditioning]


def model_input(
    video: torch.Tensor,
    transformer: WanTransformer3DModel,
    image: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    """The transformer's input for latents `video` (B, C, F, H, W): the video, position channels when the config
    takes them, and the image conditioning of its layout. `image` (B, C, H, W) in [-1, 1] is the first frame, or
    None for text-to-video (its channels are then zeros); `present` (B,) bool, if given, says which rows of the batch
    take their image (training mixes both). For "replace" the caller puts the image into frame 0 of `video` itself."""
    positions, conditioning = input_layout(transformer.config)
    if image is not None and conditioning is None:
        raise ValueError("this model takes no image (it was trained for text-to-video only)")
    parts = [video]
    if positions:
        parts.append(position_channels(video))
    if conditioning is not None:
        b, c, f, h, w = video.shape
        mask = torch.zeros(b, 1, f, h, w, device=video.device, dtype=video.dtype)
        flag = None
        if image is not None:
            flag = (torch.ones(b, device=video.device, dtype=video.dtype) if present is None
                    else present.to(device=video.device, dtype=video.dtype))
        if conditioning == "concat":
            cond = torch.zeros_like(video)
            if image is not None:
                cond[:, :, 0] = image.to(video.dtype) * flag.view(b, 1, 1, 1)
            parts.append(cond)
        if image is not None:
            mask[:, 0, 0] = flag.view(b, 1, 1)
        parts.append(mask)
    return torch.cat(parts, dim=1) if len(parts) > 1 else video


def with_positions(video: torch.Tensor, transformer: WanTransformer3DModel) -> torch.Tensor:
    """The transformer's input: `video` plus position channels when its config takes them (and empty image
    conditioning for a model that also takes a first frame)."""
    return model_input(video, transformer)


def prepare_image(image, height: int, width: int, batch_size: int, device, dtype=torch.float32) -> torch.Tensor:
    """A first frame as (B, 3, H, W) in [-1, 1]: a PIL image, an array (H, W, 3) in [0, 1] or uint8, a tensor
    (3, H, W) or (H, W, 3) in [0, 1], or a list of these (one per prompt). Resized to (height, width) if needed."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    tensors = []
    for item in items:
        if hasattr(item, "convert") and hasattr(item, "size"):  # PIL
            item = np.asarray(item.convert("RGB"))
        if isinstance(item, np.ndarray):
            arr = item
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        elif isinstance(item, torch.Tensor):
            t = item.detach().float().cpu()
        else:
            raise ValueError(f"image must be a PIL image, an array or a tensor, got {type(item).__name__}")
        if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
            t = t.permute(2, 0, 1)
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"image must be (H, W, 3) or (3, H, W), got shape {tuple(t.shape)}")
        if t.max() > 1.5:
            t = t / 255.0
        if tuple(t.shape[1:]) != (height, width):
            t = torch.nn.functional.interpolate(t[None], size=(height, width), mode="bilinear", antialias=True,
                                                align_corners=False)[0]
        tensors.append(t.clamp(0, 1) * 2 - 1)
    if len(tensors) == 1:
        tensors = tensors * batch_size
    if len(tensors) != batch_size:
        raise ValueError(f"got {len(tensors)} images for {batch_size} prompts; give one image or one per prompt")
    return torch.stack(tensors).to(device=device, dtype=dtype)


def build_transformer(config: dict[str, Any] | None = None) -> WanTransformer3DModel:
    cfg = dict(TRANSFORMER_CONFIG if config is None else config)
    cfg["patch_size"] = tuple(cfg["patch_size"])
    return WanTransformer3DModel(**cfg)


def build_text_encoder(config: dict[str, Any] | None = None) -> TinyTextEncoder:
    return TinyTextEncoder(**(TEXT_ENCODER_CONFIG if config is None else config))


def build_scheduler(config: dict[str, Any] | None = None) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**(SCHEDULER_CONFIG if config is None else config))


@dataclass
class TinyShapesPipelineOutput(BaseOutput):
    """`frames`: (batch, frames, H, W, 3) float32 in [0, 1] for "np" and "pt"; a list of lists of PIL images for
    "pil"; raw latents (batch, 3, frames, H, W) in [-1, 1] for "latent"."""

    frames: Any


class TinyShapesPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        text_encoder: TinyTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
        self.defaults = copy.deepcopy(DEFAULTS)
        self.limits = copy.deepcopy(LIMITS)

    # ---------------------------------------------------------------- validation
    def check_inputs(self, prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale):
        lim = self.limits
        for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
            lo, hi, mult = lim[name]
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not (lo <= value <= hi) or value % mult:
                raise ValueError(f"{name} must be a multiple of {mult} between {lo} and {hi}, got {value}")
        lo, hi = lim["num_inference_steps"]
        if not isinstance(num_inference_steps, (int, np.integer)) or not lo <= num_inference_steps <= hi:
            raise ValueError(f"num_inference_steps must be an integer between {lo} and {hi}, got {num_inference_steps!r}")
        lo, hi = lim["guidance_scale"]
        if not isinstance(guidance_scale, (int, float)) or not lo <= guidance_scale <= hi:
            raise ValueError(f"guidance_scale must be between {lo} and {hi}, got {guidance_scale!r}")
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
            for v in values:
                if len(v) > lim["prompt_max_chars"]:
                    raise ValueError(f"{name} is {len(v)} characters long; the limit is {lim['prompt_max_chars']}")

    # ---------------------------------------------------------------- prompts
    def encode_prompt(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None, do_cfg: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_embeds = self.text_encoder.encode(prompts, "prompt")
        negative_prompt_embeds = None
        if do_cfg:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; they must match"
                )
            negative_prompt_embeds = self.text_encoder.encode(negatives, "negative prompt")
        return prompt_embeds, negative_prompt_embeds

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    # ---------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        image=None,
    ):
        """`image`: an optional first frame (image-to-video), for a model trained to take one; see `prepare_image`."""
        d = self.defaults
        prompt = d["prompt"] if prompt is None else prompt
        negative_prompt = d["negative_prompt"] if negative_prompt is None else negative_prompt
        num_frames = d["num_frames"] if num_frames is None else num_frames
        height = d["height"] if height is None else height
        width = d["width"] if width is None else width
        num_inference_steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'np', 'pil', 'pt', 'latent', got {output_type!r}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        for k in callback_on_step_end_tensor_inputs:
            if k not in self._callback_tensor_inputs:
                raise ValueError(f"callback_on_step_end_tensor_inputs may only contain {self._callback_tensor_inputs}")
        self.check_inputs(prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale)
        self._guidance_scale = float(guidance_scale)

        device = self._execution_device
        transformer_dtype = self.transformer.dtype
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance
        )
        batch_size = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        shape = (batch_size, self.transformer.config.out_channels, num_frames, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device=device, dtype=torch.float32)

        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        conditioning = input_layout(self.transformer.config)[1]
        if image is not None:
            if conditioning is None:
                raise ValueError("this model takes no image: it was trained for text-to-video only")
            image = prepare_image(image, height, width, batch_size, device)
        replace_first = image is not None and conditioning == "replace"

        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if replace_first:
                    latents[:, :, 0] = image
                latent_model_input = model_input(
                    latents.to(transformer_dtype), self.transformer,
                    None if image is None else image.to(transformer_dtype),
                )
                timestep = t.expand(latents.shape[0])
                cache_context_kwargs = {
                    "step_index": i,
                    "num_inference_steps": self._num_timesteps,
                    "timestep": float(t),
                    "sigma": float(self.scheduler.sigmas[i]),
                }
                with self.transformer.cache_context("cond", **cache_context_kwargs):
                    noise_pred = self.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        return_dict=False,
                    )[0]
                if self.do_classifier_free_guidance:
                    with self.transformer.cache_context("uncond", **cache_context_kwargs):
                        noise_uncond = self.transformer(
                            hidden_states=latent_model_input,
                            timestep=timestep,
                            encoder_hidden_states=negative_prompt_embeds,
                            return_dict=False,
                        )[0]
                    noise_pred = noise_uncond + self._guidance_scale * (noise_pred - noise_uncond)

                latents = self.scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                progress_bar.update()

        if replace_first:
            latents[:, :, 0] = image
        if output_type == "latent":
            video = latents
        else:
            video = ((latents.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).contiguous().cpu()
            if output_type == "np":
                video = video.numpy()
            elif output_type == "pil":
                from PIL import Image

                arr = (video.numpy() * 255).round().astype(np.uint8)
                video = [[Image.fromarray(frame) for frame in clip] for clip in arr]

        # Resets stateful cache hooks (and re-applies offloading) after every generation, as diffusers does.
        self.maybe_free_model_hooks()

        if not return_dict:
            return (video,)
        return TinyShapesPipelineOutput(frames=video)


def load_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path is not None else ASSETS_DIR
    with open(path / CONFIG_NAME, encoding="utf-8") as f:
        return json.load(f)


def load_pipeline(
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    path: str | os.PathLike | None = None,
) -> TinyShapesPipeline:
    """Build the pipeline from the shipped weights; everything is local, nothing touches the network."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else ASSETS_DIR
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"Tiny Shapes weights not found in {path}; run `python -m bwcache.tiny.train` to create them"
        )
    config = load_config(path)
    transformer = build_transformer(config["transformer"])
    text_encoder = build_text_encoder(config["text_encoder"])
    transformer.load_state_dict(load_file(str(path / TRANSFORMER_WEIGHTS)))
    text_encoder.load_state_dict(load_file(str(path / TEXT_ENCODER_WEIGHTS)))
    transformer.eval()
    text_encoder.eval()
    pipe = TinyShapesPipeline(transformer, text_encoder, build_scheduler(config["scheduler"]))
    pipe.defaults.update(config.get("defaults", {}))
    pipe.limits.update(config.get("limits", {}))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is not None:
        cast_like_from_pretrained(transformer, dtype)
        text_encoder.to(dtype)
    pipe.to(device=device)
    return pipe


def cast_like_from_pretrained(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast to `dtype` keeping the parameters and buffers the class lists in `_keep_in_fp32_modules` in float32, as
    `from_pretrained(torch_dtype=...)` does (a plain `.to(dtype)` casts them too, and diffusers warns about it)."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        target = torch.float32 if keep.intersection(name.split(".")) else dtype
        if tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)
