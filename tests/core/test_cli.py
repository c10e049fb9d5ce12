"""`python -m bwcache compare` as a user runs it: a real subprocess on the embedded model."""

import json
import subprocess
import sys
from pathlib import Path

from bwcache.video import probe_video

ROOT = Path(__file__).resolve().parents[2]


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
    assert done.returncode == 2 and "δ (threshold) = -1 is outside the allowed range 0 to 1" in done.stderr
    done = cli("compare", "--frames", "99", cwd=tmp_path)
    assert done.returncode == 2 and "Frames = 99 is not allowed" in done.stderr


def test_bad_outputs_devices_and_ranges_are_refused_before_any_model_work(tmp_path, monkeypatch, capsys):
    """Each refusal comes before the model loads (loading would fail this test) and writes nothing."""
    from bwcache import cli as bwcache_cli
    from bwcache import pipelines

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipelines, "get_pipeline", no_model)
    monkeypatch.setattr(pipelines, "load_pipeline", no_model)
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        (["--out-dir", str(blocker)], "is a file; give a folder"),
        (["--out-dir", str(blocker / "run")], f"cannot be created: {blocker} is a file"),
        (["--json", str(tmp_path)], "is a folder; give a file path"),
        (["--json", str(blocker / "run.json")], f"cannot be created: {blocker} is a file"),
        (["--device", "gpu7"], "is not a device"),
        (["--device", "cuda:3"], "no CUDA GPU is available here"),
        (["--threshold", "1.5"], "δ (threshold) = 1.5 is outside the allowed range 0 to 1"),
        (["--steps", "4", "--reuse-interval", "9"], "R (reuse interval) = 9 is more than the 4 steps"),
        (["--profile", "turbo"], "Profile must be one of default, fast"),
        (["--extrapolation", "2"], "Extrapolation = 2 is outside the allowed range 0 to 1"),
        # Folders that cannot be made or written, as root too (the kernel's file systems refuse).
        (["--out-dir", "/proc/bwcache-run"], "--out-dir /proc/bwcache-run cannot be written"),
        (["--json", "/sys/bwcache/run.json"], "--json /sys/bwcache/run.json cannot be written"),
        (["--seed", str(10**308)], "got 100000000000000000000000000000000000000…"),
    ]
    for arguments, message in cases:
        assert bwcache_cli.main(["compare", *arguments]) == 2, arguments
        error = capsys.readouterr().err
        assert message in error and len(error) < 600, arguments
    bench_cases = [
        (["--out", str(blocker)], "--out " + str(blocker) + " is a file; give a folder"),
        (["--out", "/proc/bwcache-bench"], "--out /proc/bwcache-bench cannot be written"),
        (["--markdown", "/sys/bwcache.md"], "--markdown /sys/bwcache.md cannot be written"),
        (["--prompt-file", str(tmp_path / "missing.txt")], "missing.txt does not exist"),
        (["--prompt-file", str(blocker)], "holds no line"),
    ]
    for arguments, message in bench_cases:
        assert bwcache_cli.main(["bench", "--methods", "bw-default", *arguments]) == 2, arguments
        assert message in capsys.readouterr().err, arguments
    # Probing a new output folder leaves nothing behind.
    assert bwcache_cli.main(["compare", "--out-dir", str(tmp_path / "new" / "run"), "--frames", "99"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
