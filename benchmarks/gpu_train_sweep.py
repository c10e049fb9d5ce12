"""Train several embedded-model variants at once on one GPU, evaluate each, keep the best.

    python benchmarks/gpu_train_sweep.py --out "$OUT"                 # the sweep below, on CUDA, ~6.5 minutes
    python benchmarks/gpu_train_sweep.py --smoke --device cpu --out /tmp/sweep-smoke   # end to end in minutes, CPU
    python benchmarks/gpu_train_sweep.py --unpack OUT/best1.safetensors runs/best1     # a packed model as a folder

Each variant is `python -m bwcache.tiny.train --recipe v2 ...` with its own options, run as its own process (a
small model at small batches is bound by kernel launches, so processes side by side share the GPU well), under a
time budget: its cosine schedule follows the share of the budget spent, so each run ends annealed, and a run that
is not done by its hard deadline is killed and reported. Each finished model is then measured by
`benchmarks/embedded_dynamics.py` (all variants side by side, again with a hard deadline), and ranked by the targets
it meets. Written to --out: summary.json (every variant: options, training log tail, steps, speed, metrics,
targets) and the best --keep models, each packed into one safetensors file (transformer and text encoder tensors
under "transformer." and "text_encoder.", config.json and training.json in its metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The sweep: K variants trained concurrently. Every entry adds options to `python -m bwcache.tiny.train --recipe v2`
# (RECIPE_V2: scene v2, concat image conditioning given half the time, 8 blocks of hidden 144, shift 3, batch 32).
PLAIN = ["--background", "black", "--distractors", "0", "--pan", "0", "--lighting", "0", "--layout", "v1"]
VARIANTS: list[dict] = [
    # The recipe as it stands: 8 blocks, patch embedding initialised at 0.05x, concat image conditioning.
    {"name": "l8-emb005", "args": []},
    # Control for the small embedding (CPU pilot: it raised the block inputs' left arm and spread).
    {"name": "l8-emb1", "args": ["--embed-init-scale", "1"]},
    # Depth: deeper blocks carry more of the prediction's early change (pilot: left-arm ratio grows with depth).
    {"name": "l12-emb005", "args": ["--layers", "12"]},
    # Image-to-video by overwriting frame 0 each step (Wan2.2 TI2V style) instead of concat channels.
    {"name": "l8-emb005-replace", "args": ["--image-conditioning", "replace"]},
    # Concat image conditioning with frame 0's error weighed 4x where the image is given (first-frame fidelity).
    {"name": "l8-emb005-ff4", "args": ["--first-frame-weight", "4"]},
    # Data ablation: v1-like clips (one object on black, v1 layout), same model and conditioning.
    {"name": "l8-emb005-plain", "args": PLAIN},
    # Stage 4: plain clips with replace conditioning, from scratch, from the stage-3 plain model, and a smaller embedding.
    {"name": "plain-replace", "args": [*PLAIN, "--image-conditioning", "replace"]},
    {"name": "plain-replace-ft", "args": [*PLAIN, "--image-conditioning", "replace",
                                          "--init-from", "runs/init-plain"]},
    {"name": "plain-replace-emb002", "args": [*PLAIN, "--image-conditioning", "replace", "--embed-init-scale", "0.02"]},
]

TRAIN_MINUTES = 3.2  # each variant's time budget (its schedule anneals within it)
TRAIN_GRACE_S = 50  # start-up (imports, CUDA context) and the last save, on top of the budget
EVAL_TIMEOUT_S = 150
SHIFTS = ["1.5", "2", "3"]  # the sampler shifts the evaluation compares; the best is written into the kept config
TOTAL_DEADLINE_S = 6.8 * 60  # everything, from this script's start
PACK_LIMIT_BYTES = 16 * 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def start(cmd: list[str], logfile: Path, env: dict) -> subprocess.Popen:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    f = open(logfile, "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and its children, nothing else
        except ProcessLookupError:
            pass
        proc.wait()


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, str]:
    """Wait until every process ends or the deadline passes; kill the rest. Status per name."""
    status = {}
    while time.time() < deadline and any(p.poll() is None for p in procs.values()):
        time.sleep(1)
    for name, p in procs.items():
        if p.poll() is None:
            kill(p)
            status[name] = "killed at deadline"
        else:
            status[name] = "ok" if p.returncode == 0 else f"exit {p.returncode}"
    return status


def tail(path: Path, n: int = 6) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def score(result: dict | None) -> tuple:
    """Rank: targets met, then the left-arm ratios, block spread and the official trigger's pass rate."""
    if not result:
        return (-1,)
    t = result.get("targets", {})
    c = result.get("curves", {})
    arm = min((c.get(f, {}).get("left_arm_ratio", 0) for f in ("hidden_states", "modulated")), default=0)
    spread = c.get("hidden_states", {}).get("block_spread_mid", 0)
    off = (result.get("official") or {}).get("best") or {}
    quality = [result.get("adherence", {}).get("rate", 0), result.get("i2v", {}).get("adherence", {}).get("rate", 0)]
    return (sum(bool(v) for v in t.values()), round(min(quality), 2), round(min(arm, 3), 2), round(min(spread, 1), 2),
            off.get("pass_rate", 0))


def pack(model_dir: Path, target: Path) -> int:
    """One safetensors file with both models' tensors and the config and training log as metadata."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for prefix, name in (("transformer.", "transformer.safetensors"), ("text_encoder.", "text_encoder.safetensors")):
        tensors.update({prefix + k: v for k, v in load_file(str(model_dir / name)).items()})
    metadata = {"config.json": (model_dir / "config.json").read_text()}
    training = model_dir / "training.json"
    if training.is_file():
        metadata["training.json"] = training.read_text()
    save_file(tensors, str(target), metadata=metadata)
    return target.stat().st_size


def unpack(packed: Path, out: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    with safe_open(str(packed), "pt") as f:
        meta = f.metadata()
        parts = {"transformer.": {}, "text_encoder.": {}}
        for key in f.keys():
            for prefix in parts:
                if key.startswith(prefix):
                    parts[prefix][key[len(prefix):]] = f.get_tensor(key)
    save_file(parts["transformer."], str(out / "transformer.safetensors"))
    save_file(parts["text_encoder."], str(out / "text_encoder.safetensors"))
    for name in ("config.json", "training.json"):
        if name in meta:
            (out / name).write_text(meta[name])
    print(f"unpacked {packed} into {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/sweep")))
    p.add_argument("--work", type=Path, default=None, help="where the variants train (default: /tmp/bwcache-sweep)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--only", nargs="*", default=None, help="names of the variants to run (default: all)")
    p.add_argument("--train-minutes", type=float, default=TRAIN_MINUTES)
    p.add_argument("--eval-timeout", type=float, default=EVAL_TIMEOUT_S)
    p.add_argument("--deadline", type=float, default=TOTAL_DEADLINE_S, help="seconds for everything")
    p.add_argument("--keep", type=int, default=3, help="models copied to --out (the best)")
    p.add_argument("--smoke", action="store_true",
                   help="a quick end-to-end check: tiny models, a few steps, a small evaluation")
    p.add_argument("--unpack", nargs=2, type=Path, metavar=("PACKED", "DIR"), default=None)
    args = p.parse_args(argv)
    if args.unpack:
        unpack(*args.unpack)
        return 0
    t0 = time.time()
    deadline = t0 + args.deadline
    variants = [v for v in VARIANTS if args.only is None or v["name"] in args.only]
    work = args.work or Path("/tmp/bwcache-sweep")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p_ for p_ in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p_)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=path,
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env_info = {"device": args.device, "python": sys.version.split()[0]}
    try:
        import torch

        env_info["torch"] = torch.__version__
        if args.device == "cuda":
            env_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
            if not torch.cuda.is_available():
                raise SystemExit("--device cuda but torch sees no GPU")
        import diffusers

        env_info["diffusers"] = diffusers.__version__
    except ImportError as e:
        raise SystemExit(f"missing package: {e}; install the carried wheels first") from None
    log(f"sweep of {len(variants)} variants on {env_info}")

    # ---------------------------------------------------------------- training, side by side
    train_minutes = 0.15 if args.smoke else args.train_minutes
    procs = {}
    for v in variants:
        cmd = [sys.executable, "-m", "bwcache.tiny.train", "--recipe", "v2", "--device", args.device,
               "--out", str(work / v["name"]), "--overwrite", "--threads", "1", "--budget-minutes", str(train_minutes),
               "--log-every", "5" if args.smoke else "250", "--save-every", "1000000", "--name", v["name"], *v["args"]]
        if args.smoke:
            cmd += ["--layers", "2", "--batch-size", "2", "--steps", "4"]
        procs[v["name"]] = start(cmd, work / f"{v['name']}.train.log", env)
    train_deadline = min(deadline - 30, time.time() + train_minutes * 60 + TRAIN_GRACE_S)
    train_status = wait_all(procs, train_deadline)
    log(f"training done: {train_status}")
    # Something comes back even if the evaluation is cut short by whatever runs this script.
    (args.out / "summary.json").write_text(json.dumps(
        {"env": env_info, "smoke": args.smoke, "train": train_status,
         "train_log_tails": {v["name"]: tail(work / f"{v['name']}.train.log") for v in variants}}, indent=1) + "\n")

    # ---------------------------------------------------------------- evaluation, side by side
    eval_args = (["--steps", "6", "--prompts", "2", "--adherence-n", "4", "--i2v-n", "3", "--i2v-cached", "2",
                  "--i2v-curves", "1", "--real-deltas", "1", "--batch", "4"] if args.smoke else
                 ["--prompts", "8", "--adherence-n", "56", "--i2v-n", "28", "--i2v-cached", "6", "--i2v-curves", "2",
                  "--real-deltas", "1", "--batch", "28"])
    eval_args += ["--shifts", *SHIFTS, "--only", "curves", "official", "adherence", "i2v"]
    procs = {}
    for v in variants:
        model = work / v["name"]
        if not (model / "transformer.safetensors").is_file():
            continue
        cmd = [sys.executable, str(ROOT / "benchmarks" / "embedded_dynamics.py"), "--model", str(model),
               "--device", args.device, "--threads", "1", "--json", str(model / "dynamics.json"), *eval_args]
        procs[v["name"]] = start(cmd, work / f"{v['name']}.eval.log", env)
    eval_deadline = min(deadline - 15, time.time() + args.eval_timeout)
    eval_status = wait_all(procs, eval_deadline)
    log(f"evaluation done: {eval_status}")

    # ---------------------------------------------------------------- summary and the best models
    rows = []
    for v in variants:
        model = work / v["name"]
        row = {"name": v["name"], "args": v["args"], "train": train_status.get(v["name"]),
               "eval": eval_status.get(v["name"], "not run (no model)"),
               "train_log_tail": tail(work / f"{v['name']}.train.log"),
               "eval_log_tail": tail(work / f"{v['name']}.eval.log", 14)}
        training = model / "training.json"
        if training.is_file():
            t = json.loads(training.read_text())
            row["status"] = t["status"]
            row["steps_done"] = t["recipe"].get("steps_done")
            row["parameters"] = t["recipe"].get("parameters")
            row["recipe"] = {k: t["recipe"][k] for k in ("batch_size", "scene", "image_conditioning", "model",
                                                          "scheduler_shift", "phases") if k in t["recipe"]}
            if t["log"]:
                last = t["log"][-1]
                row["final_loss"] = last["loss"]
                row["elapsed_s"] = last["elapsed_s"]
                row["s_per_step"] = round(last["elapsed_s"] / max(1, last["step"]), 4)
                row["loss_curve"] = [(e["step"], round(e["loss"], 4)) for e in t["log"]]
        dyn = model / "dynamics.json"
        row["dynamics"] = json.loads(dyn.read_text()) if dyn.is_file() else None
        row["score"] = score(row["dynamics"])
        rows.append(row)
    rows.sort(key=lambda r: r["score"], reverse=True)
    kept = []
    for row in rows[: args.keep]:
        if row["dynamics"] is None:
            continue
        shift = row["dynamics"].get("shift")
        config_path = work / row["name"] / "config.json"
        config = json.loads(config_path.read_text())
        if shift is not None and config["scheduler"].get("shift") != shift:
            # The evaluation's best sampler shift becomes the model's (training does not depend on it).
            row["trained_config_shift"] = config["scheduler"].get("shift")
            config["scheduler"]["shift"] = shift
            config_path.write_text(json.dumps(config, indent=2) + "\n")
        target = args.out / f"{row['name']}.safetensors"
        size = pack(work / row["name"], target)
        if size > PACK_LIMIT_BYTES:
            target.unlink()
            row["packed"] = f"too large to bring back ({size} bytes)"
            continue
        row["packed"] = target.name
        kept.append(target.name)
    summary = {"env": env_info, "smoke": args.smoke, "train_minutes": train_minutes, "variants": rows,
               "kept": kept, "elapsed_s": round(time.time() - t0, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for row in rows:
        d = row["dynamics"] or {}
        c = d.get("curves", {})
        log(f"{row['name']:<22} score {row['score']}  steps {row.get('steps_done')}  "
            f"loss {row.get('final_loss', float('nan')):.4f}  arms "
            f"{c.get('hidden_states', {}).get('left_arm_ratio')}/{c.get('modulated', {}).get('left_arm_ratio')}  "
            f"spread {c.get('hidden_states', {}).get('block_spread_mid')}  "
            f"adh {d.get('adherence', {}).get('rate')}  i2v {d.get('i2v', {}).get('adherence', {}).get('rate')}  "
            f"ff {d.get('i2v', {}).get('first_frame_psnr', {}).get('median')}")
    log(f"wrote {args.out / 'summary.json'} and {kept} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
