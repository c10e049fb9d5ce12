"""Peak tensor memory of a piece of work, on any device.

On CUDA the allocator's own peak counter is used. Elsewhere a dispatch mode counts the storages that operations
create while it is active, and frees them from the count when they are garbage-collected, so the peak covers
activations and cached features (the weights, made before, are not counted).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


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
    """Run `work()` and return the peak bytes of tensors allocated during it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        work()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
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
