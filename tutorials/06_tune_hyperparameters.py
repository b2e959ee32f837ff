# %% [markdown]
# # Stage 6: tune hyperparameters
#
# The recipe of stage 4 (lr 5e-5, batch 32, 2 epochs, ...) is a good default, not a law. The settings
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
#     python tutorials/06_tune_hyperparameters.py --quick   # < 1 min: 3 learning rates, 192 rows
#     python tutorials/06_tune_hyperparameters.py           # ~10 min on 2 cores: lr 2e-5/5e-5/1e-4 x batch 16/32
#
# Writes runs/tutorials/06_tune_hyperparameters/{quick,full}/: results.jsonl, results.csv, sweep.json and
# one trial-NNN/ folder per trial (its best model, log.jsonl and full printout, output.txt).
# A sweep like it from the command line (its trials follow `minift finetune`'s defaults):
#
#     minift sweep --lr 2e-5,5e-5,1e-4 --batch-size 16,32 --epochs 1 --limit 2000

# %%
import argparse
import json
import shutil
import time
from pathlib import Path

from minift.sweep import grid, random_trials, run_sweep
from minift.train import TrainConfig

parser = argparse.ArgumentParser(description="Stage 6: a hyperparameter sweep, chosen on validation")
parser.add_argument("--quick", action="store_true", help="3 trials on 192 rows (under a minute, for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "06_tune_hyperparameters" / ("quick" if args.quick else "full")
shutil.rmtree(out, ignore_errors=True)  # a rerun of the same sweep would go on where it stopped: start afresh
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
# rows (and the first `limit // 4`, at least 50, validation rows), with `base`'s settings and the trial's
# own. Each trial's full printout goes to its `output.txt`; the screen gets one line per trial and the
# table at the end, best first.

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
# lr, smaller batches and so more steps) have an edge that may shrink with the full data and 2 epochs.
# Retrain the winner at full size and check it on validation again before stage 7.
#
# ## What to remember
# - Sweep the lr first; it matters most. Then epochs (or early stopping), then batch size.
# - Record every trial; choose on validation; leave the test set alone until the very end (stage 7).
# - A sweep on a subset is a screening: retrain the winner on all the data, e.g.
#   `minift finetune --lr <best lr> --batch-size <best batch>`.

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
