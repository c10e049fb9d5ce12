"""What a finished comparison shows: a readable summary, and the files it is saved as."""

from __future__ import annotations

import json
from pathlib import Path

from .figures import trace_to_csv
from .config import BWCacheConfig
from .guardrails import no_room
from .trace import held_memory_text, summarize
from .video import side_by_side, to_uint8, upscale, write_mp4


def _quality_text(entry: dict) -> str:
    if entry.get("identical"):
        return "identical to the uncached video (PSNR ∞)"
    parts = []
    if entry.get("psnr") is not None:
        parts.append(f"PSNR {entry['psnr']:.2f} dB")
    if entry.get("ssim") is not None:
        parts.append(f"SSIM {entry['ssim']:.4f}")
    if entry.get("lpips") is not None:
        parts.append(f"LPIPS {entry['lpips']:.4f}")
    return ", ".join(parts) or "n/a"


def _trigger_text(trigger_steps: dict) -> str:
    return ", ".join(f"{name} {'—' if step is None else step}" for name, step in trigger_steps.items()) or "—"


def summary_markdown(record: dict) -> str:
    """The headline of a run record, as Markdown."""
    spread = (f" (median of {len(record['speedup_runs'])} timed pairs, range {record['speedup_min']:.2f}–"
              f"{record['speedup_max']:.2f}×)" if record.get("speedup_runs") else "")
    lines = [
        f"**{record['speedup']:.2f}× speedup**{spread} — uncached {record['baseline_seconds']:.2f} s, "
        f"BWCache {record['bwcache_seconds']:.2f} s on {record['device']}",
        "",
        f"- Reuse: {record['reuse_fraction']:.1%} of block evaluations skipped; trigger step "
        f"{_trigger_text(record['trigger_steps'])}",
        f"- Quality vs uncached: {_quality_text(record)}",
    ]
    if record.get("ideal_speedup"):
        lines.append(
            f"- Ideal speedup for this reuse (DiT blocks took {record['block_share']:.0%} of the time): "
            f"{record['ideal_speedup']:.2f}×"
        )
    image = image_text(record)
    if image:
        lines.append(f"- {image}")
    for hint in (*record.get("warnings", ()), no_reuse_hint(record), timing_note(record),
                 *(record.get("profile_warnings") or [])):
        if hint:
            lines.append(f"- {hint}")
    held = held_memory_text(record["trace"])
    if held:
        lines.append(f"- Cache memory: {held}")
    peer = record.get("peer")
    if peer:
        lines.append(
            f"- {peer['label']}: {peer['seconds']:.2f} s, {peer['speedup']:.2f}× speedup, {_quality_text(peer)}"
        )
    config = record["config"]
    r = config["reuse_interval"]
    lines.append(
        f"- Settings: {config['mode']} mode, δ={config['threshold']:g}, R={'auto' if r is None else r}, "
        f"seed {record['seed']}, {record['settings']['num_inference_steps']} steps, "
        f"{record['settings']['num_frames']} frames at {record['settings']['width']}×{record['settings']['height']}"
    )
    return "\n".join(lines)


def summary_text(record: dict) -> str:
    """The headline and the cache's own account, as plain text for a terminal."""
    spread = (f" (median of {len(record['speedup_runs'])} pairs, range {record['speedup_min']:.2f}–"
              f"{record['speedup_max']:.2f}×)" if record.get("speedup_runs") else "")
    head = (
        f"{record['model']}: uncached {record['baseline_seconds']:.2f} s, BWCache {record['bwcache_seconds']:.2f} s, "
        f"{record['speedup']:.2f}× speedup{spread}, {record['reuse_fraction']:.1%} of block evaluations skipped, "
        f"{_quality_text(record)} ({record['device']})"
    )
    notes = [note for note in (image_text(record), timing_note(record), *(record.get("profile_warnings") or []))
             if note]
    return "\n".join([head, *notes, summarize(record["trace"])])


def save_comparison(comparison, out_dir: str | Path, fps: int | None = None, overwrite: bool = False) -> dict:
    """Write both videos (display-sized MP4s, plus one side-by-side), the run record and the trace CSV.

    Existing files are never replaced unless `overwrite` is set. Returns the written paths by name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = comparison.record
    fps = fps or record["settings"].get("fps") or 8
    paths = {name: out_dir / file for name, file in OUTPUT_FILES.items()}
    if not overwrite:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise FileExistsError(f"Refusing to overwrite {', '.join(existing)}; choose another folder.")
    baseline, cached = upscale_pair(comparison.baseline_frames, comparison.bwcache_frames)
    write_mp4(baseline, paths["baseline"], fps, overwrite=overwrite)
    write_mp4(cached, paths["bwcache"], fps, overwrite=overwrite)
    write_mp4(side_by_side(baseline, cached, labels=SIDE_BY_SIDE_LABELS), paths["side_by_side"], fps,
              overwrite=overwrite)
    paths["record"].write_text(json.dumps(record, indent=1))
    paths["trace_csv"].write_text(trace_to_csv(record["trace"]))
    image = getattr(comparison, "image", None)
    if image is not None:
        # The first frame as the run was given it (fitted to the video), beside the videos.
        paths["input"] = out_dir / INPUT_IMAGE
        if paths["input"].exists() and not overwrite:
            raise FileExistsError(f"Refusing to overwrite {paths['input']}; choose another folder.")
        image.save(paths["input"])
    return {name: str(path) for name, path in paths.items()}


INPUT_IMAGE = "input.png"

# The halves of side_by_side.mp4, left to right, named as the app names its videos.
SIDE_BY_SIDE_LABELS = ("uncached", "BWCache")

OUTPUT_FILES = {
    "baseline": "baseline.mp4",
    "bwcache": "bwcache.mp4",
    "side_by_side": "side_by_side.mp4",
    "record": "run.json",
    "trace_csv": "trace.csv",
}


def upscale_pair(*videos, min_side: int = 256):
    """Tiny clips enlarged crisply for display, all by the same factor."""
    return tuple(upscale(to_uint8(v), min_side=min_side) for v in videos)


def image_text(record: dict) -> str | None:
    """How closely each video's first frame matches the image it was given, and how the image was fitted."""
    image = record.get("image")
    if not image:
        return None
    matches = ", ".join(f"{name} {'∞' if value is None else f'{value:.1f}'} dB"
                        for name, value in image["first_frame_psnr"].items())
    note = f" ({image['note']})" if image.get("note") else ""
    return f"First frame vs the input image: PSNR {matches}{note}"


def no_reuse_hint(record: dict) -> str | None:
    """Why a cached run reused nothing, when it did not (None when it reused something, δ was 0, or the run's own
    warnings already say that its step count left no step to reuse)."""
    config, steps = record["config"], record["settings"]["num_inference_steps"]
    if record["reuse_fraction"] > 0 or config["threshold"] == 0:
        return None
    if no_room(BWCacheConfig.from_dict(config), steps):
        return None
    if config["mode"] in ("blockwise", "static"):
        return f"Nothing was reused: no block's distance fell below δ={config['threshold']:g}. Try a higher δ."
    triggers = [t for t in record.get("trigger_steps", {}).values() if t is not None]
    if not triggers:
        return f"Nothing was reused: the indicator never fell below δ={config['threshold']:g}. Try a higher δ."
    return (f"Nothing was reused: reuse triggered at step {min(triggers)}, and with {steps} steps the computed tail "
            "covers the rest. Use more steps.")


def timing_note(record: dict) -> str | None:
    """A caveat when the measured speedup is far from what the skipped work should give, in either direction (None
    when they agree): far below, the cache's own work or other work on the machine slowed the cached run; far above,
    something slowed the uncached run (another process sharing the CPU or GPU). The record's `timing_flag` says
    which; a record without one is judged from its speedups."""
    from .runner import timing_flag

    ideal, speedup = record.get("ideal_speedup"), record["speedup"]
    flag = record.get("timing_flag", timing_flag(speedup, ideal, record["reuse_fraction"]))
    if not flag:
        return None
    runs = record.get("speedup_runs")
    timed = (f"the median of {len(runs)} timed pairs (range {record['speedup_min']:.2f}–{record['speedup_max']:.2f}×)"
             if runs else "one uncached and one cached run, timed one after the other")
    if flag == "below_ideal":
        return (f"Timing note: {speedup:.2f}× measured where the skipped work should give about {ideal:.2f}×. The "
                f"figure is {timed}; the cache's own work, or other work on the machine during the cached run, slows "
                "it. Run again (python -m bwcache compare --timing-repeats 3) to compare.")
    return (f"Timing note: {speedup:.2f}× measured, more than the skipped work can give (about {ideal:.2f}×). The "
            f"figure is {timed}; something slowed the uncached run (another process sharing the CPU or GPU), so "
            "the speedup is overstated. Run again on a quiet machine, or with --timing-repeats 3.")
