"""`python -m bwcache compare` as a user runs it: a real subprocess on the embedded model."""

import json
import subprocess
import sys
from pathlib import Path

from bwcache.video import probe_video

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "bwcache", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_compare_writes_the_record_and_playable_videos_and_never_overwrites(tmp_path):
    args = ["compare", "--preset", "tiny-shapes", "--prompt", "a red square moving right", "--threshold", "0.1",
            "--mode", "blockwise", "--seed", "3", "--steps", "8", "--frames", "8",
            "--json", str(tmp_path / "run.json"), "--out-dir", str(tmp_path / "out")]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "speedup" in done.stdout and "block evaluations skipped" in done.stdout
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["seed"] == 3 and record["settings"]["num_inference_steps"] == 8
    assert record["config"]["mode"] == "blockwise" and record["config"]["threshold"] == 0.1
    assert record["speedup"] > 0 and len(record["trace"]["branches"]["cond"]["reused"]) == 8
    for name in ("baseline.mp4", "bwcache.mp4"):
        info = probe_video(tmp_path / "out" / name)
        assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p" and info["n_frames"] == 8

    again = cli(*args, cwd=tmp_path)
    assert again.returncode == 2 and "Refusing to overwrite" in again.stderr
    assert json.loads((tmp_path / "run.json").read_text()) == record


def test_bad_input_is_a_clear_error(tmp_path):
    done = cli("compare", "--prompt", "a purple square moving right", cwd=tmp_path)
    assert done.returncode == 2 and "purple" in done.stderr and "vocabulary" in done.stderr
    done = cli("compare", "--threshold", "-1", cwd=tmp_path)
    assert done.returncode == 2 and "threshold must be a finite number ≥ 0" in done.stderr
    done = cli("compare", "--frames", "99", cwd=tmp_path)
    assert done.returncode == 2 and "num_frames = 99 is not allowed" in done.stderr
