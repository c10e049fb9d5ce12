"""The record of every distance and decision of one generation, per CFG branch."""

from __future__ import annotations

import math

from .config import BWCacheConfig


class BranchTrace:
    """Distances and decisions of one branch (`cond`, `uncond`, `default`, …), indexed by step within the branch."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.indicator: list[float | None] = []
        self.distance: list[list[float | None]] = []
        self.reused: list[list[bool]] = []
        self.timesteps: list[float | None] = []
        # Which transformer took each step (`None` where the pipeline has one): Wan2.2's experts split the steps.
        self.experts: list[str | None] = []
        self.trigger_step: int | None = None
        # [step, block] of every non-finite distance (NaN, ±inf; block None: the step's indicator): recorded as
        # None, and never a reason to reuse.
        self.nonfinite: list[list[int | None]] = []
        # Per expert, its trigger step (paper mode) or first reuse (block-wise mode).
        self.triggers: dict[str | None, int | None] = {}

    def set_trigger(self, expert: str | None, step: int | None) -> None:
        self.triggers[expert] = step
        found = [s for s in self.triggers.values() if s is not None]
        self.trigger_step = min(found) if found else None

    def record(self, step: int, indicator: float | None, distances: dict[int, float]) -> None:
        """A step's indicator and distances, non-finite ones as None and listed in `nonfinite`."""
        self.indicator[step] = self._finite(step, None, indicator)
        for i, value in distances.items():
            self.distance[step][i] = self._finite(step, i, value)

    def _finite(self, step: int, block: int | None, value: float | None) -> float | None:
        if value is None or math.isfinite(value):
            return value
        self.nonfinite.append([step, block])
        return None

    def ensure_step(self, step: int) -> None:
        while len(self.indicator) <= step:
            self.indicator.append(None)
            self.distance.append([None] * self.num_blocks)
            self.reused.append([False] * self.num_blocks)
            self.timesteps.append(None)
            self.experts.append(None)

    @property
    def num_steps(self) -> int:
        return len(self.indicator)

    @property
    def reused_blocks(self) -> int:
        return sum(sum(row) for row in self.reused)

    def to_dict(self) -> dict:
        data = {
            "indicator": list(self.indicator),
            "distance": [list(row) for row in self.distance],
            "reused": [list(row) for row in self.reused],
            "trigger_step": self.trigger_step,
            "timesteps": list(self.timesteps),
        }
        if self.nonfinite:
            data["nonfinite"] = [list(pair) for pair in self.nonfinite]
        if any(expert is not None for expert in self.experts):
            data["experts"] = list(self.experts)
            data["triggers"] = {name: step for name, step in self.triggers.items() if name is not None}
        return data


class Trace:
    """What the cache saw and did during the last generation. Survives the pipeline's end-of-call reset."""

    def __init__(self, config: BWCacheConfig, block_names: list[str], model_name: str = ""):
        self.config = config
        self.block_names = list(block_names)
        self.model_name = model_name
        self.branches: dict[str, BranchTrace] = {}
        # The most bytes of cached residuals and features held at the end of a transformer call, all branches.
        self.held_bytes_peak = 0
        self._held: dict[str | None, int] = {}
        self.generation = None
        # diffusers' context parallelism the generation ran under (`ulysses×2`), or None for one process.
        self.context_parallel: str | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def clear(self) -> None:
        self.branches = {}
        self.held_bytes_peak = 0
        self._held = {}
        self.context_parallel = None

    def start_generation(self, key) -> None:
        """Start afresh when `key` names another generation than the one recorded."""
        if key != self.generation:
            self.clear()
            self.generation = key

    def note_held(self, expert: str | None, nbytes: int) -> None:
        """What one transformer's cache holds now; the peak is over all transformers together."""
        self._held[expert] = nbytes
        self.held_bytes_peak = max(self.held_bytes_peak, sum(self._held.values()))

    def branch(self, name: str) -> BranchTrace:
        if name not in self.branches:
            self.branches[name] = BranchTrace(self.num_blocks)
        return self.branches[name]

    @property
    def reuse_fraction(self) -> float:
        """Skipped block evaluations over all block evaluations, all branches together."""
        total = sum(b.num_steps for b in self.branches.values()) * self.num_blocks
        return sum(b.reused_blocks for b in self.branches.values()) / total if total else 0.0

    def to_dict(self) -> dict:
        data = {
            "config": self.config.to_dict(),
            "model": self.model_name,
            "num_blocks": self.num_blocks,
            "block_names": list(self.block_names),
            "branches": {name: branch.to_dict() for name, branch in self.branches.items()},
            "held_bytes_peak": self.held_bytes_peak,
        }
        if self.context_parallel:
            data["context_parallel"] = self.context_parallel
        return data

    def summary(self) -> str:
        return summarize(self.to_dict())


def reuse_fraction(trace_dict: dict) -> float:
    """Skipped block evaluations over all block evaluations, from a trace dict."""
    branches = trace_dict["branches"].values()
    total = sum(len(b["reused"]) for b in branches) * trace_dict["num_blocks"]
    return sum(sum(map(sum, b["reused"])) for b in branches) / total if total else 0.0


def summarize(trace_dict: dict) -> str:
    """A readable account of what the cache did, from a trace dict."""
    config = trace_dict["config"]
    num_blocks = trace_dict["num_blocks"]
    r = config.get("reuse_interval")
    knobs = f"δ={config['threshold']:g}, R={'auto' if r is None else r}"
    if config["mode"] == "paper":
        steps = config.get("paper_tail_steps")
        knobs += f", tail={steps} steps" if steps else f", tail={config['tail_fraction']:g}"
        if config.get("tail_rule", "guarded") == "official":
            knobs += " (official rule)"
    if config.get("indicator_feature", "hidden_states") == "modulated":
        knobs += ", modulated attention input"
    model = f" on {trace_dict['model']}" if trace_dict.get("model") else ""
    lines = [f"BWCache ({config['mode']} mode, {knobs}){model}, {num_blocks} blocks"]
    if trace_dict.get("context_parallel"):
        lines.append(
            f"  context parallel ({trace_dict['context_parallel']}): distances summed over all processes, "
            "every process takes the same decisions"
        )
    if not trace_dict["branches"]:
        lines.append("  no denoising step recorded yet")
        return "\n".join(lines)
    skipped = total = 0
    rows = list(_summary_rows(trace_dict))
    width = max(len(label) for label, *_ in rows)
    for label, trigger, reused_rows, steps in rows:
        reused = sum(sum(row) for row in reused_rows)
        reused_steps = sum(all(row) for row in reused_rows) if num_blocks else 0
        cells = len(reused_rows) * num_blocks
        skipped += reused
        total += cells
        trigger_text = "no trigger" if trigger is None else f"trigger at step {trigger}"
        share = reused / cells if cells else 0.0
        lines.append(
            f"  {label:<{width}}  {trigger_text}; {reused_steps}/{steps} steps fully reused; "
            f"{reused}/{cells} block evaluations skipped ({share:.1%})"
        )
    lines.append(f"  overall: {skipped / total if total else 0.0:.1%} of block evaluations skipped")
    nonfinite = sum(len(branch.get("nonfinite", ())) for branch in trace_dict["branches"].values())
    if nonfinite:
        lines.append(f"  {nonfinite} non-finite distance(s) (NaN or inf): those blocks and steps were computed")
    held = held_memory_text(trace_dict)
    if held:
        lines.append(f"  cache memory: {held}")
    return "\n".join(lines)


def _summary_rows(trace_dict: dict):
    """(label, trigger, reuse rows, step count) per branch, or per expert and branch where experts split the steps."""
    for name, branch in trace_dict["branches"].items():
        experts = branch.get("experts")
        if not experts:
            yield name, branch["trigger_step"], branch["reused"], len(branch["indicator"])
            continue
        for expert in dict.fromkeys(e for e in experts if e is not None):
            steps = [s for s, e in enumerate(experts) if e == expert]
            rows = [branch["reused"][s] for s in steps]
            label = f"{expert}/{name}"
            trigger = branch.get("triggers", {}).get(expert)
            yield f"{label} (steps {steps[0]}–{steps[-1]})", trigger, rows, len(steps)


def held_memory_text(trace_dict: dict) -> str | None:
    """What the cache held at most, in words (None for a record without the figure, or nothing held)."""
    held = trace_dict.get("held_bytes_peak")
    if not held:
        return None
    dtype = trace_dict["config"].get("cache_dtype")
    storage = f", stored as {dtype}" if dtype else ""
    where = " per process" if trace_dict.get("context_parallel") else ""
    return f"at most {format_bytes(held)} of residuals and features held between calls{where}{storage}"


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
