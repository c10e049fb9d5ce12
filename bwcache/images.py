"""A first frame as a user gives it: read and checked (a known image format, within size limits), then fitted to the
video's size (cropped to its aspect ratio around the centre, then resized), with a note saying what was done."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP")
# An image file larger than this is refused before it is decoded, and so is one of more pixels (a small file can
# decode into a huge image).
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096


def read_image(source: Any, label: str = "Image") -> Image.Image:
    """An RGB image from a path, bytes, a PIL image or an (H, W, 3) array (uint8, or float in [0, 1]); a ValueError
    names what is wrong with it and what is allowed."""
    if isinstance(source, Image.Image):
        return _checked(source, label).convert("RGB")
    if isinstance(source, np.ndarray):
        return _from_array(source, label)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{label}: {path.name} is not a file.")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ValueError(f"{label}: the file is {path.stat().st_size / 1e6:.1f} MB; at most "
                             f"{MAX_IMAGE_BYTES / 1e6:.0f} MB is allowed.")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"{label}: the file is {len(data) / 1e6:.1f} MB; at most {MAX_IMAGE_BYTES / 1e6:.0f} MB "
                             "is allowed.")
    else:
        raise ValueError(f"{label} must be an image file (PNG, JPEG or WebP), got {type(source).__name__}.")
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise ValueError(f"{label} is not a PNG, JPEG or WebP image.") from None
    # The header gives format and size: checked before the pixels are decoded.
    _checked(image, label)
    try:
        image.load()
    except (OSError, Image.DecompressionBombError):
        raise ValueError(f"{label}: the image file is damaged or cut short.") from None
    return image.convert("RGB")


def _checked(image: Image.Image, label: str) -> Image.Image:
    if image.format is not None and image.format not in FORMATS:
        raise ValueError(f"{label} is a {image.format} image; use PNG, JPEG or WebP.")
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{label} is {width}×{height}; at most {MAX_IMAGE_PIXELS:,} pixels are allowed.")
    if min(width, height) < 1:
        raise ValueError(f"{label} is empty.")
    return image


def _from_array(array: np.ndarray, label: str) -> Image.Image:
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"{label} as an array must have shape (height, width, 3), got {array.shape}.")
    if array.dtype != np.uint8:
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{label} as a float array must hold values from 0 to 1.")
        array = (array * 255).round().astype(np.uint8)
    return _checked(Image.fromarray(array), label)


def fit_image(image: Image.Image, width: int, height: int) -> tuple[Image.Image, str | None]:
    """`image` cropped around its centre to the aspect ratio of `width` × `height`, then resized to it; with a note
    saying what changed (None when it already had that size)."""
    source_width, source_height = image.size
    if (source_width, source_height) == (width, height):
        return image, None
    target = width / height
    if source_width / source_height > target:
        crop_width = round(source_height * target)
        left = (source_width - crop_width) // 2
        box = (left, 0, left + crop_width, source_height)
    else:
        crop_height = round(source_width / target)
        top = (source_height - crop_height) // 2
        box = (0, top, source_width, top + crop_height)
    cropped = image.crop(box)
    note = f"the image was {source_width}×{source_height}"
    if cropped.size != image.size:
        note += f", cropped around its centre to {cropped.size[0]}×{cropped.size[1]}"
    note += f" and resized to the video's {width}×{height}"
    return cropped.resize((width, height), Image.Resampling.LANCZOS), note


def as_frame(image: Image.Image) -> np.ndarray:
    """The image as a video frame: (H, W, 3) float32 in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
