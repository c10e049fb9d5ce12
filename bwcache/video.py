"""Browser-playable MP4 writing and probing for generated clips.

Frames are numpy arrays shaped (T, H, W, 3): float in [0, 1] or uint8.

Size policy: ``write_mp4`` never rescales. H.264 in yuv420p needs even
dimensions, so an odd height or width is padded by one row/column (edge
replication, bottom/right) and the pixel grid stays aligned with the source
for side-by-side comparisons. ``pad_to=16`` pads to whole macroblocks for
decoders that dislike cropped streams. imageio-ffmpeg's own macro-block
handling (which upscales, e.g. 850x481 -> 864x496) is switched off.

Colour: RGB is converted with the BT.709 matrix (limited range) and the
stream is tagged BT.709, so browsers and ffmpeg decode the colours the same
way instead of guessing between BT.601 and BT.709.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import imageio_ffmpeg
import numpy as np

__all__ = [
    "to_uint8",
    "upscale",
    "pad_to_multiple",
    "write_mp4",
    "probe_video",
    "read_video",
    "side_by_side",
    "label_band",
]

_COLOR_FILTER = (
    "scale=out_color_matrix=bt709:out_range=tv,"
    "setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709:range=tv"
)


def _as_numpy(frames: Any) -> np.ndarray:
    if hasattr(frames, "detach"):  # torch tensor, without importing torch here
        frames = frames.detach().cpu().numpy()
    return np.asarray(frames)


def _check_video(frames: np.ndarray, what: str = "frames") -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what} must be shaped (T, H, W, 3); got {tuple(frames.shape)}")
    if frames.shape[0] == 0:
        raise ValueError(f"{what} has no frames")


def to_uint8(frames: Any) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 with clipping and rounding.

    uint8 input is returned unchanged (never rescaled: multiplying uint8 by 255
    wraps around). NaN maps to 0. Any other integer dtype raises TypeError,
    since its value range is ambiguous.
    """
    arr = _as_numpy(frames)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"expected float frames in [0, 1] or uint8 frames, got dtype {arr.dtype}")
    arr = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def upscale(frames_u8: Any, min_side: int = 256) -> np.ndarray:
    """Nearest-neighbour upscaling by the smallest integer factor that makes the
    shorter side at least ``min_side``, so tiny clips (e.g. 32x32) display crisply
    rather than blurred by the browser. The result is padded to even dimensions.

    Works on (T, H, W, C) or (H, W, C). Clips already large enough are only padded.
    """
    arr = _as_numpy(frames_u8)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected (T, H, W, C) or (H, W, C); got {tuple(arr.shape)}")
    h, w = arr.shape[-3], arr.shape[-2]
    short = min(h, w)
    if short <= 0:
        raise ValueError(f"frames have an empty side: {tuple(arr.shape)}")
    factor = max(1, -(-int(min_side) // short))  # ceil division
    if factor > 1:
        arr = np.repeat(np.repeat(arr, factor, axis=-3), factor, axis=-2)
    return pad_to_multiple(arr, 2)


def pad_to_multiple(frames: Any, multiple: int = 2) -> np.ndarray:
    """Pad height and width up to a multiple of ``multiple`` by replicating the
    last row/column (bottom/right), so existing pixels keep their coordinates."""
    arr = _as_numpy(frames)
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = arr.shape[-3], arr.shape[-2]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return arr
    pad = [(0, 0)] * arr.ndim
    pad[-3] = (0, ph)
    pad[-2] = (0, pw)
    return np.pad(arr, pad, mode="edge")


def write_mp4(
    frames: Any,
    path: str | os.PathLike,
    fps: float,
    *,
    overwrite: bool = False,
    crf: int = 18,
    preset: str = "veryfast",
    pad_to: int = 2,
) -> str:
    """Encode frames as H.264 (libx264), yuv420p, ``+faststart`` MP4; return the path.

    ``frames``: (T, H, W, 3) float in [0, 1] (clipped, rounded) or uint8; numpy or torch.
    Odd sizes are padded to a multiple of ``pad_to`` (>= 2, see module doc); the
    image is never rescaled. Refuses to replace an existing file (FileExistsError)
    unless ``overwrite=True``. The file is encoded under a temporary name in the same
    folder and moved into place, so a failed encode leaves no partial file behind.
    """
    if pad_to < 2 or pad_to % 2:
        raise ValueError(f"pad_to must be an even number >= 2 (yuv420p needs even sizes), got {pad_to}")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    u8 = to_uint8(frames)
    _check_video(u8)
    u8 = pad_to_multiple(u8, pad_to)
    _, h, w, _ = u8.shape

    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".mp4", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = imageio_ffmpeg.write_frames(
            str(tmp),
            (w, h),
            fps=float(fps),
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,  # rate control comes from -crf below
            macro_block_size=1,  # sizes are already even; never let imageio rescale
            output_params=[
                "-crf", str(int(crf)),
                "-preset", preset,
                "-vf", _COLOR_FILTER,
                "-movflags", "+faststart",
            ],
        )
        writer.send(None)
        for frame in u8:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        # The temporary file is private (mkstemp); the video should be readable like any file the user saves.
        tmp.chmod(0o644)
        if overwrite:
            os.replace(tmp, target)
        else:
            _move_no_clobber(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(target)


def _move_no_clobber(src: Path, dst: Path) -> None:
    # A hard link fails atomically if dst appeared meanwhile; fall back to a
    # checked rename on filesystems without hard links.
    try:
        os.link(src, dst)
    except FileExistsError:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it") from None
    except OSError:
        if dst.exists():
            raise FileExistsError(f"{dst} already exists; pass overwrite=True to replace it") from None
        os.replace(src, dst)
        return
    src.unlink()


def probe_video(path: str | os.PathLike) -> dict:
    """Container facts for a video file.

    Returns ``codec`` (e.g. "h264"), ``pix_fmt`` (base name, e.g. "yuv420p"),
    ``pix_fmt_full`` (as ffmpeg reports it, with range/colour details),
    ``size`` (width, height), ``width``, ``height``, ``fps``, ``n_frames``
    (decoded frame count) and ``duration`` (seconds, from the container).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such video file: {p}")
    gen = imageio_ffmpeg.read_frames(str(p))
    try:
        meta = next(gen)
    finally:
        gen.close()
    n_frames, _secs = imageio_ffmpeg.count_frames_and_secs(str(p))
    pix_full = str(meta.get("pix_fmt", ""))
    w, h = meta["size"]
    return {
        "codec": meta.get("codec"),
        "pix_fmt": pix_full.split("(")[0].strip(),
        "pix_fmt_full": pix_full,
        "size": (int(w), int(h)),
        "width": int(w),
        "height": int(h),
        "fps": float(meta.get("fps") or 0.0),
        "n_frames": int(n_frames),
        "duration": meta.get("duration"),
    }


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video to uint8 RGB frames shaped (T, H, W, 3)."""
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(gen)
        w, h = meta["size"]
        frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in gen]
    finally:
        gen.close()
    if not frames:
        return np.zeros((0, h, w, 3), dtype=np.uint8)
    return np.stack(frames)


def side_by_side(
    a: Any,
    b: Any,
    *more: Any,
    gap: int = 8,
    gap_value: int = 255,
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """One uint8 clip with the clips left to right, separated by ``gap``-pixel
    bars of ``gap_value``: a single video stays frame-synchronised, which
    separate players do not.

    ``labels`` (one per clip) adds a header band above each clip naming it
    (see ``label_band``), so the halves of a downloaded file say which is which.

    All clips need the same frame count and height (ValueError otherwise).
    """
    clips = [to_uint8(clip) for clip in (a, b, *more)]
    names = "ab" if not more else [f"clip {k}" for k in range(len(clips))]
    for clip, name in zip(clips, names):
        _check_video(clip, name)
    first = clips[0]
    for clip, name in zip(clips[1:], names[1:]):
        if clip.shape[0] != first.shape[0] or clip.shape[1] != first.shape[1]:
            raise ValueError(
                f"side_by_side needs equal frame counts and heights; got {names[0]} {tuple(first.shape)} and "
                f"{name} {tuple(clip.shape)}"
            )
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(clips) or not all(isinstance(label, str) for label in labels):
            raise ValueError(f"labels must be one string per clip ({len(clips)}), got {labels!r}")
        height = band_height(first.shape[1])
        clips = [
            np.concatenate([np.broadcast_to(label_band(label, clip.shape[2], height), (clip.shape[0], height,
                                                                                       clip.shape[2], 3)), clip], axis=1)
            for label, clip in zip(labels, clips)
        ]
    t, h = clips[0].shape[:2]
    bar = np.full((t, h, int(gap), 3), np.uint8(gap_value), dtype=np.uint8)
    parts = [clips[0]]
    for clip in clips[1:]:
        parts += [bar, clip]
    return np.concatenate(parts, axis=2)


# Header bands: light text on a dark band, sized from the clip (12% of its height, at least 20 pixels), so the
# label stays legible at any display size the clip is shown at.
BAND_COLOR = (32, 32, 32)
LABEL_COLOR = (255, 255, 255)


def band_height(clip_height: int) -> int:
    """The header band's height for a clip ``clip_height`` pixels high (even, for yuv420p)."""
    height = max(20, round(0.12 * clip_height))
    return height + height % 2


def label_band(text: str, width: int, height: int) -> np.ndarray:
    """A (height, width, 3) uint8 band with ``text`` centred on it, as large as fits (up to 60% of the band's
    height), drawn with Pillow's bundled font."""
    from PIL import Image, ImageDraw, ImageFont

    if width < 1 or height < 1:
        raise ValueError(f"a label band needs a positive size, got {width}x{height}")
    image = Image.new("RGB", (int(width), int(height)), BAND_COLOR)
    draw = ImageDraw.Draw(image)
    size = max(6, int(0.6 * height))
    while True:
        try:
            font = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):  # Pillow without FreeType: its one fixed-size bitmap font
            font = ImageFont.load_default()
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= width - 4 or size <= 6 or not hasattr(font, "size"):
            break
        size -= 1
    x = (width - (right - left)) / 2 - left
    y = (height - (bottom - top)) / 2 - top
    draw.text((x, y), text, fill=LABEL_COLOR, font=font)
    return np.asarray(image, dtype=np.uint8)
