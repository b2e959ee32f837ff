"""Frozen weights cost nothing: the main job (MiniLM on the tweets) with the full model trained, with the
embeddings frozen, with the embeddings + the lower half frozen, and with LoRA adapters (r=8, alpha=16, on
every linear layer; the base frozen), side by side in one run.

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

CONFIGS = {"full model": {}, "embeddings frozen": {"freeze": ["embeddings"]},
           "embeddings + lower half frozen": {"freeze": ["layers:3"]},
           # adapters learn from zero (B = 0) and want a larger step than full fine-tuning: lr 5e-4 (10x)
           "LoRA r=8 on every linear layer, lr 5e-4": {"lora_r": 8, "lora_targets": ["all-linear"], "lr": 5e-4}}


def child(settings, steps, limit, out):
    import minift
    from minift import TrainConfig, recipe
    from minift.classify import finetune_classifier
    from minift.freeze import count_trainable
    from minift.train import prepare_model

    cfg = TrainConfig(max_steps=steps, eval_every=steps, **settings)
    report = finetune_classifier(out=out, cfg=cfg, limit=limit, test=False)
    model = minift.load(recipe.MODEL, task="classify", num_labels=3, verbose=False)
    prepare_model(model, cfg)  # what trained, counted: train() decides it with this same call
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
    p.add_argument("--only", action="append", help="run only these configurations (the first is the baseline)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        settings = json.loads(args.child)
        child(settings, args.steps, args.limit, "runs/bench-freeze/" + ("-".join(map(str, settings.values())) or "full")
              .replace(":", "").replace("[", "").replace("]", "").replace("'", "").replace(" ", ""))
        return
    chosen = [n for n in CONFIGS if not args.only or any(o in n for o in args.only)]
    results = {name: [] for name in chosen}
    for r in range(args.rounds):
        names = chosen if r % 2 == 0 else chosen[::-1]  # take turns
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
    full = statistics.median(r["seconds_per_step"] for r in results[chosen[0]])
    print(f"{'configuration':40s} {'s/step':>7s} {'vs first':>8s} {'peak MB':>8s} {'trainable':>12s} {'val acc':>8s}")
    for name, runs in results.items():
        t = statistics.median(r["seconds_per_step"] for r in runs)
        print(f"{name:40s} {t:7.3f} {full / t:7.2f}x {max(r['peak_mb'] for r in runs):8d} "
              f"{runs[0]['trainable'] / 1e6:10.2f}M {statistics.median(r['val_accuracy'] for r in runs):8.4f}")


if __name__ == "__main__":
    main()
