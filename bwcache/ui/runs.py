"""A run's files: the folders runs are written to (complete or not at all, the newest kept), the sweep's table as
CSV, and the precomputed examples shipped in assets/."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from ..presets import DEFAULT_PROFILE, Preset
from ..report import save_comparison
from ..video import write_mp4

PARTIAL_PREFIX = ".partial-"


def new_run_dir(root: str | Path, kind: str = "run") -> Path:
    """A new, empty folder under `root` named by time and a random suffix; never an existing one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def save_run_folder(root: str | Path, kind: str, write) -> dict:
    """`write(folder)`'s files in a new run folder under `root`, which appears only once complete: they are written
    into a hidden `.partial-` folder first and moved into place in one rename. Returns `write`'s paths, moved."""
    partial = new_run_dir(root, kind)
    hidden = partial.with_name(PARTIAL_PREFIX + partial.name)
    partial.rename(hidden)
    try:
        paths = write(hidden)
        hidden.rename(partial)
    except BaseException:
        shutil.rmtree(hidden, ignore_errors=True)
        raise
    return {key: str(partial / Path(path).relative_to(hidden)) for key, path in paths.items()}


def remove_partial_runs(root: str | Path) -> list[Path]:
    """Delete run folders left half-written (a process stopped while saving); returns them."""
    root = Path(root)
    removed = [p for p in root.glob(PARTIAL_PREFIX + "*") if p.is_dir()] if root.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def prune_runs(root: str | Path, keep: int, in_use: set[str] | frozenset = frozenset()) -> list[Path]:
    """Delete the oldest complete run folders beyond the newest `keep`, never one named in `in_use`."""
    root = Path(root)
    if keep < 1 or not root.is_dir():
        return []
    runs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(PARTIAL_PREFIX)
                  and re.match(r"\d{8}-\d{6}-", p.name))
    removed = [p for p in runs[: max(0, len(runs) - keep)] if p.name not in in_use]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def prune_cache(root: str | Path, keep: int) -> list[Path]:
    """Delete the oldest entries of a file cache (Gradio's, where it copies each file it serves into a folder of
    its own) beyond the newest `keep`, so that it grows no further than the run folders do."""
    root = Path(root)
    if keep < 1 or not root.is_dir():
        return []
    entries = sorted(root.iterdir(), key=lambda p: p.stat().st_mtime)
    removed = entries[: max(0, len(entries) - keep)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


def max_runs(environ: Mapping[str, str]) -> int:
    """`BWCACHE_MAX_RUNS` (default 50): how many run folders the app keeps."""
    text = environ.get("BWCACHE_MAX_RUNS", "50")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"BWCACHE_MAX_RUNS must be a whole number ≥ 1, got {text!r}.") from None
    if value < 1:
        raise ValueError(f"BWCACHE_MAX_RUNS must be a whole number ≥ 1, got {value}.")
    return value


def save_run(comparison, run_dir: str | Path) -> dict:
    """The comparison's files in `run_dir` (see `report.save_comparison`), plus the peer's video when there is one."""
    paths = save_comparison(comparison, run_dir)
    peer_frames = getattr(comparison, "peer_frames", None)
    if peer_frames is not None and "peer" not in paths:
        from ..report import upscale_pair

        fps = comparison.record["settings"].get("fps") or 8
        (peer,) = upscale_pair(peer_frames)
        paths["peer"] = write_mp4(peer, Path(run_dir) / "peer.mp4", fps)
    return paths


DOWNLOAD_ORDER = ("side_by_side", "baseline", "bwcache", "peer", "input", "record", "trace_csv")


def download_list(paths: Mapping[str, str]) -> list[str]:
    return [str(paths[key]) for key in DOWNLOAD_ORDER if paths.get(key)]


def sweep_csv(result: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["threshold", "seconds", "speedup", "ideal_speedup", "psnr", "ssim", "reuse_fraction",
                     "identical", "baseline_seconds", "timing_flag"])
    for row in result["rows"]:
        writer.writerow([row["threshold"], row["seconds"], row["speedup"], row.get("ideal_speedup"),
                         "" if row["psnr"] is None else row["psnr"], row["ssim"], row["reuse_fraction"],
                         int(row["identical"]), result["baseline_seconds"], row.get("timing_flag") or ""])
    return buffer.getvalue()


def save_sweep(result: Mapping[str, Any], run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    paths = {"csv": run_dir / "sweep.csv", "record": run_dir / "sweep.json"}
    for path in paths.values():
        if path.exists():
            raise FileExistsError(f"Refusing to overwrite {path}.")
    paths["csv"].write_text(sweep_csv(result))
    paths["record"].write_text(json.dumps(result, indent=1))
    return {key: str(path) for key, path in paths.items()}


EXAMPLE_FILES = ("run.json", "baseline.mp4", "bwcache.mp4")


def list_examples(root: str | Path, presets: Mapping[str, Preset] | None = None) -> list[dict]:
    """Precomputed runs under `root/<name>/` (run.json + both videos), for presets that are available."""
    root = Path(root)
    examples = []
    for folder in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        if not all((folder / name).is_file() for name in EXAMPLE_FILES):
            continue
        record = json.loads((folder / "run.json").read_text())
        if presets is not None and record.get("preset") not in presets:
            continue
        examples.append({"name": folder.name, "dir": folder, "record": record})
    # Image-to-video first (the most asked-for workload), then in the order they were recorded
    # (scripts/make_examples.py records the method at its best first and the paper's own settings last).
    return sorted(examples, key=lambda e: (e["record"].get("image") is None, str(e["record"].get("created", "")),
                                           e["name"]))


def example_paths(folder: str | Path) -> dict:
    folder = Path(folder)
    names = {"baseline": "baseline.mp4", "bwcache": "bwcache.mp4", "side_by_side": "side_by_side.mp4",
             "peer": "peer.mp4", "input": "input.png", "record": "run.json", "trace_csv": "trace.csv"}
    return {key: str(folder / name) for key, name in names.items() if (folder / name).is_file()}


def find_example(examples: list[dict], preset: str, prompt: str, threshold: Any, seed: Any) -> dict | None:
    for example in examples:
        record = example["record"]
        if (record["preset"] == preset and record["prompt"] == (prompt or "").strip()
                and _close(record["config"]["threshold"], threshold) and _close(record["seed"], seed)):
            return example
    return None


def _close(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), abs_tol=1e-9)
    except (TypeError, ValueError):
        return False


def example_label(record: Mapping[str, Any]) -> str:
    config = record["config"]
    mode = " · the paper's method" if config["mode"] == "paper" else f" · {config['mode']}"
    interval = config.get("reuse_interval")
    reuse = f" · R {interval}" if interval is not None else ""
    profile = record.get("profile") or DEFAULT_PROFILE
    named = "" if profile == DEFAULT_PROFILE else f" · {profile} profile"
    image = " · from a first frame" if record.get("image") else ""
    return f"{record['prompt']}{image} · δ {config['threshold']:g}{reuse}{mode}{named}"


def example_summary(record: Mapping[str, Any], summary: str) -> str:
    created = str(record.get("created", ""))
    when = f" on {created[:10]}" if len(created) >= 10 else ""
    return f"_Precomputed example, recorded{when}; press Run to time it on this machine._\n\n{summary}"
