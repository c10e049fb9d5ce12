"""What a run needs in memory, from shapes alone (no weights loaded): the weights by component and dtype, the
cache's peak broken down into features and residuals per branch, the distance-map run's, and whether it all fits.

The cache figures are what a run holds between transformer calls (`trace.held_bytes_peak`), worked out from the
rules the policies and hooks follow:

* block-wise and static modes: each indicator block keeps, per branch, its reference feature (every n-th token, in
  the storage dtype; static mode keeps none) and its residual (a second one when extrapolating; the text stream's too
  for blocks that return it), all at once through the reuse window;
* paper mode: before its trigger, every indicator block's feature; from it on, one residual per chain of blocks
  that feed each other (the whole stack on most models; every block on Latte, whose layout reshapes between
  blocks). When extrapolating, the residuals (two from step 2) are kept before the trigger too, beside the features.
  The peak is reached by a trigger at step 3 or later;
* the distance-map run (threshold 0): every indicator block's feature, per branch, and no residual.

Features and residuals are stored in the smaller of the model's dtype and `cache_dtype` (with "int8", residuals
take a byte per element and a bfloat16 scale per token, features bfloat16). Wan2.2's experts take
turns (the first frees its state when the second starts), so their peaks do not add up. The rest is estimated:
activations of the denoising step (the largest token-by-width tensors of a block: 4 of the hidden width and 2 of the
FFN's, calibrated on a full-size Wan2.1-1.3B step, which held 0.70 GB at 14,040 tokens) and the weights resident on
the GPU (all components; with model CPU offload only the transformer in use). The VAE's decoding comes after the
cache is freed, and is not counted.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .blocks import INTERLEAVED_LAYOUTS, find_blocks
from .config import BWCacheConfig
from .presets import Preset, _thaw
from .trace import format_bytes

GB = 1e9
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# The activation model's coefficients (see the module docstring).
ACTIVATION_WIDTHS = (4, 2)


@dataclass(frozen=True)
class Shape:
    """A transformer's shape as the cache sees it, and its pipeline's layout of tokens and CFG branches."""

    num_blocks: int
    hidden_size: int
    ffn_size: int
    # Blocks that also return the text stream (their residuals have a text part) and its length.
    text_stream_blocks: frozenset[int]
    text_tokens: int
    # Chains of blocks that feed each other directly: paper mode keeps one residual per chain.
    chains: int
    patch: tuple[int, int, int]
    # How the pipeline turns frames and pixels into latents: (temporal, spatial) compression.
    compression: tuple[int, int]
    # "separate": cond and uncond calls (two branches, batch 1); "batched": one call with both; "none": one pass.
    cfg: str
    dtype: str
    experts: int = 1

    def tokens(self, num_frames: int, height: int, width: int) -> int:
        t, s = self.compression
        pt, ph, pw = self.patch
        latent_frames = (num_frames - 1) // t + 1
        return (latent_frames // pt) * (height // s // ph) * (width // s // pw)

    def branches(self, guidance_scale: float) -> tuple[int, int]:
        """(branches, batch per call) for a guidance scale."""
        if self.cfg == "none" or guidance_scale <= 1.0:
            return 1, 1
        return (2, 1) if self.cfg == "separate" else (1, 2)


def shape_of(transformer: torch.nn.Module, *, text_tokens: int, compression: tuple[int, int], cfg: str,
             dtype: str, experts: int = 1) -> Shape:
    """The shape of a built transformer (on the meta device is enough)."""
    specs = find_blocks(transformer)
    config = transformer.config
    patch = getattr(config, "patch_size", 1)
    if isinstance(patch, (list, tuple)):
        patch = tuple(patch)
    else:
        patch = (getattr(config, "patch_size_t", None) or 1, patch, patch)
    heads = getattr(config, "num_attention_heads")
    hidden = heads * getattr(config, "attention_head_dim")
    ffn = getattr(config, "ffn_dim", None) or int(hidden * getattr(config, "mlp_ratio", 4.0))
    interleaved = type(transformer).__name__ in INTERLEAVED_LAYOUTS
    return Shape(
        num_blocks=len(specs), hidden_size=hidden, ffn_size=ffn,
        text_stream_blocks=frozenset(spec.index for spec in specs if spec.has_encoder_stream),
        text_tokens=text_tokens, chains=len(specs) if interleaved else 1, patch=patch, compression=compression,
        cfg=cfg, dtype=dtype, experts=experts,
    )


@dataclass
class CachePeak:
    """What the cache holds at most, per branch, and in all."""

    features: int = 0
    residuals: int = 0
    previous_residuals: int = 0
    branches: int = 1

    @property
    def per_branch(self) -> int:
        return self.features + self.residuals + self.previous_residuals

    @property
    def total(self) -> int:
        return self.per_branch * self.branches

    def to_dict(self) -> dict:
        return {"features_per_branch": self.features, "residuals_per_branch": self.residuals,
                "previous_residuals_per_branch": self.previous_residuals, "branches": self.branches,
                "bytes": self.total}


def storage_bytes(shape: Shape, config: BWCacheConfig) -> int:
    """Bytes per element of the features the cache stores: the model's dtype, or `cache_dtype` where narrower
    ("int8" keeps features in bfloat16)."""
    own = DTYPE_BYTES[shape.dtype]
    stored = config.resolved_cache_dtype()
    return min(own, stored.itemsize) if stored is not None else own


def residual_bytes(shape: Shape, config: BWCacheConfig, vectors: int) -> int:
    """Bytes of a residual of `vectors` token vectors: int8 with a bfloat16 scale per token, or as features are."""
    if config.cache_dtype == "int8":
        return vectors * (shape.hidden_size + 2)
    return vectors * shape.hidden_size * storage_bytes(shape, config)


def cache_peak(shape: Shape, config: BWCacheConfig, tokens: int, guidance_scale: float) -> CachePeak:
    """The most a run with `config` holds between transformer calls (see the module docstring)."""
    branches, batch = shape.branches(guidance_scale)
    element = storage_bytes(shape, config)
    blocks = config.resolve_indicator_blocks(shape.num_blocks)
    stride = config.indicator_token_stride
    feature = batch * math.ceil(tokens / stride) * shape.hidden_size * element
    image = residual_bytes(shape, config, batch * tokens)
    text = residual_bytes(shape, config, batch * shape.text_tokens)

    def residual(block_or_chain_blocks) -> int:
        return image + (text if block_or_chain_blocks & shape.text_stream_blocks else 0)

    peak = CachePeak(branches=branches)
    if config.threshold == 0:
        # Nothing reused: the distance map's features alone (static mode measures nothing).
        peak.features = 0 if config.mode == "static" else feature * len(blocks)
        return peak
    extra = 1 if config.extrapolation > 0 else 0
    if config.mode == "paper":
        residuals = sum(residual(chain) for chain in _chains(shape))
        features = feature * len(blocks)
        if extra:
            # A residual is kept from step 1 on as the older point of an extrapolation: with the features until
            # the trigger (two of them from step 2), then without.
            peak.features, peak.residuals, peak.previous_residuals = features, residuals, residuals
        elif features >= residuals:
            # Until the trigger a step's residual is not kept (the next step is computed); after it, no feature.
            peak.features = features
        else:
            peak.residuals = residuals
        return peak
    peak.features = 0 if config.mode == "static" else feature * len(blocks)
    peak.residuals = sum(residual({i}) for i in blocks)
    peak.previous_residuals = extra * peak.residuals
    return peak


def _chains(shape: Shape) -> list[set[int]]:
    if shape.chains == shape.num_blocks:
        return [{i} for i in range(shape.num_blocks)]
    return [set(range(shape.num_blocks))]


def activation_bytes(shape: Shape, tokens: int, guidance_scale: float) -> int:
    """An estimate of the denoising step's own activations (see the module docstring)."""
    _, batch = shape.branches(guidance_scale)
    wide, ffn = ACTIVATION_WIDTHS
    return batch * (tokens + shape.text_tokens) * (wide * shape.hidden_size + ffn * shape.ffn_size) * \
        DTYPE_BYTES[shape.dtype]


# ----------------------------------------------------------------------------- presets


@functools.lru_cache(maxsize=32)
def _meta_transformer(class_name: str, config_json: str):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, class_name)(**json.loads(config_json))


def transformer_weight_bytes(transformer: torch.nn.Module, dtype: str) -> int:
    """Bytes of a transformer's weights loaded in `dtype`, the modules its class keeps in float32 counted so."""
    keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    total = 0
    for name, parameter in transformer.named_parameters():
        size = 4 if keep & set(name.split(".")) else DTYPE_BYTES[dtype]
        total += parameter.numel() * size
    return total


def preset_shape(preset: Preset) -> tuple[Shape, dict[str, dict]]:
    """The preset's transformer shape and its weights by component: {name: {parameters, dtype, bytes}}."""
    if preset.kind == "tiny":
        return _tiny_shape(preset)
    model = preset.model
    if not model:
        raise ValueError(f"{preset.label}'s preset describes no model shape (its 'model' section); no memory plan.")
    dtypes = {**{"default": preset.dtype}, **(preset.loading.get("component_dtypes") or {})}
    transformer = _meta_transformer(model["transformer_class"], json.dumps(_thaw(model["transformer"]), sort_keys=True))
    dtype = dtypes.get("transformer", dtypes["default"])
    shape = shape_of(transformer, text_tokens=model["text_tokens"], compression=tuple(model["vae_compression"]),
                     cfg=model["cfg"], dtype=dtype, experts=model.get("experts", 1))
    weights = {}
    parameters = sum(p.numel() for p in transformer.parameters())
    for index in range(shape.experts):
        name = "transformer" if index == 0 else f"transformer_{index + 1}"
        weights[name] = {"parameters": parameters, "dtype": dtype,
                         "bytes": transformer_weight_bytes(transformer, dtype)}
    for name, count in model.get("components", {}).items():
        component_dtype = dtypes.get(name, dtypes["default"])
        weights[name] = {"parameters": int(count), "dtype": component_dtype,
                         "bytes": int(count) * DTYPE_BYTES[component_dtype]}
    return shape, weights


def _tiny_shape(preset: Preset) -> tuple[Shape, dict[str, dict]]:
    from .tiny.pipeline import build_transformer, load_config

    config = load_config()
    with torch.device("meta"):
        transformer = build_transformer(config["transformer"])
    shape = shape_of(transformer, text_tokens=config["text_encoder"]["max_length"], compression=(1, 1),
                     cfg="separate", dtype=preset.dtype)
    weights = {"transformer": {"parameters": sum(p.numel() for p in transformer.parameters()), "dtype": preset.dtype,
                               "bytes": transformer_weight_bytes(transformer, preset.dtype)}}
    return shape, weights


@dataclass
class MemoryPlan:
    """A run's memory, from shapes alone; `fits` compares it with the GPU's memory (None on a CPU)."""

    preset: str
    settings: dict
    config: dict
    tokens: int
    weights: dict[str, dict]
    weights_bytes: int
    activation_bytes: int
    cache: CachePeak
    map: CachePeak
    gpu_memory_bytes: int | None
    offload: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def cache_bytes_peak(self) -> int:
        return self.cache.total

    @property
    def map_bytes_peak(self) -> int:
        return self.map.total

    @property
    def total_bytes_peak(self) -> int:
        return self.weights_bytes + self.activation_bytes + max(self.cache_bytes_peak, self.map_bytes_peak)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory_bytes is None else self.total_bytes_peak <= self.gpu_memory_bytes

    def to_dict(self) -> dict:
        return {
            "preset": self.preset, "settings": self.settings, "config": self.config, "tokens": self.tokens,
            "weights": self.weights, "weights_bytes": self.weights_bytes, "offload": self.offload,
            "activation_bytes": self.activation_bytes, "cache": self.cache.to_dict(), "map": self.map.to_dict(),
            "cache_bytes_peak": self.cache_bytes_peak, "map_bytes_peak": self.map_bytes_peak,
            "total_bytes_peak": self.total_bytes_peak, "gpu_memory_bytes": self.gpu_memory_bytes, "fits": self.fits,
        }

    def refusal(self) -> str | None:
        """What to say when the run does not fit: the numbers and what to change (None when it fits)."""
        if self.fits is not False:
            return None
        s = self.settings
        return (
            f"{self.preset} at {s['num_frames']} frames of {s['width']}×{s['height']} needs about "
            f"{format_bytes(self.total_bytes_peak)} on the GPU (weights {format_bytes(self.weights_bytes)}, "
            f"activations about {format_bytes(self.activation_bytes)}, cache {format_bytes(self.cache_bytes_peak)}, "
            f"distance map {format_bytes(self.map_bytes_peak)}), more than the GPU's "
            f"{format_bytes(self.gpu_memory_bytes)}. Use fewer frames or a smaller size, or a leaner cache (every "
            "other indicator block, a larger indicator_token_stride, cache_dtype='int8' for the residuals)."
        )

    def text(self) -> str:
        lines = [f"Memory plan: {self.preset}, {self.settings['num_frames']} frames of "
                 f"{self.settings['width']}×{self.settings['height']} ({self.tokens:,} tokens)"]
        for name, weight in self.weights.items():
            lines.append(f"  {name:<14} {weight['parameters'] / 1e9:6.2f}B parameters in {weight['dtype']:<8} "
                         f"{format_bytes(weight['bytes'])}")
        resident = " (model CPU offload: the transformer in use)" if self.offload else ""
        lines.append(f"  weights on the GPU{resident}: {format_bytes(self.weights_bytes)}")
        lines.append(f"  activations (estimate): {format_bytes(self.activation_bytes)}")
        for label, peak in (("cache", self.cache), ("distance map", self.map)):
            lines.append(f"  {label}: {format_bytes(peak.total)} = {peak.branches} branch(es) × (features "
                         f"{format_bytes(peak.features)} + residuals {format_bytes(peak.residuals)} + previous "
                         f"residuals {format_bytes(peak.previous_residuals)})")
        verdict = "" if self.fits is None else (" — fits" if self.fits else " — does NOT fit")
        gpu = "" if self.gpu_memory_bytes is None else f" of {format_bytes(self.gpu_memory_bytes)}"
        lines.append(f"  total peak: {format_bytes(self.total_bytes_peak)}{gpu}{verdict}")
        return "\n".join(lines)


def plan_memory(preset: Preset | str, config: BWCacheConfig, settings: Mapping[str, Any],
                gpu_memory_gb: float | None = None) -> MemoryPlan:
    """The memory of a comparison run of `preset` (or its name) with `config` at the generation `settings`
    (num_frames, height, width, guidance_scale), against `gpu_memory_gb` (default: the preset's recommended GPU
    memory)."""
    from .policies import distance_map_config
    from .presets import load_preset

    preset = load_preset(preset) if isinstance(preset, str) else preset

    shape, weights = preset_shape(preset)
    tokens = shape.tokens(settings["num_frames"], settings["height"], settings["width"])
    guidance = settings["guidance_scale"]
    offload = preset.loading.get("cpu_offload") == "model"
    transformers = [w["bytes"] for name, w in weights.items() if name.startswith("transformer")]
    resident = max(transformers) if offload else sum(w["bytes"] for w in weights.values())
    gpu = preset.recommended_gpu_memory_gb if gpu_memory_gb is None else gpu_memory_gb
    return MemoryPlan(
        preset=preset.name,
        settings={k: settings[k] for k in ("num_frames", "height", "width", "guidance_scale")},
        config=config.to_dict(), tokens=tokens, weights=weights, weights_bytes=resident,
        activation_bytes=activation_bytes(shape, tokens, guidance),
        cache=cache_peak(shape, config, tokens, guidance),
        map=cache_peak(shape, distance_map_config(config), tokens, guidance),
        gpu_memory_bytes=None if not gpu else int(gpu * GB), offload=offload,
    )


def largest_settings(preset: Preset) -> dict:
    """The preset's largest allowed request: most frames at the largest height and width."""
    limits = preset.limits
    return {**dict(preset.defaults), "num_frames": limits["num_frames"][1], "height": limits["height"][1],
            "width": limits["width"][1]}




# Memory of the GPUs people run on (GB), smallest first: a preset recommends the smallest that holds its runs.
GPU_CLASSES_GB = (8, 12, 16, 24, 32, 40, 48, 80, 96, 141, 192)


def default_plan(preset: Preset, profile: str | None = None, gpu_memory_gb: float | None = None, **changes) -> MemoryPlan:
    """The plan of the preset's default request (with `changes` to its settings) under one of its profiles."""
    from .runner import resolve_config

    settings = {**dict(preset.defaults), **{k: v for k, v in changes.items() if v is not None}}
    config = resolve_config(preset, settings["num_inference_steps"], profile=profile)
    return plan_memory(preset, config, settings, gpu_memory_gb)


def recommended_gpu_memory_gb(preset: Preset) -> int | None:
    """The smallest common GPU that holds the preset's largest allowed run in every profile, so that every request
    the preset allows fits (None for a CPU preset)."""
    if preset.kind == "tiny":
        return None
    largest = largest_settings(preset)
    need = max(default_plan(preset, profile, **largest).total_bytes_peak for profile in preset.profile_names) / GB
    return next((size for size in GPU_CLASSES_GB if size >= need), None)


def device_memory_gb(device: str | torch.device | None) -> float | None:
    """The total memory of a CUDA device (None elsewhere)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / GB


def check_fits(preset: Preset, config: BWCacheConfig, settings: Mapping[str, Any],
               gpu_memory_gb: float | None = None) -> MemoryPlan | None:
    """Refuse, before any model is loaded, a run of a GPU preset that will not fit `gpu_memory_gb` (default: the
    preset's recommended memory): a ValueError with the numbers and what to change. Returns the plan (None for
    the embedded CPU preset or a preset with no model shape)."""
    if preset.kind == "tiny" or not preset.model:
        return None
    plan = plan_memory(preset, config, settings, gpu_memory_gb)
    refusal = plan.refusal()
    if refusal:
        raise ValueError(refusal)
    return plan
