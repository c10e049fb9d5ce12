"""First frames as users give them: read and checked before decoding, fitted to the video with a note."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bwcache.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, as_frame, fit_image, read_image


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height but which holds no pixel data (what a decompression bomb looks like
    before it is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_paths_bytes_arrays_and_pil_images_read_alike(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    path = tmp_path / "frame.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes(), image, pixels, pixels.astype(np.float32) / 255.0):
        read = read_image(source)
        assert read.mode == "RGB" and read.size == (20, 12)
        assert np.array_equal(np.asarray(read), pixels)  # PNG and float arrays in [0, 1] round-trip exactly
    assert np.array_equal(as_frame(image), pixels.astype(np.float32) / 255.0)


@pytest.mark.parametrize(
    "source, message",
    [
        (b"not an image at all", "is not a PNG, JPEG or WebP image"),
        (_png_bytes(Image.new("RGB", (4, 4)), "GIF"), "is a GIF image; use PNG, JPEG or WebP"),
        (_png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:2000],
         "damaged or cut short"),
        (np.zeros((4, 4)), "shape (height, width, 3)"),
        (np.full((4, 4, 3), 1.5, dtype=np.float32), "values from 0 to 1"),
        (42, "must be an image file (PNG, JPEG or WebP), got int"),
    ],
)
def test_bad_images_are_refused_by_name(source, message):
    with pytest.raises(ValueError) as info:
        read_image(source)
    assert str(info.value).startswith("Image") and message in str(info.value)


def test_a_huge_image_is_refused_from_its_header_before_decoding():
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    data = _png_header_only(side, side)  # no pixels: decoding it would fail, so the check must come first
    with pytest.raises(ValueError, match=f"Image is {side}×{side}; at most {MAX_IMAGE_PIXELS:,} pixels are allowed"):
        read_image(data)


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(b"\0" * (MAX_IMAGE_BYTES + 1))
    with pytest.raises(ValueError, match=r"the file is 10\.5 MB; at most 10 MB is allowed"):
        read_image(path)
    with pytest.raises(ValueError, match="missing.png is not a file"):
        read_image(tmp_path / "missing.png")


def test_fitting_crops_around_the_centre_then_resizes_and_says_so():
    wide = np.zeros((10, 40, 3), dtype=np.uint8)
    wide[:, 15:25] = 255  # a white band in the centre third of the width
    fitted, note = fit_image(Image.fromarray(wide), 32, 32)
    assert fitted.size == (32, 32)
    assert note == "the image was 40×10, cropped around its centre to 10×10 and resized to the video's 32×32"
    assert np.asarray(fitted).min() > 200  # the centre square is all white: nothing of the black sides survives
    same, none = fit_image(Image.new("RGB", (32, 24)), 32, 24)
    assert none is None and same.size == (32, 24)
    scaled, note = fit_image(Image.new("RGB", (64, 48)), 32, 24)
    assert note == "the image was 64×48 and resized to the video's 32×24" and scaled.size == (32, 24)
