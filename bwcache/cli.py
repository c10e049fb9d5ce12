"""`python -m bwcache`: compare one prompt with and without BWCache, calibrate its settings to a target, plan the
memory of a run, or benchmark against the peer caches."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


from .config import CACHE_SETTINGS
from .parallel import KINDS, close_distributed, init_distributed, is_main_process
from .pipelines import PipelineUnavailable
from .outputs import check_writable, read_lines
from .report import INPUT_IMAGE, OUTPUT_FILES
from .settings import Setting, Settings


def _flag_type(setting: Setting):
    """How a flag's text becomes a setting's value: a number, or for an integer its word for None too; the
    setting's own range is checked with the app's checks, before any model work."""
    if setting.kind == "number":
        return float
    if setting.kind == "choice":
        return str

    def integer(text: str):
        if setting.none_word is not None and text == setting.none_word:
            return text
        try:
            return int(text)
        except ValueError:
            word = f"'{setting.none_word}' or " if setting.none_word else ""
            raise argparse.ArgumentTypeError(f"must be {word}an integer, got {text!r}") from None

    return integer


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny-shapes", help="preset name or path to a preset JSON (default: tiny-shapes)")
    parser.add_argument("--prompt", help="prompt (default: the preset's)")
    parser.add_argument("--negative-prompt", help="negative prompt (default: the preset's)")
    parser.add_argument("--image", type=Path, help="first frame (PNG, JPEG or WebP) for presets that take one; "
                        "fitted to the video's size")
    parser.add_argument("--seed", type=int, help="seed (default: the preset's)")
    parser.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps")
    parser.add_argument("--frames", type=int, dest="num_frames", help="number of frames")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--guidance", type=float, dest="guidance_scale", help="guidance scale")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def _add_cache_arguments(parser: argparse.ArgumentParser, settings: Settings) -> None:
    parser.add_argument("--profile", help="the preset's cache profile: default, fast, … (the other cache options "
                        "change it)")
    for setting in settings.form:
        if setting.kind == "flag":
            parser.add_argument(setting.flag, action=argparse.BooleanOptionalAction, help=setting.help)
            continue
        choices = list(setting.choices) if setting.kind == "choice" else None
        word = f" ('{setting.none_word}' or a number)" if setting.none_word else ""
        parser.add_argument(setting.flag, type=_flag_type(setting), choices=choices,
                            help=f"{setting.label}{word}: {setting.help}".replace("%", "%%"))


def build_parser(settings: Settings = CACHE_SETTINGS) -> argparse.ArgumentParser:
    """The command line; its cache options are `settings`' (those the app's form offers)."""
    parser = argparse.ArgumentParser(prog="python -m bwcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser("compare", help="run a prompt with and without BWCache and report the speedup")
    _add_generation_arguments(compare)
    _add_cache_arguments(compare, settings)
    from .cachedit import INSTALL_HINT
    from .peers import METHODS as PEER_METHODS
    from .peers import UNAVAILABLE as UNAVAILABLE_PEERS

    missing = f"; {', '.join(UNAVAILABLE_PEERS)} need cache-dit: {INSTALL_HINT}" if UNAVAILABLE_PEERS else ""
    compare.add_argument("--compare-with", help=f"also run a peer cache: {', '.join(PEER_METHODS)}{missing}")
    compare.add_argument(
        "--context-parallel", choices=KINDS,
        help="shard the denoiser over all processes of a torchrun launch (torchrun --nproc_per_node=N -m bwcache "
        "compare ...); rank 0 writes the outputs",
    )
    compare.add_argument("--profile-file", type=Path,
                         help="a profile file made by `python -m bwcache calibrate` instead of --profile (the other "
                         "cache options change it)")
    compare.add_argument("--timing-repeats", type=int, default=1,
                         help="time the uncached and cached runs this many times, alternating (median and range "
                         "reported; default 1)")
    compare.add_argument("--json", type=Path, help="write the run record to this file")
    compare.add_argument("--out-dir", type=Path, help="write both videos, the run record and the trace CSV here")
    compare.add_argument("--overwrite", action="store_true", help="replace existing output files")

    plan = commands.add_parser("plan", help="the memory a run needs and whether it fits, from shapes alone (no "
                               "weights loaded)")
    plan.add_argument("--preset", default="tiny-shapes", help="preset name or path to a preset JSON")
    plan.add_argument("--height", type=int)
    plan.add_argument("--width", type=int)
    plan.add_argument("--num-frames", "--frames", type=int, dest="num_frames", help="number of frames")
    plan.add_argument("--guidance", type=float, dest="guidance_scale", help="guidance scale (1: one branch)")
    plan.add_argument("--gpu-memory-gb", type=float, help="the GPU's memory (default: the preset's recommendation)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    _add_cache_arguments(plan, settings)
    plan.add_argument("--profile-file", type=Path, help="a profile file made by `python -m bwcache calibrate`")

    calibrate = commands.add_parser(
        "calibrate", help="choose the BWCache settings that meet a target PSNR or speedup on a preset's model, by "
        "measurement, and write them as a profile file")
    calibrate.add_argument("--preset", default="tiny-shapes", help="preset name or path to a preset JSON")
    targets = calibrate.add_mutually_exclusive_group()
    targets.add_argument("--target-psnr", type=float, metavar="DB",
                         help="the fastest settings whose videos keep this mean PSNR against the uncached ones")
    targets.add_argument("--target-speedup", type=float, metavar="X",
                         help="the most faithful settings that run this much faster than uncached")
    calibrate.add_argument("--prompt-file", type=Path, help="calibration prompts, one per line (default: the "
                           "preset's own)")
    calibrate.add_argument("--budget", type=int, default=None,
                           help="most cached generations to run (default 12; the uncached pilots and timing runs "
                           "come on top)")
    calibrate.add_argument("--seed", type=int, help="seed of the first prompt (the next ones count up)")
    calibrate.add_argument("--image", type=Path, help="first frame (PNG, JPEG or WebP) for presets that take one; "
                           "every calibration prompt starts from it")
    calibrate.add_argument("--steps", type=int, dest="num_inference_steps", help="denoising steps")
    calibrate.add_argument("--frames", type=int, dest="num_frames", help="number of frames")
    calibrate.add_argument("--height", type=int)
    calibrate.add_argument("--width", type=int)
    calibrate.add_argument("--guidance", type=float, dest="guidance_scale", help="guidance scale")
    calibrate.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    calibrate.add_argument("--out", type=Path, required=True, help="the profile file to write (.json)")
    calibrate.add_argument("--overwrite", action="store_true", help="replace an existing profile file")

    bench = commands.add_parser("bench", help="speed and quality of BWCache and the peer caches over many prompts")
    from .bench import add_arguments

    add_arguments(bench)
    return parser


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: no CUDA GPU is available here; use --device cpu.")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
    elif parsed.type != "cpu":
        raise ValueError(f"--device {device}: BWCache runs on cpu or cuda.")


def _preflight(args) -> None:
    """Everything checkable before any model work: output paths, the device, and the settings against the preset's
    allowed ranges (the same checks as the app's)."""
    if args.json:
        check_writable(args.json, "--json", folder=False)
    if args.out_dir:
        check_writable(args.out_dir, "--out-dir", folder=True)
    if args.device:
        _check_device(args.device)
    if not 1 <= args.timing_repeats <= 20:
        raise ValueError(f"--timing-repeats must be from 1 to 20, got {args.timing_repeats}.")
    from .runner import resolve_preset
    from .ui import request_config

    preset = resolve_preset(args.preset)
    request = _request(args, preset)
    if args.profile_file is not None:
        request_config(preset, request)  # the file's settings with the options that change them, checked
    if not args.context_parallel:  # several processes share the memory out: the one-process plan does not apply
        from .pipelines import default_device
        from .plan import check_fits, device_memory_gb
        from .ui import request_config, resolved_settings

        check_fits(preset, request_config(preset, request), resolved_settings(preset, request),
                   device_memory_gb(args.device or default_device()))
    return request


def _compare(args) -> int:
    request = _preflight(args)
    targets = []
    if args.json:
        targets.append(args.json)
    if args.out_dir:
        targets += [args.out_dir / name for name in OUTPUT_FILES.values()]
        if args.image is not None:
            targets.append(args.out_dir / INPUT_IMAGE)
    existing = [str(p) for p in targets if p.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"Refusing to overwrite {', '.join(existing)}; pass --overwrite or choose other paths.")
    if args.context_parallel:
        if args.device:
            raise ValueError("--device cannot be set with --context-parallel: each process runs on its own GPU "
                             "(cuda:LOCAL_RANK), or on the CPU where there is none.")
        args.device = init_distributed()
    try:
        return _run_compare(args, request)
    finally:
        if args.context_parallel:
            close_distributed()


def _run_compare(args, request: dict) -> int:
    from .report import save_comparison, summary_text
    from .runner import run_comparison

    main = is_main_process()
    progress = ProgressLines(sys.stderr) if main else None
    comparison = run_comparison(args.preset, device=args.device, compare_with=args.compare_with, progress=progress,
                                context_parallel=args.context_parallel, timing_repeats=args.timing_repeats, **request)
    if not main:
        return 0
    progress.close()
    print(summary_text(comparison.record))
    if args.out_dir:
        paths = save_comparison(comparison, args.out_dir, overwrite=args.overwrite)
        print(f"wrote {', '.join(paths.values())}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(comparison.record, indent=1))
        print(f"wrote {args.json}")
    return 0


def _request(args, preset) -> dict:
    """The run the options ask for, checked (a profile file in place of a named profile)."""
    from .ui import check_request, request_fields

    if args.profile_file is not None:
        if args.profile:
            raise ValueError("Give --profile or --profile-file, not both.")
        check_profile_file(args.profile_file)
    request = check_request(preset, **{name: getattr(args, name) for name in request_fields(preset) if hasattr(args, name)})
    if args.profile_file is not None:
        request["profile"] = str(args.profile_file)
    return request


def _plan(args) -> int:
    """Print the memory plan of a request (its settings checked as for a run)."""
    from .plan import plan_memory
    from .runner import resolve_preset
    from .ui import request_config, resolved_settings

    if args.gpu_memory_gb is not None and not args.gpu_memory_gb > 0:
        raise ValueError(f"--gpu-memory-gb must be a number of GB > 0, got {args.gpu_memory_gb!r}.")
    preset = resolve_preset(args.preset)
    if preset.image == "required":
        # The plan is the same with any first frame (its shapes are the video's): checked without one.
        preset = dataclasses.replace(preset, image="optional")
    request = _request(args, preset)
    plan = plan_memory(preset, request_config(preset, request), resolved_settings(preset, request), args.gpu_memory_gb)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(plan.text())
        if plan.refusal():
            print(plan.refusal())
    return 1 if plan.fits is False else 0


def check_profile_file(path: Path):
    """A profile file that cannot be read is refused before any model work."""
    from .calibrate.profile import read_profile

    if not str(path).lower().endswith(".json"):
        raise ValueError(f"--profile-file {path}: a profile file's name ends in .json.")
    return read_profile(path)


def _calibrate_preflight(args):
    """Targets, budget, prompts, settings, the device and the output file, checked before any model work: the preset,
    the prompts and the generation settings for the run."""
    from .calibrate.core import DEFAULT_BUDGET, check_targets
    from .calibrate.for_preset import calibration_prompts
    from .runner import SETTING_KEYS, resolve_preset, resolve_settings

    if args.budget is None:
        args.budget = DEFAULT_BUDGET
    check_targets(args.target_psnr, args.target_speedup, args.budget,
                  names={"target_psnr": "--target-psnr", "target_speedup": "--target-speedup", "budget": "--budget"})
    if not str(args.out).lower().endswith(".json"):
        raise ValueError(f"--out {args.out}: a profile file's name ends in .json.")
    check_writable(args.out, "--out", folder=False)
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"Refusing to overwrite {args.out}; pass --overwrite or choose another --out.")
    if args.device:
        _check_device(args.device)
    preset = resolve_preset(args.preset)
    if args.prompt_file:
        prompts = read_lines(args.prompt_file, "--prompt-file")
    else:
        prompts = calibration_prompts(preset, args.budget)
    generation = {key: getattr(args, key) for key in (*SETTING_KEYS, "image") if getattr(args, key, None) is not None}
    settings = resolve_settings(preset, seed=args.seed, **generation)  # the settings and the image, checked once
    per_prompt = {key: value for key, value in generation.items() if key != "image"}
    for k, prompt in enumerate(prompts):
        where = f"line {k + 1} of {args.prompt_file}" if args.prompt_file else "the preset's prompt"
        try:
            resolve_settings(preset, prompt=prompt, seed=args.seed, **per_prompt)
            _check_tiny_prompt(preset, prompt)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    from .pipelines import default_device
    from .plan import check_fits, device_memory_gb
    from .runner import resolve_config

    # The most a candidate holds: a residual and the one before it for every block (block-wise, extrapolating).
    base = resolve_config(preset, settings["num_inference_steps"])
    heaviest = dataclasses.replace(base, mode="blockwise", indicator_blocks=None, extrapolation=0.5, threshold=1.0)
    check_fits(preset, heaviest, settings, device_memory_gb(args.device or default_device()))
    return preset, prompts, generation


def _check_tiny_prompt(preset, prompt: str) -> None:
    if preset.kind != "tiny":
        return
    from .tiny.pipeline import TEXT_ENCODER_CONFIG
    from .tiny.text import DEFAULT_VOCAB, TinyTokenizer

    TinyTokenizer(DEFAULT_VOCAB, TEXT_ENCODER_CONFIG["max_length"]).encode(prompt)


def _calibrate(args) -> int:
    preset, prompts, generation = _calibrate_preflight(args)
    from .calibrate.for_preset import calibrate_preset

    progress = ProgressLines(sys.stderr)
    print(f"Calibrating {preset.label} on {len(prompts)} prompt(s), budget {args.budget} cached generations …",
          file=sys.stderr)
    result = calibrate_preset(preset, prompts, target_psnr=args.target_psnr, target_speedup=args.target_speedup,
                              budget=args.budget, seed=args.seed, device=args.device, progress=progress, **generation)
    progress.close()
    print(result.summary())
    if result.config is None:
        print("No profile written: nothing could be measured.")
        return 1
    path = result.save(args.out, overwrite=args.overwrite)
    print(f"wrote {path}" + ("" if result.met else " (it records that the target was NOT met)"))
    print(f"use it: python -m bwcache compare --preset {preset.name} --profile-file {path}")
    return 0 if result.met else 1


class ProgressLines:
    """Progress for a terminal, one line redrawn in place; for a log file or a pipe, plain lines, one per whole
    percent at most, which stay readable there."""

    def __init__(self, stream):
        self.stream = stream
        self.in_place = stream.isatty()
        self.last = None

    def __call__(self, fraction: float, description: str) -> None:
        if self.in_place:
            print(f"\r[{fraction:6.1%}] {description:<40}", end="", file=self.stream, flush=True)
            return
        percent = int(fraction * 100)
        if percent != self.last:
            self.last = percent
            print(f"[{fraction:6.1%}] {description}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.in_place:
            print(file=self.stream)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compare":
            return _compare(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "calibrate":
            return _calibrate(args)
        from .bench import run_from_args

        return run_from_args(args)
    except (ValueError, FileExistsError, PipelineUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
