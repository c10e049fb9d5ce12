"""Where a transformer call sits in its pipeline's generation, read from the pipeline's own scheduler.

Every diffusers pipeline starts a generation with `scheduler.set_timesteps(...)`, which puts a new `timesteps`
tensor on the scheduler. The clock watches that object: a new one is a new generation (however the previous call
ended: finished, raised in a callback, cancelled, out of memory), and its length, less the scheduler's begin index,
is the number of denoising steps, whether or not the pipeline passes it to its cache context. The step index of a
call is the number of calls of its branch (`cond`, `uncond`, …) so far in this generation.

Pipelines with two experts (Wan2.2 A14B: `transformer` for high noise, `transformer_2` for low noise) split the
steps at `boundary_ratio · num_train_timesteps`; the clock gives each expert its window of steps, so each keeps its
own schedule.
"""

from __future__ import annotations

import weakref

import torch

# Components that are denoisers, in the order a pipeline runs them.
EXPERT_NAMES = ("transformer", "transformer_2")


class PipelineClock:
    def __init__(self, pipeline):
        self._pipeline = weakref.ref(pipeline)
        self._timesteps = None
        self.generation = 0
        self.num_steps: int | None = None
        self.windows: dict[str, tuple[int, int]] = {}
        self._calls: dict[str, int] = {}
        # The cache hook of each expert, by component name.
        self.hooks: dict[str, object] = {}

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
        begin = getattr(scheduler, "begin_index", None) or 0
        values = [float(t) for t in torch.as_tensor(timesteps).flatten()[begin:].tolist()]
        self.num_steps = len(values)
        self.windows = expert_windows(pipeline, scheduler, values)

    def next_step(self, branch: str) -> int | None:
        """The step index of a call of `branch` that gives none itself (counted within this generation)."""
        if self._timesteps is None:
            return None
        step = self._calls.get(branch, 0)
        self._calls[branch] = step + 1
        return step


    def release_finished(self, hook) -> None:
        """When an expert's steps begin, the experts whose steps are over free what they cached."""
        window = self.windows.get(hook.expert)
        if window is None:
            return
        for name, other in self.hooks.items():
            done = self.windows.get(name)
            if other is not hook and done is not None and done[1] <= window[0] and other.states:
                other.release()


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
