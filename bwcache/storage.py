"""How the cache stores what it keeps: in a narrower dtype than the model's, and residuals in 8 bits with one scale
per token (`Int8Tensor`), read back in the dtype they are added in."""

from __future__ import annotations

import torch

class Int8Tensor:
    """A tensor stored as int8 with a bfloat16 scale per token (per vector along the last dimension): about a
    quarter of float32's bytes, each value within 1/254 of its token's largest magnitude. (Uniform steps fit a
    residual's values better than float8's: e4m3 keeps 3 mantissa bits, an error of up to 1/16 of every value.)"""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        amax = tensor.detach().abs().amax(dim=-1, keepdim=True).float()
        scale = (amax / 127).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
        self.data = (tensor.float() / scale.float()).round_().clamp_(-127, 127).to(torch.int8)
        self.scale = scale

    def value(self) -> torch.Tensor:
        """The tensor in its own dtype."""
        return (self.data.float() * self.scale.float()).to(self.dtype)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data, self.scale


def compact(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`tensor` in the storage dtype, where that is narrower than its own (else the tensor itself)."""
    if dtype is None or not tensor.is_floating_point() or dtype.itemsize >= tensor.element_size():
        return tensor
    return tensor.to(dtype)


def stored_feature(features: torch.Tensor, stride: int, dtype: torch.dtype | None) -> torch.Tensor:
    """An indicator feature as kept: in the storage dtype, a strided view copied so that the stored feature does not
    keep the whole activation alive."""
    kept = compact(features, dtype)
    return kept.clone() if kept is features and stride > 1 else kept


def stored_residual(residual: torch.Tensor | None, dtype: torch.dtype | None, int8: bool):
    """A residual as kept: int8 with per-token scales, or in the storage dtype."""
    if residual is None:
        return None
    if int8 and residual.is_floating_point():
        return Int8Tensor(residual)
    return compact(residual, dtype)


def value(kept) -> torch.Tensor | None:
    """What a stored residual holds, as a tensor (an int8 one back in its own dtype)."""
    return kept.value() if isinstance(kept, Int8Tensor) else kept


def tensors(kept) -> tuple[torch.Tensor, ...]:
    """The tensors whose memory a stored value holds."""
    if kept is None:
        return ()
    return kept.tensors() if isinstance(kept, Int8Tensor) else (kept,)
