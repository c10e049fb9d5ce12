"""A folder to upload as the Hugging Face Space, with the torch version ZeroGPU supports.

    python scripts/space_bundle.py space-upload/
    hf upload <user>/<space> space-upload/ --repo-type space

The Hub installs the root requirements.txt. The repository pins torch 2.13 (the version its set-up and tests run
with), which ZeroGPU does not support (it runs torch 2.8–2.11), so the bundle pins `ZEROGPU_TORCH` instead and keeps
everything else as tracked: the app, the package, the presets, the embedded model, the examples, the README
(whose front matter configures the Space) and its screenshot. Tests, benchmarks and scripts stay behind.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZEROGPU_TORCH = "2.11.0"
LEFT_OUT = ("tests/", "benchmarks/", "scripts/", ".ci/", "Spacefile", "requirements-test.txt")


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in listing.decode().split("\0")
            if p and not p.startswith(LEFT_OUT) and (ROOT / p).is_file()]


def space_requirements(text: str) -> str:
    pinned, count = re.subn(r"^torch==\S+$", f"torch=={ZEROGPU_TORCH}", text, flags=re.M)
    if count != 1:
        raise ValueError("requirements.txt must pin torch exactly once (torch==X).")
    return pinned


def bundle(out: Path) -> list[str]:
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder.")
    files = tracked_files()
    for name in files:
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    (out / "requirements.txt").write_text(space_requirements((ROOT / "requirements.txt").read_text()))
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="a new or empty folder")
    args = parser.parse_args(argv)
    files = bundle(args.out)
    print(f"wrote {len(files)} files to {args.out} (torch=={ZEROGPU_TORCH} for ZeroGPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
