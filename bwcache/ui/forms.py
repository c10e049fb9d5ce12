"""Presets as the app's form: the presets the app offers, each field's value, step and allowed range, and notes."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

from ..config import CACHE_SETTINGS
from ..presets import DEFAULT_PROFILE, FIRST_PRESET, PRESETS_DIR, Preset, load_preset
from ..settings import Settings

log = logging.getLogger(__name__)


def available_presets(directory: str | Path | None = None, space: bool = False,
                      settings: Settings = CACHE_SETTINGS) -> dict[str, Preset]:
    """Every loadable preset by name, tiny-shapes first. A broken preset file is logged and left out, so one bad
    file does not take the whole app down. With `space`, only those the Space's card serves (`bwcache.space`)."""
    if space:
        from .. import space as hf_space

        return hf_space.served(available_presets(directory, settings=settings), hf_space.card())
    directory = PRESETS_DIR if directory is None else Path(directory)
    presets = {}
    for path in sorted(directory.glob("*.json")):
        try:
            preset = load_preset(path, settings=settings)
        except ValueError as error:
            log.warning("Skipping preset %s: %s", path.name, error)
            continue
        presets[preset.name] = preset
    return dict(sorted(presets.items(), key=lambda item: (item[0] != FIRST_PRESET, item[0])))


def default_preset_name(presets: Mapping[str, Preset]) -> str | None:
    if FIRST_PRESET in presets:
        return FIRST_PRESET
    return next(iter(presets), None)


def _frame_step(rule: Any) -> int:
    if isinstance(rule, int) and not isinstance(rule, bool):
        return max(1, rule)
    match = re.match(r"\s*(\d+)\s*k", str(rule))
    return max(1, int(match.group(1))) if match else 1


def _frame_rule_text(rule: Any) -> str:
    step = _frame_step(rule)
    if step == 1:
        return ""
    if isinstance(rule, str) and "+" in rule:
        return f", {rule.replace(' ', '')}"
    return f", multiple of {step}"


def _fmt_number(value: float) -> str:
    return f"{value:g}"


def preset_form(preset: Preset, values: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """The app's controls for a preset: per field the value (the preset's default, its cache settings those of the
    profile `values` names, unless `values` gives one), plus the step and an `info` line stating the allowed range."""
    values = dict(values or {})
    profile = values.get("profile") or DEFAULT_PROFILE
    d, lim = preset.defaults, preset.limits
    profile_values = preset.settings.make(preset.profile_settings(profile))

    def value(key, default):
        return values[key] if values.get(key) is not None else default

    h_lo, h_hi, h_mult = lim["height"]
    w_lo, w_hi, w_mult = lim["width"]
    f_lo, f_hi, f_rule = lim["num_frames"]
    s_lo, s_hi = lim["num_inference_steps"][:2]
    g_lo, g_hi = lim["guidance_scale"][:2]
    form = {
        "prompt": {"value": value("prompt", d["prompt"]), "info": f"At most {lim['prompt_max_chars']} characters."},
        "negative_prompt": {"value": value("negative_prompt", d["negative_prompt"])},
        # The first frame: shown for presets that take one, and kept empty (an image is not a preset default).
        "image": {"value": values.get("image"), "visible": preset.image is not None,
                  "label": IMAGE_LABELS.get(preset.image, IMAGE_LABELS["required"])},
        "profile": {"value": profile, "choices": list(preset.profile_names), "info": profile_info(preset, profile)},
        "num_inference_steps": {"value": int(value("num_inference_steps", d["num_inference_steps"])), "step": 1,
                                "info": f"{s_lo} to {s_hi}"},
        "num_frames": {"value": int(value("num_frames", d["num_frames"])), "step": _frame_step(f_rule),
                       "info": f"{f_lo} to {f_hi}{_frame_rule_text(f_rule)}"},
        "height": {"value": int(value("height", d["height"])), "step": h_mult,
                   "info": f"{h_lo} to {h_hi}, multiple of {h_mult}"},
        "width": {"value": int(value("width", d["width"])), "step": w_mult,
                  "info": f"{w_lo} to {w_hi}, multiple of {w_mult}"},
        "guidance_scale": {"value": float(value("guidance_scale", d["guidance_scale"])), "step": 0.5,
                           "info": f"{_fmt_number(g_lo)} to {_fmt_number(g_hi)}"},
        "seed": {"value": int(value("seed", d["seed"]))},
    }
    for setting in preset.settings.form:
        shown = value(setting.name, getattr(profile_values, setting.name))
        form[setting.name] = {"value": setting.form_value(setting.resolve(shown))}
    return form


IMAGE_LABELS = {"required": "First frame (image-to-video: required)",
                "optional": "First frame (optional: the video starts from it)"}


def profile_info(preset: Preset, profile: str | None) -> str:
    """One line about a cache profile, under its menu."""
    note = preset.profile_note(profile)
    return note[:1].upper() + note[1:]


def preset_notes(preset: Preset) -> str:
    gpu = preset.recommended_gpu_memory_gb
    needs = "runs on a CPU" if not gpu else f"needs a GPU with about {gpu:g} GB"
    if not gpu and "CPU" in preset.label:
        return f"**{preset.label}**. {preset.notes}"  # the label already says where it runs
    return f"**{preset.label}** ({needs}). {preset.notes}"
