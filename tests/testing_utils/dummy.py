"""A dummy transformer whose every number can be worked out by hand.

Each block doubles its input, so with inputs `a_s · 1` the input of block i at step s is `2^i · a_s` and every
block's relative-L1 change between steps is `|a_s − a_{s−1}| / |a_{s−1}|`. With `a_s = 2 − 2^-s` all values are
dyadic, so the cached outputs are exact in float32.
"""

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.cache_utils import CacheMixin

from bwcache import register_block


class DoublingBlock(torch.nn.Module):
    def forward(self, hidden_states, temb=None):
        return hidden_states * 2


class PairBlock(torch.nn.Module):
    """A dual-stream block: returns (hidden_states, encoder_hidden_states), both doubled."""

    def forward(self, hidden_states, encoder_hidden_states, temb=None):
        return hidden_states * 2, encoder_hidden_states * 2


register_block(DoublingBlock)
register_block(PairBlock, return_hidden_states_index=0, return_encoder_hidden_states_index=1)


class DoublingTransformer(ModelMixin, ConfigMixin, CacheMixin):
    @register_to_config
    def __init__(self, num_layers: int = 4, dual_stream: bool = False):
        super().__init__()
        block = PairBlock if dual_stream else DoublingBlock
        self.blocks = torch.nn.ModuleList([block() for _ in range(num_layers)])

    def forward(self, hidden_states, timestep=None, encoder_hidden_states=None, return_dict=False):
        for block in self.blocks:
            if self.config.dual_stream:
                hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states)
            else:
                hidden_states = block(hidden_states)
        return (hidden_states,) if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


def dyadic(step: int) -> float:
    return 2.0 - 2.0**-step


def step_dummy(model, step, num_steps, dtype=torch.float32):
    """One call of the dummy in the `cond` branch at `step` of `num_steps`, input `dyadic(step) · 1`; no reset after."""
    with model.cache_context("cond", step_index=step, num_inference_steps=num_steps):
        return model(torch.full((1, 4, 8), dyadic(step), dtype=dtype), timestep=torch.tensor([1.0]))[0]


def run_dummy(model, num_steps, values=dyadic, context="cond", with_steps=True, encoder=False):
    """Call the dummy for `num_steps` steps with inputs `values(s) · 1`; returns the outputs."""
    outputs = []
    for step in range(num_steps):
        x = torch.full((1, 4, 8), values(step))
        kwargs = {"encoder_hidden_states": torch.full((1, 2, 8), values(step) / 2)} if encoder else {}
        context_kwargs = {"step_index": step, "num_inference_steps": num_steps} if with_steps else {}
        if context:
            with model.cache_context(context, **context_kwargs):
                outputs.append(model(x, timestep=torch.tensor([1000.0 - step]), **kwargs))
        else:
            outputs.append(model(x, timestep=torch.tensor([1000.0 - step]), **kwargs))
    model._reset_stateful_cache()
    return outputs
