"""`python -m bwcache bench`: its options, where its results go, and a run from the parsed options."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from ..outputs import check_writable, read_lines
from ..runner import resolve_preset
from .methods import PROMPT_SETS, default_methods, select_methods
from .report import markdown_table, pareto_figure, pareto_svg, report_markdown
from .run import run_benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny-shapes")
    parser.add_argument("--prompt-set", choices=sorted(PROMPT_SETS), default="held-out",
                        help="held-out: prompts no default was tuned on (default); tuning: the ones they were tuned on")
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts (from the prompt set)")
    parser.add_argument("--prompt-file", type=Path, help="one prompt per line, instead of a prompt set")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per prompt (median taken)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", help="comma-separated method keys (default: all); see --list-methods")
    parser.add_argument("--profile-file", type=Path,
                        help="also run a profile file made by `python -m bwcache calibrate`, as method bw-calibrated")
    parser.add_argument("--list-methods", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("--out", type=Path,
                        help="folder for JSON, SVG and HTML (default: a new folder benchmarks/runs/<preset>-<time>)")
    parser.add_argument("--markdown", type=Path, help="also write the report (e.g. BENCHMARKS.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace result files that already exist")


def output_paths(out: Path | None, preset_name: str, overwrite: bool, markdown: Path | None = None) -> dict[str, Path]:
    """Where the results go, checked before any work: a new folder by default; an existing file only with
    `overwrite`."""
    if out is None:
        out = Path("benchmarks/runs") / f"{preset_name}-{datetime.now():%Y%m%d-%H%M%S}"
    paths = {"json": out / f"{preset_name}.json", "svg": out / f"{preset_name}-pareto.svg",
             "html": out / f"{preset_name}-pareto.html"}
    if markdown is not None:
        paths["markdown"] = markdown
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the results.")
    check_writable(out, "--out", folder=True)
    if markdown is not None:
        check_writable(markdown, "--markdown", folder=False)
    for path in paths.values():
        if path.is_dir():
            raise ValueError(f"{path} is a folder; the benchmark writes a file there.")
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another --out.")
    return paths


def run_from_args(args) -> int:
    if args.list_methods:
        for m in default_methods():
            print(f"{m.key:<22} {m.label}")
        return 0
    profile_file = getattr(args, "profile_file", None)
    if profile_file is not None:
        from ..cli import check_profile_file

        check_profile_file(profile_file)
    methods = select_methods(args.methods, profile_file)
    if args.prompt_file:
        prompts = read_lines(args.prompt_file, "--prompt-file")
    else:
        prompts = list(PROMPT_SETS[args.prompt_set])
    if args.prompts < 1:
        raise ValueError(f"--prompts must be ≥ 1, got {args.prompts}.")
    prompts = prompts[: args.prompts]
    if args.repeats < 1:
        raise ValueError(f"--repeats must be ≥ 1, got {args.repeats}.")
    preset_name = resolve_preset(args.preset).name
    paths = output_paths(args.out, preset_name, args.overwrite, args.markdown)
    command = "python -m bwcache bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    results = run_benchmark(args.preset, prompts, methods, repeats=args.repeats, seed=args.seed, device=args.device)
    results["command"] = command
    results["prompt_set"] = "file" if args.prompt_file else args.prompt_set
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["svg"].write_text(pareto_svg(results["rows"]))
    pareto_figure(results["rows"]).write_html(paths["html"], include_plotlyjs="cdn")
    print(markdown_table(results["rows"]))
    if args.markdown:
        args.markdown.write_text(report_markdown(results, svg_path=str(paths["svg"])))
        print(f"wrote {args.markdown}")
    print(f"results in {paths['json'].parent}")
    return 0
