"""When to reuse: the decision rules of BWCache's two modes, apart from how reuse is done (`bwcache.hooks`).

A policy reads and updates the decision fields of a branch's state (schedule, trigger, consecutive reuses) and
answers the hooks' questions at three points of a transformer call:

    plan_step(state)                        at its start: is this a computed step, which residuals are worth keeping
    drops_residuals(state)                  then: is every residual cached so far past use?
    measure(state, i, has_residual)         before block i of a computed step: measure its distance? may it reuse?
    distance_offset(state, i)               what the decision adds to block i's measured distance
    decide(state, i, distance)              with that distance (block-wise mode): reuse block i?
    close_step(state, distances, measured)  at its end, with the step's distances as floats: indicator, trigger

and says how its mode's reuse is done, which the mechanics follow without knowing the mode: whether blocks that feed
each other share one residual (`chains_blocks`), and which feature a distance is measured from
(`references_previous_step`, `references_computed_input`, `moves_reference_on_reuse`).

The hooks call these through `torch.compiler.disable`d functions, so no decision is ever traced into a compiled
graph, and the distances a policy sees are the only values it decides on (the one place a multi-process run must
agree on).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import BWCacheConfig
from .schedule import config_schedule


@dataclass
class BlockPlan:
    """What the hooks do before running block i."""

    measure: bool = False
    may_reuse: bool = False
    # Whether a later step may reuse the block: its residual is kept (and its input as the reference of its next
    # distance, where distances are measured from a computed block's input).
    keep: bool = True


@dataclass
class StepOutcome:
    """What a finished step decided, for the trace."""

    indicator: float | None
    reused_blocks: set[int] = field(default_factory=set)
    trigger_step: int | None = None


class Policy:
    """The interface the hooks call; see the module docstring."""

    # Whether decisions rest on measured distances (a policy that never measures keeps no reference features).
    measures = True
    # Whether a reused step skips every block, so that blocks which hand their output straight to the next one form
    # chains whose residuals telescope: one residual per chain, added at its first block, the others pass their
    # input through. Else each block decides, runs and keeps its residual on its own.
    chains_blocks = False
    # Whether each measured feature is the reference of the next step's distance (step-to-step distances). Else the
    # reference is the input a block's residual was computed on.
    references_previous_step = False

    def __init__(self, config: BWCacheConfig, indicator_blocks: set[int], num_blocks: int):
        self.config = config
        self.indicator_blocks = indicator_blocks
        self.num_blocks = num_blocks

    @property
    def references_computed_input(self) -> bool:
        """Whether a computed block's input becomes the reference of its next distance (where its plan keeps it)."""
        return self.measures and not self.references_previous_step

    @property
    def moves_reference_on_reuse(self) -> bool:
        """Whether a block reused on its distance takes this step's feature as its next reference."""
        return False

    def plan_step(self, state) -> None:
        raise NotImplementedError

    def drops_residuals(self, state) -> bool:
        """At the start of a step, after `plan_step`: whether no residual cached so far will be read again (this step
        reuses none, and none is kept for a later one), so all of them are dropped now."""
        return False

    def measure(self, state, i: int, has_residual: bool) -> BlockPlan:
        raise NotImplementedError

    def distance_offset(self, state, i: int) -> float:
        """What block i's decision adds to the distance just measured."""
        return 0.0

    def decide(self, state, i: int, distance: float | None) -> bool:
        """Reuse block i? `distance` is None where the plan reuses without measuring."""
        return False

    def block_computed(self, state, i: int) -> None:
        """Block i ran this step."""

    def keeps_features(self, state) -> bool:
        """Whether the stored reference features are still needed after this step."""
        return True

    def keeps_residuals(self, state) -> bool:
        """Whether a computed step's residuals are still needed after it."""
        return True

    def close_step(self, state, distances: dict[int, float], measured: dict[int, float]) -> StepOutcome:
        raise NotImplementedError


class PaperPolicy(Policy):
    """The published method: one indicator per step triggers a fixed schedule in which a reused step runs no block.

    Step 0 is computed. At each computed step s ≥ 1 before the trigger the indicator is the mean relative-L1
    distance of the indicator blocks' inputs to the previous step's; the first step k with indicator < δ starts
    `paper_schedule(k, T, R, tail_fraction, paper_tail_steps, tail_rule)`. After the trigger no distance is measured.
    """

    chains_blocks = True
    references_previous_step = True

    def plan_step(self, state) -> None:
        state.computed_step = state.schedule is None or state.schedule[state.step]
        state.need_residuals = state.computed_step and self._needs_residuals(state)

    def drops_residuals(self, state) -> bool:
        """A computed step reads no residual: those cached are dropped unless a later step may reuse them."""
        return state.computed_step and not state.need_residuals

    def _needs_residuals(self, state) -> bool:
        """Whether a later step of this branch may reuse what this computed step produces."""
        if self.config.threshold == 0:
            return False
        step, schedule = state.step, state.schedule
        if schedule is None:
            T = state.num_steps
            # A trigger at this very step would start the schedule from here; when extrapolating, one at the next
            # step would extrapolate from this step's residual too.
            if step >= 1 and not all(config_schedule(self.config, step, T)[step + 1 :]):
                return True
            return self.config.extrapolation > 0 and step + 1 < T and not all(
                config_schedule(self.config, step + 1, T)[step + 2 :]
            )
        return not all(schedule[step + 1 :])

    def measure(self, state, i: int, has_residual: bool) -> BlockPlan:
        # Asked on computed steps only: a reused step runs no block.
        return BlockPlan(measure=state.schedule is None and i in self.indicator_blocks)

    def close_step(self, state, distances: dict[int, float], measured: dict[int, float]) -> StepOutcome:
        config, step = self.config, state.step
        # Mean over the indicator blocks that ran this step (a forward may leave some blocks out).
        values = [distances[i] for i in self.indicator_blocks if i in distances]
        indicator = sum(values) / len(values) if values else None
        if state.computed_step and state.schedule is None and indicator is not None and step >= 1:
            if indicator < config.threshold:
                state.trigger_step = step
                state.schedule = config_schedule(config, step, state.num_steps)
        reused = set() if state.computed_step else set(range(self.num_blocks))
        return StepOutcome(indicator, reused, state.trigger_step)

    def keeps_features(self, state) -> bool:
        """Before the trigger the next step measures against this one; after it, no indicator work is done."""
        return state.schedule is None

    def keeps_residuals(self, state) -> bool:
        """Without a trigger the next step is computed, so this step's residual would never be read (but as the
        older point of an extrapolation)."""
        return state.schedule is not None or self.config.extrapolation > 0


class BlockwisePolicy(Policy):
    """Each block decides on its own, every step (an extension of the paper).

    Block i reuses its residual at step s when i is an indicator block, `warmup_steps ≤ s < T − tail_steps`, it
    has a residual, it has reused fewer than R consecutive steps, and its distance (to the input its residual was
    computed on, or with `accumulate_distance` the sum of step-to-step distances since then) is below δ. The
    distance is measured only where it decides; at δ = 0 nothing is reused and every distance is measured.
    """

    def plan_step(self, state) -> None:
        config, step, T = self.config, state.step, state.num_steps
        state.computed_step = True
        state.reuse_window = T is not None and config.warmup_steps <= step < T - config.tail_steps
        # A residual (and the input it is measured against) is worth keeping only if the next step may reuse it,
        # or, when extrapolating, the one after it.
        ahead = 2 if config.extrapolation > 0 else 1
        state.need_residuals = (
            config.threshold > 0 and T is not None and config.warmup_steps <= step + ahead
            and step + 1 < T - config.tail_steps
        )

    def measure(self, state, i: int, has_residual: bool) -> BlockPlan:
        if i not in self.indicator_blocks:
            return BlockPlan(keep=False)
        observe = self.config.threshold == 0
        may_reuse = state.reuse_window and has_residual and state.consecutive[i] < state.reuse_interval
        return BlockPlan(measure=may_reuse or observe, may_reuse=may_reuse, keep=state.need_residuals or observe)

    @property
    def moves_reference_on_reuse(self) -> bool:
        """With `accumulate_distance` distances add up step to step, so a reuse moves the reference along."""
        return self.config.accumulate_distance

    def distance_offset(self, state, i: int) -> float:
        """With `accumulate_distance`, the sum of the distances since block i was last computed."""
        return state.accumulated[i] if self.config.accumulate_distance else 0.0

    def decide(self, state, i: int, distance: float) -> bool:
        # A NaN or infinite distance (a diverging block, an overflow) never licenses a reuse: the block computes.
        if not math.isfinite(distance) or distance >= self.config.threshold:
            return False
        if self.config.accumulate_distance:
            state.accumulated[i] = distance
        return self._reuse(state, i)

    @staticmethod
    def _reuse(state, i: int) -> bool:
        """Count a reuse of block i (its run of consecutive reuses, the branch's first reuse step)."""
        state.consecutive[i] += 1
        if state.first_reuse_step is None:
            state.first_reuse_step = state.step
        return True

    def block_computed(self, state, i: int) -> None:
        state.consecutive[i] = 0
        state.accumulated[i] = 0.0

    def close_step(self, state, distances: dict[int, float], measured: dict[int, float]) -> StepOutcome:
        values = {**distances, **measured}
        indicator = sum(values.values()) / len(values) if values else None
        return StepOutcome(indicator, set(state.step_reused), state.first_reuse_step)


class StaticPolicy(BlockwisePolicy):
    """Block-wise mode's schedule with no indicator: the ablation that shows what the distances decide.

    Block i (an indicator block) reuses its residual at step s when `warmup_steps ≤ s < T − tail_steps`, it has a
    residual and it has reused fewer than R consecutive steps; nothing is measured. At δ = 0 nothing is reused.
    """

    measures = False

    def measure(self, state, i: int, has_residual: bool) -> BlockPlan:
        if i not in self.indicator_blocks or self.config.threshold == 0:
            return BlockPlan(keep=False)
        may_reuse = state.reuse_window and has_residual and state.consecutive[i] < state.reuse_interval
        return BlockPlan(may_reuse=may_reuse, keep=state.need_residuals)

    def decide(self, state, i: int, distance: float | None) -> bool:
        return self._reuse(state, i)


POLICIES = {"paper": PaperPolicy, "blockwise": BlockwisePolicy, "static": StaticPolicy}


def distance_map_config(config: BWCacheConfig) -> BWCacheConfig:
    """The threshold-0 config whose run maps the distances `config` decides on (its feature, indicator blocks,
    token stride and storage dtype) and reuses nothing: in its own mode where that mode measures, in block-wise
    mode for static mode, which measures nothing."""
    mode = config.mode if POLICIES[config.mode].measures else "blockwise"
    return dataclasses.replace(config, threshold=0.0, mode=mode, extrapolation=0.0, record_trace=True)


def make_policy(config: BWCacheConfig, num_blocks: int) -> Policy:
    indicator_blocks = set(config.resolve_indicator_blocks(num_blocks))
    return POLICIES[config.mode](config, indicator_blocks, num_blocks)
