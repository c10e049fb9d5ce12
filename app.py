"""BWCache Explorer: one prompt run without and with BWCache, side by side, with timings, quality and the cache's
per-block decisions. The app's constants, its handlers and `build_demo()`, which lays out the page and wires it from
the one description of the cache settings (`bwcache.config.CACHE_SETTINGS`); the work is in `bwcache.runner`, the
helpers in `bwcache.ui`.

    python app.py            # honours GRADIO_SERVER_NAME, GRADIO_SERVER_PORT and PORT
"""

from __future__ import annotations

# First: on ZeroGPU, `spaces` must be imported before anything initialises CUDA (torch, diffusers). Its decorator
# is a no-op everywhere else.
try:
    import spaces
except ImportError:
    spaces = None

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from bwcache import ui
from bwcache.ui import calibration as calibration_ui
from bwcache.ui import service
from bwcache.config import CACHE_SETTINGS, BWCacheConfig
from bwcache import space
from bwcache.pipelines import PipelineUnavailable, get_pipeline
from bwcache.images import MAX_IMAGE_BYTES
from bwcache.plan import check_fits, device_memory_gb
from bwcache.presets import DEFAULT_PROFILE, Preset
from bwcache.report import summary_markdown
from bwcache.runner import run_comparison, run_sweep
from bwcache.calibrate import calibrate_preset
from bwcache.settings import Settings, short_repr

ROOT = Path(__file__).resolve().parent
EXAMPLES_DIR = ROOT / "assets" / "examples"
# Each run writes into a new folder here; relative to the working directory so Gradio may serve the files.
OUTPUT_ROOT = Path(os.environ.get("BWCACHE_OUTPUT_DIR", "outputs")).resolve()
# Preset name -> an already built pipeline to use instead of loading the preset's weights (tests inject tiny ones).
PIPELINE_OVERRIDES: dict[str, object] = {}
# How many run folders OUTPUT_ROOT keeps (the oldest go first).
MAX_RUNS = ui.max_runs(os.environ)
# Uploads: first frames only, so Gradio's upload route accepts nothing bigger than an image may be.
MAX_FILE_SIZE = f"{MAX_IMAGE_BYTES // (1024 * 1024)}mb"
# One run at a time on the shared pipelines (`bwcache.ui.service`).
PIPELINE_LOCK = service.PIPELINE_LOCK

ON_ZERO_GPU = spaces is not None and bool(spaces.config.Config.zero_gpu)
# On a Hugging Face Space the app offers the presets whose weights the Space preloads (README front matter).
ON_SPACE = bool(os.environ.get("SPACE_ID"))
PRESETS = ui.available_presets(space=ON_SPACE)
DEFAULT_PRESET = ui.default_preset_name(PRESETS)
EXAMPLES = ui.list_examples(EXAMPLES_DIR, PRESETS)
PEER_CHOICES = [("none", ui.NO_PEER)] + [(label, key) for key, label in ui.PEER_METHODS.items()]

# Plotly skips resizing a plot while it is hidden; the tab becomes visible a frame after its select event.
REFIT_PLOTS = "() => { requestAnimationFrame(() => requestAnimationFrame(() => window.dispatchEvent(new Event('resize')))); }"

CSS = """
.video-pair video { max-height: 420px; }
#run-button { min-height: 48px; }
.preset-notes { font-size: 0.85em; opacity: 0.85; }
"""


def as_sent(component):
    """The component's value reaches the app's own checks as sent: not rounded, not bounded by Gradio, a menu
    value that is not among its choices passed on, so the message names the field as users see it and what it
    allows."""
    component.preprocess = lambda payload: payload
    return component


def field_number(*args, **kwargs) -> gr.Number:
    return as_sent(gr.Number(*args, **kwargs))


def gpu(duration):
    """`spaces.GPU(duration=...)` when the `spaces` package is there; the function unchanged otherwise."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def _progress(progress):
    if progress is None:
        return None
    return lambda fraction, desc: progress(fraction, desc=desc)


def _preset(name) -> Preset:
    name = DEFAULT_PRESET if name in (None, "") else name
    if not isinstance(name, str) or name not in PRESETS:
        raise gr.Error(f"Model preset must be one of {', '.join(PRESETS)}, got {short_repr(name)}.",
                       title="Invalid settings", print_exception=False)
    return PRESETS[name]


@contextmanager
def _user_errors(preset=None, settings=None):
    """Turn what users can cause into readable messages; the server keeps serving after any of them."""
    try:
        yield
    except gr.Error:
        raise
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = ui.oom_message(preset, settings) if preset and settings else "The GPU ran out of memory."
        raise gr.Error(message, title="Out of GPU memory") from None
    except PipelineUnavailable as error:
        raise gr.Error(str(error), title="Model unavailable", print_exception=False) from None
    except FileNotFoundError as error:
        raise gr.Error(str(error), title="Model unavailable", print_exception=False) from None
    except ValueError as error:
        raise gr.Error(str(error), title="Invalid settings", print_exception=False) from None


# ----------------------------------------------------------------------------- GPU work
# On ZeroGPU the work runs in a GPU worker process, and every exception but a `gr.Error` comes back as a generic
# "ZeroGPU worker error": so the work turns errors into our messages itself, inside the GPU function. The CPU-only
# Tiny Shapes preset runs outside it, spending no GPU quota.

if ON_ZERO_GPU:
    # ZeroGPU wants models on CUDA at import time (CUDA is emulated outside the GPU functions). A model that cannot
    # load leaves the app serving the others; choosing it later shows why.
    for _spec in PRESETS.values():
        if ui.needs_gpu(_spec):
            try:
                get_pipeline(_spec, "cuda")
            except PipelineUnavailable as error:
                print(f"{_spec.label} is not loaded: {error}")


def _device(spec) -> str | None:
    """The CPU for the CPU-only preset (ZeroGPU reports CUDA available outside its GPU functions too); else the
    default."""
    return None if ui.needs_gpu(spec) else "cpu"


def _comparison_seconds(preset_name, request, compare_with=None, progress=None, cancel=None):
    preset = PRESETS[preset_name]
    return ui.gpu_seconds(preset, ui.resolved_settings(preset, request), runs=ui.comparison_runs(compare_with))


def _compare_work(preset_name, request, compare_with=None, progress=None, cancel=None):
    spec = PRESETS[preset_name]
    with _user_errors(spec, ui.resolved_settings(spec, request)):
        comparison = run_comparison(preset_name, pipe=PIPELINE_OVERRIDES.get(preset_name), device=_device(spec),
                                    progress=_progress(progress), cancel=cancel, compare_with=compare_with, **request)
    # uint8 frames cross back from the GPU process: a quarter of the float frames' bytes.
    return comparison.as_uint8()


_compare_on_gpu = gpu(duration=_comparison_seconds)(_compare_work)


def _run_comparison(preset_name, request, compare_with=None, progress=None):
    return service.run_placed(ui.needs_gpu(PRESETS[preset_name]), ON_ZERO_GPU, _compare_on_gpu, _compare_work,
                              preset_name, request, compare_with, progress=progress)


def _sweep_seconds(preset_name, request, thresholds, progress=None, cancel=None):
    preset = PRESETS[preset_name]
    return ui.gpu_seconds(preset, ui.resolved_settings(preset, request), runs=ui.sweep_runs(thresholds))


def _sweep_work(preset_name, request, thresholds, progress=None, cancel=None):
    spec = PRESETS[preset_name]
    with _user_errors(spec, ui.resolved_settings(spec, request)):
        return run_sweep(preset_name, thresholds=thresholds, device=_device(spec),
                         pipe=PIPELINE_OVERRIDES.get(preset_name), progress=_progress(progress), cancel=cancel,
                         **request)


_sweep_on_gpu = gpu(duration=_sweep_seconds)(_sweep_work)


def _run_sweep(preset_name, request, thresholds, progress=None):
    return service.run_placed(ui.needs_gpu(PRESETS[preset_name]), ON_ZERO_GPU, _sweep_on_gpu, _sweep_work,
                              preset_name, request, thresholds, progress=progress)


def _calibration_seconds(preset_name, request, calibration, progress=None, cancel=None):
    preset = PRESETS[preset_name]
    return ui.gpu_seconds(preset, ui.resolved_settings(preset, request), runs=_calibration_runs(preset, calibration))


def _calibration_runs(preset, calibration):
    from bwcache.calibrate import calibration_prompts

    prompts = calibration["prompts"] or calibration_prompts(preset, calibration["budget"])
    return calibration_ui.calibration_runs(min(len(prompts), calibration["budget"]), calibration["budget"])


def _calibrate_work(preset_name, request, calibration, progress=None, cancel=None):
    spec = PRESETS[preset_name]
    generation = {key: request[key] for key in (*ui.GENERATION_FIELDS, "image") if request.get(key) is not None}
    with _user_errors(spec, ui.resolved_settings(spec, request)):
        return calibrate_preset(spec, calibration["prompts"], target_psnr=calibration["target_psnr"],
                                target_speedup=calibration["target_speedup"], budget=calibration["budget"],
                                seed=request.get("seed"), profile=request.get("profile"), device=_device(spec),
                                pipe=PIPELINE_OVERRIDES.get(preset_name), progress=_progress(progress), cancel=cancel,
                                **generation)


_calibrate_on_gpu = gpu(duration=_calibration_seconds)(_calibrate_work)


def _run_calibration(preset_name, request, calibration, progress=None):
    return service.run_placed(ui.needs_gpu(PRESETS[preset_name]), ON_ZERO_GPU, _calibrate_on_gpu, _calibrate_work,
                              preset_name, request, calibration, progress=progress)


# Files Gradio's cache keeps: what the newest runs show (each run serves up to about ten files).
MAX_CACHED_FILES = 10 * MAX_RUNS


def _save(kind, write) -> dict:
    # Gradio copies every file it serves into its cache, which otherwise only ages out: bounded as the runs are.
    ui.prune_cache(demo.GRADIO_CACHE, MAX_CACHED_FILES)
    return service.save_run(OUTPUT_ROOT, kind, write, MAX_RUNS)


# ----------------------------------------------------------------------------- endpoints
# The compare and sweep endpoints take the form's fields by name; their parameters (the API's) follow the settings
# description (`bwcache.ui.fields`), so a described setting is an API parameter as soon as the form offers it.


def _admitted(spec, values, runs, sweep=False):
    """A request checked before any model work: its fields (a profile may be one the Calibrate tab saved), the GPU
    memory it needs (the memory plan), and on ZeroGPU the time it needs, refused before anything is scheduled with
    what would fit."""
    request = ui.check_request(spec, profile_root=OUTPUT_ROOT, **values)
    settings = ui.resolved_settings(spec, request)
    check_fits(spec, ui.request_config(spec, request), settings, _gpu_memory_gb())
    if ON_ZERO_GPU:
        ui.check_gpu_budget(spec, settings, runs=runs, sweep=sweep)
    return request, settings


def _gpu_memory_gb() -> float | None:
    """The GPU memory runs get: ZeroGPU's slice, this machine's GPU, or (None) each preset's recommendation."""
    if ON_ZERO_GPU:
        return space.HARDWARE_MEMORY_GB.get(space.card().get("suggested_hardware"))
    return device_memory_gb("cuda")


def _compare(values, progress):
    spec = _preset(values.pop("preset"))
    with _user_errors():
        values["seed"] = ui.check_seed(values.get("seed"), values.pop("randomize_seed"))
        peer = ui.parse_peer(values.pop("compare_with"))
        request, settings = _admitted(spec, values, runs=ui.comparison_runs(peer))
    with _user_errors(spec, settings):
        comparison = _run_comparison(spec.name, request, peer, progress=progress)
    paths = _save("run", lambda folder: ui.save_run(comparison, folder))
    record = comparison.record
    return (
        paths["baseline"],
        paths["bwcache"],
        ui.heatmap(record),
        summary_markdown(record),
        record,
        record["seed"],
        paths.get("peer"),
        ui.download_list(paths),
        record,
        _input_image(paths),
    )


def _input_image(paths):
    """The input image beside the videos, as the run was given it; hidden without one."""
    return gr.update(value=paths.get("input"), visible="input" in paths)


def _sweep(values, progress):
    spec = _preset(values.pop("preset"))
    with _user_errors():
        thresholds = ui.parse_thresholds(values.pop("thresholds"))
        values["seed"] = ui.check_seed(values.get("seed"))
        request, settings = _admitted(spec, values, runs=ui.sweep_runs(thresholds), sweep=True)
    with _user_errors(spec, settings):
        result = _run_sweep(spec.name, request, thresholds, progress=progress)
    paths = _save("sweep", lambda folder: ui.save_sweep(result, folder))
    tuning = ui.tuning_source(baseline_trace=result["baseline_trace"], config=ui.request_config(spec, request),
                              block_share=result.get("block_share"), measured=result["rows"])
    return ui.sweep_plot(result), pd.DataFrame(ui.sweep_table(result), columns=ui.SWEEP_HEADERS), paths["csv"], tuning


def _calibrate(values, progress):
    spec = _preset(values.pop("preset"))
    with _user_errors():
        calibration = calibration_ui.check_calibration(values.pop("target_kind"), values.pop("target"),
                                                       values.pop("budget"), values.pop("prompts"))
        values["seed"] = ui.check_seed(values.get("seed"))
        prompts = calibration["prompts"]
        request, settings = _admitted(spec, {**values, "prompt": prompts[0] if prompts else None},
                                      runs=_calibration_runs(spec, calibration))
    with _user_errors(spec, settings):
        result = _run_calibration(spec.name, request, calibration, progress=progress)
    path = None
    if result.config is not None:
        path = _save(calibration_ui.RUN_KIND, lambda folder: calibration_ui.save_profile(result, folder))["profile"]
    # Where the profile file is on the server: what `/compare` and the Profile menu take as `profile`.
    record = {**result.to_dict(), "profile_file": path}
    return (calibration_ui.frontier_figure(result, spec), calibration_ui.summary_markdown(result, path), path,
            record, path)


def use_profile(preset, path, saved):
    """"Use this profile": the saved profile file added to the Profile menu and chosen, the cache controls set to
    its settings, so that the next comparison runs it."""
    spec = _preset(preset)
    if not path:
        raise gr.Error("No profile file yet: run a calibration first.", title="Invalid settings",
                       print_exception=False)
    with _user_errors():
        path = ui.check_profile(spec, path, OUTPUT_ROOT)
    menu, saved = calibration_ui.menu_update(spec, path, saved)
    updates = fill_profile(spec.name, path, saved)
    return updates + [saved]


compare = ui.endpoint(_compare, ui.compare_parameters(), progress=gr.Progress(), doc="""Run the prompt without and with BWCache on the preset's model
(same seed and settings).

Settings left empty take the preset's defaults; cache settings left empty take those of the preset's `profile`
("default", "fast", …; the default when empty). Returns the uncached video, the BWCache video, the block × step
heatmap, a Markdown summary, the run record (speedup, baseline_seconds, bwcache_seconds, psnr, ssim, reuse_fraction,
trace, ...), the seed used, the peer cache's video (when `compare_with` names one) and the run's files.""")

sweep = ui.endpoint(_sweep, ui.sweep_parameters(), progress=gr.Progress(), doc="""Run the cached pipeline at several δ against one uncached run:
measured speedup, PSNR and SSIM per δ.

`thresholds` is text such as "0.05, 0.1, 0.2" (at most 8 values from 0 to 1). Returns the speed-vs-fidelity figure,
the table and a CSV file.""")


calibrate = ui.endpoint(_calibrate, calibration_ui.CALIBRATE_PARAMETERS, progress=gr.Progress(),
                        defaults=calibration_ui.ENDPOINT_DEFAULTS, doc="""Calibrate BWCache to a target on the
preset's model: uncached pilot runs on the calibration prompts, candidate settings ranked without running, the most
promising measured against the pilots, the choice made by measurement.

`target_kind` is "psnr" (the fastest settings at `target` dB or better against the uncached video; 35 when empty)
or "speedup" (the most faithful settings at `target`× or faster; 2 when empty). `budget`: the most cached
generations (1 to 100, default 12). `prompts`: one a line; empty: the preset's own calibration prompts. The
generation settings left empty take the preset's defaults; `profile` gives the storage and token stride candidates
keep. Returns the measured frontier figure, a Markdown summary, the profile file (None when nothing could be
measured) and the calibration record (every candidate's figures; `profile_file`: the profile file's path on the
server, which `/compare` accepts as its `profile`).""")


# ----------------------------------------------------------------------------- form and views


def _form_updates(preset, values=None):
    form = ui.preset_form(preset, values)
    updates = [gr.update(**form[key]) for key in ui.form_keys(preset.settings)]
    return updates + [ui.preset_notes(preset)]


def fill_preset(preset):
    """The controls for a preset: its defaults, steps and allowed ranges."""
    return _form_updates(_preset(preset))


def fill_profile(preset, profile, saved=None):
    """The cache controls for one of the preset's profiles, or a profile file the Calibrate tab saved for it (the
    other controls keep what they hold; the menu offers the preset's profiles and the profile files in `saved`)."""
    spec = _preset(preset)
    with _user_errors():
        profile = ui.check_profile(spec, profile, OUTPUT_ROOT)
    form = ui.preset_form(spec, {"profile": profile})
    form["profile"]["choices"] = calibration_ui.profile_choices(spec, saved)
    return [gr.update(**form[key]) for key in ui.profile_keys(spec.settings)]


def show_run(record, view, branch, log_color):
    """Everything drawn from the last run record: heatmap, branch choices, peer video, threshold tuning (at the
    run's own δ, which the tuning tab's δ control takes)."""
    choices = ui.branch_choices(record)
    branch = branch if branch in choices else (choices[0] if choices else None)
    tuning = ui.tuning_source(record) if record else None
    threshold = record["config"]["threshold"] if record else None
    figure, text = ui.tuning_view(tuning, threshold)
    return (
        ui.heatmap(record, view, branch, log_color),
        gr.update(choices=choices, value=branch),
        gr.update(visible=True, label=record["peer"]["label"]) if record and record.get("peer")
        else gr.update(visible=False),
        tuning,
        figure,
        text,
        gr.update() if threshold is None else threshold,
    )


def redraw(record, view, branch, log_color):
    return ui.heatmap(record, view, branch, log_color)


def retune(tuning, threshold):
    return ui.tuning_view(tuning, threshold)


def retune_both(tuning, threshold):
    """The tuning view at a δ moved in one of the two δ controls, and that δ for the other control."""
    figure, text = ui.tuning_view(tuning, threshold)
    return figure, text, gr.update() if threshold is None else threshold


def load_example(prompt, preset, threshold, seed):
    """A precomputed run from assets/examples: instant, no model needed."""
    example = ui.find_example(EXAMPLES, preset, prompt, threshold, seed)
    if example is None:
        raise gr.Error("This example's files are missing; press Run to compute it.", print_exception=False)
    record, paths = example["record"], ui.example_paths(example["dir"])
    spec = PRESETS[record["preset"]]
    # The example's own cache settings, as the form shows them (R "auto" where the run took 10% of the steps).
    config = BWCacheConfig.from_dict(record["config"])
    values = {**record["settings"], "prompt": record["prompt"], "negative_prompt": record["negative_prompt"],
              "seed": record["seed"], "profile": record.get("profile") or DEFAULT_PROFILE, "image": paths.get("input"),
              **{s.name: s.form_value(getattr(config, s.name)) for s in spec.settings.form}}
    run = [
        paths["baseline"], paths["bwcache"], ui.heatmap(record),
        ui.example_summary(record, summary_markdown(record)), record, record["seed"], paths.get("peer"),
        ui.download_list(paths), record, _input_image(paths),
    ]
    form = _form_updates(spec, values)
    return run + [update for key, update in zip(ui.form_keys(spec.settings) + ["notes"], form) if key != "seed"]


# ----------------------------------------------------------------------------- layout


def _control(setting):
    """The form's control for a described cache setting."""
    low, high = setting.form_range
    common = dict(label=setting.label, info=setting.help, elem_id=setting.name.replace("_", "-"))
    widget = setting.widget or {"choice": "radio", "flag": "checkbox"}.get(setting.kind)
    if widget == "slider":
        return as_sent(gr.Slider(low, high, step=setting.step, **common))
    if widget == "radio":
        labels = setting.choice_labels or {}
        return as_sent(gr.Radio([(labels.get(c, c), c) for c in setting.choices], **common))
    if widget == "checkbox":
        return as_sent(gr.Checkbox(**common))
    if setting.kind == "integer" and setting.none_word is not None:
        return as_sent(gr.Textbox(**common))
    return field_number(step=setting.step or 1, precision=None, **common)


def build_demo(settings: Settings = CACHE_SETTINGS) -> gr.Blocks:
    """The page: its layout, and every event wired to the handlers. Its cache controls, their API parameters and
    the controls a profile sets all come from `settings`."""
    controls = {}
    with gr.Blocks(title="BWCache Explorer", fill_width=True, delete_cache=(1800, 7200)) as demo:
        gr.Markdown(
            "# BWCache Explorer\n"
            "Block-wise caching for video diffusion transformers ([paper](https://arxiv.org/abs/2509.13789)): the "
            "same prompt, seed and settings run without and with BWCache, timed one after the other on the same "
            "device. The heatmap shows how much each DiT block's input changed at each step, and which blocks the "
            "cache reused."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                preset = as_sent(gr.Dropdown([(p.label, name) for name, p in PRESETS.items()], value=DEFAULT_PRESET,
                                             label="Model preset", elem_id="preset"))
                controls["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                controls["image"] = gr.Image(label="First frame", type="filepath", sources=["upload"],
                                             image_mode=None, visible=False, elem_id="image")
                # Passed on as a path, undecoded: the app checks format and size before any pixel is decoded.
                controls["image"].preprocess = lambda data: data.path if data is not None else None
                controls["profile"] = as_sent(gr.Dropdown(
                    list(PRESETS[DEFAULT_PRESET].profile_names) if DEFAULT_PRESET else [], value=DEFAULT_PROFILE,
                    label="Profile", elem_id="profile"))
                sliders = {}
                for setting in settings.form:
                    if setting.form == "main":
                        control = _control(setting)
                        if isinstance(control, gr.Slider):
                            # What Run sends: the slider's value, copied here as it moves. The API sees this field,
                            # empty by default, so a call that leaves it out (or sends null) gets the preset's own.
                            sliders[setting.name] = control
                            control = field_number(None, label=setting.label, visible=False)
                        controls[setting.name] = control
                compare_with = as_sent(gr.Dropdown(
                    PEER_CHOICES, value=ui.NO_PEER, label="Compare against",
                    info="also run another cache on the same prompt", elem_id="compare-with"))
                run = gr.Button("Run", variant="primary", elem_id="run-button")
                notes = gr.Markdown(elem_classes=["preset-notes"])
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced-settings"):
                    controls["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2,
                                                             elem_id="negative-prompt")
                    for setting in settings.form:
                        if setting.form == "advanced":
                            controls[setting.name] = _control(setting)
                    with gr.Row():
                        controls["num_inference_steps"] = field_number(label="Steps", precision=None, elem_id="steps")
                        controls["num_frames"] = field_number(label="Frames", precision=None, elem_id="frames")
                    with gr.Row():
                        controls["height"] = field_number(label="Height", precision=None, elem_id="height")
                        controls["width"] = field_number(label="Width", precision=None, elem_id="width")
                    controls["guidance_scale"] = field_number(label="Guidance scale", elem_id="guidance")
                    with gr.Row():
                        controls["seed"] = field_number(label="Seed", precision=None, elem_id="seed",
                                                        info="the seed used is shown here after a run")
                        randomize_seed = as_sent(gr.Checkbox(False, label="Randomize seed"))
                examples_slot = gr.Column()  # filled below, once the outputs the examples fill exist

            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Comparison") as comparison_tab:
                        with gr.Row(equal_height=True, elem_classes=["video-pair"]):
                            input_image = gr.Image(label="Input image (first frame)", interactive=False,
                                                   visible=False, elem_id="input-image")
                            baseline_video = gr.Video(label="Uncached", autoplay=True, loop=True,
                                                      buttons=["download"], interactive=False,
                                                      elem_id="baseline-video")
                            bwcache_video = gr.Video(label="BWCache", autoplay=True, loop=True, buttons=["download"],
                                                     interactive=False, elem_id="bwcache-video")
                            peer_video = gr.Video(label="Peer cache", autoplay=True, loop=True, buttons=["download"],
                                                  interactive=False, visible=False, elem_id="peer-video")
                        summary = gr.Markdown("Press **Run** or pick an example below.", label="Summary",
                                              elem_id="summary")
                        with gr.Row():
                            view = gr.Radio([(label, key) for key, label in ui.HEATMAP_VIEWS.items()],
                                            value="uncached", label="Heatmap", scale=3, elem_id="heatmap-view")
                            branch = gr.Dropdown([], label="CFG branch", scale=1, elem_id="branch")
                            log_color = gr.Checkbox(False, label="Log colour", scale=1, elem_id="log-colour")
                        heatmap = gr.Plot(label="Block × step distances and reuse", elem_id="heatmap")
                        with gr.Accordion("Downloads and run record", open=False):
                            downloads = gr.File(label="Files of this run", file_count="multiple", interactive=False)
                            record_json = gr.JSON(label="Run record")
                    with gr.Tab("Threshold tuning", elem_id="tuning-tab") as tuning_tab:
                        gr.Markdown(
                            "What each δ would do in the last run's mode, from its uncached run's distance map: the "
                            "share of block evaluations reused and the speedup if skipped blocks saved their share "
                            "of the time. Paper mode is predicted exactly (before its trigger a cached run computes "
                            "what the uncached run did). Block-wise mode is estimated: a reuse changes every later "
                            "input, so only its first reuse is exact. Measured runs are marked. Move δ here (or in "
                            "the left column, which follows) to see its effect; the next run uses it."
                        )
                        low, high = settings["threshold"].form_range
                        tuning_threshold = as_sent(gr.Slider(low, high, step=settings["threshold"].step,
                                                             label="δ (threshold)", elem_id="tuning-threshold"))
                        tuning_text = gr.Markdown(elem_id="tuning-text")
                        tuning_plot = gr.Plot(label="δ → reuse and speedup", elem_id="tuning-plot")
                    with gr.Tab("Sweep") as sweep_tab:
                        gr.Markdown("Measured, not predicted: one uncached run, then the cached pipeline at each δ.")
                        with gr.Row():
                            thresholds = gr.Textbox(ui.DEFAULT_SWEEP, label="δ values", info="comma-separated, 0 to 1",
                                                    scale=3)
                            sweep_button = gr.Button("Sweep", scale=1, elem_id="sweep-button")
                        sweep_plot = gr.Plot(label="Speed vs fidelity")
                        sweep_table = gr.Dataframe(headers=ui.SWEEP_HEADERS, interactive=False, label="Per δ")
                        sweep_file = gr.File(label="Sweep CSV", interactive=False)
                    with gr.Tab("Calibrate", elem_id="calibrate-tab") as calibrate_tab:
                        gr.Markdown(
                            "Find the cache settings that meet a target on the selected preset, with the settings "
                            "on the left (steps, size, frames, guidance, seed): uncached pilot runs, candidate "
                            "settings ranked without running, the most promising measured against the pilots, the "
                            "choice made by measurement. The budget counts cached generations (the pilots and "
                            "uncached timing runs come on top). **Use this profile** adds the result to the Profile "
                            "menu for the next comparison."
                        )
                        with gr.Row():
                            target_kind = as_sent(gr.Radio(
                                [(label, key) for key, label in calibration_ui.TARGET_KINDS.items()], value="psnr",
                                label="Target", elem_id="calibrate-target-kind"))
                            target_value = field_number(
                                calibration_ui.DEFAULT_TARGETS["psnr"], label="Target value",
                                info="PSNR: dB against the uncached video, 10 to 80; speedup: above 1, at most 10",
                                elem_id="calibrate-target")
                            budget = field_number(calibration_ui.ENDPOINT_DEFAULTS["budget"], label="Budget",
                                                  info="cached generations, 1 to 100", precision=None,
                                                  elem_id="calibrate-budget")
                        calibration_prompts = gr.Textbox(
                            label="Calibration prompts", lines=3, elem_id="calibrate-prompts",
                            placeholder="one prompt a line; empty: the preset's own calibration prompts")
                        calibrate_button = gr.Button("Calibrate", variant="primary", elem_id="calibrate-button")
                        calibration_summary = gr.Markdown(label="Calibration summary", elem_id="calibrate-summary")
                        calibration_plot = gr.Plot(label="Measured candidates", elem_id="calibrate-plot")
                        with gr.Row():
                            profile_file = gr.File(label="Profile file", interactive=False, elem_id="calibrate-file")
                            use_button = gr.Button("Use this profile", elem_id="use-profile")
                        with gr.Accordion("Calibration record", open=False):
                            calibration_json = gr.JSON(label="Calibration record")

        run_state = gr.State()
        # The profile file of the last calibration, and every one "Use this profile" added to the menu.
        calibrated_path = gr.State()
        saved_profiles = gr.State([])
        tuning_state = gr.State()
        controls["preset"], controls["randomize_seed"], controls["compare_with"] = preset, randomize_seed, compare_with
        controls["thresholds"] = thresholds
        # What a preset or a profile fills: a slider's visible control, which copies into its sent field.
        shown = {**controls, **sliders}
        form = [shown[key] for key in ui.form_keys(settings)] + [notes]
        profile_form = [shown[key] for key in ui.profile_keys(settings)]
        run_outputs = [baseline_video, bwcache_video, heatmap, summary, record_json, controls["seed"], peer_video,
                       downloads, run_state, input_image]
        example_outputs = run_outputs + [c for c in form if c not in run_outputs]

        for name, slider in sliders.items():
            slider.change(lambda value: value, slider, controls[name], queue=False, api_visibility="private")
        # Controls start empty so that API calls which leave them out get the preset's defaults; the page fills them.
        demo.load(fill_preset, preset, form, queue=False, api_visibility="private")
        # `input`, not `change`: examples set the preset themselves, together with their own settings.
        preset.input(fill_preset, preset, form, queue=False, api_visibility="private")
        controls["profile"].input(fill_profile, [preset, controls["profile"], saved_profiles], profile_form,
                                  queue=False, api_visibility="private")

        # A new run clears the last one's results, so that an error does not leave them on screen as if current.
        run.click(lambda: (None, None, "", None, gr.update(value=None, visible=False)), None,
                  [baseline_video, bwcache_video, summary, heatmap, input_image], queue=False, api_visibility="private")
        run.click(
            service.cancellable(ui.endpoint(_compare, ui.compare_parameters(settings), compare.__doc__, gr.Progress())),
            [controls[name] for name in ui.compare_parameters(settings)],
            run_outputs,
            api_name="compare",
            concurrency_limit=1,
            concurrency_id="gpu",
        )
        run_state.change(
            show_run,
            [run_state, view, branch, log_color],
            [heatmap, branch, peer_video, tuning_state, tuning_plot, tuning_text, tuning_threshold],
            queue=False,
            api_visibility="private",
        )
        for control in (view, branch, log_color):
            control.input(redraw, [run_state, view, branch, log_color], heatmap, queue=False,
                          api_visibility="private")
        # The two δ controls follow each other, and the view follows both. Typing in a box fires `input` at every
        # keystroke, dragging as the slider moves: the last value is always drawn. `release` covers a box losing
        # focus, where the slider clamps what was typed to its range.
        threshold = sliders["threshold"]
        for moved, other in ((threshold, tuning_threshold), (tuning_threshold, threshold)):
            moved.input(retune_both, [tuning_state, moved], [tuning_plot, tuning_text, other], queue=False,
                        trigger_mode="always_last", api_visibility="private")
            moved.release(retune_both, [tuning_state, moved], [tuning_plot, tuning_text, other], queue=False,
                          api_visibility="private")
        # A plot drawn while its tab is hidden (a run or sweep finishing while another tab shows) has no width to
        # fit: Plotly sizes it to a default. Gradio's plots resize with the window, so a resize once the tab shows
        # fits it.
        for tab in (comparison_tab, tuning_tab, sweep_tab, calibrate_tab):
            tab.select(None, None, None, js=REFIT_PLOTS, queue=False, api_visibility="private")
        sweep_button.click(
            service.cancellable(ui.endpoint(_sweep, ui.sweep_parameters(settings), sweep.__doc__, gr.Progress())),
            [controls[name] for name in ui.sweep_parameters(settings)],
            [sweep_plot, sweep_table, sweep_file, tuning_state],
            api_name="sweep",
            concurrency_limit=1,
            concurrency_id="gpu",
        ).success(retune_both, [tuning_state, tuning_threshold], [tuning_plot, tuning_text, threshold], queue=False,
                  api_visibility="private")

        calibrate_inputs = {"target_kind": target_kind, "target": target_value, "budget": budget,
                            "prompts": calibration_prompts, **controls}
        target_kind.input(lambda kind: calibration_ui.DEFAULT_TARGETS.get(kind), target_kind, target_value,
                          queue=False, api_visibility="private")
        calibrate_button.click(lambda: (None, "", None, None), None,
                               [calibration_plot, calibration_summary, profile_file, calibrated_path], queue=False,
                               api_visibility="private")
        calibrate_button.click(
            service.cancellable(ui.endpoint(_calibrate, calibration_ui.CALIBRATE_PARAMETERS, calibrate.__doc__,
                                            gr.Progress(), defaults=calibration_ui.ENDPOINT_DEFAULTS)),
            [calibrate_inputs[name] for name in calibration_ui.CALIBRATE_PARAMETERS],
            [calibration_plot, calibration_summary, profile_file, calibration_json, calibrated_path],
            api_name="calibrate",
            concurrency_limit=1,
            concurrency_id="gpu",
        )
        use_button.click(use_profile, [preset, calibrated_path, saved_profiles], profile_form + [saved_profiles],
                         queue=False, api_visibility="private")

        if EXAMPLES:
            records = [example["record"] for example in EXAMPLES]
            with examples_slot:
                gr.Examples(
                    [[r["prompt"], r["preset"], r["config"]["threshold"], r["seed"]] for r in records],
                    inputs=[controls["prompt"], preset, threshold, controls["seed"]],
                    outputs=example_outputs,
                    fn=load_example,
                    cache_examples=False,
                    run_on_click=True,
                    example_labels=[ui.example_label(r) for r in records],
                    label="Examples (precomputed, load instantly)",
                    elem_id="examples",
                    api_visibility="private",
                )

    demo.queue(max_size=int(os.environ.get("BWCACHE_MAX_QUEUE", "16")))
    return demo


demo = build_demo()


def launch(**overrides):
    """Start the server: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT as Gradio reads them, and PORT (set by hosting
    runtimes) taking precedence over GRADIO_SERVER_PORT."""
    port = os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT")
    name = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("PORT") else None)
    options = {
        "server_name": name,
        "server_port": int(port) if port else None,
        "theme": gr.themes.Soft(),
        "css": CSS,
        "allowed_paths": [str(EXAMPLES_DIR), str(OUTPUT_ROOT)],
        "max_file_size": MAX_FILE_SIZE,
    }
    options.update(overrides)
    ui.remove_partial_runs(OUTPUT_ROOT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    return demo.launch(**options)


def _stop(signum, frame):
    """SIGTERM: runs under way stop at their next step and write nothing, no half-written run folder stays behind;
    then the server stops as on Ctrl-C."""
    service.cancel_all()
    ui.remove_partial_runs(OUTPUT_ROOT)
    raise KeyboardInterrupt


if __name__ == "__main__":
    launch()
