"""What a run's step count leaves the cache, said before it runs: no step left to reuse, a few-step run (distilled
models, Lightning-style LoRAs) where every step changes the video a lot, a profile tuned at many more steps."""

from __future__ import annotations

from .config import BWCacheConfig
from .schedule import config_schedule

# At or below this many steps a run is a few-step one: each step moves the video far, so a reused step costs more.
FEW_STEPS = 8


def no_room(config: BWCacheConfig, num_steps: int) -> str | None:
    """Why `config` can reuse nothing in `num_steps` steps, naming the settings (None when it can)."""
    if config.threshold == 0:
        return None
    if config.mode == "paper":
        # Whatever step the trigger falls on, its schedule computes every step: none ever reuses. (Each trigger
        # step is tried: under the official tail rule a trigger at step 1 reuses nothing, a later one may.)
        if all(all(config_schedule(config, k, num_steps)) for k in range(1, max(num_steps, 2))):
            return (f"with {num_steps} steps, paper mode's schedule (R={config.resolved_reuse_interval(num_steps)}, "
                    f"its tail) computes every step whatever step it triggers at: nothing is reused")
        return None
    first, end = max(config.warmup_steps, 1), num_steps - config.tail_steps
    if first >= end:
        return (f"with {num_steps} steps, the {config.warmup_steps} warm-up steps (warmup_steps) and the "
                f"{config.tail_steps} tail steps (tail_steps) leave no step to reuse")
    return None


def schedule_warnings(config: BWCacheConfig, num_steps: int, tuned_steps: int | None = None) -> list[str]:
    """What to say about running `config` for `num_steps` steps (`tuned_steps`: the steps its settings were tuned
    or calibrated at)."""
    notes = []
    room = no_room(config, num_steps)
    if room:
        notes.append(room + "; run uncached, or lower warm-up, tail or R for this step count.")
    if config.threshold > 0 and num_steps <= FEW_STEPS and not room:
        notes.append(f"{num_steps} steps is a few-step run (a distilled model or a Lightning-style LoRA): every step "
                     "changes the video a lot, so a reused one costs more quality; calibrate for this step count "
                     "(python -m bwcache calibrate) or run uncached.")
    if tuned_steps and config.threshold > 0 and num_steps * 2 <= tuned_steps:
        notes.append(f"These cache settings were tuned at {tuned_steps} steps and this run has {num_steps}: their "
                     "warm-up, tail and R count steps of a longer run; calibrate for this step count.")
    return notes
