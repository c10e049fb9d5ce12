"""BWCache under diffusers' context parallelism: 2 CPU processes (gloo), launched with torchrun.

Every case runs here in one process and in `tests/testing_utils/context_parallel_worker.py` on 2 ranks sharding the sequence
(see that file for how the CPU device mesh is built). Checked: both ranks record the same trace, take exactly the
single-process decisions, and give the single-process output; at δ = 0 the cached output equals the parallel
uncached output exactly. Each launch is bounded by a timeout, so a rank that hangs fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testing_utils.context_parallel_worker import WAN_STEPS, run_case

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parents[1] / "testing_utils" / "context_parallel_worker.py"
TIMEOUT = 300
SHAPES_PRESET = dict(threshold=0.3, mode="blockwise", reuse_interval=2, warmup_steps=3, tail_steps=2,
                     indicator_token_stride=4)


def torchrun(*arguments: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 ...`, killed with all its ranks after TIMEOUT seconds."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"a rank hung: the launch did not finish in {TIMEOUT} s\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)


# Distances summed shard by shard round differently from one process's sums (relative error ~1e-6 in float32), so
# a decision is only compared across processes where its distance is at least this far (relative) from δ.
CLEARANCE = 1e-3


def mid_run_threshold(trace: dict, earliest: int = 3) -> tuple[float, int]:
    """A δ that triggers paper mode at the same step k ≥ `earliest` in every branch, from a δ = 0 trace: above
    every branch's indicator at k, not above any indicator at steps 1..k−1, and clear of both."""
    branches = [b["indicator"] for b in trace["branches"].values()]
    for k in range(earliest, len(branches[0]) - 2):
        low = max(indicator[k] for indicator in branches)
        high = min(min(indicator[1:k]) for indicator in branches)
        if (high - low) > 2 * CLEARANCE * high:
            return (low + high) / 2, k
    raise AssertionError("no step where a threshold triggers every branch")


def distances(trace: dict) -> list[float]:
    return [v for b in trace["branches"].values() for row in b["distance"] for v in row if v is not None]


def clear_thresholds(trace: dict):
    """δ values between two neighbouring distances of a δ = 0 trace, nearest the median first, each clear of both."""
    values = sorted(set(v for v in distances(trace) if v > 0))
    median = statistics.median(values)
    gaps = [((a + b) / 2, b - a) for a, b in zip(values, values[1:])]
    for middle, width in sorted(gaps, key=lambda gap: abs(gap[0] - median)):
        if width > 2 * CLEARANCE * middle:
            yield middle


def clear_of(trace: dict, threshold: float, mode: str = "blockwise") -> bool:
    """Whether every value a run decided on (paper mode: the indicators; block-wise mode: the blocks' distances) is
    clear of δ, so that a process's rounding cannot flip the decision."""
    if mode == "paper":
        values = [v for b in trace["branches"].values() for v in b["indicator"] if v is not None]
    else:
        values = distances(trace)
    return all(abs(v - threshold) > CLEARANCE * threshold for v in values)


def reuses(trace: dict) -> int:
    return sum(sum(map(sum, b["reused"])) for b in trace["branches"].values())


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    """The cases with their thresholds, chosen from single-process δ = 0 runs to decide something mid-run."""
    wan_paper, wan_step = mid_run_threshold(run_case({"model": "wan", "config": {"threshold": 0.0}})["trace"])
    # Block-wise decisions after a reuse read distances the δ = 0 run never saw: take the first δ, nearest the
    # median distance, whose own single-process run decides on distances all clear of it.
    blockwise = {"threshold": 0.0, "mode": "blockwise", "warmup_steps": 2}
    wan_blockwise = next(
        delta for delta in clear_thresholds(run_case({"model": "wan", "config": blockwise})["trace"])
        if clear_of(run_case({"model": "wan", "config": {**blockwise, "threshold": delta}})["trace"], delta)
    )
    shapes_paper, shapes_step = mid_run_threshold(
        run_case({"model": "shapes", "config": {"threshold": 0.0, "indicator_token_stride": 4}})["trace"]
    )
    # Every 3rd token: the second process's shard (256 of 512 tokens) starts off the stride, at offset 2.
    shapes_stride3, _ = mid_run_threshold(
        run_case({"model": "shapes", "config": {"threshold": 0.0, "indicator_token_stride": 3}})["trace"]
    )
    assert 3 <= wan_step < WAN_STEPS - 2 and 3 <= shapes_step
    wan = {"model": "wan", "kind": "ulysses"}
    shapes = {"model": "shapes", "kind": "ulysses-anything"}  # its 3 heads do not split evenly over 2 processes
    listed = [
        dict(wan, name="wan-paper-cache-first", order="cache-first", config={"threshold": wan_paper}),
        dict(wan, name="wan-paper-parallel-first", order="parallel-first", config={"threshold": wan_paper}),
        dict(wan, name="wan-blockwise-cache-first", order="cache-first",
             config={"threshold": wan_blockwise, "mode": "blockwise", "warmup_steps": 2}),
        dict(wan, name="wan-blockwise-parallel-first", order="parallel-first",
             config={"threshold": wan_blockwise, "mode": "blockwise", "warmup_steps": 2}),
        dict(wan, name="wan-paper-zero", order="parallel-first", config={"threshold": 0.0}),
        dict(wan, name="wan-blockwise-zero", order="cache-first", config={"threshold": 0.0, "mode": "blockwise"}),
        dict(shapes, name="shapes-paper-cache-first", order="cache-first",
             config={"threshold": shapes_paper, "indicator_token_stride": 4}),
        dict(shapes, name="shapes-paper-stride-3", order="parallel-first",
             config={"threshold": shapes_stride3, "indicator_token_stride": 3}),
        dict(shapes, name="shapes-blockwise-parallel-first", order="parallel-first", config=SHAPES_PRESET),
        dict(shapes, name="shapes-blockwise-zero", order="cache-first", config={**SHAPES_PRESET, "threshold": 0.0}),
    ]
    for case in listed:
        case["reference"] = run_case(case)
        config = case["config"]
        if config["threshold"] > 0 and config.get("mode", "paper") != "static":
            assert clear_of(case["reference"]["trace"], config["threshold"], config.get("mode", "paper")), (
                f"{case['name']}: a decision sits within rounding of δ = {config['threshold']}")
    return listed


@pytest.fixture(scope="module")
def launched(cases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("context-parallel")
    cases_file = out / "cases.json"
    cases_file.write_text(json.dumps([{k: v for k, v in c.items() if k != "reference"} for c in cases]))
    result = torchrun(str(WORKER), str(cases_file), str(out))
    assert result.returncode == 0, result.stdout[-6000:]
    return out


def ranks(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(2)]


def assert_same_decisions(trace: dict, expected_trace: dict, name: str) -> None:
    """The same reuse decisions and triggers, and the same distances up to float rounding (sums over shards)."""
    assert trace["branches"].keys() == expected_trace["branches"].keys(), name
    for branch, expected in expected_trace["branches"].items():
        got = trace["branches"][branch]
        assert got["reused"] == expected["reused"], (name, branch)
        assert got["trigger_step"] == expected["trigger_step"], (name, branch)
        for key in ("indicator", "distance"):
            rows = [row if isinstance(row, list) else [row] for row in got[key]]
            expected_rows = [row if isinstance(row, list) else [row] for row in expected[key]]
            assert [[v is None for v in row] for row in rows] == [[v is None for v in row] for row in expected_rows]
            assert [v for row in rows for v in row if v is not None] == pytest.approx(
                [v for row in expected_rows for v in row if v is not None], rel=1e-5), (name, branch, key)


def test_every_rank_takes_the_single_process_decisions_and_gives_its_output(cases, launched):
    for case in cases:
        name, reference = case["name"], case["reference"]
        rank0, rank1 = ranks(launched, name)
        assert rank0["trace"] == rank1["trace"], name
        assert torch.equal(rank0["output"], rank1["output"]), name
        trace = rank0["trace"]
        assert trace["context_parallel"] == ("ulysses×2" if case["model"] == "wan" else "ulysses-anything×2")
        threshold = case["config"]["threshold"]
        total = sum(len(b["reused"]) for b in trace["branches"].values()) * trace["num_blocks"]
        if threshold > 0:
            # Each case decides something: some blocks reused, some computed.
            assert 0 < reuses(reference["trace"]) < total, name
        assert_same_decisions(trace, reference["trace"], name)
        torch.testing.assert_close(rank0["output"], reference["output"], rtol=1e-5, atol=1e-5)
        # Sharding itself is exact: the parallel uncached output is the single-process one.
        assert torch.equal(rank0["uncached"], reference["uncached"]), name
        if threshold == 0:
            assert reuses(trace) == 0
            assert torch.equal(rank0["output"], rank0["uncached"]), name


def test_a_mid_run_trigger_is_taken_at_the_same_step_on_every_rank(cases, launched):
    for case in cases:
        if case["config"].get("mode", "paper") != "paper" or case["config"]["threshold"] == 0:
            continue
        expected = {b: t["trigger_step"] for b, t in case["reference"]["trace"]["branches"].items()}
        assert all(3 <= step < WAN_STEPS - 2 for step in expected.values()), expected
        for result in ranks(launched, case["name"]):
            assert {b: t["trigger_step"] for b, t in result["trace"]["branches"].items()} == expected


def test_paper_mode_sums_distances_once_per_step_until_the_trigger(cases, launched):
    """One all-reduce per branch and computed step that measures (steps 1..k), none after the trigger k; with
    δ = 0 every step measures. (Wan cases: every token is measured, so no shard offsets are exchanged.)"""
    for case in cases:
        if case["model"] != "wan" or case["config"].get("mode", "paper") != "paper":
            continue
        expected = sum(
            len(b["indicator"]) - 1 if b["trigger_step"] is None else b["trigger_step"]
            for b in case["reference"]["trace"]["branches"].values()
        )
        for result in ranks(launched, case["name"]):
            assert result["all_reduces"] == expected, case["name"]


def test_blockwise_mode_sums_each_decision_and_the_rest_once_per_step(cases, launched):
    """A block that decides on its distance needs it summed before it runs (one all-reduce each: its input comes
    from the block before it in the same step); distances only recorded (δ = 0) share one all-reduce per step."""
    for case in cases:
        if case["model"] != "wan" or case["config"].get("mode") != "blockwise":
            continue
        branches = case["reference"]["trace"]["branches"].values()
        if case["config"]["threshold"] == 0:
            expected = sum(any(v is not None for v in row) for b in branches for row in b["distance"])
        else:
            # Every decision's distance is in the map, the reused blocks' included.
            expected = sum(v is not None for b in branches for row in b["distance"] for v in row)
            assert any(any(row) for b in branches for row in b["reused"])
        assert expected > 0
        for result in ranks(launched, case["name"]):
            assert result["all_reduces"] == expected, case["name"]


def test_bad_setups_get_clear_errors(launched):
    for rank in range(2):
        messages = json.loads((launched / f"errors.rank{rank}.json").read_text())
        assert "3 heads" in messages["heads"] and "ulysses-anything" in messages["heads"]
        assert "Ring attention" in messages["ring-backend"] and "'native'" in messages["ring-backend"]
        assert "9 tokens" in messages["sequence"] and "multiple of 2" in messages["sequence"]
        assert messages["group-gone"].startswith("RuntimeError") and "process group is gone" in messages["group-gone"]


def test_torchrun_compare_writes_once_and_matches_one_process(tmp_path):
    from bwcache.runner import run_comparison

    out = tmp_path / "run"
    arguments = ["--preset", "tiny-shapes", "--steps", "12", "--frames", "8"]
    result = torchrun("-m", "bwcache", "compare", *arguments, "--context-parallel", "ulysses-anything",
                      "--out-dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    # Rank 0 alone writes and prints.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["baseline.mp4", "bwcache.mp4", "side_by_side.mp4", "run.json", "trace.csv"]
    )
    assert result.stdout.count("wrote ") == 1
    record = json.loads((out / "run.json").read_text())
    assert record["context_parallel"] == {"kind": "ulysses-anything×2", "processes": 2}
    single = run_comparison("tiny-shapes", num_inference_steps=12, num_frames=8).record
    assert_same_decisions(record["trace"], single["trace"], "compare")
    assert record["psnr"] == pytest.approx(single["psnr"], abs=1e-3)


def test_the_readme_several_gpus_snippet_runs_under_torchrun(tmp_path):
    section = (ROOT / "README.md").read_text().split("## Several GPUs", 1)[1].split("\n## ", 1)[0]
    snippet = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippet) == 1
    script = tmp_path / "several_gpus.py"
    script.write_text(snippet[0])
    result = torchrun(str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    # Rank 0 alone prints the summary, which says how the run was sharded.
    assert result.stdout.count("BWCache (paper mode, δ=0.15") == 1
    assert "context parallel (ulysses-anything×2)" in result.stdout


def test_context_parallel_needs_torchrun(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bwcache", "compare", "--context-parallel", "ulysses", "--out-dir", str(tmp_path / "x")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "torchrun --nproc_per_node=N" in result.stderr
    assert not (tmp_path / "x").exists()


def test_the_sharded_benchmark_runs_on_two_processes(tmp_path):
    out = tmp_path / "cp.json"
    result = torchrun(str(ROOT / "benchmarks" / "gpu_cp.py"), "--tiny", "--steps", "6", "--repeats", "1",
                      "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    figures = json.loads(out.read_text())
    assert figures["processes"] == 2 and figures["context_parallel"] == "ulysses×2"
    rows = figures["cached"]
    # Forced paper schedule: one all-reduce per branch at step 1 (the trigger), none after; δ = 0: steps 1..5.
    assert rows["paper_forced"]["all_reduces_per_step"] == pytest.approx(2 / 6)
    assert rows["paper_every_step"]["all_reduces_per_step"] == pytest.approx(2 * 5 / 6)
    assert rows["blockwise_forced"]["all_reduces_per_step"] > rows["paper_every_step"]["all_reduces_per_step"]
    assert rows["paper_forced"]["reuse_fraction"] == 0.5


def test_uneven_shards_start_where_tensor_split_puts_them(monkeypatch):
    """The `anything` modes split L tokens as tensor_split does; every-n-th tokens then continue across shards."""
    from types import SimpleNamespace

    from bwcache import parallel

    uneven = SimpleNamespace(ulysses_anything=True, ring_anything=False, ulysses_degree=2, ring_degree=1)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda group: 2)
    picked = []
    for rank, shard in enumerate(torch.arange(9).tensor_split(2)):
        monkeypatch.setattr(parallel.dist, "get_rank", lambda group, rank=rank: rank)
        start = parallel.shard_start(None, len(shard), uneven, 9)
        picked += shard[-start % 2::2].tolist()
    assert picked == list(range(0, 9, 2))
    with pytest.raises(ValueError, match="uneven context-parallel split"):
        parallel.shard_start(None, 7, uneven, 9)
    with pytest.raises(ValueError, match="uneven context-parallel split"):
        parallel.check_strided_split(uneven, None)
