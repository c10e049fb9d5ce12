"""The Calibrate tab's handlers called in-process on the embedded preset with a tiny budget: the profile file saved
in a run folder of its own, the frontier figure, the summary, "Use this profile" putting the file in the Profile
menu, the next comparison running it, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
import pytest

import app
from bwcache import ui
from bwcache.calibrate import read_profile
from bwcache.ui import calibration as calibration_ui

TINY = "tiny-shapes"
TINY_READY = TINY in app.PRESETS and (Path(app.ROOT) / "assets" / "tiny-shapes" / "config.json").is_file()
pytestmark = pytest.mark.skipif(not TINY_READY, reason="the Tiny Shapes weights (assets/tiny-shapes/) are not there")
SMALL = dict(num_inference_steps=10, num_frames=8, seed=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    saved, app.OUTPUT_ROOT = app.OUTPUT_ROOT, tmp_path_factory.mktemp("outputs")
    yield app.OUTPUT_ROOT
    app.OUTPUT_ROOT = saved


@pytest.fixture(scope="module")
def calibrated(root):
    return app.calibrate(target_kind="psnr", target=20, budget=2, prompts="a red square moving right\n\n",
                         preset=TINY, **SMALL)


def test_a_calibration_saves_a_profile_file_that_loads_back(calibrated, root):
    figure, summary, path, record, state = calibrated
    assert path == state == record["profile_file"] and Path(path).name == "profile.json"
    folder = Path(path).parent
    assert folder.parent == root and f"-{calibration_ui.RUN_KIND}-" in folder.name
    profile = read_profile(path)
    assert profile.setting["preset"] == TINY and profile.setting["num_inference_steps"] == 10
    assert profile.setting["num_frames"] == 8 and profile.target == {"psnr": 20.0}
    assert record["prompts"] == ["a red square moving right"] and record["generations"]["cached"] <= 2
    json.dumps(record, allow_nan=False)
    assert ("Met" in summary or "NOT met" in summary) and "profile.json" in summary


def test_the_figure_shows_every_candidate_and_the_chosen_point(calibrated):
    figure, summary, path, record, _ = calibrated
    assert isinstance(figure, go.Figure)
    traces = {trace.name: trace for trace in figure.data}
    candidates = traces["measured candidates"]
    assert len(candidates.x) == len(record["candidates"]) >= 1
    assert sorted(candidates.x) == sorted(p["speedup"] for p in record["candidates"])
    chosen = traces.get("chosen") or traces["best measured (target not met)"]
    assert list(chosen.x) == [record["measured"]["speedup"]]
    assert figure.layout.xaxis.title.text.startswith("measured speedup")
    # The target is drawn: a horizontal line at 20 dB.
    assert any(shape.y0 == 20 for shape in figure.layout.shapes)


def test_use_this_profile_adds_it_to_the_menu_and_the_next_comparison_runs_it(calibrated):
    path = calibrated[2]
    spec = app.PRESETS[TINY]
    menu, saved = calibration_ui.menu_update(spec, path, [])
    assert saved == [path] and menu["value"] == path
    assert menu["choices"][: len(spec.profile_names)] == list(spec.profile_names)
    label, value = menu["choices"][-1]
    assert value == path and label.startswith("calibrated PSNR ≥ 20 dB")

    *updates, kept = app.use_profile(TINY, path, [])
    values = dict(zip(ui.profile_keys(), updates))
    assert kept == [path] and values["profile"]["value"] == path
    assert (calibration_ui.profile_label(path), path) in values["profile"]["choices"]
    settings = read_profile(path).bwcache
    assert values["threshold"]["value"] == settings["threshold"] and values["mode"]["value"] == settings["mode"]
    # Choosing it again from the menu keeps the menu's choices.
    again = dict(zip(ui.profile_keys(), app.fill_profile(TINY, path, kept)))
    assert again["profile"]["choices"] == values["profile"]["choices"]

    result = app.compare(prompt="a blue circle moving left", preset=TINY, profile=path, **{**SMALL, "seed": 1})
    record = result[4]
    assert record["profile"] == path
    assert record["config"]["threshold"] == settings["threshold"] and record["config"]["mode"] == settings["mode"]


def test_only_profile_files_the_app_saved_are_accepted(calibrated, root, tmp_path):
    path = calibrated[2]
    spec = app.PRESETS[TINY]
    assert ui.check_profile(spec, path, root) == path
    assert ui.check_profile(spec, "fast", root) == "fast"
    copy = tmp_path / "profile.json"
    copy.write_text(Path(path).read_text())
    elsewhere = root / "mine" / "profile.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(Path(path).read_text())
    sneaky = str(Path(path).parent / ".." / ".." / copy.parent.name / "profile.json")
    for bad in (str(copy), str(elsewhere), sneaky, "/etc/passwd.json", str(root / "x-calibrate-1" / "profile.json")):
        with pytest.raises(ValueError, match="Profile must be one of default, fast, paper for .* or a profile file the "
                                             "Calibrate tab saved"):
            ui.check_profile(spec, bad, root)
        with pytest.raises(gr.Error, match="Profile must be one of"):
            app.fill_profile(TINY, bad)
    # Without the app's folder (the library's own checks), only the preset's profiles.
    with pytest.raises(ValueError, match="Profile must be one of default, fast, paper for"):
        ui.check_profile(spec, path)
    # Calibrated on another preset: refused there.
    wan = app.PRESETS["wan2.1-t2v-1.3b"]
    with pytest.raises(ValueError, match="Profile must be one of"):
        ui.check_profile(wan, path, root)
    assert calibration_ui.profile_choices(wan, [path]) == list(wan.profile_names)
    with pytest.raises(gr.Error, match="No profile file yet"):
        app.use_profile(TINY, None, [])


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"target": 5}, "Target PSNR must be a number of dB from 10 to 80, got 5"),
        ({"target_kind": "speedup", "target": 1}, "Target speedup must be a speedup above 1 and at most 10"),
        ({"target_kind": "fidelity"}, "Target must be one of psnr, speedup, got 'fidelity'"),
        ({"budget": 0}, "Budget must be a whole number of cached generations from 1 to 100, got 0"),
        ({"budget": 2.5}, "Budget must be a whole number of cached generations from 1 to 100, got 2.5"),
        ({"budget": 101}, "from 1 to 100, got 101"),
        ({"prompts": "  \n \t \n"}, "No calibration prompts: give at least one"),
        ({"prompts": "!!! ???"}, "no word the Tiny Shapes model knows"),
        ({"num_frames": 9}, "Frames = 9"),
        ({"profile": "/etc/passwd.json"}, "Profile must be one of default, fast, paper"),
    ],
)
def test_bad_input_is_refused_with_the_fields_name(root, fields, message):
    request = {"target_kind": "psnr", "target": 20, "budget": 2, "prompts": None, "preset": TINY, **SMALL, **fields}
    before = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    with pytest.raises(gr.Error) as excinfo:
        app.calibrate(**request)
    assert message in str(excinfo.value)
    assert (sorted(p.name for p in root.iterdir()) if root.is_dir() else []) == before


def test_the_fields_parse_as_sent():
    assert calibration_ui.parse_target(None, None) == {"target_psnr": 35.0, "target_speedup": None}
    assert calibration_ui.parse_target("speedup", "2.5") == {"target_psnr": None, "target_speedup": 2.5}
    assert calibration_ui.parse_budget(None) == 12 and calibration_ui.parse_budget(3.0) == 3
    assert calibration_ui.parse_prompts("") is None and calibration_ui.parse_prompts(None) is None
    assert calibration_ui.parse_prompts(" a red square moving right \n\n b ") == ["a red square moving right", "b"]
    with pytest.raises(ValueError, match="at most 16"):
        calibration_ui.parse_prompts("\n".join(["a red square"] * 17))
