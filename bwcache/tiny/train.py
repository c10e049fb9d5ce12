"""Train the embedded Tiny Shapes model from scratch on procedural clips.

    python -m bwcache.tiny.train                 # reproduces assets/tiny-shapes/ (about an hour on 2 CPU cores)
    python -m bwcache.tiny.train --steps 50 --out /tmp/tiny-pilot

Flow matching as in Wan: x_t = (1 - s) x0 + s noise, the model predicts the velocity noise - x0 at timestep
1000 s, with s drawn from a logit-normal distribution. Prompts are dropped to "" 10% of the time so the empty
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
    ASSETS_DIR,
    CONFIG_NAME,
    DEFAULTS,
    LIMITS,
    SCHEDULER_CONFIG,
    TEXT_ENCODER_CONFIG,
    TEXT_ENCODER_WEIGHTS,
    TRANSFORMER_CONFIG,
    TRANSFORMER_WEIGHTS,
    build_text_encoder,
    build_transformer,
)

RECIPE = {
    "steps": 1800,
    "batch_size": 12,
    "lr": 8e-4,
    "min_lr_ratio": 0.05,
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "betas": [0.9, 0.99],
    "grad_clip": 1.0,
    "ema_decay": 0.998,
    "prompt_dropout": 0.1,
    "sigma_logit_mean": 0.3,
    "sigma_logit_std": 1.0,
    # Most batches use the default size; the rest cover the allowed range so other sizes also work.
    "default_size_fraction": 0.8,
    "seed": 0,
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--seed", type=int, default=RECIPE["seed"])
    p.add_argument("--out", type=Path, default=ASSETS_DIR)
    p.add_argument("--minutes", type=float, default=None, help="stop early (and save) after this much wall time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=200)
    args = p.parse_args(argv)

    recipe = dict(RECIPE, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    torch.set_num_threads(args.threads)
    torch.manual_seed(recipe["seed"])
    rng = np.random.default_rng(recipe["seed"])
    gen = torch.Generator().manual_seed(recipe["seed"])

    transformer = build_transformer().train()
    text_encoder = build_text_encoder().train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    n_params = sum(p.numel() for p in params)
    print(f"parameters: transformer {sum(p.numel() for p in transformer.parameters()):,}, "
          f"text encoder {sum(p.numel() for p in text_encoder.parameters()):,}", flush=True)
    ema_t = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_e = copy.deepcopy(text_encoder).eval().requires_grad_(False)

    # No weight decay on norms, biases, embeddings and the modulation tables.
    decay, no_decay = [], []
    for p_ in params:
        (decay if p_.ndim >= 2 and p_.shape[0] > 8 else no_decay).append(p_)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe["lr"], betas=tuple(recipe["betas"]),
    )

    log: list[dict] = []
    start = time.time()
    window = []
    for step in range(recipe["steps"]):
        size = pick_size(rng, recipe)
        bs = batch_size_for(size, recipe)
        videos, prompts = make_batch(rng, bs, *size)
        prompts = ["" if rng.random() < recipe["prompt_dropout"] else p_ for p_ in prompts]
        x0 = torch.from_numpy(videos).permute(0, 4, 1, 2, 3) * 2 - 1  # (B, 3, F, H, W) in [-1, 1]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(
            recipe["sigma_logit_mean"] + recipe["sigma_logit_std"] * torch.randn(bs, generator=gen)
        )
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = noise - x0

        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        ctx = text_encoder.encode(prompts)
        pred = transformer(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe["grad_clip"])
        opt.step()

        decay_now = min(recipe["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((transformer, ema_t), (text_encoder, ema_e)):
                for a, b in zip(dst.parameters(), src.parameters()):
                    a.lerp_(b, 1 - decay_now)

        window.append(loss.item())
        done = step + 1
        if done % args.log_every == 0 or done == recipe["steps"]:
            elapsed = time.time() - start
            entry = {
                "step": done,
                "loss": float(np.mean(window)),
                "lr": lr_at(step, recipe),
                "grad_norm": float(grad_norm),
                "elapsed_s": round(elapsed, 1),
            }
            log.append(entry)
            window = []
            eta = elapsed / done * (recipe["steps"] - done)
            print(
                f"step {done:5d}/{recipe['steps']}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                f"grad {entry['grad_norm']:.2f}  {elapsed / done:.2f}s/it  elapsed {elapsed / 60:.1f}m  "
                f"eta {eta / 60:.1f}m",
                flush=True,
            )
        out_of_time = args.minutes is not None and time.time() - start > args.minutes * 60
        if done % args.save_every == 0 or done == recipe["steps"] or out_of_time:
            status = "complete" if done == recipe["steps"] else f"partial ({done}/{recipe['steps']} steps)"
            save(args.out, ema_t, ema_e, dict(recipe, steps_done=done, parameters=n_params), log, status)
            print(f"saved EMA weights to {args.out} ({status})", flush=True)
        if out_of_time:
            print("stopping: --minutes reached", flush=True)
            break


if __name__ == "__main__":
    main()
