# %% [markdown]
# # Stage 6: tune hyperparameters
#
# TrainConfig's generic defaults (lr 5e-5, batch 32, 2 epochs, ...) are a good start, not a law. The settings
# that matter most when fine-tuning, roughly in order: the **learning rate** (too low under-fits, too
# high forgets what pretraining taught or diverges), the number of **epochs** (stage 5: too many
# over-fits), the **batch size** (with the lr: how noisy and how many the steps are), then warmup,
# weight decay and dropout.
#
# A sweep tries combinations and keeps score. Three rules make its answer honest:
# 1. **Record every trial**, failures included (`results.jsonl`, one line as each trial ends): the table
#    is the evidence for the choice, and the failures say where the edges are.
# 2. **Choose on the validation set only.** The test set is not touched here: every look at test scores
#    that changes what you do next makes the test set a second validation set, and its score stops being
#    an honest estimate of how the model does on new data. Stage 7 looks at it once, with the settings
#    chosen here.
# 3. **Know the noise.** On 50 validation rows one row is 2 points of accuracy: a difference of a row or
#    two is luck, not a better lr.
#
# Each trial is a whole fine-tune, so sweeps are costly: we run them on a subset of the training rows
# (`limit`) for one epoch, as a screening. The winner is then trained on all the data (stage 4's command
# with `--lr` etc.).
#
#     python tutorials/06_tune_hyperparameters.py --quick   # ~1 min: 3 learning rates on 192 rows, 5 levers on 96
#     python tutorials/06_tune_hyperparameters.py           # ~15 min on 2 cores: lr 2e-5/5e-5/1e-4 x batch 16/32,
#                                                           # then the 5 levers on 2,000 rows
#
# Writes runs/tutorials/06_tune_hyperparameters/{quick,full}/ (and {quick,full}-levers/ for section 6.4):
# results.jsonl, results.csv, sweep.json and one trial-NNN/ folder per trial (its best model, log.jsonl and full
# printout, output.txt).
# A sweep like it from the command line (its trials follow `minift finetune`'s defaults):
#
#     minift sweep --lr 2e-5,5e-5,1e-4 --batch-size 16,32 --epochs 1 --limit 2000

# %%
import argparse
import json
import shutil
import time
from pathlib import Path

from minift import TrainConfig, recipe
from minift.sweep import grid, random_trials, run_sweep

parser = argparse.ArgumentParser(description="Stage 6: a hyperparameter sweep, chosen on validation")
parser.add_argument("--quick", action="store_true", help="3 trials on 192 rows (under a minute, for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "06_tune_hyperparameters" / ("quick" if args.quick else "full")
for folder in (out, out.with_name(out.name + "-levers")):  # a rerun of a sweep goes on where it stopped: start afresh
    shutil.rmtree(folder, ignore_errors=True)
t_start = time.perf_counter()

# %% [markdown]
# ## 6.1 The search space
#
# A search space maps TrainConfig settings to the values to try. `grid` lists every combination (first
# setting changing slowest); `random_trials` draws some of them, which covers more distinct values of each
# setting per trial when there are several settings (Bergstra & Bengio, 2012).

# %%
if args.quick:  # small batches: more steps from few rows, so that the lr has time to matter
    space, limit, base = {"lr": [1e-5, 1e-4, 1e-3]}, 192, TrainConfig(epochs=1, batch_size=8)
else:
    space, limit, base = {"lr": [2e-5, 5e-5, 1e-4], "batch_size": [16, 32]}, 2000, TrainConfig(epochs=1)
# base: what every trial shares; a swept setting overrides it
trials = grid(space)
print(f"grid: {len(trials)} trials: {trials}")
full_grid = {"lr": [2e-5, 5e-5, 1e-4], "batch_size": [16, 32]}
print(f"3 random trials of the full grid's {len(grid(full_grid))}: {random_trials(full_grid, 3, seed=0)}")

# %% [markdown]
# ## 6.2 Run the sweep
#
# `run_sweep` calls `finetune_classifier(..., test=False)` once per trial, on the first `limit` training
# rows (and the first `limit // 4`, at least 16, validation rows: `corpora.limit_rows`), with `base`'s
# settings and the trial's own. Each trial's full printout goes to its `output.txt`; the screen gets one line
# per trial and the table at the end, best first.

# %%
result = run_sweep(space, out=out, limit=limit, base=base)

# %% [markdown]
# ## 6.3 Check the choice against the record
#
# `results.jsonl` is the record: one line per trial, in the order they ran. The chosen trial must be the
# one with the best validation accuracy in it (`base.metric`; ties go to the lower validation loss).

# %%
records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
print(f"\n{'trial':>5}  {'settings':<32} {'val acc':>8} {'val loss':>9} {'seconds':>8}")
for r in records:
    print(f"{r['trial']:>5}  {json.dumps(r['settings']):<32} {r.get('val_accuracy', float('nan')):>8.4f} "
          f"{r.get('val_loss', float('nan')):>9.4f} {r['seconds']:>8.1f}")
finished = [r for r in records if r["status"] == "ok"]
top = max(r["val_accuracy"] for r in finished)
best = result["best"]
print(f"\nchosen: trial {best['trial']} {best['settings']}, validation accuracy {best['val_accuracy']:.4f}; "
      f"its model: {Path(best['folder']) / 'best'}")
assert len(records) == len(trials), "every trial is recorded"
assert best["val_accuracy"] == top, "the chosen trial has the best validation accuracy on record"
assert best["val_loss"] == min(r["val_loss"] for r in finished if r["val_accuracy"] == top)
for r in finished:  # and no trial looked at the test set
    assert "test" not in json.loads((Path(r["folder"]) / "results.json").read_text())

# %% [markdown]
# Read the table with rule 3 in mind: is the gap between the first two trials more than a row or two of
# the validation set? If not, both settings are fine, and the cheaper or the more usual one is a sensible
# pick. A larger validation set (the full sweep uses 500 rows) or a second seed per setting narrows the
# noise.
#
# The budget is part of the question, too: in one epoch on a subset, settings that move faster (a higher
# lr, smaller batches and so more steps) have an edge that may shrink with the full data and more epochs.
# Retrain the winner at full size and check it on validation again before stage 7.
#
# ## 6.4 Time is a setting too
#
# A recipe has a cost as well as an accuracy, and on a CPU the cost is minutes of arithmetic. The levers
# that buy time, each also a fine-tuning lesson:
# - **fewer epochs, a higher peak lr**: a pretrained model needs few passes over the data; a larger step
#   covers the same ground in fewer of them;
# - **frozen embeddings**: the token table is half of MiniLM's 22.7M parameters, and fine-tuning barely
#   needs to move it: no gradient, no AdamW state, no update for it (`freeze=["embeddings"]`);
# - **dropout off**: one pass sees each row once, so there is little to over-fit, and each mask costs time;
# - **frozen lower layers** (`freeze=["layers:2"]`): the backward stops below the lowest trained layer;
# - **a faster head** (`head_lr_scale=10`): the new head learns at 10x the body's lr (tried; see below);
# - **max_length from the data**: stage 3's length report; the tweets need no lever here (p99 is 60 tokens).
#
# A list of trials (not a grid: the levers are tried in a few combinations) goes to the same `run_sweep`,
# with an evaluation every few steps: each trial's record then holds its learning curve (`curve`: step,
# seconds of training before it, validation accuracy), and "how long to reach 0.80?" is read off it.

# %%
from minift.plots import plot_time_vs_accuracy

levers = [{"epochs": 2, "lr": 5e-5}, {"epochs": 1, "lr": 1e-4}, {"epochs": 1, "lr": 1e-4, "freeze": ["embeddings"]},
          {"epochs": 1, "lr": 1e-4, "freeze": ["embeddings"], "dropout": 0.0},
          {"epochs": 1, "lr": 1e-4, "freeze": ["layers:2"], "dropout": 0.0}]
if args.quick:
    lever_base, lever_limit = TrainConfig(batch_size=8, eval_every=4), 96  # 12 steps an epoch
else:
    lever_base, lever_limit = TrainConfig(eval_every=16), 2000  # 63 steps an epoch
lever_run = run_sweep(levers, out=out.with_name(out.name + "-levers"), limit=lever_limit, base=lever_base)


def time_table(records, title):
    """Each trial's minutes of training, its final validation accuracy, and what it cost against the first."""
    first = records[0]["curve"][-1]["train_seconds"]
    print(f"\n{title}\n{'trial':>5}  {'settings':<66} {'train min':>9} {'x time':>7} {'val acc':>8}")
    for r in records:
        spent = r["curve"][-1]["train_seconds"]
        print(f"{r['trial']:>5}  {json.dumps(r['settings']):<66} {spent / 60:>9.2f} {spent / first:>7.2f} "
              f"{r['val_accuracy']:>8.4f}")


time_table(lever_run["trials"], f"levers on {lever_limit} rows (this machine, just now):")
curves = {json.dumps(r["settings"]): r["curve"] for r in lever_run["trials"]}
print(f"time vs accuracy plot: {plot_time_vs_accuracy(curves, out / 'time_vs_accuracy.png')}")
assert all(len(r["curve"]) >= 2 for r in lever_run["trials"]), "each trial recorded its learning curve"
two_epochs, one_epoch = (r["curve"][-1]["train_seconds"] for r in lever_run["trials"][:2])
assert one_epoch < 0.8 * two_epochs, "one epoch costs about half of two"

# %% [markdown]
# On a few hundred rows the accuracies are noise; the times already show the shape. The same levers on the
# whole training split (29,794 rows, an evaluation every quarter epoch) were measured by
# `bench/recipe_search.py`; its records are kept in `bench/recipe_search.jsonl`, and the transformers
# Trainer's run beside the main job (`bench/finetune.py`, 2 epochs of the textbook recipe) in
# `bench/finetune.json`. Together they are why the main job's training settings (`minift/recipe.py`:
# MAIN_TRAIN) are what they are, and the story has a lesson of its own:
# - Round 1 (trials 0-8, one epoch or less) chose by a rule fixed in advance: the least training time within
#   0.005 validation accuracy of the best trial. It chose trial 7, and beside the Trainer that recipe fell
#   short: validation 0.8027 against the Trainer's 0.8075. Every one-epoch trial was below the Trainer.
# - Rule 2 takes the Trainer's validation accuracy as the bar (validation only: the test set still decides
#   nothing), and round 2 trains the fastest configuration for longer: the least training time at or above
#   the bar wins. No trial reached it: the best, 1.5 epochs, was one validation row (of 3,725) short.
# - The honest record of rule 2: the test score of round 1's choice had been seen when rule 2 was written
#   (bench/RESULTS.md says so). A rule changed after a look is weaker evidence than a rule kept.
# - Round 3 (trials 11-16) ran under the same rule 2. It tried one more lever, **the new head at a higher
#   lr** than the body (`head_lr_scale`: the head starts from random numbers, the body from pretrained ones),
#   and a higher peak lr at one epoch. With both (trial 13, lr 1.5e-4 and the head at 10x) one epoch passed
#   the bar; trial 16 then took the head lever out again, to tell the two apart, and passed it too, a little
#   faster: **it is the default**. So the lr bought the accuracy and the faster head bought nothing (at lr
#   1e-4 too: trials 7 and 11 tie). A well-known trick that does not help here is a result as well.
# - Round 4 (trials 17-18) froze a third block, at lr 1.5e-4 and 2e-4: on a CPU without bf16 that saves a
#   seventh of the arithmetic, a saving that time on a bf16 CPU hardly shows, so its rule 3 (written before it
#   ran) counts matmul work instead of minutes. Neither reached the bar (0.8027, 0.8048): the third block's
#   training is worth more than a higher lr buys back. **Trial 16 stays the default.** A lever that fails is
#   still a measurement.
# - Read it with care: nineteen trials looked at the same 3,725 validation rows, and the best of many noisy
#   scores is optimistic. Two trials at lr 1.5e-4 agreeing is some comfort; the test split, looked at once
#   (bench/RESULTS.md), is the judge.
# The time-vs-accuracy plot draws every trial's curve and the Trainer's: the curve that crosses a level
# furthest left is the cheapest recipe for that accuracy.

# %%
bench = Path(__file__).resolve().parent.parent / "bench"
if (bench / "recipe_search.jsonl").is_file():
    full_size = [json.loads(line) for line in (bench / "recipe_search.jsonl").read_text().splitlines()]
    time_table(full_size, "the levers on all 29,794 rows (bench/recipe_search.py; CPU and commit: bench/RESULTS.md):")
    curves = {json.dumps(r["settings"]): r["curve"] for r in full_size}
    trainer_bar = None
    if (bench / "finetune.json").is_file():
        trainer = json.loads((bench / "finetune.json").read_text())["transformers Trainer"]
        curves["transformers Trainer, 2 epochs, lr 5e-5, fp32"] = trainer["curve"]
        trainer_bar = trainer["validation_accuracy"]
        print(f"the Trainer: validation accuracy {trainer_bar:.4f} after "
              f"{trainer['curve'][-1]['train_seconds'] / 60:.1f} min of training")
    print(f"plot: {plot_time_vs_accuracy(curves, out / 'levers_full_size.png', target=trainer_bar)}")
    if trainer_bar is not None:
        good = [r for r in full_size if r["val_accuracy"] >= trainer_bar]
        chosen = (min(good, key=lambda r: r["curve"][-1]["train_seconds"]) if good  # rule 2
                  else max(full_size, key=lambda r: r["val_accuracy"]))  # none reached it: the most accurate
        print(f"chosen ({'rule 2' if good else 'no trial reached the Trainer: the most accurate'}): trial "
              f"{chosen['trial']} {chosen['settings']}, validation accuracy {chosen['val_accuracy']:.4f} in "
              f"{chosen['curve'][-1]['train_seconds'] / 60:.1f} min of training")
        assert vars(TrainConfig(**recipe.MAIN_TRAIN)) == vars(TrainConfig(**chosen["settings"])), \
            "the main job's training settings (recipe.MAIN_TRAIN) are the trial the rule chose"

# %% [markdown]
# ## What to remember
# - Sweep the lr first; it matters most. Then epochs (or early stopping), then batch size.
# - Record every trial; choose on validation; leave the test set alone until the very end (stage 7).
# - Time is a result too: record it with every trial, and prefer the cheapest recipe that is as good
#   within the noise. Most of a fine-tune's cost is passes over the data; a pretrained model needs few.
# - A sweep on a subset is a screening: retrain the winner on all the data, e.g.
#   `minift finetune --lr <best lr> --batch-size <best batch>`.

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
