"""Train the embedded Tiny Shapes model from scratch on procedural clips.

    python -m bwcache.tiny.train                 # trains into runs/tiny-shapes/ (about 40 minutes on 2 CPU cores)
    python -m bwcache.tiny.train --steps 50 --out /tmp/tiny-pilot
    python -m bwcache.tiny.train --out assets/tiny-shapes --overwrite   # replaces the shipped model
    python -m bwcache.tiny.train --recipe v2 --out runs/v2 --device cuda --budget-minutes 4
    python -m bwcache.tiny.train --recipe v2 --layers 8 --scene v2-bg --image-conditioning none ...

Recipes: "v1" (the shipped Tiny Shapes: one object on black, text-to-video) and "v2" (rich scenes, see
`bwcache.tiny.data.SCENES`, and an optional first frame: image-to-video). Every knob of a recipe can be overridden
from the command line (model size, scene, image conditioning, timestep sampling, schedule), so a sweep can vary them.

Flow matching as in Wan: x_t = (1 - s) x0 + s noise, the model predicts the velocity noise - x0 at timestep
1000 s, with s drawn from a logit-normal distribution (a mixture, see RECIPE), and the squared error weighs
the object's pixels more than the background's. Prompts are dropped to "" 10% of the time so the empty
prompt works as the unconditional input for classifier-free guidance.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .data import SCENES, make_batch, render_scenes, scene_options
from .pipeline import (
    CONFIG_NAME,
    DEFAULTS,
    IMAGE_CONDITIONING,
    LIMITS,
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIG,
    TEXT_ENCODER_WEIGHTS,
    TRANSFORMER_CONFIG,
    TRANSFORMER_WEIGHTS,
    build_text_encoder,
    build_transformer,
    in_channels_for,
    model_input,
    with_positions,
)

RECIPE = {
    "batch_size": 12,
    "weight_decay": 0.01,
    "betas": [0.9, 0.99],
    "grad_clip": 1.0,
    "ema_decay": 0.998,
    "prompt_dropout": 0.1,
    "sigma_logit_std": 1.0,
    # Most batches use the default size; the rest cover the allowed range so other sizes also work.
    "default_size_fraction": 0.8,
    "seed": 0,
    # Object pixels weigh 1 + object_weight in the loss: the object covers a small part of the frame, yet where it
    # is in each frame is all that the prompt's direction tells.
    "object_weight": 4.0,
    # Each phase restarts AdamW and its own warm-up + cosine schedule from the EMA weights of the phase before.
    # Half of the timesteps come from a high-noise distribution (sigma mostly 0.88-0.98): there the object is not
    # yet visible in x_t, so only there must the model take its place in each frame, and so the direction of motion,
    # from the prompt; the sampler lays the clip out in its first steps, at that noise level.
    "phases": [
        # The schedule spans 4200 steps; the run stops at 2000, within the time budget, once the prompt's colour
        # and direction are followed.
        {"steps": 4200, "stop_after": 2000, "lr": 8e-4, "warmup_steps": 100, "min_lr_ratio": 0.05,
         "sigma_logit_mean": 0.3, "sigma_high_fraction": 0.5, "sigma_high_logit_mean": 3.0, "sigma_high_logit_std": 1.0},
    ],
}


# The recipe of the second embedded model: rich scenes (v2) and an optional first frame. Model and sampler keys
# are part of the recipe here (v1 keeps them in pipeline.py); the sweep in benchmarks/gpu_train_sweep.py varies them.
# Meant for a GPU (`--device cuda`), where a run is bound by its time budget (`--budget-minutes`).
RECIPE_V2 = {
    **{k: v for k, v in RECIPE.items() if k != "phases"},
    "batch_size": 32,
    "object_weight": 2.0,
    # A small patch embedding at the start leaves the residual stream to the blocks' outputs (CPU pilot: the
    # block inputs' left arm and spread grow; see benchmarks/EMBEDDED_RESEARCH.md).
    "embed_init_scale": 0.05,
    "first_frame_weight": 1.0,
    "scene": "v2",
    "scene_overrides": {},
    "image_conditioning": "concat",
    "image_fraction": 0.5,
    "model": {"num_layers": 8, "num_attention_heads": 3, "attention_head_dim": 48, "ffn_dim": 432},
    "scheduler_shift": 3.0,
    "phases": [
        {"steps": 12000, "lr": 8e-4, "warmup_steps": 200, "min_lr_ratio": 0.05,
         "sigma_logit_mean": 0.3, "sigma_high_fraction": 0.3, "sigma_high_logit_mean": 2.5, "sigma_high_logit_std": 1.0},
    ],
}
RECIPES = {"v1": RECIPE, "v2": RECIPE_V2}


def lr_at(step: int, r: dict, time_progress: float | None = None) -> float:
    """Linear warm-up, then cosine to min_lr_ratio. With `time_progress` (a time budget), the cosine follows the
    larger of the step progress and the share of the budget used, so a run stopped by its budget ends annealed."""
    if step < r["warmup_steps"]:
        return r["lr"] * (step + 1) / r["warmup_steps"]
    progress = (step - r["warmup_steps"]) / max(1, r["steps"] - r["warmup_steps"])
    if time_progress is not None:
        progress = max(progress, time_progress)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return r["lr"] * (r["min_lr_ratio"] + (1 - r["min_lr_ratio"]) * cosine)


def pick_size(rng: np.random.Generator, r: dict) -> tuple[int, int, int]:
    """(num_frames, height, width) for one batch."""
    if rng.random() < r["default_size_fraction"]:
        return DEFAULTS["num_frames"], DEFAULTS["height"], DEFAULTS["width"]

    def choice(lo, hi, mult):
        return int(rng.choice(np.arange(lo, hi + 1, mult)))

    return choice(*LIMITS["num_frames"]), choice(*LIMITS["height"]), choice(*LIMITS["width"])


def batch_size_for(size: tuple[int, int, int], r: dict) -> int:
    # Keep the token count per batch (and so the time per step) about constant across sizes.
    f, h, w = size
    base = DEFAULTS["num_frames"] * DEFAULTS["height"] * DEFAULTS["width"]
    return max(2, int(round(r["batch_size"] * base / (f * h * w))))


def model_configs(recipe: dict) -> tuple[dict, dict, dict]:
    """(transformer, text encoder, scheduler) configs of a recipe: v1's from pipeline.py, v2's with its overrides."""
    transformer = dict(TRANSFORMER_CONFIG)
    scheduler = dict(SCHEDULER_CONFIG)
    if "model" in recipe:
        transformer.update(recipe["model"])
        transformer["in_channels"] = in_channels_for(recipe.get("image_conditioning"), transformer["out_channels"])
    if recipe.get("scheduler_shift") is not None:
        scheduler["shift"] = float(recipe["scheduler_shift"])
    return transformer, dict(TEXT_ENCODER_CONFIG), scheduler


def save(out: Path, transformer, text_encoder, recipe: dict, log: list[dict], status: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cpu = lambda sd: {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}  # noqa: E731
    save_file(cpu(transformer.state_dict()), str(out / TRANSFORMER_WEIGHTS))
    save_file(cpu(text_encoder.state_dict()), str(out / TEXT_ENCODER_WEIGHTS))
    transformer_config, _, scheduler_config = model_configs(recipe)
    config = {
        "name": recipe.get("name", "tiny-shapes"),
        "transformer": transformer_config,
        "text_encoder": text_encoder.config,
        "scheduler": scheduler_config,
        "defaults": DEFAULTS,
        "limits": LIMITS,
    }
    if recipe.get("scene") is not None:
        config["data"] = {"scene_name": recipe["scene"],
                          "scene": scene_options(recipe["scene"], **recipe.get("scene_overrides", {})).to_dict()}
        config["image_conditioning"] = recipe.get("image_conditioning")
        if config["image_conditioning"]:
            config["data"]["image_fraction"] = recipe.get("image_fraction")
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "training.json").write_text(
        json.dumps({"status": status, "recipe": recipe, "log": log}, indent=1) + "\n", encoding="utf-8"
    )
    from .card import write_card

    write_card(out)


def phase_generators(seed: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    # Each phase has its own streams, so a phase run on its own (--phase, --init) matches a full run.
    phase_seed = seed + 1000 * index
    return np.random.default_rng(phase_seed), torch.Generator().manual_seed(phase_seed)


def apply_overrides(recipe: dict, args) -> dict:
    """The recipe with the command line's overrides; recipe-level keys, model keys and every phase's keys."""
    recipe = copy.deepcopy(recipe)
    if args.batch_size is not None:
        recipe["batch_size"] = args.batch_size
    recipe["seed"] = args.seed
    for key in ("object_weight", "prompt_dropout", "ema_decay", "default_size_fraction", "weight_decay",
                "embed_init_scale", "embed_rescale", "first_frame_weight"):
        value = getattr(args, key)
        if value is not None:
            recipe[key] = value
    v2_only = {"scene": args.scene, "image_conditioning": args.image_conditioning,
               "image_fraction": args.image_fraction, "scheduler_shift": args.shift}
    model = {"num_layers": args.layers, "num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
             "ffn_dim": args.ffn}
    scene_over = {"background": args.background, "distractors": args.distractors, "pan": args.pan,
                  "lighting": args.lighting, "layout": args.layout, "texture": args.texture}
    if recipe.get("scene") is None and any(v is not None for v in [*v2_only.values(), *model.values(),
                                                                   *scene_over.values()]):
        raise SystemExit("scene, model, image and shift options need --recipe v2")
    for key, value in v2_only.items():
        if value is not None:
            recipe[key] = None if value == "none" else value
    recipe["model"] = {**recipe.get("model", {}), **{k: v for k, v in model.items() if v is not None}} \
        if "model" in recipe else recipe.get("model")
    if recipe.get("scene") is not None:
        recipe["scene_overrides"] = {**recipe.get("scene_overrides", {}),
                                     **{k: v for k, v in scene_over.items() if v is not None}}
        scene_options(recipe["scene"], **recipe["scene_overrides"])  # validates
        if recipe.get("image_conditioning") not in IMAGE_CONDITIONING:
            raise SystemExit(f"--image-conditioning must be one of none, concat, replace")
    if recipe.get("model") is None:
        recipe.pop("model", None)
    phase_keys = {"lr": args.lr, "warmup_steps": args.warmup, "min_lr_ratio": args.min_lr_ratio,
                  "sigma_logit_mean": args.sigma_mean, "sigma_logit_std": args.sigma_std,
                  "sigma_high_fraction": args.sigma_high_fraction, "sigma_high_logit_mean": args.sigma_high_mean,
                  "sigma_high_logit_std": args.sigma_high_std}
    for ph in recipe["phases"]:
        ph.update({k: v for k, v in phase_keys.items() if v is not None})
        if args.steps is not None:
            ph["steps"] = args.steps
            ph.pop("stop_after", None)
    if args.name:
        recipe["name"] = args.name
    return recipe


def load_partial(transformer, text_encoder, path: Path) -> None:
    """Start from another model's weights where they fit (a pilot's shortcut, not a recipe): tensors of the same
    shape are copied; a patch embedding with more input channels gets the old ones and zeros for the new."""
    from safetensors.torch import load_file

    for module, name in ((transformer, TRANSFORMER_WEIGHTS), (text_encoder, TEXT_ENCODER_WEIGHTS)):
        source = load_file(str(Path(path) / name))
        state = module.state_dict()
        copied = 0
        for key, value in source.items():
            if key not in state:
                continue
            if state[key].shape == value.shape:
                state[key] = value
                copied += 1
            elif key.endswith("patch_embedding.weight") and state[key].shape[1] > value.shape[1]:
                padded = torch.zeros_like(state[key])
                padded[:, : value.shape[1]] = value
                state[key] = padded
                copied += 1
            elif key.endswith("patch_embedding.weight") and (value.shape[1], state[key].shape[1]) == (10, 7):
                # concat (RGB, positions, conditioning video, mask) to replace (RGB, positions, mask): the
                # conditioning video's channels go (frame 0 of the latents is the image itself), the mask stays.
                state[key] = torch.cat([value[:, :6], value[:, 9:]], dim=1)
                copied += 1
        module.load_state_dict(state)
        print(f"init from {path / name}: {copied}/{len(state)} tensors", flush=True)


def init_stages(path: Path) -> list[dict]:
    """The training stages behind the weights in `path` (its own stages, then itself), so that a model fine-tuned
    from another one records the whole recipe: each stage's command, steps, status and time."""
    previous = Path(path) / "training.json"
    if not previous.is_file():
        return [{"init": str(path), "command": None, "note": "weights of unknown origin (no training.json)"}]
    t = json.loads(previous.read_text(encoding="utf-8"))
    r = t.get("recipe", {})
    log = t.get("log", [])
    stage = {"init": str(path), "command": r.get("command"), "steps_done": r.get("steps_done"),
             "status": t.get("status"), "elapsed_s": log[-1]["elapsed_s"] if log else None,
             "batch_size": r.get("batch_size"), "final_loss": round(log[-1]["loss"], 4) if log else None,
             "phases": r.get("phases")}
    return [*r.get("stages", []), stage]


def sample_sigma(phase: dict, bs: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(bs, generator=gen)
    logit = phase["sigma_logit_mean"] + phase["sigma_logit_std"] * z
    if phase.get("sigma_high_fraction"):
        high = torch.rand(bs, generator=gen) < phase["sigma_high_fraction"]
        logit_high = phase["sigma_high_logit_mean"] + phase["sigma_high_logit_std"] * z
        logit = torch.where(high, logit_high, logit)
    return torch.sigmoid(logit)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="v1")
    p.add_argument("--name", default=None, help="the model's name in its config")
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("runs/tiny-shapes"),
                   help="folder for the weights, config and log (default: runs/tiny-shapes)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--phase", type=int, default=None,
                   help="run only this phase (1-based); phases after the first start from the weights in --init")
    p.add_argument("--init", type=Path, default=None, help="folder with the weights the phase starts from")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from another model's weights where shapes fit (pilots: fine-tune instead of training)")
    p.add_argument("--steps", type=int, default=None, help="override the step count of every phase run")
    p.add_argument("--minutes", type=float, default=None, help="stop early (and save) after this much wall time")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="a time budget: the cosine schedule follows the larger of step and time progress, and the "
                        "run stops (saved, annealed) when the budget is spent")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (and save) after this many steps of the last phase run; its schedule is unchanged")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--snapshots", type=Path, default=None,
                   help="also keep every save in its own folder under this one (step-NNNNN), to compare checkpoints")
    g = p.add_argument_group("recipe overrides (v2: model, scene, image, sampler)")
    g.add_argument("--layers", type=int)
    g.add_argument("--heads", type=int)
    g.add_argument("--head-dim", type=int)
    g.add_argument("--ffn", type=int)
    g.add_argument("--scene", choices=sorted(SCENES))
    g.add_argument("--background", choices=["black", "rich"])
    g.add_argument("--distractors", type=int)
    g.add_argument("--pan", type=float)
    g.add_argument("--lighting", type=float)
    g.add_argument("--texture", type=float)
    g.add_argument("--layout", choices=["v1", "wide"])
    g.add_argument("--image-conditioning", choices=["none", "concat", "replace"])
    g.add_argument("--image-fraction", type=float, help="share of training clips given their first frame")
    g.add_argument("--shift", type=float, help="the sampler's shift, stored in the model's config")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup", type=int)
    g.add_argument("--min-lr-ratio", type=float)
    g.add_argument("--sigma-mean", type=float)
    g.add_argument("--sigma-std", type=float)
    g.add_argument("--sigma-high-fraction", type=float)
    g.add_argument("--sigma-high-mean", type=float)
    g.add_argument("--sigma-high-std", type=float)
    g.add_argument("--object-weight", type=float)
    g.add_argument("--prompt-dropout", type=float)
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--default-size-fraction", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--embed-init-scale", type=float, help="scale the patch embedding's initial weights")
    g.add_argument("--embed-rescale", type=float,
                   help="scale the patch embedding of the weights loaded by --init or --init-from (a fine-tune)")
    g.add_argument("--first-frame-weight", type=float,
                   help="concat image conditioning: weight of frame 0's error where the image is given")
    args = p.parse_args(argv)
    if (args.out / TRANSFORMER_WEIGHTS).exists() and not args.overwrite:
        p.error(f"{args.out} already holds a model; pass --overwrite to replace it, or choose another --out.")

    recipe = apply_overrides(RECIPES[args.recipe], args)
    if args.recipe != "v1":
        recipe["recipe"] = args.recipe
        # The options that shape the weights (not where they go), for the model card's reproduce command.
        raw = list(sys.argv[1:] if argv is None else argv)
        skip = {"--out": 1, "--overwrite": 0, "--log-every": 1, "--save-every": 1, "--threads": 1, "--name": 1,
                "--snapshots": 1}
        kept, i = [], 0
        while i < len(raw):
            if raw[i] in skip:
                i += 1 + skip[raw[i]]
                continue
            kept.append(raw[i])
            i += 1
        recipe["command"] = "python -m bwcache.tiny.train " + " ".join(kept)
    phase_ids = list(range(len(recipe["phases"]))) if args.phase is None else [args.phase - 1]
    torch.set_num_threads(args.threads)
    torch.manual_seed(recipe["seed"])
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    v2 = recipe.get("scene") is not None
    scene = scene_options(recipe["scene"], **recipe.get("scene_overrides", {})) if v2 else None
    conditioning = recipe.get("image_conditioning") if v2 else None

    transformer_config, text_config, _ = model_configs(recipe)
    transformer = build_transformer(transformer_config if v2 else None).train()
    text_encoder = build_text_encoder(text_config if v2 else None).train()
    log: list[dict] = []
    if phase_ids[0] > 0:
        if args.init is None:
            p.error("--phase after the first needs --init (the weights of the phase before)")
        from safetensors.torch import load_file

        transformer.load_state_dict(load_file(str(args.init / TRANSFORMER_WEIGHTS)))
        text_encoder.load_state_dict(load_file(str(args.init / TEXT_ENCODER_WEIGHTS)))
        previous = args.init / "training.json"
        if previous.is_file():
            log = json.loads(previous.read_text(encoding="utf-8"))["log"]
            log = [e for e in log if e.get("phase", 1) <= phase_ids[0]]
    if args.init_from is not None:
        load_partial(transformer, text_encoder, args.init_from)
        recipe["init_from"] = str(args.init_from)
        recipe["stages"] = init_stages(args.init_from)
    if recipe.get("embed_init_scale", 1.0) != 1.0 and args.init_from is None and phase_ids[0] == 0:
        # (Only from scratch: weights loaded by --init or --init-from keep their patch embedding.)
        # A small patch embedding leaves the residual stream to the blocks' outputs, as in large DiTs, where the
        # stream grows many times over depth; with a large one every block's input is mostly the embedded x_t.
        with torch.no_grad():
            transformer.patch_embedding.weight.mul_(recipe["embed_init_scale"])
            transformer.patch_embedding.bias.mul_(recipe["embed_init_scale"])
    if recipe.get("embed_rescale", 1.0) != 1.0:
        # Shrink the loaded patch embedding (weight and bias): block 0 sees the same normalised input, but the blocks'
        # outputs become a larger part of the residual stream the later blocks read; the fine-tune adapts to it.
        with torch.no_grad():
            transformer.patch_embedding.weight.mul_(recipe["embed_rescale"])
            transformer.patch_embedding.bias.mul_(recipe["embed_rescale"])
    transformer.to(device)
    text_encoder.to(device)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    n_params = sum(p_.numel() for p_ in params)
    print(f"parameters: transformer {sum(p_.numel() for p_ in transformer.parameters()):,}, "
          f"text encoder {sum(p_.numel() for p_ in text_encoder.parameters()):,}", flush=True)
    ema_t = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_e = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    ema_params = list(ema_t.parameters()) + list(ema_e.parameters())
    # No weight decay on norms, biases, embeddings and the modulation tables.
    decay, no_decay = [], []
    for p_ in params:
        (decay if p_.ndim >= 2 and p_.shape[0] > 8 else no_decay).append(p_)

    time_base = log[-1]["elapsed_s"] if log else 0.0  # wall time of the phases run before, for the log
    start = time.time()
    budget_s = None if args.budget_minutes is None else args.budget_minutes * 60
    steps_done = [ph.get("stop_after") or ph["steps"] for ph in recipe["phases"][: phase_ids[0]]]
    step_offset = sum(steps_done)
    stopped = False
    for index in phase_ids:
        phase = dict(recipe, **recipe["phases"][index])
        last = index == phase_ids[-1]
        if index > phase_ids[0]:
            # The next phase starts from the EMA weights, as it would when run on its own from saved weights.
            transformer.load_state_dict(ema_t.state_dict())
            text_encoder.load_state_dict(ema_e.state_dict())
        rng, gen = phase_generators(recipe["seed"], index)
        # v2: the clip parameters come from `gen_data` (CPU), the noise from `gen_noise` on the training device.
        gen_data = torch.Generator().manual_seed(recipe["seed"] + 1000 * index + 17)
        gen_noise = torch.Generator(device=device).manual_seed(recipe["seed"] + 1000 * index + 29)
        opt_kwargs = {"fused": True} if cuda else {}
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": phase["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=phase["lr"], betas=tuple(phase["betas"]), **opt_kwargs,
        )
        window = []
        done = 0
        for step in range(phase.get("stop_after") or phase["steps"]):
            size = pick_size(rng, phase)
            bs = batch_size_for(size, phase)
            image_present = None
            if not v2:
                videos, prompts = make_batch(rng, bs, *size)
                prompts = ["" if rng.random() < phase["prompt_dropout"] else p_ for p_ in prompts]
                x0 = torch.from_numpy(videos).permute(0, 4, 1, 2, 3) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
                noise = torch.randn(x0.shape, generator=gen)
                sigma = sample_sigma(phase, bs, gen)
                objects = (x0.amax(dim=1, keepdim=True) + 1) / 2
            else:
                batch = render_scenes(gen_data, bs, *size, scene=scene, device=device)
                drop = torch.rand(bs, generator=gen_data) < phase["prompt_dropout"]
                prompts = ["" if d else p_ for d, p_ in zip(drop.tolist(), batch["prompts"])]
                if conditioning is not None:
                    image_present = (torch.rand(bs, generator=gen_data) < phase["image_fraction"]).to(device)
                x0 = batch["video"] * 2 - 1
                objects = batch["object"]
                noise = torch.randn(x0.shape, generator=gen_noise, device=device)
                sigma = sample_sigma(phase, bs, gen_data).to(device)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            target = noise - x0
            weight = 1.0 + phase["object_weight"] * objects
            if image_present is not None and conditioning == "concat" and phase.get("first_frame_weight", 1.0) != 1.0:
                # Frame 0 must reproduce the given image: weigh its error more where the image is given.
                boost = 1 + (phase["first_frame_weight"] - 1) * image_present.to(weight.dtype).view(-1, 1, 1, 1)
                weight = weight.expand(-1, -1, *x0.shape[2:]).clone()
                weight[:, :, 0] = weight[:, :, 0] * boost
            if image_present is not None and conditioning == "replace":
                # Frame 0 is the clean image where given; the sampler overwrites it, so its prediction is not trained.
                keep = image_present.view(-1, 1, 1, 1)
                xt[:, :, 0] = torch.where(keep, x0[:, :, 0], xt[:, :, 0])
                weight = weight.expand(-1, -1, *x0.shape[2:]).clone()
                weight[:, :, 0] = weight[:, :, 0] * (~keep).to(weight.dtype)

            time_progress = None if budget_s is None else (time.time() - start) / budget_s
            for g_ in opt.param_groups:
                g_["lr"] = lr_at(step, phase, time_progress)
            ctx = text_encoder.encode(prompts)
            inputs = (with_positions(xt, transformer) if not v2
                      else model_input(xt, transformer, x0[:, :, 0] if image_present is not None else None,
                                       image_present))
            pred = transformer(
                hidden_states=inputs,
                timestep=sigma * 1000,
                encoder_hidden_states=ctx,
                return_dict=False,
            )[0]
            loss = (weight * (pred - target) ** 2).mean() / weight.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, phase["grad_clip"])
            opt.step()

            global_step = step_offset + step
            decay_now = min(phase["ema_decay"], (1 + global_step) / (10 + global_step))
            with torch.no_grad():
                if cuda:
                    torch._foreach_lerp_(ema_params, params, 1 - decay_now)
                else:
                    for src, dst in ((transformer, ema_t), (text_encoder, ema_e)):
                        for a, b in zip(dst.parameters(), src.parameters()):
                            a.lerp_(b, 1 - decay_now)

            window.append(loss.detach())
            done = step + 1
            phase_end = done == (phase.get("stop_after") or phase["steps"])
            out_of_time = budget_s is not None and time.time() - start > budget_s
            if done % args.log_every == 0 or phase_end or out_of_time:
                elapsed = time.time() - start
                entry = {
                    "phase": index + 1,
                    "step": step_offset + done,
                    "loss": float(torch.stack(window).mean()),
                    "lr": lr_at(step, phase, time_progress),
                    "grad_norm": float(grad_norm),
                    "elapsed_s": round(time_base + elapsed, 1),
                }
                log.append(entry)
                window = []
                rate = elapsed / max(1, done)
                print(
                    f"phase {index + 1} step {done:5d}/{phase['steps']}  loss {entry['loss']:.4f}  "
                    f"lr {entry['lr']:.2e}  grad {entry['grad_norm']:.2f}  {rate:.3f}s/it  "
                    f"elapsed {elapsed / 60:.1f}m  eta {rate * (phase['steps'] - done) / 60:.1f}m",
                    flush=True,
                )
            stopped = (args.minutes is not None and time.time() - start > args.minutes * 60) or out_of_time or (
                last and args.stop_after is not None and done >= args.stop_after
            )
            if done % args.save_every == 0 or phase_end or stopped:
                counts = steps_done + [done]
                complete = (not stopped or out_of_time) and index == len(recipe["phases"]) - 1 and (
                    phase_end or out_of_time)
                status = "complete" if complete else f"partial (phase {index + 1}, {done}/{phase['steps']} steps)"
                if out_of_time:
                    status += f" (time budget {args.budget_minutes} min, {done} steps)"
                save(args.out, ema_t, ema_e, dict(recipe, steps_done=counts, parameters=n_params), log, status)
                if args.snapshots is not None:
                    save(args.snapshots / f"step-{step_offset + done:05d}", ema_t, ema_e,
                         dict(recipe, steps_done=counts, parameters=n_params), log, status)
                print(f"saved EMA weights to {args.out} ({status})", flush=True)
            if stopped:
                print(f"stopping after {done} steps of phase {index + 1}", flush=True)
                break
        steps_done.append(done)
        step_offset += done
        if stopped:
            break


if __name__ == "__main__":
    main()
