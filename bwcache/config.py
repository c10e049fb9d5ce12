"""`BWCacheConfig`: every knob of the cache, each described once (`bwcache.settings`) and checked when the config is
built."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .settings import setting, settings_of

MODES = ("paper", "blockwise", "static")
INDICATOR_FEATURES = ("hidden_states", "modulated")
TAIL_RULES = ("guarded", "official")
CACHE_DTYPES = ("bfloat16", "float16", "int8")


@dataclass
class BWCacheConfig:
    r"""
    Configuration for [BWCache](https://arxiv.org/abs/2509.13789), block-wise caching for video diffusion transformers.

    Args:
        threshold (`float`, defaults to `0.15`):
            δ, compared with the relative-L1 indicator. Higher reuses more (faster, lower fidelity); `0` never reuses
            and leaves the output bit-identical to running without the cache. Allowed: a finite number ≥ 0.
        reuse_interval (`int`, *optional*):
            R. In paper mode, the number of reused steps between two computed steps once reuse has triggered; in
            block-wise mode, the most consecutive steps one block may reuse. `None` means `ceil(T / 10)` for T
            denoising steps (the paper's 10%, at least 1). Allowed: an integer ≥ 1.
        tail_fraction (`float`, defaults to `0.5`):
            Paper mode: after a trigger at step k, the last `max(1, floor(k · tail_fraction))` steps are always
            computed (see `tail_rule`). Allowed: 0 to 1.
        paper_tail_steps (`int`, *optional*):
            Paper mode: an absolute number of last steps always computed after a trigger, instead of
            `floor(k · tail_fraction)` (the official code's `last_step ≥ 1`). Allowed: an integer ≥ 1.
        tail_rule (`str`, defaults to `"guarded"`):
            Paper mode, how a tail of n steps is applied. `"guarded"`: the last max(1, n) steps are computed.
            `"official"`: exactly the official code's `cal_list[-n:] = 1`, including its edge case: when n is 0
            (k = 1 at tail_fraction 0.5), `[-0:]` selects the whole list and nothing is ever reused.
        mode (`str`, defaults to `"paper"`):
            `"paper"`: the published method. One indicator per step (mean relative-L1 over the indicator blocks)
            triggers a fixed schedule of R reused steps and one computed step, in which a reused step runs no block.
            `"blockwise"`: each block decides on its own, every step, whether to reuse its cached residual (see
            `bwcache.policies` for the exact rule).
            `"static"`: block-wise mode's schedule without its indicator: between the warm-up and the tail every block
            reuses R steps, then computes one; no distance is measured and δ only matters at `0` (nothing reused).
            The ablation that shows what the indicator adds.
        num_inference_steps (`int`, *optional*):
            T. `None` takes it from the pipeline's `cache_context(..., num_inference_steps=T)`; if the schedule needs
            it and nothing provides it, the first denoising call raises an error. Allowed: an integer ≥ 1.
        indicator_blocks (`"all"`, `"every_other"` or a sequence of block indices, *optional*):
            Blocks whose input feeds the indicator. `None` or `"all"`: every block. `"every_other"`: blocks 0, 2,
            4, … (the paper's ~50% subset for memory-heavy models). Negative indices count from the last block. In
            block-wise mode only these blocks may reuse; the others are always computed.
        indicator_feature (`str`, defaults to `"hidden_states"`):
            What a block's distance is measured on. `"hidden_states"`: the block's hidden-states input (the paper's
            Eq. 5; every block class). `"modulated"`: the AdaLN-modulated input of the block's attention,
            `norm1(x)·(1 + scale_msa) + shift_msa` on Wan, as the official code measures it (paper mode only: it
            exists inside the block, and block-wise mode decides before a block runs; block classes where it is
            known are listed in `bwcache.blocks.MODULATED_INPUTS`).
        indicator_token_stride (`int`, defaults to `1`):
            Measure distances on every n-th token only, which shrinks the stored features n times. Allowed: ≥ 1.
        record_trace (`bool`, defaults to `True`):
            Record every distance and decision in `handle.trace`.
        warmup_steps (`int`, defaults to `2`):
            Block-wise mode: the first steps are always computed. Allowed: ≥ 0.
        tail_steps (`int`, defaults to `1`):
            Block-wise mode: the last steps are always computed. Allowed: ≥ 0.
        accumulate_distance (`bool`, defaults to `False`):
            Block-wise mode: decide on the sum of step-to-step distances since the block was last computed
            (TeaCache-style) instead of the distance to the input it was last computed on.
        extrapolation (`float`, defaults to `0.0`):
            How far a reused residual moves along the line through its last two computed residuals, over the
            scheduler's timesteps: `0` reuses the last residual unchanged (the paper), `1` extrapolates it linearly to
            the reused step, values in between shrink that first-order step (TaylorSeer-style, damped: a full step
            overshoots when the drift curves). Above 0 one more residual is held per block (per branch in paper
            mode); a reuse with fewer than two computed residuals adds the last one unchanged. Allowed: 0 to 1.
        cache_dtype (`str`, *optional*):
            Store cached residuals and indicator features in this dtype. `None` keeps the model's own; on a float32
            model `"bfloat16"` halves the cache's memory, at a rounding error in reused outputs far below the error
            of reuse itself (distances are still summed in float32, and the output keeps the model's dtype). A dtype
            no narrower than the model's is not applied. `"float16"` is more precise but can overflow on models with large
            activations. `"int8"` stores residuals in int8 with a scale per token, about a quarter of float32's
            bytes, and features in bfloat16. Allowed: `None`, `"bfloat16"`, `"float16"`, `"int8"` (or the matching
            `torch.dtype` for the first two).
    """

    threshold: float = setting(
        0.15, "number", "δ (threshold)", "higher = more reuse, faster, lower fidelity",
        low=0.0, form="main", form_high=1.0, step=0.005, widget="slider")
    reuse_interval: int | None = setting(
        None, "integer", "R (reuse interval)", 'at most this many reused steps in a row; "auto": 10% of the steps',
        low=1, optional=True, none_word="auto", form="advanced")
    tail_fraction: float = setting(
        0.5, "number", "Tail fraction", "paper mode: share of the trigger step always computed at the end",
        low=0.0, high=1.0, form="advanced", step=0.05)
    paper_tail_steps: int | None = setting(
        None, "integer", "Paper tail steps", "paper mode: an absolute number of last steps computed after a trigger",
        low=1, optional=True)
    tail_rule: str = setting(
        "guarded", "choice", "Tail rule", "paper mode: how the tail is applied (official: as the official code)",
        choices=TAIL_RULES)
    mode: str = setting(
        "paper", "choice", "Mode",
        "paper: one indicator per step; blockwise: each block decides; static: block-wise mode's schedule without "
        "the indicator", choices=MODES, form="advanced")
    num_inference_steps: int | None = setting(
        None, "integer", "Steps", "the denoising steps (read from the pipeline when unset)",
        low=1, optional=True, preset=False)
    indicator_blocks: str | Sequence[int] | None = setting(
        None, "blocks", "Indicator blocks", 'blocks feeding the indicator: all, "every_other" or indices')
    indicator_feature: str = setting(
        "hidden_states", "choice", "Indicator feature", "what each block's distance is measured on",
        choices=INDICATOR_FEATURES, form="advanced", choice_labels={
            "hidden_states": "hidden-states input (paper Eq. 5)",
            "modulated": "modulated attention input, as the official code measures it (paper mode)"})
    indicator_token_stride: int = setting(
        1, "integer", "Token stride", "measure distances on every n-th token", low=1)
    record_trace: bool = setting(True, "flag", "Record trace", "record every distance and decision", preset=False)
    warmup_steps: int = setting(
        2, "integer", "Warm-up steps", "block-wise and static modes: the first steps always computed",
        low=0, form="advanced")
    tail_steps: int = setting(
        1, "integer", "Tail steps", "block-wise and static modes: the last steps always computed",
        low=0, form="advanced")
    accumulate_distance: bool = setting(
        False, "flag", "Accumulate distance", "block-wise mode: decide on the sum of step-to-step distances")
    extrapolation: float = setting(
        0.0, "number", "Extrapolation",
        "0 to 1. 0: a reused residual is added unchanged; 1: moved along the line through its last two computed ones",
        low=0.0, high=1.0, form="advanced", step=0.05)
    cache_dtype: str | None = setting(
        None, "choice", "Cache dtype",
        "store cached tensors narrower than the model's dtype (int8: residuals in int8 with per-token scales, "
        "features in bfloat16)",
        choices=CACHE_DTYPES, optional=True)

    def __post_init__(self):
        if isinstance(self.cache_dtype, torch.dtype) and self.cache_dtype.is_floating_point:
            self.cache_dtype = str(self.cache_dtype).removeprefix("torch.")
        for described in settings_of(type(self)):
            setattr(self, described.name, described.check(getattr(self, described.name)))
        if self.indicator_feature == "modulated" and self.mode != "paper":
            raise ValueError(
                "indicator_feature='modulated' works in paper mode only: the modulated input exists inside a block, "
                "and block-wise mode decides whether to run a block before it runs. Use mode='paper', or "
                "indicator_feature='hidden_states'."
            )

    def resolved_reuse_interval(self, num_steps: int) -> int:
        """R for a run of `num_steps` steps."""
        if self.reuse_interval is not None:
            return self.reuse_interval
        return max(1, -(-num_steps // 10))

    @classmethod
    def official(
        cls, threshold: float = 0.15, reuse_interval: int = 3, last_step: float = 0.5, **overrides
    ) -> "BWCacheConfig":
        """A config that takes exactly the official code's decisions (hsc113/BWCache, as its ports run it).

        Paper mode on the modulated attention input of every block; R = `reuse_interval` steps whatever T is; after
        a trigger at step k, the tail is `int(k · last_step)` steps when `last_step < 1`, else `int(last_step)`
        steps, applied as `cal_list[-n:] = 1` (so n = 0, e.g. k = 1 at 0.5, means no reuse at all).
        `overrides` set any other field (`record_trace`, `cache_dtype`, `indicator_blocks`, …).
        """
        if isinstance(last_step, bool) or not isinstance(last_step, (int, float)) or not 0 <= last_step < math.inf:
            raise ValueError(f"last_step must be a finite number ≥ 0, got {last_step!r}.")
        tail = {"tail_fraction": float(last_step)} if last_step < 1 else {"paper_tail_steps": int(last_step)}
        values = dict(threshold=threshold, reuse_interval=reuse_interval, mode="paper", indicator_feature="modulated",
                      tail_rule="official", **tail)
        values.update(overrides)
        return cls(**values)

    def resolved_cache_dtype(self) -> torch.dtype | None:
        """The dtype features (and residuals, but with "int8") are stored in: "int8" keeps features in
        bfloat16, precise enough for distances, and residuals in int8 with per-token scales."""
        if self.cache_dtype is None:
            return None
        return torch.bfloat16 if self.cache_dtype == "int8" else getattr(torch, self.cache_dtype)

    def resolve_indicator_blocks(self, num_blocks: int) -> list[int]:
        """The indicator blocks as sorted, non-negative indices into a stack of `num_blocks` blocks."""
        spec = self.indicator_blocks
        if spec is None or spec == "all":
            return list(range(num_blocks))
        if spec == "every_other":
            return list(range(0, num_blocks, 2))
        resolved = set()
        for index in spec:
            if not -num_blocks <= index < num_blocks:
                raise ValueError(
                    f"indicator_blocks holds block {index}, outside the allowed range "
                    f"[{-num_blocks}, {num_blocks - 1}] for this model's {num_blocks} blocks."
                )
            resolved.add(index % num_blocks)
        return sorted(resolved)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if isinstance(self.indicator_blocks, tuple):
            data["indicator_blocks"] = list(self.indicator_blocks)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BWCacheConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown BWCacheConfig field(s) {unknown}; allowed: {sorted(names)}.")
        return cls(**data)


# `BWCacheConfig`'s described settings: what the app, its API, the command line and the presets offer.
CACHE_SETTINGS = settings_of(BWCacheConfig)
