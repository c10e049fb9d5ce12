"""The run-cost instruments act on the device they are given, not on the current default GPU (checked on a CPU, with
torch.cuda's calls recorded)."""

import types

import numpy as np
import pytest
import torch

from bwcache import instruments
from bwcache.instruments import ForwardTimer, peak_tensor_bytes, synchronize
from bwcache.presets import load_preset
from bwcache.runner import generate, resolve_settings

DEVICE = "cuda:1"


@pytest.fixture
def cuda_calls(monkeypatch):
    """torch.cuda as if GPUs were there: each call is recorded as (name, args) and answers with a byte count."""
    calls = []
    allocated = iter([1000, 5000])  # memory_allocated, then max_memory_allocated

    def recorder(name, answer=None):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            return next(answer) if answer is not None else None

        return call

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", recorder("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", recorder("reset_peak_memory_stats"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", recorder("memory_allocated", allocated))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", recorder("max_memory_allocated", allocated))
    return calls


def _devices(calls):
    return [(name, args[0] if args else kwargs.get("device")) for name, args, kwargs in calls]


def test_synchronize_waits_on_the_given_device_and_only_on_cuda(cuda_calls):
    synchronize(DEVICE)
    synchronize(torch.device(DEVICE))
    synchronize("cpu")
    assert [(name, str(device)) for name, device in _devices(cuda_calls)] == [("synchronize", DEVICE)] * 2


def test_peak_memory_is_read_from_the_given_device(cuda_calls):
    ran = []
    assert peak_tensor_bytes(lambda: ran.append(True), DEVICE) == 5000 - 1000
    assert ran == [True]
    assert _devices(cuda_calls) == [("synchronize", DEVICE), ("reset_peak_memory_stats", DEVICE),
                                    ("memory_allocated", DEVICE), ("synchronize", DEVICE),
                                    ("max_memory_allocated", DEVICE)]


def test_the_forward_timer_synchronises_the_given_device(cuda_calls, monkeypatch):
    ticks = iter(range(1000))
    monkeypatch.setattr(instruments, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    layer = torch.nn.Linear(2, 2)
    for around_call in (False, True):
        cuda_calls.clear()
        timer = ForwardTimer([layer], DEVICE, around_call=around_call)
        try:
            layer(torch.ones(1, 2))
        finally:
            timer.remove()
        assert (timer.calls, timer.seconds) == (1, 1)
        assert _devices(cuda_calls) == [("synchronize", DEVICE)] * 2


def test_a_timed_generation_synchronises_the_given_device(cuda_calls):
    """The runner's `generate` times a pipeline call between two synchronisations of its device."""
    preset = load_preset("tiny-shapes")
    settings = resolve_settings(preset, prompt="a red square moving right", num_inference_steps=2)
    frames = np.zeros((2, 8, 8, 3), np.float32)

    def pipe(**kwargs):
        return types.SimpleNamespace(frames=[frames])

    out, seconds = generate(pipe, preset, settings, DEVICE)
    assert out.shape == frames.shape and seconds >= 0
    assert _devices(cuda_calls) == [("synchronize", DEVICE)] * 2
