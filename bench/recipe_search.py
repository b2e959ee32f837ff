"""The search for the main job's default recipe: which levers buy time, and what they cost in accuracy.

Each trial is a full fine-tune of the main job (MiniLM, all 29,794 training rows, recipe.py's max_length and
pooling) through the sweep of stage 6 (`run_sweep`, test=False: the test split is never opened), evaluated
on validation every quarter epoch so that each trial also gives a time-to-accuracy curve. The levers:
- fewer epochs, with a higher peak learning rate to cover the same ground in fewer steps;
- frozen embeddings (half of MiniLM's 22.7M parameters; no gradient, no AdamW state, no update);
- dropout off (one epoch sees each row once: little to over-fit, and every mask costs time);
- frozen lower layers (the backward stops below the lowest trainable one);
- the new head at a higher lr than the pretrained body (head_lr_scale; round 3);
- max_length and token budgets are not trials: the tweets' token lengths are p50 33, p95 52, p99 60,
  and the batches are grouped by length, so max_length 64 already cuts 0.2% of the rows and pads little.

    python bench/recipe_search.py                  # about 95 min on 2 cores with bf16 (see RESULTS.md)
    python bench/recipe_search.py --table          # the table of a finished (or interrupted) search
    python bench/recipe_search.py --lora           # LoRA on top of the chosen recipe (about 15 min)

Four rounds, three rules (RULES below): the first chose a recipe that fell short of the Trainer on validation.
Interrupted, it goes on with the trials not done yet (the sweep keeps results.jsonl). The records are kept
in bench/recipe_search.jsonl (tutorial 06 reads them) and the table in bench/RESULTS.md.
"""
import argparse
import json
from pathlib import Path

from minift import TrainConfig
from minift.sweep import run_sweep, seconds_to

KEPT = Path(__file__).with_name("recipe_search.jsonl")  # the records, for tutorial 06
QUARTER_EPOCH = 233  # of the 932 batches of 32 in an epoch of the tweets' training split
TRIALS = [
    {"epochs": 1, "lr": 5e-5},
    {"epochs": 1, "lr": 1e-4},
    {"epochs": 1, "lr": 1e-4, "freeze": ["embeddings"]},
    {"epochs": 1, "lr": 1e-4, "freeze": ["embeddings"], "dropout": 0.0},
    {"epochs": 1, "lr": 2e-4, "freeze": ["embeddings"], "dropout": 0.0},
    {"epochs": 1, "lr": 1e-4, "batch_size": 16, "freeze": ["embeddings"], "dropout": 0.0},
    {"epochs": 0.75, "lr": 1e-4, "freeze": ["embeddings"], "dropout": 0.0},
    {"epochs": 1, "lr": 1e-4, "freeze": ["layers:2"], "dropout": 0.0},
    {"epochs": 0.5, "lr": 1e-4, "freeze": ["embeddings"], "dropout": 0.0},
    # round 2 (see RULES): the fastest configuration for longer, the cheaper first
    {"epochs": 1.5, "lr": 1e-4, "freeze": ["layers:2"], "dropout": 0.0},
    {"epochs": 2, "lr": 1e-4, "freeze": ["layers:2"], "dropout": 0.0},
    # round 3 (see RULES): the new head at a higher lr than the body, at trial 7's cost (or less) and trial 9's;
    {"epochs": 1, "lr": 1e-4, "head_lr_scale": 10, "freeze": ["layers:2"], "dropout": 0.0},
    {"epochs": 1, "lr": 1e-4, "head_lr_scale": 30, "freeze": ["layers:2"], "dropout": 0.0},
    {"epochs": 1, "lr": 1.5e-4, "head_lr_scale": 10, "freeze": ["layers:2"], "dropout": 0.0},
    {"epochs": 1, "lr": 1e-4, "head_lr_scale": 10, "freeze": ["layers:3"], "dropout": 0.0},
    {"epochs": 1.5, "lr": 1e-4, "head_lr_scale": 10, "freeze": ["layers:2"], "dropout": 0.0},
    # added once trial 13 had passed the bar: its lr without the faster head, to tell the two levers apart
    {"epochs": 1, "lr": 1.5e-4, "freeze": ["layers:2"], "dropout": 0.0},
    # round 4 (see RULES): a third block frozen, at trial 16's lr and above
    {"epochs": 1, "lr": 1.5e-4, "freeze": ["layers:3"], "dropout": 0.0},
    {"epochs": 1, "lr": 2e-4, "freeze": ["layers:3"], "dropout": 0.0},
]
# `minift finetune --lora`: which of the main job's settings suit adapters (rank 8, alpha 16, every linear layer
# of the encoder). On top of recipe.MAIN_TRAIN; chosen by validation accuracy alone (adapters are for memory and a
# small file, not for time), and the choice is recipe.LORA_TRAIN. `--lora` runs these.
LORA_TRIALS = [
    {"lora_r": 8},  # the main job's recipe as it is: lr 1.5e-4, adapters only above the frozen blocks 0-1
    {"lora_r": 8, "lr": 5e-4},
    {"lora_r": 8, "lr": 5e-4, "freeze": []},  # adapters in every block
    {"lora_r": 8, "lr": 1e-3, "freeze": []},
]
LORA_KEPT = KEPT.with_name("recipe_search_lora.jsonl")

# The old default (2 epochs, lr 5e-5, embeddings trained, dropout 0.1) is not re-run here: bench/RESULTS.md has
# it (validation accuracy 0.8091 at the end of epoch 2, commit 69209d5).


# RULES. Round 1 (trials 0-8) chose by rule 1, fixed before its results were seen. Its choice (trial 7) then
# ran in bench/finetune.py beside the Trainer and fell short of it on validation (0.8027 vs the Trainer's
# 0.8075) as on test (0.8096 vs 0.8147): every one-epoch trial was below the Trainer's validation accuracy.
# Rule 2 takes that validation accuracy as the bar, and round 2 (trials 9-10) runs the fastest configuration
# longer. No trial reached the bar (the best, trial 9, one validation row short of it), so the most accurate
# trial became the default: every trial's whole job fits in a quarter of the Trainer's time. The test score of
# trial 7 had been seen when rule 2 was written: bench/RESULTS.md says so.
# Round 3 (trials 11-16, session 6) adds one lever, the new head at a higher lr than the pretrained body
# (`head_lr_scale`), mostly at trial 7's cost: a CPU without bf16 needs about that little work to finish in 20
# minutes. Rule 2 stays as it was written before round 3 ran, over all the trials. Trial 13 (lr 1.5e-4, head
# at 10x) passed the bar; trial 16, added after that to tell its two changes apart, passed it too in less
# training time and is the default: the lr did it, the faster head did nothing measurable (7 vs 11, 16 vs 13).
# Round 4 (trials 17-18, session 7; rule 3 written before they ran). Trial 16 is projected at 17.5-19.8 min on
# the CPU without bf16: at the 20-minute bar, not under it. There the step is matmul work (80% of it, profiled
# with AVX2 kernels), so a third frozen block saves about a seventh of it; on this bf16 machine the step time
# barely moves (trial 14 vs 11), so "training time here" cannot see the saving. Rule 3 counts the work instead:
# among the trials at or above the Trainer's validation accuracy, the least matmul work (`block_passes`), then
# the least training time here. Over trials 0-16 it picks trial 16, as rule 2 did.
# Neither trial reached the bar (0.8027, 0.8048): trial 16 stays the default.
TOLERANCE = 0.005  # validation accuracy: about one standard error on 3,725 rows (sqrt(0.8 * 0.2 / 3725) = 0.0066)
# the Trainer's final validation accuracy in bench/finetune.py (2 epochs, fp32; its results kept in finetune.json)
TRAINER_VALIDATION = json.loads(KEPT.with_name("finetune.json").read_text())["transformers Trainer"]["validation_accuracy"]


def train_seconds(record):
    return record["curve"][-1]["train_seconds"]


def rule_1(records):
    """The least training time among the trials within TOLERANCE of the best validation accuracy."""
    ok = [r for r in records if r["status"] == "ok"]
    best = max(r["val_accuracy"] for r in ok)
    return min((r for r in ok if r["val_accuracy"] >= best - TOLERANCE), key=train_seconds)


def rule_2(records):
    """The least training time among the trials at or above the Trainer's validation accuracy (None: none)."""
    good = [r for r in records if r["status"] == "ok" and r["val_accuracy"] >= TRAINER_VALIDATION]
    return min(good, key=train_seconds) if good else None


def block_passes(settings, depth=6):
    """A trial's matmul work in passes through one block: per epoch, the forward through all `depth` blocks and
    the backward (two matmuls, for dx and dW, per forward one) through the trainable ones."""
    freeze = settings.get("freeze", [])
    frozen = next((int(f.split(":")[1]) for f in freeze if f.startswith("layers:")), 0)
    return settings["epochs"] * (depth + 2 * (depth - frozen))


def rule_3(records):
    """The least matmul work, then the least training time, among the trials at or above the Trainer's
    validation accuracy (None: none)."""
    good = [r for r in records if r["status"] == "ok" and r["val_accuracy"] >= TRAINER_VALIDATION]
    return min(good, key=lambda r: (block_passes(r["settings"]), train_seconds(r))) if good else None


def table(records, target):
    lines = [f"| trial | epochs | lr | head lr | batch | frozen | dropout | val acc | val F1 | train min "
             f"| min to {target} | wall min |",
             "|---" * 12 + "|"]
    for r in records:
        s, c = r["settings"], r.get("curve", [])
        reach = seconds_to(c, target)
        lines.append(f"| {r['trial']} | {s['epochs']} | {s['lr']:g} | x{s.get('head_lr_scale', 1):g} | "
                     f"{s.get('batch_size', 32)} | {','.join(s.get('freeze', [])) or '-'} | "
                     f"{s.get('dropout', 'model (0.1)')} | {r.get('val_accuracy', float('nan')):.4f} | "
                     f"{r.get('val_macro_f1', float('nan')):.4f} | {c[-1]['train_seconds'] / 60 if c else float('nan'):.1f} | "
                     f"{'-' if reach is None else f'{reach / 60:.1f}'} | {r['seconds'] / 60:.1f} |")
    curves = ["", "Curves (step: validation accuracy at minutes of training):"]
    for r in records:
        curves.append(f"- trial {r['trial']}: " + ", ".join(f"{p['step']}: {p['accuracy']:.4f} @ {p['train_seconds'] / 60:.1f}"
                                                           for p in r.get("curve", [])))
    return "\n".join(lines + curves)


def keep(out, kept):
    """The sweep's records in `out`, copied to `kept` in bench/ (without the machine-local trial folders)."""
    records = [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
    kept.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "folder"}) + "\n" for r in records))
    return records


def lora_search(out, table_only):
    """LORA_TRIALS on top of the main job's recipe; the most accurate on validation is recipe.LORA_TRAIN."""
    from minift import recipe

    if not table_only:
        run_sweep(LORA_TRIALS, out=out, base=TrainConfig(**{**recipe.MAIN_TRAIN, "eval_every": QUARTER_EPOCH}))
    records = keep(out, LORA_KEPT)
    print("| trial | on top of recipe.MAIN_TRAIN | val acc | val F1 | train min | wall min |\n|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['trial']} | `{json.dumps(r['settings'])}` | {r['val_accuracy']:.4f} | {r['val_macro_f1']:.4f} | "
              f"{train_seconds(r) / 60:.1f} | {r['seconds'] / 60:.1f} |")
    best = max(records, key=lambda r: r["val_accuracy"])
    print(f"chosen (the most accurate on validation): trial {best['trial']} {best['settings']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/recipe-search")
    ap.add_argument("--target", type=float, default=0.80, help="validation accuracy for the time-to-accuracy column")
    ap.add_argument("--table", action="store_true", help="only print the table of what is recorded")
    ap.add_argument("--lora", action="store_true", help="the LoRA trials (LORA_TRIALS) instead, in OUT-lora")
    args = ap.parse_args()
    if args.lora:
        return lora_search(args.out + "-lora", args.table)
    if not args.table:
        run_sweep(TRIALS, out=args.out, base=TrainConfig(eval_every=QUARTER_EPOCH))
    records = keep(args.out, KEPT)
    print(table(records, args.target))
    first = rule_1([r for r in records if r["trial"] <= 8])
    print(f"\nrule 1 on round 1 (the least training time within {TOLERANCE} of the best validation accuracy): "
          f"trial {first['trial']} {first['settings']}, validation accuracy {first['val_accuracy']:.4f}")
    second = rule_2(records)
    print(f"rule 2 (the least training time at or above the Trainer's validation accuracy {TRAINER_VALIDATION:.4f}): "
          + (f"trial {second['trial']} {second['settings']}" if second else "no trial reaches it"))
    third = rule_3(records)
    print(f"rule 3 (the least matmul work, then training time, at or above {TRAINER_VALIDATION:.4f}): "
          + (f"trial {third['trial']} {third['settings']}, {block_passes(third['settings']):g} block passes"
             if third else "no trial reaches it"))
    chosen = third or max(records, key=lambda r: (r.get("val_accuracy", 0), -train_seconds(r)))
    print(f"chosen: trial {chosen['trial']} {chosen['settings']}, validation accuracy {chosen['val_accuracy']:.4f} "
          f"in {train_seconds(chosen) / 60:.1f} min of training" + ("" if third else " (the most accurate trial)"))


if __name__ == "__main__":
    main()
