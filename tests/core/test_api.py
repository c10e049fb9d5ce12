"""The public surface: config validation, apply/remove rules and clear errors."""

import json

import pytest
import torch
from diffusers import FirstBlockCacheConfig, UNet2DModel
from diffusers.hooks import apply_first_block_cache

import bwcache
from bwcache import BWCacheConfig, apply_bwcache, get_bwcache_handle, remove_bwcache
from testing_utils.dummy import DoublingTransformer, run_dummy
from testing_utils.families import FAMILIES


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"threshold": -0.1}, "threshold must be a finite number ≥ 0"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "0.1"}, "threshold must be a number"),
        ({"reuse_interval": 0}, "reuse_interval must be an integer ≥ 1"),
        ({"reuse_interval": 2.5}, "reuse_interval"),
        ({"tail_fraction": 1.5}, "tail_fraction must be between 0 and 1"),
        ({"mode": "fast"}, "mode must be one of ('paper', 'blockwise', 'static')"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer ≥ 1"),
        ({"indicator_blocks": "half"}, "indicator_blocks must be None, one of ('all', 'every_other')"),
        ({"indicator_blocks": []}, "indicator_blocks must be a non-empty sequence"),
        ({"indicator_blocks": [0, 1.5]}, "indicator_blocks"),
        ({"indicator_token_stride": 0}, "indicator_token_stride must be an integer ≥ 1"),
        ({"record_trace": 1}, "record_trace must be True or False"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer ≥ 0"),
        ({"tail_steps": True}, "tail_steps must be an integer ≥ 0"),
        ({"accumulate_distance": "yes"}, "accumulate_distance must be True or False"),
        ({"cache_dtype": "float32"}, "cache_dtype must be None or one of ('bfloat16', 'float16', 'int8')"),
        ({"cache_dtype": torch.float64}, "cache_dtype must be None or one of ('bfloat16', 'float16', 'int8'), got 'float64'"),
        ({"cache_dtype": torch.int8}, "cache_dtype must be None or one of ('bfloat16', 'float16', 'int8'), got torch.int8"),
    ],
)
def test_invalid_configs_name_the_field_and_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError) as error:
        BWCacheConfig(**kwargs)
    assert message in str(error.value)


def test_config_defaults_and_round_trip():
    config = BWCacheConfig()
    assert (config.threshold, config.reuse_interval, config.tail_fraction, config.mode) == (0.15, None, 0.5, "paper")
    assert [config.resolved_reuse_interval(t) for t in (5, 10, 30, 50)] == [1, 1, 3, 5]
    assert config.resolve_indicator_blocks(5) == [0, 1, 2, 3, 4]
    assert BWCacheConfig(indicator_blocks="every_other").resolve_indicator_blocks(5) == [0, 2, 4]
    assert BWCacheConfig(indicator_blocks=[-1, 0]).resolve_indicator_blocks(5) == [0, 4]
    custom = BWCacheConfig(threshold=0.2, indicator_blocks=[0, 2], mode="blockwise", cache_dtype=torch.bfloat16)
    assert custom.cache_dtype == "bfloat16" and custom.resolved_cache_dtype() is torch.bfloat16
    assert BWCacheConfig.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom
    with pytest.raises(ValueError, match="Unknown BWCacheConfig field"):
        BWCacheConfig.from_dict({"treshold": 0.1})


def test_indicator_blocks_out_of_range_is_reported_at_apply():
    with pytest.raises(ValueError, match=r"block 7, outside the allowed range \[-4, 3\]"):
        apply_bwcache(DoublingTransformer(num_layers=4), BWCacheConfig(indicator_blocks=[0, 7]))


def test_applying_twice_is_an_error_and_remove_restores():
    model = DoublingTransformer(num_layers=2)
    handle = apply_bwcache(model)
    assert get_bwcache_handle(model).trace is handle.trace
    with pytest.raises(ValueError, match="already applied"):
        apply_bwcache(model)
    handle.remove()
    assert get_bwcache_handle(model) is None
    with pytest.raises(ValueError, match="not applied"):
        remove_bwcache(model)
    apply_bwcache(model)  # fine again


def test_refuses_a_transformer_with_a_diffusers_cache():
    model = FAMILIES["wan"].build()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="FirstBlockCacheConfig"):
        apply_bwcache(model)
    other = FAMILIES["wan"].build()
    apply_first_block_cache(other, FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(ValueError, match="fbc_leader_block_hook"):
        apply_bwcache(other)


def test_unsupported_transformers_are_named():
    unet = UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(ValueError, match="BWCache does not support UNet2DModel"):
        apply_bwcache(unet)

    class Mystery(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Mystery()])

    with pytest.raises(ValueError, match="Holder: its block class Mystery .* bwcache.register_block"):
        apply_bwcache(Holder())
    with pytest.raises(TypeError, match="transformer"):
        apply_bwcache("not a model")


def test_accepts_a_pipeline_and_the_trace_is_json():
    class Pipe:
        transformer = DoublingTransformer(num_layers=2)

    handle = apply_bwcache(Pipe(), BWCacheConfig(threshold=0.2))
    assert "no denoising step recorded yet" in handle.summary()
    run_dummy(Pipe.transformer, 6)
    data = json.loads(json.dumps(handle.trace.to_dict()))
    assert data["num_blocks"] == 2 and data["block_names"] == ["blocks.0", "blocks.1"]
    assert data["config"]["threshold"] == 0.2
    assert set(data["branches"]["cond"]) == {"indicator", "distance", "reused", "trigger_step", "timesteps"}
    assert bwcache.summarize(data) == handle.summary()
