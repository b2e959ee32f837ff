"""One distillation step, side by side in one run: a student of Qwen2.5-0.5B's shape (LoRA r=8 on its fp32 weights, as
the distillation job trains it) and a frozen teacher of the 1.5B's shape (bf16 weights), random weights (memory and
time need no real ones), on rows of prompt + answer tokens: the whole logits at once vs both heads 64 positions at a
time (TrainConfig.chunked_loss; chunks without a target skipped). Per configuration: seconds per optimizer step, peak
memory, and the teacher's cost: the seconds of its forward alone on the same batch, and their share of the step.

Each configuration runs in a fresh process (peak memory is the process's VmHWM, which includes the two models' weights:
about 2.0 GB for the student in fp32 and 3.1 GB for the teacher in bf16), the first step (which allocates) is not
timed, and the configurations take turns over --rounds rounds.

    python bench/distill.py                          # batch 4 x 64 tokens (the last 32 of each row the answer), 2 steps
    python bench/distill.py --batch 8 --length 128 --steps 3 --rounds 2
    python bench/distill.py --teacher-quantize q8_0  # the teacher's block matrices in 8-bit blocks (1.9 GB)
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
import types

import torch

VOCAB_ROWS, TOKENS = 151936, 151665  # Qwen2.5's head rows, and the tokens of its Hugging Face tokenizer
STUDENT = dict(model_type="qwen2", vocab_size=VOCAB_ROWS, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
               num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
               rms_norm_eps=1e-6, tie_word_embeddings=True)
TEACHER = dict(STUDENT, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12)
CONFIGS = {"whole logits": 0, "chunked (64 positions)": 64}


def build(config, dtype):
    """A random model made in `dtype` from the start (no fp32 copy of a bf16 teacher ever exists)."""
    from minift.checkpoints import build_model

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build_model(config, "lm")
    finally:
        torch.set_default_dtype(default)


def child(chunk, batch, length, steps, teacher_quantize):
    from minift import TrainConfig
    from minift.distill import DistillObjective, DistillSettings
    from minift.lora import add_lora, lora_layers
    from minift.optim import AdamW, param_groups
    from minift.quantize import quantize_base
    from minift.step import train_step
    from minift.train import autocast, pick_device, prepare_model, seed_everything

    seed_everything(0)
    cfg = TrainConfig(lora_r=8, chunked_loss=chunk, dropout=0.0, lr=1e-4)
    student = build(STUDENT, torch.float32)
    prepare_model(student, cfg)
    teacher = build(TEACHER, torch.bfloat16)
    if teacher_quantize != "none":  # as distill.load_teacher does
        add_lora(teacher, "all-linear", r=1, alpha=1)
        quantize_base(teacher, teacher_quantize)
        for layer in lora_layers(teacher).values():
            layer.enabled = False
    for p in teacher.parameters():
        p.requires_grad_(False)
    device = pick_device(cfg.device)
    student.to(device).train()
    teacher.to(device).eval()
    tok = types.SimpleNamespace(vocab_size=TOKENS, pad_id=151643, eos_id=151645)  # what the objective reads of one
    objective = DistillObjective(tok, teacher, DistillSettings(teacher="random 1.5B shape", lmbda=0.0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TOKENS, (batch, length), generator=g).to(device)
    labels = ids.clone()
    labels[:, :length // 2] = -100  # the first half of each row is its prompt
    rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    optimizer = AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr)
    times, teacher_times = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        with autocast(device, cfg.precision):
            train_step(student, [rows], optimizer, cfg.lr, cfg.max_grad_norm, objective)
        times.append(time.perf_counter() - t0)
    for _ in range(2):  # the teacher's forward alone, as the step runs it
        t0 = time.perf_counter()
        with torch.no_grad(), autocast(device, cfg.precision):
            teacher.hidden_states(ids, rows["attention_mask"]) if chunk else teacher(ids, rows["attention_mask"])
        teacher_times.append(time.perf_counter() - t0)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))
    from minift.train import resolved_precision
    print("RESULT " + json.dumps({"seconds_per_step": statistics.median(times[1:]), "peak_mb": peak,
                                  "teacher_seconds": min(teacher_times),
                                  "precision": resolved_precision(cfg.precision, device)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--teacher-quantize", default="none", choices=["none", "q8_0", "q4_0", "q4_1"])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.child, args.batch, args.length, args.steps, args.teacher_quantize)
        return
    from minift.report import cpu_name

    results = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name in (list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]):  # take turns
            proc = subprocess.run([sys.executable, __file__, "--child", str(CONFIGS[name]), "--batch", str(args.batch),
                                   "--length", str(args.length), "--steps", str(args.steps), "--teacher-quantize",
                                   args.teacher_quantize], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(line[len("RESULT "):]))
    first = next(iter(results.values()))[0]
    print(f"CPU: {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; one distillation step: "
          f"student Qwen2.5-0.5B shape (LoRA r=8, fp32 weights), teacher 1.5B shape (bf16"
          + (f", its block matrices {args.teacher_quantize}" if args.teacher_quantize != "none" else "")
          + f", frozen), random weights, {first['precision']}, batch {args.batch} x {args.length} tokens (the last "
          f"{args.length - args.length // 2} of each row the answer), {args.steps} timed steps, {args.rounds} round(s)")
    base = results["whole logits"]
    t0, m0 = statistics.median(r["seconds_per_step"] for r in base), max(r["peak_mb"] for r in base)
    print(f"{'configuration':24s} {'s/step':>7s} {'time x':>7s} {'peak MB':>8s} {'peak x':>7s} {'teacher s':>9s} "
          f"{'teacher share':>13s}")
    for name, runs in results.items():
        t, m = statistics.median(r["seconds_per_step"] for r in runs), max(r["peak_mb"] for r in runs)
        teacher = statistics.median(r["teacher_seconds"] for r in runs)
        print(f"{name:24s} {t:7.2f} {t / t0:7.2f} {m:8d} {m / m0:7.2f} {teacher:9.2f} {teacher / t:13.2f}")


if __name__ == "__main__":
    main()
