"""The app's fields by name, following the settings description: what a preset fills, what a profile sets, the
compare and sweep endpoints' parameters (their API), and the functions that take them."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ..config import CACHE_SETTINGS
from ..runner import SETTING_KEYS
from ..settings import Settings
from .requests import NO_PEER

# The generation fields of the form, after the prompts.
GENERATION_FIELDS = tuple(key for key in SETTING_KEYS if key not in ("prompt", "negative_prompt"))
DEFAULT_SWEEP = "0.05, 0.1, 0.15, 0.2, 0.3"
# What an endpoint parameter left out means; None everywhere else: the preset's default.
ENDPOINT_DEFAULTS = {"randomize_seed": False, "compare_with": NO_PEER, "thresholds": DEFAULT_SWEEP}


def form_keys(settings: Settings = CACHE_SETTINGS) -> list[str]:
    """The controls a preset fills, in the order the app's `fill_preset` returns them (then the notes)."""
    return ["prompt", "negative_prompt", "image", *GENERATION_FIELDS, "seed", "profile",
            *(s.name for s in settings.form)]


def profile_keys(settings: Settings = CACHE_SETTINGS) -> list[str]:
    """The controls a cache profile sets, in the order the app's `fill_profile` returns them."""
    return [*(s.name for s in settings.form), "profile"]


def compare_parameters(settings: Settings = CACHE_SETTINGS) -> list[str]:
    """The compare endpoint's parameters, in order: the main settings (δ) right after the preset."""
    main = [s.name for s in settings.form if s.form == "main"]
    advanced = [s.name for s in settings.form if s.form == "advanced"]
    return ["prompt", "preset", *main, "seed", "negative_prompt", "image", *GENERATION_FIELDS, *advanced,
            "randomize_seed", "compare_with", "profile"]


def sweep_parameters(settings: Settings = CACHE_SETTINGS) -> list[str]:
    """The sweep endpoint's parameters: the δ values instead of δ."""
    cache = [s.name for s in settings.form if s.name != "threshold"]
    return ["prompt", "preset", "thresholds", "seed", "negative_prompt", "image", *GENERATION_FIELDS, *cache,
            "profile"]


def endpoint(work: Callable[[dict, Any], Any], names: list[str], doc: str, progress: Any,
             defaults: dict | None = None) -> Callable:
    """A function taking `names` (positionally, in order, or by name; left out: `defaults`, `ENDPOINT_DEFAULTS` or
    None) and a keyword-only `progress` (defaulting to `progress`), calling `work(values, progress)`. Its signature
    is what Gradio lists as the API."""
    defaults = {**ENDPOINT_DEFAULTS, **(defaults or {})}
    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults.get(name))
                  for name in names]
    parameters.append(inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=progress))
    signature = inspect.Signature(parameters)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        return work(values, values.pop("progress"))

    call.__signature__ = signature
    call.__doc__ = doc
    call.__name__ = work.__name__.lstrip("_")
    return call
