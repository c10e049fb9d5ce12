"""The record of every distance and decision of one generation, per CFG branch."""

from __future__ import annotations

from .config import BWCacheConfig


class BranchTrace:
    """Distances and decisions of one branch (`cond`, `uncond`, `default`, …), indexed by step within the branch."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.indicator: list[float | None] = []
        self.distance: list[list[float | None]] = []
        self.reused: list[list[bool]] = []
        self.timesteps: list[float | None] = []
        self.trigger_step: int | None = None

    def ensure_step(self, step: int) -> None:
        while len(self.indicator) <= step:
            self.indicator.append(None)
            self.distance.append([None] * self.num_blocks)
            self.reused.append([False] * self.num_blocks)
            self.timesteps.append(None)

    @property
    def num_steps(self) -> int:
        return len(self.indicator)

    @property
    def reused_blocks(self) -> int:
        return sum(sum(row) for row in self.reused)

    def to_dict(self) -> dict:
        return {
            "indicator": list(self.indicator),
            "distance": [list(row) for row in self.distance],
            "reused": [list(row) for row in self.reused],
            "trigger_step": self.trigger_step,
            "timesteps": list(self.timesteps),
        }


class Trace:
    """What the cache saw and did during the last generation. Survives the pipeline's end-of-call reset."""

    def __init__(self, config: BWCacheConfig, block_names: list[str], model_name: str = ""):
        self.config = config
        self.block_names = list(block_names)
        self.model_name = model_name
        self.branches: dict[str, BranchTrace] = {}
        # The most bytes of cached residuals and features held at the end of a transformer call, all branches.
        self.held_bytes_peak = 0

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def clear(self) -> None:
        self.branches = {}
        self.held_bytes_peak = 0

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
        return {
            "config": self.config.to_dict(),
            "model": self.model_name,
            "num_blocks": self.num_blocks,
            "block_names": list(self.block_names),
            "branches": {name: branch.to_dict() for name, branch in self.branches.items()},
            "held_bytes_peak": self.held_bytes_peak,
        }

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
        knobs += f", tail={config['tail_fraction']:g}"
    model = f" on {trace_dict['model']}" if trace_dict.get("model") else ""
    lines = [f"BWCache ({config['mode']} mode, {knobs}){model}, {num_blocks} blocks"]
    if not trace_dict["branches"]:
        lines.append("  no denoising step recorded yet")
        return "\n".join(lines)
    skipped = total = 0
    width = max(len(name) for name in trace_dict["branches"])
    for name, branch in trace_dict["branches"].items():
        steps = len(branch["indicator"])
        reused = sum(sum(row) for row in branch["reused"])
        reused_steps = sum(all(row) for row in branch["reused"]) if num_blocks else 0
        cells = steps * num_blocks
        skipped += reused
        total += cells
        trigger = branch["trigger_step"]
        trigger_text = "no trigger" if trigger is None else f"trigger at step {trigger}"
        share = reused / cells if cells else 0.0
        lines.append(
            f"  {name:<{width}}  {trigger_text}; {reused_steps}/{steps} steps fully reused; "
            f"{reused}/{cells} block evaluations skipped ({share:.1%})"
        )
    lines.append(f"  overall: {skipped / total if total else 0.0:.1%} of block evaluations skipped")
    held = held_memory_text(trace_dict)
    if held:
        lines.append(f"  cache memory: {held}")
    return "\n".join(lines)


def held_memory_text(trace_dict: dict) -> str | None:
    """What the cache held at most, in words (None for a record without the figure, or nothing held)."""
    held = trace_dict.get("held_bytes_peak")
    if not held:
        return None
    dtype = trace_dict["config"].get("cache_dtype")
    storage = f", stored as {dtype}" if dtype else ""
    return f"at most {format_bytes(held)} of residuals and features held between calls{storage}"


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"
