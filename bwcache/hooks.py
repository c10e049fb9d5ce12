"""How BWCache reuses: diffusers hooks that keep each branch's features and residuals (the mechanics).

When to reuse is the policy's business (`bwcache.policies`), where a call sits in its generation the step
locator's (`bwcache.clock`), and how far a feature moved the distance meter's (`bwcache.distances`); this module
runs each call, keeps and releases cached tensors, and rebuilds a reused block's output.

* The transformer carries a stateful hook (`BWCacheHook`) for diffusers' cache contexts and end-of-call reset, and
  a pair of torch forward hooks that open and close each call: they find the branch and the step, and survive
  accelerate's CPU offload, which re-wraps the transformer's forward after every generation.
* Every DiT block carries a `BWCacheBlockHook`. Its decision work runs in `torch.compiler.disable`d methods, so
  under `compile_repeated_blocks()` or `transformer.compile()` the blocks' own forwards are compiled and the cache's
  Python state is never guarded on.

Reuse. A reused block returns its input plus a cached residual (output − input at a computed step). Where a reused
step skips every block (paper mode: the policy `chains_blocks`), blocks that hand their output straight to the next
block form a chain whose residuals telescope, so one residual is kept per chain (per stream), added at the chain's
first block, and the other blocks pass their input through; on most models the whole stack is one chain, so a
branch keeps a single residual, as the official code does. Else (block-wise mode) each block keeps its own.

Memory. A chain's old residual is released before the chain is recomputed, so the peak holds one residual per
chain, not two; a residual or reference input is kept only when a later step may read it. With `cache_dtype`,
residuals, features and the input a chain of several blocks holds while it runs are stored narrower than the
model's dtype; reused outputs keep the model's dtype. `trace.held_bytes_peak` records the most the cache held.
Under context parallelism residuals and features stay sharded.

State is kept per branch (cache-context name). A call that raises drops all state: the next call starts afresh.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, ModelHook, StateManager
from diffusers.utils.torch_utils import unwrap_module

from . import parallel
from .blocks import BlockSpec
from .clock import PipelineClock, StepLocator
from .config import BWCacheConfig
from .distances import DistanceMeter, DistanceSums
from .policies import make_policy
from .guardrails import schedule_warnings
from .stacking import refuse_stacked
from .storage import compact, stored_feature, stored_residual, tensors, value
from .trace import Trace

DEFAULT_BRANCH = "default"


class BWCacheState(BaseState):
    """Everything one CFG branch of one transformer remembers between denoising steps."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        # The generation (a count kept by the step locator, `bwcache.clock`) this branch's state belongs to.
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
        self._clear_call()

    def start_step(self, step: int, num_steps: int | None, timestep: float | None, reuse_interval: int | None) -> None:
        """A call of this branch begins, at `step` of `num_steps`."""
        self.calls += 1
        self.step = step
        self.num_steps = num_steps
        self.last_timestep = timestep
        self.reuse_interval = reuse_interval
        self._clear_call()

    def _clear_call(self) -> None:
        """Forget what the last call kept only for itself."""
        # Distances not yet divided (`DistanceSums`) or already decided on (floats), and those of reused blocks.
        self.step_distances: dict[int, DistanceSums | float] = {}
        self.step_measured: dict[int, float] = {}
        self.step_reused: set[int] = set()
        # The open chain's first block and input, the last block's output, and whether the running block's
        # residual is kept.
        self.chain_start: tuple[int, torch.Tensor, torch.Tensor | None] | None = None
        self.last_output: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.keep_residual = False
        # The block whose modulated attention input is to be measured as it runs.
        self.awaiting_feature: int | None = None

    @property
    def time(self) -> float:
        """Where this step lies on the scheduler's axis: its timestep when the model is given one, else its index."""
        return float(self.step) if self.last_timestep is None else self.last_timestep

    def is_chained(self, spec: BlockSpec, hidden_states, encoder_hidden_states) -> bool:
        """Whether block `spec` is fed exactly what the block before it returned (same objects, both streams)."""
        if self.last_output is None:
            return False
        last_hs, last_ehs = self.last_output
        if hidden_states is not last_hs:
            return False
        if spec.has_encoder_stream:
            return encoder_hidden_states is last_ehs
        return True

    def close_chain(self, dtype: torch.dtype | None, int8: bool = False) -> None:
        """Turn the open chain's input and the last block's output into the chain's cached residual (stored in
        `dtype` where that is narrower, or with `int8` as int8 with per-token scales)."""
        if self.chain_start is None or self.last_output is None:
            self.chain_start = None
            return
        head, start_hs, start_ehs = self.chain_start
        last_hs, last_ehs = self.last_output
        self.residuals.pop(head, None)
        residual_ehs = None
        if start_ehs is not None and last_ehs is not None and last_ehs is not start_ehs:
            residual_ehs = stored_residual(last_ehs - start_ehs, dtype, int8)
        self.residuals[head] = (stored_residual(last_hs - start_hs, dtype, int8), residual_ehs)
        self.residual_times[head] = self.time
        self.chain_start = None

    def retire_residual(self, head: int, extrapolating: bool) -> None:
        """Before chain `head` is recomputed: keep its residual as the previous one when extrapolating, else drop it."""
        residual = self.residuals.pop(head, None)
        if extrapolating and residual is not None:
            self.previous_residuals[head] = (*residual, self.residual_times[head])
        else:
            self.previous_residuals.pop(head, None)

    def residual_now(self, head: int, extrapolation: float):
        """The residual chain `head` adds at this step: the last computed one or, with two computed, `extrapolation`
        of the way along the line through both towards this step's time."""
        residual = tuple(value(kept) for kept in self.residuals[head])
        previous = self.previous_residuals.get(head)
        if previous is None:
            return residual
        t1, t0 = self.residual_times[head], previous[2]
        if t1 == t0:
            return residual
        previous = tuple(value(kept) for kept in previous[:2])
        factor = extrapolation * (self.time - t1) / (t1 - t0)
        return tuple(
            None if last is None else (last + (last - older) * factor if older is not None else last)
            for last, older in zip(residual, previous)
        )

    def drop_features(self) -> None:
        """Forget every block's reference feature."""
        self.features = [None] * self.num_blocks
        self.feature_norms = [None] * self.num_blocks

    def forget_block(self, i: int) -> None:
        """No later step can reuse block i: forget its reference feature and its residual."""
        self.features[i] = self.feature_norms[i] = None
        self.drop_residuals(i)

    def drop_residuals(self, head: int | None = None) -> None:
        """Forget every residual of the branch (or of chain `head`), with what an extrapolation would need."""
        if head is None:
            self.residuals, self.residual_times, self.previous_residuals = {}, {}, {}
            return
        for held in (self.residuals, self.residual_times, self.previous_residuals):
            held.pop(head, None)

    def held_tensors(self) -> list[torch.Tensor]:
        """The residuals and features this branch holds."""
        held = [t for pair in self.residuals.values() for kept in pair for t in tensors(kept)]
        held += [t for *pair, _ in self.previous_residuals.values() for kept in pair for t in tensors(kept)]
        return held + [t for t in self.features if t is not None]


class BWCacheHook(ModelHook):
    """The stateful hook on one transformer: each call's lifecycle, and the blocks' reuse mechanics."""

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
        self.int8 = config.cache_dtype == "int8"
        self.modulated = config.indicator_feature == "modulated"
        self.state_manager = StateManager(BWCacheState, (len(blocks),))
        self.trace = trace
        self.expert = expert
        self.clock = clock
        # Where each call sits in its generation, and the distances' arithmetic (over this call's process group).
        self.steps = StepLocator(config, expert, clock)
        self.distances = DistanceMeter(config.indicator_token_stride)
        self.module: torch.nn.Module | None = None
        self.active: BWCacheState | None = None
        self.active_branch: str | None = None
        # The branches seen since the last reset, by name.
        self.states: dict[str, BWCacheState] = {}
        self._started: tuple | None = None
        self._own_context = False
        # Set by `apply_bwcache`: its handle, torch's hooks around each call, and each module's forward as ours left it.
        self.handle = None
        self.torch_hooks: tuple = ()
        self.installed: list[tuple] = []

    def initialize_hook(self, module):
        self.module = module
        parameters = list(inspect.signature(unwrap_module(module).__class__.forward).parameters)[1:]
        self.steps.bind(parameters)
        self.distances.bind(module, parameters)
        return module

    def reset_state(self, module):
        """The pipeline's end-of-call reset: a generation that ran fewer steps than configured is refused, then
        everything starts afresh."""
        ran = {name: (state.calls, state.step, state.num_steps) for name, state in self.states.items()}
        self.start_afresh(module)
        self.steps.check_finished(ran)
        return module

    def start_afresh(self, module) -> None:
        """Drop every branch's state; the next call starts a new generation."""
        self.release()
        self.active = self.active_branch = None
        # The trace of the finished generation stays readable until the next one starts.
        self.steps.generation += 1

    def release(self) -> None:
        """Drop every branch's state (the cache context in force, if any, stays)."""
        context = self.state_manager._context
        self.state_manager.reset()
        self.state_manager.set_context(context)
        self.states = {}
        if self.config.record_trace:
            self.trace.note_held(self.expert, 0)

    # -- one transformer call (torch forward hooks, outside any compiled graph) -------------------------------

    @torch.compiler.disable
    def call_start(self, module, args, kwargs) -> None:
        self.active = self.active_branch = None
        self._own_context = self.state_manager._context is None
        if self._own_context:
            self.state_manager.set_context(CacheContext(DEFAULT_BRANCH))
        try:
            self.distances.start_call(args, kwargs, self.policy.measures)
            if self.clock is not None:
                if self.steps.clock_moved_on():
                    self.start_afresh(module)
                self.clock.release_finished(self)
            context = self.state_manager.context
            state = self.state_manager.get_state()
            if state.calls == 0:
                state.generation = self.steps.generation
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
                self.start_afresh(module)
                return
            self._end_step(state, branch)
        finally:
            self._leave_context()

    def _leave_context(self) -> None:
        if self._own_context:
            self.state_manager.set_context(None)
            self._own_context = False

    def _begin_step(self, state: BWCacheState, context: CacheContext, args, kwargs) -> None:
        step, num_steps, timestep = self.steps.locate(state, context, args, kwargs)
        self._start_generation(num_steps)

        reuse_interval = self.config.resolved_reuse_interval(num_steps) if num_steps else None
        state.start_step(step, num_steps, timestep, reuse_interval)

        self.policy.plan_step(state)
        if self.policy.drops_residuals(state):
            state.drop_residuals()
        if not state.computed_step and not state.residuals:
            raise RuntimeError(f"BWCache has no cached residual to reuse at step {step}.")

        if self.config.record_trace:
            at = self.steps.offset + step
            branch = self.trace.branch(context.name)
            branch.ensure_step(at)
            branch.timesteps[at] = timestep
            branch.experts[at] = self.expert

    def _start_generation(self, num_steps: int | None) -> None:
        """At the first call of a generation: refuse a cache stacked since, say what its step count leaves the cache
        (`bwcache.guardrails`), and start the trace afresh."""
        key = self.steps.generation_key
        if key == self._started:
            return
        refuse_stacked(self.module)
        if num_steps is not None:
            for note in schedule_warnings(self.config, num_steps):
                warnings.warn(note, stacklevel=2)
        cp_config = parallel.checked_config(self.module)
        self._started = key
        if self.config.record_trace:
            self.trace.start_generation(key)
            self.trace.context_parallel = parallel.describe(cp_config) if cp_config is not None else None

    def _end_step(self, state: BWCacheState, branch_name: str) -> None:
        distances, measured = self.distances.host_values(state.step_distances, state.step_measured)
        state.step_distances = {}
        state.step_measured = {}
        outcome = self.policy.close_step(state, distances, measured)
        if not self.policy.keeps_features(state):
            state.drop_features()
        if state.computed_step and not self.policy.keeps_residuals(state):
            state.chain_start = None
            state.drop_residuals()
        state.close_chain(self.cache_dtype, self.int8)
        state.last_output = None

        if self.config.record_trace:
            branch = self.trace.branch(branch_name)
            offset = self.steps.offset
            step = offset + state.step
            # The distances a block-wise reuse was decided on belong to the map too.
            branch.record(step, outcome.indicator, {**distances, **measured})
            for i in outcome.reused_blocks:
                branch.reused[step][i] = True
            branch.set_trigger(self.expert, None if outcome.trigger_step is None else offset + outcome.trigger_step)
        if state.num_steps is not None and state.step == state.num_steps - 1:
            # The branch's last step: nothing it holds is read again, so it goes before the pipeline decodes.
            state.drop_features()
            state.drop_residuals()
        if self.config.record_trace:
            # What the cache holds between calls, all branches (each storage once).
            self.trace.note_held(self.expert, _held_bytes(self.states.values()))

    # -- blocks (called by the block hooks, outside any compiled graph) ---------------------------------------

    @torch.compiler.disable
    def before_block(self, spec: BlockSpec, args, kwargs):
        """The block's output when it is reused; `None` when it must run (after `after_block` is owed a call)."""
        state = self.active
        if state is None:
            return None
        i, policy = spec.index, self.policy
        hidden_states, encoder_hidden_states = spec.inputs(args, kwargs)
        if not state.computed_step:
            return self._reuse_chain(spec, state, hidden_states, encoder_hidden_states)
        plan = policy.measure(state, i, i in state.residuals)

        features = None
        if plan.measure and self.modulated:
            # The feature is the block's modulated attention input: measured by `modulated_input` as the block runs.
            state.awaiting_feature = i
        elif plan.measure:
            features = self.distances.features(hidden_states)
            if self._measure(state, i, features, plan.may_reuse):
                return self._reuse_block(spec, state, hidden_states, encoder_hidden_states)
        elif plan.may_reuse and policy.decide(state, i, None):
            # A schedule that reuses without measuring (static mode).
            state.step_reused.add(i)
            return self._reuse_block(spec, state, hidden_states, encoder_hidden_states)

        if not plan.keep:
            if i in policy.indicator_blocks:
                state.forget_block(i)
        elif policy.references_computed_input:
            self._keep_features(state, i, features if features is not None else self.distances.features(hidden_states))
        policy.block_computed(state, i)
        if not policy.chains_blocks:
            # The block is a chain of its own.
            state.chain_heads[i] = True
            state.last_output = None
        self._open_chain(spec, state, hidden_states, encoder_hidden_states, plan.keep and state.need_residuals)
        return None

    def _measure(self, state: BWCacheState, i: int, features: torch.Tensor, may_reuse: bool) -> bool:
        """Block i's distance to its reference feature; whether the block is reused (where the policy decides)."""
        reference = state.features[i]
        if reference is not None:
            sums = self.distances.measure(features, reference, state.feature_norms[i],
                                          self.policy.distance_offset(state, i))
            state.feature_norms[i] = sums.norm
            if not may_reuse:
                # Recorded, not decided on: divided (and summed over processes) with the step's others at its end.
                state.step_distances[i] = sums
            else:
                distance = float(self.distances.divide_now(sums))
                if self.policy.decide(state, i, distance):
                    state.step_measured[i] = distance
                    state.step_reused.add(i)
                    if self.policy.moves_reference_on_reuse:
                        self._keep_features(state, i, features)
                    return True
                state.step_distances[i] = distance
        if self.policy.references_previous_step:
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
        self._measure(state, spec.index, self.distances.features(features), may_reuse=False)

    @torch.compiler.disable
    def after_block(self, spec: BlockSpec, output) -> None:
        state = self.active
        if state is None:
            return
        i = spec.index
        state.output_arity[i] = len(output) if isinstance(output, (tuple, list)) else None
        state.last_output = spec.outputs(output)
        if state.keep_residual and not self.policy.chains_blocks:
            state.close_chain(self.cache_dtype, self.int8)

    def _keep_features(self, state: BWCacheState, i: int, features: torch.Tensor) -> None:
        state.features[i] = stored_feature(features, self.config.indicator_token_stride, self.cache_dtype)
        state.feature_norms[i] = None

    # -- residual chains --------------------------------------------------------------------------------------

    def _reuse_chain(self, spec, state, hidden_states, encoder_hidden_states):
        """A step that skips every block: the chain's first block adds the chain's residual, the others pass through."""
        i = spec.index
        chained = state.is_chained(spec, hidden_states, encoder_hidden_states)
        if chained != (not state.chain_heads[i]):
            raise RuntimeError(
                f"Block {spec.name} is fed differently than at the last computed step; BWCache cannot reuse it."
            )
        if state.chain_heads[i]:
            return self._reuse_block(spec, state, hidden_states, encoder_hidden_states, remember=True)
        state.last_output = (hidden_states, encoder_hidden_states)
        return spec.pack(state.output_arity[i], hidden_states, encoder_hidden_states)

    def _reuse_block(self, spec, state, hidden_states, encoder_hidden_states, remember=False):
        residual_hs, residual_ehs = self._residual_now(state, spec.index)
        hidden_states = hidden_states + residual_hs
        if residual_ehs is not None:
            encoder_hidden_states = encoder_hidden_states + residual_ehs
        if remember:
            state.last_output = (hidden_states, encoder_hidden_states)
        return spec.pack(state.output_arity[spec.index], hidden_states, encoder_hidden_states)

    def _open_chain(self, spec, state, hidden_states, encoder_hidden_states, keep_residual: bool) -> None:
        """Before a computed block: start a new chain at it, or extend the open one, when its residual is kept."""
        i = spec.index
        state.keep_residual = keep_residual
        if not keep_residual:
            return
        chained = self.policy.chains_blocks and state.is_chained(spec, hidden_states, encoder_hidden_states)
        if not chained:
            state.close_chain(self.cache_dtype, self.int8)
            # The chain is recomputed now: its old residual is stale, and freeing it first lowers the peak (unless
            # it is the older point of an extrapolation).
            state.retire_residual(i, self.config.extrapolation > 0)
            start_hs = hidden_states
            if self.policy.chains_blocks:
                # The chain's input is held while the chain runs; a compact copy lets the model free its own.
                # (The text stream's is kept as is: whether a chain changed it is told by identity.)
                start_hs = compact(hidden_states, self.cache_dtype)
            state.chain_start = (i, start_hs, encoder_hidden_states if spec.has_encoder_stream else None)
        state.chain_heads[i] = not chained

    def _residual_now(self, state: BWCacheState, head: int):
        """The residual chain `head` adds at this step (extrapolated by `config.extrapolation`)."""
        return state.residual_now(head, self.config.extrapolation)


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


def _held_bytes(states) -> int:
    """Bytes of the residuals and features the branches hold now (each storage counted once)."""
    storages = {}
    for state in states:
        for tensor in state.held_tensors():
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
