"""The cache settings are described once: a config with one more described field is offered by the presets, the
runner, the app's form and API, and the command line, with checks that name it as labelled."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest

import app
from bwcache import BWCacheConfig, cli, ui
from bwcache.config import CACHE_SETTINGS
from bwcache.presets import Preset, load_preset
from bwcache.runner import resolve_config
from bwcache.settings import Settings, setting


@dataclass
class KnobConfig(BWCacheConfig):
    """`BWCacheConfig` with one more setting, described as every setting is."""

    demo_knob: int = setting(2, "integer", "Demo knob", "a knob every surface should offer", low=0, high=9,
                             form="advanced")


KNOB = Settings(KnobConfig)


@pytest.fixture()
def knob_preset():
    data = load_preset("tiny-shapes").to_dict()
    data["bwcache"]["demo_knob"] = 3
    data["profiles"]["fast"]["bwcache"]["demo_knob"] = 7
    return Preset.from_dict(data, settings=KNOB)


def test_the_config_checks_a_described_setting_by_its_name():
    assert KnobConfig().demo_knob == 2
    with pytest.raises(ValueError, match=r"demo_knob must be an integer ≥ 0 and ≤ 9, got 12"):
        KnobConfig(demo_knob=12)


def test_presets_and_profiles_take_it(knob_preset):
    assert resolve_config(knob_preset, 30).demo_knob == 3
    assert resolve_config(knob_preset, 30, profile="fast").demo_knob == 7
    assert resolve_config(knob_preset, 30, demo_knob=5).demo_knob == 5
    data = knob_preset.to_dict()
    data["bwcache"]["demo_knob"] = 10
    with pytest.raises(ValueError, match=r"bwcache: demo_knob must be an integer ≥ 0 and ≤ 9"):
        Preset.from_dict(data, settings=KNOB)
    # Without the description it is an unknown key.
    with pytest.raises(ValueError, match=r"unknown bwcache key\(s\) \['demo_knob'\]"):
        Preset.from_dict(knob_preset.to_dict())


def test_the_apps_checks_name_it_as_labelled(knob_preset):
    assert ui.check_request(knob_preset, demo_knob=4.0)["demo_knob"] == 4
    assert ui.request_config(knob_preset, ui.check_request(knob_preset, demo_knob="6")).demo_knob == 6
    with pytest.raises(ValueError, match=r"Demo knob must be a whole number ≥ 0 and at most 9, got 12"):
        ui.check_request(knob_preset, demo_knob=12)
    assert ui.preset_form(knob_preset)["demo_knob"]["value"] == 3
    assert ui.preset_form(knob_preset, {"profile": "fast"})["demo_knob"]["value"] == 7


def test_the_command_line_offers_it():
    parser = cli.build_parser(KNOB)
    assert parser.parse_args(["compare", "--demo-knob", "4"]).demo_knob == 4
    assert "--demo-knob" not in cli.build_parser().format_help()
    help_text = next(a for a in parser._subparsers._group_actions[0].choices["compare"]._actions
                     if "--demo-knob" in a.option_strings).help
    assert "Demo knob" in help_text


def test_the_app_builds_a_control_and_an_api_parameter_for_it(knob_preset, monkeypatch):
    monkeypatch.setattr(app, "PRESETS", {"tiny-shapes": knob_preset})
    demo = app.build_demo(KNOB)
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert "Demo knob" in labels
    (compare,) = [fn for fn in demo.fns.values() if fn.name == "compare"]
    assert "demo_knob" in inspect.signature(compare.fn).parameters
    assert "demo_knob" in ui.profile_keys(KNOB) and "demo_knob" not in ui.profile_keys()
    # A value sent to the endpoint reaches the config of the run.
    seen = {}

    def run(name, request, peer, progress=None):
        seen["config"] = ui.request_config(knob_preset, request)
        raise ValueError("stop before any model work")

    monkeypatch.setattr(app, "_run_comparison", run)
    with pytest.raises(Exception, match="stop before any model work"):
        compare.fn.__wrapped__("a red square moving right", "tiny-shapes", demo_knob=5)
    assert seen["config"].demo_knob == 5


def test_the_shipped_description_lists_every_config_field_once():
    names = [s.name for s in CACHE_SETTINGS]
    assert names == [f for f in inspect.signature(BWCacheConfig).parameters]
    assert len(set(names)) == len(names)
