"""The Hugging Face Space this repository deploys as: its card (README.md's front matter) and what it serves.

The card is the one place that says which models the Space serves: `preload_from_hub` lists their weights, which
the Hub downloads at build time, and on a Space the app offers those presets (plus the embedded Tiny Shapes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .presets import Preset

README = Path(__file__).resolve().parent.parent / "README.md"

# GPU memory of the Space hardware the card may suggest (huggingface_hub's SpaceHardware names), in GB.
# ZeroGPU ("zero-a10g", chosen in the Space's settings) hands out half an RTX Pro 6000: 48 GB.
HARDWARE_MEMORY_GB = {
    "cpu-basic": 0, "cpu-upgrade": 0, "zero-a10g": 48, "t4-small": 16, "t4-medium": 16, "l4x1": 24, "l4x4": 96,
    "a10g-small": 24, "a10g-large": 24, "a10g-largex2": 48, "a10g-largex4": 96, "l40sx1": 48, "l40sx4": 192,
    "l40sx8": 384, "a100-large": 80, "a100x4": 320, "a100x8": 640,
}
SHORT_DESCRIPTION_MAX = 60


def card(path: str | Path = README) -> dict:
    """The README's front matter, parsed."""
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        raise ValueError(f"{path} has no front matter.")
    return yaml.safe_load(text.split("---\n", 2)[1]) or {}


def preloaded(space_card: Mapping) -> list[str]:
    """The hub ids `preload_from_hub` names (an entry may add file names after the id)."""
    return [str(entry).split()[0] for entry in space_card.get("preload_from_hub") or []]


def served(presets: Mapping[str, Preset], space_card: Mapping) -> dict[str, Preset]:
    """The presets a Space serves: the embedded ones and those whose weights it preloads."""
    weights = set(preloaded(space_card))
    return {name: p for name, p in presets.items() if p.hub_id is None or p.hub_id in weights}
