"""Preset files: schema, own defaults, request validation; and the legacy Spacefile."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from bwcache.presets import PRESETS_DIR, Preset, frames_rule_ok, list_presets, load_preset, preset_names

ROOT = Path(__file__).resolve().parents[2]
PRESET_FILES = sorted(PRESETS_DIR.glob("*.json"))
MODEL_PRESETS = {
    "wan2.1-t2v-1.3b": ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WanPipeline"),
    "wan2.1-t2v-14b": ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "WanPipeline"),
    "wan2.2-t2v-a14b": ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "WanPipeline"),
    "wan2.2-ti2v-5b": ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "WanPipeline"),
    "hunyuanvideo": ("hunyuanvideo-community/HunyuanVideo", "HunyuanVideoPipeline"),
    "cogvideox-2b": ("THUDM/CogVideoX-2b", "CogVideoXPipeline"),
    "cogvideox-5b": ("THUDM/CogVideoX-5b", "CogVideoXPipeline"),
    "latte-1": ("maxin-cn/Latte-1", "LattePipeline"),
    "ltx-video": ("Lightricks/LTX-Video", "LTXPipeline"),
    "wan2.1-i2v-14b-480p": ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "WanImageToVideoPipeline"),
    "wan2.1-i2v-14b-720p": ("Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", "WanImageToVideoPipeline"),
    "wan2.2-i2v-a14b": ("Wan-AI/Wan2.2-I2V-A14B-Diffusers", "WanImageToVideoPipeline"),
    "cogvideox-5b-i2v": ("THUDM/CogVideoX-5b-I2V", "CogVideoXImageToVideoPipeline"),
}


def diffusers_pipeline_classes():
    """Pipeline class names defined in the installed diffusers, read from source
    (importing diffusers takes seconds)."""
    spec = importlib.util.find_spec("diffusers")
    root = Path(next(iter(spec.submodule_search_locations))) / "pipelines"
    names = set()
    for f in root.rglob("pipeline_*.py"):
        names.update(re.findall(r"^class (\w+Pipeline)\(", f.read_text(encoding="utf-8"), flags=re.M))
    return names


def valid_dict(**overrides):
    data = json.loads((PRESETS_DIR / "wan2.1-t2v-1.3b.json").read_text())
    data.update(overrides)
    return data


@pytest.mark.parametrize("path", PRESET_FILES, ids=[p.stem for p in PRESET_FILES])
def test_every_preset_loads_and_validates_its_defaults(path):
    preset = load_preset(path)
    assert preset.name == path.stem  # load_preset(name) finds presets/<name>.json
    d = preset.defaults
    checked = preset.validate_request(
        prompt=d["prompt"],
        height=d["height"],
        width=d["width"],
        num_frames=d["num_frames"],
        num_inference_steps=d["num_inference_steps"],
        guidance_scale=d["guidance_scale"],
    )
    assert checked["height"] == d["height"]
    assert load_preset(preset.name) == preset
    json.dumps(preset.to_dict())  # JSON-able round trip
    assert Preset.from_dict(preset.to_dict()) == preset


@pytest.mark.parametrize("path", PRESET_FILES, ids=[p.stem for p in PRESET_FILES])
def test_bwcache_section_is_a_valid_cache_config(path):
    config = pytest.importorskip("bwcache.config")
    config.BWCacheConfig.from_dict(dict(load_preset(path).to_dict()["bwcache"]))


def test_model_presets_present_with_hub_ids_and_classes():
    names = set(preset_names())
    assert set(MODEL_PRESETS) <= names
    defined = diffusers_pipeline_classes()
    for name, (hub_id, cls) in MODEL_PRESETS.items():
        p = load_preset(name)
        assert (p.hub_id, p.pipeline_class, p.kind) == (hub_id, cls, "diffusers")
        assert cls in defined
        assert p.dtype in ("bfloat16", "float16", "float32")
        assert p.bwcache["threshold"] == 0.15 and p.notes
    assert load_preset("wan2.1-t2v-14b").bwcache["indicator_blocks"] == "every_other"
    assert load_preset("wan2.2-t2v-a14b").bwcache["indicator_blocks"] == "every_other"
    assert load_preset("hunyuanvideo").bwcache["indicator_blocks"] == "every_other"


def test_frame_rules_match_the_models():
    expect = {"wan2.1-t2v-1.3b": "4k+1", "wan2.1-t2v-14b": "4k+1", "wan2.2-t2v-a14b": "4k+1", "wan2.2-ti2v-5b": "4k+1",
              "hunyuanvideo": "4k+1",
              "cogvideox-2b": "8k+1", "cogvideox-5b": "8k+1", "ltx-video": "8k+1",
              "wan2.1-i2v-14b-480p": "4k+1", "wan2.1-i2v-14b-720p": "4k+1", "wan2.2-i2v-a14b": "4k+1",
              "cogvideox-5b-i2v": "8k+1"}
    for name, rule in expect.items():
        assert load_preset(name).limits["num_frames"][2] == rule
    assert frames_rule_ok(81, "4k+1") and not frames_rule_ok(80, "4k+1")
    assert frames_rule_ok(49, "8k+1") and not frames_rule_ok(45, "8k+1")
    assert frames_rule_ok(16, 1) and frames_rule_ok(48, 16) and not frames_rule_ok(50, 16)


def test_list_presets_sorted_tiny_first():
    names = preset_names()
    rest = [n for n in names if n != "tiny-shapes"]
    assert rest == sorted(rest)
    if "tiny-shapes" in names:
        assert names[0] == "tiny-shapes"
    assert [p.name for p in list_presets()] == names


def test_list_presets_order_in_isolated_dir(tmp_path):
    for name in ("zeta", "tiny-shapes", "alpha"):
        (tmp_path / f"{name}.json").write_text(json.dumps(valid_dict(name=name)))
    assert preset_names(tmp_path) == ["tiny-shapes", "alpha", "zeta"]
    assert load_preset("alpha", directory=tmp_path).name == "alpha"


def test_unknown_preset_lists_available():
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*wan2\.1-t2v-1\.3b"):
        load_preset("nope")
    with pytest.raises(ValueError, match="not found"):
        load_preset("/no/such/preset.json")


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(prompt=""), r"prompt is empty"),
        (dict(prompt="   "), r"prompt is empty"),
        (dict(prompt="x" * 1001), r"prompt is 1001 characters.*at most 1000"),
        (dict(height=481), r"Height = 481 .*multiple of 16 from 256 to 832"),
        (dict(height=1024), r"Height = 1024 .*from 256 to 832"),
        (dict(width=128), r"Width = 128 .*from 256 to 832"),
        (dict(width=480.5), r"Width must be a whole number"),
        (dict(num_frames=32), r"Frames = 32 .*4k\+1 from 5 to 81"),
        (dict(num_frames=85), r"Frames = 85 .*from 5 to 81"),
        (dict(num_inference_steps=0), r"Steps = 0 .*range 4 to 100"),
        (dict(num_inference_steps=500), r"Steps = 500 .*range 4 to 100"),
        (dict(guidance_scale=20.0), r"Guidance scale = 20.0 .*range 1.0 to 10.0"),
        (dict(guidance_scale=float("nan")), r"Guidance scale must be a finite number"),
    ],
)
def test_validation_errors_name_field_value_and_range(kwargs, pattern):
    preset = load_preset("wan2.1-t2v-1.3b")
    with pytest.raises(ValueError, match=pattern):
        preset.validate_request(**kwargs)


def test_validation_accepts_whole_floats_and_fixed_frame_counts():
    assert load_preset("wan2.1-t2v-1.3b").validate_request(height=480.0) == {"height": 480}
    latte = load_preset("latte-1")
    latte.validate_request(num_frames=16)
    with pytest.raises(ValueError, match="Frames = 17 .*exactly 16"):
        latte.validate_request(num_frames=17)
    ltx = load_preset("ltx-video")
    with pytest.raises(ValueError, match="multiple of 32"):
        ltx.validate_request(height=496)
    with pytest.raises(ValueError, match="multiple of 32"):
        load_preset("wan2.2-ti2v-5b").validate_request(width=848)  # the Wan2.2 VAE's 16x times the 2x2 patch


def test_loading_reports_missing_keys_with_file_and_key(tmp_path):
    data = valid_dict()
    del data["dtype"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json.*'dtype'"):
        load_preset(bad)
    data = valid_dict()
    del data["limits"]["num_frames"]
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json.*limits\.num_frames"):
        load_preset(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON"):
        load_preset(bad)


def test_bwcache_section_takes_the_block_wise_guards_and_names_bad_ones(tmp_path):
    data = valid_dict()
    data["bwcache"].update(mode="blockwise", warmup_steps=6, tail_steps=2, accumulate_distance=False)
    p = tmp_path / "guards.json"
    p.write_text(json.dumps(data))
    assert load_preset(p).bwcache["warmup_steps"] == 6
    data["bwcache"]["warmup_steps"] = -1
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"guards\.json.*warmup_steps must be an integer ≥ 0, got -1"):
        load_preset(p)
    data["bwcache"]["warmup_steps"] = 6
    data["bwcache"]["warmup"] = 6
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown bwcache key\(s\) \['warmup'\].*warmup_steps"):
        load_preset(p)
    data["bwcache"].pop("warmup")
    data["bwcache"]["mode"] = "fast"
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"mode must be one of \('paper', 'blockwise', 'static'\)"):
        load_preset(p)


def test_loading_rejects_defaults_outside_limits(tmp_path):
    data = valid_dict()
    data["defaults"]["num_frames"] = 34
    p = tmp_path / "x.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"x\.json.*Frames = 34"):
        load_preset(p)


def test_preset_is_read_only():
    p = load_preset("wan2.1-t2v-1.3b")
    with pytest.raises(Exception):
        p.name = "other"
    with pytest.raises(TypeError):
        p.defaults["height"] = 1  # type: ignore[index]
    assert isinstance(p.limits["height"], tuple)
    hash(p)


# ----------------------------------------------------------------------------- Spacefile

SPACE_ENGINES = {"static", "react", "svelte", "vue", "next", "nuxt", "svelte-kit", "python3.9", "python3.8", "nodejs16", "custom"}


def test_spacefile_is_a_valid_v0_manifest():
    text = (ROOT / "Spacefile").read_text()
    assert "Hugging Face Spaces" in text.split("\nv:")[0]  # legacy note in the leading comment
    first = next(line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    assert first.strip() == "v: 0"
    data = yaml.safe_load(text)
    assert data["v"] == 0 and list(data)[0] == "v"
    micros = data["micros"]
    assert isinstance(micros, list) and micros
    assert sum(bool(m.get("primary")) for m in micros) == 1 or len(micros) == 1
    for m in micros:
        assert re.fullmatch(r"[A-Za-z0-9-]+", m["name"])
        assert m["src"] and m["engine"] in SPACE_ENGINES
        assert m["engine"] == "python3.9"
        assert isinstance(m["run"], str) and m["run"]
        assert isinstance(m["public_routes"], list) and m["public_routes"]
