"""BWCache under torch.compile (inductor, CPU): regional and whole-model, the same decisions as eager, no recompiles."""

import pytest
import torch
import torch._dynamo
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

import bwcache
from bwcache import BWCacheConfig
from bwcache.hooks import BWCacheBlockHook, BWCacheHook
from testing_utils.tiny_wan import build_wan_pipeline

CONFIGS = {
    "paper": BWCacheConfig(threshold=10.0, reuse_interval=1),
    "blockwise": BWCacheConfig(threshold=0.5, mode="blockwise", reuse_interval=2, warmup_steps=1),
}


def generate(pipe, steps=6, prompt_seed=1):
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(prompt_seed))
    negative = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2))
    return pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, height=16, width=16, num_frames=5,
        num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames


def decisions(trace):
    return {name: branch["reused"] for name, branch in trace["branches"].items()}


def compiled_code(function) -> int:
    return len(_debug_get_cache_entry_list(getattr(function, "_torchdynamo_orig_callable", function).__code__))


@pytest.mark.parametrize(("how", "mode"), [("regional", "blockwise"), ("whole", "paper")])
def test_compiled_runs_take_the_eager_decisions_without_recompiling(how, mode):
    config = CONFIGS[mode]
    pipe = build_wan_pipeline()
    with bwcache.cached(pipe, config) as handle:
        eager = generate(pipe)
        eager_trace = handle.trace.to_dict()
        eager_other = generate(pipe, steps=8, prompt_seed=3)
        eager_other_trace = handle.trace.to_dict()
    assert handle.trace.reuse_fraction > 0

    torch._dynamo.reset()
    counters.clear()
    if how == "regional":
        pipe.transformer.compile_repeated_blocks()
    else:
        pipe.transformer.compile()
    with bwcache.cached(pipe, config) as handle:
        compiled = generate(pipe)
        trace = handle.trace.to_dict()
        # Another prompt and another step count: nothing is compiled again.
        with torch._dynamo.config.patch(error_on_recompile=True):
            other = generate(pipe, steps=8, prompt_seed=3)
        other_trace = handle.trace.to_dict()
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()

    assert decisions(trace) == decisions(eager_trace)
    assert decisions(other_trace) == decisions(eager_other_trace)
    assert abs(compiled - eager).max() < 1e-5 and abs(other - eager_other).max() < 1e-5
    assert not (compiled == generate(pipe)).all()  # the cache was on
    # The blocks' own forward is compiled, once for all blocks; the cache's code never is.
    assert counters["stats"]["unique_graphs"] >= 1
    assert breaks <= (1 if how == "regional" else 3)
    for code in (BWCacheBlockHook.new_forward, BWCacheHook.before_block, BWCacheHook.call_start):
        assert compiled_code(code) == 0


def test_the_block_forward_is_compiled_once_for_all_blocks():
    pipe = build_wan_pipeline()
    torch._dynamo.reset()
    pipe.transformer.compile_repeated_blocks()
    with bwcache.cached(pipe, CONFIGS["paper"]):
        generate(pipe, steps=4)
        assert compiled_code(WanTransformerBlock.forward) == 1
    torch._dynamo.reset()


def test_the_compiled_benchmark_writes_its_figures_and_never_overwrites(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "compiled.py"
    spec = importlib.util.spec_from_file_location("compiled_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "compiled.json"
    assert module.main(["--modes", "eager", "--repeats", "1", "--json", str(out)]) == 0
    record = __import__("json").loads(out.read_text())
    (row,) = record["rows"]
    assert row["mode"] == "eager" and row["speedup"] > 0 and 0 < row["reuse_fraction"] < 1
    assert "| eager |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main(["--modes", "eager", "--json", str(out)])
    assert "exists" in capsys.readouterr().err
