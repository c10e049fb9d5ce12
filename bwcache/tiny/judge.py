"""Judge from pixels whether a Tiny Shapes clip shows what its prompt asks for.

Colour: the mean colour of the bright pixels must be nearest to the prompt's colour. Motion: the object's centroid
must travel the named way, clearly further than it drifts sideways.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import COLOURS, DIRECTIONS, SHAPES

BRIGHT = 0.4  # a pixel belongs to the object when its brightest channel exceeds this
MIN_TRAVEL = 0.10  # the named-way displacement must be at least this fraction of the frame extent
SIDEWAYS_RATIO = 2.0  # ... and at least this many times the sideways displacement
MIN_VISIBLE = 0.75  # the object must be visible in at least this fraction of frames


@dataclass
class Judgement:
    ok: bool
    colour: str | None  # colour seen in the clip
    direction: str | None  # dominant direction seen in the clip
    colour_ok: bool
    direction_ok: bool
    expected: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.ok


def parse_prompt(prompt: str) -> dict:
    """Colour, shape and direction named in a prompt (None where absent)."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    pick = lambda names: next((w for w in words if w in names), None)  # noqa: E731
    return {"colour": pick(COLOURS), "shape": pick(SHAPES), "direction": pick(DIRECTIONS)}


def _as_frames(frames) -> np.ndarray:
    arr = frames.detach().cpu().float().numpy() if hasattr(frames, "detach") else np.asarray(frames)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must have shape (frames, H, W, 3), got {arr.shape}")
    arr = arr.astype(np.float32)
    if arr.max() > 1.5:  # uint8-style input
        arr = arr / 255.0
    return arr


def judge(frames, prompt: str) -> Judgement:
    """Judge one clip (frames, H, W, 3) in [0, 1] against its prompt."""
    arr = _as_frames(frames)
    expected = parse_prompt(prompt)
    num_frames, height, width, _ = arr.shape
    weight = np.clip((arr.max(axis=-1) - BRIGHT) / (1 - BRIGHT), 0.0, 1.0)  # (F, H, W)
    mass = weight.sum(axis=(1, 2))
    visible = mass > 0.5
    details: dict = {"visible_fraction": float(visible.mean())}

    colour = None
    if visible.any():
        mean = (arr * weight[..., None]).sum(axis=(0, 1, 2)) / weight.sum()
        dists = {name: float(np.linalg.norm(mean - np.asarray(rgb))) for name, rgb in COLOURS.items()}
        colour = min(dists, key=dists.get)
        details["mean_colour"] = [round(float(c), 3) for c in mean]

    direction, dx, dy = None, 0.0, 0.0
    if visible.mean() >= MIN_VISIBLE:
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        idx = np.flatnonzero(visible)
        cx = (weight[idx] * xs).sum(axis=(1, 2)) / mass[idx]
        cy = (weight[idx] * ys).sum(axis=(1, 2)) / mass[idx]
        # Fit a line over time so a single noisy frame cannot decide the direction.
        if len(idx) >= 2:
            span = idx[-1] - idx[0]
            dx = float(np.polyfit(idx, cx, 1)[0] * span) if span else 0.0
            dy = float(np.polyfit(idx, cy, 1)[0] * span) if span else 0.0
        if abs(dx) / width >= abs(dy) / height:
            direction = "right" if dx > 0 else "left"
        else:
            direction = "down" if dy > 0 else "up"
    details.update(dx=round(dx, 2), dy=round(dy, 2))

    colour_ok = expected["colour"] is None or colour == expected["colour"]
    direction_ok = False
    want = expected["direction"]
    if want is None:
        direction_ok = True
    elif direction is not None:
        ux, uy = DIRECTIONS[want]
        along_extent = width if ux else height
        along = dx * ux + dy * uy
        sideways = abs(dy) if ux else abs(dx)
        details["along"] = round(along, 2)
        details["sideways"] = round(sideways, 2)
        direction_ok = along >= MIN_TRAVEL * along_extent and along >= SIDEWAYS_RATIO * sideways
    return Judgement(
        ok=bool(colour_ok and direction_ok),
        colour=colour,
        direction=direction,
        colour_ok=bool(colour_ok),
        direction_ok=bool(direction_ok),
        expected=expected,
        details=details,
    )
