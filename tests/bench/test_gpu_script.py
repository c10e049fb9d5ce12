"""The GPU benchmark script runs end to end on a tiny config, so it is ready for a GPU."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_wan.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_wan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_tiny_run(tmp_path, capsys):
    module = load_script()
    out = tmp_path / "gpu.json"
    assert module.main(["--tiny", "--device", "cpu", "--steps", "6", "--repeats", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    # One JSON object, the same printed and written.
    assert json.loads(capsys.readouterr().out) == results
    assert results["reuse_fraction"] == 0.5  # trigger at step 1, R = 3: steps 2, 3 and 4 of 6 reused
    assert results["latent_shape"] == [1, 16, 2, 4, 4]
    for key in ("uncached_seconds_per_step", "bwcache_seconds_per_step", "indicator_share_of_step", "achieved_over_ideal",
                "achieved_over_ideal_by_accounting", "flops_per_step", "uncached_tflops_per_second", "wall_seconds"):
        assert results[key] is not None
    assert 0 < results["block_share_of_step"] <= 1
    # Threshold 0 reuses nothing; its cost over uncached is reported.
    assert results["threshold_zero"]["reuse_fraction"] == 0.0
    assert isinstance(results["threshold_zero"]["wall_clock_overhead"], float)
    # The Wan2.1-1.3B preset's profiles, as the preset resolves them.
    profiles = results["profiles"]
    assert set(profiles) == {"default", "fast"}
    assert profiles["default"]["config"]["threshold"] == 0.15 and profiles["fast"]["config"]["threshold"] == 0.25
    for row in profiles.values():
        assert row["speedup"] > 0 and 0 <= row["reuse_fraction"] <= 1 and set(row["trigger_steps"]) == {"cond", "uncond"}
    # Peak memory on CPU too: block-wise keeps a residual per block, paper mode one per branch, the lean row less.
    extra = results["extra_peak_memory_over_total"]
    assert extra["blockwise"] > extra["paper"] > extra["paper_lean"] > 0


def test_the_model_is_built_as_from_pretrained_leaves_a_checkpoint():
    module = load_script()
    model = module.build_transformer(module.TINY, "cpu", torch.bfloat16)
    keep = set(model._keep_in_fp32_modules)
    assert keep
    for name, tensor in model.state_dict().items():
        expected = torch.float32 if keep & set(name.split(".")) else torch.bfloat16
        assert tensor.dtype == expected, name
    assert model.scale_shift_table.dtype == torch.float32 and model.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert 0 < module.float32_parameters(model) < sum(p.numel() for p in model.parameters())
