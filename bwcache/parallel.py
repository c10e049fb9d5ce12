"""BWCache under diffusers' context parallelism: every process takes the same decisions.

With `transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))` (or `ring_degree=N`) each
process runs every block on its own shard of the sequence. A distance measured on one shard is not the distance
of the whole tensor, and processes that disagree on a reuse deadlock in the attention's collectives. So a
relative-L1 distance is taken as a ratio of global sums: each process sums `|h(s) − h(ref)|` and `|h(ref)|` over
its shard, the sums are added across the context-parallel group (one small all-reduce), and every process divides
the same two numbers. Cached residuals and features stay sharded: each process holds 1/N of the cache.

This module holds what the cache needs to know about the parallel setup (the group, the checks a setup must pass)
and `enable_context_parallel`, which enables diffusers' context parallelism on a pipeline's denoisers, also on a
CPU-only machine (gloo), where diffusers' `enable_parallelism` cannot pick a device.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from diffusers.utils.torch_utils import unwrap_module

from .clock import denoisers

KINDS = ("ulysses", "ring", "ulysses-anything", "ring-anything")

# Attention backends that support context parallelism but cannot return the log-sum-exp ring attention merges on.
RING_UNSUPPORTED_BACKENDS = ("native", "_native_npu")


def context_parallel_config(module: torch.nn.Module):
    """The module's diffusers `ContextParallelConfig` once parallelism is enabled on it, else `None`."""
    parallel = getattr(unwrap_module(module), "_parallel_config", None)
    return getattr(parallel, "context_parallel_config", None) if parallel is not None else None


def describe(cp_config) -> str:
    """`ulysses×2`, `ring×4`, `ulysses×2 · ring×2`, with `anything` where uneven shards are allowed."""
    parts = []
    if cp_config.ulysses_degree > 1:
        parts.append(f"ulysses{'-anything' if cp_config.ulysses_anything else ''}×{cp_config.ulysses_degree}")
    if cp_config.ring_degree > 1:
        parts.append(f"ring{'-anything' if cp_config.ring_anything else ''}×{cp_config.ring_degree}")
    return " · ".join(parts)


def process_group(module: torch.nn.Module):
    """The process group a context-parallel transformer's distances are summed over, or `None` without one.

    Raises a `RuntimeError` when parallelism is configured on the model but its process group is gone
    (`torch.distributed` destroyed, or a model moved into a process that never joined the group).
    """
    cp_config = context_parallel_config(module)
    if cp_config is None:
        return None
    name = type(unwrap_module(module)).__name__
    mesh = getattr(cp_config, "_flattened_mesh", None)
    if not dist.is_available() or not dist.is_initialized() or mesh is None:
        raise RuntimeError(
            f"This {name} has context parallelism enabled ({describe(cp_config)}), but its torch.distributed "
            "process group is gone (destroyed, or never initialised in this process). Run it in the processes "
            "that enabled parallelism, before torch.distributed.destroy_process_group()."
        )
    return mesh.get_group()


def all_reduce_sum(values: torch.Tensor, group) -> torch.Tensor:
    """`values` summed over the group's processes (in place; also returned)."""
    dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def check_strided_split(cp_config, counted: tuple[int, str] | None) -> None:
    """An uneven split needs the sequence length to place every-n-th tokens; refuse before any block runs (on every
    process alike) when the model input does not tell it."""
    if (cp_config.ulysses_anything or cp_config.ring_anything) and counted is None:
        raise ValueError(_UNPLACED.format(describe(cp_config)))


_UNPLACED = (
    "indicator_token_stride > 1 with an uneven context-parallel split ({}) needs to know where each process's "
    "tokens start, and this block's sequence does not follow the model input's split. Use indicator_token_stride=1, "
    "or an even split."
)


def shard_start(group, length: int, cp_config, sequence_length: int | None) -> int:
    """Where this process's shard of `length` tokens starts in the whole sequence (no communication).

    Even splits (diffusers' default) start at rank · length. The `anything` modes split `sequence_length` tokens
    as `tensor_split` does (the first `L mod N` shards one token longer); a shard that does not fit that layout
    is refused, since the processes could not agree on where their tokens start.
    """
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if not (cp_config.ulysses_anything or cp_config.ring_anything):
        return rank * length
    if sequence_length is not None:
        base, extra = divmod(sequence_length, size)
        if length == base + (rank < extra):
            return rank * base + min(rank, extra)
    raise ValueError(_UNPLACED.format(describe(cp_config)))


def _attention_backend(module: torch.nn.Module) -> str | None:
    """The attention backend the model's attention processors use (diffusers' dispatcher), by name."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for child in unwrap_module(module).modules():
        processor = getattr(child, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend
        if backend is None:
            backend, _ = _AttentionBackendRegistry.get_active_backend()
        return getattr(backend, "value", str(backend))
    return None


def checked_config(module: torch.nn.Module):
    """The module's `ContextParallelConfig` (`None` without parallelism), after refusing a setup it cannot run."""
    cp_config = context_parallel_config(module)
    if cp_config is not None:
        check_model(module, cp_config)
    return cp_config


def check_model(module: torch.nn.Module, cp_config) -> None:
    """Refuse a context-parallel setup the model cannot run: heads Ulysses cannot split, a backend without it."""
    model = unwrap_module(module)
    name = type(model).__name__
    if getattr(model, "_cp_plan", None) is None:
        import diffusers

        raise ValueError(f"{name} has no context-parallel plan in diffusers {diffusers.__version__}.")
    heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
    degree = cp_config.ulysses_degree
    if degree > 1 and not cp_config.ulysses_anything and isinstance(heads, int) and heads % degree:
        raise ValueError(
            f"Ulysses attention over {degree} processes splits the attention heads evenly, but {name} has {heads} "
            f"heads. Use a number of processes that divides {heads}, or Ulysses-anything "
            "(ContextParallelConfig(ulysses_anything=True); --context-parallel ulysses-anything), which allows "
            "uneven splits."
        )
    backend = _attention_backend(model)
    if backend is None:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    if not _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(backend)):
        supported = ", ".join(sorted(b.value for b in _AttentionBackendRegistry._supports_context_parallel))
        raise ValueError(
            f"{name}'s attention backend {backend!r} does not support context parallelism; set one that does "
            f"({supported}) with transformer.set_attention_backend(...)."
        )
    if cp_config.ring_degree > 1 and backend in RING_UNSUPPORTED_BACKENDS:
        raise ValueError(
            f"Ring attention needs an attention backend that returns the log-sum-exp; {name}'s backend {backend!r} "
            "does not. Use Ulysses (ContextParallelConfig(ulysses_degree=N)), or set a flash, cuDNN or Sage backend "
            "with transformer.set_attention_backend(...)."
        )


def token_count(module: torch.nn.Module, hidden_states) -> tuple[int, str] | None:
    """The model input's sequence length and how it comes about, where the input's layout tells it: a video
    latent (B, C, F, H, W) cut in the model's `patch_size`, or tokens (B, S, C)."""
    if not isinstance(hidden_states, torch.Tensor):
        return None
    patch = getattr(getattr(unwrap_module(module), "config", None), "patch_size", None)
    if hidden_states.ndim == 5 and isinstance(patch, (tuple, list)) and len(patch) == 3:
        grid = [size // p for size, p in zip(hidden_states.shape[2:], patch)]
        return math.prod(grid), f"{grid[0]} latent frames × {grid[1]} × {grid[2]} patches"
    if hidden_states.ndim == 3:
        return hidden_states.shape[1], "tokens"
    return None


def check_sequence(cp_config, counted: tuple[int, str] | None) -> None:
    """Refuse a video whose token count the processes cannot split evenly (unless an `anything` mode allows it)."""
    if cp_config.ulysses_anything or cp_config.ring_anything or counted is None:
        return
    tokens, shape = counted
    processes = cp_config.ring_degree * cp_config.ulysses_degree
    if tokens % processes:
        raise ValueError(
            f"Context parallelism over {processes} processes splits the sequence evenly, but this input has "
            f"{tokens} tokens ({shape}), not a multiple of {processes}. Choose frames, height and width whose token "
            "count is a multiple of the number of processes, or an `anything` mode that allows uneven splits."
        )


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"context parallelism must be one of {', '.join(KINDS)}, got {kind!r}.")


def parallel_config_for(kind: str, degree: int, mesh=None):
    """diffusers' `ContextParallelConfig` for a kind of `KINDS` over `degree` processes."""
    from diffusers import ContextParallelConfig

    check_kind(kind)
    if degree < 2:
        raise ValueError(
            f"Context parallelism needs at least 2 processes, got {degree}. Launch with torchrun --nproc_per_node=N."
        )
    ring = kind.startswith("ring")
    return ContextParallelConfig(
        ulysses_degree=1 if ring else degree,
        ring_degree=degree if ring else 1,
        ulysses_anything=kind == "ulysses-anything",
        ring_anything=kind == "ring-anything",
        mesh=mesh,
    )


def enable_context_parallel(transformer_or_pipeline, kind: str = "ulysses") -> None:
    """Shard a pipeline's denoisers (or one transformer) over all processes with diffusers' context parallelism.

    Call it in every process, after `torch.distributed.init_process_group` (`init_distributed()`), before or after
    `apply_bwcache`. On an accelerator this is `transformer.enable_parallelism(config=...)`; on a CPU-only machine
    (gloo) it builds the CPU device mesh itself and calls diffusers' own `apply_context_parallel`, as
    `enable_parallelism` does after picking a device, which it cannot do without an accelerator.
    """
    from diffusers.models._modeling_parallel import ParallelConfig
    from diffusers.hooks.context_parallel import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "Context parallelism needs torch.distributed: launch with torchrun --nproc_per_node=N and call "
            "bwcache.parallel.init_distributed() (or torch.distributed.init_process_group) first."
        )
    transformers = denoisers(transformer_or_pipeline)
    degree = dist.get_world_size()
    probe = parallel_config_for(kind, degree)
    for transformer in transformers:
        existing = context_parallel_config(transformer)
        if existing is not None:
            raise ValueError(
                f"{type(unwrap_module(transformer)).__name__} already runs context parallelism ({describe(existing)}); "
                "it can be enabled once per model."
            )
        check_model(transformer, probe)

    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    device_type = accelerator.type if accelerator is not None else "cpu"
    mesh = init_device_mesh(device_type, probe.mesh_shape, mesh_dim_names=probe.mesh_dim_names)
    for transformer in transformers:
        model = unwrap_module(transformer)
        cp_config = parallel_config_for(kind, degree, mesh)
        if accelerator is not None:
            model.enable_parallelism(config=cp_config)
            continue
        config = ParallelConfig(context_parallel_config=cp_config)
        config.setup(dist.get_rank(), degree, torch.device("cpu"), mesh=mesh)
        model._parallel_config = config
        for child in model.modules():
            processor = getattr(child, "processor", None)
            if processor is not None and hasattr(processor, "_parallel_config"):
                processor._parallel_config = config
        apply_context_parallel(model, cp_config, model._cp_plan)


def ensure_context_parallel(pipe, kind: str) -> None:
    """Context parallelism of `kind` over all processes on the pipeline's denoisers, enabled once."""
    configs = [context_parallel_config(module) for module in denoisers(pipe)]
    if all(config is None for config in configs):
        enable_context_parallel(pipe, kind)
        return
    wanted = describe(parallel_config_for(kind, dist.get_world_size()))
    found = {describe(config) if config is not None else "none" for config in configs}
    if found != {wanted}:
        raise ValueError(
            f"The pipeline's denoisers already run context parallelism ({', '.join(sorted(found))}), not {wanted} "
            "on every denoiser; load the pipeline afresh to change it."
        )


def run_description(pipe) -> dict | None:
    """The pipeline's context parallelism for a run record: kind and number of processes, or None."""
    modules = denoisers(pipe)
    config = context_parallel_config(modules[0]) if modules else None
    if config is None:
        return None
    return {"kind": describe(config), "processes": config.ulysses_degree * config.ring_degree}


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_distributed() -> str:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on a CPU); returns this process's device."""
    if not launched_by_torchrun():
        raise ValueError(
            "Context parallelism runs one process per GPU: launch with "
            "torchrun --nproc_per_node=N -m bwcache compare ... --context-parallel ulysses"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.accelerator.is_available():
        torch.accelerator.set_device_index(local_rank)
        device = f"{torch.accelerator.current_accelerator().type}:{local_rank}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(dist.get_default_backend_for_device(torch.device(device).type))
    return device


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def close_distributed() -> None:
    """Leave the process group once every process has reached this point: a process that tears its group down
    while another still talks to it can abort at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
