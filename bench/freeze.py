"""Frozen weights cost nothing: the main job (MiniLM on the tweets) with the full model trained, with the
embeddings frozen, and with the embeddings + the lower half frozen, side by side in one run.

Each configuration runs in a fresh process (peak memory is the process's VmHWM; a fine-tune is a process of
its own), the configurations take turns over `--rounds` rounds, and the same steps on the same data are
timed. Prints step time (median over rounds of the train loop's seconds per step), peak memory, trainable
parameters and the validation accuracy after the same number of steps.

    python bench/freeze.py                      # 150 steps of batch 32 on 4,800 rows, 2 rounds
    python bench/freeze.py --steps 40 --rounds 1 --limit 1280
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys

import torch

CONFIGS = {"full model": [], "embeddings frozen": ["embeddings"], "embeddings + lower half frozen": ["layers:3"]}


def child(freeze, steps, limit, out):
    from minift.finetune import finetune_classifier
    from minift.freeze import count_trainable
    from minift.train import TrainConfig

    cfg = TrainConfig(max_steps=steps, eval_every=steps, freeze=freeze)
    report = finetune_classifier(out=out, cfg=cfg, limit=limit, test=False)
    model = __import__("minift").load(out + "/best", task="classify")
    model.requires_grad_(True)
    from minift.freeze import freeze as do_freeze
    if freeze:
        do_freeze(model, freeze)
    trainable, total = count_trainable(model)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM"))
    print("RESULT " + json.dumps({"seconds_per_step": report["seconds"] / report["steps"], "peak_mb": peak,
                                  "trainable": trainable, "total": total,
                                  "val_accuracy": report["validation"]["accuracy"]}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--limit", type=int, default=4800)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(json.loads(args.child), args.steps, args.limit, f"runs/bench-freeze/{len(json.loads(args.child))}"
              + "-".join(json.loads(args.child)).replace(":", ""))
        return
    results = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        names = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))  # take turns
        for name in names:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(CONFIGS[name]), "--steps",
                                   str(args.steps), "--limit", str(args.limit)], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(line[len("RESULT "):]))
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; {args.steps} steps of "
          f"batch 32 on {args.limit} rows, {args.rounds} round(s), precision auto")
    full = statistics.median(r["seconds_per_step"] for r in results["full model"])
    print(f"{'configuration':34s} {'s/step':>7s} {'vs full':>8s} {'peak MB':>8s} {'trainable':>12s} {'val acc':>8s}")
    for name, runs in results.items():
        t = statistics.median(r["seconds_per_step"] for r in runs)
        print(f"{name:34s} {t:7.3f} {full / t:7.2f}x {max(r['peak_mb'] for r in runs):8d} "
              f"{runs[0]['trainable'] / 1e6:10.2f}M {statistics.median(r['val_accuracy'] for r in runs):8.4f}")


if __name__ == "__main__":
    main()
