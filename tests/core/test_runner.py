"""The runner, the peer caches and the benchmark code, on a stock WanPipeline with tiny random components."""

import dataclasses
import json
import xml.etree.ElementTree as ET

import pytest

from bwcache import BWCacheConfig, predict_schedule
from bwcache.bench import Method, default_methods, markdown_table, pareto_svg, run_benchmark
from bwcache.peers import METHODS, applicability, model_identifiers
from bwcache.pipelines import PipelineUnavailable, call_kwargs, load_pipeline
from bwcache.presets import load_preset
from bwcache.report import save_comparison, summary_markdown, summary_text
from bwcache.runner import resolve_config, run_comparison, run_sweep
from bwcache.tuning import tuning_curve
from bwcache.video import probe_video
from testing_utils.tiny_wan import build_prompt_wan_pipeline, small_preset


@pytest.fixture(scope="module")
def pipe():
    return build_prompt_wan_pipeline()


@pytest.fixture(scope="module")
def comparison(pipe):
    return run_comparison(small_preset(), prompt="a cat", seed=3, threshold=10.0, reuse_interval=1, pipe=pipe, device="cpu")


def test_the_record_holds_its_fields(comparison):
    record = comparison.record
    for key in ("preset", "prompt", "seed", "device", "baseline_seconds", "bwcache_seconds", "speedup", "psnr", "ssim",
                "lpips", "reuse_fraction", "config", "trace", "baseline_trace"):
        assert key in record
    assert record["speedup"] == pytest.approx(record["baseline_seconds"] / record["bwcache_seconds"])
    assert record["warmup_identical"]  # the traced warm-up is bit-identical to the uncached run
    assert record["trigger_steps"] == {"cond": 1, "uncond": 1}
    assert record["reuse_fraction"] == pytest.approx(2 / 6)  # steps 2 and 4 of 6 reused, both branches
    assert 0 < record["psnr"] < 200 and 0 < record["ssim"] <= 1
    assert comparison.baseline_frames.shape == comparison.bwcache_frames.shape == (5, 16, 16, 3)
    json.dumps(record, allow_nan=False)
    assert "×" in summary_markdown(record) and "trigger at step 1" in summary_text(record)
    held = record["trace"]["held_bytes_peak"]
    assert held > 0 and "- Cache memory: at most " in summary_markdown(record)


def test_the_uncached_trace_predicts_the_cached_schedule(comparison):
    record = comparison.record
    config = BWCacheConfig.from_dict(record["config"])
    predicted = predict_schedule(record["baseline_trace"], config)
    for name, branch in record["trace"]["branches"].items():
        assert predicted["branches"][name]["reused"] == branch["reused"]
    points = tuning_curve(record["baseline_trace"], config)
    assert points[0]["threshold"] == 0 and points[0]["reuse_fraction"] == 0
    assert any(p["threshold"] == config.threshold for p in points)
    assert points[-1]["reuse_fraction"] > 0


def test_threshold_zero_gives_identical_videos(pipe):
    record = run_comparison(small_preset(), prompt="a cat", seed=3, threshold=0.0, pipe=pipe, device="cpu").record
    assert record["identical"] and record["psnr"] is None and record["reuse_fraction"] == 0


def test_bad_requests_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="prompt is empty"):
        run_comparison(small_preset(), prompt="   ", pipe=pipe, device="cpu")
    with pytest.raises(ValueError, match="Height = 20 is not allowed"):
        run_comparison(small_preset(), prompt="a cat", height=20, pipe=pipe, device="cpu")
    with pytest.raises(ValueError, match="threshold must be a finite number ≥ 0"):
        run_comparison(small_preset(), prompt="a cat", threshold=-1.0, pipe=pipe, device="cpu")
    with pytest.raises(ValueError, match="seed must be an integer"):
        run_comparison(small_preset(), prompt="a cat", seed=-5, pipe=pipe, device="cpu")
    with pytest.raises(ValueError, match="Unknown cache method"):
        run_comparison(small_preset(), prompt="a cat", compare_with="teacache", pipe=pipe, device="cpu")


def test_files_are_written_playable_and_never_overwritten(comparison, tmp_path):
    paths = save_comparison(comparison, tmp_path / "run")
    for name in ("baseline", "bwcache", "side_by_side"):
        info = probe_video(paths[name])
        assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["n_frames"] == 5
    assert json.loads(open(paths["record"]).read())["seed"] == 3
    assert open(paths["trace_csv"]).read().startswith("branch,step")
    with pytest.raises(FileExistsError, match="Refusing to overwrite"):
        save_comparison(comparison, tmp_path / "run")


@pytest.mark.parametrize("method", ["fbc", "magcache", "taylorseer", "seacache"])
def test_peer_caches_run_beside_bwcache(pipe, method):
    comparison = run_comparison(small_preset(), prompt="a cat", seed=1, pipe=pipe, device="cpu", compare_with=method)
    peer = comparison.record["peer"]
    assert peer["method"] == method and peer["label"] == METHODS[method]
    assert peer["seconds"] > 0 and comparison.peer_frames.shape == comparison.baseline_frames.shape
    assert not pipe.transformer.is_cache_enabled  # removed again


def test_pab_is_refused_for_sequential_cfg(pipe):
    settings = {"guidance_scale": 5.0}
    assert "separate cond and uncond" in applicability("pab", pipe, settings)
    assert applicability("pab", pipe, {"guidance_scale": 1.0}) is None


def test_taylorseer_identifiers_match_the_model(pipe):
    identifiers = model_identifiers(pipe.transformer)
    assert r"^blocks\.0\.attn1$" in identifiers and r"^blocks\.2\.ffn$" in identifiers


def test_sweep_reuses_one_uncached_run(pipe):
    result = run_sweep(small_preset(), prompt="a cat", seed=2, thresholds=[0.0, 10.0], pipe=pipe, device="cpu")
    first, last = result["rows"]
    assert first["identical"] and first["reuse_fraction"] == 0
    assert last["reuse_fraction"] > 0 and last["psnr"] is not None
    assert result["baseline_trace"]["branches"]["cond"]["trigger_step"] is None


def test_real_presets_without_weights_or_gpu_say_so():
    with pytest.raises(PipelineUnavailable, match="needs a GPU"):
        load_pipeline(load_preset("wan2.1-t2v-1.3b"), device="cpu")


def test_call_arguments_follow_each_pipeline():
    settings = {"prompt": "p", "negative_prompt": "", "height": 512, "width": 512, "num_frames": 16,
                "num_inference_steps": 50, "guidance_scale": 7.5, "fps": 8}
    assert call_kwargs(load_preset("latte-1"), settings)["video_length"] == 16
    assert call_kwargs(load_preset("ltx-video"), settings)["frame_rate"] == 8
    assert "fps" not in call_kwargs(load_preset("wan2.1-t2v-1.3b"), settings)


def test_benchmark_rows_and_cross_checks(pipe):
    methods = [m for m in default_methods() if m.key in ("bw-paper-0.15", "bw-block-0.1", "fbc-0.1", "pab-2")]
    methods.append(Method("bw-forced", "BWCache forced", "bwcache", {"threshold": 10.0, "reuse_interval": 1}))
    results = run_benchmark(
        small_preset(), ["a cat"], methods, repeats=1, pipe=pipe, device="cpu", progress=None, overhead_repeats=1
    )
    rows = {r["key"]: r for r in results["rows"]}
    # The FLOP probe, applied to every method alike, agrees with BWCache's own trace: steps 2 and 4 of 6 skipped.
    assert rows["bw-forced"]["skipped"] == pytest.approx(2 / 6)
    assert rows["pab-2"]["speedup"] is None and "cond" in rows["pab-2"]["skipped_reason"]
    for key in ("bw-paper-0.15", "bw-block-0.1", "fbc-0.1"):
        assert rows[key]["speedup"] > 0 and 0 <= rows[key]["skipped"] < 1
    assert "| FirstBlockCache 0.1 |" in markdown_table(results["rows"])
    ET.fromstring(pareto_svg(results["rows"]))
    overheads = results["overheads"]
    assert overheads["peak_activation_bytes_uncached"] > 0
    assert 0 < overheads["block_share_of_time"] < 1 and overheads["repeats"] == 1
    assert overheads["achieved_over_ideal_range"][0] <= overheads["achieved_over_ideal"]


def test_benchmark_paper_rows_run_the_published_method_whatever_the_preset_default():
    preset = load_preset("tiny-shapes")
    assert preset.bwcache["mode"] == "blockwise" and preset.bwcache["reuse_interval"] == 2
    methods = {m.key: m for m in default_methods()}
    assert next(iter(methods)) == "bw-default" and methods["bw-default"].params == {}
    assert resolve_config(preset, 30, **methods["bw-default"].params) == resolve_config(preset, 30)
    for key in ("bw-paper-0.02", "bw-paper-0.15"):
        config = resolve_config(preset, 30, **methods[key].params)
        assert config.mode == "paper" and config.resolved_reuse_interval(30) == 3
    assert resolve_config(preset, 30, **methods["bw-paper-0.15-r1"].params).reuse_interval == 1
    block = resolve_config(preset, 30, **methods["bw-block-0.2"].params)
    assert (block.mode, block.threshold, block.reuse_interval, block.warmup_steps, block.tail_steps) == (
        "blockwise", 0.2, 2, preset.bwcache["warmup_steps"], preset.bwcache["tail_steps"])
    assert block.indicator_token_stride == preset.bwcache["indicator_token_stride"]
    assert resolve_config(preset, 30, **methods["bw-block-0.3-w2"].params).warmup_steps == 2
    assert resolve_config(preset, 30, **methods["bw-block-0.3-r3"].params).reuse_interval == 3


def test_seacache_caches_on_the_embedded_model_whose_input_adds_position_channels():
    # Tiny Shapes concatenates position channels after the noisy video (in_channels 6, out_channels 3); SeaCache must
    # still be shown the noisy video, or it silently runs every block.
    from bwcache.bench import _probe_flops
    from bwcache.peers import enable_peer
    from bwcache.runner import generate, resolve_preset, resolve_settings
    from bwcache.tiny import load_pipeline as load_tiny

    tiny = load_tiny(device="cpu")
    tiny.set_progress_bar_config(disable=True)
    assert tiny.transformer.config.in_channels > tiny.transformer.config.out_channels
    preset = resolve_preset("tiny-shapes")
    settings = resolve_settings(preset, num_frames=8, height=24, width=24, num_inference_steps=8)

    def run():
        generate(tiny, preset, settings, "cpu")

    plain = _probe_flops(tiny, run)
    peer = enable_peer("seacache", tiny, settings, params={"threshold": 10.0})
    try:
        cached = _probe_flops(tiny, run)
    finally:
        peer.remove()
    assert cached < plain


def test_the_distance_map_measures_what_the_cached_run_decides_on(pipe):
    """The uncached run's map honours the config's indicator blocks, token stride and storage dtype, and holds only
    the features it keeps: no more than the cached run's own measuring would."""
    from bwcache.policies import distance_map_config

    config = resolve_config(small_preset(), 6, indicator_blocks="every_other", mode="blockwise")
    config = dataclasses.replace(config, indicator_token_stride=2, cache_dtype="bfloat16")
    mapped = distance_map_config(config)
    assert (mapped.threshold, mapped.mode, mapped.indicator_blocks, mapped.indicator_token_stride,
            mapped.cache_dtype) == (0.0, "blockwise", "every_other", 2, "bfloat16")
    assert distance_map_config(dataclasses.replace(config, mode="static")).mode == "blockwise"
    record = run_comparison(small_preset(), prompt="a cat", seed=3, num_inference_steps=6, config=config, pipe=pipe,
                            device="cpu").record
    rows = record["baseline_trace"]["branches"]["cond"]["distance"]
    assert all(row[1] is None and row[0] is not None for row in rows[1:])
    assert record["baseline_trace"]["config"]["indicator_token_stride"] == 2
