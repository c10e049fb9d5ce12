"""Smoke tests of the tiny transformer families used by the cache-hook tests."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.cache_utils import CacheMixin

try:
    from testing_utils.families import FAMILIES, expected_output_shape, run_steps
except ImportError:  # collected with `tests` importable as a package
    from tests.families import FAMILIES, expected_output_shape, run_steps

# Mochi's rope asks for a float32 CPU autocast, which torch declines with a warning.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

EXPECTED_FAMILIES = {
    "wan",
    "skyreels_v2",
    "cogvideox",
    "hunyuan_video",
    "ltx_video",
    "mochi",
    "allegro",
    "latte",
}

EXPECTED_CLASSES = {
    "wan": "WanTransformer3DModel",
    "skyreels_v2": "SkyReelsV2Transformer3DModel",
    "cogvideox": "CogVideoXTransformer3DModel",
    "hunyuan_video": "HunyuanVideoTransformer3DModel",
    "ltx_video": "LTXVideoTransformer3DModel",
    "mochi": "MochiTransformer3DModel",
    "allegro": "AllegroTransformer3DModel",
    "latte": "LatteTransformer3DModel",
}

NAMES = sorted(FAMILIES)


def _forward(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)
    assert isinstance(out, tuple)
    return out[0]


@pytest.fixture(scope="module")
def built():
    """One build per family, shared by the read-only tests of this module."""
    return {name: FAMILIES[name].build() for name in NAMES}


def test_all_families_present():
    assert set(FAMILIES) == EXPECTED_FAMILIES
    for name, family in FAMILIES.items():
        assert family.name == name


@pytest.mark.parametrize("name", NAMES)
def test_build_is_tiny_float32_eval(built, name):
    model = built[name]
    assert type(model).__name__ == EXPECTED_CLASSES[name]
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 500_000


@pytest.mark.parametrize("name", NAMES)
def test_block_lists(built, name):
    family = FAMILIES[name]
    model = built[name]
    assert len(family.block_lists) >= 1
    for attr in family.block_lists:
        blocks = getattr(model, attr)
        assert isinstance(blocks, torch.nn.ModuleList)
        assert 2 <= len(blocks) <= 4
    if name == "hunyuan_video":
        assert family.block_lists == ("transformer_blocks", "single_transformer_blocks")
    if name == "latte":
        assert family.block_lists == ("transformer_blocks", "temporal_transformer_blocks")
        assert len(model.transformer_blocks) == len(model.temporal_transformer_blocks)


@pytest.mark.parametrize("name", NAMES)
def test_every_block_runs_once_per_forward(built, name):
    family = FAMILIES[name]
    model = built[name]
    calls = []
    handles = [
        block.register_forward_pre_hook(lambda module, args, attr=attr, i=i: calls.append((attr, i)))
        for attr in family.block_lists
        for i, block in enumerate(getattr(model, attr))
    ]
    try:
        _forward(model, family.inputs(0))
    finally:
        for handle in handles:
            handle.remove()
    expected = [(attr, i) for attr in family.block_lists for i in range(len(getattr(model, attr)))]
    if name == "latte":  # spatial and temporal blocks alternate
        expected = [(attr, i) for i in range(len(model.transformer_blocks)) for attr in family.block_lists]
    assert calls == expected


@pytest.mark.parametrize("name", NAMES)
def test_output_is_finite_with_expected_shape(built, name):
    family = FAMILIES[name]
    inputs = family.inputs(0)
    out = _forward(built[name], inputs)
    assert tuple(out.shape) == expected_output_shape(family, inputs)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic(name):
    family = FAMILIES[name]
    a, b = family.build(), family.build()
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    inputs = family.inputs(3)
    assert torch.equal(_forward(a, inputs), _forward(b, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_build_leaves_global_rng_alone(name):
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    FAMILIES[name].build()
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_deterministic_per_seed(name):
    family = FAMILIES[name]
    a, b, c = family.inputs(0), family.inputs(0), family.inputs(1)
    assert a.keys() == b.keys() == c.keys()
    assert torch.equal(a["hidden_states"], b["hidden_states"])
    assert not torch.equal(a["hidden_states"], c["hidden_states"])


@pytest.mark.parametrize("name", NAMES)
def test_step_inputs(name):
    family = FAMILIES[name]
    base = family.inputs(0)
    base_hidden = base["hidden_states"].clone()
    steps = [family.step_inputs(base, s) for s in range(4)]

    assert torch.equal(steps[0]["hidden_states"], base_hidden)
    for s, kwargs in enumerate(steps):
        assert kwargs.keys() == base.keys()
        assert kwargs["hidden_states"] is not base["hidden_states"]
        assert kwargs["hidden_states"].shape == base_hidden.shape
        assert kwargs["timestep"].shape == base["timestep"].shape
        assert kwargs["timestep"].dtype == base["timestep"].dtype
        assert torch.equal(family.step_inputs(base, s)["hidden_states"], kwargs["hidden_states"])
    timesteps = [float(kwargs["timestep"].flatten()[0]) for kwargs in steps]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == len(timesteps)
    for prev, cur in zip(steps, steps[1:]):
        diff = (cur["hidden_states"] - prev["hidden_states"]).abs().max()
        assert 0 < diff < base_hidden.abs().max()
    assert torch.equal(base["hidden_states"], base_hidden)


@pytest.mark.parametrize("name", NAMES)
def test_has_cache_context(built, name):
    model = built[name]
    assert isinstance(model, CacheMixin)
    assert callable(getattr(model, "cache_context", None))


@pytest.mark.parametrize("name", NAMES)
def test_run_steps(built, name):
    family = FAMILIES[name]
    model = built[name]
    num_steps = 3
    outputs = run_steps(model, family, num_steps)
    assert len(outputs) == num_steps
    shape = expected_output_shape(family, family.inputs(0))
    for out in outputs:
        assert tuple(out.shape) == shape
        assert torch.isfinite(out).all()
    # Later steps see other inputs, so they give other outputs.
    assert not torch.equal(outputs[0], outputs[1])
    # Without hooks the cache context changes nothing: same outputs with another context name or with none.
    for context in ("uncond", False):
        for a, b in zip(outputs, run_steps(model, family, num_steps, context=context)):
            assert torch.equal(a, b)
    # Step 0 is the plain forward of the base inputs.
    assert torch.equal(outputs[0], _forward(model, family.inputs(0)))
