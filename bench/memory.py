"""Memory levers, side by side in one run: peak memory and seconds per step of fine-tuning SmolLM2-135M
on random token rows, plain, with recompute (TrainConfig.recompute: every block keeps only its input and
runs its forward again in backward), with the chunked loss (TrainConfig.chunked_loss: the LM head and the loss
256 positions at a time) and with both; what the forward keeps for backward (the activations) and the logits
with their gradient that the loss holds at once. And LoRA (r=8, every linear layer of the blocks), on the
base as it is and on a base quantized to q4_0 (TrainConfig.quantize), alone and with both levers.

Each configuration runs in a fresh process (peak memory is the process's VmHWM), the configurations take
turns over `--rounds` rounds, and the same steps on the same rows are timed (the first step, which allocates,
is not). Issue 24 sets the shape at 4 x 1024 tokens; a 2-core CPU takes minutes a step there, so the default
is smaller and the shape is printed with the figures.

    python bench/memory.py                           # batch 2 x 512 tokens, 3 steps, 1 round
    python bench/memory.py --batch 4 --length 1024 --steps 2
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = {"plain": {}, "recompute every block": {"recompute": 1}, "recompute every other block": {"recompute": 2},
           "chunked loss (256 positions)": {"chunked_loss": 256},
           "recompute + chunked loss": {"recompute": 1, "chunked_loss": 256},
           "LoRA r=8": {"lora_r": 8},
           "LoRA r=8 on a q4_0 base": {"lora_r": 8, "quantize": "q4_0"},
           "LoRA q4_0 + recompute + chunked": {"lora_r": 8, "quantize": "q4_0", "recompute": 1, "chunked_loss": 256}}


def child(settings, batch, length, steps):
    from minift import TrainConfig, recipe
    from minift.checkpoints import load_checkpoint
    from minift.hub import resolve_model
    from minift.memory import estimate_memory
    from minift.optim import AdamW, param_groups
    from minift.step import train_step
    from minift.train import autocast, pick_device, prepare_model, seed_everything

    cfg = TrainConfig(**{**recipe.INSTRUCT_TRAIN, "precision": "fp32", **settings})
    seed_everything(0)
    model = load_checkpoint(resolve_model("smollm2"), "lm", verbose=False)
    prepare_model(model, cfg)
    device = pick_device(cfg.device)
    model.to(device).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(device)
    rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    estimate = estimate_memory(model, rows)
    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(device, cfg.precision):
            train_step(model, [rows], optimizer, cfg.lr, cfg.max_grad_norm)
        times.append(time.perf_counter() - t0)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))
    print("RESULT " + json.dumps({"seconds_per_step": statistics.median(times[1:]), "peak_mb": peak,
                                  "kept_mb": estimate["activations"] / 2**20, "logits_mb": estimate["logits"] / 2**20}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--only", help="comma-separated configuration names (plain is always run: the ratios are to it)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(json.loads(args.child), args.batch, args.length, args.steps)
        return
    names = ["plain"] + [n for n in CONFIGS if n != "plain" and (not args.only or n in args.only.split(","))]
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # take turns
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(CONFIGS[name]), "--batch",
                                   str(args.batch), "--length", str(args.length), "--steps", str(args.steps)],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(line[len("RESULT "):]))
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; SmolLM2-135M fine-tuning "
          f"(plain: every weight), fp32, batch {args.batch} x {args.length} tokens, {args.steps} timed steps, "
          f"{args.rounds} round(s)")
    base = results["plain"]
    t0, m0 = statistics.median(r["seconds_per_step"] for r in base), max(r["peak_mb"] for r in base)
    print(f"{'configuration':32s} {'s/step':>7s} {'time x':>7s} {'peak MB':>8s} {'peak x':>7s} {'kept MB':>8s} "
          f"{'logits MB':>9s}")
    for name, runs in results.items():
        t, m = statistics.median(r["seconds_per_step"] for r in runs), max(r["peak_mb"] for r in runs)
        print(f"{name:32s} {t:7.2f} {t / t0:7.2f} {m:8d} {m / m0:7.2f} {runs[0]['kept_mb']:8.0f} "
              f"{runs[0]['logits_mb']:9.0f}")


if __name__ == "__main__":
    main()
