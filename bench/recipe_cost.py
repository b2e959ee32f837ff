"""What the main job's recipe costs, old default vs new, projected from timed steps: for a CPU you do not have.

The README's figure for a 2-core AVX2 CPU without bf16 (58.2 min for the old 2-epoch recipe, commit 094166c)
was measured on such a machine. To say what the new recipe takes there without one, this script times both
recipes side by side on this machine, in fp32 and (with the environment below) on AVX2 kernels only, and
projects each full run: setup + steps x seconds per step + validation passes + the test pass. The ratio of
the two projections, times the measured 58.2 min, is the projection for that CPU. It is a projection: the
bench prints it as one, and bench/RESULTS.md says so.

Each recipe runs in a fresh process (the recipes take turns over --rounds), on the real training split:
the first --steps batches of its first epoch (length-grouped and shuffled, so a fair sample), then one
validation pass of all 3,725 rows.

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \\
        python bench/recipe_cost.py --precision fp32           # about 8 minutes on 2 cores
"""
import argparse
import json
import math
import statistics
import subprocess
import sys

import torch

OLD = {"epochs": 2, "lr": 5e-5}  # the default until this search (commit 364b15c): every weight, dropout 0.1
STEPS_PER_EPOCH = 932  # batches of 32 in the tweets' 29,794 training rows


def child(settings, steps, precision):
    from minift import TrainConfig
    from minift.classify import finetune_classifier
    from minift.resume import read_log
    from minift.sweep import learning_curve

    cfg = TrainConfig(**{**settings, "max_steps": steps, "eval_every": steps, "precision": precision})
    report = finetune_classifier(out="runs/bench-recipe-cost", cfg=cfg, test=False)
    point = learning_curve("runs/bench-recipe-cost/log.jsonl")[0]
    _, evals = read_log("runs/bench-recipe-cost/log.jsonl")
    print("RESULT " + json.dumps({"seconds_per_step": point["train_seconds"] / steps,
                                  "eval_seconds": evals[0]["eval_seconds"],
                                  # loading and tokenizing: what the job does besides training and evaluating
                                  # (the report reuses the validation metrics measured when best/ was chosen)
                                  "setup_seconds": report["wall_seconds"] - report["seconds"]}))


def projected(settings, r, report_passes):
    """Seconds of a whole run: setup, every step, one validation pass per epoch, and the report's passes (as
    long as a validation pass each): the test pass, and the best model's validation pass where it is run again
    (the old engine always did; now no run does: the report reuses the evaluation that chose best/)."""
    epochs = settings.get("epochs", 2)
    return (r["setup_seconds"] + math.ceil(epochs * STEPS_PER_EPOCH) * r["seconds_per_step"]
            + (math.ceil(epochs) + report_passes) * r["eval_seconds"])


def main():
    from minift import recipe

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--measured-old-minutes", type=float, default=58.2,
                   help="the old recipe's measured wall time on the CPU to project to (58.2: 2-core AVX2, fp32)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child), args.steps, args.precision)
    recipes = {"old default": OLD, "new default (recipe.MAIN_TRAIN)": recipe.MAIN_TRAIN}
    runs = {name: [] for name in recipes}
    for r in range(args.rounds):
        for name in (list(recipes) if r % 2 == 0 else list(recipes)[::-1]):  # take turns
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(recipes[name]), "--steps",
                                   str(args.steps), "--precision", args.precision], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(line[len("RESULT "):]))
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}, {torch.get_num_threads()} threads, {args.precision}; "
          f"{args.steps} steps + 1 validation pass per run, {args.rounds} rounds (medians)")
    totals = {}
    for name, settings in recipes.items():
        r = {k: statistics.median(x[k] for x in runs[name]) for k in runs[name][0]}
        report_passes = 2 if settings is OLD else 1
        totals[name] = projected(settings, r, report_passes)
        print(f"{name:34s} {json.dumps(settings)}\n    {r['seconds_per_step']:.3f} s/step, validation pass "
              f"{r['eval_seconds']:.1f} s, setup {r['setup_seconds']:.1f} s -> whole run {totals[name] / 60:.1f} min here")
    old, new = totals.values()
    print(f"new / old: {new / old:.3f}; projected on the CPU where the old recipe took {args.measured_old_minutes} "
          f"min: {args.measured_old_minutes * new / old:.1f} min (a projection, not a measurement)")


if __name__ == "__main__":
    main()
