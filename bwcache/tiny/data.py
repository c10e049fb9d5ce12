"""Procedural clips for the embedded Tiny Shapes model.

Every clip shows one object (a square or a circle) of one colour sliding one way across a black background.
Clips are fully determined by a seed, so training data and tests are reproducible without any download.
"""

from __future__ import annotations

import math
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


# ---------------------------------------------------------------------------------------------------------------
# Scenes v2: richer clips, rendered in torch for a whole batch at once (on the training device).
#
# The prompt still names one object ("a red square moving right"); everything else in the clip is left to chance:
# a dark backdrop (flat, a gradient, low-frequency texture) that may pan and change brightness, and smaller
# distractor objects of other colours drifting any way, in front of or behind the named one. The named object's
# start is spread wider than in v1, so the prompt no longer almost fixes the layout: a denoiser must commit to
# one from the noise during its first steps, as a real video model commits to a composition.
# ---------------------------------------------------------------------------------------------------------------

BACKGROUND_MAX = 0.45  # every backdrop channel stays at or below this, so no backdrop pixel is near a palette colour


@dataclass(frozen=True)
class SceneOptions:
    """What a clip may contain besides the named object. `SCENES` names the presets; fields override them."""

    background: str = "black"  # "black" or "rich" (flat / gradient / texture, dark)
    distractors: int = 0  # at most this many other objects (each clip draws 0..n)
    pan: float = 0.0  # probability that the backdrop pans (camera motion)
    lighting: float = 0.0  # probability that the backdrop's brightness ramps over the clip
    layout: str = "v1"  # "v1": start on the side the object leaves, as in v1; "wide": start spread wider
    texture: float = 0.6  # probability of texture on a rich backdrop
    occlusion: float = 0.5  # probability that a distractor passes in front of the named object

    def to_dict(self) -> dict:
        return asdict(self)


SCENES: dict[str, SceneOptions] = {
    "v1": SceneOptions(),
    "v2": SceneOptions(background="rich", distractors=2, pan=0.5, lighting=0.4, layout="wide"),
    "v2-bg": SceneOptions(background="rich", layout="wide"),
    "v2-objects": SceneOptions(distractors=2, layout="wide"),
}

WIDE_START_RANGE = (0.08, 0.45)
WIDE_TRAVEL_RANGE = (0.35, 0.50)
WIDE_ACROSS_RANGE = (0.20, 0.80)
DISTRACTOR_HALF_RANGE = (0.06, 0.10)  # smaller than the named object, so it is never hidden completely


def scene_options(name_or_options: "str | SceneOptions | dict | None" = "v1", **overrides) -> SceneOptions:
    if name_or_options is None:
        base = SCENES["v1"]
    elif isinstance(name_or_options, SceneOptions):
        base = name_or_options
    elif isinstance(name_or_options, dict):
        base = SceneOptions(**name_or_options)
    elif name_or_options in SCENES:
        base = SCENES[name_or_options]
    else:
        raise ValueError(f"unknown scene {name_or_options!r}; known: {', '.join(SCENES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return SceneOptions(**{**asdict(base), **overrides})




def _palette(device) -> "torch.Tensor":
    import torch

    return torch.tensor([COLOURS[c] for c in COLOURS], dtype=torch.float32, device=device)


def _u(gen, n, lo, hi):
    import torch

    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coverage(is_circle, cx, cy, half, xs, ys):
    """Anti-aliased coverage (B, F, H, W) of squares / circles with centres (B, F) and half sizes (B,)."""
    import torch

    h = half[:, None, None, None]
    dx = xs - cx[..., None, None]
    dy = ys - cy[..., None, None]
    square = (h - dx.abs() + 0.5).clamp(0, 1) * (h - dy.abs() + 0.5).clamp(0, 1)
    circle = (h - torch.sqrt(dx * dx + dy * dy) + 0.5).clamp(0, 1)
    return torch.where(is_circle[:, None, None, None], circle, square)


def render_scenes(
    gen: "torch.Generator",
    batch_size: int,
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    scene: "SceneOptions | str" = "v2",
    device="cpu",
    colour: "list[str] | str | None" = None,
    shape: "list[str] | str | None" = None,
    direction: "list[str] | str | None" = None,
) -> dict:
    """A batch of clips. All randomness is drawn on the CPU from `gen` (so a seed gives the same clips on every
    device); the pixels are computed on `device`.

    Returns {"video": (B, 3, F, H, W) in [0, 1], "object": (B, 1, F, H, W) coverage of all objects (for a loss
    weight), "prompts": [...], "specs": [{colour, shape, direction}, ...]}.
    """
    import torch

    opts = scene_options(scene)
    B, F, H, W = batch_size, num_frames, height, width
    names = list(COLOURS)
    dirs = list(DIRECTIONS)

    def pick(value, options):
        idx = torch.randint(len(options), (B,), generator=gen)
        if value is None:
            return idx
        values = [value] * B if isinstance(value, str) else list(value)
        return torch.tensor([options.index(v) for v in values])

    colour_i = pick(colour, names)
    shape_i = pick(shape, list(SHAPES))
    dir_i = pick(direction, dirs)
    m = float(min(H, W))
    half = _u(gen, B, *HALF_SIZE_RANGE) * m
    dvec = torch.tensor([DIRECTIONS[d] for d in dirs], dtype=torch.float32)[dir_i]  # (B, 2)
    horizontal = dvec[:, 0] != 0
    along = torch.where(horizontal, torch.tensor(float(W)), torch.tensor(float(H)))
    across = torch.where(horizontal, torch.tensor(float(H)), torch.tensor(float(W)))
    if opts.layout == "wide":
        start_r, travel_r, across_r = WIDE_START_RANGE, WIDE_TRAVEL_RANGE, WIDE_ACROSS_RANGE
    elif opts.layout == "v1":
        start_r, travel_r, across_r = START_RANGE, TRAVEL_RANGE, ACROSS_RANGE
    else:
        raise ValueError(f"unknown layout {opts.layout!r}")
    travel = _u(gen, B, *travel_r) * along
    start = _u(gen, B, *start_r) * along
    side = _u(gen, B, *across_r) * across
    positive = (dvec.sum(dim=1) > 0)
    start_pos = torch.where(positive, start, along - start)
    x0 = torch.where(horizontal, start_pos, side)
    y0 = torch.where(horizontal, side, start_pos)
    speed = travel / max(F - 1, 1)
    t = torch.arange(F, dtype=torch.float32)
    cx = x0[:, None] + dvec[:, :1] * speed[:, None] * t
    cy = y0[:, None] + dvec[:, 1:] * speed[:, None] * t

    # Backdrop parameters (drawn whatever the options, so each option changes only its own part of a clip).
    c1 = torch.rand(B, 3, generator=gen) * BACKGROUND_MAX
    c2 = torch.rand(B, 3, generator=gen) * BACKGROUND_MAX
    angle = _u(gen, B, 0, 2 * math.pi)
    kind = torch.rand(B, generator=gen)  # < 0.25 flat, else gradient
    tex_on = torch.rand(B, generator=gen) < opts.texture
    tex_amp = _u(gen, B, 0.05, 0.15)
    tex_freq = _u(gen, B * 2, 0.5, 2.5).view(B, 2) * 2 * math.pi / m  # cycles per frame
    tex_angle = _u(gen, B * 2, 0, 2 * math.pi).view(B, 2)
    tex_phase = _u(gen, B * 2, 0, 2 * math.pi).view(B, 2)
    tex_colour = torch.rand(B, 3, generator=gen)
    pan_on = torch.rand(B, generator=gen) < opts.pan
    pan_v = (torch.rand(B, 2, generator=gen) * 2 - 1) * 0.06 * m  # pixels per frame
    light_on = torch.rand(B, generator=gen) < opts.lighting
    light_a = _u(gen, B, -0.5, 0.5)
    # Distractors.
    D = int(opts.distractors)
    n_distract = torch.randint(0, D + 1, (B,), generator=gen) if D else torch.zeros(B, dtype=torch.long)
    d_colour = (colour_i[:, None] + torch.randint(1, len(names), (B, max(D, 1)), generator=gen)) % len(names)
    d_circle = torch.rand(B, max(D, 1), generator=gen) < 0.5
    d_half = _u(gen, B * max(D, 1), *DISTRACTOR_HALF_RANGE).view(B, -1) * m
    d_x0 = torch.rand(B, max(D, 1), generator=gen) * W
    d_y0 = torch.rand(B, max(D, 1), generator=gen) * H
    d_angle = torch.rand(B, max(D, 1), generator=gen) * 2 * math.pi
    d_speed = _u(gen, B * max(D, 1), 0.0, 0.03).view(B, -1) * m
    d_front = torch.rand(B, max(D, 1), generator=gen) < opts.occlusion

    dev = torch.device(device)
    ys = (torch.arange(H, dtype=torch.float32, device=dev) + 0.5).view(1, 1, H, 1)
    xs = (torch.arange(W, dtype=torch.float32, device=dev) + 0.5).view(1, 1, 1, W)
    to = lambda x: x.to(dev)  # noqa: E731
    tt = to(t).view(1, F, 1, 1)

    # Backdrop (B, 3, F, H, W).
    if opts.background == "black":
        bg = torch.zeros(B, 3, F, H, W, device=dev)
    elif opts.background == "rich":
        pan = torch.where(to(pan_on)[:, None], to(pan_v), torch.zeros_like(to(pan_v)))
        bx = xs - pan[:, 0].view(B, 1, 1, 1) * tt  # backdrop coordinates move with the camera
        by = ys - pan[:, 1].view(B, 1, 1, 1) * tt
        a = to(angle).view(B, 1, 1, 1)
        ramp = ((bx - W / 2) * torch.cos(a) + (by - H / 2) * torch.sin(a)) / m + 0.5  # about 0..1 across the frame
        ramp = torch.where(to(kind).view(B, 1, 1, 1) < 0.25, torch.zeros_like(ramp), ramp.clamp(0, 1))
        bg = to(c1).view(B, 3, 1, 1, 1) + (to(c2) - to(c1)).view(B, 3, 1, 1, 1) * ramp[:, None]
        tex = 0
        for k in range(2):
            ang = to(tex_angle[:, k]).view(B, 1, 1, 1)
            u = bx * torch.cos(ang) + by * torch.sin(ang)
            tex = tex + torch.sin(u * to(tex_freq[:, k]).view(B, 1, 1, 1) + to(tex_phase[:, k]).view(B, 1, 1, 1))
        amp = torch.where(to(tex_on), to(tex_amp), torch.zeros_like(to(tex_amp))).view(B, 1, 1, 1, 1)
        bg = bg + amp * (to(tex_colour).view(B, 3, 1, 1, 1) * 2 - 0.5) * (tex / 2)[:, None]
        gain = 1 + torch.where(to(light_on), to(light_a), torch.zeros_like(to(light_a))).view(B, 1, 1, 1, 1) * (
            tt[:, None] / max(F - 1, 1) - 0.5)
        bg = (bg * gain).clamp(0, BACKGROUND_MAX)
    else:
        raise ValueError(f"unknown background {opts.background!r}")

    palette = _palette(dev)
    video = bg
    objects = torch.zeros(B, 1, F, H, W, device=dev)
    named = _coverage(to(shape_i == 1), to(cx), to(cy), to(half), xs, ys)[:, None]

    def layer(video, cov, rgb):
        return video * (1 - cov) + rgb.view(B, 3, 1, 1, 1) * cov

    d_layers = []
    for k in range(D):
        present = to(n_distract > k).float().view(B, 1, 1, 1, 1)
        ddx = torch.cos(d_angle[:, k]) * d_speed[:, k]
        ddy = torch.sin(d_angle[:, k]) * d_speed[:, k]
        dcx = d_x0[:, k:k + 1] + ddx[:, None] * t
        dcy = d_y0[:, k:k + 1] + ddy[:, None] * t
        cov = _coverage(to(d_circle[:, k]), to(dcx), to(dcy), to(d_half[:, k]), xs, ys)[:, None] * present
        d_layers.append((cov, palette[to(d_colour[:, k])], to(d_front[:, k]).view(B, 1, 1, 1, 1)))
    for cov, rgb, front in d_layers:  # behind the named object
        video = layer(video, cov * (~front).float(), rgb)
        objects = torch.maximum(objects, cov)
    video = layer(video, named, palette[to(colour_i)])
    objects = torch.maximum(objects, named)
    for cov, rgb, front in d_layers:  # in front of it
        video = layer(video, cov * front.float(), rgb)

    specs = [{"colour": names[c], "shape": SHAPES[s], "direction": dirs[d]}
             for c, s, d in zip(colour_i.tolist(), shape_i.tolist(), dir_i.tolist())]
    return {
        "video": video.clamp(0, 1),
        "object": objects,
        "prompts": [make_prompt(s["colour"], s["shape"], s["direction"]) for s in specs],
        "specs": specs,
    }


def make_scene_clip(
    seed: int,
    scene: "SceneOptions | str" = "v2",
    num_frames: int = 16,
    height: int = 32,
    width: int = 32,
    colour: str | None = None,
    shape: str | None = None,
    direction: str | None = None,
) -> tuple[np.ndarray, str]:
    """One clip of `scene` for `seed`: frames (F, H, W, 3) float32 in [0, 1] and its prompt."""
    import torch

    out = render_scenes(torch.Generator().manual_seed(seed), 1, num_frames, height, width, scene,
                        colour=colour, shape=shape, direction=direction)
    return out["video"][0].permute(1, 2, 3, 0).numpy().astype(np.float32), out["prompts"][0]


def make_example_image(
    seed: int,
    scene: "SceneOptions | str" = "v2",
    height: int = 32,
    width: int = 32,
    colour: str | None = None,
    shape: str | None = None,
    direction: str | None = None,
    num_frames: int = 16,
) -> tuple[np.ndarray, str]:
    """A first frame for image-to-video, (H, W, 3) float32 in [0, 1], and the prompt of the clip it starts."""
    frames, prompt = make_scene_clip(seed, scene, num_frames, height, width, colour, shape, direction)
    return frames[0], prompt


# First frames for trying image-to-video (written to assets/first-frames/ by `python scripts/make_i2v_images.py`): one
# per row, the clip's seed and attributes; each image is frame 0 of that clip, so the prompt that matches it is the clip's own.
EXAMPLE_IMAGES: tuple[tuple[int, str, str, str], ...] = (
    (7_100_001, "red", "square", "right"),
    (7_100_002, "green", "circle", "up"),
    (7_100_003, "blue", "square", "left"),
    (7_100_004, "yellow", "circle", "down"),
    (7_100_005, "magenta", "square", "down"),
    (7_100_006, "cyan", "circle", "left"),
)


def example_image_name(prompt: str) -> str:
    return prompt.replace(" ", "-") + ".png"


def write_example_images(
    folder,
    scene: "SceneOptions | str | dict" = "v1",
    height: int = 32,
    width: int = 32,
    num_frames: int = 16,
    cases: "tuple[tuple[int, str, str, str], ...]" = EXAMPLE_IMAGES,
) -> list:
    """Write the example first frames as PNGs named after their prompts ("a-red-square-moving-right.png") into
    `folder`; returns [(path, prompt), ...]. The same arguments always write the same pixels."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for seed, colour, shape, direction in cases:
        image, prompt = make_example_image(seed, scene, height, width, colour=colour, shape=shape,
                                           direction=direction, num_frames=num_frames)
        path = folder / example_image_name(prompt)
        Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(path)
        written.append((path, prompt))
    return written

