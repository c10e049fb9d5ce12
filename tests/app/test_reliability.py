"""The app as a dependable service, over HTTP: cancelled runs stop and write nothing, one run at a time holds the
pipeline, run folders are bounded, uploads are refused, and SIGTERM leaves no half-written folder."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

import app
from bwcache import ui

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
LONG = dict(prompt="a red square moving right", preset="tiny-shapes", threshold=0.3, seed=0, num_inference_steps=40,
            num_frames=16)
SHORT = dict(prompt="a blue circle moving up", preset="tiny-shapes", threshold=0.3, seed=1, num_inference_steps=4,
             num_frames=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    saved_root, app.OUTPUT_ROOT = app.OUTPUT_ROOT, tmp_path_factory.mktemp("outputs")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        yield url, Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))
    finally:
        app.demo.close()
        app.OUTPUT_ROOT = saved_root


def wait_until_free(timeout: float = 60) -> None:
    """Until no run holds the pipeline (a cancelled run stops at the end of its step under way)."""
    deadline = time.monotonic() + timeout
    while app.PIPELINE_LOCK.locked():
        assert time.monotonic() < deadline, "a cancelled run kept the pipeline"
        time.sleep(0.05)


def test_cancel_then_the_next_request_succeeds_and_nothing_is_written(server):
    _, client = server
    client.predict(**SHORT, api_name="/compare")  # the pipeline is loaded
    for delay in (0.2, 1.0, 2.5):
        before = set(run_folders(app.OUTPUT_ROOT))
        job = client.submit(**LONG, api_name="/compare")
        time.sleep(delay)
        job.cancel()
        result = client.predict(**SHORT, api_name="/compare")
        assert result[4]["prompt"] == SHORT["prompt"] and result[4]["settings"]["num_inference_steps"] == 4
        wait_until_free()
        new = set(run_folders(app.OUTPUT_ROOT)) - before
        # Only the request that ran to its end wrote a folder, and it holds that request's run.
        assert len(new) == 1, (delay, new)
        record = json.loads((new.pop() / "run.json").read_text())
        assert (record["prompt"], record["seed"]) == (SHORT["prompt"], SHORT["seed"]), delay
        assert not [p for p in app.OUTPUT_ROOT.iterdir() if p.name.startswith(ui.PARTIAL_PREFIX)]


def test_run_folders_are_bounded_oldest_first(server, monkeypatch):
    _, client = server
    monkeypatch.setattr(app, "MAX_RUNS", 2)
    # Gradio's copies of the files it serves are bounded too: before each run the cache keeps its newest 6 entries,
    # then the run adds its own (fewer than 12).
    monkeypatch.setattr(app, "MAX_CACHED_FILES", 6)
    cached = []
    for seed in range(4):
        client.predict(**{**SHORT, "seed": seed}, api_name="/compare")
        cached.append(len(list(Path(app.demo.GRADIO_CACHE).iterdir())))
    kept = run_folders(app.OUTPUT_ROOT)
    assert [json.loads((p / "run.json").read_text())["seed"] for p in kept] == [2, 3]
    assert max(cached[1:]) < 6 + 12, cached


def test_a_large_upload_is_refused(server):
    url, _ = server
    response = httpx.post(url + "gradio_api/upload", files={"files": ("big.bin", b"\0" * (50 * 1024 * 1024))},
                          timeout=120)
    assert response.status_code == 413, response.text[:200]


def test_max_runs_comes_from_the_environment():
    assert ui.max_runs({}) == 50 and ui.max_runs({"BWCACHE_MAX_RUNS": "3"}) == 3
    for bad in ("0", "many"):
        with pytest.raises(ValueError, match="BWCACHE_MAX_RUNS must be a whole number ≥ 1"):
            ui.max_runs({"BWCACHE_MAX_RUNS": bad})


def test_sigterm_leaves_no_half_written_folder(tmp_path):
    outputs = tmp_path / "outputs"
    leftover = outputs / (ui.PARTIAL_PREFIX + "20260101-000000-run-deadbeef")
    leftover.mkdir(parents=True)
    (leftover / "baseline.mp4").write_bytes(b"half")
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "BWCACHE_OUTPUT_DIR": str(outputs), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the app did not start"
            time.sleep(0.5)
        # Left over from a process that stopped while saving: gone at start-up.
        assert not leftover.exists()
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        client.submit(**LONG, api_name="/compare")
        time.sleep(2.0)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert run_folders(outputs) == []
