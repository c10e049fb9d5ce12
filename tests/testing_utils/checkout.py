"""The files of this checkout, as git lists them: what a commit of the working tree would hold."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def checkout_files() -> list[str]:
    """Tracked files, and untracked ones git does not ignore, that exist; skips the test outside a git checkout."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in listing.decode().split("\0") if name and (ROOT / name).is_file()]
