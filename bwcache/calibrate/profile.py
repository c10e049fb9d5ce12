"""Profile files: a calibration's chosen cache settings, the setting they were measured for, and what was measured.

A profile file is JSON (`Calibration.save`):

    format: "bwcache-profile", version: 1
    bwcache:  the cache settings (every key a preset's `bwcache` section may hold), for `setting`'s step count
    fractions: the settings counted in steps (warm-up, tail, R) as shares of that step count, so that a run with
               another step count scales them (`settings_for`)
    setting:  what they were measured on: transformer_class, transformer_config, pipeline_class, scheduler_class,
              dtype, num_inference_steps, height, width, num_frames, guidance_scale (and preset, when made from
              one); a key left out, or null, is not compared
    target, met, message: the target asked for and whether the measurements met it
    measured: the chosen settings' figures (speedup with its range, PSNR, SSIM, compute skipped)
    frontier: the measured speed–PSNR frontier, every point with its settings
    candidates, prompts, generations, seconds, created, versions: the calibration's own account

It loads wherever a preset's built-in profiles do (`profile=` given a path to a .json file): `resolve_config`,
`run_comparison`, `python -m bwcache compare --profile-file`, `python -m bwcache bench --profile-file`. Used at
another step count, size or model than `setting` says, it warns (`ProfileMismatchWarning`), naming the differences.

This module imports only the config, so presets can read profile files without loading models.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import CACHE_SETTINGS, BWCacheConfig

FORMAT = "bwcache-profile"
VERSION = 1
# Settings counted in steps, stored as shares of the step count too (R only where it is set: None is already 10%).
STEP_SETTINGS = ("warmup_steps", "tail_steps", "reuse_interval", "paper_tail_steps")
_MINIMUM = {"warmup_steps": 0, "tail_steps": 0, "reuse_interval": 1, "paper_tail_steps": 1}
# What a setting description holds, and how each difference is named.
SETTING_LABELS = {
    "preset": "preset",
    "transformer_class": "transformer",
    "transformer_config": "transformer config",
    "pipeline_class": "pipeline",
    "scheduler_class": "scheduler",
    "dtype": "dtype",
    "num_inference_steps": "steps",
    "height": "height",
    "width": "width",
    "num_frames": "frames",
    "guidance_scale": "guidance scale",
}


class ProfileMismatchWarning(UserWarning):
    """A profile file used on another setting than the one it was measured for."""


def is_profile_path(profile: Any) -> bool:
    """Whether a `profile=` argument names a profile file (a path ending in .json) rather than a built-in profile."""
    return isinstance(profile, (str, os.PathLike)) and str(profile).lower().endswith(".json")


@dataclass
class ProfileFile:
    """A profile file, read and checked."""

    bwcache: dict
    setting: dict
    fractions: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    met: bool = True
    message: str = ""
    measured: dict = field(default_factory=dict)
    frontier: list = field(default_factory=list)
    data: dict = field(default_factory=dict, repr=False)
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<profile>"

    def settings_for(self, num_steps: int | None = None) -> dict:
        """The cache settings for a run of `num_steps` steps: as saved at the measured step count, those counted in
        steps scaled from their shares of it at another."""
        values = dict(self.bwcache)
        measured_steps = self.setting.get("num_inference_steps")
        if num_steps is None or measured_steps in (None, num_steps):
            return values
        for name, share in self.fractions.items():
            if values.get(name) is not None:
                values[name] = max(_MINIMUM[name], int(round(share * num_steps)))
        return values

    def config(self, num_steps: int | None = None) -> BWCacheConfig:
        values = self.settings_for(num_steps)
        if num_steps is not None:
            values["num_inference_steps"] = num_steps
        return CACHE_SETTINGS.make(values)

    def mismatches(self, setting: Mapping[str, Any]) -> list[str]:
        """How `setting` (the same keys as the file's) differs from the one the profile was measured on: one phrase per
        difference; keys unknown on either side are not compared."""
        found = []
        for key, label in SETTING_LABELS.items():
            mine, theirs = self.setting.get(key), setting.get(key)
            if mine is None or theirs is None:
                continue
            if key == "transformer_config":
                differing = config_differences(mine, theirs)
                if differing:
                    found.append(f"transformer config ({', '.join(differing[:4])}"
                                 f"{', …' if len(differing) > 4 else ''})")
                continue
            if not _same(mine, theirs):
                found.append(f"{label} {_show(theirs)} (measured at {_show(mine)})")
        return found

    def warnings_for(self, setting: Mapping[str, Any]) -> list[str]:
        """What to tell whoever uses the profile on `setting`: the differences, and a missed target."""
        notes = []
        differences = self.mismatches(setting)
        if differences:
            notes.append(f"Profile file {self.name} was calibrated on another setting: {'; '.join(differences)}. "
                         "Its speed and quality may not hold here; calibrate again for this setting.")
        if not self.met:
            notes.append(f"Profile file {self.name} did not meet its target when calibrated: {self.message}")
        return notes

    def note(self) -> str:
        """One line about the profile, as a menu shows it."""
        m = self.measured
        parts = []
        if m.get("speedup") is not None:
            parts.append(f"{m['speedup']:.2f}×")
        if m.get("psnr") is not None:
            parts.append(f"{m['psnr']:.1f} dB")
        figures = f" measured {' at '.join(parts)}" if parts else ""
        target = ", ".join(f"{k} {v:g}" for k, v in self.target.items())
        met = "met" if self.met else "NOT met"
        return f"calibrated profile ({Path(self.name).name}): target {target or '—'} {met};{figures}"


def read_profile(path: str | os.PathLike) -> ProfileFile:
    """Read and check a profile file; a ValueError names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Profile file not found: {path}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"Profile file {path} is not valid JSON ({exc}).") from None
    return profile_from_dict(data, path)


def profile_from_dict(data: Any, path: Path | None = None) -> ProfileFile:
    where = f"Profile file {path}" if path is not None else "Profile"
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ValueError(f"{where} is not a BWCache profile (its 'format' must be {FORMAT!r}).")
    if data.get("version") != VERSION:
        raise ValueError(f"{where} has version {data.get('version')!r}; this BWCache reads version {VERSION}.")
    values = data.get("bwcache")
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: 'bwcache' must be an object of cache settings.")
    allowed = CACHE_SETTINGS.preset_names
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown cache setting(s) {unknown}; allowed: {list(allowed)}.")
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    try:
        CACHE_SETTINGS.make(values)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    setting = data.get("setting") or {}
    fractions = data.get("fractions") or {}
    if not isinstance(setting, Mapping) or not isinstance(fractions, Mapping):
        raise ValueError(f"{where}: 'setting' and 'fractions' must be objects.")
    bad = [k for k, v in fractions.items() if k not in STEP_SETTINGS or not _positive(v)]
    if bad:
        raise ValueError(f"{where}: 'fractions' may hold {list(STEP_SETTINGS)} as numbers ≥ 0; check {bad}.")
    return ProfileFile(
        bwcache=values, setting=dict(setting), fractions=dict(fractions), target=dict(data.get("target") or {}),
        met=bool(data.get("met", True)), message=str(data.get("message") or ""),
        measured=dict(data.get("measured") or {}), frontier=list(data.get("frontier") or []), data=dict(data),
        path=path,
    )


def step_fractions(config: BWCacheConfig, num_steps: int) -> dict:
    """The settings counted in steps as shares of `num_steps` (those the config leaves unset are left out)."""
    return {name: getattr(config, name) / num_steps for name in STEP_SETTINGS
            if getattr(config, name) is not None and num_steps}


def profile_settings(config: BWCacheConfig) -> dict:
    """The settings a profile file keeps: every key a preset's `bwcache` section may hold."""
    data = config.to_dict()
    return {name: data[name] for name in CACHE_SETTINGS.preset_names}


def config_differences(mine: Mapping, theirs: Mapping) -> list[str]:
    """Keys of two transformer configs that both hold and that differ (private keys such as `_name_or_path` aside)."""
    return sorted(key for key in set(mine) & set(theirs)
                  if not str(key).startswith("_") and not _same(mine[key], theirs[key]))


def warn(messages: list[str]) -> None:
    """Each message as a `ProfileMismatchWarning`."""
    for message in messages:
        warnings.warn(message, ProfileMismatchWarning, stacklevel=3)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
