"""BWCache as diffusers hooks: one stateful hook on the transformer, one hook on every DiT block.

Paper mode (the published method, arXiv 2509.13789):
    * Step 0 is computed. At each computed step s before the trigger, for each indicator block i,
      `distance[s][i] = mean|h(s,i) − h(s−1,i)| / mean|h(s−1,i)|`, h(s,i) being block i's hidden-states input
      (paper Eq. 5), and `indicator[s]` is their mean (Eq. 6–7).
    * Reuse triggers at the first step k ≥ 1 with `indicator[k] < δ`. From k+1 on: R reused steps, one computed
      step, repeating; the last `max(1, floor(k · tail_fraction))` steps are always computed. After the trigger no
      indicator work is done and the stored features are freed.
    * A reused step runs no block: each block returns its input plus the residual cached at the branch's most recent
      computed step. Blocks that hand their output straight to the next block form a chain, and the chain's
      residuals telescope, so one residual per chain (per stream) is kept and added at the chain's first block; the
      other blocks pass their input through. On most models the whole stack is one chain, so a branch keeps a
      single residual, as the official code does.

Block-wise mode (an extension: the decision is made per block and per step):
    Block i, at step s, reuses its own cached residual r_i (output = input + r_i) when all of these hold:
      * i is an indicator block, `warmup_steps ≤ s < T − tail_steps`, and r_i exists;
      * block i has reused fewer than R consecutive steps;
      * d < δ, where d is the relative-L1 distance between block i's input now and its input at the step r_i was
        computed (or, with `accumulate_distance`, the sum of step-to-step distances of its input since then).
    Otherwise the block runs; r_i and its reference input are refreshed if the next step lies in the reuse window,
    and dropped if not. The distance is computed only when the other conditions hold, so the warm-up, the tail and a
    block's forced recompute after R reuses cost no indicator work; at δ = 0 nothing is reused and every distance is
    measured (the full distance map). Each block keeps its own residual and reference input, so this mode needs
    more memory than paper mode.

Memory: a chain's old residual is released before the chain is recomputed, so the peak holds one residual per
chain, not two; in paper mode no residual is kept before the trigger (the next step is computed anyway). With
`cache_dtype`, residuals, features and the input a paper-mode chain holds while it runs are stored narrower than the
model's dtype; reused outputs keep the model's dtype. `trace.held_bytes_peak` records the most the cache held.

CFG: state is kept per cache-context name (`cond`, `uncond`, … as diffusers pipelines set them); a call made with no
context runs in one branch named `default`. The step index comes from the context's `step_index` when the pipeline
provides it, else from counting calls per branch.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager
from diffusers.utils.torch_utils import unwrap_module

from .blocks import BlockSpec, find_blocks
from .config import BWCacheConfig
from .schedule import paper_schedule
from .trace import Trace

_BWCACHE_ROOT_HOOK = "bwcache_root_hook"
_BWCACHE_BLOCK_HOOK = "bwcache_block_hook"
DEFAULT_BRANCH = "default"

# Modules of diffusers' own caches: BWCache refuses to stack on top of them.
_DIFFUSERS_CACHE_MODULES = {
    "diffusers.hooks.first_block_cache",
    "diffusers.hooks.mag_cache",
    "diffusers.hooks.taylorseer_cache",
    "diffusers.hooks.sea_cache",
    "diffusers.hooks.pyramid_attention_broadcast",
    "diffusers.hooks.faster_cache",
    "diffusers.hooks.text_kv_cache",
}


def relative_l1(current: torch.Tensor, previous: torch.Tensor, previous_norm: torch.Tensor | None = None) -> torch.Tensor:
    """`mean|current − previous| / mean|previous|` as a float32 scalar tensor (no host sync).

    Sums accumulate in float32; the difference is the one temporary (its `abs` is taken in place).
    `previous_norm` (`l1_norm(previous)`) saves the second reduction when one reference is compared several times.
    """
    difference = (current - previous).abs_().sum(dtype=torch.float32)
    return difference / (l1_norm(previous) if previous_norm is None else previous_norm)


def l1_norm(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.abs().sum(dtype=torch.float32).clamp_min(1e-12)


def _strided(hidden_states: torch.Tensor, stride: int) -> torch.Tensor:
    """The tokens the distance is measured on (a view)."""
    if stride == 1:
        return hidden_states
    return hidden_states[:, ::stride] if hidden_states.ndim >= 3 else hidden_states[::stride]


def _compact(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in the cache's storage dtype, where that is narrower than its own (else the tensor itself)."""
    if dtype is None or not tensor.is_floating_point() or dtype.itemsize >= tensor.element_size():
        return tensor
    return tensor.to(dtype)


def _stored(features: torch.Tensor, stride: int, dtype: torch.dtype | None) -> torch.Tensor:
    compact = _compact(features, dtype)
    # A strided view is copied, so the stored feature does not keep the whole activation alive.
    return compact.clone() if compact is features and stride > 1 else compact


class BWCacheState(BaseState):
    """Everything one CFG branch remembers between denoising steps."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.step = -1
        self.num_steps: int | None = None
        self.reuse_interval: int | None = None
        self.computed_step = True
        self.need_residuals = False
        # Block-wise mode: whether this step lies between the warm-up and the tail.
        self.reuse_window = False
        # Paper mode.
        self.trigger_step: int | None = None
        self.schedule: list[bool] | None = None
        # Per block: the feature the next distance is measured against.
        self.features: list[torch.Tensor | None] = [None] * self.num_blocks
        self.feature_norms: list[torch.Tensor | None] = [None] * self.num_blocks
        # Per chain (keyed by its first block): cached residuals of both streams.
        self.residuals: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.chain_heads: list[bool] = [True] * self.num_blocks
        self.output_arity: list[int | None] = [None] * self.num_blocks
        # Block-wise mode.
        self.consecutive = [0] * self.num_blocks
        self.accumulated: list[torch.Tensor | float] = [0.0] * self.num_blocks
        self.first_reuse_step: int | None = None
        # Within one forward.
        self.step_distances: dict[int, torch.Tensor] = {}
        self.step_measured: dict[int, torch.Tensor | float] = {}
        self.step_reused: set[int] = set()
        self.chain_start: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        self.last_output: tuple[torch.Tensor, torch.Tensor | None] | None = None


class BWCacheHook(ModelHook):
    """The stateful hook on the transformer: finds the branch and step, and closes each step's bookkeeping."""

    _is_stateful = True

    def __init__(self, config: BWCacheConfig, blocks: list[BlockSpec], model_name: str):
        super().__init__()
        self.config = config
        self.blocks = blocks
        self.indicator_blocks = set(config.resolve_indicator_blocks(len(blocks)))
        self.cache_dtype = config.resolved_cache_dtype()
        self.state_manager = StateManager(BWCacheState, (len(blocks),))
        self.trace = Trace(config, [b.name for b in blocks], model_name)
        self.active: BWCacheState | None = None
        self.active_branch: str | None = None
        # The branches seen since the last reset, by name.
        self.states: dict[str, BWCacheState] = {}
        self._new_generation = True
        self._timestep_index: int | None = None

    def initialize_hook(self, module):
        parameters = list(inspect.signature(unwrap_module(module).__class__.forward).parameters)[1:]
        self._timestep_index = parameters.index("timestep") if "timestep" in parameters else None
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        own_context = self.state_manager._context is None
        if own_context:
            self.state_manager.set_context(CacheContext(DEFAULT_BRANCH))
        try:
            context = self.state_manager.context
            state = self.state_manager.get_state()
            self.states[context.name] = state
            self._begin_step(state, context, args, kwargs)
            self.active, self.active_branch = state, context.name
            try:
                output = self.fn_ref.original_forward(*args, **kwargs)
            finally:
                self.active = self.active_branch = None
            self._end_step(state, context.name)
            return output
        finally:
            if own_context:
                self.state_manager.set_context(None)

    def reset_state(self, module):
        self.state_manager.reset()
        self.states = {}
        # The trace of the finished generation stays readable until the next one starts.
        self._new_generation = True
        return module

    # -- step bookkeeping -------------------------------------------------------------------------------------

    def _begin_step(self, state: BWCacheState, context: CacheContext, args, kwargs) -> None:
        config = self.config
        num_steps = config.num_inference_steps or context.num_inference_steps
        step = context.step_index if context.step_index is not None else state.calls
        restart = state.calls > 0 and (step == 0 or (num_steps is not None and step >= num_steps))
        if restart:
            # A new generation that no pipeline reset announced.
            state.reset()
            step = context.step_index if context.step_index is not None else 0
        if num_steps is None and config.threshold > 0:
            raise ValueError(
                "BWCache needs the number of denoising steps: set BWCacheConfig(num_inference_steps=...) or call "
                "the transformer inside transformer.cache_context(name, num_inference_steps=...)."
            )
        if num_steps is not None and not 0 <= step < num_steps:
            raise ValueError(f"Step index {step} is outside 0..{num_steps - 1} (num_inference_steps={num_steps}).")

        if config.record_trace and (self._new_generation or (step == 0 and context.name in self.trace.branches)):
            self.trace.clear()
        self._new_generation = False

        state.calls += 1
        state.step = step
        state.num_steps = num_steps
        state.reuse_interval = config.resolved_reuse_interval(num_steps) if num_steps else None
        state.step_distances = {}
        state.step_measured = {}
        state.step_reused = set()
        state.chain_start = None
        state.last_output = None

        if config.mode == "paper":
            state.computed_step = state.schedule is None or state.schedule[step]
            if state.computed_step:
                state.need_residuals = self._paper_needs_residuals(state)
                if not state.need_residuals:
                    state.residuals = {}
            elif not state.residuals:
                raise RuntimeError(f"BWCache has no cached residual to reuse at step {step}.")
        else:
            # A residual (and the input it is measured against) is worth keeping only if the next step may reuse it.
            state.reuse_window = num_steps is not None and config.warmup_steps <= step < num_steps - config.tail_steps
            state.need_residuals = (
                config.threshold > 0
                and num_steps is not None
                and config.warmup_steps <= step + 1 < num_steps - config.tail_steps
            )

        if config.record_trace:
            branch = self.trace.branch(context.name)
            branch.ensure_step(step)
            branch.timesteps[step] = self._timestep(context, args, kwargs)

    def _paper_needs_residuals(self, state: BWCacheState) -> bool:
        """Whether a later step of this branch may reuse what this computed step produces."""
        if self.config.threshold == 0:
            return False
        T, step = state.num_steps, state.step
        schedule = state.schedule
        if schedule is None:
            # A trigger at this very step would start the schedule from here.
            schedule = paper_schedule(step, T, state.reuse_interval, self.config.tail_fraction) if step >= 1 else None
            if schedule is None:
                return False
        return not all(schedule[step + 1 :])

    def _end_step(self, state: BWCacheState, branch_name: str) -> None:
        config = self.config
        step = state.step

        distances = {}
        measured = {}
        pending = list(state.step_distances.values()) + list(state.step_measured.values())
        if pending:
            # One host sync per step for all distances.
            device = next((v.device for v in pending if isinstance(v, torch.Tensor)), None)
            values = torch.stack(
                [torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in pending]
            ).tolist()
            distances = dict(zip(state.step_distances, values[: len(state.step_distances)]))
            measured = dict(zip(state.step_measured, values[len(state.step_distances) :]))
        state.step_distances = {}
        state.step_measured = {}

        if config.mode == "paper":
            # Mean over the indicator blocks that ran this step (a forward may leave some blocks out).
            values = [distances[i] for i in self.indicator_blocks if i in distances]
            indicator = sum(values) / len(values) if values else None
            if state.computed_step and state.schedule is None and indicator is not None and step >= 1:
                if indicator < config.threshold:
                    state.trigger_step = step
                    state.schedule = paper_schedule(step, state.num_steps, state.reuse_interval, config.tail_fraction)
                    # No indicator work after the trigger: the stored features are no longer needed.
                    state.features = [None] * len(self.blocks)
            if state.computed_step and state.schedule is None:
                # No trigger: the next step is computed, so this step's residual would never be read.
                state.chain_start = None
                state.residuals = {}
            reused_blocks = set() if state.computed_step else set(range(len(self.blocks)))
            trigger = state.trigger_step
        else:
            values = {**distances, **measured}
            indicator = sum(values.values()) / len(values) if values else None
            reused_blocks = state.step_reused
            if reused_blocks and state.first_reuse_step is None:
                state.first_reuse_step = step
            trigger = state.first_reuse_step
        self._close_chain(state)
        state.last_output = None

        if config.record_trace:
            self.trace.held_bytes_peak = max(self.trace.held_bytes_peak, self._held_bytes())
            branch = self.trace.branch(branch_name)
            branch.indicator[step] = indicator
            for i, value in distances.items():
                branch.distance[step][i] = value
            for i in reused_blocks:
                branch.reused[step][i] = True
            branch.trigger_step = trigger

    def _held_bytes(self) -> int:
        """Bytes of the residuals and features every branch holds now (each storage counted once)."""
        storages = {}
        for state in self.states.values():
            held = [t for pair in state.residuals.values() for t in pair] + state.features
            for tensor in held:
                if tensor is not None:
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def _timestep(self, context: CacheContext, args, kwargs) -> float | None:
        value = context.timestep
        if value is None:
            value = kwargs.get("timestep")
            if value is None and self._timestep_index is not None and self._timestep_index < len(args):
                value = args[self._timestep_index]
        if isinstance(value, torch.Tensor):
            return float(value.detach().flatten()[0]) if value.numel() else None
        return float(value) if isinstance(value, (int, float)) else None

    # -- blocks -----------------------------------------------------------------------------------------------

    def run_block(self, spec: BlockSpec, state: BWCacheState, forward, args, kwargs):
        hidden_states, encoder_hidden_states = _block_inputs(spec, args, kwargs)
        if self.config.mode == "paper":
            return self._paper_block(spec, state, forward, args, kwargs, hidden_states, encoder_hidden_states)
        return self._blockwise_block(spec, state, forward, args, kwargs, hidden_states, encoder_hidden_states)

    def _paper_block(self, spec, state, forward, args, kwargs, hidden_states, encoder_hidden_states):
        i = spec.index
        if not state.computed_step:
            chained = self._is_chained(spec, state, hidden_states, encoder_hidden_states)
            if chained != (not state.chain_heads[i]):
                raise RuntimeError(
                    f"Block {spec.name} is fed differently than at the last computed step; BWCache cannot reuse it."
                )
            if state.chain_heads[i]:
                residual_hs, residual_ehs = state.residuals[i]
                hidden_states = hidden_states + residual_hs
                if residual_ehs is not None:
                    encoder_hidden_states = encoder_hidden_states + residual_ehs
            state.last_output = (hidden_states, encoder_hidden_states)
            return _pack(spec, state.output_arity[i], hidden_states, encoder_hidden_states)

        if state.schedule is None and i in self.indicator_blocks:
            features = _strided(hidden_states, self.config.indicator_token_stride)
            previous = state.features[i]
            if previous is not None:
                state.step_distances[i] = relative_l1(features, previous)
            state.features[i] = _stored(features, self.config.indicator_token_stride, self.cache_dtype)
        return self._compute_block(spec, state, forward, args, kwargs, hidden_states, encoder_hidden_states)

    def _blockwise_block(self, spec, state, forward, args, kwargs, hidden_states, encoder_hidden_states):
        config, i = self.config, spec.index
        if i not in self.indicator_blocks:
            return self._compute_block(
                spec, state, forward, args, kwargs, hidden_states, encoder_hidden_states, keep_residual=False
            )

        stride = config.indicator_token_stride
        may_reuse = (
            state.reuse_window and i in state.residuals and state.consecutive[i] < state.reuse_interval
        )
        # The distance is measured only where it decides (at threshold 0, everywhere: the full distance map).
        observe = config.threshold == 0
        features = None
        if state.features[i] is not None and (may_reuse or observe):
            features = _strided(hidden_states, stride)
            if state.feature_norms[i] is None:
                state.feature_norms[i] = l1_norm(state.features[i])
            distance = relative_l1(features, state.features[i], state.feature_norms[i])
            if config.accumulate_distance:
                distance = state.accumulated[i] + distance
            if may_reuse and _below(distance, config.threshold):
                state.step_measured[i] = distance
                state.step_reused.add(i)
                state.consecutive[i] += 1
                if config.accumulate_distance:
                    state.accumulated[i] = distance
                    self._keep_features(state, i, features)
                residual_hs, residual_ehs = state.residuals[i]
                hidden_states = hidden_states + residual_hs
                if residual_ehs is not None:
                    encoder_hidden_states = encoder_hidden_states + residual_ehs
                return _pack(spec, state.output_arity[i], hidden_states, encoder_hidden_states)
            state.step_distances[i] = distance

        if state.need_residuals or observe:
            self._keep_features(state, i, _strided(hidden_states, stride) if features is None else features)
        else:
            # No later step can reuse this block.
            state.features[i] = state.feature_norms[i] = None
            state.residuals.pop(i, None)
        state.consecutive[i] = 0
        state.accumulated[i] = 0.0
        # Each block is its own chain here: its residual is its own.
        state.chain_heads[i] = True
        state.last_output = None
        return self._compute_block(spec, state, forward, args, kwargs, hidden_states, encoder_hidden_states)

    def _keep_features(self, state: BWCacheState, i: int, features: torch.Tensor) -> None:
        state.features[i] = _stored(features, self.config.indicator_token_stride, self.cache_dtype)
        state.feature_norms[i] = None

    def _compute_block(
        self, spec, state, forward, args, kwargs, hidden_states, encoder_hidden_states, keep_residual=True
    ):
        i = spec.index
        keep_residual = keep_residual and state.need_residuals
        if keep_residual:
            chained = self.config.mode == "paper" and self._is_chained(spec, state, hidden_states, encoder_hidden_states)
            if not chained:
                self._close_chain(state)
                # The chain is recomputed now: its old residual is stale, and freeing it first lowers the peak.
                state.residuals.pop(i, None)
                start_hs = hidden_states
                if self.config.mode == "paper":
                    # The chain's input is held while the chain runs; a compact copy lets the model free its own.
                    # (The text stream's is kept as is: whether a chain changed it is told by identity.)
                    start_hs = _compact(hidden_states, self.cache_dtype)
                state.chain_start = (i, start_hs, encoder_hidden_states if spec.has_encoder_stream else None)
            state.chain_heads[i] = not chained
        output = forward(*args, **kwargs)
        state.output_arity[i] = len(output) if isinstance(output, (tuple, list)) else None
        state.last_output = _block_outputs(spec, output)
        if keep_residual and self.config.mode == "blockwise":
            self._close_chain(state)
        return output

    def _is_chained(self, spec, state, hidden_states, encoder_hidden_states) -> bool:
        """Whether this block is fed exactly what the block before it returned (same objects, both streams)."""
        if state.last_output is None:
            return False
        last_hs, last_ehs = state.last_output
        if hidden_states is not last_hs:
            return False
        if spec.has_encoder_stream:
            return encoder_hidden_states is last_ehs
        return True

    def _close_chain(self, state: BWCacheState) -> None:
        """Turn the open chain's input and the last block's output into the chain's cached residual."""
        if state.chain_start is None or state.last_output is None:
            state.chain_start = None
            return
        head, start_hs, start_ehs = state.chain_start
        last_hs, last_ehs = state.last_output
        state.residuals.pop(head, None)
        residual_ehs = None
        if start_ehs is not None and last_ehs is not None and last_ehs is not start_ehs:
            residual_ehs = _compact(last_ehs - start_ehs, self.cache_dtype)
        state.residuals[head] = (_compact(last_hs - start_hs, self.cache_dtype), residual_ehs)
        state.chain_start = None


class BWCacheBlockHook(ModelHook):
    """The hook on one DiT block: hands the call to the transformer hook's decision logic."""

    def __init__(self, root: BWCacheHook, spec: BlockSpec):
        super().__init__()
        self.root = root
        self.spec = spec

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.root.active
        if state is None:
            # Called outside the transformer's forward: nothing to cache against.
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.root.run_block(self.spec, state, self.fn_ref.original_forward, args, kwargs)


def _below(distance, threshold: float) -> bool:
    return float(distance) < threshold


def _block_inputs(spec: BlockSpec, args, kwargs):
    metadata = spec.metadata
    hidden_states = metadata._get_parameter_from_args_kwargs(metadata.hidden_states_argument_name, args, kwargs)
    encoder_hidden_states = None
    if spec.has_encoder_stream:
        try:
            encoder_hidden_states = metadata._get_parameter_from_args_kwargs(
                metadata.encoder_hidden_states_argument_name, args, kwargs
            )
        except ValueError:
            encoder_hidden_states = None
    return hidden_states, encoder_hidden_states


def _block_outputs(spec: BlockSpec, output):
    if not isinstance(output, (tuple, list)):
        return output, None
    metadata = spec.metadata
    encoder_hidden_states = None
    if metadata.return_encoder_hidden_states_index is not None:
        encoder_hidden_states = output[metadata.return_encoder_hidden_states_index]
    return output[metadata.return_hidden_states_index], encoder_hidden_states


def _pack(spec: BlockSpec, arity: int | None, hidden_states, encoder_hidden_states):
    """A block output of the same structure the block itself returns."""
    if arity is None:
        return hidden_states
    output = [None] * arity
    output[spec.metadata.return_hidden_states_index] = hidden_states
    if spec.metadata.return_encoder_hidden_states_index is not None:
        output[spec.metadata.return_encoder_hidden_states_index] = encoder_hidden_states
    return tuple(output)


class BWCacheHandle:
    """What `apply_bwcache` returns: the trace of the last generation, a summary, reset and removal."""

    def __init__(self, transformer: torch.nn.Module, hook: BWCacheHook):
        self.transformer = transformer
        self._hook = hook

    @property
    def config(self) -> BWCacheConfig:
        return self._hook.config

    @property
    def trace(self) -> Trace:
        return self._hook.trace

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self._hook.blocks]

    def summary(self) -> str:
        return self.trace.summary()

    def reset(self) -> None:
        """Forget all cached state and the trace, as before the first generation."""
        self._hook.reset_state(self.transformer)
        self.trace.clear()

    def remove(self) -> None:
        remove_bwcache(self.transformer)

    def __repr__(self) -> str:
        return f"BWCacheHandle({type(unwrap_module(self.transformer)).__name__}, {self.config})"


def _resolve_transformer(transformer_or_pipeline) -> torch.nn.Module:
    if isinstance(transformer_or_pipeline, torch.nn.Module):
        return transformer_or_pipeline
    transformer = getattr(transformer_or_pipeline, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return transformer
    raise TypeError(
        f"apply_bwcache expects a transformer (torch.nn.Module) or a pipeline with a .transformer, "
        f"got {type(transformer_or_pipeline).__name__}."
    )


def _foreign_cache_hooks(module: torch.nn.Module) -> list[str]:
    found = []
    for name, submodule in unwrap_module(module).named_modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook_name, hook in registry.hooks.items():
            if type(hook).__module__ in _DIFFUSERS_CACHE_MODULES:
                found.append(f"{hook_name} on {name or 'the transformer'}")
    return found


def apply_bwcache(transformer: torch.nn.Module, config: BWCacheConfig | None = None) -> BWCacheHandle:
    """Enable BWCache on a diffusers video transformer (or a pipeline's `.transformer`).

    Example:
        ```python
        >>> from bwcache import BWCacheConfig, apply_bwcache
        >>> handle = apply_bwcache(pipe.transformer, BWCacheConfig(threshold=0.15))
        >>> video = pipe(prompt, num_inference_steps=30).frames[0]
        >>> print(handle.summary())
        ```
    """
    transformer = _resolve_transformer(transformer)
    config = BWCacheConfig() if config is None else config
    if not isinstance(config, BWCacheConfig):
        raise TypeError(f"config must be a BWCacheConfig, got {type(config).__name__}.")
    model_name = type(unwrap_module(transformer)).__name__
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(_BWCACHE_ROOT_HOOK) is not None:
        raise ValueError(
            f"BWCache is already applied to this {model_name}; call bwcache.remove_bwcache(transformer) first."
        )
    if getattr(transformer, "is_cache_enabled", False):
        raise ValueError(
            f"This {model_name} already has a diffusers cache enabled ({type(transformer._cache_config).__name__}); "
            "call transformer.disable_cache() before applying BWCache."
        )
    foreign = _foreign_cache_hooks(transformer)
    if foreign:
        raise ValueError(
            f"This {model_name} already has diffusers cache hooks ({', '.join(foreign[:3])}"
            f"{', …' if len(foreign) > 3 else ''}); remove them before applying BWCache."
        )

    blocks = find_blocks(transformer)
    hook = BWCacheHook(config, blocks, model_name)
    hooked = []
    try:
        for spec in blocks:
            HookRegistry.check_if_exists_or_initialize(spec.module).register_hook(
                BWCacheBlockHook(hook, spec), _BWCACHE_BLOCK_HOOK
            )
            hooked.append(spec.module)
        registry.register_hook(hook, _BWCACHE_ROOT_HOOK)
    except Exception:
        for module in hooked:
            module._diffusers_hook.remove_hook(_BWCACHE_BLOCK_HOOK, recurse=False)
        raise
    finally:
        # A cache_context entered earlier caches the list of child registries; the new block hooks must be seen.
        registry.invalidate_child_registries_cache()
    return BWCacheHandle(transformer, hook)


def remove_bwcache(transformer: torch.nn.Module) -> None:
    """Remove BWCache from a transformer (or a pipeline's `.transformer`); its forward is the original again."""
    transformer = _resolve_transformer(transformer)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is None or registry.get_hook(_BWCACHE_ROOT_HOOK) is None:
        raise ValueError(f"BWCache is not applied to this {type(unwrap_module(transformer)).__name__}.")
    registry.get_hook(_BWCACHE_ROOT_HOOK).state_manager.reset()
    registry.remove_hook(_BWCACHE_ROOT_HOOK, recurse=False)
    registry.remove_hook(_BWCACHE_BLOCK_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


def get_bwcache_handle(transformer: torch.nn.Module) -> BWCacheHandle | None:
    """The handle of the BWCache applied to `transformer`, or `None`."""
    transformer = _resolve_transformer(transformer)
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(_BWCACHE_ROOT_HOOK) if registry is not None else None
    return BWCacheHandle(transformer, hook) if hook is not None else None
