"""Train the embedded Tiny Shapes model from scratch on procedural clips.

    python -m bwcache.tiny.train                 # trains into runs/tiny-shapes/ (about 40 minutes on 2 CPU cores)
    python -m bwcache.tiny.train --steps 50 --out /tmp/tiny-pilot
    python -m bwcache.tiny.train --out assets/tiny-shapes --overwrite   # replaces the shipped model

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
import time
from pathlib import Path

import numpy as np
import torch

from .data import make_batch
from .pipeline import (
    CONFIG_NAME,
    DEFAULTS,
    LIMITS,
    SCHEDULER_CONFIG,
    TEXT_ENCODER_WEIGHTS,
    TRANSFORMER_CONFIG,
    TRANSFORMER_WEIGHTS,
    build_text_encoder,
    build_transformer,
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


def lr_at(step: int, r: dict) -> float:
    if step < r["warmup_steps"]:
        return r["lr"] * (step + 1) / r["warmup_steps"]
    progress = (step - r["warmup_steps"]) / max(1, r["steps"] - r["warmup_steps"])
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


def save(out: Path, transformer, text_encoder, recipe: dict, log: list[dict], status: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in transformer.state_dict().items()}, str(out / TRANSFORMER_WEIGHTS))
    save_file({k: v.detach().contiguous() for k, v in text_encoder.state_dict().items()}, str(out / TEXT_ENCODER_WEIGHTS))
    config = {
        "name": "tiny-shapes",
        "transformer": TRANSFORMER_CONFIG,
        "text_encoder": text_encoder.config,
        "scheduler": SCHEDULER_CONFIG,
        "defaults": DEFAULTS,
        "limits": LIMITS,
    }
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--out", type=Path, default=Path("runs/tiny-shapes"),
                   help="folder for the weights, config and log (default: runs/tiny-shapes)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--phase", type=int, default=None,
                   help="run only this phase (1-based); phases after the first start from the weights in --init")
    p.add_argument("--init", type=Path, default=None, help="folder with the weights the phase starts from")
    p.add_argument("--steps", type=int, default=None, help="override the step count of every phase run")
    p.add_argument("--minutes", type=float, default=None, help="stop early (and save) after this much wall time")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (and save) after this many steps of the last phase run; its schedule is unchanged")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=200)
    args = p.parse_args(argv)
    if (args.out / TRANSFORMER_WEIGHTS).exists() and not args.overwrite:
        p.error(f"{args.out} already holds a model; pass --overwrite to replace it, or choose another --out.")

    recipe = copy.deepcopy(RECIPE)
    recipe.update(batch_size=args.batch_size, seed=args.seed)
    if args.steps is not None:
        for ph in recipe["phases"]:
            ph["steps"] = args.steps
            ph.pop("stop_after", None)
    phase_ids = list(range(len(recipe["phases"]))) if args.phase is None else [args.phase - 1]
    torch.set_num_threads(args.threads)
    torch.manual_seed(recipe["seed"])

    transformer = build_transformer().train()
    text_encoder = build_text_encoder().train()
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
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    n_params = sum(p_.numel() for p_ in params)
    print(f"parameters: transformer {sum(p_.numel() for p_ in transformer.parameters()):,}, "
          f"text encoder {sum(p_.numel() for p_ in text_encoder.parameters()):,}", flush=True)
    ema_t = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_e = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    # No weight decay on norms, biases, embeddings and the modulation tables.
    decay, no_decay = [], []
    for p_ in params:
        (decay if p_.ndim >= 2 and p_.shape[0] > 8 else no_decay).append(p_)

    time_base = log[-1]["elapsed_s"] if log else 0.0  # wall time of the phases run before, for the log
    start = time.time()
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
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": phase["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=phase["lr"], betas=tuple(phase["betas"]),
        )
        window = []
        done = 0
        for step in range(phase.get("stop_after") or phase["steps"]):
            size = pick_size(rng, phase)
            bs = batch_size_for(size, phase)
            videos, prompts = make_batch(rng, bs, *size)
            prompts = ["" if rng.random() < phase["prompt_dropout"] else p_ for p_ in prompts]
            x0 = torch.from_numpy(videos).permute(0, 4, 1, 2, 3) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
            noise = torch.randn(x0.shape, generator=gen)
            z = torch.randn(bs, generator=gen)
            logit = phase["sigma_logit_mean"] + phase["sigma_logit_std"] * z
            if phase.get("sigma_high_fraction"):
                high = torch.rand(bs, generator=gen) < phase["sigma_high_fraction"]
                logit_high = phase["sigma_high_logit_mean"] + phase["sigma_high_logit_std"] * z
                logit = torch.where(high, logit_high, logit)
            sigma = torch.sigmoid(logit)
            s = sigma.view(-1, 1, 1, 1, 1)
            xt = (1 - s) * x0 + s * noise
            target = noise - x0

            for g in opt.param_groups:
                g["lr"] = lr_at(step, phase)
            ctx = text_encoder.encode(prompts)
            pred = transformer(
                hidden_states=with_positions(xt, transformer),
                timestep=sigma * 1000,
                encoder_hidden_states=ctx,
                return_dict=False,
            )[0]
            weight = 1.0 + phase["object_weight"] * ((x0.amax(dim=1, keepdim=True) + 1) / 2)
            loss = (weight * (pred - target) ** 2).mean() / weight.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, phase["grad_clip"])
            opt.step()

            global_step = step_offset + step
            decay_now = min(phase["ema_decay"], (1 + global_step) / (10 + global_step))
            with torch.no_grad():
                for src, dst in ((transformer, ema_t), (text_encoder, ema_e)):
                    for a, b in zip(dst.parameters(), src.parameters()):
                        a.lerp_(b, 1 - decay_now)

            window.append(loss.item())
            done = step + 1
            phase_end = done == (phase.get("stop_after") or phase["steps"])
            if done % args.log_every == 0 or phase_end:
                elapsed = time.time() - start
                entry = {
                    "phase": index + 1,
                    "step": step_offset + done,
                    "loss": float(np.mean(window)),
                    "lr": lr_at(step, phase),
                    "grad_norm": float(grad_norm),
                    "elapsed_s": round(time_base + elapsed, 1),
                }
                log.append(entry)
                window = []
                rate = elapsed / max(1, done)
                print(
                    f"phase {index + 1} step {done:5d}/{phase['steps']}  loss {entry['loss']:.4f}  "
                    f"lr {entry['lr']:.2e}  grad {entry['grad_norm']:.2f}  {rate:.2f}s/it  "
                    f"elapsed {elapsed / 60:.1f}m  eta {rate * (phase['steps'] - done) / 60:.1f}m",
                    flush=True,
                )
            stopped = (args.minutes is not None and time.time() - start > args.minutes * 60) or (
                last and args.stop_after is not None and done >= args.stop_after
            )
            if done % args.save_every == 0 or phase_end or stopped:
                counts = steps_done + [done]
                complete = not stopped and index == len(recipe["phases"]) - 1 and phase_end
                status = "complete" if complete else f"partial (phase {index + 1}, {done}/{phase['steps']} steps)"
                save(args.out, ema_t, ema_e, dict(recipe, steps_done=counts, parameters=n_params), log, status)
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
