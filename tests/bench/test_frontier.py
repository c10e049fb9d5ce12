"""Residual extrapolation, the static schedule, preset profiles and the benchmark's fair compute figure, on a stock
WanPipeline with tiny random components."""

import json

import pytest
import torch

from bwcache import BWCacheConfig, cached
from bwcache.bench import ComputeProbe, default_methods, output_paths, run_benchmark, select_methods
from bwcache.presets import Preset, load_preset, preset_names
from bwcache.runner import generate, resolve_config, resolve_settings, run_comparison
from testing_utils.tiny_wan import build_prompt_wan_pipeline, small_preset


@pytest.fixture(scope="module")
def pipe():
    return build_prompt_wan_pipeline()


@pytest.fixture(scope="module")
def preset():
    return small_preset()


def _run(pipe, preset, config=None, **settings):
    values = resolve_settings(preset, prompt="a cat", seed=1, num_inference_steps=8, **settings)
    if config is None:
        return generate(pipe, preset, values, "cpu")[0], None
    with cached(pipe, config) as handle:
        frames = generate(pipe, preset, values, "cpu")[0]
    return frames, handle.trace.to_dict()


def _blockwise(**values):
    return BWCacheConfig(**{"mode": "blockwise", "num_inference_steps": 8, "warmup_steps": 2, "tail_steps": 1,
                            "reuse_interval": 2, **values})


def test_the_static_schedule_takes_the_decisions_of_an_indicator_that_never_refuses(pipe, preset):
    static_frames, static = _run(pipe, preset, _blockwise(mode="static", threshold=0.3))
    always_frames, always = _run(pipe, preset, _blockwise(threshold=1e9))
    assert static["branches"]["cond"]["reused"] == always["branches"]["cond"]["reused"]
    assert any(any(row) for row in static["branches"]["cond"]["reused"])
    assert torch.equal(torch.as_tensor(static_frames), torch.as_tensor(always_frames))
    # Nothing is measured: no distances in the trace, no reference features held.
    assert all(v is None for row in static["branches"]["cond"]["distance"] for v in row)


def test_the_static_schedule_at_threshold_zero_reuses_nothing(pipe, preset):
    plain, _ = _run(pipe, preset)
    frames, trace = _run(pipe, preset, _blockwise(mode="static", threshold=0.0))
    assert torch.equal(torch.as_tensor(plain), torch.as_tensor(frames))
    assert not any(any(row) for row in trace["branches"]["cond"]["reused"])


@pytest.mark.parametrize("mode", ["blockwise", "paper"])
def test_extrapolation_changes_only_reused_outputs(pipe, preset, mode):
    plain, _ = _run(pipe, preset)
    extra = {"warmup_steps": 2} if mode == "blockwise" else {}
    config = dict(mode=mode, threshold=1e9, reuse_interval=2, num_inference_steps=8, **extra)
    unchanged, base_trace = _run(pipe, preset, BWCacheConfig(**config))
    moved, trace = _run(pipe, preset, BWCacheConfig(**config, extrapolation=0.5))
    # Same decisions (the schedule does not depend on the residuals), different reused outputs.
    assert trace["branches"]["cond"]["reused"] == base_trace["branches"]["cond"]["reused"]
    assert not torch.equal(torch.as_tensor(unchanged), torch.as_tensor(moved))
    # At δ = 0 nothing is reused, so extrapolation cannot change anything.
    zero, _ = _run(pipe, preset, BWCacheConfig(**{**config, "threshold": 0.0}, extrapolation=1.0))
    assert torch.equal(torch.as_tensor(plain), torch.as_tensor(zero))


def test_extrapolation_is_the_line_through_the_last_two_residuals(pipe, preset):
    """One block reused at one step: its output is the input plus r1 + e·(r1 − r0)·(t − t1)/(t1 − t0)."""
    from bwcache.hooks import BWCacheHook

    seen = {}
    original = BWCacheHook._residual_now

    def spy(self, state, head):
        result = original(self, state, head)
        if state.previous_residuals.get(head) is not None and head == 0 and self.active_branch == "cond":
            (r1, _), (r0, _, t0) = state.residuals[head], state.previous_residuals[head]
            seen[state.step] = (result[0].clone(), r1.clone(), r0.clone(), t0, state.residual_times[head],
                                state.last_timestep)
        return result

    BWCacheHook._residual_now = spy
    try:
        _run(pipe, preset, _blockwise(threshold=1e9, extrapolation=0.5))
    finally:
        BWCacheHook._residual_now = original
    assert seen
    for used, r1, r0, t0, t1, t in seen.values():
        assert t0 > t1 > t  # timesteps fall
        torch.testing.assert_close(used, r1 + (r1 - r0) * 0.5 * (t - t1) / (t1 - t0))


def test_extrapolation_and_mode_are_validated():
    with pytest.raises(ValueError, match=r"extrapolation must be between 0 and 1, got 1.5"):
        BWCacheConfig(extrapolation=1.5)
    with pytest.raises(ValueError, match=r"extrapolation must be between 0 and 1, got True"):
        BWCacheConfig(extrapolation=True)
    with pytest.raises(ValueError, match=r"mode must be one of \('paper', 'blockwise', 'static'\), got 'fixed'"):
        BWCacheConfig(mode="fixed")


def test_every_preset_names_a_default_and_a_fast_profile():
    for name in preset_names():
        preset = load_preset(name)
        assert preset.profile_names[:2] == ("default", "fast")
        default = resolve_config(preset, 30)
        fast = resolve_config(preset, 30, profile="fast")
        assert default == resolve_config(preset, 30, profile="default")
        assert fast != default and preset.profile_note("fast")
        # A cache option given on top changes the profile, nothing else.
        assert resolve_config(preset, 30, profile="fast", threshold=0.01).reuse_interval == fast.reuse_interval


def test_a_profile_that_does_not_exist_or_breaks_the_config_is_refused(tmp_path):
    preset = load_preset("tiny-shapes")
    with pytest.raises(ValueError, match=r"Profile 'turbo' is not one of Tiny Shapes .*: default, fast"):
        resolve_config(preset, 30, profile="turbo")
    data = preset.to_dict()
    data["profiles"]["fast"]["bwcache"]["extrapolation"] = 2
    with pytest.raises(ValueError, match=r"profiles.fast: extrapolation must be between 0 and 1"):
        Preset.from_dict(data, source="bad")
    data["profiles"] = {"default": data["profiles"]["fast"]}
    with pytest.raises(ValueError, match=r"profile name 'default' must be .* and not 'default'"):
        Preset.from_dict(data, source="bad")
    # A preset of one's own may name no profile but its default.
    data.pop("profiles")
    assert Preset.from_dict(data, source="mine").profile_names == ("default",)


def test_the_run_record_names_its_profile(pipe, preset):
    record = run_comparison(preset, prompt="a cat", profile="fast", pipe=pipe, device="cpu").record
    assert record["profile"] == "fast"
    assert record["config"]["threshold"] == preset.profile_settings("fast")["threshold"]


def test_the_compute_probe_counts_attention_from_its_shapes(pipe, preset):
    transformer = pipe.transformer
    settings = resolve_settings(preset, prompt="a cat", seed=1, num_inference_steps=2)
    probe = ComputeProbe(transformer)
    try:
        with probe:
            generate(pipe, preset, settings, "cpu")
    finally:
        probe.remove()
    config = transformer.config
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    latent_frames = (settings["num_frames"] - 1) // 4 + 1
    tokens = latent_frames * (settings["height"] // 8 // 2) * (settings["width"] // 8 // 2)
    text_tokens = 8  # PromptEmbeddingWanPipeline embeds 8 characters
    calls = 2 * 2 * config.num_layers  # steps × CFG branches × blocks
    # Self-attention over the video tokens and cross-attention to the text, each QKᵀ plus the weighted sum of V.
    assert probe.attention_flops == calls * 4 * heads * head_dim * tokens * (tokens + text_tokens)
    assert probe.linear_flops > 0


def test_benchmark_ablations_and_profiles_run(pipe, preset):
    methods = select_methods("bw-default,bw-fast,bw-default-unchanged,static-default,steps-as-bw-default")
    results = run_benchmark(preset, ["a cat"], methods, repeats=1, pipe=pipe, device="cpu", progress=None,
                            overhead_repeats=1)
    rows = {r["key"]: r for r in results["rows"]}
    default_skipped = rows["bw-default"]["skipped"]
    # The uncached run with fewer steps gets about the default's compute.
    assert rows["steps-as-bw-default"]["steps"] == [round(6 * (1 - default_skipped))]
    assert rows["steps-as-bw-default"]["skipped"] == pytest.approx(1 - rows["steps-as-bw-default"]["steps"][0] / 6)
    assert rows["static-default"]["speedup"] > 0 and rows["bw-fast"]["speedup"] > 0
    # The Wan preset reuses residuals unchanged already: its "unchanged" row would repeat the default's.
    assert rows["bw-default-unchanged"]["speedup"] is None
    assert rows["bw-default-unchanged"]["skipped_reason"] == "The same config as BWCache preset default on this preset."


def test_a_preset_without_a_fast_profile_leaves_its_rows_out(pipe):
    data = small_preset().to_dict()
    data.pop("profiles")
    preset = Preset.from_dict(data, source="no profiles")
    results = run_benchmark(preset, ["a cat"], select_methods("bw-default,bw-fast,steps-as-bw-fast"), repeats=1,
                            pipe=pipe, device="cpu", progress=None, overhead_repeats=1)
    rows = {r["key"]: r for r in results["rows"]}
    assert rows["bw-default"]["speedup"] > 0
    assert rows["bw-fast"]["skipped_reason"].endswith("names no fast profile.")
    assert "that row did not run" in rows["steps-as-bw-fast"]["skipped_reason"]


def test_a_steps_row_needs_the_row_it_matches():
    with pytest.raises(ValueError, match=r"steps-as-bw-fast runs as many steps as bw-fast's compute allows: add bw-fast"):
        select_methods("bw-default,steps-as-bw-fast")
    assert [m.key for m in default_methods()][:2] == ["bw-default", "bw-fast"]


def test_benchmark_results_go_to_a_new_folder_and_never_over_existing_files(tmp_path):
    fresh = output_paths(None, "tiny-shapes", overwrite=False)
    assert fresh["json"].parent.parent.as_posix() == "benchmarks/runs" and not fresh["json"].exists()
    out = tmp_path / "results"
    out.mkdir()
    (out / "tiny-shapes.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tiny-shapes.json already exists; pass --overwrite"):
        output_paths(out, "tiny-shapes", overwrite=False)
    assert output_paths(out, "tiny-shapes", overwrite=True)["json"] == out / "tiny-shapes.json"
    markdown = tmp_path / "report.md"
    markdown.write_text("mine")
    with pytest.raises(ValueError, match=r"report.md already exists"):
        output_paths(tmp_path / "other", "tiny-shapes", overwrite=False, markdown=markdown)
    assert json.loads((out / "tiny-shapes.json").read_text()) == {}


def test_the_compute_probe_leaves_the_output_bit_identical(pipe, preset):
    settings = resolve_settings(preset, prompt="a cat", seed=1, num_inference_steps=2)
    plain = generate(pipe, preset, settings, "cpu")[0]
    probe = ComputeProbe(pipe.transformer)
    try:
        with probe:
            probed = generate(pipe, preset, settings, "cpu")[0]
    finally:
        probe.remove()
    assert probe.attention_flops > 0
    assert torch.equal(torch.as_tensor(plain), torch.as_tensor(probed))
