"""The benchmark's catalogue: its methods (the table's rows) and prompt sets."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import peers
from ..apply import apply_bwcache
from ..runner import AUTO, resolve_config

# The prompts the embedded preset's defaults and profiles were tuned on.
TINY_PROMPTS = (
    "a red square moving right",
    "a blue circle moving left",
    "a green circle moving up",
    "a yellow square moving down",
    "a magenta circle moving right",
    "a cyan square moving left",
    "a white circle moving down",
    "a red circle moving up",
    "a white square moving right",
    "a blue square moving up",
)

# Prompts no default or profile was tuned on: the benchmark's default set, where its targets are read.
HELD_OUT_PROMPTS = (
    "a green square moving left",
    "a yellow circle moving right",
    "a magenta square moving up",
    "a cyan circle moving down",
    "a blue circle moving down",
    "a red square moving up",
    "a white circle moving left",
    "a yellow square moving right",
)
PROMPT_SETS = {"held-out": HELD_OUT_PROMPTS, "tuning": TINY_PROMPTS}


@dataclass
class Method:
    """One row of the table: BWCache with a config, or a peer with its parameters."""

    key: str
    label: str
    kind: str  # "bwcache", "steps" (uncached with fewer steps) or a peer key
    params: dict = field(default_factory=dict)
    family: str | None = None  # the plot's group; derived from kind and mode when None
    profile: str | None = None  # a BWCache row: the preset profile its params override
    parent: str | None = None  # a row this one varies: left out where it would run the parent's very config

    def enable(self, pipe, preset, settings, calibration):
        if self.kind == "bwcache":
            config = resolve_config(preset, settings["num_inference_steps"], profile=self.profile, request=settings,
                                    **self.params)
            handle = apply_bwcache(pipe, config)
            return handle.remove, handle
        if self.kind == "steps":
            return (lambda: None), None
        peer = peers.enable_peer(self.kind, pipe, settings, params=self.params, mag_ratios=calibration)
        return peer.remove, None

    def settings_for(self, settings: dict, steps: dict[str, int]) -> dict:
        """The generation settings of this row: the prompt's, with fewer steps for a "steps" row."""
        if self.kind != "steps":
            return settings
        return {**settings, "num_inference_steps": steps[self.key]}

    @property
    def group(self) -> str:
        """The plot's group: `family` when set, else one from the kind (and BWCache's mode)."""
        if self.family:
            return self.family
        if self.kind == "bwcache":
            return "BWCache block-wise" if self.params.get("mode") == "blockwise" else "BWCache paper"
        if self.kind == "steps":
            return "Ablations"
        return peers.METHODS.get(self.kind) or peers.cachedit.METHODS[self.kind]


def default_methods() -> list[Method]:
    # The preset's own profiles first: the rows the targets are read from.
    methods = [Method("bw-default", "BWCache preset default", "bwcache", {}, family="BWCache profiles"),
               Method("bw-fast", "BWCache fast profile", "bwcache", {}, family="BWCache profiles", profile="fast")]
    # Ablations: each profile with its residuals reused unchanged (no extrapolation), its schedule without the
    # indicator, and the uncached pipeline with fewer steps in about the same compute (the paper's Table 3 baseline).
    for profile in ("default", "fast"):
        methods.append(Method(f"bw-{profile}-unchanged", f"BWCache {profile} profile, residuals unchanged", "bwcache",
                              {"extrapolation": 0.0}, family="Ablations", profile=profile, parent=f"bw-{profile}"))
    methods.append(Method("static-default", "Static schedule (default's warm-up, R, tail)", "bwcache",
                          {"mode": "static"}, family="Ablations"))
    methods.append(Method("static-fast", "Static schedule (fast profile's warm-up, R, tail)", "bwcache",
                          {"mode": "static"}, family="Ablations", profile="fast"))
    for matched in ("bw-default", "bw-fast"):
        methods.append(Method(f"steps-as-{matched}", f"Fewer steps, {matched}'s compute", "steps",
                              {"match": matched}, family="Ablations"))
    # Paper rows pin the published method (mode and R = 10% of the steps), whatever the preset's default is.
    paper = {"mode": "paper", "reuse_interval": AUTO}
    for delta in (0.02, 0.03, 0.05, 0.1, 0.15):
        methods.append(Method(f"bw-paper-{delta:g}", f"BWCache paper δ={delta:g}", "bwcache", {**paper, "threshold": delta}))
    for r in (1, 2):
        methods.append(
            Method(f"bw-paper-0.15-r{r}", f"BWCache paper δ=0.15 R={r}", "bwcache",
                   {**paper, "threshold": 0.15, "reuse_interval": r})
        )
    # The official code's decisions (BWCacheConfig.official): modulated feature, R = 3 steps, its tail rule.
    official = {"mode": "paper", "reuse_interval": 3, "indicator_feature": "modulated", "tail_rule": "official",
                "tail_fraction": 0.5, "indicator_token_stride": 1}
    for delta in (0.045, 0.05, 0.1, 0.15):
        methods.append(Method(f"bw-official-{delta:g}", f"BWCache official δ={delta:g}", "bwcache",
                              {**official, "threshold": delta}, family="BWCache official"))
    for r in (1, 2):
        methods.append(Method(f"bw-official-0.15-r{r}", f"BWCache official δ=0.15 R={r}", "bwcache",
                              {**official, "threshold": 0.15, "reuse_interval": r}, family="BWCache official"))
    # Block-wise rows keep the preset's other settings (R, warm-up and tail steps) and vary δ.
    for delta in (0.1, 0.2, 0.3, 0.4):
        methods.append(
            Method(f"bw-block-{delta:g}", f"BWCache block-wise δ={delta:g}", "bwcache", {"threshold": delta, "mode": "blockwise"})
        )
    for r in (1, 3):
        methods.append(
            Method(f"bw-block-0.3-r{r}", f"BWCache block-wise δ=0.3 R={r}", "bwcache",
                   {"threshold": 0.3, "mode": "blockwise", "reuse_interval": r})
        )
    methods.append(
        Method("bw-block-0.3-w2", "BWCache block-wise δ=0.3, 2 warm-up steps", "bwcache",
               {"threshold": 0.3, "mode": "blockwise", "warmup_steps": 2})
    )
    for t in (0.05, 0.1, 0.2):
        methods.append(Method(f"fbc-{t:g}", f"FirstBlockCache {t:g}", "fbc", {"threshold": t}))
    for t in (0.06, 0.12):
        methods.append(Method(f"magcache-{t:g}", f"MagCache {t:g}", "magcache", {"threshold": t}))
    for n in (3, 5):
        methods.append(Method(f"taylorseer-{n}", f"TaylorSeer interval {n}", "taylorseer", {"cache_interval": n}))
    for t in (0.25, 0.5):
        methods.append(Method(f"seacache-{t:g}", f"SeaCache {t:g}", "seacache", {"threshold": t}))
    methods.append(Method("pab-2", "PAB spatial 2", "pab", {}))
    # cache-dit's DBCache at its Wan settings (F1B0, 2 warm-up steps, at most 2 cached steps in a row), alone and
    # with its TaylorSeer calibrator, at its recommended residual-difference threshold and two faster ones.
    for key in ("cachedit", "cachedit-taylorseer"):
        for t in (0.08, 0.12, 0.16):
            label = f"{peers.cachedit.METHODS[key]} {t:g}"
            methods.append(Method(f"{key}-{t:g}", label, key, {"residual_diff_threshold": t}))
    return methods


# The row of a profile file (`--profile-file`).
CALIBRATED = "bw-calibrated"


def calibrated_method(profile_file) -> Method:
    """The row of a profile file made by `python -m bwcache calibrate`: its settings, as `profile=` loads them."""
    from pathlib import Path

    return Method(CALIBRATED, f"BWCache calibrated profile ({Path(profile_file).name})", "bwcache", {},
                  family="BWCache profiles", profile=str(profile_file))


def select_methods(keys: str | None, profile_file=None) -> list[Method]:
    """The methods named in a comma-separated list (all when None), in table order; each "steps" row needs the row
    whose compute it matches. With a `profile_file`, its row (`bw-calibrated`) comes after the preset's profiles,
    whether or not the list names it."""
    methods = default_methods()
    if profile_file is not None:
        methods.insert(2, calibrated_method(profile_file))
    if keys:
        wanted = [k.strip() for k in keys.split(",") if k.strip()]
        if CALIBRATED in wanted and profile_file is None:
            raise ValueError(f"Method {CALIBRATED} runs a profile file: give it with --profile-file.")
        unknown = sorted(set(wanted) - {m.key for m in methods})
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; see --list-methods.")
        methods = [m for m in methods if m.key in wanted or m.key == CALIBRATED]
    chosen = {m.key for m in methods}
    for m in methods:
        if m.kind == "steps" and m.params["match"] not in chosen:
            raise ValueError(f"Method {m.key} runs as many steps as {m.params['match']}'s compute allows: add "
                             f"{m.params['match']} to --methods.")
    return methods
