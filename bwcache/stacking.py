"""BWCache and diffusers' own caches refuse to share a transformer, in either order of applying; BWCache refuses a
transformer cache-dit caches."""

from __future__ import annotations

import types

import torch
from diffusers.utils.torch_utils import unwrap_module

# Modules of diffusers' own caches.
DIFFUSERS_CACHE_MODULES = {
    "diffusers.hooks.first_block_cache",
    "diffusers.hooks.mag_cache",
    "diffusers.hooks.taylorseer_cache",
    "diffusers.hooks.sea_cache",
    "diffusers.hooks.pyramid_attention_broadcast",
    "diffusers.hooks.faster_cache",
    "diffusers.hooks.text_kv_cache",
}


def foreign_cache_hooks(module: torch.nn.Module) -> list[str]:
    """`"<hook> on <submodule>"` for every diffusers cache hook on `module` or below it."""
    found = []
    for name, submodule in unwrap_module(module).named_modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook_name, hook in registry.hooks.items():
            if type(hook).__module__ in DIFFUSERS_CACHE_MODULES:
                found.append(f"{hook_name} on {name or 'the transformer'}")
    return found


def refuse_foreign(module: torch.nn.Module, model_name: str) -> None:
    """Raise when `module` already has a diffusers cache, or cache-dit's."""
    if getattr(unwrap_module(module), "_is_cached", False):
        raise ValueError(
            f"This {model_name} is cached by cache-dit; remove it (cache_dit.disable_cache(pipe)) before applying "
            "BWCache: two caches cannot share one transformer."
        )
    if getattr(module, "is_cache_enabled", False):
        raise ValueError(
            f"This {model_name} already has a diffusers cache enabled ({type(module._cache_config).__name__}); "
            "call transformer.disable_cache() before applying BWCache."
        )
    foreign = foreign_cache_hooks(module)
    if foreign:
        raise ValueError(
            f"This {model_name} already has diffusers cache hooks ({', '.join(foreign[:3])}"
            f"{', …' if len(foreign) > 3 else ''}); remove them before applying BWCache."
        )


def refuse_stacked(module: torch.nn.Module) -> None:
    """Raise when a cache was applied on top of BWCache since (diffusers' hooks, or cache-dit)."""
    foreign = foreign_cache_hooks(module)
    if getattr(unwrap_module(module), "_is_cached", False):
        foreign.insert(0, "cache-dit")
    if foreign:
        raise ValueError(
            f"Another cache was applied on top of BWCache ({', '.join(foreign[:3])}); two caches cannot share "
            "one transformer. Remove one of them (bwcache.remove_bwcache(...) or transformer.disable_cache())."
        )


def _refused_enable_cache(module, config) -> None:
    raise ValueError(
        f"BWCache is applied to this {type(unwrap_module(module)).__name__}, so {type(config).__name__} cannot be "
        "enabled on top of it: two caches cannot share one transformer. Call bwcache.remove_bwcache(...) first."
    )


def guard_enable_cache(module: torch.nn.Module) -> None:
    """While BWCache is applied, `module.enable_cache(...)` (diffusers' `CacheMixin`) refuses."""
    if hasattr(module, "enable_cache"):
        # An instance attribute shadows the class's method for this one module only.
        object.__setattr__(module, "enable_cache", types.MethodType(_refused_enable_cache, module))


def release_enable_cache(module: torch.nn.Module) -> None:
    if "enable_cache" in vars(module):
        object.__delattr__(module, "enable_cache")
