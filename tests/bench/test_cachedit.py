"""cache-dit's DBCache as a peer (bwcache.cachedit), alone and with TaylorSeer, on the Tiny Shapes model and on a
stock WanPipeline with tiny random components; and what the app and the CLI offer when cache-dit is missing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bwcache import apply_bwcache, peers
from bwcache.bench import _probe_flops
from bwcache.blocks import find_blocks
from bwcache.runner import generate, resolve_preset, resolve_settings, run_comparison
from bwcache.tiny import load_pipeline as load_tiny
from testing_utils.tiny_wan import build_wan22_pipeline, build_wan_pipeline

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["cachedit", "cachedit-taylorseer"]


def block_calls(pipe, work):
    """`work()`, and how many times the DiT blocks' forward ran in it (hooks that leave the result untouched)."""
    calls = []
    handles = [spec.module.register_forward_hook(lambda *_: calls.append(1)) for spec in find_blocks(pipe.transformer)]
    try:
        result = work()
    finally:
        for handle in handles:
            handle.remove()
    return result, len(calls)


def check_reuse(peer, plain_calls, calls, calls_per_step) -> float:
    """cache-dit's own stats say which calls reused the cache; the block calls that really ran agree. Returns the
    share of block calls skipped."""
    (stats,) = peer.stats()
    fn, bn = peer.config.cache_config.Fn_compute_blocks, peer.config.cache_config.Bn_compute_blocks
    reused = len(stats["cached_steps"]) + len(stats["cfg_cached_steps"])
    assert reused > 0
    if calls_per_step == 1:
        assert stats["cfg_cached_steps"] == []
    skipped = reused * (stats["blocks"] - fn - bn)
    assert calls == plain_calls - skipped
    return skipped / plain_calls


@pytest.fixture(scope="module")
def tiny():
    pipe = load_tiny(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_run(tiny):
    """Tiny Shapes at the preset's 30 steps on a smaller clip: the uncached video, its block calls and block FLOPs."""
    preset = resolve_preset("tiny-shapes")
    settings = resolve_settings(preset, num_frames=8, height=24, width=24)
    assert settings["num_inference_steps"] == 30 and settings["guidance_scale"] > 1

    def run():
        return generate(tiny, preset, settings, "cpu")[0]

    baseline, calls = block_calls(tiny, run)
    return run, settings, baseline, calls, _probe_flops(tiny, run)


@pytest.mark.parametrize("method", METHODS)
def test_tiny_shapes_skips_blocks_changes_the_video_and_removes_bit_for_bit(tiny, tiny_run, method):
    run, settings, baseline, plain_calls, plain_flops = tiny_run
    assert plain_calls == 30 * 2 * len(tiny.transformer.blocks)
    forward = vars(tiny.transformer).get("forward")
    peer = peers.enable_peer(method, tiny, settings)
    try:
        assert peer.config.cache_config.enable_separate_cfg  # cond and uncond are two calls per step
        # The benchmark's FLOP probe sees the skipped blocks as not run (in a run of its own: it may round apart).
        probed = {}
        flops = _probe_flops(tiny, lambda: probed.setdefault("calls", block_calls(tiny, run)[1]))
        assert 1 - flops / plain_flops == pytest.approx(check_reuse(peer, plain_calls, probed["calls"], 2))
        frames, calls = block_calls(tiny, run)
        check_reuse(peer, plain_calls, calls, calls_per_step=2)
    finally:
        peer.remove()
    assert not np.array_equal(frames, baseline)
    assert np.array_equal(run(), baseline)
    assert vars(tiny.transformer).get("forward") is forward and "_is_cached" not in vars(type(tiny))
    assert not hasattr(tiny.transformer.blocks, "_context_kwargs") and not hasattr(tiny, "_context_manager")


@pytest.fixture(scope="module")
def wan():
    return build_wan_pipeline()


def wan_call(pipe, guidance_scale, steps=12):
    gen = torch.Generator().manual_seed(0)
    embeds, negative = torch.randn(1, 8, 32, generator=gen), torch.randn(1, 8, 32, generator=gen)

    def run():
        return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
                    num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
                    generator=torch.Generator().manual_seed(0)).frames

    return run


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_a_wan_pipeline_skips_blocks_changes_the_video_and_removes_bit_for_bit(wan, method, guidance_scale):
    # A stock WanPipeline takes cache-dit's own Wan adapter; without CFG each step is one call, and cache-dit must
    # count it as one step.
    run = wan_call(wan, guidance_scale)
    calls_per_step = 2 if guidance_scale > 1 else 1
    baseline, plain_calls = block_calls(wan, run)
    assert plain_calls == 12 * calls_per_step * 3
    peer = peers.enable_peer(method, wan, {"guidance_scale": guidance_scale})
    try:
        assert peer.config.cache_config.enable_separate_cfg == (calls_per_step == 2)
        frames, calls = block_calls(wan, run)
        check_reuse(peer, plain_calls, calls, calls_per_step)
    finally:
        peer.remove()
    assert not np.array_equal(frames, baseline)
    assert np.array_equal(run(), baseline)


def test_both_experts_of_a_wan22_pipeline_are_cached_and_removed():
    pipe = build_wan22_pipeline()
    run = wan_call(pipe, 5.0, steps=16)
    baseline = run()
    forwards = [vars(t).get("forward") for t in (pipe.transformer, pipe.transformer_2)]
    peer = peers.enable_peer("cachedit", pipe, {"guidance_scale": 5.0})
    try:
        frames = run()
        stats = peer.stats()  # one per expert, each counting its own steps
    finally:
        peer.remove()
    assert len(stats) == 2 and all(s["cached_steps"] and s["cfg_cached_steps"] for s in stats)
    assert not np.array_equal(frames, baseline) and np.array_equal(run(), baseline)
    assert all(vars(t).get("forward") is f for t, f in zip((pipe.transformer, pipe.transformer_2), forwards))


@pytest.mark.parametrize("method", METHODS)
def test_run_comparison_runs_cachedit_beside_bwcache(tiny, method):
    comparison = run_comparison("tiny-shapes", num_frames=8, height=24, width=24, compare_with=method, pipe=tiny,
                                device="cpu")
    peer = comparison.record["peer"]
    assert peer["method"] == method and peer["label"] == peers.METHODS[method]
    assert peer["seconds"] > 0 and comparison.peer_frames.shape == comparison.baseline_frames.shape
    assert not peer["identical"] and 15 < peer["psnr"] < 200
    json.dumps(comparison.record, allow_nan=False)
    assert "_is_cached" not in vars(type(tiny)) and not hasattr(tiny.transformer, "_original_forward")


def test_settings_that_cannot_work_are_refused(tiny):
    settings = {"guidance_scale": 5.0}
    blocks = len(tiny.transformer.blocks)
    with pytest.raises(ValueError, match=f"at least one of the {blocks} blocks"):
        peers.enable_peer("cachedit", tiny, settings, params={"Fn_compute_blocks": blocks - 2, "Bn_compute_blocks": 2})
    with pytest.raises(ValueError, match="Fn ≥ 1"):
        peers.enable_peer("cachedit", tiny, settings, params={"Fn_compute_blocks": 0})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['taylorseer_order'\]"):
        peers.enable_peer("cachedit", tiny, settings, params={"taylorseer_order": 2})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['enable_separate_cfg'\]"):
        peers.enable_peer("cachedit-taylorseer", tiny, settings, params={"enable_separate_cfg": False})
    assert "_is_cached" not in vars(type(tiny)) and not hasattr(tiny.transformer, "_original_forward")


def test_it_refuses_to_share_the_pipeline_with_another_cache(tiny):
    settings = {"guidance_scale": 5.0}
    handle = apply_bwcache(tiny)
    try:
        with pytest.raises(ValueError, match="BWCache is applied"):
            peers.enable_peer("cachedit", tiny, settings)
    finally:
        handle.remove()
    peer = peers.enable_peer("cachedit", tiny, settings)
    try:
        with pytest.raises(ValueError, match="already enabled"):
            peers.enable_peer("cachedit-taylorseer", tiny, settings)
        with pytest.raises(ValueError, match=r"is cached by cache-dit; remove it"):
            apply_bwcache(tiny)
    finally:
        peer.remove()
    apply_bwcache(tiny).remove()


def test_a_generation_refuses_cachedit_enabled_behind_bwcache_s_back(tiny):
    preset = resolve_preset("tiny-shapes")
    settings = resolve_settings(preset, num_frames=8, height=24, width=24, num_inference_steps=4)
    handle = apply_bwcache(tiny)
    try:
        tiny.transformer._is_cached = True  # what cache_dit.enable_cache leaves on the transformer
        with pytest.raises(ValueError, match=r"Another cache was applied on top of BWCache \(cache-dit"):
            generate(tiny, preset, settings, "cpu")
    finally:
        del tiny.transformer._is_cached
        handle.remove()


def test_pipelines_without_a_cachedit_adapter_say_why():
    from testing_utils.tiny_pipelines import PIPELINES

    reason = peers.applicability("cachedit", PIPELINES["latte"](), {"guidance_scale": 7.5})
    assert "no block adapter for LattePipeline" in reason


def test_installed_it_is_offered_by_the_app_and_the_cli(capsys):
    from bwcache import ui
    from bwcache.cli import main

    assert set(METHODS) <= set(peers.METHODS) and set(METHODS) <= set(ui.PEER_METHODS)
    assert peers.UNAVAILABLE == {} and ui.parse_peer("cachedit-taylorseer") == "cachedit-taylorseer"
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "also run a peer cache: fbc, magcache, taylorseer, seacache, pab, cachedit, cachedit-taylorseer" in help_text
    assert "need cache-dit" not in help_text


MISSING = """
import contextlib, io, json, sys
sys.modules["cache_dit"] = None  # as if cache-dit were not installed
from bwcache import peers, ui
from bwcache.cli import main

out = {"methods": list(peers.METHODS), "ui_methods": list(ui.PEER_METHODS), "unavailable": peers.UNAVAILABLE}
for name, call in (("check", lambda: peers.check_method("cachedit")), ("ui", lambda: ui.parse_peer("cachedit"))):
    try:
        call()
    except ValueError as error:
        out[name] = str(error)
help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    main(["compare", "--help"])
out["help"] = " ".join(help_text.getvalue().split())
err = io.StringIO()
with contextlib.redirect_stderr(err):
    out["cli_rc"] = main(["compare", "--compare-with", "cachedit-taylorseer", "--steps", "2"])
out["cli"] = err.getvalue()
print(json.dumps(out))
"""


def test_without_cachedit_it_is_not_offered_and_asking_for_it_says_how_to_install():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", MISSING], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not set(METHODS) & set(out["methods"]) and not set(METHODS) & set(out["ui_methods"])
    assert {"fbc", "magcache", "taylorseer", "seacache", "pab"} <= set(out["methods"])
    assert set(out["unavailable"]) == set(METHODS)
    hint = "pip install -r requirements-cachedit.txt"
    assert hint in out["check"] and "'cachedit'" in out["check"]
    assert out["ui"].startswith("Compare against: ") and hint in out["ui"]
    # The CLI lists the peers it can run and says how to get the others; asking for one fails before any model work.
    assert "also run a peer cache: fbc, magcache, taylorseer, seacache, pab;" in out["help"]
    assert f"cachedit, cachedit-taylorseer need cache-dit: {hint}" in out["help"]
    assert out["cli_rc"] == 2 and out["cli"].startswith("error: ") and hint in out["cli"]
