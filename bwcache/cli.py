"""`python -m bwcache`: compare one prompt with and without BWCache, or benchmark against the peer caches."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


from .config import CACHE_SETTINGS
from .parallel import KINDS, close_distributed, init_distributed, is_main_process
from .pipelines import PipelineUnavailable
from .outputs import check_writable
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
    from .runner import resolve_preset
    from .ui import check_request, request_fields

    preset = resolve_preset(args.preset)
    request = check_request(preset, **{name: getattr(args, name) for name in request_fields(preset) if hasattr(args, name)})
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
                                context_parallel=args.context_parallel, **request)
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


def _plan(args) -> int:
    """Print the memory plan of a request (its settings checked as for a run)."""
    from .plan import plan_memory
    from .runner import resolve_preset
    from .ui import check_request, request_config, request_fields, resolved_settings

    if args.gpu_memory_gb is not None and not args.gpu_memory_gb > 0:
        raise ValueError(f"--gpu-memory-gb must be a number of GB > 0, got {args.gpu_memory_gb!r}.")
    preset = resolve_preset(args.preset)
    if preset.image == "required":
        # The plan is the same with any first frame (its shapes are the video's): checked without one.
        preset = dataclasses.replace(preset, image="optional")
    request = check_request(preset, **{name: getattr(args, name) for name in request_fields(preset) if hasattr(args, name)})
    plan = plan_memory(preset, request_config(preset, request), resolved_settings(preset, request), args.gpu_memory_gb)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(plan.text())
        if plan.refusal():
            print(plan.refusal())
    return 1 if plan.fits is False else 0


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
        from .bench import run_from_args

        return run_from_args(args)
    except (ValueError, FileExistsError, PipelineUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
