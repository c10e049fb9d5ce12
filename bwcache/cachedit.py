"""cache-dit (https://github.com/vipshop/cache-dit) as a peer: its DBCache, alone or with its TaylorSeer calibrator.

cache-dit is optional (`pip install -r requirements-cachedit.txt`, or the `cachedit` extra). Nothing here imports it
until a cache-dit peer is asked for: importing it takes seconds, and the app's default path never needs it.

DBCache runs the first Fn blocks of every transformer call, compares their residual with the last computed step's
(relative L1), and below `residual_diff_threshold` skips the middle blocks, adding the cached residual instead; the
last Bn blocks always run. A skipped block's forward is never called, so the benchmark's FLOP probe sees the saving.
cache-dit counts steps by counting transformer calls, so it is told whether CFG runs as two calls per step (Wan, Tiny
Shapes, with guidance > 1) or as one batched call.

Settings (`DEFAULT_PARAMS`) are cache-dit's own for Wan: its Wan2.2 example and showcase run DBCache F1B0 with 2
warm-up steps, at most 2 cached steps in a row and residual_diff_threshold 0.08 (30–40 steps), with TaylorSeer of
order 2 as the calibrator. Fn is a block count: F1 computes 1 of Wan2.1-1.3B's 30 blocks on a cached step and 1 of
Tiny Shapes' 6; scaling it down to Tiny Shapes would give 0, and DBCache needs at least one computed block to
measure the residual, so it stays 1. Warm-up and the cached-step limits count steps, and Tiny Shapes runs 30 steps
like cache-dit's Wan2.1 example, so they apply as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging

import torch

INSTALL_HINT = "pip install -r requirements-cachedit.txt (or pip install 'bwcache[cachedit]')"

METHODS = {
    "cachedit": "cache-dit DBCache",
    "cachedit-taylorseer": "cache-dit DBCache + TaylorSeer",
}

# cache-dit's settings for Wan; why they stand unscaled on Tiny Shapes' 6 blocks: see the module docstring.
_DBCACHE = {
    "Fn_compute_blocks": 1,
    "Bn_compute_blocks": 0,
    "residual_diff_threshold": 0.08,
    "max_warmup_steps": 2,
    "max_cached_steps": -1,
    "max_continuous_cached_steps": 2,
}
DEFAULT_PARAMS = {
    "cachedit": dict(_DBCACHE),
    "cachedit-taylorseer": {**_DBCACHE, "taylorseer_order": 2},
}

# Set from the pipeline, never by a caller: how CFG runs decides how cache-dit counts steps.
_PIPELINE_FIELDS = ("cache_type", "enable_separate_cfg", "cfg_compute_first", "cfg_diff_compute_separate")

# Attributes cache-dit sets on a pipeline, its class, its transformers and their block lists. disable_cache() leaves
# some behind (the transformer's `forward`, the block lists' stats); `CacheDitRun.remove` puts back what was there.
_ATTRIBUTES = (
    "forward", "__call__", "_original_forward", "_original_call", "_is_cached", "_context_manager", "_context_names",
    "_context_kwargs", "_forward_pattern", "_has_separate_cfg", "_cached_steps", "_residual_diffs",
    "_cfg_cached_steps", "_cfg_residual_diffs", "_accumulated_cached_steps", "_cfg_accumulated_cached_steps",
    "_accumulated_executed_steps", "_accumulated_transformer_executed_steps", "_pruned_steps", "_cfg_pruned_steps",
    "_pruned_blocks", "_cfg_pruned_blocks", "_actual_blocks", "_cfg_actual_blocks", "_pruned_ratio",
    "_cfg_pruned_ratio",
)
_MISSING = object()


def installed() -> bool:
    """Whether cache-dit can be found (without importing it)."""
    try:
        return importlib.util.find_spec("cache_dit") is not None
    except (ImportError, ValueError):
        return False


def not_installed_message(method: str) -> str:
    return f"{METHODS[method]} ({method!r}) needs cache-dit, which is not installed: {INSTALL_HINT}."


def _import():
    if not installed():
        raise ValueError(f"cache-dit is not installed: {INSTALL_HINT}.")
    try:
        import cache_dit
    except ImportError as error:
        raise ImportError(
            f"cache-dit is installed but cannot be imported ({error}); reinstall it: {INSTALL_HINT}."
        ) from error
    return cache_dit


@contextlib.contextmanager
def _quiet():
    """cache-dit logs every enable and disable to stdout at INFO and WARNING; only its errors are kept."""
    loggers = [
        logger for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("cache_dit") and isinstance(logger, logging.Logger)
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _adapter(pipe, inspect_only: bool):
    """cache-dit's BlockAdapter for the pipeline: its own when it knows the pipeline class, the Wan layout for Tiny
    Shapes and subclasses of WanPipeline (which call their Wan transformer the way WanPipeline does), else None.
    `inspect_only` builds it without its side effects (filling names, applying patch functors)."""
    _import()
    from cache_dit import BlockAdapter, BlockAdapterRegister, ForwardPattern
    from diffusers import WanPipeline, WanTransformer3DModel

    with _quiet():
        if BlockAdapterRegister.is_supported(pipe):
            return BlockAdapterRegister.get_adapter(pipe, skip_post_init=inspect_only)
        from .tiny import TinyShapesPipeline

        if not isinstance(pipe, (WanPipeline, TinyShapesPipeline)):
            return None
        experts = [t for t in (pipe.transformer, getattr(pipe, "transformer_2", None)) if t is not None]
        if not all(isinstance(t, WanTransformer3DModel) for t in experts):
            return None
        # Each Wan block takes (hidden_states, encoder_hidden_states, ...) and returns hidden_states: Pattern_2.
        if len(experts) == 1:
            layout = dict(transformer=experts[0], blocks=experts[0].blocks, forward_pattern=ForwardPattern.Pattern_2)
        else:
            layout = dict(transformer=experts, blocks=[t.blocks for t in experts],
                          forward_pattern=[ForwardPattern.Pattern_2] * len(experts))
        return BlockAdapter(pipe=pipe, has_separate_cfg=True, skip_post_init=inspect_only, **layout)


def _flatten(items) -> list:
    if items is None:
        return []
    if isinstance(items, (list, tuple)):
        return [leaf for item in items for leaf in _flatten(item)]
    return [items]


def applicability(pipe) -> str | None:
    """Why cache-dit cannot run on this pipeline, or None."""
    adapter = _adapter(pipe, inspect_only=True)
    if adapter is None:
        return f"cache-dit has no block adapter for {type(pipe).__name__} ({type(pipe.transformer).__name__})."
    if adapter.patch_functor is not None:
        return (
            f"cache-dit rewrites {type(pipe.transformer).__name__}'s forward ({type(adapter.patch_functor).__name__}) "
            "and cannot undo it, so the pipeline would not be left as it was."
        )
    return None


@dataclasses.dataclass
class CacheDitConfig:
    """What `cache_dit.enable_cache` is given: a DBCacheConfig and, for the TaylorSeer variant, its calibrator."""

    cache_config: object
    calibrator_config: object | None


def build_config(method: str, pipe, settings: dict, params: dict | None = None) -> CacheDitConfig:
    _import()
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    params = {**DEFAULT_PARAMS[method], **(params or {})}
    calibrator = None
    if method == "cachedit-taylorseer":
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=params.pop("taylorseer_order"))
    allowed = [f.name for f in dataclasses.fields(DBCacheConfig) if f.name not in _PIPELINE_FIELDS]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"{METHODS[method]}: unknown parameter(s) {unknown}; allowed: {', '.join(allowed)}"
                         + (", taylorseer_order" if method == "cachedit-taylorseer" else "") + ".")
    adapter = _adapter(pipe, inspect_only=True)
    if adapter is None:
        raise ValueError(applicability(pipe))
    fn, bn = params["Fn_compute_blocks"], params["Bn_compute_blocks"]
    for blocks in _flatten(adapter.blocks):
        if not (isinstance(fn, int) and isinstance(bn, int) and fn >= 1 and bn >= 0 and fn + bn < len(blocks)):
            raise ValueError(
                f"{METHODS[method]}: Fn_compute_blocks={fn} and Bn_compute_blocks={bn} must leave at least one of "
                f"the {len(blocks)} blocks to skip, with Fn ≥ 1 (the blocks that measure the change)."
            )
    # cache-dit tells CFG branches apart by the parity of transformer calls: right only where each step makes two.
    separate_cfg = bool(adapter.has_separate_cfg) and settings["guidance_scale"] > 1
    return CacheDitConfig(DBCacheConfig(enable_separate_cfg=separate_cfg, **params), calibrator)


@dataclasses.dataclass
class CacheDitRun:
    """cache-dit enabled on a pipeline: call `remove()` when done."""

    method: str
    pipe: object
    config: CacheDitConfig
    adapter: object
    _saved: list = dataclasses.field(default_factory=list, repr=False)

    def block_lists(self) -> list[torch.nn.ModuleList]:
        return _flatten(self.adapter.blocks)

    def stats(self) -> list[dict]:
        """cache-dit's own record of the last generation, per cached block list: the steps whose middle blocks it
        skipped, for the conditional calls and (with separate CFG) the unconditional ones."""
        return [
            {"blocks": len(blocks), "cached_steps": list(getattr(blocks, "_cached_steps", [])),
             "cfg_cached_steps": list(getattr(blocks, "_cfg_cached_steps", []))}
            for blocks in self.block_lists()
        ]

    def remove(self) -> None:
        cache_dit = _import()
        try:
            with _quiet():
                cache_dit.disable_cache(self.adapter)
        finally:
            # Whatever disable_cache did or failed to do, the saved attributes go back.
            _restore(self._saved)
            self._saved = []


def _targets(pipe, adapter) -> list:
    experts = [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if t is not None]
    return [pipe, type(pipe), *experts, *_flatten(adapter.blocks)]


def _save(objects) -> list:
    return [(obj, {key: vars(obj).get(key, _MISSING) for key in _ATTRIBUTES}) for obj in objects]


def _restore(saved) -> None:
    for obj, before in saved:
        now = vars(obj)
        for key, value in before.items():
            if now.get(key, _MISSING) is value:
                continue
            if isinstance(obj, type):
                if value is _MISSING:
                    delattr(obj, key)
                else:
                    setattr(obj, key, value)
            elif value is _MISSING:
                object.__delattr__(obj, key)
            else:
                object.__setattr__(obj, key, value)


def _foreign_cache(pipe) -> str | None:
    from .apply import get_bwcache_handle
    from .stacking import foreign_cache_hooks

    if getattr(type(pipe), "_is_cached", False) or getattr(pipe, "_context_manager", None) is not None:
        return f"cache-dit is already enabled on a {type(pipe).__name__}; remove it first."
    if get_bwcache_handle(pipe) is not None:
        return "BWCache is applied to this pipeline; remove it before enabling cache-dit."
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if getattr(module, "is_cache_enabled", False) or foreign_cache_hooks(module):
            return (f"The pipeline's {name} has a diffusers cache; call {name}.disable_cache() before enabling "
                    "cache-dit.")
    return None


def enable(method: str, pipe, settings: dict, params: dict | None = None) -> CacheDitRun:
    reason = applicability(pipe) or _foreign_cache(pipe)
    if reason:
        raise ValueError(reason)
    config = build_config(method, pipe, settings, params)
    cache_dit = _import()
    adapter = _adapter(pipe, inspect_only=False)
    saved = _save(_targets(pipe, adapter))
    try:
        with _quiet():
            cache_dit.enable_cache(
                adapter, cache_config=config.cache_config, calibrator_config=config.calibrator_config
            )
    except Exception:
        with _quiet(), contextlib.suppress(Exception):
            cache_dit.disable_cache(adapter)
        _restore(saved)
        raise
    return CacheDitRun(method, pipe, config, adapter, saved)
