"""The embedded model's indicator over the denoising steps, under both indicator features.

    python benchmarks/indicator_curves.py --json benchmarks/results/indicator-curves.json \
        --svg benchmarks/results/indicator-curves.svg

For each feature (the blocks' hidden-states input, and their AdaLN-modulated attention input as the official code
measures it), one uncached (δ = 0) generation per prompt at the preset's default size and steps records every
block's relative-L1 distance to the previous step; the indicator is their mean over all blocks (every token). The
figure shows, per feature, the mean over prompts and CFG branches, with the range over prompts.

    python benchmarks/indicator_curves.py --stages benchmarks/results/embedded/stage*.json \
        --stage-svg benchmarks/results/embedded/stages

draws the embedded model's design stages side by side instead: one figure per feature (`stages-hidden_states.svg`,
`stages-modulated.svg`), each stage's mean curve divided by the lowest value of its middle third, so the left arm
(steps 1–2) and the right arm read directly as ratios against the target of 2. Stage files are this script's JSON or
`benchmarks/embedded_dynamics.py`'s (with a "label").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bwcache import BWCacheConfig, cached  # noqa: E402
from bwcache.bench import TINY_PROMPTS  # noqa: E402
from bwcache.pipelines import get_pipeline  # noqa: E402
from bwcache.presets import load_preset  # noqa: E402
from bwcache.pipelines import call_kwargs  # noqa: E402
from bwcache.runner import resolve_settings  # noqa: E402
from bwcache.svg import Drawing  # noqa: E402

FEATURES = {"hidden_states": "hidden-states input", "modulated": "modulated attention input"}
COLOURS = {"hidden_states": "#1f77b4", "modulated": "#d62728"}


def curves(prompts: list[str], seed: int = 0) -> dict:
    preset = load_preset("tiny-shapes")
    pipe = get_pipeline(preset, "cpu")
    result = {}
    for feature in FEATURES:
        per_prompt = []
        for prompt in prompts:
            settings = resolve_settings(preset, prompt=prompt, seed=seed)
            config = BWCacheConfig(threshold=0.0, indicator_feature=feature)
            with cached(pipe, config) as handle:
                pipe(**call_kwargs(preset, settings), generator=torch.Generator().manual_seed(seed), output_type="np")
            branches = handle.trace.to_dict()["branches"].values()
            # Mean over CFG branches; step 0 has no previous step.
            per_prompt.append(np.mean([[np.nan if v is None else v for v in b["indicator"]] for b in branches], axis=0))
        values = np.array(per_prompt)
        result[feature] = {
            "mean": [None if np.isnan(v) else float(v) for v in np.nanmean(values, axis=0)],
            "min": [None if np.isnan(v) else float(v) for v in np.nanmin(values, axis=0)],
            "max": [None if np.isnan(v) else float(v) for v in np.nanmax(values, axis=0)],
            "per_prompt": {p: [None if np.isnan(v) else float(v) for v in row] for p, row in zip(prompts, values)},
        }
    return {"preset": preset.name, "prompts": prompts, "seed": seed, "features": result}


def svg(data: dict, width: int = 720, height: int = 400) -> str:
    """A dependency-free line chart: per feature the mean over prompts and a band for their range."""
    left, right, top, bottom = 60, 220, 20, 50
    steps = len(next(iter(data["features"].values()))["mean"])
    top_value = max(v for f in data["features"].values() for v in f["max"] if v is not None) * 1.05
    drawing = Drawing(width, height)
    chart = drawing.chart((left, top, width - right, height - bottom), (1, steps - 1), (0, top_value))
    chart.axes()
    chart.x_label("denoising step")
    chart.y_label("indicator (mean relative L1 over blocks)")
    chart.x_ticks("", values=range(1, steps, max(1, (steps - 1) // 6)))
    chart.y_ticks(".2f")
    shown = range(1, steps)  # step 0 has no previous step
    for feature, values in data["features"].items():
        colour = COLOURS[feature]
        chart.band(shown, [values["min"][s] for s in shown], [values["max"][s] for s in shown], colour)
        chart.polyline([(s, values["mean"][s]) for s in shown], colour, width=2)
    drawing.legend(width - right + 10, top + 10, [(FEATURES[f], COLOURS[f], "line") for f in data["features"]],
                   step=(0, 18))
    drawing.legend(width - right + 10, top + 54, [("lines: mean over prompts", None, None),
                                                  ("bands: range over prompts", None, None)])
    return drawing.render()


STAGE_COLOURS = ["#7f7f7f", "#9467bd", "#ff7f0e", "#2ca02c", "#1f77b4", "#d62728", "#8c564b"]


def stage_curve(data: dict, feature: str) -> list:
    """A stage's mean curve for `feature`, from either JSON layout."""
    return (data.get("features") or data["curves"])[feature]["mean"]


def middle_min(mean: list) -> float:
    n = len(mean)
    return min(v for v in mean[n // 3: 2 * n // 3] if v is not None)


def stages_svg(stages: list[tuple[str, dict]], feature: str, width: int = 820, height: int = 400) -> str:
    left, right, top, bottom = 60, 330, 20, 50
    series = []
    for label, data in stages:
        mean = stage_curve(data, feature)
        low = middle_min(mean)
        series.append((label, [None if v is None else v / low for v in mean]))
    steps = max(len(values) for _, values in series)
    top_value = max(v for _, values in series for v in values if v is not None) * 1.05
    drawing = Drawing(width, height)
    chart = drawing.chart((left, top, width - right, height - bottom), (1, steps - 1), (0, top_value))
    chart.axes()
    chart.x_label("denoising step")
    chart.y_label(f"{FEATURES[feature]} ÷ middle-third minimum")
    chart.x_ticks("", values=range(1, steps, max(1, (steps - 1) // 6)))
    chart.y_ticks(".1f")
    chart.polyline([(1, 2.0), (steps - 1, 2.0)], "#bbbbbb", width=1)
    entries = []
    for k, (label, values) in enumerate(series):
        colour = STAGE_COLOURS[k % len(STAGE_COLOURS)]
        chart.polyline([(s, v) for s, v in enumerate(values) if v is not None and s >= 1], colour, width=2)
        arm = (values[1] + values[2]) / 2
        entries.append((f"{label}: left arm {arm:.2f}", colour, "line"))
    drawing.legend(width - right + 10, top + 10, entries, step=(0, 18))
    drawing.legend(width - right + 10, top + 20 + 18 * len(entries), [("grey line: the left-arm target (2)", None,
                                                                       None)])
    return drawing.render()


def draw_stages(files: list[Path], prefix: Path) -> None:
    stages = []
    for path in files:
        data = json.loads(path.read_text())
        stages.append((data.get("label", path.stem), data))
    for feature in FEATURES:
        out = prefix.parent / f"{prefix.name}-{feature}.svg"
        out.write_text(stages_svg(stages, feature))
        print(f"wrote {out}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="the first N prompts of the benchmark's list")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--svg", type=Path)
    parser.add_argument("--stages", type=Path, nargs="+", help="stage JSON files to draw side by side")
    parser.add_argument("--stage-svg", type=Path, help="prefix of the stage figures (one per feature)")
    args = parser.parse_args(argv)
    if args.stages:
        if args.stage_svg is None:
            parser.error("--stages needs --stage-svg")
        draw_stages(args.stages, args.stage_svg)
        return 0
    data = curves(list(TINY_PROMPTS[: args.prompts]))
    for feature, values in data["features"].items():
        mean = values["mean"]
        low = min(range(1, len(mean)), key=lambda s: mean[s])
        print(f"{FEATURES[feature]:<26} step 1: {mean[1]:.3f}  lowest: {mean[low]:.3f} at step {low}  "
              f"last: {mean[-1]:.3f}")
    for path, text in ((args.json, json.dumps(data, indent=1)), (args.svg, svg(data) if args.svg else None)):
        if path is not None:
            if path.exists():
                raise FileExistsError(f"Refusing to overwrite {path}; remove it or choose another path.")
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
