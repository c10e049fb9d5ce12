"""Where a transformer call sits in its generation: the pipeline's clock, and each transformer's step locator.

Every diffusers pipeline starts a generation with `scheduler.set_timesteps(...)`, which puts a new `timesteps`
tensor on the scheduler. The clock watches that object: a new one is a new generation (however the previous call
ended: finished, raised in a callback, cancelled, out of memory), and its length, less the scheduler's begin index,
is the number of denoising steps, whether or not the pipeline passes it to its cache context. The step index of a
call is the number of calls of its branch (`cond`, `uncond`, …) so far in this generation.

Pipelines with two experts (Wan2.2 A14B: `transformer` for high noise, `transformer_2` for low noise) split the
steps at `boundary_ratio · num_train_timesteps`; the clock gives each expert its window of steps, so each keeps its
own schedule.

Each cached transformer places its calls with a `StepLocator`. State is kept per cache-context name (`cond`,
`uncond`, … as pipelines set them; a call with no context runs in a branch named `default`). Applied to a pipeline,
the step count, the step index and the start of each generation come from the pipeline clock. Applied to a
transformer alone, they come from the context's `step_index` and `num_inference_steps`, or
`BWCacheConfig.num_inference_steps` and counting calls per branch, and a call whose timestep is above its branch's
previous one starts a new generation (an equal one is a second-order scheduler's second call at that timestep).

Branches. A call inside a cache context runs in the branch the context names. A call outside any runs in branch
`default`; under a pipeline clock, the second call of a step outside any context (the negative prompt's, where a
pipeline runs classifier-free guidance as two calls without contexts) runs in `default_2`, and so on, so each keeps
its own state and schedule.

Timesteps. With a pipeline clock the host already has every timestep (the scheduler's list, read once per
generation), so a call reads none from the device. A timestep tensor is read as its largest value: the noise level of
the tokens being denoised, where a pipeline gives a conditioning frame's tokens timestep 0 (Wan2.2 TI2V, LTX I2V).
"""

from __future__ import annotations

import weakref

import torch
from diffusers.hooks.hooks import CacheContext

from .config import BWCacheConfig

# Components that are denoisers, in the order a pipeline runs them.
EXPERT_NAMES = ("transformer", "transformer_2")


class PipelineClock:
    def __init__(self, pipeline):
        self._pipeline = weakref.ref(pipeline)
        self._timesteps = None
        self.generation = 0
        self.num_steps: int | None = None
        # The generation's timesteps as host floats, one per step.
        self.timesteps: list[float] = []
        self.windows: dict[str, tuple[int, int]] = {}
        self._calls: dict[str, int] = {}
        # The cache hook of each expert, by component name.
        self.hooks: dict[str, object] = {}
        # The step of the last call made outside any cache context (the pipeline's `_current_timestep` then), and
        # how many such calls that step has had.
        self._step_marker = None
        self._calls_outside = 0

    @property
    def pipeline(self):
        return self._pipeline()

    def refresh(self) -> None:
        """Look at the scheduler: a new `timesteps` tensor starts a new generation."""
        pipeline = self.pipeline
        scheduler = getattr(pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or timesteps is self._timesteps:
            return
        self._timesteps = timesteps
        self.generation += 1
        self._calls = {}
        self._step_marker, self._calls_outside = None, 0
        begin = getattr(scheduler, "begin_index", None) or 0
        values = [float(t) for t in torch.as_tensor(timesteps).flatten()[begin:].tolist()]
        self.timesteps = values
        self.num_steps = len(values)
        self.windows = expert_windows(pipeline, scheduler, values)

    def next_step(self, branch: str) -> int | None:
        """The step index of a call of `branch` that gives none itself (counted within this generation)."""
        if self._timesteps is None:
            return None
        step = self._calls.get(branch, 0)
        self._calls[branch] = step + 1
        return step

    def order_outside_context(self) -> int:
        """The order (1, 2, …) of a call made outside any cache context among those of its denoising step.

        Pipelines that run classifier-free guidance as two transformer calls without cache contexts (HunyuanVideo
        I2V and Framepack with `true_cfg_scale` > 1) make them in the same order at every step. A step is told by the
        pipeline's `_current_timestep`, which diffusers pipelines set once per step to the loop's timestep (a new
        object each step); where a pipeline sets none, every call is the first."""
        self.refresh()
        marker = getattr(self.pipeline, "_current_timestep", None)
        if marker is None:
            return 1
        if marker is not self._step_marker:
            self._step_marker, self._calls_outside = marker, 0
        self._calls_outside += 1
        return self._calls_outside

    def release_finished(self, hook) -> None:
        """When an expert's steps begin, the experts whose steps are over free what they cached."""
        window = self.windows.get(hook.expert)
        if window is None:
            return
        for name, other in self.hooks.items():
            done = self.windows.get(name)
            if other is not hook and done is not None and done[1] <= window[0] and other.states:
                other.release()


class StepLocator:
    """Where each call of one transformer sits: its branch's step, the number of steps, its timestep, and which
    generation it belongs to (a transformer's part of a generation only, for one of two experts)."""

    def __init__(self, config: BWCacheConfig, expert: str | None = None, clock: PipelineClock | None = None):
        self.config = config
        self.expert = expert
        self.clock = clock
        # A count of the generations this transformer has started (a reset, a restart or a new clock generation).
        self.generation = 0
        self._clock_generation = 0
        self._timestep_index: int | None = None

    def bind(self, parameters: list[str]) -> None:
        """The names of the transformer forward's arguments (where a positional timestep is)."""
        self._timestep_index = parameters.index("timestep") if "timestep" in parameters else None

    def clock_moved_on(self) -> bool:
        """Look at the pipeline's clock: whether it started a generation since this transformer's last look."""
        if self.clock is None:
            return False
        self.clock.refresh()
        if self.clock.generation == self._clock_generation:
            return False
        self._clock_generation = self.clock.generation
        return True

    @property
    def generation_key(self) -> tuple:
        """Names the generation in progress (the same for every transformer of one pipeline)."""
        return ("clock", self.clock.generation) if self.clock is not None else (id(self), self.generation)

    @property
    def offset(self) -> int:
        """The generation's step at which this transformer's steps begin (an expert's window; else 0)."""
        window = self.clock.windows.get(self.expert) if self.clock is not None else None
        return window[0] if window is not None else 0

    def locate(self, state, context: CacheContext, args, kwargs) -> tuple[int, int | None, float | None]:
        """(step, number of steps, timestep) of this call; restarts `state` where the call starts a generation."""
        clocked = self.clock is not None and self.clock.num_steps is not None
        timestep = None if clocked else self._timestep(context, args, kwargs)
        step, num_steps = self._step(state, context, timestep)
        if clocked:
            timestep = self._clock_timestep(context, step)
        if num_steps is None and self.config.threshold > 0:
            raise ValueError(
                "BWCache needs the number of denoising steps: apply it to the pipeline (apply_bwcache(pipe, ...)), "
                "set BWCacheConfig(num_inference_steps=...), or call the transformer inside "
                "transformer.cache_context(name, num_inference_steps=...)."
            )
        if num_steps is not None and not 0 <= step < num_steps:
            raise ValueError(f"Step index {step} is outside 0..{num_steps - 1} (num_inference_steps={num_steps}).")
        return step, num_steps, timestep

    def _step(self, state, context: CacheContext, timestep: float | None) -> tuple[int, int | None]:
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
                self.restart(state)
            return step, num_steps
        step = state.calls
        went_up = timestep is not None and state.last_timestep is not None and timestep > state.last_timestep
        if state.calls > 0 and went_up:
            # The denoising timestep went back up: a new generation that no pipeline reset announced (the last one
            # may have been aborted).
            self.restart(state)
            step = 0
        elif num_steps is not None and step >= num_steps:
            if timestep is None:
                self.restart(state)
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

    def check_finished(self, ran: dict[str, tuple[int, int, int | None]]) -> None:
        """At the end of a pipeline call (its reset), with each branch's (calls, last step, step count): a generation
        that ran fewer steps than the configured
        `num_inference_steps` was run with another step count's schedule; say so. (With a pipeline clock, or a
        context that says its step count, the steps are known before they run and checked then.)"""
        if self.clock is not None or self.config.num_inference_steps is None:
            return
        for name, (calls, step, num_steps) in ran.items():
            if calls and num_steps == self.config.num_inference_steps and step < num_steps - 1:
                raise ValueError(
                    f"BWCacheConfig(num_inference_steps={num_steps}), but the generation that just ended ran "
                    f"{step + 1} steps (branch {name!r}): it followed a {num_steps}-step schedule. Set "
                    "num_inference_steps to the steps you run, or apply BWCache to the pipeline "
                    "(apply_bwcache(pipe, ...)) to follow its step count."
                )

    def restart(self, state) -> None:
        """A branch starts over: the first branch to do so starts a new generation, the others join it."""
        if state.generation == self.generation:
            self.generation += 1
        state.reset()
        state.generation = self.generation

    def _clock_timestep(self, context: CacheContext, step: int) -> float | None:
        """This call's timestep from the host's list (the context's where it gives one): no device read."""
        if context.timestep is not None:
            return float(context.timestep)
        index = self.offset + step
        timesteps = self.clock.timesteps
        return timesteps[index] if index < len(timesteps) else None

    def _timestep(self, context: CacheContext, args, kwargs) -> float | None:
        value = context.timestep
        if value is None:
            value = kwargs.get("timestep")
            if value is None and self._timestep_index is not None and self._timestep_index < len(args):
                value = args[self._timestep_index]
        if isinstance(value, torch.Tensor):
            # The largest: conditioning tokens at timestep 0 do not mark the step (per-token timesteps).
            return float(value.detach().amax()) if value.numel() else None
        return float(value) if isinstance(value, (int, float)) else None


def expert_windows(pipeline, scheduler, timesteps: list[float]) -> dict[str, tuple[int, int]]:
    """`{expert: (first step, end step)}` for a pipeline with two experts split at a boundary; `{}` otherwise."""
    ratio = getattr(getattr(pipeline, "config", None), "boundary_ratio", None)
    experts = [name for name in EXPERT_NAMES if getattr(pipeline, name, None) is not None]
    if ratio is None or len(experts) < 2:
        return {}
    boundary = ratio * scheduler.config.num_train_timesteps
    high = sum(1 for t in timesteps if t >= boundary)
    return {"transformer": (0, high), "transformer_2": (high, len(timesteps))}


def pipeline_experts(pipeline) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's denoisers that BWCache caches, by component name."""
    return [
        (name, module)
        for name in EXPERT_NAMES
        if isinstance(module := getattr(pipeline, name, None), torch.nn.Module)
    ]


def denoisers(transformer_or_pipeline) -> list[torch.nn.Module]:
    """The transformer itself, or every denoiser of a pipeline (both of Wan2.2's experts)."""
    if isinstance(transformer_or_pipeline, torch.nn.Module):
        return [transformer_or_pipeline]
    return [module for _, module in pipeline_experts(transformer_or_pipeline)]
