"""The GPU overhead script runs end to end on a tiny config, so it is ready for a GPU."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_wan.py"


def test_gpu_script_tiny_run(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_wan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    assert module.main(["--tiny", "--device", "cpu", "--steps", "6", "--repeats", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["reuse_fraction"] == 0.5  # trigger at step 1, R = 3: steps 2, 3 and 4 of 6 reused
    assert results["latent_shape"] == [1, 16, 2, 4, 4]
    for key in ("uncached_seconds_per_step", "bwcache_seconds_per_step", "indicator_share_of_step", "achieved_over_ideal",
                "achieved_over_ideal_by_accounting"):
        assert results[key] is not None
    assert 0 < results["block_share_of_step"] <= 1
    # Peak memory on CPU too: block-wise keeps a residual per block, paper mode one per branch, the lean row less.
    extra = results["extra_peak_memory_over_total"]
    assert extra["blockwise"] > extra["paper"] > extra["paper_lean"] > 0
