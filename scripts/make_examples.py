"""Regenerate the app's precomputed example runs in assets/examples/<name>/ with the real runner.

Each example is one `run_comparison` on the Tiny Shapes preset (CPU, no download) saved with `save_comparison`:
run.json, baseline.mp4, bwcache.mp4, side_by_side.mp4 and trace.csv. The app loads them instantly when an example
is clicked, so a Space shows results without spending GPU time.

    python scripts/make_examples.py               # all examples; refuses to replace existing ones
    python scripts/make_examples.py --overwrite   # replace them
    python scripts/make_examples.py --only blue-circle-up
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bwcache.report import save_comparison, summary_text  # noqa: E402
from bwcache.runner import run_comparison  # noqa: E402

OUT_DIR = ROOT / "assets" / "examples"
PRESET = "tiny-shapes"

# Name -> request, in the order the app lists them: the method at its best first (the preset's default profile,
# then from a first frame, then the fast profile), and last the paper's own method at the δ that works on this model
# (the preset's paper profile: the official code's decisions).
FIRST_FRAME = ROOT / "assets" / "first-frames" / "a-magenta-square-moving-down.png"
EXAMPLES = {
    "red-square-right": {"prompt": "a red square moving right", "seed": 0},
    "magenta-square-down-from-an-image": {"prompt": "a magenta square moving down", "seed": 3,
                                          "image": FIRST_FRAME},
    "yellow-square-left": {"prompt": "a yellow square moving left", "seed": 2, "profile": "fast"},
    "blue-circle-up": {"prompt": "a blue circle moving up", "seed": 1, "profile": "paper"},
}


def _progress(fraction: float, description: str) -> None:
    if sys.stdout.isatty():
        print(f"\r  {fraction:6.1%}  {description:<40}", end="", flush=True)


def make_example(name: str, request: dict, out_dir: Path, overwrite: bool) -> Path:
    target = out_dir / name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    comparison = run_comparison(PRESET, device="cpu", progress=_progress, **request)
    if sys.stdout.isatty():
        print()
    # Write next to the target and swap in whole, so a failed run never leaves half an example behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    try:
        save_comparison(comparison, staging)
        # Temporary files are private (0600); these are published with the repository.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(summary_text(comparison.record).splitlines()[0])
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(EXAMPLES), action="append", help="regenerate only this example")
    parser.add_argument("--overwrite", action="store_true", help="replace existing examples")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help=f"default: {OUT_DIR}")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    names = args.only or list(EXAMPLES)
    if not args.overwrite:
        existing = [name for name in names if (args.out_dir / name).exists()]
        if existing:
            parser.error(f"{', '.join(existing)} already exist in {args.out_dir}; pass --overwrite to replace them")
    for name in names:
        print(f"{name}: {EXAMPLES[name]}")
        make_example(name, EXAMPLES[name], args.out_dir, args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
