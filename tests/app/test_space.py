"""The Space deploys: README's front matter within the Hub's rules, binaries stored through LFS, and the ZeroGPU
path keeping our messages (with the `spaces` package installed, and with a stand-in for ZeroGPU's worker process)."""

from __future__ import annotations

import multiprocessing
import re
import subprocess
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

import app
from bwcache import space, ui
from testing_utils.checkout import checkout_files
from testing_utils.tiny_wan import build_prompt_wan_pipeline

ROOT = Path(__file__).resolve().parents[2]
WAN = "wan2.1-t2v-1.3b"
WAN_SMALL = dict(negative_prompt="", reuse_interval="auto", tail_fraction=0.5, mode="paper", num_inference_steps=4,
                 num_frames=5, height=256, width=256, guidance_scale=5.0)


# ----------------------------------------------------------------------------- the card


def test_the_card_follows_the_hubs_rules():
    card = space.card()
    assert 0 < len(card["short_description"]) <= space.SHORT_DESCRIPTION_MAX
    presets = ui.available_presets()
    # Every preset's model is listed, so the Hub links the Space to it.
    assert {p.hub_id for p in presets.values() if p.hub_id} <= set(card["models"])
    preloaded = space.preloaded(card)
    assert preloaded and set(preloaded) <= set(card["models"])
    served = space.served(presets, card)
    assert "tiny-shapes" in served and any(ui.needs_gpu(p) for p in served.values())
    # The suggested hardware holds every model the Space serves.
    memory = space.HARDWARE_MEMORY_GB[card["suggested_hardware"]]
    assert all(p.recommended_gpu_memory_gb <= memory for p in served.values())
    gradio_pin = re.search(r"^gradio==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    assert card["sdk"] == "gradio" and card["sdk_version"] == gradio_pin
    assert (ROOT / card["app_file"]).is_file()


def test_every_tracked_binary_is_stored_through_lfs():
    binary = [p for p in checkout_files() if b"\0" in (ROOT / p).read_bytes()[:8000]]
    assert any(p.endswith(".mp4") for p in binary) and any(p.endswith(".safetensors") for p in binary)
    attributes = subprocess.run(["git", "check-attr", "filter", "--", *binary], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.splitlines()
    not_lfs = [line for line in attributes if not line.endswith(": filter: lfs")]
    assert not not_lfs, not_lfs


def test_on_a_space_the_app_offers_the_preloaded_presets():
    served = ui.available_presets(space=True)
    preloaded = set(space.preloaded(space.card()))
    assert all(p.hub_id is None or p.hub_id in preloaded for p in served.values())
    assert set(served) < set(ui.available_presets())


# ----------------------------------------------------------------------------- ZeroGPU


def zero_gpu_standin(function):
    """Runs `function` in a forked worker process as ZeroGPU does: the result comes back pickled, a `gr.Error`
    comes back as itself, and any other exception as a generic worker error."""

    def run(*args, **kwargs):
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)

        def work():
            try:
                send.send(("result", function(*args, **kwargs)))
            except gr.Error as error:
                send.send(("gr.Error", (error.message, error.title)))
            except BaseException:  # noqa: BLE001 (what the stand-in stands for)
                send.send(("other", None))

        worker = context.Process(target=work)
        worker.start()
        kind, value = receive.recv()
        worker.join(timeout=60)
        if kind == "gr.Error":
            raise gr.Error(value[0], title=value[1])
        if kind == "other":
            raise gr.Error("ZeroGPU worker error", title="Error")
        run.returned = value
        return value

    return run


@pytest.fixture
def zero_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(app, "_compare_on_gpu", zero_gpu_standin(app._compare_work))
    monkeypatch.setattr(app, "OUTPUT_ROOT", tmp_path)
    return app._compare_on_gpu


def test_the_spaces_decorator_is_installed_and_inert_off_spaces():
    assert app.spaces is not None and not app.ON_ZERO_GPU
    assert app._compare_on_gpu is app._compare_work and app._sweep_on_gpu is app._sweep_work


def test_our_messages_survive_the_gpu_worker(zero_gpu):
    # No GPU and no weights here: loading fails inside the GPU function, and the message must come back.
    with pytest.raises(gr.Error) as excinfo:
        app.compare("a cat", "wan2.1-t2v-14b", 0.15, 0, num_inference_steps=4, num_frames=5, height=256, width=256)
    assert excinfo.value.title == "Model unavailable"
    assert "Wan2.1 T2V 14B" in str(excinfo.value) and "ZeroGPU" not in str(excinfo.value)


def test_a_gpu_run_returns_uint8_frames_across_the_worker(zero_gpu, monkeypatch):
    monkeypatch.setitem(app.PIPELINE_OVERRIDES, WAN, build_prompt_wan_pipeline())
    baseline, cached, *_ = app.compare("a cat on the grass", WAN, 0.15, 3, **WAN_SMALL)
    assert Path(baseline).is_file() and Path(cached).is_file()
    comparison = zero_gpu.returned
    assert comparison.baseline_frames.dtype == np.uint8 and comparison.bwcache_frames.dtype == np.uint8


def test_the_cpu_preset_runs_outside_the_gpu_function(monkeypatch, tmp_path):
    def no_gpu(*args, **kwargs):
        raise AssertionError("the Tiny Shapes preset asked for the GPU")

    monkeypatch.setattr(app, "_compare_on_gpu", no_gpu)
    monkeypatch.setattr(app, "OUTPUT_ROOT", tmp_path)
    baseline, *_ = app.compare("a red square moving right", "tiny-shapes", 0.3, 0, num_inference_steps=4,
                               num_frames=8)
    assert Path(baseline).is_file()


def test_the_space_bundle_pins_a_torch_zerogpu_runs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_bundle", ROOT / "scripts" / "space_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.bundle(tmp_path / "space")
    except subprocess.CalledProcessError:
        pytest.skip("not a git checkout")
    out = tmp_path / "space"
    requirements = (out / "requirements.txt").read_text()
    assert f"torch=={module.ZEROGPU_TORCH}" in requirements.splitlines()
    major, minor = map(int, module.ZEROGPU_TORCH.split(".")[:2])
    assert (2, 8) <= (major, minor) <= (2, 11)  # the versions ZeroGPU supports
    # Everything else as tracked; the card travels with the app.
    original = (ROOT / "requirements.txt").read_text().splitlines()
    assert [line for line in requirements.splitlines() if not line.startswith("torch==")] == \
        [line for line in original if not line.startswith("torch==")]
    assert (out / "README.md").read_text() == (ROOT / "README.md").read_text()
    for name in ("app.py", "bwcache/__init__.py", "presets/tiny-shapes.json", "assets/tiny-shapes/config.json",
                 ".gitattributes"):
        assert (out / name).is_file(), name
    assert not (out / "tests").exists()
    with pytest.raises(FileExistsError):
        module.bundle(out)


def test_the_cpu_preset_stays_on_the_cpu_where_cuda_looks_available(monkeypatch, tmp_path):
    """ZeroGPU reports CUDA available outside its GPU functions: the CPU preset must not follow that, nor evict the
    GPU model loaded at start-up."""
    from bwcache import pipelines

    gpu_model = object()
    monkeypatch.setitem(pipelines._loaded, (WAN, "cuda"), gpu_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(app, "OUTPUT_ROOT", tmp_path)
    spec = app.PRESETS["tiny-shapes"]
    request = ui.check_request(spec, prompt="a red square moving right", num_inference_steps=3, num_frames=8)
    comparison = app._run_comparison("tiny-shapes", request)
    assert comparison.record["device"].startswith("CPU")
    assert pipelines._loaded[(WAN, "cuda")] is gpu_model
