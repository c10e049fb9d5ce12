"""`calibrate`: the BWCache settings that meet a user's target on their own pipeline, chosen by measurement.

1. Pilots: one uncached run per calibration prompt, traced at δ = 0 (every block's distance at every step: the
   output is bit-identical to an uncached run, so the pilot's video is the reference every candidate is scored
   against). The first pilot also measures the DiT blocks' share of the time (for the ideal speedup).
2. Candidates across the modes and their knobs (`bwcache.calibrate.candidates`), each ranked without running it: the
   compute it would skip (exact in paper and static mode, estimated in block-wise mode) and a fidelity proxy from the
   pilots' distances. The speed–proxy frontier is what the search walks.
3. Verification: a candidate runs cached on every calibration prompt, after one plain uncached run (the rounds
   interleave uncached and cached runs, so a load that comes and goes touches both), and is scored by PSNR and SSIM
   against the pilot's video and by the speedup against the round's uncached run. The next candidate is aimed with
   a fit of the measured PSNR against the proxy (or of the achieved against the ideal speedup), inside the bracket
   the measurements left, then the search narrows around the best point (other extrapolations, candidates off the
   frontier).
4. The choice is by measurement: for a PSNR target the candidate meeting it that skipped the most compute (exact
   from its runs' traces, which a busy machine cannot disturb), for a speedup target the one meeting it (median over
   its runs) with the highest PSNR. Leftover budget times the choice in more interleaved pairs.

The budget counts cached generations; the pilots and the uncached timing runs come on top and are reported.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..apply import cached
from ..config import BWCacheConfig
from ..instruments import block_timer, synchronize
from ..metrics import psnr as video_psnr
from ..metrics import ssim as video_ssim
from ..policies import distance_map_config
from ..runner import RunCancelled, json_number, timing_flag
from ..tuning import ideal_speedup
from . import profile as profile_file
from .candidates import PROXY_SLOPE, Candidate, candidate_configs, config_key, frontier, rank

DEFAULT_BUDGET = 12
BUDGET_RANGE = (1, 100)
PSNR_RANGE = (10.0, 80.0)
# Above 1 and at most this: no schedule here skips more than about 90% of the block compute.
SPEEDUP_MAX = 10.0
# Call arguments the calibration sets itself.
RESERVED_CALL_ARGUMENTS = ("generator", "callback_on_step_end")
# Interleaved (uncached, cached) pairs kept for the chosen config at the end, and the most it gets when the search
# leaves more budget.
FINAL_PAIRS = 2
MAX_FINAL_PAIRS = 6
# dB the search aims above a PSNR target (the proxy's fit has a spread of about 2 dB).
PSNR_MARGIN = 1.0
# The achieved share of the ideal speedup assumed before any run measured it.
PRIOR_ACHIEVED = 0.85

Progress = Callable[[float, str], None]


def check_targets(target_psnr=None, target_speedup=None, budget=DEFAULT_BUDGET, names: Mapping[str, str] | None = None):
    """Refuse a missing, doubled or out-of-range target or budget, naming the field and its range; `names` renames
    the fields (the command line's flags)."""
    names = {"target_psnr": "target_psnr", "target_speedup": "target_speedup", "budget": "budget", **(names or {})}
    psnr_text = f"{names['target_psnr']} (dB, {PSNR_RANGE[0]:g} to {PSNR_RANGE[1]:g})"
    speed_text = f"{names['target_speedup']} (×, above 1 and at most {SPEEDUP_MAX:g})"
    if (target_psnr is None) == (target_speedup is None):
        raise ValueError(f"Give one target: {psnr_text} or {speed_text}.")
    if target_psnr is not None and not (_real(target_psnr) and PSNR_RANGE[0] <= target_psnr <= PSNR_RANGE[1]):
        raise ValueError(f"{names['target_psnr']} must be a number of dB from {PSNR_RANGE[0]:g} to "
                         f"{PSNR_RANGE[1]:g}, got {target_psnr!r}.")
    if target_speedup is not None and not (_real(target_speedup) and 1 < target_speedup <= SPEEDUP_MAX):
        raise ValueError(f"{names['target_speedup']} must be a speedup above 1 and at most {SPEEDUP_MAX:g}, "
                         f"got {target_speedup!r}.")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not (
            BUDGET_RANGE[0] <= budget <= BUDGET_RANGE[1]):
        raise ValueError(f"{names['budget']} must be a whole number of cached generations from {BUDGET_RANGE[0]} to "
                         f"{BUDGET_RANGE[1]}, got {budget!r}.")


def _real(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------ the pipeline calls


def prompt_calls(prompts) -> tuple[list[dict], list[str]]:
    """Each calibration prompt as the call arguments it adds (a text is `prompt=`; a mapping is taken as it is, e.g.
    precomputed `prompt_embeds`), and a label for each."""
    if isinstance(prompts, (str, Mapping)):
        prompts = [prompts]
    try:
        prompts = list(prompts)
    except TypeError:
        raise ValueError("prompts must be a prompt or a list of prompts (texts, or mappings of call arguments).") from None
    if not prompts:
        raise ValueError("prompts is empty: give at least one calibration prompt.")
    calls, labels = [], []
    for k, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"prompts[{k}] is empty; write a prompt.")
            calls.append({"prompt": prompt.strip()})
            labels.append(prompt.strip())
        elif isinstance(prompt, Mapping):
            calls.append(dict(prompt))
            text = prompt.get("prompt")
            labels.append(text if isinstance(text, str) else f"prompt {k + 1}")
        else:
            raise ValueError(f"prompts[{k}] must be a text or a mapping of call arguments, got {type(prompt).__name__}.")
    return calls, labels


def _accepts(pipe, name: str) -> bool:
    try:
        parameters = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return True
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _execution_device(pipe) -> str:
    device = getattr(pipe, "_execution_device", None)
    if device is None:
        device = next(pipe.transformer.parameters()).device
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


def output_frames(output) -> np.ndarray:
    """The first video of a pipeline's output as a float32 array (a video is (frames, height, width, 3) in [0, 1]; a
    latent output keeps its own layout)."""
    frames = output.frames if hasattr(output, "frames") else output[0]
    frames = frames[0]
    if isinstance(frames, torch.Tensor):
        return frames.detach().float().cpu().numpy()
    if isinstance(frames, (list, tuple)) and frames and not isinstance(frames[0], (np.ndarray, torch.Tensor)):
        return np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in frames])  # PIL images
    return np.asarray(frames, dtype=np.float32)


class _Session:
    """The user's pipeline with the calibration's calls: one seed per prompt, timed, cancellable, with progress."""

    def __init__(self, pipe, calls: list[dict], labels: list[str], call_kwargs: dict, seed: int, device: str | None,
                 progress: Progress | None, cancel, planned: int):
        reserved = sorted(set(call_kwargs) & set(RESERVED_CALL_ARGUMENTS))
        if reserved:
            raise ValueError(f"calibrate sets {', '.join(reserved)} itself (give seed= for the seed); leave "
                             f"{'it' if len(reserved) == 1 else 'them'} out of the call arguments.")
        self.pipe, self.calls, self.labels, self.seed = pipe, calls, labels, seed
        self.kwargs = dict(call_kwargs)
        if "output_type" not in self.kwargs and _accepts(pipe, "output_type"):
            self.kwargs["output_type"] = "np"
        self.device = device or _execution_device(pipe)
        self.callback = _accepts(pipe, "callback_on_step_end")
        self.progress, self.cancel = progress, cancel
        self.started = time.perf_counter()
        self.counts = {"pilot": 0, "uncached": 0, "cached": 0}
        self.planned = max(1, planned)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def run(self, p: int, kind: str, what: str) -> tuple[np.ndarray, float]:
        """Generation of prompt `p`: (frames, seconds)."""
        kwargs = {**self.kwargs, **self.calls[p], "generator": torch.Generator("cpu").manual_seed(self.seed + p)}
        steps = kwargs.get("num_inference_steps")
        if self.callback:
            def on_step(pipeline, step, timestep, callback_kwargs):
                if self.cancel is not None and self.cancel.is_set():
                    raise RunCancelled(f"calibration cancelled during {what}, after step {step + 1}")
                self._report(f"{what}: step {step + 1}" + (f"/{steps}" if steps else ""), step + 1, steps)
                return callback_kwargs

            kwargs["callback_on_step_end"] = on_step
        if self.cancel is not None and self.cancel.is_set():
            raise RunCancelled(f"calibration cancelled before {what}")
        synchronize(self.device)
        start = time.perf_counter()
        output = self.pipe(**kwargs)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        self.counts[kind] += 1
        self._report(what, None, None)
        return output_frames(output), seconds

    def _report(self, what: str, step: int | None, steps: int | None) -> None:
        if self.progress is None:
            return
        done = self.done + (step / steps if step and steps else 0.0)
        self.planned = max(self.planned, self.done + 1)
        elapsed = time.perf_counter() - self.started
        left = max(self.planned - done, 0.0) * elapsed / done if done else None
        eta = f", about {_duration(left)} left" if left is not None else ""
        self.progress(min(done / self.planned, 1.0), f"{what} · {_duration(elapsed)} elapsed{eta}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------------ scoring


def score(reference: np.ndarray, frames: np.ndarray) -> dict:
    """PSNR and SSIM of `frames` against `reference`: on videos, as `bwcache.metrics` computes them; on other
    outputs (latents), PSNR over the reference's value range and no SSIM."""
    identical = bool(np.array_equal(reference, frames))
    if identical:
        return {"psnr": math.inf, "ssim": 1.0, "identical": True}
    video = reference.ndim == 4 and reference.shape[-1] == 3 and float(reference.min()) >= 0 and float(reference.max()) <= 1
    if video:
        value = video_psnr(reference, frames)
        similarity = video_ssim(reference, frames) if min(reference.shape[1:3]) >= 11 else None
        return {"psnr": value, "ssim": similarity, "identical": False}
    span = float(reference.max() - reference.min()) or 1.0
    mse = float(np.mean((reference.astype(np.float64) - frames.astype(np.float64)) ** 2))
    return {"psnr": 10 * math.log10(span * span / mse) if mse > 0 else math.inf, "ssim": None, "identical": False}


# ------------------------------------------------------------------------------------------------ the result


@dataclass
class Calibration:
    """What `calibrate` found: the chosen config, every candidate measured, and the setting it holds for.

    `config` is the chosen config (None when nothing could be measured); `met` says whether it meets the target on the
    calibration prompts, and `message` says so in words, with what to do when it does not (`recommendation`:
    "bwcache", or "uncached" when no candidate met the target). `chosen` holds its figures, `candidates` every
    candidate measured (config, speedup with its range, PSNR and SSIM against the uncached video, compute skipped,
    per-prompt figures), `frontier` the measured speed–PSNR frontier, `setting` what the figures hold for
    (transformer class and config, steps, size, frames, guidance, dtype, scheduler class).
    """

    config: BWCacheConfig | None
    met: bool
    message: str
    target: dict
    recommendation: str
    chosen: dict | None
    candidates: list[dict]
    frontier: list[dict]
    setting: dict
    prompts: list[str]
    uncached_seconds: dict
    block_share: float | None
    generations: dict
    ranked: int
    seconds: float
    phases: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        config = self.config
        steps = self.setting.get("num_inference_steps")
        return {
            "format": profile_file.FORMAT,
            "version": profile_file.VERSION,
            "bwcache": profile_file.profile_settings(config) if config is not None else None,
            "fractions": profile_file.step_fractions(config, steps) if config is not None and steps else {},
            "setting": self.setting,
            "target": self.target,
            "met": self.met,
            "message": self.message,
            "recommendation": self.recommendation,
            "measured": _figures(self.chosen) if self.chosen else {},
            "frontier": self.frontier,
            "candidates": self.candidates,
            "prompts": self.prompts,
            "uncached_seconds": self.uncached_seconds,
            "block_share": self.block_share,
            "generations": self.generations,
            "ranked": self.ranked,
            "seconds": self.seconds,
            "phases": self.phases,
            "notes": self.notes,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        }

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the profile file (`bwcache.calibrate.profile`): the settings, the setting they were measured for, the
        measured frontier and every candidate. An existing file is replaced only with `overwrite`."""
        path = Path(path)
        if not profile_file.is_profile_path(path):
            raise ValueError(f"A profile file's name ends in .json, got {path}.")
        if self.config is None:
            raise ValueError(f"Nothing to save: {self.message}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"Refusing to overwrite {path}; pass overwrite=True (--overwrite) or choose another path.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False))
        return path

    def summary(self) -> str:
        """The result in a few lines of plain text."""
        target = _target_text(self.target)
        lines = [("Met" if self.met else "NOT met") + f": {target}. {self.message}"]
        if self.chosen:
            lines.append(f"  chosen: {self.chosen['label']}")
            lines.append(f"  measured: {_point_text(self.chosen)}")
        u = self.uncached_seconds
        if u.get("median") is not None:
            lines.append(f"  uncached generation {u['median']:.2f} s (range {u['min']:.2f}–{u['max']:.2f}, "
                         f"{u['runs']} runs)")
        g = self.generations
        lines.append(f"  {len(self.candidates)} of {self.ranked} ranked candidates measured; generations: "
                     f"{g['pilot']} pilots, {g['uncached']} uncached timing runs, {g['cached']} cached "
                     f"(budget {g['budget']}); {self.seconds:.0f} s in all")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _target_text(target: dict) -> str:
    if "psnr" in target:
        return f"PSNR ≥ {target['psnr']:g} dB on the calibration prompts"
    return f"speedup ≥ {target['speedup']:g}× on the calibration prompts"


def _point_text(point: dict) -> str:
    quality = "identical to uncached" if point.get("identical") else (
        f"{point['psnr']:.2f} dB" if point.get("psnr") is not None else "PSNR n/a")
    ssim = f", SSIM {point['ssim']:.4f}" if point.get("ssim") is not None else ""
    return (f"{point['speedup']:.2f}× (range {point['speedup_min']:.2f}–{point['speedup_max']:.2f}, ideal "
            f"{point['ideal_speedup']:.2f}×), {quality}{ssim}, {point['skipped']:.1%} of block compute skipped")


def _figures(point: dict) -> dict:
    keys = ("speedup", "speedup_min", "speedup_max", "ideal_speedup", "timing_flag", "psnr", "psnr_min", "ssim",
            "identical", "skipped")
    return {key: point.get(key) for key in keys}


def describe(config: BWCacheConfig) -> str:
    """A config in a few words."""
    r = "10% of the steps" if config.reuse_interval is None else str(config.reuse_interval)
    if config.mode == "paper":
        text = f"paper mode δ={config.threshold:g}, R={r}, tail {config.tail_fraction:g}·k"
    else:
        text = (f"{'block-wise' if config.mode == 'blockwise' else 'static'} mode"
                + (f" δ={config.threshold:g}" if config.mode == "blockwise" else "")
                + f", R={r}, warm-up {config.warmup_steps}, tail {config.tail_steps}")
        if config.indicator_blocks not in (None, "all"):
            text += f", blocks {config.indicator_blocks if isinstance(config.indicator_blocks, str) else list(config.indicator_blocks)}"
    if config.extrapolation:
        text += f", extrapolation {config.extrapolation:g}"
    if config.cache_dtype:
        text += f", stored as {config.cache_dtype}"
    return text


# ------------------------------------------------------------------------------------------------ calibrate


def calibrate(pipe, prompts, *, target_psnr: float | None = None, target_speedup: float | None = None,
              budget: int = DEFAULT_BUDGET, seed: int = 0, base: BWCacheConfig | None = None,
              modes: Sequence[str] = ("paper", "static", "blockwise"), device: str | None = None,
              progress: Progress | None = None, cancel=None, setting: Mapping[str, Any] | None = None,
              **call_kwargs) -> Calibration:
    """The BWCache settings that meet a target on this pipeline, as it is (its scheduler, LoRAs, offloading, …).

    `prompts`: the calibration prompts, texts (`prompt=`) or mappings of call arguments (precomputed embeddings).
    Give one target: `target_psnr` (dB against the uncached video, mean over the prompts; the fastest settings that
    keep it) or `target_speedup` (median over the timed runs; the most faithful settings that reach it). `budget`:
    the most cached generations to run (the pilots, one per prompt, and the uncached timing runs come on top; with
    fewer than one per prompt, the first `budget` prompts are used). `call_kwargs` go to every call
    (`num_inference_steps`, `height`, `guidance_scale`, …); prompt `p` runs with seed `seed + p`. `base` gives the
    storage (`cache_dtype`) and token stride every candidate keeps; `modes` the modes tried. `progress(fraction, text)`
    hears of each step with the time left; `cancel` (a `threading.Event`) stops it: `RunCancelled`.

    The calibration is only as good as its prompts: it promises the target on them, not on every prompt.
    """
    check_targets(target_psnr, target_speedup, budget)
    calls, labels = prompt_calls(prompts)
    notes = []
    if budget < len(calls):
        notes.append(f"The budget of {budget} cached generations covers {budget} of the {len(calls)} prompts: "
                     f"calibrated on the first {budget}.")
        calls, labels = calls[:budget], labels[:budget]
    base = base or BWCacheConfig()
    target = {"psnr": float(target_psnr)} if target_psnr is not None else {"speedup": float(target_speedup)}
    n = len(calls)
    session = _Session(pipe, calls, labels, call_kwargs, seed, device, progress, cancel,
                       planned=n + budget + max(1, budget // n) + FINAL_PAIRS)
    started = time.perf_counter()

    # 1. Pilots: the reference videos and the distance maps.
    pilot_config = distance_map_config(dataclasses.replace(
        base, mode="blockwise", indicator_blocks=None, indicator_feature="hidden_states", threshold=0.0,
        extrapolation=0.0, num_inference_steps=None))
    traces, references, block_share = [], [], None
    for p in range(n):
        timer = _block_timer(pipe, session.device) if p == 0 else None
        try:
            with cached(pipe, pilot_config) as handle:
                frames, seconds = session.run(p, "pilot", f"pilot {p + 1}/{n} (uncached, traced)")
        finally:
            if timer is not None:
                timer.remove()
        if timer is not None and seconds > 0:
            block_share = min(1.0, timer.seconds / seconds)
        traces.append(handle.trace.to_dict())
        references.append(frames)
    pilots_done = time.perf_counter()
    steps = _steps(traces)
    described = {**describe_setting(pipe, {**session.kwargs, **calls[0]}, steps, references[0]), **(setting or {})}

    # 2. Candidates, ranked without running.
    base = dataclasses.replace(base, num_inference_steps=steps)
    candidates = rank(candidate_configs(traces, base, steps, tuple(modes)), traces)
    front = frontier(candidates)
    ranked_done = time.perf_counter()

    search = _Search(session, references, traces, candidates, front, target, budget, block_share, base)
    if not front:
        search.notes.append(f"With {steps} steps no schedule reuses anything: the warm-up and tail take every step.")
    else:
        search.run()
    verified = time.perf_counter()
    result = search.result()
    return Calibration(
        config=result["config"], met=result["met"], message=result["message"], target=target,
        recommendation="bwcache" if result["met"] else "uncached", chosen=result["chosen"],
        candidates=search.measured, frontier=measured_frontier(search.measured), setting=described, prompts=labels,
        uncached_seconds=search.uncached_figures(), block_share=block_share,
        generations={**session.counts, "budget": budget}, ranked=len(candidates),
        seconds=time.perf_counter() - started,
        phases={"pilots": pilots_done - started, "ranking": ranked_done - pilots_done,
                "verification": verified - ranked_done},
        notes=notes + search.notes,
    )


def _block_timer(pipe, device):
    try:
        return block_timer(pipe, device)
    except Exception:  # a pipeline whose blocks cannot be timed still calibrates (ideal speedups assume share 1)
        return None


def _steps(traces: list[dict]) -> int:
    lengths = {len(branch["distance"]) for trace in traces for branch in trace["branches"].values()}
    if not lengths:
        raise ValueError("The pilot recorded no denoising step: is this a diffusion pipeline with a transformer?")
    return max(lengths)


def describe_setting(pipe, kwargs: Mapping[str, Any], steps: int, frames: np.ndarray) -> dict:
    """What a calibration holds for: the transformer's class and config, the pipeline's and scheduler's classes, the
    dtype, the steps, the size, the frames and the guidance."""
    from diffusers.utils.torch_utils import unwrap_module

    transformer = unwrap_module(pipe.transformer)
    config = json.loads(json.dumps(dict(getattr(transformer, "config", {})), default=str))
    video = frames.ndim == 4 and frames.shape[-1] == 3
    defaults = getattr(pipe, "defaults", {}) if isinstance(getattr(pipe, "defaults", None), Mapping) else {}

    def pick(*names, from_video=None):
        for name in names:
            if kwargs.get(name) is not None:
                return kwargs[name]
        if from_video is not None and video:
            return int(from_video)
        for name in names:
            if defaults.get(name) is not None:
                return defaults[name]
        return None

    guidance = kwargs.get("guidance_scale", getattr(pipe, "_guidance_scale", None))
    return {
        "transformer_class": type(transformer).__name__,
        "transformer_config": {k: v for k, v in config.items() if not str(k).startswith("_")},
        "pipeline_class": type(pipe).__name__,
        "scheduler_class": type(pipe.scheduler).__name__ if getattr(pipe, "scheduler", None) is not None else None,
        "dtype": str(transformer.dtype).removeprefix("torch."),
        "num_inference_steps": steps,
        "height": pick("height", from_video=frames.shape[1] if video else None),
        "width": pick("width", from_video=frames.shape[2] if video else None),
        "num_frames": pick("num_frames", "video_length", from_video=frames.shape[0] if video else None),
        "guidance_scale": float(guidance) if _real(guidance) else None,
    }


def measured_frontier(points: list[dict]) -> list[dict]:
    """The measured points no other beats on both speed and PSNR, fastest last."""
    usable = [p for p in points if p.get("speedup") is not None]
    kept = []
    for point in usable:
        quality = math.inf if point.get("identical") else (point.get("psnr") or -math.inf)
        dominated = any(
            other is not point and other["speedup"] >= point["speedup"]
            and (math.inf if other.get("identical") else (other.get("psnr") or -math.inf)) >= quality
            and (other["speedup"] > point["speedup"]
                 or (math.inf if other.get("identical") else (other.get("psnr") or -math.inf)) > quality)
            for other in usable)
        if not dominated:
            kept.append({"label": point["label"], "config": point["config"], **_figures(point)})
    return sorted(kept, key=lambda p: p["speedup"])


class _Search:
    """The verification: which candidates run, in what order, and what the measurements say."""

    def __init__(self, session: _Session, references, traces, candidates: list[Candidate], front: list[Candidate],
                 target: dict, budget: int, block_share: float | None, base: BWCacheConfig):
        self.session, self.references, self.traces = session, references, traces
        self.candidates, self.front, self.target, self.budget = candidates, front, target, budget
        self.block_share, self.base = block_share, base
        self.n = len(references)
        self.measured: list[dict] = []
        self._by_key: dict[tuple, dict] = {}
        self.uncached: list[float] = []
        self.notes: list[str] = []
        self.rounds = 0
        self.reserve = min(FINAL_PAIRS, budget // 6)
        # Candidates made while narrowing (other extrapolations of a measured schedule).
        self._extra: list[Candidate] = []

    # -- budget and runs

    @property
    def left(self) -> int:
        return self.budget - self.session.counts["cached"]

    def measure(self, candidate: Candidate, phase: str) -> dict:
        """One round: an uncached run, then the candidate on every prompt."""
        known = self._by_key.get(candidate.key)
        if known is not None:
            return known
        p0 = self.rounds % self.n
        self.rounds += 1
        _, plain = self.session.run(p0, "uncached", f"round {self.rounds}: uncached timing run")
        self.uncached.append(plain)
        per_prompt, speedups = [], []
        for p in range(self.n):
            with cached(self.session.pipe, candidate.config) as handle:
                frames, seconds = self.session.run(p, "cached", f"round {self.rounds}: {describe(candidate.config)}, "
                                                   f"prompt {p + 1}/{self.n}")
            quality = score(self.references[p], frames)
            speedups.append(plain / seconds)
            per_prompt.append({"prompt": self.session.labels[p], "psnr": json_number(quality["psnr"]),
                               "ssim": json_number(quality["ssim"]), "identical": quality["identical"],
                               "skipped": handle.trace.reuse_fraction, "seconds": seconds,
                               "uncached_seconds": plain, "speedup": plain / seconds})
        point = {"label": describe(candidate.config), "config": candidate.config.to_dict(), "phase": phase,
                 "predicted_skipped": candidate.predicted_skipped, "proxy": candidate.proxy,
                 "skipped_exact": candidate.exact, "per_prompt": per_prompt, "speedup_runs": speedups}
        self._summarise(point)
        self.measured.append(point)
        self._by_key[candidate.key] = point
        return point

    def _summarise(self, point: dict) -> None:
        per = point["per_prompt"]
        finite = [p["psnr"] for p in per if p["psnr"] is not None]
        identical = all(p["identical"] for p in per)
        ssims = [p["ssim"] for p in per if p["ssim"] is not None]
        runs = point["speedup_runs"]
        point.update(
            psnr=None if identical or not finite else float(np.mean(finite)),
            psnr_min=None if identical or not finite else float(min(finite)),
            identical=identical,
            ssim=float(np.mean(ssims)) if ssims else None,
            skipped=float(np.mean([p["skipped"] for p in per])),
            speedup=float(statistics.median(runs)), speedup_min=float(min(runs)), speedup_max=float(max(runs)),
            seconds=float(statistics.median([p["seconds"] for p in per])),
        )
        point["ideal_speedup"] = ideal_speedup(point["skipped"], self.block_share if self.block_share else 1.0)
        point["timing_flag"] = timing_flag(point["speedup"], point["ideal_speedup"], point["skipped"])
        point["meets"] = self.meets(point)

    def meets(self, point: dict) -> bool:
        if "psnr" in self.target:
            return point["identical"] or (point["psnr"] is not None and point["psnr"] >= self.target["psnr"])
        return point["speedup"] >= self.target["speedup"]

    def time_pairs(self, point: dict, pairs: int) -> None:
        """More interleaved (uncached, cached) pairs of a measured point, on prompt after prompt."""
        config = BWCacheConfig.from_dict(_config_values(point["config"]))
        for k in range(pairs):
            p = k % self.n
            _, plain = self.session.run(p, "uncached", f"timing pair {k + 1}/{pairs}: uncached")
            self.uncached.append(plain)
            with cached(self.session.pipe, config):
                _, seconds = self.session.run(p, "cached", f"timing pair {k + 1}/{pairs}: {point['label']}")
            point["speedup_runs"].append(plain / seconds)
        self._summarise(point)

    def uncached_figures(self) -> dict:
        if not self.uncached:
            return {"median": None, "min": None, "max": None, "runs": 0}
        return {"median": statistics.median(self.uncached), "min": min(self.uncached), "max": max(self.uncached),
                "runs": len(self.uncached)}

    # -- the search

    def run(self) -> None:
        if "psnr" in self.target:
            self._bracket_psnr(self.reserve)
        else:
            self._bracket_speed(self.reserve)
        self._narrow()
        chosen = self._choose()
        if chosen is not None and self.left > 0:
            self.time_pairs(chosen, min(self.left, MAX_FINAL_PAIRS))

    def _predicted_psnr(self, candidate: Candidate) -> float | None:
        """PSNR ≈ a − b·log10(proxy), fitted to the measured points (the slope measured on the embedded model until
        two points disagree on it)."""
        points = [(math.log10(max(p["proxy"], 1e-12)), p["psnr"]) for p in self.measured
                  if p["psnr"] is not None and p["proxy"] > 0]
        if not points:
            return None
        slope = PROXY_SLOPE
        xs = [x for x, _ in points]
        if len(points) >= 2 and max(xs) - min(xs) > 0.05:
            fitted = -np.polyfit(xs, [y for _, y in points], 1)[0]
            slope = float(np.clip(fitted, PROXY_SLOPE / 2, PROXY_SLOPE * 2))
        intercept = float(np.mean([y + slope * x for x, y in points]))
        return intercept - slope * math.log10(max(candidate.proxy, 1e-12))

    def _achieved(self) -> float:
        ratios = [p["speedup"] / p["ideal_speedup"] for p in self.measured if p["ideal_speedup"] and p["skipped"] > 0]
        return float(statistics.median(ratios)) if ratios else PRIOR_ACHIEVED

    def _bracket_psnr(self, reserve: int) -> None:
        """The most compute-skipping frontier point that keeps the PSNR target: lo passes, hi fails."""
        goal = self.target["psnr"]
        lo, hi = -1, len(self.front)
        while hi - lo > 1 and self.left - reserve >= self.n:
            inside = range(lo + 1, hi)
            guesses = [(j, self._predicted_psnr(self.front[j])) for j in inside]
            if guesses[0][1] is None:
                j = (lo + hi) // 2
            else:
                aimed = [j for j, value in guesses if value >= goal + PSNR_MARGIN]
                j = aimed[-1] if aimed else lo + 1
            point = self.measure(self.front[j], "search")
            if point["meets"]:
                lo = j
            else:
                hi = j
        self._edge = (lo, hi)

    def _bracket_speed(self, reserve: int) -> None:
        """The least compute-skipping (most faithful) frontier point that reaches the speedup: lo fails, hi passes."""
        goal = self.target["speedup"]
        lo, hi = -1, len(self.front)
        while hi - lo > 1 and self.left - reserve >= self.n:
            achieved = self._achieved()
            share = self.block_share if self.block_share else 1.0
            aimed = [j for j in range(lo + 1, hi)
                     if achieved * ideal_speedup(self.front[j].predicted_skipped, share) >= goal * 1.03]
            j = aimed[0] if aimed else hi - 1
            point = self.measure(self.front[j], "search")
            if point["meets"]:
                hi = j
            else:
                lo = j
        self._edge = (lo, hi)

    def _narrow(self) -> None:
        """Around the best point: the same schedules with other extrapolations, and, for a PSNR target, candidates off
        the frontier that skip more than the best point measured, the most faithful by the proxy first."""
        tried = 0
        while self.left - self.reserve >= self.n and tried < 3:
            candidate = self._next_narrowing()
            if candidate is None:
                return
            self.measure(candidate, "narrowing")
            tried += 1

    def _next_narrowing(self) -> Candidate | None:
        best = self._choose()
        pool: list[Candidate] = []
        if "psnr" in self.target:
            lo, hi = self._edge
            anchors = [self.front[hi]] if hi < len(self.front) else []
            pool += self._variants(anchors)
            floor = best["skipped"] if best is not None else 0.0
            goal = self.target["psnr"]
            off = [c for c in self.candidates if c.predicted_skipped > floor + 1e-9 and c.key not in self._by_key]
            off = [c for c in off if (self._predicted_psnr(c) or -math.inf) >= goal]
            pool += sorted(off, key=lambda c: (c.proxy, -c.predicted_skipped))
        elif best is not None:
            anchor = next((c for c in self.candidates + self._extra if c.key == config_key(
                BWCacheConfig.from_dict(_config_values(best["config"])))), None)
            pool += self._variants([anchor] if anchor is not None else [])
        pool = [c for c in pool if c.key not in self._by_key]
        return pool[0] if pool else None

    def _variants(self, anchors: list[Candidate]) -> list[Candidate]:
        """The anchors' schedules with the extrapolations next to theirs, ranked, lowest proxy first."""
        configs = []
        for anchor in anchors:
            e = anchor.config.extrapolation
            for other in ((0.3, 0.7) if e == 0.5 else (0.5,)):
                if 0 <= other <= 1 and other != e:
                    configs.append(dataclasses.replace(anchor.config, extrapolation=other))
        ranked = rank(configs, self.traces) if configs else []
        self._extra = self._extra + ranked
        return sorted(ranked, key=lambda c: c.proxy)

    def _choose(self) -> dict | None:
        passing = [p for p in self.measured if p["meets"]]
        if not passing:
            return None
        if "psnr" in self.target:
            return max(passing, key=lambda p: (round(p["skipped"], 3), p["psnr"] if p["psnr"] is not None else math.inf,
                                               p["speedup"]))
        return max(passing, key=lambda p: (math.inf if p["identical"] else p["psnr"] or -math.inf, p["speedup"]))

    def result(self) -> dict:
        chosen = self._choose()
        goal = _target_text(self.target)
        if chosen is not None:
            config = BWCacheConfig.from_dict(_config_values(chosen["config"]))
            message = f"{chosen['label']} meets it: {_point_text(chosen)}."
            if chosen["timing_flag"]:
                message += " " + timing_explanation(chosen["timing_flag"])
            return {"config": config, "met": True, "message": message, "chosen": chosen}
        reusing = [p for p in self.measured if p["skipped"] > 0]
        if not reusing:
            reason = self.notes[-1] if self.notes else "No candidate could be measured within the budget."
            return {"config": None, "met": False, "chosen": None,
                    "message": f"No setting meets {goal}. {reason} Run uncached."}
        if "psnr" in self.target:
            best = max(reusing, key=lambda p: (p["psnr"] or -math.inf, p["speedup"]))
            advice = ("BWCache changes this video more than the target allows (a model with few steps, or a distilled "
                      "or guidance-free one, leaves little to reuse). Run uncached, or lower the target.")
        else:
            best = max(reusing, key=lambda p: (p["speedup"], p["psnr"] or -math.inf))
            advice = ("No schedule measured reaches that speedup (too few steps, or the blocks are a small share of "
                      "the time). Run uncached, or lower the target.")
        message = (f"No candidate meets {goal}; the best measured is {best['label']}: {_point_text(best)}. {advice}")
        config = BWCacheConfig.from_dict(_config_values(best["config"]))
        return {"config": config, "met": False, "message": message, "chosen": best}


def timing_explanation(flag: str) -> str:
    if flag == "below_ideal":
        return ("Its measured speedup is well below what the skipped compute should give: the cache's own work, or "
                "another process sharing the machine during the cached runs, slowed them.")
    return ("Its measured speedup is well above what the skipped compute should give: the uncached runs were slowed "
            "(another process sharing the CPU or GPU), so the speedup is overstated; measure on a quiet machine.")


def _config_values(data: Mapping) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}


def _versions() -> dict:
    import diffusers

    from ..resources import package_version

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "bwcache": package_version()}
