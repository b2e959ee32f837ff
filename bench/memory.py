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
    python bench/memory.py --tinyllama --batch 1 --length 512 --steps 1   # the 1.1B model, LoRA on q4_0
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
# TinyLlama-1.1B's config.json: the model of issue 24's 1.1B figure, random weights (memory needs no real ones)
TINYLLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
TINYLLAMA_CONFIG = {"lora_r": 8, "quantize": "q4_0", "recompute": 1}


def random_tinyllama():
    """TinyLlama-1.1B's shape with random weights, built without its 4.4 GB of fp32 weights ever existing at once:
    the model is made on the meta device and given uninitialised memory (the OS maps a page in only when it is
    written), the embeddings, norms and head are filled, and each block matrix is filled just before quantize_base
    puts it in blocks and drops it (QuantizedWeight.quantize wrapped here), so one fp32 matrix exists at a time."""
    from minift.checkpoints import build_model
    from minift.quantize import QuantizedWeight

    with torch.device("meta"):
        model = build_model(TINYLLAMA, task="lm")
    model.to_empty(device="cpu")
    for module in model.modules():  # the one buffer: RoPE's frequencies, computed from the config again
        if hasattr(module, "inv_freq"):
            head_dim = 2 * module.inv_freq.shape[0]
            module.inv_freq = 1.0 / module.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                continue  # filled when it is quantized
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0, 0.02)
    real_quantize = QuantizedWeight.quantize.__func__

    def fill_then_quantize(cls, w, kind):
        with torch.no_grad():
            w.normal_(0, 0.02)
        return real_quantize(cls, w, kind)
    QuantizedWeight.quantize = classmethod(fill_then_quantize)
    return model


def child(settings, batch, length, steps):
    from minift import TrainConfig, recipe
    from minift.checkpoints import load_checkpoint
    from minift.hub import resolve_model
    from minift.memory import estimate_memory
    from minift.optim import AdamW, param_groups
    from minift.step import train_step
    from minift.train import autocast, pick_device, prepare_model, seed_everything

    tinyllama = settings.pop("tinyllama", False)
    cfg = TrainConfig(**{**recipe.INSTRUCT_TRAIN, "precision": "fp32", **settings})
    seed_everything(0)
    model = random_tinyllama() if tinyllama else load_checkpoint(resolve_model("smollm2"), "lm", verbose=False)
    prepare_model(model, cfg)
    device = pick_device(cfg.device)
    model.to(device).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(device)
    rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    estimate = {"activations": 0, "logits": 0} if tinyllama else estimate_memory(model, rows)
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
    p.add_argument("--tinyllama", action="store_true", help="only the 1.1B figure: TinyLlama-1.1B's shape, random "
                   "weights, LoRA r=8 on a q4_0 base with recompute, at --batch x --length (issue 24: 1 x 512)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(json.loads(args.child), args.batch, args.length, args.steps)
        return
    if args.tinyllama:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({**TINYLLAMA_CONFIG, "tinyllama": True}),
                               "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps)],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"the TinyLlama-shape run failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[len("RESULT "):])
        print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, capability "
              f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; TinyLlama-1.1B shape (random "
              f"weights), LoRA r=8 on a q4_0 base, recompute every block, fp32, batch {args.batch} x {args.length} "
              f"tokens: {r['seconds_per_step']:.1f} s/step, peak {r['peak_mb']} MB")
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
