"""Write the Tiny Shapes model card (assets/tiny-shapes/README.md) from the saved config, training log and eval."""

from __future__ import annotations

import json
from pathlib import Path

from .data import ACROSS_RANGE, COLOURS, DIRECTIONS, HALF_SIZE_RANGE, SHAPES, START_RANGE, TRAVEL_RANGE
from .pipeline import ASSETS_DIR, CONFIG_NAME


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _loss_table(log: list[dict], rows: int = 16) -> str:
    if not log:
        return "(no log)"
    stride = max(1, len(log) // rows)
    picked = log[::stride]
    if picked[-1] is not log[-1]:
        picked.append(log[-1])
    top = max(e["loss"] for e in picked)
    lines = ["| step | loss | lr | elapsed (min) | |", "|---:|---:|---:|---:|:---|"]
    for e in picked:
        bar = "#" * max(1, round(30 * e["loss"] / top))
        lines.append(f"| {e['step']} | {e['loss']:.4f} | {e['lr']:.1e} | {e['elapsed_s'] / 60:.1f} | `{bar}` |")
    return "\n".join(lines)


def _trained_on(training: dict, recipe: dict) -> str:
    command = str(recipe.get("command") or "")
    return "one GPU" if "--device cuda" in command else "2 CPU cores"


def render_card(path: Path = ASSETS_DIR) -> str:
    config = _read(path / CONFIG_NAME) or {}
    training = _read(path / "training.json") or {}
    ev = _read(path / "eval.json")
    t = config.get("transformer", {})
    te = config.get("text_encoder", {})
    recipe = training.get("recipe", {})
    log = training.get("log", [])
    weights_mb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
    inner = t.get("num_attention_heads", 0) * t.get("attention_head_dim", 0)
    d, lim = config.get("defaults", {}), config.get("limits", {})

    out = [
        "# Tiny Shapes",
        "",
        ("The embedded text-to-video (and image-to-video) model of BWCache. It runs on a CPU in a few seconds, so "
         "the app, the CLI and the" if config.get("image_conditioning") else
         "The embedded text-to-video model of BWCache. It runs on a CPU in a few seconds, so the app, the CLI and the"),
        "tests work offline, and its caching behaviour (block feature distances over steps, quality loss) is that of",
        "a real diffusion transformer: the denoiser is the stock diffusers `WanTransformer3DModel`, the class Wan2.1",
        "uses, with a small config, called by a pipeline that mirrors `WanPipeline`.",
        "",
        "```python",
        "from bwcache.tiny import load_pipeline",
        "pipe = load_pipeline()",
        f'video = pipe("{d.get("prompt", "a red square moving right")}").frames[0]  # (frames, H, W, 3) in [0, 1]',
        *([f'video = pipe("{d.get("prompt", "a red square moving right")}", image=first_frame).frames[0]  '
           "# image-to-video: the clip starts from the image",
           ] if config.get("image_conditioning") else []),
        "```",
        "",
        "## Data",
        "",
        "Procedural clips (`bwcache/tiny/data.py`), generated on the fly from a seed: one "
        f"{' or '.join(SHAPES)} in one of {len(COLOURS)} colours ({', '.join(COLOURS)}) moving "
        f"{', '.join(DIRECTIONS)} on black, with anti-aliased edges. Half-size is "
        f"{HALF_SIZE_RANGE[0]:.2f}-{HALF_SIZE_RANGE[1]:.2f} of the frame. The centre starts "
        f"{START_RANGE[0]:.2f}-{START_RANGE[1]:.2f} of the frame from the edge the object moves away from and "
        f"travels {TRAVEL_RANGE[0]:.2f}-{TRAVEL_RANGE[1]:.2f} of it, so every path crosses the middle; across the "
        f"motion it sits at {ACROSS_RANGE[0]:.2f}-{ACROSS_RANGE[1]:.2f}. Where the object is in each frame thus "
        "depends on the direction, which a denoiser can learn from the prompt while the noise still hides the "
        "object. Prompt: `a {colour} {shape} moving {direction}`; the vocabulary is exactly the words above plus `a`, "
        "`moving`. Matching is case-insensitive and ignores punctuation; other words raise `ValueError`.",
        "",
        *(_scene_text(config) if config.get("data") else []),
        "## Model",
        "",
        f"- Denoiser: `WanTransformer3DModel`, {t.get('num_layers')} blocks, hidden {inner} "
        f"({t.get('num_attention_heads')} heads x {t.get('attention_head_dim')}), FFN {t.get('ffn_dim')}, "
        f"patch {tuple(t.get('patch_size', []))}, in/out channels {t.get('in_channels')}/{t.get('out_channels')}, "
        f"text_dim {t.get('text_dim')}, freq_dim {t.get('freq_dim')}, rope_max_seq_len {t.get('rope_max_seq_len')}."
        + _input_text(config)
        + (" The input adds three fixed position channels (ramps from -1 to 1 along frames, rows and columns), "
           "concatenated to the latents the way Wan's image-to-video model takes its conditioning: RoPE is relative "
           "and the patch embedding has no padding, so without them no patch could tell where in the frame it sits."
           if t.get("in_channels", 3) > t.get("out_channels", 3) else ""),
        "  Pixel space, no VAE: latents are the video in [-1, 1], shape (B, 3, F, H, W); at the default "
        f"{d.get('num_frames')}x{d.get('height')}x{d.get('width')} that is "
        f"{_tokens(d, t)} tokens.",
        f"- Text encoder: word embeddings + positions, {te.get('num_layers')} pre-norm transformer layers "
        f"(dim {te.get('dim')}, {te.get('num_heads')} heads), {te.get('max_length')} tokens, padding zeroed. The "
        "empty prompt maps to a learned null sequence: the unconditional input for classifier-free guidance.",
        f"- Sampler: `FlowMatchEulerDiscreteScheduler`, shift {config.get('scheduler', {}).get('shift')}.",
        f"- Weights: {weights_mb:.1f} MB of float32 safetensors (EMA weights).",
        f"- Defaults: {d.get('num_inference_steps')} steps, guidance {d.get('guidance_scale')}, "
        f"{d.get('num_frames')} frames at {d.get('height')}x{d.get('width')}, {d.get('fps')} fps.",
        f"- Allowed sizes (the trained range): height {_rng(lim.get('height'))}, width {_rng(lim.get('width'))}, "
        f"frames {_rng(lim.get('num_frames'))}.",
        "",
        "## Training",
        "",
        *_stages_text(recipe),
        f"`{_command(training, recipe)}` reproduces these weights from seed {recipe.get('seed')} (bit for bit on "
        "the same device and thread count; floating-point rounding differs elsewhere)"
        + (", starting from the weights of the stages above." if recipe.get("stages") else "."),
        "",
        "Flow matching as in Wan: x_t = (1 - s) x0 + s noise, target velocity noise - x0, timestep 1000 s, with s drawn "
        "logit-normal (per phase below)"
        + (f"; object pixels weigh {1 + recipe['object_weight']:g} in the squared error, the background 1"
           if recipe.get("object_weight") else "")
        + ". AdamW (betas "
        f"{recipe.get('betas')}, weight decay {recipe.get('weight_decay')}), gradient clip {recipe.get('grad_clip')}, "
        f"EMA {recipe.get('ema_decay')}. Batch {recipe.get('batch_size')} clips at the default size "
        f"({recipe.get('default_size_fraction')} of steps); the other steps draw a random allowed size with the batch "
        f"scaled to the same token count. Prompts are dropped to \"\" with probability {recipe.get('prompt_dropout')}.",
        "",
        "| phase | steps | peak lr | warm-up | cosine floor | sigma (logit-normal mean, std) | steps run |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *_phase_rows(recipe),
        "",
        *(["Each phase restarts AdamW and its schedule from the EMA weights of the phase before.", ""]
          if len(_phases(recipe)) > 1 else []),
        f"Status: {training.get('status', 'unknown')}; {(log[-1]['elapsed_s'] / 60 if log else 0):.0f} minutes of "
        f"training on {_trained_on(training, recipe)}; {recipe.get('parameters', 0):,} parameters.",
        "",
        "Loss (mean of each logging window):",
        "",
        _loss_table(log),
        "",
        "## Evaluation",
        "",
    ]
    if ev:
        a, s, g = ev["adherence"], ev["speed"], ev["ground_truth"]
        out += [
            "`python -m bwcache.tiny.evaluate` judges clips from pixels (`bwcache/tiny/judge.py`): the prompt's colour "
            "must be visible (a mask of the pixels near it, coherent pixels only) in most frames, and the centroid of "
            "its mask must travel the named way by at least 10% of the frame and at least twice as far as sideways.",
            "",
            f"- Prompt adherence at the default settings: **{a['passed']}/{a['n']} = {a['rate']:.0%}** "
            f"(colour {a['colour_rate']:.0%}, direction {a['direction_rate']:.0%}); every prompt combination, "
            "random seeds.",
            f"- The judge on ground-truth clips: {g['passed']}/{g['n']}.",
            f"- Time on 2 CPU cores ({s['threads']} threads): default generation with CFG "
            f"{s['default_generation_s']:.2f} s, two generations {s['two_generations_s']:.2f} s, without CFG "
            f"{s['no_cfg_generation_s']:.2f} s; loading {ev['load_s']:.2f} s.",
        ]
        i2v = ev.get("i2v")
        if i2v:
            ff, wo, ia = i2v["first_frame_psnr"], i2v["first_frame_psnr_without_image"], i2v["adherence"]
            out += [
                f"- Image-to-video on {i2v['n']} held-out (image, prompt) pairs (frame 0 of clips of the training "
                f"scene, seeds from {7_000_000:,}): first generated frame against the image {_db(ff['median'])} "
                f"median, {_db(ff['min'])} at worst; the same prompt and seed without the image "
                f"{_db(wo['median'])} median; motion follows the prompt in **{ia['passed']}/{i2v['n']} = "
                f"{ia['rate']:.0%}** (direction {ia['direction_rate']:.0%}).",
            ]
        if a["rate"] < 0.9:
            out += [
                "",
                f"**Below the 90% adherence target** ({a['rate']:.0%}); `eval.json` lists every failed prompt and seed.",
            ]
    else:
        out.append("Not measured yet: run `python -m bwcache.tiny.evaluate`.")
    out += [
        "",
        "## Limits",
        "",
        "It draws one shape moving in a straight line and nothing else; prompts outside its vocabulary are refused.",
        "It exists to exercise caching end to end, not to make pretty videos.",
        "",
    ]
    return "\n".join(out)


def _scene_text(config: dict) -> list[str]:
    """What the v2 scenes add, and how the model takes a first frame."""
    scene = config["data"].get("scene", {})
    from .data import SCENES

    if scene == SCENES["v1"].to_dict():
        text = ("The clips are rendered per batch in torch (`bwcache.tiny.data.render_scenes` with the `v1` scene "
                "options: the clips described above).")
        conditioning = config.get("image_conditioning")
        if conditioning:
            text += (f" It also takes a first frame (`pipe(prompt, image=...)`, image conditioning `{conditioning}`): "
                     "the video starts from the image and its motion follows the prompt. During training the first "
                     "frame is given to " f"{config['data'].get('image_fraction', 0.5):.0%} of the clips.")
        return [text, ""]
    text = (f"This model was trained on `{config['data'].get('scene_name')}` scenes (`bwcache.tiny.data.render_scenes`): "
            f"backdrop {scene.get('background')}, up to {scene.get('distractors')} smaller distractor objects of other "
            f"colours, camera pan in {scene.get('pan', 0):.0%} of clips, a lighting ramp in {scene.get('lighting', 0):.0%}, "
            f"layout {scene.get('layout')}. The prompt names only the moving object; the rest is left to chance.")
    conditioning = config.get("image_conditioning")
    if conditioning:
        text += (f" It also takes a first frame (`pipe(prompt, image=...)`, image conditioning `{conditioning}`): the "
                 "video starts from the image and its motion follows the prompt.")
    return [text, ""]


def _db(v) -> str:
    return "exact (infinite PSNR)" if v is None else f"{v:.1f} dB"


def _input_text(config: dict) -> str:
    conditioning = config.get("image_conditioning")
    if conditioning == "replace":
        return (" A first frame is taken as Wan2.2's TI2V model takes its first latent frame: the sampler writes the "
                "clean image into frame 0 of the latents before every step and at the end, so frame 0 is never "
                "denoised and is the image exactly; a mask channel (1 on frame 0 when an image is given, all zeros "
                "for text-to-video) tells the model which frame is given.")
    if conditioning == "concat":
        return (" A first frame is taken as Wan2.1's image-to-video model takes it: a conditioning video (the image "
                "at frame 0, zeros elsewhere) and a mask channel are concatenated to the latents.")
    return ""


def _stage_command(st: dict) -> str:
    cmd = st.get("command") or "(unknown)"
    done, phases = st.get("steps_done") or [], st.get("phases") or []
    if ("--budget-minutes" not in cmd and done and phases and len(done) == len(phases)
            and done[-1] < phases[-1].get("steps", 0) and "--stop-after" not in cmd):
        cmd += f" --stop-after {done[-1]}"  # stopped early; its schedule still spans the phase's steps
    return f"{cmd} --out {st.get('init')}"


def _stages_text(recipe: dict) -> list[str]:
    """The stages a fine-tuned model started from (`--init-from`), oldest first."""
    stages = recipe.get("stages") or []
    if not stages:
        return []
    lines = ["Trained in stages, each starting from the EMA weights of the one before (`--init-from`):", ""]
    for i, st in enumerate(stages):
        minutes = f"{st['elapsed_s'] / 60:.1f} min" if st.get("elapsed_s") else "time unknown"
        cmd = st.get("command") or ""
        device = "a GPU" if "--device cuda" in cmd else "the CPU"
        budget = (" The run stopped at its time budget, so the steps it reaches depend on the machine and its load."
                  if "--budget-minutes" in cmd else "")
        lines.append(f"{i + 1}. `{_stage_command(st)}`: {sum(st.get('steps_done') or [0])} steps at batch "
                     f"{st.get('batch_size')}, {minutes} on {device}, final loss {st.get('final_loss')}.{budget}")
    lines += [f"{len(stages) + 1}. This model, the command below.", ""]
    return lines


def _phases(recipe: dict) -> list[dict]:
    return recipe.get("phases") or [recipe]


def _phase_rows(recipe: dict) -> list[str]:
    done = recipe.get("steps_done") or []
    done = done if isinstance(done, list) else [done]
    rows = []
    for i, ph in enumerate(_phases(recipe)):
        ran = done[i] if i < len(done) else 0
        rows.append(f"| {i + 1} | {ph.get('steps')} | {ph.get('lr')} | {ph.get('warmup_steps')} | "
                    f"{ph.get('min_lr_ratio')} x lr | {_sigma(ph, recipe)} | {ran} |")
    return rows


def _sigma(ph: dict, recipe: dict) -> str:
    std = ph.get("sigma_logit_std", recipe.get("sigma_logit_std"))
    text = f"({ph.get('sigma_logit_mean')}, {std})"
    if ph.get("sigma_high_fraction"):
        text = (f"{1 - ph['sigma_high_fraction']:.0%} {text} + {ph['sigma_high_fraction']:.0%} "
                f"({ph['sigma_high_logit_mean']}, {ph['sigma_high_logit_std']})")
    return text


def _command(training: dict, recipe: dict) -> str:
    cmd = recipe.get("command") or "python -m bwcache.tiny.train"
    if "--budget-minutes" in cmd or "--stop-after" in cmd:
        return cmd
    done = recipe.get("steps_done") or []
    done = done if isinstance(done, list) else [done]
    phases = _phases(recipe)
    planned = phases[len(done) - 1] if done and len(done) <= len(phases) else {}
    if done and done[-1] < (planned.get("stop_after") or planned.get("steps", 0)):
        # The run was stopped early by its time budget; the schedule still spans the full step count.
        cmd += f" --stop-after {done[-1]}"
    return cmd


def _rng(v) -> str:
    return f"{v[0]}-{v[1]} in steps of {v[2]}" if v else "?"


def _tokens(d: dict, t: dict) -> int:
    try:
        pt, ph, pw = t["patch_size"]
        return d["num_frames"] // pt * (d["height"] // ph) * (d["width"] // pw)
    except (KeyError, TypeError, ValueError):
        return 0


def write_card(path: Path = ASSETS_DIR) -> Path:
    target = Path(path) / "README.md"
    target.write_text(render_card(Path(path)), encoding="utf-8")
    return target


if __name__ == "__main__":
    print(write_card())
