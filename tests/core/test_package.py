"""The package pip installs: a wheel built from the tracked files carries the presets and the Tiny Shapes model,
and `python -m bwcache compare` runs from it in another directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from testing_utils.checkout import checkout_files

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    files = checkout_files()
    source = tmp_path_factory.mktemp("source")
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("bwcache-*.whl")
    return built


def test_the_wheel_declares_its_dependencies_and_carries_its_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    presets = {p.name for p in (ROOT / "presets").glob("*.json")}
    assert {f"bwcache/data/presets/{name}" for name in presets} <= names
    model = {p.name for p in (ROOT / "assets" / "tiny-shapes").iterdir() if p.is_file()}
    assert {f"bwcache/data/tiny_shapes/{name}" for name in model} <= names
    # Every module of the package, its subpackages' included (pyproject.toml lists the packages one by one).
    assert {name for name in checkout_files() if name.startswith("bwcache/") and name.endswith(".py")} <= names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    for package in ("torch", "diffusers", "accelerate", "ftfy", "numpy", "safetensors", "imageio-ffmpeg"):
        assert any(r.startswith(package) for r in requires), package
    assert any("gradio" in r and 'extra == "app"' in r for r in requires)


def test_the_installed_package_runs_compare_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", str(wheel), "--no-deps", "-q", "--target", str(target)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy is importable: not the checkout.
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-m", "bwcache", "compare", "--preset", "tiny-shapes", "--steps", "3", "--frames", "8",
         "--json", "run.json"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((elsewhere / "run.json").read_text())
    assert record["preset"] == "tiny-shapes"
    version = subprocess.run(
        [sys.executable, "-c", "import bwcache, importlib.metadata as m; print(bwcache.__file__, bwcache.__version__,"
         " m.version('bwcache'))"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert version[0].startswith(str(target))
    assert version[1] == version[2] == record["versions"]["bwcache"]
