"""How BWCache reuses: diffusers hooks that keep each branch's step, features and residuals (the mechanics).

When to reuse is the policy's business (`bwcache.policies`); this module measures distances, keeps and releases
cached tensors, and rebuilds a reused block's output.

* The transformer carries a stateful hook (`BWCacheHook`) for diffusers' cache contexts and end-of-call reset, and
  a pair of torch forward hooks that open and close each call: they find the branch and the step, and survive
  accelerate's CPU offload, which re-wraps the transformer's forward after every generation.
* Every DiT block carries a `BWCacheBlockHook`. Its decision work runs in `torch.compiler.disable`d methods, so
  under `compile_repeated_blocks()` or `transformer.compile()` the blocks' own forwards are compiled and the cache's
  Python state is never guarded on.

Distances. Block i's feature is its hidden-states input h, or with `indicator_feature="modulated"` the input of its
attention (AdaLN-modulated; taken by a forward pre-hook on the attention module as the block runs, paper mode
only), on every `indicator_token_stride`-th token; its distance is the relative L1
`mean|h(s) − h(ref)| / mean|h(ref)|` to a reference feature: the previous step's in paper mode (paper Eq. 5–7), the
one its residual was computed on in block-wise mode. All of a step's distances reach the
host in one sync at the end of the call, except where block-wise mode must decide on one before running its block.

Several processes. Under diffusers' context parallelism each process sees its shard of the sequence: a distance is
kept as this process's two sums (`|h − ref|` and `|ref|`) until it is needed, the sums are added over the
context-parallel group (`bwcache.parallel`), and every process divides the same numbers, so all take the decisions a
single process would take. The step's recorded distances share one all-reduce at the end of the call; a block-wise
decision, which must come before its block runs, needs its own. Token strides start where the single-process
stride would fall in each shard. Residuals and features stay sharded.

Reuse. A reused block returns its input plus a cached residual (output − input at a computed step). Blocks that
hand their output straight to the next block form a chain whose residuals telescope, so paper mode keeps one
residual per chain (per stream), added at the chain's first block, and the other blocks pass their input through;
on most models the whole stack is one chain, so a branch keeps a single residual, as the official code does.
Block-wise mode keeps one residual per block.

Memory. A chain's old residual is released before the chain is recomputed, so the peak holds one residual per
chain, not two; a residual or reference input is kept only when a later step may read it. With `cache_dtype`,
residuals, features and the input a paper-mode chain holds while it runs are stored narrower than the model's
dtype; reused outputs keep the model's dtype. `trace.held_bytes_peak` records the most the cache held.

Steps. State is kept per cache-context name (`cond`, `uncond`, … as pipelines set them; a call with no context runs
in a branch named `default`). Applied to a pipeline, the step count, the step index and the start of each
generation come from the pipeline's scheduler (`bwcache.clock`). Applied to a transformer alone, they come from
the context's `step_index` and `num_inference_steps`, or `BWCacheConfig.num_inference_steps` and counting calls
per branch, and a call whose timestep is not below its branch's previous one starts a new generation. A call that
raises drops all state: the next call starts afresh.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, ModelHook, StateManager
from diffusers.utils.torch_utils import unwrap_module

from . import parallel
from .blocks import BlockSpec
from .clock import PipelineClock
from .config import BWCacheConfig
from .policies import make_policy
from .stacking import foreign_cache_hooks
from .trace import Trace

DEFAULT_BRANCH = "default"


def l1_norm(tensor: torch.Tensor) -> torch.Tensor:
    """`sum|tensor|` in float32 (a scalar tensor)."""
    return tensor.abs().sum(dtype=torch.float32)


def _difference_sum(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    return (current - previous).abs_().sum(dtype=torch.float32)


def _ratio(difference: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return difference / norm.clamp_min(1e-12)


class _Sums(NamedTuple):
    """A distance not yet divided: this process's sums of |h − ref| and |ref| (added over a context-parallel
    group first), and what the policy adds to the ratio."""

    difference: torch.Tensor
    norm: torch.Tensor
    offset: float = 0.0


def _strided(hidden_states: torch.Tensor, stride: int, offset: int = 0) -> torch.Tensor:
    """The tokens the distance is measured on (a view): every `stride`-th, from `offset`."""
    if stride == 1:
        return hidden_states
    return hidden_states[:, offset::stride] if hidden_states.ndim >= 3 else hidden_states[offset::stride]


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
    """Everything one CFG branch of one transformer remembers between denoising steps."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        # The generation (a count kept by the hook) this branch's state belongs to.
        self.generation = 0
        self.step = -1
        self.num_steps: int | None = None
        self.reuse_interval: int | None = None
        self.last_timestep: float | None = None
        # Decisions (written by the policy).
        self.computed_step = True
        self.need_residuals = False
        self.reuse_window = False
        self.trigger_step: int | None = None
        self.schedule: list[bool] | None = None
        self.consecutive = [0] * self.num_blocks
        self.accumulated: list[torch.Tensor | float] = [0.0] * self.num_blocks
        self.first_reuse_step: int | None = None
        # Per block: the feature the next distance is measured against, and its L1 norm once computed.
        self.features: list[torch.Tensor | None] = [None] * self.num_blocks
        self.feature_norms: list[torch.Tensor | None] = [None] * self.num_blocks
        # Per chain (keyed by its first block): cached residuals of both streams.
        self.residuals: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        # With `extrapolation`: when each residual was computed, and the one computed before it.
        self.residual_times: dict[int, float] = {}
        self.previous_residuals: dict[int, tuple[torch.Tensor | None, torch.Tensor | None, float]] = {}
        self.chain_heads: list[bool] = [True] * self.num_blocks
        self.output_arity: list[int | None] = [None] * self.num_blocks
        # Within one call.
        # Distances not yet divided (`_Sums`) or already decided on (floats), and those of reused blocks.
        self.step_distances: dict[int, "_Sums | float"] = {}
        self.step_measured: dict[int, float] = {}
        self.step_reused: set[int] = set()
        self.chain_start: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        self.last_output: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.keep_residual = False
        # The block whose modulated attention input is to be measured as it runs.
        self.awaiting_feature: int | None = None


class BWCacheHook(ModelHook):
    """The stateful hook on one transformer: branch and step bookkeeping, and the blocks' mechanics."""

    _is_stateful = True

    def __init__(
        self,
        config: BWCacheConfig,
        blocks: list[BlockSpec],
        trace: Trace,
        expert: str | None = None,
        clock: PipelineClock | None = None,
    ):
        super().__init__()
        self.config = config
        self.blocks = blocks
        self.policy = make_policy(config, len(blocks))
        self.cache_dtype = config.resolved_cache_dtype()
        self.modulated = config.indicator_feature == "modulated"
        self.state_manager = StateManager(BWCacheState, (len(blocks),))
        self.trace = trace
        self.expert = expert
        self.clock = clock
        self.module: torch.nn.Module | None = None
        self.active: BWCacheState | None = None
        self.active_branch: str | None = None
        # The branches seen since the last reset, by name.
        self.states: dict[str, BWCacheState] = {}
        # A count of the generations this hook has started (a reset, a restart or a new clock generation).
        self._generation = 0
        self._clock_generation = 0
        self._started: tuple | None = None
        self._own_context = False
        self._timestep_index: int | None = None
        self._hidden_states_index: int | None = None
        # The context-parallel process group distances are summed over during this call (None: one process), and
        # the length of the whole sequence the processes split.
        self.group = None
        self._sequence_length: int | None = None
        # Set by `apply_bwcache`: its handle, torch's hooks around each call, and each module's forward as ours left it.
        self.handle = None
        self.torch_hooks: tuple = ()
        self.installed: list[tuple] = []

    def initialize_hook(self, module):
        self.module = module
        parameters = list(inspect.signature(unwrap_module(module).__class__.forward).parameters)[1:]
        self._timestep_index = parameters.index("timestep") if "timestep" in parameters else None
        self._hidden_states_index = parameters.index("hidden_states") if "hidden_states" in parameters else None
        return module

    def reset_state(self, module):
        self.release()
        self.active = self.active_branch = None
        # The trace of the finished generation stays readable until the next one starts.
        self._generation += 1
        return module

    def release(self) -> None:
        """Drop every branch's state (the cache context in force, if any, stays)."""
        context = self.state_manager._context
        self.state_manager.reset()
        self.state_manager.set_context(context)
        self.states = {}

    # -- one transformer call (torch forward hooks, outside any compiled graph) -------------------------------

    @torch.compiler.disable
    def call_start(self, module, args, kwargs) -> None:
        self.active = self.active_branch = None
        self._own_context = self.state_manager._context is None
        if self._own_context:
            self.state_manager.set_context(CacheContext(DEFAULT_BRANCH))
        try:
            self.group = self._parallel_group(args, kwargs)
            if self.clock is not None:
                self.clock.refresh()
                if self.clock.generation != self._clock_generation:
                    self._clock_generation = self.clock.generation
                    self.reset_state(module)
                self.clock.release_finished(self)
            context = self.state_manager.context
            state = self.state_manager.get_state()
            if state.calls == 0:
                state.generation = self._generation
            self.states[context.name] = state
            self._begin_step(state, context, args, kwargs)
        except BaseException:
            self._leave_context()
            raise
        self.active, self.active_branch = state, context.name

    @torch.compiler.disable
    def call_end(self, module, args, kwargs, output) -> None:
        state, branch = self.active, self.active_branch
        self.active = self.active_branch = None
        try:
            if state is None:
                return
            if output is None:
                # The call raised: its state is half-updated, so the next call starts afresh.
                self.reset_state(module)
                return
            self._end_step(state, branch)
        finally:
            self._leave_context()

    def _parallel_group(self, args, kwargs):
        """The context-parallel group of this call, after checking the input can be split over it."""
        group = parallel.process_group(self.module)
        self._sequence_length = None
        if group is not None:
            hidden_states = kwargs.get("hidden_states")
            if hidden_states is None and self._hidden_states_index is not None and self._hidden_states_index < len(args):
                hidden_states = args[self._hidden_states_index]
            counted = parallel.token_count(self.module, hidden_states)
            cp_config = parallel.context_parallel_config(self.module)
            parallel.check_sequence(cp_config, counted)
            if self.config.indicator_token_stride > 1 and self.policy.measures:
                parallel.check_strided_split(cp_config, counted)
            self._sequence_length = counted[0] if counted is not None else None
        return group

    def _leave_context(self) -> None:
        if self._own_context:
            self.state_manager.set_context(None)
            self._own_context = False

    # -- step bookkeeping -------------------------------------------------------------------------------------

    def _locate(self, state: BWCacheState, context: CacheContext, timestep: float | None) -> tuple[int, int | None]:
        """(step, number of steps) of this call within this transformer's part of the generation."""
        config, clock = self.config, self.clock
        if clock is not None and clock.num_steps is not None:
            step = context.step_index if context.step_index is not None else clock.next_step(context.name)
            num_steps = clock.num_steps
            self._check_steps(num_steps, "the pipeline runs")
            if context.num_inference_steps is not None and context.num_inference_steps != num_steps:
                raise ValueError(
                    f"The pipeline's cache context says num_inference_steps={context.num_inference_steps}, but its "
                    f"scheduler runs {num_steps} denoising steps."
                )
            window = clock.windows.get(self.expert)
            if window is not None:
                start, end = window
                if not start <= step < end:
                    raise ValueError(
                        f"{self.expert} was called at step {step}, outside its steps {start}..{end - 1} of this "
                        f"generation (the pipeline's boundary_ratio gives it those)."
                    )
                step, num_steps = step - start, end - start
            return step, num_steps

        num_steps = context.num_inference_steps
        if num_steps is not None:
            self._check_steps(num_steps, "the cache context says num_inference_steps=")
        else:
            num_steps = config.num_inference_steps
        if context.step_index is not None:
            step = context.step_index
            if state.calls > 0 and step == 0:
                self._restart(state)
            return step, num_steps
        step = state.calls
        later = timestep is None or state.last_timestep is None or timestep < state.last_timestep
        if state.calls > 0 and not later:
            # The denoising timestep went back up: a new generation that no pipeline reset announced.
            self._restart(state)
            step = 0
        elif num_steps is not None and step >= num_steps:
            if timestep is None:
                self._restart(state)
                step = 0
            else:
                raise ValueError(
                    f"BWCacheConfig(num_inference_steps={num_steps}), but this generation runs more steps: its branch "
                    f"{context.name!r} is at step {step + 1}. Leave num_inference_steps unset and apply BWCache to the "
                    "pipeline (apply_bwcache(pipe, ...)) to follow the pipeline's step count."
                )
        return step, num_steps

    def _check_steps(self, num_steps: int, source: str) -> None:
        configured = self.config.num_inference_steps
        if configured is not None and configured != num_steps:
            said = f"{source}{num_steps}" if source.endswith("=") else f"{source} {num_steps}"
            raise ValueError(
                f"BWCacheConfig(num_inference_steps={configured}) disagrees with the steps run: {said} denoising "
                "steps. Leave num_inference_steps unset to follow the pipeline, or set it to the steps you run."
            )

    def _restart(self, state: BWCacheState) -> None:
        """A branch starts over: the first branch to do so starts a new generation, the others join it."""
        if state.generation == self._generation:
            self._generation += 1
        state.reset()
        state.generation = self._generation

    def _begin_step(self, state: BWCacheState, context: CacheContext, args, kwargs) -> None:
        config = self.config
        timestep = self._timestep(context, args, kwargs)
        step, num_steps = self._locate(state, context, timestep)
        if num_steps is None and config.threshold > 0:
            raise ValueError(
                "BWCache needs the number of denoising steps: apply it to the pipeline (apply_bwcache(pipe, ...)), "
                "set BWCacheConfig(num_inference_steps=...), or call the transformer inside "
                "transformer.cache_context(name, num_inference_steps=...)."
            )
        if num_steps is not None and not 0 <= step < num_steps:
            raise ValueError(f"Step index {step} is outside 0..{num_steps - 1} (num_inference_steps={num_steps}).")
        self._start_generation()

        state.calls += 1
        state.step = step
        state.num_steps = num_steps
        state.last_timestep = timestep
        state.reuse_interval = config.resolved_reuse_interval(num_steps) if num_steps else None
        state.step_distances = {}
        state.step_measured = {}
        state.step_reused = set()
        state.chain_start = None
        state.last_output = None
        state.awaiting_feature = None

        self.policy.plan_step(state)
        if state.computed_step and not state.need_residuals and config.mode == "paper":
            _drop_residuals(state)
        if not state.computed_step and not state.residuals:
            raise RuntimeError(f"BWCache has no cached residual to reuse at step {step}.")

        if config.record_trace:
            offset = self._step_offset()
            branch = self.trace.branch(context.name)
            branch.ensure_step(offset + step)
            branch.timesteps[offset + step] = timestep
            branch.experts[offset + step] = self.expert

    def _step_offset(self) -> int:
        window = self.clock.windows.get(self.expert) if self.clock is not None else None
        return window[0] if window is not None else 0

    def _start_generation(self) -> None:
        """At the first call of a generation: refuse a cache stacked since, and start the trace afresh."""
        key = ("clock", self.clock.generation) if self.clock is not None else (id(self), self._generation)
        if key == self._started:
            return
        foreign = foreign_cache_hooks(self.module)
        if getattr(unwrap_module(self.module), "_is_cached", False):
            foreign.insert(0, "cache-dit")
        if foreign:
            raise ValueError(
                f"Another cache was applied on top of BWCache ({', '.join(foreign[:3])}); two caches cannot share "
                "one transformer. Remove one of them (bwcache.remove_bwcache(...) or transformer.disable_cache())."
            )
        cp_config = parallel.context_parallel_config(self.module)
        if cp_config is not None:
            parallel.check_model(self.module, cp_config)
        self._started = key
        if self.config.record_trace:
            self.trace.start_generation(key)
            self.trace.context_parallel = parallel.describe(cp_config) if cp_config is not None else None

    def _end_step(self, state: BWCacheState, branch_name: str) -> None:
        distances, measured = _host_values(state.step_distances, state.step_measured, self.group)
        state.step_distances = {}
        state.step_measured = {}
        outcome = self.policy.close_step(state, distances, measured)
        if not self.policy.keeps_features(state):
            state.features = [None] * len(self.blocks)
            state.feature_norms = [None] * len(self.blocks)
        if state.computed_step and not self.policy.keeps_residuals(state):
            state.chain_start = None
            _drop_residuals(state)
        self._close_chain(state)
        state.last_output = None

        if self.config.record_trace:
            self.trace.note_held(self.expert, self._held_bytes())
            branch = self.trace.branch(branch_name)
            step = self._step_offset() + state.step
            branch.indicator[step] = outcome.indicator
            # The distances a block-wise reuse was decided on belong to the map too.
            for i, value in {**distances, **measured}.items():
                branch.distance[step][i] = value
            for i in outcome.reused_blocks:
                branch.reused[step][i] = True
            trigger = None if outcome.trigger_step is None else self._step_offset() + outcome.trigger_step
            branch.set_trigger(self.expert, trigger)

    def _held_bytes(self) -> int:
        """Bytes of the residuals and features every branch holds now (each storage counted once)."""
        storages = {}
        for state in self.states.values():
            held = [t for pair in state.residuals.values() for t in pair] + state.features
            held += [t for *pair, _ in state.previous_residuals.values() for t in pair]
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

    # -- blocks (called by the block hooks, outside any compiled graph) ---------------------------------------

    @torch.compiler.disable
    def before_block(self, spec: BlockSpec, args, kwargs):
        """The block's output when it is reused; `None` when it must run (after `after_block` is owed a call)."""
        state = self.active
        if state is None:
            return None
        i = spec.index
        hidden_states, encoder_hidden_states = _block_inputs(spec, args, kwargs)
        if not state.computed_step:
            return self._reuse_chain(spec, state, hidden_states, encoder_hidden_states)
        plan = self.policy.measure(state, i, i in state.residuals)

        features = None
        if plan.measure and self.modulated:
            # The feature is the block's modulated attention input: measured by `modulated_input` as the block runs.
            state.awaiting_feature = i
        elif plan.measure:
            features = self._features(hidden_states)
            if self._measure(state, i, features, plan.may_reuse):
                return self._reuse_block(spec, state, hidden_states, encoder_hidden_states)
        elif plan.may_reuse and self.policy.decide(state, i, None):
            # A schedule that reuses without measuring (static mode).
            state.step_reused.add(i)
            return self._reuse_block(spec, state, hidden_states, encoder_hidden_states)

        if self.config.mode != "paper":
            if plan.keep:
                if self.policy.measures:
                    self._keep_features(state, i, features if features is not None else self._features(hidden_states))
            elif i in self.policy.indicator_blocks:
                # No later step can reuse this block.
                state.features[i] = state.feature_norms[i] = None
                _drop_residuals(state, i)
            self.policy.block_computed(state, i)
            state.chain_heads[i] = True
            state.last_output = None
            keep_residual = plan.keep and state.need_residuals
        else:
            keep_residual = state.need_residuals
        self._open_chain(spec, state, hidden_states, encoder_hidden_states, keep_residual)
        return None

    def _features(self, tensor: torch.Tensor) -> torch.Tensor:
        return _strided(tensor, self.config.indicator_token_stride, self._token_offset(tensor))

    def _measure(self, state: BWCacheState, i: int, features: torch.Tensor, may_reuse: bool) -> bool:
        """Block i's distance to its reference feature; whether the block is reused (block-wise mode decides)."""
        reference = state.features[i]
        if reference is not None:
            if state.feature_norms[i] is None:
                state.feature_norms[i] = l1_norm(reference)
            sums = _Sums(_difference_sum(features, reference), state.feature_norms[i],
                         self.policy.distance_offset(state, i))
            if not may_reuse:
                # Recorded, not decided on: divided (and summed over processes) with the step's others at its end.
                state.step_distances[i] = sums
            else:
                distance = float(self._divide_now(sums))
                if self.policy.decide(state, i, distance):
                    state.step_measured[i] = distance
                    state.step_reused.add(i)
                    if self.config.accumulate_distance:
                        self._keep_features(state, i, features)
                    return True
                state.step_distances[i] = distance
        if self.config.mode == "paper":
            self._keep_features(state, i, features)
        return False

    @torch.compiler.disable
    def modulated_input(self, spec: BlockSpec, module, args, kwargs) -> None:
        """Forward pre-hook of a block's attention (`indicator_feature="modulated"`): its input is the feature."""
        state = self.active
        if state is None or state.awaiting_feature != spec.index:
            return
        state.awaiting_feature = None
        features = kwargs.get("hidden_states", args[0] if args else None)
        self._measure(state, spec.index, self._features(features), may_reuse=False)

    @torch.compiler.disable
    def after_block(self, spec: BlockSpec, output) -> None:
        state = self.active
        if state is None:
            return
        i = spec.index
        state.output_arity[i] = len(output) if isinstance(output, (tuple, list)) else None
        state.last_output = _block_outputs(spec, output)
        if state.keep_residual and self.config.mode != "paper":
            self._close_chain(state)

    def _reuse_chain(self, spec, state, hidden_states, encoder_hidden_states):
        """Paper mode's reused step: the chain's first block adds the chain's residual, the others pass through."""
        i = spec.index
        chained = self._is_chained(spec, state, hidden_states, encoder_hidden_states)
        if chained != (not state.chain_heads[i]):
            raise RuntimeError(
                f"Block {spec.name} is fed differently than at the last computed step; BWCache cannot reuse it."
            )
        if state.chain_heads[i]:
            return self._reuse_block(spec, state, hidden_states, encoder_hidden_states, remember=True)
        state.last_output = (hidden_states, encoder_hidden_states)
        return _pack(spec, state.output_arity[i], hidden_states, encoder_hidden_states)

    def _reuse_block(self, spec, state, hidden_states, encoder_hidden_states, remember=False):
        residual_hs, residual_ehs = self._residual_now(state, spec.index)
        hidden_states = hidden_states + residual_hs
        if residual_ehs is not None:
            encoder_hidden_states = encoder_hidden_states + residual_ehs
        if remember:
            state.last_output = (hidden_states, encoder_hidden_states)
        return _pack(spec, state.output_arity[spec.index], hidden_states, encoder_hidden_states)

    def _token_offset(self, hidden_states: torch.Tensor) -> int:
        """Where this process's every-`stride`-th token starts, so that a sharded sequence samples the tokens one
        process would (global indices 0, stride, 2·stride, …)."""
        stride = self.config.indicator_token_stride
        if self.group is None or stride == 1 or hidden_states.ndim < 2:
            return 0
        dim = 1 if hidden_states.ndim >= 3 else 0
        length = hidden_states.shape[dim]
        start = parallel.shard_start(self.group, length, parallel.context_parallel_config(self.module),
                                     self._sequence_length)
        return -start % stride

    def _divide_now(self, sums: _Sums) -> torch.Tensor:
        """A distance a block's decision waits for (summed over the context-parallel group first)."""
        difference, norm = sums.difference, sums.norm
        if self.group is not None:
            difference, norm = parallel.all_reduce_sum(torch.stack([difference, norm]), self.group)
        distance = _ratio(difference, norm)
        return distance + sums.offset if sums.offset else distance

    def _keep_features(self, state: BWCacheState, i: int, features: torch.Tensor) -> None:
        state.features[i] = _stored(features, self.config.indicator_token_stride, self.cache_dtype)
        state.feature_norms[i] = None

    def _open_chain(self, spec, state, hidden_states, encoder_hidden_states, keep_residual: bool) -> None:
        """Before a computed block: start a new chain at it, or extend the open one, when its residual is kept."""
        i = spec.index
        state.keep_residual = keep_residual
        if not keep_residual:
            return
        chained = self.config.mode == "paper" and self._is_chained(spec, state, hidden_states, encoder_hidden_states)
        if not chained:
            self._close_chain(state)
            # The chain is recomputed now: its old residual is stale, and freeing it first lowers the peak (unless
            # it is the older point of an extrapolation).
            self._retire_residual(state, i)
            start_hs = hidden_states
            if self.config.mode == "paper":
                # The chain's input is held while the chain runs; a compact copy lets the model free its own.
                # (The text stream's is kept as is: whether a chain changed it is told by identity.)
                start_hs = _compact(hidden_states, self.cache_dtype)
            state.chain_start = (i, start_hs, encoder_hidden_states if spec.has_encoder_stream else None)
        state.chain_heads[i] = not chained

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
        state.residual_times[head] = _time(state)
        state.chain_start = None

    def _retire_residual(self, state: BWCacheState, head: int) -> None:
        """Before chain `head` is recomputed: keep its residual as the previous one when extrapolating, else drop it."""
        residual = state.residuals.pop(head, None)
        if self.config.extrapolation > 0 and residual is not None:
            state.previous_residuals[head] = (*residual, state.residual_times[head])
        else:
            state.previous_residuals.pop(head, None)

    def _residual_now(self, state: BWCacheState, head: int):
        """The residual chain `head` adds at this step: the last computed one or, with `extrapolation` and two
        computed, that far along the line through both towards this step's time."""
        residual = state.residuals[head]
        previous = state.previous_residuals.get(head)
        if previous is None:
            return residual
        t1, t0 = state.residual_times[head], previous[2]
        if t1 == t0:
            return residual
        factor = self.config.extrapolation * (_time(state) - t1) / (t1 - t0)
        return tuple(
            None if last is None else (last + (last - older) * factor if older is not None else last)
            for last, older in zip(residual, previous[:2])
        )


class BWCacheBlockHook(ModelHook):
    """The hook on one DiT block: asks the transformer's hook whether to reuse, else runs the block.

    Its own frame is skipped by dynamo (`recursive=False`), so a compiled block still compiles its forward, while
    the decision methods it calls are disabled outright.
    """

    def __init__(self, root: BWCacheHook, spec: BlockSpec):
        super().__init__()
        self.root = root
        self.spec = spec

    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        reused = self.root.before_block(self.spec, args, kwargs)
        if reused is not None:
            return reused
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.root.after_block(self.spec, output)
        return output


def _skip_under_dynamo(function) -> None:
    """Tell dynamo once that this frame is never compiled, instead of finding it out again at every call.

    (`torch.compiler.disable(recursive=False)` alone re-checks the frame on each call; an optimisation only, so a
    torch without the private helper just runs a little slower.)
    """
    try:
        from torch._dynamo.eval_frame import skip_code

        skip_code(inspect.unwrap(getattr(function, "_torchdynamo_orig_callable", function)).__code__)
    except (ImportError, AttributeError):
        pass


_skip_under_dynamo(BWCacheBlockHook.new_forward)


def _time(state: BWCacheState) -> float:
    """Where this step lies on the scheduler's axis: its timestep when the model is given one, else its index."""
    return float(state.step) if state.last_timestep is None else state.last_timestep


def _drop_residuals(state: BWCacheState, head: int | None = None) -> None:
    """Forget every residual of the branch (or of chain `head`), with what an extrapolation would need."""
    if head is None:
        state.residuals, state.residual_times, state.previous_residuals = {}, {}, {}
        return
    for held in (state.residuals, state.residual_times, state.previous_residuals):
        held.pop(head, None)


def _host_values(distances: dict, measured: dict, group=None) -> tuple[dict[int, float], dict[int, float]]:
    """Both dicts of distances as floats: the undivided ones (`_Sums`) summed over `group` in one all-reduce and
    divided, all of them brought to the host in one sync."""
    pending = {i: v for i, v in distances.items() if isinstance(v, _Sums)}
    values = {i: v for i, v in distances.items() if not isinstance(v, _Sums)}
    if pending:
        sums = torch.stack([p.difference for p in pending.values()] + [p.norm for p in pending.values()])
        if group is not None:
            parallel.all_reduce_sum(sums, group)
        ratios = _ratio(sums[: len(pending)], sums[len(pending) :])
        offsets = [p.offset for p in pending.values()]
        if any(offsets):
            ratios = ratios + torch.tensor(offsets, dtype=ratios.dtype, device=ratios.device)
        values.update(zip(pending, ratios.tolist()))
    return {i: values[i] for i in distances}, {i: float(v) for i, v in measured.items()}


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


