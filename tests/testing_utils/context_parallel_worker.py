"""Runs BWCache cases in one process or, under torchrun, sharded over all processes with context parallelism.

    torchrun --nproc_per_node=2 tests/context_parallel_worker.py CASES.json OUT_DIR

Each case builds its model afresh from a fixed seed, so a case run here in one process and the same case run by
each rank of a parallel launch start from the same weights and inputs. A parallel rank writes
`OUT_DIR/<case>.rank<r>.pt` with its output, its trace and the output of the same model run uncached.

CPU-only note: diffusers' `enable_parallelism` picks the device as `rank % accelerator count` and fails without an
accelerator, so `bwcache.parallel.enable_context_parallel` builds the CPU device mesh itself (gloo) and calls
diffusers' own `apply_context_parallel`, which is what `enable_parallelism` does once it has a device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bwcache import BWCacheConfig, apply_bwcache  # noqa: E402

WAN_STEPS = 12
WAN_LATENTS = (1, 16, 2, 8, 8)  # 2 × 4 × 4 = 32 tokens after (1, 2, 2) patches: even over 2 processes
SHAPES_SETTINGS = dict(prompt="a red square moving right", num_frames=8, height=32, width=32, num_inference_steps=12)


def build(model: str):
    """The case's model (seeded): a tiny random Wan transformer, or the embedded Tiny Shapes pipeline."""
    if model == "wan":
        from testing_utils.tiny_wan import _tiny_transformer

        torch.manual_seed(0)
        return _tiny_transformer(3)
    from bwcache import tiny

    pipe = tiny.load_pipeline(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(model: str, target) -> torch.Tensor:
    """One generation: Wan's CFG denoising loop over the transformer (cond and uncond cache contexts, as
    WanPipeline calls it), or a Tiny Shapes pipeline call."""
    if model != "wan":
        generator = torch.Generator("cpu").manual_seed(0)
        return torch.as_tensor(target(**SHAPES_SETTINGS, generator=generator, output_type="np").frames[0])
    generator = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(WAN_LATENTS, generator=generator)
    text, negative = torch.randn(1, 8, 32, generator=generator), torch.randn(1, 8, 32, generator=generator)
    with torch.no_grad():
        for i in range(WAN_STEPS):
            t = torch.tensor([1000.0 * (1 - i / WAN_STEPS)])
            with target.cache_context("cond", step_index=i, num_inference_steps=WAN_STEPS):
                cond = target(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            with target.cache_context("uncond", step_index=i, num_inference_steps=WAN_STEPS):
                uncond = target(hidden_states=x, timestep=t, encoder_hidden_states=negative, return_dict=False)[0]
            x = x - (1.0 / WAN_STEPS) * (uncond + 5.0 * (cond - uncond))
        target._reset_stateful_cache()
    return x


def config_of(case: dict) -> BWCacheConfig:
    return BWCacheConfig(**case["config"])


def run_case(case: dict, kind: str | None = None) -> dict:
    """The case's cached output and trace, then the same model's output uncached. With `kind`, context
    parallelism of that kind over all processes is enabled before or after BWCache, as `case["order"]` says."""
    from bwcache.parallel import enable_context_parallel

    target = build(case["model"])
    if kind is not None and case["order"] == "parallel-first":
        enable_context_parallel(target, kind)
    handle = apply_bwcache(target, config_of(case))
    if kind is not None and case["order"] == "cache-first":
        enable_context_parallel(target, kind)
    output, all_reduces = counting_all_reduces(lambda: run(case["model"], target))
    trace = handle.trace.to_dict()
    handle.remove()
    return {"output": output, "trace": trace, "uncached": run(case["model"], target), "all_reduces": all_reduces}


def counting_all_reduces(function):
    """`function()` and how many all-reduces BWCache made during it."""
    from bwcache import parallel

    original, count = parallel.all_reduce_sum, [0]

    def counted(values, group):
        count[0] += 1
        return original(values, group)

    parallel.all_reduce_sum = counted
    try:
        return function(), count[0]
    finally:
        parallel.all_reduce_sum = original


def _error(function) -> str | None:
    try:
        function()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def bad_setups() -> dict[str, str | None]:
    """The message each bad setup gets, by name (None where it ran). The last one destroys the process group."""
    import torch.distributed as dist

    from bwcache.parallel import enable_context_parallel

    messages = {
        "heads": _error(lambda: enable_context_parallel(build("shapes"), "ulysses")),
        "ring-backend": _error(lambda: enable_context_parallel(build("wan"), "ring")),
    }
    wan = build("wan")
    enable_context_parallel(wan, "ulysses")
    apply_bwcache(wan, BWCacheConfig(threshold=0.1, num_inference_steps=4))
    odd = torch.randn(1, 16, 1, 6, 6)  # 1 × 3 × 3 = 9 tokens: not even over 2 processes
    messages["sequence"] = _error(
        lambda: wan(hidden_states=odd, timestep=torch.tensor([999.0]), encoder_hidden_states=torch.randn(1, 8, 32))
    )
    dist.barrier()
    dist.destroy_process_group()
    messages["group-gone"] = _error(
        lambda: wan(hidden_states=torch.randn(WAN_LATENTS), timestep=torch.tensor([999.0]),
                    encoder_hidden_states=torch.randn(1, 8, 32), return_dict=False)
    )
    return messages


def main(cases_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from bwcache.parallel import close_distributed, init_distributed

    init_distributed()
    torch.set_num_threads(1)
    rank = dist.get_rank()
    try:
        for case in json.loads(Path(cases_path).read_text()):
            result = run_case(case, case["kind"])
            torch.save(result, Path(out_dir) / f"{case['name']}.rank{rank}.pt")
        (Path(out_dir) / f"errors.rank{rank}.json").write_text(json.dumps(bad_setups()))
    finally:
        close_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
