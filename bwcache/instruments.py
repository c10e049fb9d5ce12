"""What a run costs: wall-clock time in modules' forward, the FLOPs the DiT blocks execute, and peak tensor memory.

Every instrument acts on the device it is given (`cuda:1` synchronises and counts on GPU 1, whatever the current
device is), so a run on another GPU than the default is timed and measured on its own device.

Memory: on CUDA the allocator's own peak counter is used. Elsewhere a dispatch mode counts the storages that
operations create while it is active, and frees them from the count when they are garbage-collected, so the peak
covers activations and cached features (the weights, made before, are not counted).
"""

from __future__ import annotations

import time
import weakref

import torch
import torch.nn.functional as F
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .blocks import find_blocks
from .clock import denoisers


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on `device` (a no-op off CUDA), so a clock read next sees it finished."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)


# Time


class ForwardTimer:
    """Wall-clock time spent in some modules' forward (synchronised on GPU), summed over the modules.

    Each module gets a diffusers hook on its forward. Hooks registered later (BWCache's) wrap it, so their work is
    not counted; hooks registered earlier are. Remove hooks in the reverse order: diffusers unwinds a module's
    hooks from the outermost. With `around_call`, the timer sits around the whole module call instead (torch's
    own module hooks, before and after every other), so it also counts work done in other module hooks.
    """

    def __init__(self, modules, device: str, around_call: bool = False):
        self.seconds = 0.0
        self.calls = 0
        self.device = device
        self._name = f"bwcache_timer_{id(self)}"
        self._modules = []
        self._handles = []
        # Start times of the calls in progress: timed modules nest (a transformer and its blocks).
        self._started: list[float] = []
        try:
            for module in modules:
                if around_call:
                    self._handles += [
                        module.register_forward_pre_hook(self._start, prepend=True),
                        module.register_forward_hook(self._stop, always_call=True),
                    ]
                else:
                    HookRegistry.check_if_exists_or_initialize(module).register_hook(_TimedForward(self), self._name)
                    self._modules.append(module)
        except Exception:
            self.remove()
            raise

    def _start(self, module=None, args=None) -> None:
        synchronize(self.device)
        self._started.append(time.perf_counter())

    def _stop(self, module=None, args=None, output=None) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._started.pop()
        self.calls += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._modules:
            module._diffusers_hook.remove_hook(self._name, recurse=False)
        self._modules = []
        self._handles = []


class _TimedForward(ModelHook):
    def __init__(self, timer: ForwardTimer):
        super().__init__()
        self.timer = timer

    def new_forward(self, module, *args, **kwargs):
        self.timer._start()
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.timer._stop()


def block_timer(transformer_or_pipeline, device: str) -> ForwardTimer:
    """A timer of the DiT blocks' own forward (of every denoiser, given a pipeline: both of Wan2.2's experts)."""
    return ForwardTimer([spec.module for t in denoisers(transformer_or_pipeline) for spec in find_blocks(t)], device)


# Compute


class ComputeProbe:
    """Counts the FLOPs the DiT blocks actually execute: their linear layers (2 per multiply-add, from each call's
    input) and their attention (QKᵀ and the weighted sum of V, 4·|Q|·L_k, from the shapes of each call to torch's
    `scaled_dot_product_attention`, which no FLOP counter sees on a CPU). Use as a context manager: while it is
    active, that function is wrapped (and called unchanged, so the outputs are those of an unprobed run)."""

    def __init__(self, transformer):
        blocks = [spec.module for spec in find_blocks(transformer)]
        prefixes = tuple(spec.name + "." for spec in find_blocks(transformer))
        self.linear_flops = 0
        self.attention_flops = 0
        self._depth = 0
        self._original = None
        self._handles = [
            module.register_forward_hook(self._count)
            for name, module in transformer.named_modules()
            if name.startswith(prefixes) and isinstance(module, torch.nn.Linear)
        ]
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._enter))
            self._handles.append(block.register_forward_hook(self._leave, always_call=True))

    @property
    def flops(self) -> int:
        return self.linear_flops + self.attention_flops

    def _enter(self, module, args):
        self._depth += 1

    def _leave(self, module, args, output):
        self._depth -= 1

    def _count(self, module, args, output):
        self.linear_flops += 2 * args[0].numel() * module.out_features

    def __enter__(self):
        original = self._original = F.scaled_dot_product_attention

        def counted(*args, **kwargs):
            if self._depth > 0:
                query = kwargs.get("query", args[0] if args else None)
                key = kwargs.get("key", args[1] if len(args) > 1 else None)
                self.attention_flops += 4 * query.numel() * key.shape[-2]
            return original(*args, **kwargs)

        F.scaled_dot_product_attention = counted
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._original
        return False

    def remove(self):
        for handle in self._handles:
            handle.remove()


def probe_flops(pipe, work) -> int:
    """The DiT blocks' FLOPs (linear layers and attention) executed during `work()`."""
    probe = ComputeProbe(pipe.transformer)
    try:
        with probe:
            work()
    finally:
        probe.remove()
    return probe.flops


# Memory


class _StorageCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for value in tree_flatten(output)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return output

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._tracked:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        if key in self._tracked:
            self._tracked.discard(key)
            self.live -= size


def peak_tensor_bytes(work, device: str | torch.device = "cpu") -> int:
    """Run `work()` and return the peak bytes of tensors allocated during it (on `device`)."""
    if _is_cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    counter = _StorageCounter()
    with counter:
        work()
    return counter.peak


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def pipeline_weight_bytes(pipe) -> int:
    """Bytes of the weights a generation holds: the transformer's, the text encoder's and the VAE's."""
    parts = (pipe.transformer, getattr(pipe, "text_encoder", None), getattr(pipe, "vae", None))
    return sum(parameter_bytes(m) for m in parts if isinstance(m, torch.nn.Module))
