"""The app's Calibrate tab without Gradio: what users send checked (target, budget, prompts), a calibration on the
selected preset (`bwcache.calibrate.calibrate_preset`), its profile file saved in a run folder of its own, the
measured frontier as a Plotly figure, a summary, and the Profile menu's choices with the saved file added.

Profile files the app saved are the only files the Profile menu and the compare endpoint accept
(`app_profile`): a `profile.json` in a calibration run folder under the app's output folder, calibrated on the
preset it is used with. Any other path is refused, so a request cannot name files on the server."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import plotly.graph_objects as go

from ..calibrate import read_profile
from ..calibrate.candidates import config_key
from ..calibrate.core import BUDGET_RANGE, DEFAULT_BUDGET, PSNR_RANGE, SPEEDUP_MAX, check_targets
from ..config import BWCacheConfig
from ..presets import Preset
from ..settings import short_repr
from .runs import PARTIAL_PREFIX

# The run folders calibrations are saved in (`kind` of `bwcache.ui.runs.new_run_dir`), and the file's name there.
RUN_KIND = "calibrate"
PROFILE_NAME = "profile.json"
TARGET_KINDS = {"psnr": "PSNR (dB)", "speedup": "speedup (×)"}
DEFAULT_TARGETS = {"psnr": 35.0, "speedup": 2.0}
# The most calibration prompts one request may give (the budget caps how many are run).
MAX_PROMPTS = 16
# The calibrate endpoint's parameters, in order: the target first, then the preset and its generation settings
# (from the left column; empty: the preset's defaults). Left out: `ENDPOINT_DEFAULTS`, else None.
CALIBRATE_PARAMETERS = ["target_kind", "target", "budget", "prompts", "preset", "num_inference_steps", "num_frames",
                        "height", "width", "guidance_scale", "seed", "image", "profile"]
ENDPOINT_DEFAULTS = {"target_kind": "psnr", "budget": DEFAULT_BUDGET}
_RUN_FOLDER = re.compile(rf"\d{{8}}-\d{{6}}-{RUN_KIND}-[0-9a-f]+")


# ----------------------------------------------------------------------------------------------- what users send


def parse_target(kind: Any, value: Any) -> dict:
    """`target_psnr=` or `target_speedup=` for `calibrate_preset`; an empty value takes the kind's default. Out of
    range: the library's message, naming the field and its range."""
    if kind in (None, ""):
        kind = "psnr"
    if kind not in TARGET_KINDS:
        raise ValueError(f"Target must be one of {', '.join(TARGET_KINDS)}, got {short_repr(kind)}.")
    if value in (None, ""):
        value = DEFAULT_TARGETS[kind]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    targets = {"target_psnr": value if kind == "psnr" else None,
               "target_speedup": value if kind == "speedup" else None}
    check_targets(**targets, names=_NAMES)
    return targets


_NAMES = {"target_psnr": "Target PSNR", "target_speedup": "Target speedup", "budget": "Budget"}


def parse_budget(value: Any) -> int:
    """The budget in cached generations; empty: the library's default. A whole number sent as 2.0 (a number box)
    is 2; anything else gets the library's message."""
    if value in (None, ""):
        return DEFAULT_BUDGET
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    check_targets(target_psnr=PSNR_RANGE[0], budget=value, names=_NAMES)
    return value


def parse_prompts(text: Any) -> list[str] | None:
    """One prompt a line, each stripped, blank lines dropped. None or "" means the preset's own calibration prompts
    (None is returned); text that leaves no prompt is refused."""
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise ValueError(f"Calibration prompts must be text, one prompt a line, got {type(text).__name__}.")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError("No calibration prompts: give at least one (one a line), or leave the box empty for the "
                         "preset's own.")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"Calibration prompts: at most {MAX_PROMPTS}, got {len(prompts)}.")
    return prompts


def check_calibration(kind: Any, target: Any, budget: Any, prompts: Any) -> dict:
    """The calibration's own fields, checked before any model work: keyword arguments for `calibrate_preset`."""
    return {**parse_target(kind, target), "budget": parse_budget(budget), "prompts": parse_prompts(prompts)}


def calibration_runs(prompts: int, budget: int) -> int:
    """Generations a calibration may run, for GPU time: the pilots (one per prompt), the cached budget, an uncached
    timing run per round and the chosen setting's final timing pairs."""
    from ..calibrate.core import FINAL_PAIRS

    return prompts + budget + max(1, budget // max(1, prompts)) + 2 * FINAL_PAIRS


# ----------------------------------------------------------------------------------------------- profile files


def save_profile(calibration, folder: str | Path) -> dict:
    """The calibration's profile file in `folder` (a new run folder): {"profile": path}. Nothing to save (no
    candidate could be measured): {}."""
    if calibration.config is None:
        return {}
    return {"profile": str(calibration.save(Path(folder) / PROFILE_NAME))}


def app_profile(profile: Any, root: str | Path, preset: Preset | None = None) -> str | None:
    """`profile` as the path of a profile file this app saved, or None when it names none: a `profile.json` in a
    calibration run folder right under `root`, calibrated on `preset` when one is given (checked as read)."""
    if not isinstance(profile, str) or not profile.lower().endswith(".json"):
        return None
    try:
        root = Path(root).resolve()
        path = Path(profile).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    folder = path.parent
    if path.name != PROFILE_NAME or folder.parent != root or not _RUN_FOLDER.fullmatch(folder.name):
        return None
    if folder.name.startswith(PARTIAL_PREFIX) or not path.is_file():
        return None
    if preset is not None:
        try:
            measured_on = read_profile(path).setting.get("preset")
        except ValueError:
            return None
        if measured_on not in (None, preset.name):
            return None
    return str(path)


def profile_label(path: str | Path) -> str:
    """The Profile menu's label for a saved profile file: its target, what was measured, and its run folder."""
    profile = read_profile(path)
    target = ", ".join(f"{'PSNR ≥ ' if k == 'psnr' else 'speedup ≥ '}{v:g}{' dB' if k == 'psnr' else '×'}"
                       for k, v in profile.target.items())
    measured = profile.measured
    figures = []
    if measured.get("speedup") is not None:
        figures.append(f"{measured['speedup']:.2f}×")
    if measured.get("identical"):
        figures.append("identical")
    elif measured.get("psnr") is not None:
        figures.append(f"{measured['psnr']:.1f} dB")
    stamp = Path(path).parent.name.split(f"-{RUN_KIND}-")[0]
    met = "" if profile.met else ", target NOT met"
    return f"calibrated {target or ''}: {' '.join(figures)}{met} ({stamp})"


def profile_choices(preset: Preset, saved: list[str] | None = None) -> list:
    """The Profile menu's choices: the preset's own profiles (by name), then the saved profile files given that
    were calibrated for it (newest last, each once, those that still exist) as (label, path) pairs."""
    choices: list = list(preset.profile_names)
    seen = set()
    for path in saved or []:
        if path in seen or not Path(path).is_file():
            continue
        seen.add(path)
        try:
            if read_profile(path).setting.get("preset") not in (None, preset.name):
                continue
            choices.append((profile_label(path), path))
        except ValueError:
            continue
    return choices


def menu_update(preset: Preset, path: str | None, saved: list[str] | None = None) -> tuple[dict, list[str]]:
    """What "Use this profile" does: the Profile menu's new choices with `path` added and chosen, its info line, and
    the list of saved profile files to keep (for the app's state)."""
    saved = [p for p in (saved or []) if p != path] + ([path] if path else [])
    update = {"choices": profile_choices(preset, saved)}
    if path:
        update.update(value=path, info=preset.profile_note(path)[:1].upper() + preset.profile_note(path)[1:])
    return update, saved


# ----------------------------------------------------------------------------------------------- views


def _quality(point: Mapping) -> float:
    return math.inf if point.get("identical") else (point["psnr"] if point.get("psnr") is not None else math.nan)


def reference_profiles(calibration, preset: Preset) -> dict[tuple, str]:
    """The preset's own profiles among the measured candidates: a candidate's config key -> the profile's name
    (placed without any extra generation: a profile is shown only when the calibration measured its settings)."""
    steps = calibration.setting.get("num_inference_steps")
    if not steps:
        return {}
    found = {}
    for name in preset.profile_names:
        try:
            config = preset.settings.make({**preset.profile_settings(name), "num_inference_steps": steps})
        except ValueError:
            continue
        found.setdefault(config_key(config), name)
    return found


def frontier_figure(calibration, preset: Preset | None = None) -> go.Figure:
    """Measured speedup (x) against PSNR (y) of every candidate the calibration ran, its measured frontier dashed,
    the chosen one starred, the target drawn as a line, and the preset's own profiles named where one was among the
    candidates. A candidate identical to the uncached video is drawn 3 dB above the highest finite PSNR."""
    points = [p for p in calibration.candidates if p.get("speedup") is not None]
    finite = [p["psnr"] for p in points if p.get("psnr") is not None and not p.get("identical")]
    top = (max(finite) + 3.0) if finite else 60.0

    def y(point):
        quality = _quality(point)
        return top if math.isinf(quality) else quality

    def hover(point):
        quality = "identical to uncached" if point.get("identical") else (
            f"{point['psnr']:.2f} dB" if point.get("psnr") is not None else "PSNR n/a")
        return (f"{point['label']}<br>{point['speedup']:.2f}× (range {point.get('speedup_min', point['speedup']):.2f}"
                f"–{point.get('speedup_max', point['speedup']):.2f}, ideal {point.get('ideal_speedup') or 0:.2f}×)"
                f"<br>{quality}<br>{100 * point.get('skipped', 0):.1f}% of block compute skipped")

    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[p["speedup"] for p in points], y=[y(p) for p in points], mode="markers", name="measured candidates",
        marker=dict(size=9, color=["#2ca02c" if p.get("meets") else "#636efa" for p in points]),
        text=[hover(p) for p in points], hovertemplate="%{text}<extra></extra>"))
    front = sorted((p for p in calibration.frontier if p.get("speedup") is not None), key=lambda p: p["speedup"])
    if front:
        fig.add_trace(go.Scatter(x=[p["speedup"] for p in front], y=[y(p) for p in front], mode="lines",
                                 name="measured frontier", line=dict(dash="dash", color="#888"), hoverinfo="skip"))
    if preset is not None:
        named = reference_profiles(calibration, preset)
        refs = [(named[config_key(BWCacheConfig.from_dict(_values(p["config"])))], p) for p in points
                if config_key(BWCacheConfig.from_dict(_values(p["config"]))) in named]
        if refs:
            fig.add_trace(go.Scatter(
                x=[p["speedup"] for _, p in refs], y=[y(p) for _, p in refs], mode="markers+text",
                name=f"{preset.label}: own profiles", text=[f"{name} profile" for name, _ in refs],
                textposition="bottom center", marker=dict(size=14, symbol="diamond-open", color="#ff7f0e"),
                hoverinfo="skip"))
    chosen = calibration.chosen
    if chosen is not None and chosen.get("speedup") is not None:
        fig.add_trace(go.Scatter(
            x=[chosen["speedup"]], y=[y(chosen)], mode="markers+text", name="chosen" if calibration.met else
            "best measured (target not met)", text=["chosen" if calibration.met else "best (not met)"],
            textposition="top center", marker=dict(size=18, symbol="star", color="#d62728" if not calibration.met
                                                   else "#ffbf00", line=dict(width=1, color="#333")),
            hovertext=[hover(chosen)], hoverinfo="text"))
    target = calibration.target
    if "psnr" in target:
        fig.add_hline(y=target["psnr"], line_dash="dot", line_color="#d62728",
                      annotation_text=f"target {target['psnr']:g} dB")
    elif "speedup" in target:
        fig.add_vline(x=target["speedup"], line_dash="dot", line_color="#d62728",
                      annotation_text=f"target {target['speedup']:g}×")
    fig.update_layout(
        title="Measured candidates: speed vs fidelity against the uncached video",
        xaxis_title="measured speedup (×)", yaxis_title="PSNR vs uncached (dB)", legend=dict(orientation="h", y=-0.2),
        margin=dict(l=50, r=20, t=50, b=40), height=440)
    return fig


def _values(data: Mapping) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}


def summary_markdown(calibration, profile_path: str | None = None) -> str:
    """The calibration in a few lines of Markdown: met or not and what to do, the chosen settings and their figures,
    what it cost, and the profile file."""
    text = calibration.summary().splitlines()
    head = text[0]
    lines = [("### ✅ " if calibration.met else "### ⚠️ ") + head.split(":", 1)[0], head.split(":", 1)[1].strip()]
    lines += ["", *(f"- {line.strip()}" for line in text[1:])]
    if calibration.prompts:
        lines.append(f"- prompts: {'; '.join(calibration.prompts)}")
    if profile_path:
        lines += ["", f"Profile file: `{Path(profile_path).name}` in `{Path(profile_path).parent.name}`. "
                      "**Use this profile** puts it in the Profile menu for the next comparison."]
    elif calibration.config is None:
        lines += ["", "No profile file: nothing could be measured."]
    return "\n".join(lines)


__all__ = ["BUDGET_RANGE", "CALIBRATE_PARAMETERS", "DEFAULT_TARGETS", "ENDPOINT_DEFAULTS", "MAX_PROMPTS",
           "PROFILE_NAME", "RUN_KIND", "SPEEDUP_MAX", "TARGET_KINDS", "app_profile", "calibration_runs", "check_calibration",
           "frontier_figure", "menu_update", "parse_budget", "parse_prompts", "parse_target", "profile_choices",
           "profile_label", "reference_profiles", "save_profile", "summary_markdown"]
