"""Output paths checked before any work: folders that can be made and written to, files never replaced unasked,
and the files a command reads."""

from __future__ import annotations

import tempfile
from pathlib import Path


def check_writable(path: Path, option: str, folder: bool) -> None:
    """Refuse an output path that cannot be written, before any model work: the folders it needs are made and a
    file is written there, then both are removed again (a permission bit does not tell: root may not write under
    /proc or /sys either)."""
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder.")
    if not folder and path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file path.")
    target = path if folder else path.parent
    missing = []
    existing = target
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path} cannot be created: {existing} is a file.")
    made = []
    try:
        for folder_path in reversed(missing):
            folder_path.mkdir()
            made.append(folder_path)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".bwcache-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{option} {path} cannot be written: {reason} ({error.filename or target}).") from None
    finally:
        for folder_path in reversed(made):
            folder_path.rmdir()


def read_lines(path: Path, option: str) -> list[str]:
    """The non-empty lines of a text file a command reads (a prompt file), or a ValueError naming the option."""
    if not path.exists():
        raise ValueError(f"{option} {path} does not exist.")
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a text file with one entry per line.")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{option} {path} cannot be read as UTF-8 text: {error}.") from None
    if not lines:
        raise ValueError(f"{option} {path} holds no line; give one entry per line.")
    return lines
