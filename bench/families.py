"""One training step (forward + backward + AdamW) of the 2026 families at their real sizes, minift's hand-written
backward vs transformers' autograd, side by side in one run: Gemma 3 270M's shape, Qwen3 0.6B's, and a small
Qwen3-MoE (the 30B-A3B's design scaled down), random weights, fp32 and bf16 autocast.

    python bench/families.py                                  # every shape, fp32 and bf16
    python bench/families.py --only qwen3-0.6b --precision fp32 --steps 5 --batch 2 --seq 128
    python bench/families.py --lora 8 --only gemma3-270m      # LoRA r=8 on every linear layer: minift vs peft

A 0.6B model's weights, gradients and AdamW state take about 9.5 GB in fp32, so the two implementations never share
a process: each (shape, precision) runs minift, transformers, minift, transformers (--repeats 2) in fresh processes,
one at a time, each building its model, taking one warm-up step and timing --steps more. Printed: the median step
of each over all its timed steps, their ratio (> 1: minift's step is faster) and each process's peak RSS. The
processes alternate so that a slow spell of a shared machine falls on both; still, the two medians come from
different minutes, so on a loaded machine the ratio is only indicative. transformers runs as a user gets it (its
default attention and, for the experts, its default experts implementation), with no load-balancing loss on either
side (the configs say output_router_logits false, as the released checkpoints do).
Needs transformers (the test extra). Random weights: speed does not depend on their values.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from minift.checkpoints import build_model
from minift.lora import add_lora
from minift.objective import forward_backward
from minift.optim import AdamW, param_groups
from minift.report import cpu_name
from minift.train import autocast

GEMMA3_270M = dict(model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048,
                   num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                   query_pre_attn_scalar=256, sliding_window=512, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                   layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
                   max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True)
QWEN3_06B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1_000_000.0,
                 max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True)
# Qwen3-30B-A3B has 48 layers 2048 wide, 128 experts of width 768, 8 per token; this one keeps the ratios' spirit
# (many narrow experts, several per token, renormalised) at a size this machine can train: about 140M parameters
QWEN3_MOE_SMALL = dict(model_type="qwen3_moe", vocab_size=32768, hidden_size=512, intermediate_size=1536,
                       moe_intermediate_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=64, num_experts=32, num_experts_per_tok=4, norm_topk_prob=True,
                       rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, output_router_logits=False)
# Qwen2.5-Coder-0.5B-Instruct as its offline GGUF has it (the output matrix stored apart from the embedding)
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
SHAPES = {"gemma3-270m": GEMMA3_270M, "qwen3-0.6b": QWEN3_06B, "qwen3-moe-small": QWEN3_MOE_SMALL,
          "qwen2.5-coder-0.5b": QWEN25_05B}


def peak_rss_mb():
    """This process's peak RSS (Linux's VmHWM)."""
    try:
        return int(next(r for r in open("/proc/self/status") if r.startswith("VmHWM:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return float("nan")


def make_batch(config, batch, seq):
    torch.manual_seed(0)
    ids = torch.randint(3, config["vocab_size"], (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def minift_step(config, batch, precision, lora_r=0):
    model = build_model(config, task="lm").train()
    if lora_r:
        add_lora(model, "all-linear", r=lora_r, alpha=2 * lora_r)  # the body frozen: AdamW holds the adapters only
    opt = AdamW(param_groups(model, 0.01), lr=1e-5)
    device = torch.device("cpu")

    def step():
        with autocast(device, precision):
            forward_backward(model, batch, model.count_targets(batch["labels"]))
        opt.step()
        opt.zero_grad()
    return step, "minift"


def transformers_step(config, batch, precision, lora_r=0):
    import transformers
    transformers.logging.set_verbosity_error()
    settings = {k: v for k, v in config.items() if k != "model_type"}
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(config["model_type"], **settings)).train()
    if lora_r:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    how = model.config._attn_implementation
    if getattr(model.config, "num_experts", 0):
        how += f", experts {model.config._experts_implementation}"
    return step, f"transformers ({how})"


def run_here(args):
    """The child process: one implementation, one warm-up step, then --steps timed ones; one JSON line."""
    config = SHAPES[args.only]
    batch = make_batch(config, args.batch, args.seq)
    step, name = (minift_step if args.run == "minift" else transformers_step)(config, batch, args.precision[0], args.lora)
    step()  # warm-up: first-touch allocations, oneDNN's kernel choice
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"name": name, "times": times, "rss_mb": peak_rss_mb()}))


def child(args, which, precision):
    cmd = [sys.executable, __file__, "--only", args.only, "--precision", precision, "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq), "--lora", str(args.lora), "--run", which]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(SHAPES))
    ap.add_argument("--precision", choices=["fp32", "bf16"], action="append")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per implementation, alternating")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on every linear layer of the blocks (0: full)")
    ap.add_argument("--run", choices=["minift", "transformers"], help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if args.run:
        return run_here(args)
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x "
          f"{args.seq} tokens; {f'LoRA r={args.lora} (peft on the transformers side)' if args.lora else 'full'}; "
          f"median of {args.repeats} x {args.steps} steps (each after a warm-up step) per implementation")
    for shape in [args.only] if args.only else list(SHAPES):
        for precision in args.precision or ["fp32", "bf16"]:
            args.only = shape
            runs = {"minift": [], "transformers": []}
            for _ in range(args.repeats):
                for which in runs:
                    runs[which].append(child(args, which, precision))
            medians = {w: statistics.median(t for r in rs for t in r["times"]) for w, rs in runs.items()}
            line = ", ".join(f"{rs[0]['name']} {medians[w]:.2f} s ({max(r['rss_mb'] for r in rs) / 1024:.1f} GB peak)"
                             for w, rs in runs.items())
            print(f"{shape:16s} {precision}: {line} | minift x{medians['transformers'] / medians['minift']:.2f}",
                  flush=True)
    print("(x > 1: minift's step is faster)")


if __name__ == "__main__":
    main()
