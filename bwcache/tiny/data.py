"""Procedural clips for the embedded Tiny Shapes model.

Every clip shows one object (a square or a circle) of one colour sliding one way across a black background.
Clips are fully determined by a seed, so training data and tests are reproducible without any download.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("square", "circle")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
DIRECTIONS: dict[str, tuple[int, int]] = {
    # (dx, dy) in image coordinates: y grows downwards.
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

# Object size and path are fractions of the frame so that clips look alike at every resolution. Every path starts
# on the side the object moves away from and crosses the middle of the frame, so the prompt's direction decides
# where the object is in each frame, not only how it moves: that is what a denoiser can learn from the prompt
# while the noise still hides the object.
HALF_SIZE_RANGE = (0.14, 0.22)  # half the side (square) or the radius (circle), relative to min(H, W)
START_RANGE = (0.12, 0.30)  # centre at frame 0, from the edge the object moves away from, relative to that extent
TRAVEL_RANGE = (0.45, 0.60)  # distance covered over the clip, relative to the frame extent along the motion
ACROSS_RANGE = (0.30, 0.70)  # centre position across the motion, relative to that extent


def make_prompt(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render a clip; positions are in pixels, centre of the object at frame 0."""

    shape: str
    colour: str
    direction: str
    x0: float
    y0: float
    half_size: float
    speed: float  # pixels per frame

    @property
    def prompt(self) -> str:
        return make_prompt(self.colour, self.shape, self.direction)


@dataclass
class Clip:
    frames: np.ndarray  # (F, H, W, 3) float32 in [0, 1]
    spec: ClipSpec

    @property
    def prompt(self) -> str:
        return self.spec.prompt

    @property
    def attributes(self) -> dict:
        return asdict(self.spec)


def sample_spec(
    rng: np.random.Generator,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    shape: str | None = None,
    colour: str | None = None,
    direction: str | None = None,
) -> ClipSpec:
    """Draw random attributes; the object's centre stays inside the frame (START + TRAVEL ends by 0.9 of it)."""
    shape = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
    colour = colour if colour is not None else list(COLOURS)[rng.integers(len(COLOURS))]
    direction = direction if direction is not None else list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    if shape not in SHAPES or colour not in COLOURS or direction not in DIRECTIONS:
        raise ValueError(f"unknown attribute in {(shape, colour, direction)}")

    half = float(rng.uniform(*HALF_SIZE_RANGE)) * min(height, width)
    dx, dy = DIRECTIONS[direction]
    along = width if dx else height
    across = height if dx else width
    travel = float(rng.uniform(*TRAVEL_RANGE)) * along
    speed = travel / max(num_frames - 1, 1)
    start = float(rng.uniform(*START_RANGE)) * along
    side = float(rng.uniform(*ACROSS_RANGE)) * across
    if dx:
        x0 = start if dx > 0 else along - start
        y0 = side
    else:
        y0 = start if dy > 0 else along - start
        x0 = side
    return ClipSpec(shape, colour, direction, x0, y0, half, speed)


def render(spec: ClipSpec, num_frames: int = 16, height: int = 32, width: int = 32) -> np.ndarray:
    """Render with anti-aliased edges: pixel coverage falls off linearly over one pixel at the boundary."""
    dx, dy = DIRECTIONS[spec.direction]
    t = np.arange(num_frames, dtype=np.float32)
    cx = (spec.x0 + dx * spec.speed * t)[:, None, None]
    cy = (spec.y0 + dy * spec.speed * t)[:, None, None]
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5
    if spec.shape == "square":
        cov_x = np.clip(spec.half_size - np.abs(xs - cx) + 0.5, 0.0, 1.0)
        cov_y = np.clip(spec.half_size - np.abs(ys - cy) + 0.5, 0.0, 1.0)
        coverage = cov_x * cov_y
    else:
        dist = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
        coverage = np.clip(spec.half_size - dist + 0.5, 0.0, 1.0)
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    return (coverage[..., None] * colour).astype(np.float32)


def make_clip(
    seed: int,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    shape: str | None = None,
    colour: str | None = None,
    direction: str | None = None,
) -> Clip:
    """The clip for `seed`: the same arguments always give the same pixels."""
    rng = np.random.default_rng(seed)
    spec = sample_spec(rng, num_frames, height, width, shape, colour, direction)
    return Clip(render(spec, num_frames, height, width), spec)


def make_batch(
    rng: np.random.Generator, batch_size: int, num_frames: int = 16, height: int = 32, width: int = 32
) -> tuple[np.ndarray, list[str]]:
    """A training batch: videos (B, F, H, W, 3) in [0, 1] and their prompts."""
    specs = [sample_spec(rng, num_frames, height, width) for _ in range(batch_size)]
    videos = np.stack([render(s, num_frames, height, width) for s in specs])
    return videos, [s.prompt for s in specs]
