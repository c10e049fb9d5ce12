"""Judge from pixels whether a Tiny Shapes clip shows what its prompt asks for.

Each palette colour has a soft mask: pixels within COLOUR_FULL of it (RGB distance) count fully, fading to nothing at
COLOUR_NONE. Backdrops of the v2 scenes keep every channel at or below 0.45, so no backdrop pixel falls in any mask,
and distractor objects have other colours than the named one. Colour: the named colour must be visible (at least
MIN_AREA of the frame, in coherent pixels) in most frames. Motion: the centroid of the named colour's mask (of the most visible colour when
the named one is missing) must travel the named way, clearly further than it drifts sideways.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data import COLOURS, DIRECTIONS, SHAPES

COLOUR_FULL = 0.25  # a pixel this close to a palette colour belongs to an object of that colour
COLOUR_NONE = 0.5  # ... and no longer at all from this distance on
MIN_AREA = 0.015  # an object is visible in a frame when its colour's mask covers this share of min(H, W)^2
# (a quarter of the smallest object's area: a circle of radius 0.14) ...
COHERENT = 0.5  # ... counting only pixels whose 3x3 neighbourhood is at least this much of the colour, so that
# scattered pixels of noise never add up to an object
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


def _box3(m: np.ndarray) -> np.ndarray:
    """Mean over each pixel's 3x3 neighbourhood (edges padded by replication), per frame."""
    p = np.pad(m, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = m.shape[1:]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def colour_masks(arr: np.ndarray) -> dict[str, np.ndarray]:
    """Per palette colour, the soft mask (F, H, W) of coherent pixels of that colour."""
    out = {}
    for name, rgb in COLOURS.items():
        dist = np.linalg.norm(arr - np.asarray(rgb, dtype=np.float32), axis=-1)
        m = np.clip((COLOUR_NONE - dist) / (COLOUR_NONE - COLOUR_FULL), 0.0, 1.0)
        out[name] = m * (_box3(m) >= COHERENT)
    return out


def judge(frames, prompt: str) -> Judgement:
    """Judge one clip (frames, H, W, 3) in [0, 1] against its prompt."""
    arr = _as_frames(frames)
    expected = parse_prompt(prompt)
    num_frames, height, width, _ = arr.shape
    masks = colour_masks(arr)
    min_pixels = MIN_AREA * min(height, width) ** 2
    visible_by = {name: (m.sum(axis=(1, 2)) >= min_pixels).mean() for name, m in masks.items()}
    want_colour = expected["colour"]
    if want_colour is not None and visible_by[want_colour] >= MIN_VISIBLE:
        colour = want_colour
    else:
        mass = {name: m.sum() for name, m in masks.items()}
        colour = max(mass, key=mass.get) if max(mass.values()) >= min_pixels else None
    weight = masks[colour] if colour is not None else np.zeros(arr.shape[:3], dtype=np.float32)
    mass = weight.sum(axis=(1, 2))
    visible = mass >= min_pixels
    details: dict = {"visible_fraction": float(visible.mean())}
    if colour is not None:
        mean = (arr * weight[..., None]).sum(axis=(0, 1, 2)) / max(weight.sum(), 1e-6)
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

    colour_ok = expected["colour"] is None or (colour == expected["colour"] and visible.mean() >= MIN_VISIBLE)
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
