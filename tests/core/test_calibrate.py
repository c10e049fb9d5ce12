"""Calibration to a target: every stock family end to end, the δ = 0 reference, the guardrails, profile files where
built-in profiles load, the command line and trustworthy timing. Tiny models and few steps throughout."""

import contextlib
import io
import json
import math
import warnings

import numpy as np
import pytest
import torch

import bwcache
from bwcache import BWCacheConfig, cached
from bwcache.calibrate import Calibration, ProfileMismatchWarning, calibrate_preset, calibration_prompts, read_profile
from bwcache.calibrate.candidates import Candidate, drift_proxy, frontier
from bwcache.calibrate.core import check_targets, score
from bwcache.calibrate.profile import profile_from_dict
from bwcache.policies import distance_map_config
from bwcache.presets import load_preset
from bwcache.report import summary_text, timing_note
from bwcache.runner import profile_warnings, resolve_config, run_comparison, timing_flag
from testing_utils.tiny_pipelines import PIPELINES, _call_kwargs
from testing_utils.tiny_pipelines import generate as family_generate

STEPS = 6


def family_calibration(name, pipe=None, **options):
    pipe = pipe if pipe is not None else PIPELINES[name]()
    options = {"target_psnr": 30, "budget": 2, **options}
    return calibrate(pipe, [{}], num_inference_steps=options.pop("steps", STEPS), output_type="latent",
                     **options, **_call_kwargs(name, pipe))


def calibrate(*args, **kwargs):
    return bwcache.calibrate(*args, **kwargs)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_stock_family_calibrates_end_to_end(name):
    pipe = PIPELINES[name]()
    result = family_calibration(name, pipe)
    assert isinstance(result, Calibration) and result.target == {"psnr": 30.0}
    assert result.generations["pilot"] == 1 and 1 <= result.generations["cached"] <= 2
    assert result.generations["uncached"] >= 1 and result.ranked > 0 and result.candidates
    for point in result.candidates:
        assert point["skipped"] > 0 and point["speedup"] > 0 and point["per_prompt"][0]["psnr"] is not None
        assert point["predicted_skipped"] > 0 and point["proxy"] > 0
    assert result.met == any(p["meets"] for p in result.candidates)
    assert result.config is not None and result.chosen["config"] == result.config.to_dict()
    setting = result.setting
    assert setting["transformer_class"] == type(pipe.transformer).__name__ and setting["transformer_config"]
    assert setting["num_inference_steps"] == STEPS and setting["pipeline_class"].endswith("Pipeline")
    assert setting["dtype"] == "float32" and setting["scheduler_class"]
    json.dumps(result.to_dict(), allow_nan=False)
    assert result.seconds > 0 and set(result.phases) == {"pilots", "ranking", "verification"}


def test_it_calibrates_the_pipeline_as_the_user_set_it_up():
    """Their scheduler and offloading stay as they are; the setting names the scheduler that ran."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = PIPELINES["wan"]()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    pipe.enable_model_cpu_offload(device="cpu")
    result = family_calibration("wan", pipe, budget=1)
    assert result.setting["scheduler_class"] == "FlowMatchEulerDiscreteScheduler"
    assert result.candidates and not hasattr(pipe.transformer, "_bwcache_state")


def test_a_threshold_zero_candidate_is_bit_identical_to_uncached():
    pipe = PIPELINES["wan"]()
    uncached = family_generate("wan", pipe, seed=0, num_inference_steps=STEPS)
    pilot = distance_map_config(BWCacheConfig(mode="blockwise", threshold=0.3))
    for config in (pilot, BWCacheConfig(mode="paper", threshold=0.0), BWCacheConfig(mode="static", threshold=0.0),
                   BWCacheConfig(mode="blockwise", threshold=0.0, extrapolation=0.5)):
        with cached(pipe, config):
            frames = family_generate("wan", pipe, seed=0, num_inference_steps=STEPS)
        assert torch.equal(frames, uncached), config
    reference = uncached.numpy()
    assert score(reference, reference.copy()) == {"psnr": math.inf, "ssim": 1.0, "identical": True}


def test_a_target_no_candidate_meets_is_said_plainly_with_the_best_point():
    result = family_calibration("wan", target_psnr=80, budget=2)
    assert not result.met and result.recommendation == "uncached"
    assert "No candidate meets PSNR ≥ 80 dB" in result.message and "Run uncached" in result.message
    best = max(result.candidates, key=lambda p: p["psnr"])
    assert result.chosen is best and result.config.to_dict() == best["config"]
    assert "NOT met" in result.summary()


def test_too_few_steps_to_reuse_anything_runs_nothing_cached():
    result = family_calibration("wan", steps=2)
    assert result.config is None and not result.met and result.generations["cached"] == 0
    assert "With 2 steps no schedule reuses anything" in result.message and "Run uncached" in result.message
    with pytest.raises(ValueError, match="Nothing to save"):
        result.save("nothing.json")


def test_a_speedup_target_is_checked_against_timed_runs():
    result = family_calibration("wan", target_psnr=None, target_speedup=1.05, budget=3)
    assert result.target == {"speedup": 1.05}
    for point in result.candidates:
        assert point["meets"] == (point["speedup"] >= 1.05)
        assert point["speedup_min"] <= point["speedup"] <= point["speedup_max"]
        assert point["timing_flag"] in (None, "below_ideal", "above_ideal")
    if result.met:
        passing = [p for p in result.candidates if p["meets"]]
        assert result.chosen["psnr"] == max(p["psnr"] for p in passing)


def test_bad_targets_and_budgets_are_refused_naming_the_field_and_range():
    class NoPipe:
        def __call__(self, *args, **kwargs):
            raise AssertionError("the pipeline ran")

    cases = [
        ({}, "Give one target: target_psnr (dB, 10 to 80) or target_speedup (×, above 1 and at most 10)"),
        ({"target_psnr": 30, "target_speedup": 2}, "Give one target"),
        ({"target_psnr": 5}, "target_psnr must be a number of dB from 10 to 80, got 5"),
        ({"target_psnr": float("nan")}, "target_psnr must be a number of dB from 10 to 80"),
        ({"target_speedup": 1.0}, "target_speedup must be a speedup above 1 and at most 10, got 1.0"),
        ({"target_speedup": 11}, "target_speedup must be a speedup above 1 and at most 10"),
        ({"target_psnr": 30, "budget": 0}, "budget must be a whole number of cached generations from 1 to 100, got 0"),
        ({"target_psnr": 30, "budget": 101}, "from 1 to 100, got 101"),
        ({"target_psnr": 30, "budget": 2.5}, "from 1 to 100, got 2.5"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            bwcache.calibrate(NoPipe(), ["a cat"], **options)
    with pytest.raises(ValueError, match="prompts is empty"):
        bwcache.calibrate(NoPipe(), [], target_psnr=30)
    with pytest.raises(ValueError, match="calibrate sets generator itself"):
        bwcache.calibrate(NoPipe(), ["a cat"], target_psnr=30, generator=torch.Generator())
    with pytest.raises(ValueError, match="--budget must be a whole number"):
        check_targets(30, None, -1, names={"budget": "--budget"})


def test_the_proxy_counts_drift_since_the_last_computed_step():
    # One branch, one block, 5 steps with step-to-step distances 0.1 each; reused at steps 2 and 3.
    trace = {"num_blocks": 1, "branches": {"cond": {
        "distance": [[None], [0.1], [0.1], [0.1], [0.1]], "timesteps": [1000, 800, 600, 400, 200]}}}
    schedule = {"branches": {"cond": {"reused": [[False], [False], [True], [True], [False]]}}}
    unchanged = BWCacheConfig(mode="static", extrapolation=0.0)
    # Drift 0.1 at step 2 (weight 0.6), 0.2 at step 3 (weight 0.4).
    assert drift_proxy(trace, schedule, unchanged) == pytest.approx(0.6 * 0.1 + 0.4 * 0.2)
    # A full extrapolation of a steady drift predicts it exactly.
    assert drift_proxy(trace, schedule, BWCacheConfig(mode="static", extrapolation=1.0)) == pytest.approx(0.0)
    assert drift_proxy(trace, schedule, unchanged, weighting="none") == pytest.approx((0.1 + 0.2) / 5)
    points = [Candidate(BWCacheConfig(threshold=t), predicted_skipped=s, proxy=p)
              for t, s, p in ((0.1, 0.2, 1.0), (0.2, 0.4, 2.0), (0.3, 0.4, 3.0), (0.4, 0.3, 2.5), (0.5, 0.0, 0.0))]
    assert [c.config.threshold for c in frontier(points)] == [0.1, 0.2]


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """A calibration of the embedded preset through the command line: 6 steps, 8 frames, one prompt, budget 2."""
    from bwcache import cli

    folder = tmp_path_factory.mktemp("profile")
    prompts = folder / "prompts.txt"
    prompts.write_text("a red square moving right\n\n")
    out = folder / "tiny.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["calibrate", "--preset", "tiny-shapes", "--target-psnr", "12", "--prompt-file", str(prompts),
                         "--budget", "2", "--steps", "6", "--frames", "8", "--seed", "1", "--device", "cpu",
                         "--out", str(out)])
    assert out.is_file()
    return out, code, printed.getvalue()


def test_the_command_line_writes_a_profile_file_that_round_trips(tiny_profile, capsys):
    path, code, printed = tiny_profile
    data = json.loads(path.read_text())
    assert code == (0 if data["met"] else 1)
    assert data["format"] == "bwcache-profile" and data["version"] == 1
    assert data["setting"]["preset"] == "tiny-shapes" and data["setting"]["num_inference_steps"] == 6
    assert data["setting"]["num_frames"] == 8 and data["setting"]["transformer_class"] == "WanTransformer3DModel"
    assert data["prompts"] == ["a red square moving right"] and data["frontier"] and data["candidates"]
    assert data["generations"]["cached"] <= 2 and data["target"] == {"psnr": 12.0} and data["met"] and code == 0
    assert f"wrote {path}" in printed and "Met: PSNR ≥ 12 dB" in printed
    profile = read_profile(path)
    chosen = next(c for c in data["candidates"]
                  if (c["speedup"], c["psnr"]) == (data["measured"]["speedup"], data["measured"]["psnr"]))
    assert profile.config(6) == BWCacheConfig.from_dict(
        {k: tuple(v) if isinstance(v, list) else v for k, v in chosen["config"].items()})
    preset = load_preset("tiny-shapes")
    request = {"height": 32, "width": 32, "num_frames": 8, "guidance_scale": 5.0}
    notes = profile_warnings(preset, str(path), {**request, "num_inference_steps": 6})
    assert notes == ([] if data["met"] else [f"Profile file {path} did not meet its target when calibrated: "
                                              f"{data['message']}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error" if data["met"] else "ignore")  # the setting it was measured for
        config = resolve_config(preset, 6, profile=str(path), request=request)
    assert config == profile.config(6)
    assert "calibrated profile (tiny.json): target psnr 12 met" in preset.profile_note(str(path))


def test_a_calibration_saves_a_profile_file_that_loads_back(tmp_path):
    result = family_calibration("wan")
    path = result.save(tmp_path / "wan.json")
    profile = read_profile(path)
    assert profile.config(STEPS) == result.config and profile.met == result.met
    assert profile.setting["transformer_class"] == "WanTransformer3DModel" and profile.frontier
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        result.save(path)
    assert result.save(path, overwrite=True) == path
    with pytest.raises(ValueError, match="ends in .json"):
        result.save(tmp_path / "wan.txt")


def test_a_profile_used_on_another_setting_warns_naming_the_differences(tiny_profile):
    path, _, _ = tiny_profile
    preset = load_preset("tiny-shapes")
    with pytest.warns(ProfileMismatchWarning, match=r"steps 12 \(measured at 6\)"):
        config = resolve_config(preset, 12, profile=str(path))
    profile = read_profile(path)
    for name, share in profile.fractions.items():  # counted in steps: scaled to the new step count
        if getattr(config, name) is not None:
            assert getattr(config, name) == max(1 if name == "reuse_interval" else 0, round(share * 12))
    notes = profile_warnings(preset, str(path), {"num_inference_steps": 6, "num_frames": 12, "height": 32,
                                                 "width": 32, "guidance_scale": 5.0})
    assert notes and "frames 12 (measured at 8)" in notes[0]
    other = {**json.loads(path.read_text())}
    other["setting"] = {**other["setting"], "transformer_class": "HunyuanVideoTransformer3DModel", "preset": "other"}
    mismatch = profile_from_dict(other).mismatches(
        {"preset": "tiny-shapes", "transformer_class": "WanTransformer3DModel", "num_inference_steps": 6})
    assert "transformer WanTransformer3DModel (measured at HunyuanVideoTransformer3DModel)" in mismatch
    assert "preset tiny-shapes (measured at other)" in mismatch


def test_a_profile_file_runs_in_compare_with_repeated_timing(tiny_profile, capsys):
    path, _, _ = tiny_profile
    with pytest.warns(ProfileMismatchWarning, match=r"frames 12 \(measured at 8\)"):
        comparison = run_comparison("tiny-shapes", prompt="a blue circle moving up", profile=str(path),
                                    num_inference_steps=6, num_frames=12, timing_repeats=2, device="cpu")
    record = comparison.record
    assert record["profile"] == str(path) and "frames 12 (measured at 8)" in record["profile_warnings"][0]
    assert len(record["speedup_runs"]) == 2 and record["speedup_min"] <= record["speedup"] <= record["speedup_max"]
    assert record["speedup"] == pytest.approx(np.median([r["speedup"] for r in record["speedup_runs"]]))
    assert "timing_flag" in record and "median of 2 pairs" in summary_text(record)
    assert "calibrated on another setting" in summary_text(record)
    with pytest.raises(ValueError, match="timing_repeats must be a whole number from 1 to 20"):
        run_comparison("tiny-shapes", timing_repeats=0, device="cpu")


def test_the_bench_runs_a_profile_file_as_its_own_method(tiny_profile):
    from bwcache.bench import select_methods
    from bwcache.bench.run import _not_applicable

    path, _, _ = tiny_profile
    methods = select_methods("bw-default", path)
    assert [m.key for m in methods] == ["bw-default", "bw-calibrated"]
    calibrated = methods[1]
    preset = load_preset("tiny-shapes")
    settings = {"num_inference_steps": 6, "height": 32, "width": 32, "num_frames": 8, "guidance_scale": 5.0}
    assert _not_applicable(calibrated, methods, None, preset, settings) is None
    assert resolve_config(preset, 6, profile=calibrated.profile, request=settings) == read_profile(path).config(6)
    with pytest.raises(ValueError, match="bw-calibrated runs a profile file: give it with --profile-file"):
        select_methods("bw-calibrated")


def test_the_command_line_refuses_bad_arguments_before_any_model_work(tmp_path, monkeypatch, capsys):
    from bwcache import cli, pipelines

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipelines, "get_pipeline", no_model)
    monkeypatch.setattr(pipelines, "load_pipeline", no_model)
    existing = tmp_path / "taken.json"
    existing.write_text("{}")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    words = tmp_path / "words.txt"
    words.write_text("a purple square moving right\n")
    out = str(tmp_path / "new.json")
    cases = [
        (["--target-psnr", "5", "--out", out], "--target-psnr must be a number of dB from 10 to 80, got 5.0"),
        (["--target-speedup", "0.5", "--out", out], "--target-speedup must be a speedup above 1 and at most 10"),
        (["--out", out], "Give one target: --target-psnr (dB, 10 to 80) or --target-speedup"),
        (["--target-psnr", "30", "--budget", "0", "--out", out], "--budget must be a whole number of cached "
                                                                  "generations from 1 to 100, got 0"),
        (["--target-psnr", "30", "--prompt-file", str(tmp_path / "nope.txt"), "--out", out], "does not exist"),
        (["--target-psnr", "30", "--prompt-file", str(empty), "--out", out], "holds no line"),
        (["--target-psnr", "30", "--prompt-file", str(words), "--out", out], "line 1 of"),
        (["--target-psnr", "30", "--out", str(existing)], "Refusing to overwrite"),
        (["--target-psnr", "30", "--out", str(blocker / "p.json")], f"cannot be created: {blocker} is a file"),
        (["--target-psnr", "30", "--out", str(tmp_path / "p.txt")], "a profile file's name ends in .json"),
        (["--target-psnr", "30", "--steps", "500", "--out", out], "Steps = 500 is outside the allowed range"),
        (["--target-psnr", "30", "--image", str(words), "--out", out], "error: Image is not a PNG, JPEG or WebP image"),
        (["--preset", "wan2.1-t2v-1.3b", "--target-psnr", "30", "--image", str(words), "--out", out],
         "error: Image: Wan2.1 T2V 1.3B takes no image"),
    ]
    for arguments, message in cases:
        assert cli.main(["calibrate", *arguments]) == 2, arguments
        assert message in capsys.readouterr().err, arguments
    assert cli.main(["compare", "--profile-file", str(tmp_path / "missing.json")]) == 2
    assert "Profile file not found" in capsys.readouterr().err
    assert cli.main(["compare", "--profile-file", str(existing)]) == 2
    assert "is not a BWCache profile" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty.txt", "taken.json", "words.txt"]


def test_speeds_far_from_the_ideal_are_flagged_in_either_direction():
    assert timing_flag(1.0, 2.0, 0.5) == "below_ideal" and timing_flag(3.0, 2.0, 0.5) == "above_ideal"
    assert timing_flag(1.9, 2.0, 0.5) is None and timing_flag(3.0, 2.0, 0.0) is None
    record = {"ideal_speedup": 2.0, "speedup": 3.0, "reuse_fraction": 0.5}
    assert "another process sharing the CPU or GPU" in timing_note(record)
    assert timing_note({**record, "timing_flag": None}) is None


def test_the_preset_prompts_and_profile_files_load_where_built_in_profiles_do(tmp_path):
    from bwcache.bench import TINY_PROMPTS

    preset = load_preset("tiny-shapes")
    assert calibration_prompts(preset) == list(TINY_PROMPTS[:3])
    assert calibration_prompts(preset, budget=4) == list(TINY_PROMPTS[:1])
    assert calibration_prompts(load_preset("wan2.1-t2v-1.3b")) == [load_preset("wan2.1-t2v-1.3b").defaults["prompt"]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "bwcache-profile", "version": 1, "bwcache": {"threshold": -1}}))
    with pytest.raises(ValueError, match="bad.json: threshold must be a finite number"):
        preset.profile_settings(str(bad))
    with pytest.raises(ValueError, match="Profile 'turbo' is not one of"):
        preset.profile_settings("turbo")
    assert calibrate_preset is not None


def test_the_sweep_table_says_when_a_speedup_is_far_from_the_ideal():
    from bwcache import ui

    row = {"threshold": 0.1, "seconds": 1.0, "psnr": 30.0, "ssim": 0.9, "reuse_fraction": 0.5, "identical": False,
           "trigger_steps": {"cond": 3}}
    result = {"rows": [{**row, "speedup": 3.0, "ideal_speedup": 1.5, "timing_flag": timing_flag(3.0, 1.5, 0.5)},
                       {**row, "speedup": 1.5, "ideal_speedup": 1.5, "timing_flag": timing_flag(1.5, 1.5, 0.5)}]}
    table = ui.sweep_table(result)
    assert len(ui.SWEEP_HEADERS) == len(table[0]) and ui.SWEEP_HEADERS[-1] == "timing"
    assert table[0][-1].startswith("far above the ideal") and table[1][-1] == ""


def test_bench_rows_flag_speedups_far_from_their_skipped_compute():
    from bwcache.bench.report import timing_lines
    from bwcache.bench.run import _timing_check

    assert _timing_check(3.0, 0.5) == {"ideal_speedup": 2.0, "timing_flag": "above_ideal"}
    assert _timing_check(1.2, 0.5)["timing_flag"] == "below_ideal" and _timing_check(1.9, 0.5)["timing_flag"] is None
    rows = [{"label": "fast", "speedup": 3.0, **_timing_check(3.0, 0.5)},
            {"label": "fine", "speedup": 1.9, **_timing_check(1.9, 0.5)}]
    text = timing_lines(rows)
    assert "fast: 3.00× against about 2.00×" in text and "overstated" in text and "fine" not in text
    assert timing_lines(rows[1:]) == ""
