"""What a user sends, checked before any model work: each field named as the app labels it, with its allowed range."""

from __future__ import annotations

import math
import re
import secrets
from pathlib import Path
from typing import Any, Mapping

from ..config import CACHE_SETTINGS, BWCacheConfig
from ..presets import Preset
from ..runner import SETTING_KEYS, resolve_config, resolve_settings
from ..settings import is_number, short_repr as _short

try:
    from ..peers import METHODS as PEER_METHODS
    from ..peers import UNAVAILABLE as UNAVAILABLE_PEERS
except ImportError:  # the peer comparison is optional
    PEER_METHODS: dict[str, str] = {}
    UNAVAILABLE_PEERS: dict[str, str] = {}

NO_PEER = "none"
MAX_SWEEP_POINTS = 8
SEED_MAX = 2**32 - 1
NEGATIVE_PROMPT_MAX_CHARS = 2000
# The generation fields a request may set (besides the prompts), as the app labels them.
_LABELS = {"num_inference_steps": "Steps", "num_frames": "Frames", "height": "Height", "width": "Width"}


def _whole(field: str, value: Any) -> int | None:
    """Whole numbers from UI fields (which may deliver 16.0) as int; None stays None."""
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(value) or not float(value).is_integer():
        raise ValueError(f"{field} must be a whole number, got {_short(value)}.")
    return int(value)


def _number(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{field} must be a number, got {_short(value)}.")
    return float(value)


def parse_thresholds(text: Any) -> list[float]:
    """A sweep's δ list from text such as "0.05, 0.1, 0.2": sorted, duplicates dropped."""
    lo, hi = CACHE_SETTINGS["threshold"].form_range
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [item for item in re.split(r"[,\s;]+", str(text or "").strip()) if item]
    if not items:
        raise ValueError(f"Sweep thresholds: give at least one δ from {lo:g} to {hi:g}, e.g. 0.05, 0.1, 0.2.")
    values = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"Sweep thresholds: {_short(item)} is not a number; write δ values from {lo:g} to "
                             f"{hi:g} separated by commas.") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"Sweep thresholds: δ = {_short(item) if not isinstance(item, str) else item[:40]} is outside the allowed range {lo:g} to {hi:g}.")
        values.append(value)
    values = sorted(set(values))
    if len(values) > MAX_SWEEP_POINTS:
        raise ValueError(f"Sweep thresholds: {len(values)} values given; at most {MAX_SWEEP_POINTS} per sweep.")
    return values


def parse_peer(value: Any) -> str | None:
    if value in (None, "", NO_PEER):
        return None
    if value in UNAVAILABLE_PEERS:
        raise ValueError(f"Compare against: {UNAVAILABLE_PEERS[value]}")
    if value not in PEER_METHODS:
        choices = ", ".join([NO_PEER, *PEER_METHODS])
        raise ValueError(f"Compare against: unknown method {_short(value)}; choose one of {choices}.")
    return value


def check_seed(seed: Any, randomize: Any = False) -> int | None:
    """The seed to use: a fresh one when `randomize` is True, None (the preset's) when left empty. Only true and
    false (or left out) say whether to randomize: "no", "yes" or 1 are refused, not read as true."""
    randomize = False if randomize is None else randomize
    if not isinstance(randomize, bool):
        raise ValueError(f"Randomize seed must be true or false, got {_short(randomize)}.")
    if randomize:
        return secrets.randbelow(SEED_MAX + 1)
    seed = _whole("Seed", seed)
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise ValueError(f"Seed = {_short(seed)} is outside the allowed range 0 to {SEED_MAX}.")
    return seed


def request_fields(preset: Preset) -> tuple[str, ...]:
    """The names a request may hold: the prompts, the seed, the profile, the generation settings and the cache
    settings the preset's form offers."""
    return (*SETTING_KEYS, "image", "seed", "profile", *(s.name for s in preset.settings.form))


def check_request(preset: Preset, profile_root: str | Path | None = None, **values: Any) -> dict:
    """Everything a comparison needs, checked before any model is loaded: keyword arguments for `run_comparison`
    / `run_sweep` with None meaning the preset's default. Raises ValueError naming the field as the app labels it
    and what is allowed. The profile is one of the preset's, or (given `profile_root`, the app's output folder) a
    profile file the app's Calibrate tab saved there for this preset (`bwcache.ui.calibration.app_profile`)."""
    unknown = sorted(set(values) - set(request_fields(preset)))
    if unknown:
        raise ValueError(f"Unknown setting(s) {unknown}; allowed: {', '.join(request_fields(preset))}.")
    profile = check_profile(preset, values.get("profile"), profile_root)
    negative_prompt = values.get("negative_prompt")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative prompt must be text, got {type(negative_prompt).__name__}.")
    if isinstance(negative_prompt, str) and len(negative_prompt) > NEGATIVE_PROMPT_MAX_CHARS:
        raise ValueError(f"negative prompt is {len(negative_prompt)} characters long; at most "
                         f"{NEGATIVE_PROMPT_MAX_CHARS} are allowed.")
    request = {
        "prompt": values.get("prompt"),
        "image": values.get("image"),
        "negative_prompt": negative_prompt,
        "seed": values.get("seed"),
        "profile": profile,
        **{key: _whole(label, values.get(key)) for key, label in _LABELS.items()},
        "guidance_scale": _number("Guidance scale", values.get("guidance_scale")),
    }
    request.update({s.name: s.parse(values.get(s.name)) for s in preset.settings.form})
    # The preset's limits, the prompt and the cache settings, with the runner's own checks.
    steps = resolved_settings(preset, request)["num_inference_steps"]
    reuse = request.get("reuse_interval")
    if isinstance(reuse, int) and reuse > steps:
        raise ValueError(f"R (reuse interval) = {reuse} is more than the {steps} steps; use 1 to {steps} or auto.")
    request_config(preset, request)
    return request


def check_profile(preset: Preset, profile: Any, profile_root: str | Path | None = None) -> str | None:
    """A profile of the preset's, or the path of a profile file the app saved under `profile_root` for it."""
    if profile is None or (isinstance(profile, str) and profile in preset.profile_names):
        return profile
    if profile_root is not None:
        from .calibration import app_profile

        path = app_profile(profile, profile_root, preset)
        if path is not None:
            return path
    saved = " or a profile file the Calibrate tab saved for it" if profile_root is not None else ""
    raise ValueError(f"Profile must be one of {', '.join(preset.profile_names)} for {preset.label}{saved}, "
                     f"got {_short(profile)}.")


def request_config(preset: Preset, request: Mapping[str, Any]) -> BWCacheConfig:
    """The cache configuration a checked request resolves to (preset defaults filled in)."""
    steps = resolved_settings(preset, request)["num_inference_steps"]
    return resolve_config(preset, steps, profile=request.get("profile"),
                          **{s.name: request.get(s.name) for s in preset.settings.form})


def resolved_settings(preset: Preset, request: Mapping[str, Any]) -> dict:
    """The generation settings a checked request resolves to (preset defaults filled in)."""
    return resolve_settings(preset, **{key: request.get(key) for key in (*SETTING_KEYS, "image", "seed")})
