"""How far a block's feature has moved: relative-L1 distances, kept as undivided sums, and their context-parallel sums.

Block i's feature is its hidden-states input h, or with `indicator_feature="modulated"` the input of its attention
(AdaLN-modulated; taken by a forward pre-hook on the attention module as the block runs, paper mode only), on every
`indicator_token_stride`-th token; its distance is the relative L1 `mean|h(s) − h(ref)| / mean|h(ref)|` to a
reference feature: the previous step's in paper mode (paper Eq. 5–7), the one its residual was computed on in
block-wise mode. All of a step's distances reach the host in one sync at the end of the call, except where
block-wise mode must decide on one before running its block.

Several processes. Under diffusers' context parallelism each process sees its shard of the sequence: a distance is
kept as this process's two sums (`|h − ref|` and `|ref|`) until it is needed, the sums are added over the
context-parallel group (`bwcache.parallel`), and every process divides the same numbers, so all take the decisions a
single process would take. The step's recorded distances share one all-reduce at the end of the call; a block-wise
decision, which must come before its block runs, needs its own. Token strides start where the single-process
stride would fall in each shard.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import parallel


def l1_norm(tensor: torch.Tensor) -> torch.Tensor:
    """`sum|tensor|` in float32 (a scalar tensor)."""
    return tensor.abs().sum(dtype=torch.float32)


def _difference_sum(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    return (current - previous).abs_().sum(dtype=torch.float32)


def _ratio(difference: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return difference / norm.clamp_min(1e-12)


class DistanceSums(NamedTuple):
    """A distance not yet divided: this process's sums of |h − ref| and |ref| (added over a context-parallel
    group first), and what the policy adds to the ratio."""

    difference: torch.Tensor
    norm: torch.Tensor
    offset: float = 0.0


def strided(hidden_states: torch.Tensor, stride: int, offset: int = 0) -> torch.Tensor:
    """The tokens the distance is measured on (a view): every `stride`-th, from `offset`."""
    if stride == 1:
        return hidden_states
    return hidden_states[:, offset::stride] if hidden_states.ndim >= 3 else hidden_states[offset::stride]


class DistanceMeter:
    """One transformer's distance arithmetic: the tokens measured, and the sums' reductions over the
    context-parallel group of the call in progress (`group`; `None`: one process)."""

    def __init__(self, stride: int):
        self.stride = stride
        self.module: torch.nn.Module | None = None
        self._hidden_states_index: int | None = None
        self.group = None
        # The length of the whole sequence the processes split (when the model input tells it).
        self._sequence_length: int | None = None

    def bind(self, module: torch.nn.Module, parameters: list[str]) -> None:
        """The transformer measured, and the names of its forward's arguments."""
        self.module = module
        self._hidden_states_index = parameters.index("hidden_states") if "hidden_states" in parameters else None

    def start_call(self, args, kwargs, measures: bool) -> None:
        """Find the call's context-parallel group, after checking its input can be split over it (and, when the
        policy `measures` distances on strided tokens, that the strides can be placed)."""
        group = parallel.process_group(self.module)
        self._sequence_length = None
        if group is not None:
            hidden_states, index = kwargs.get("hidden_states"), self._hidden_states_index
            if hidden_states is None and index is not None and index < len(args):
                hidden_states = args[index]
            counted = parallel.token_count(self.module, hidden_states)
            cp_config = parallel.context_parallel_config(self.module)
            parallel.check_sequence(cp_config, counted)
            if self.stride > 1 and measures:
                parallel.check_strided_split(cp_config, counted)
            self._sequence_length = counted[0] if counted is not None else None
        self.group = group

    def features(self, tensor: torch.Tensor) -> torch.Tensor:
        """The feature measured on `tensor` (this process's share of the strided tokens; a view)."""
        return strided(tensor, self.stride, self._token_offset(tensor))

    def _token_offset(self, hidden_states: torch.Tensor) -> int:
        """Where this process's every-`stride`-th token starts, so that a sharded sequence samples the tokens one
        process would (global indices 0, stride, 2·stride, …)."""
        stride = self.stride
        if self.group is None or stride == 1 or hidden_states.ndim < 2:
            return 0
        dim = 1 if hidden_states.ndim >= 3 else 0
        length = hidden_states.shape[dim]
        start = parallel.shard_start(self.group, length, parallel.context_parallel_config(self.module),
                                     self._sequence_length)
        return -start % stride

    @staticmethod
    def measure(features: torch.Tensor, reference: torch.Tensor, reference_norm: torch.Tensor | None,
                offset: float = 0.0) -> DistanceSums:
        """The distance of `features` to `reference`, undivided (`reference_norm`: its L1 norm, once computed)."""
        if reference_norm is None:
            reference_norm = l1_norm(reference)
        return DistanceSums(_difference_sum(features, reference), reference_norm, offset)

    def divide_now(self, sums: DistanceSums) -> torch.Tensor:
        """A distance a block's decision waits for (summed over the context-parallel group first)."""
        difference, norm = sums.difference, sums.norm
        if self.group is not None:
            difference, norm = parallel.all_reduce_sum(torch.stack([difference, norm]), self.group)
        distance = _ratio(difference, norm)
        return distance + sums.offset if sums.offset else distance

    def host_values(self, distances: dict, measured: dict) -> tuple[dict[int, float], dict[int, float]]:
        """Both dicts of distances as floats: the undivided ones (`DistanceSums`) summed over the group in one
        all-reduce and divided, all of them brought to the host in one sync."""
        pending = {i: v for i, v in distances.items() if isinstance(v, DistanceSums)}
        values = {i: v for i, v in distances.items() if not isinstance(v, DistanceSums)}
        if pending:
            sums = torch.stack([p.difference for p in pending.values()] + [p.norm for p in pending.values()])
            if self.group is not None:
                parallel.all_reduce_sum(sums, self.group)
            ratios = _ratio(sums[: len(pending)], sums[len(pending) :])
            offsets = [p.offset for p in pending.values()]
            if any(offsets):
                ratios = ratios + torch.tensor(offsets, dtype=ratios.dtype, device=ratios.device)
            values.update(zip(pending, ratios.tolist()))
        return {i: values[i] for i in distances}, {i: float(v) for i, v in measured.items()}
