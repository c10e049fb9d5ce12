"""The public surface: `apply_bwcache`, `remove_bwcache`, `cached`, and the handle they give."""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from diffusers.hooks.hooks import HookRegistry
from diffusers.utils.torch_utils import unwrap_module

from .blocks import find_blocks, modulated_input
from .clock import PipelineClock, pipeline_experts
from .config import BWCacheConfig
from .hooks import BWCacheBlockHook, BWCacheHook
from .stacking import guard_enable_cache, refuse_foreign, release_enable_cache
from .trace import Trace

_BWCACHE_ROOT_HOOK = "bwcache_root_hook"
_BWCACHE_BLOCK_HOOK = "bwcache_block_hook"
# The names diffusers gives its context-parallel split and gather hooks (`cp_input---blocks.0`, ...).
try:
    from diffusers.hooks.context_parallel import _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE as _CP_INPUT
    from diffusers.hooks.context_parallel import _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE as _CP_OUTPUT
except ImportError:
    _CP_INPUT, _CP_OUTPUT = "cp_input---{}", "cp_output---{}"
_CONTEXT_PARALLEL_HOOKS = (_CP_INPUT.format(""), _CP_OUTPUT.format(""))


class BWCacheHandle:
    """What `apply_bwcache` returns: the trace of the last generation, a summary, reset and removal."""

    def __init__(self, hooks: list[BWCacheHook], trace: Trace):
        self.hooks = hooks
        # The trace of the last generation, shared by every cached transformer.
        self.trace = trace

    @property
    def transformer(self) -> torch.nn.Module:
        """The (first) cached transformer."""
        return self.hooks[0].module

    @property
    def transformers(self) -> dict[str | None, torch.nn.Module]:
        """Every cached transformer, by its component name (`None` when a transformer was given alone)."""
        return {hook.expert: hook.module for hook in self.hooks}

    @property
    def _hook(self) -> BWCacheHook:
        return self.hooks[0]

    @property
    def config(self) -> BWCacheConfig:
        return self.hooks[0].config

    @property
    def block_names(self) -> list[str]:
        return list(self.trace.block_names)

    def summary(self) -> str:
        return self.trace.summary()

    def reset(self) -> None:
        """Forget all cached state and the trace, as before the first generation."""
        for hook in self.hooks:
            hook.start_afresh(hook.module)
        self.trace.clear()
        self.trace.generation = None

    def remove(self) -> None:
        """Remove BWCache from every transformer it was applied to; their forwards are the original again."""
        for hook in self.hooks:
            if _root_hook(hook.module) is hook:
                _detach(hook.module)

    def __enter__(self) -> "BWCacheHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        models = ", ".join(f"{name}={type(unwrap_module(m)).__name__}" if name else type(unwrap_module(m)).__name__
                           for name, m in self.transformers.items())
        return f"BWCacheHandle({models}, {self.config})"


def _targets(transformer_or_pipeline) -> tuple[list[tuple[str | None, torch.nn.Module]], object | None]:
    """The transformers to cache, by component name, and the pipeline when one was given."""
    if isinstance(transformer_or_pipeline, torch.nn.Module):
        return [(None, transformer_or_pipeline)], None
    experts = pipeline_experts(transformer_or_pipeline)
    if not experts:
        raise TypeError(
            f"apply_bwcache expects a transformer (torch.nn.Module) or a pipeline with a .transformer, "
            f"got {type(transformer_or_pipeline).__name__}."
        )
    if len(experts) == 1:
        return [(None, experts[0][1])], transformer_or_pipeline
    return experts, transformer_or_pipeline


def _root_hook(module: torch.nn.Module) -> BWCacheHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(_BWCACHE_ROOT_HOOK) if registry is not None else None


def apply_bwcache(transformer_or_pipeline, config: BWCacheConfig | None = None) -> BWCacheHandle:
    """Enable BWCache on a diffusers pipeline's denoiser(s), or on one video transformer.

    Given a pipeline, every denoiser is cached (`transformer`, and `transformer_2` on Wan2.2's two-expert
    pipelines, each with its own state), and the step count and the start of each generation are read from the
    pipeline's scheduler, so any pipeline works without naming its step count, and a call that ended early (an
    exception, a cancel) never leaks into the next. Given a transformer alone, the step count comes from the
    pipeline's cache context or `config.num_inference_steps`.

    Example:
        ```python
        >>> from bwcache import BWCacheConfig, apply_bwcache
        >>> handle = apply_bwcache(pipe, BWCacheConfig(threshold=0.15))
        >>> video = pipe(prompt, num_inference_steps=30).frames[0]
        >>> print(handle.summary())
        ```
    """
    config = BWCacheConfig() if config is None else config
    if not isinstance(config, BWCacheConfig):
        raise TypeError(f"config must be a BWCacheConfig, got {type(config).__name__}.")
    targets, pipeline = _targets(transformer_or_pipeline)
    modules = [unwrap_module(module) for _, module in targets]
    for module in modules:
        model_name = type(module).__name__
        if _root_hook(module) is not None:
            raise ValueError(
                f"BWCache is already applied to this {model_name}; call bwcache.remove_bwcache(...) first."
            )
        refuse_foreign(module, model_name)
    blocks = [find_blocks(module) for module in modules]
    if len({len(b) for b in blocks}) > 1:
        raise ValueError(
            "BWCache caches a pipeline's experts with one trace, so they must have as many blocks each; got "
            + ", ".join(f"{name}: {len(b)}" for (name, _), b in zip(targets, blocks))
            + ". Apply BWCache to each transformer separately."
        )
    trace = Trace(config, [b.name for b in blocks[0]], type(modules[0]).__name__)
    clock = PipelineClock(pipeline) if pipeline is not None else None
    hooks = []
    try:
        for (expert, _), module, specs in zip(targets, modules, blocks):
            hook = BWCacheHook(config, specs, trace, expert, clock)
            _attach(module, hook)
            hooks.append(hook)
            if clock is not None and expert is not None:
                clock.hooks[expert] = hook
    except Exception:
        for hook in hooks:
            _detach(hook.module)
        raise
    handle = BWCacheHandle(hooks, trace)
    for hook in hooks:
        hook.handle = handle
    return handle


def _attach(module: torch.nn.Module, hook: BWCacheHook) -> None:
    # Where each indicator block's modulated input lives (an error naming the block class, before any hook is on).
    modulated = [(spec, modulated_input(spec)) for spec in hook.blocks
                 if hook.modulated and spec.index in hook.policy.indicator_blocks]
    registry = HookRegistry.check_if_exists_or_initialize(module)
    # Each module's forward as our hook left it: whatever wraps it later (accelerate's offload) is kept on removal.
    hook.installed = []
    try:
        for spec in hook.blocks:
            block_registry = HookRegistry.check_if_exists_or_initialize(spec.module)
            with _outside(block_registry, _CONTEXT_PARALLEL_HOOKS):
                block_registry.register_hook(BWCacheBlockHook(hook, spec), _BWCACHE_BLOCK_HOOK)
            hook.installed.append((spec.module, _BWCACHE_BLOCK_HOOK, spec.module.forward))
        registry.register_hook(hook, _BWCACHE_ROOT_HOOK)
        hook.installed.append((module, _BWCACHE_ROOT_HOOK, module.forward))
    except Exception:
        for block, name, installed in hook.installed:
            _unhook(block, name, installed)
        raise
    finally:
        # A cache_context entered earlier caches the list of child registries; the new block hooks must be seen.
        registry.invalidate_child_registries_cache()
    # Each call is opened and closed by torch's own module hooks: accelerate's offload re-wraps `forward` after
    # every generation, which would drop a wrapper of ours, but leaves these in place.
    hook.torch_hooks = (
        module.register_forward_pre_hook(hook.call_start, with_kwargs=True),
        module.register_forward_hook(hook.call_end, with_kwargs=True, always_call=True),
        *(attention.register_forward_pre_hook(functools.partial(hook.modulated_input, spec), with_kwargs=True)
          for spec, attention in modulated),
    )
    guard_enable_cache(module)


@contextmanager
def _outside(registry: HookRegistry, prefixes: tuple[str, ...]):
    """A hook registered inside the block stays inside the hooks already there whose names start with `prefixes`.

    diffusers' context parallelism shards a block's input in a hook on the block (Wan's `blocks.0`); the cache
    must see the shard, as it does when parallelism is enabled after it. So that hook and every hook above it are
    taken off, outermost first (diffusers unwinds a chain safely only from its top), and put back in their order
    around the new one.
    """
    order = list(registry._hook_order)
    first = next((k for k, name in enumerate(order) if name.startswith(prefixes)), len(order))
    moved = [(name, registry.hooks[name]) for name in order[first:]]
    if moved and hasattr(registry._module_ref, "_old_forward"):
        # Taking the hooks off would drop the wrapper accelerate put around them.
        raise ValueError(
            "Apply BWCache before CPU offloading on a model with context parallelism (or remove the offloading "
            "first): accelerate wraps the blocks around diffusers' context-parallel hooks, which BWCache must sit "
            "inside."
        )
    for name, _ in reversed(moved):
        registry.remove_hook(name, recurse=False)
    try:
        yield
    finally:
        for name, moved_hook in moved:
            registry.register_hook(moved_hook, name)


def _detach(module: torch.nn.Module) -> None:
    registry = module._diffusers_hook
    hook = registry.get_hook(_BWCACHE_ROOT_HOOK)
    hook.state_manager.reset()
    for torch_hook in hook.torch_hooks:
        torch_hook.remove()
    for target, name, installed in reversed(hook.installed):
        _unhook(target, name, installed)
    registry.invalidate_child_registries_cache()
    release_enable_cache(module)


def _unhook(module: torch.nn.Module, name: str, installed) -> None:
    """Remove our diffusers hook from `module`, keeping any wrapper put around it since (accelerate's offload).

    diffusers puts back the forward our hook wrapped, which would drop such a wrapper; instead the wrapper stays,
    and accelerate's is pointed past our hook. (A wrapper of another kind keeps calling our hook's forward, which
    passes every call through once the transformer's hooks are gone.)
    """
    registry = module._diffusers_hook
    outermost = bool(registry._hook_order) and registry._hook_order[-1] == name
    current = module.forward
    registry.remove_hook(name, recurse=False)
    if current is installed or not outermost:
        # Beneath other hooks (context parallelism's), diffusers relinks the chain and the forward stays as is.
        return
    if getattr(module, "_old_forward", None) is installed:
        module._old_forward = module.forward
    module.forward = current


def remove_bwcache(transformer_or_pipeline) -> None:
    """Remove BWCache from a pipeline's denoisers or from one transformer; their forwards are the original again."""
    targets, _ = _targets(transformer_or_pipeline)
    applied = [unwrap_module(module) for _, module in targets if _root_hook(unwrap_module(module)) is not None]
    if not applied:
        names = ", ".join(type(unwrap_module(module)).__name__ for _, module in targets)
        raise ValueError(f"BWCache is not applied to this {names}.")
    for module in applied:
        _detach(module)


def get_bwcache_handle(transformer_or_pipeline) -> BWCacheHandle | None:
    """The handle of the BWCache applied to a pipeline's denoiser or to a transformer, or `None`."""
    targets, _ = _targets(transformer_or_pipeline)
    for _, module in targets:
        hook = _root_hook(unwrap_module(module))
        if hook is not None:
            return hook.handle
    return None


@contextmanager
def cached(transformer_or_pipeline, config: BWCacheConfig | None = None):
    """BWCache applied for the duration of a `with` block, and removed however the block ends.

    ```python
    >>> with bwcache.cached(pipe, BWCacheConfig(threshold=0.15)) as handle:
    ...     video = pipe(prompt).frames[0]
    >>> print(handle.summary())
    ```
    """
    handle = apply_bwcache(transformer_or_pipeline, config)
    try:
        yield handle
    finally:
        handle.remove()
