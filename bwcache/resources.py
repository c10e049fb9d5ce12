"""Where the shipped data lives: the presets and the Tiny Shapes model, and the package's version.

A source checkout keeps them at the repository's top level (`presets/`, `assets/tiny-shapes/`); an installed wheel
carries them as package data (`bwcache/data/presets`, `bwcache/data/tiny_shapes`), mapped in by pyproject.toml.
"""

from __future__ import annotations

from importlib import metadata, resources
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _in_checkout() -> bool:
    return (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "bwcache" / "__init__.py").is_file()


def _data_dir(packaged: str, *in_checkout: str) -> Path:
    installed = Path(str(resources.files("bwcache") / "data" / packaged))
    if installed.is_dir() or not _in_checkout():
        return installed
    return _CHECKOUT.joinpath(*in_checkout)


PRESETS_DIR = _data_dir("presets", "presets")
TINY_SHAPES_DIR = _data_dir("tiny_shapes", "assets", "tiny-shapes")


def package_version() -> str:
    """The installed distribution's version, or pyproject.toml's in a source checkout."""
    try:
        return metadata.version("bwcache")
    except metadata.PackageNotFoundError:
        if not _in_checkout():
            return "0+unknown"
        import tomllib

        return tomllib.loads((_CHECKOUT / "pyproject.toml").read_text())["project"]["version"]
