# %% [markdown]
# # Stage 5: evaluate on validation. Over-fitting, under-fitting, or about right?
#
# The training loss says how well the model fits the rows it learns from; it cannot tell learning the task
# from memorising those rows. The **validation set** can: rows the model never trains on (10% of the
# tweets, split off once in stage 3). We evaluate on it every epoch and read the two curves together:
#
# | training loss | validation loss | diagnosis | what to do |
# |---|---|---|---|
# | falls | falls | still learning | train longer |
# | falls | rises after a minimum | **over-fitting**: memorising the rows | stop early, more data, dropout |
# | high, flat | high, flat | **under-fitting**: not learning | a higher lr, more steps |
#
# We make both failures happen on purpose, on MiniLM and the tweets:
# 1. over-fitting: a tiny training set, many epochs, a high constant lr and no dropout, with early
#    stopping (`patience`) ending the run soon after the validation loss turns;
# 2. under-fitting: a learning rate so small that the weights barely move.
#
#     python tutorials/05_evaluate.py --quick    # < 1 min: 48 training rows, 64 validation rows
#     python tutorials/05_evaluate.py            # a few minutes: 208 training rows, 300 validation rows
#
# Writes runs/tutorials/05_evaluate/{quick,full}/: overfit/ and underfit/ (what `train` writes: log.jsonl,
# best/, checkpoint/), the plots (PNG; without matplotlib, CSV files with the same numbers) and report.html, both
# runs on one page (`--open` opens it in your browser).

# %%
import argparse
import math
import shutil
import time
import webbrowser
from dataclasses import replace
from pathlib import Path

import minift
from minift.corpora import load_classification_splits
from minift.plots import plot_confusion, plot_learning_curves
from minift.report import write_report
from minift.resume import read_log
from minift.tasks import encode_classification

parser = argparse.ArgumentParser(description="Stage 5: over-fitting, under-fitting and early stopping")
parser.add_argument("--quick", action="store_true", help="fewer rows and epochs (under a minute, for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
parser.add_argument("--open", action="store_true", help="open the report page in your web browser at the end")
args = parser.parse_args()
out = Path(args.runs) / "05_evaluate" / ("quick" if args.quick else "full")
shutil.rmtree(out, ignore_errors=True)  # every run of the lesson starts afresh
t_start = time.perf_counter()

# %% [markdown]
# ## 5.1 A tiny training set and a validation set
#
# The first rows of the training split, and the first rows of the validation split (a slice of it keeps
# the lesson fast; a real evaluation uses the whole split). Tokenized once, as in stage 3.

# %%
n_train, n_val, max_epochs = (48, 64, 10) if args.quick else (208, 300, 20)
tok = minift.load_tokenizer("minilm")
splits, label_names = load_classification_splits()
train_examples = encode_classification(splits["train"][:n_train], tok, label_names, max_length=64)
val_examples = encode_classification(splits["validation"][:n_val], tok, label_names, max_length=64)
tokenizer_file = minift.resolve_model("minilm") / "tokenizer.json"
print(f"{len(train_examples)} training rows, {len(val_examples)} validation rows, labels {label_names}")


def run(name, cfg):
    """Fine-tune a fresh MiniLM with `cfg`; return what train() returned and what it logged."""
    minift.seed_everything(0)  # the same new classification head every time: the runs differ only by cfg
    model = minift.load("minilm", task="classify", num_labels=len(label_names), verbose=False)
    model.label_names, model.tokenizer_file = list(label_names), tokenizer_file  # saved with its checkpoints
    result = minift.train(model, minift.TrainData(train_examples, val_examples, tok.pad_id), cfg, out / name)
    # log.jsonl has one line per optimizer step (loss, lr, grad_norm) and one per evaluation
    # ({"step", "eval": {loss, accuracy, ...}}); read_log splits them
    steps, evals = read_log(out / name / "log.jsonl")
    return result, steps, evals


# %% [markdown]
# ## 5.2 Over-fitting on purpose, and early stopping
#
# Everything that makes memorising easy: few rows, many epochs, a high lr (1e-4) held constant (no warmup,
# no decay), dropout off. `train` evaluates on the validation rows at the end of every epoch
# (`eval_every=0`) and saves the best model so far in `best/`; `metric="loss"` makes "best" the lowest
# validation loss (accuracy on a few dozen rows moves in coarse jumps, the loss moves smoothly).
#
# `patience=3` is **early stopping**: stop after 3 evaluations in a row without a new best. Training on
# past the minimum only wastes time (and, if we kept the last model, quality); 3 evaluations let us watch
# the validation loss climb before the run ends. `epochs` is only an upper bound now.

# %%
cfg = minift.TrainConfig(epochs=max_epochs, batch_size=16, lr=1e-4, schedule="constant", warmup_ratio=0.0,
                         dropout=0.0, metric="loss", eval_every=0, patience=3, log_every=1)
result, steps, evals = run("overfit", cfg)

per_epoch = math.ceil(len(train_examples) / cfg.batch_size)  # optimizer steps per epoch
print(f"\n{'step':>5} {'train loss':>11} {'val loss':>9} {'val acc':>8}   (train loss: mean over the epoch)")
for e in evals:
    epoch_losses = [s["loss"] for s in steps if e["step"] - per_epoch < s["step"] <= e["step"]]
    print(f"{e['step']:>5} {sum(epoch_losses) / len(epoch_losses):>11.4f} {e['eval']['loss']:>9.4f} "
          f"{e['eval']['accuracy']:>8.4f}")

# %% [markdown]
# The training loss keeps falling towards 0: the model is learning its few rows by heart. The validation
# loss falls for a few epochs (it is learning something general about sentiment too), reaches a minimum,
# then **rises**: from there on, what it learns about these rows does not carry over to new ones. The rise
# comes from confident wrong answers: the model grows sure of itself, and the validation rows disagree.
# Accuracy can hold up a while longer (a prediction changes only when its top class does), one more reason
# to watch the loss.

# %%
val_losses = [e["eval"]["loss"] for e in evals]
best = min(evals, key=lambda e: e["eval"]["loss"])
best_acc = max(evals, key=lambda e: e["eval"]["accuracy"])
first_epoch = sum(s["loss"] for s in steps[:per_epoch]) / per_epoch
last_epoch = sum(s["loss"] for s in steps[-per_epoch:]) / per_epoch
print(f"\nlowest validation loss {best['eval']['loss']:.4f} at step {best['step']}; "
      f"at the end (step {evals[-1]['step']}) {val_losses[-1]:.4f}")
print(f"best validation accuracy {best_acc['eval']['accuracy']:.4f} at step {best_acc['step']}")
print(f"training loss: first epoch {first_epoch:.4f}, last epoch {last_epoch:.4f}")
print(f"early stopping: stopped after {result['steps']} steps of at most {max_epochs * per_epoch} "
      f"(stopped_early={result['stopped_early']}); best/ holds the model from step {result['best_step']}")
assert val_losses[-1] > best["eval"]["loss"], "over-fitting: the final validation loss is above its minimum"
assert last_epoch < first_epoch, "...while the training loss is still falling"
assert result["best_step"] == best["step"], "train() kept the model with the lowest validation loss"
assert result["stopped_early"] and result["steps"] == best["step"] + cfg.patience * per_epoch
print(plot_learning_curves(out / "overfit" / "log.jsonl", out / "overfit_curves.png"))

# %% [markdown]
# The plot shows the same story: the two loss curves part ways at the dotted line, the lowest validation
# loss.
#
# ## 5.3 The best model, not the last one
#
# The last model of the run is in `checkpoint/` (kept to resume training), the best in `best/`. On the
# validation rows the best one is better, which is why `train` keeps it and why stage 7 deploys it.

# %%
last_model = minift.load(out / "overfit" / "checkpoint", verbose=False)
best_model = minift.load(out / "overfit" / "best", verbose=False)
last_metrics = minift.evaluate(last_model, val_examples, tok.pad_id, label_names=label_names)
metrics = minift.evaluate(best_model, val_examples, tok.pad_id, label_names=label_names)
print(f"validation loss: last model {last_metrics['loss']:.4f}, best model {metrics['loss']:.4f}")
print(f"\nthe best model on the {len(val_examples)} validation rows:\n{minift.format_metrics(metrics)}")
print(plot_confusion(metrics, out / "confusion.png"))
assert metrics["loss"] < last_metrics["loss"]

# %% [markdown]
# Read the confusion matrix row by row: each row is a true label, each column what the model said. The
# diagonal is right; the rest shows which mistakes it makes. From a few dozen training rows a model leans
# on the commonest class and may hardly ever predict a rare one; the majority baseline is the bar to
# clear, and macro-F1 (the mean F1 over classes) shows a neglected class where accuracy does not.
# Stage 4's run on all 29,794 rows gets much further.
#
# ## 5.4 Under-fitting
#
# The other failure: lr 1e-6 for one epoch. AdamW moves each weight by about lr per step, so the weights
# barely change: the training loss stays near ln 3 = 1.10 (a uniform guess among 3 classes), and so does
# the validation loss. The fix is the opposite of over-fitting's: a higher lr, more steps.

# %%
underfit, under_steps, under_evals = run("underfit", replace(cfg, lr=1e-6, epochs=1))
under_train = sum(s["loss"] for s in under_steps) / len(under_steps)
under_val = under_evals[-1]["eval"]
print(f"\nunder-fitting: training loss {under_train:.4f}, validation loss {under_val['loss']:.4f}, "
      f"accuracy {under_val['accuracy']:.4f} (majority baseline {under_val['majority_baseline']:.4f})")
print(f"compare: over-fitting run's best validation loss {best['eval']['loss']:.4f}, "
      f"last-epoch training loss {last_epoch:.4f}")
assert under_train > 1.0 and under_val["loss"] > best["eval"]["loss"], "under-fitting: both losses stay high"
print(plot_learning_curves(out / "underfit" / "log.jsonl", out / "underfit_curves.png"))

# %% [markdown]
# ## 5.5 The report page
#
# Every `minift finetune` run ends with the path of its page, OUT/report.html: the curves above, drawn from
# log.jsonl as inline SVG (no plotting library, nothing fetched: it opens offline, and prints), with a line that
# reads them for you, the confusion matrix and the settings. A run stopped early, like the over-fitting one,
# writes the page of what it did; `write_report` (or `minift report OUT OTHER_OUT`) draws several runs on the same
# axes: here the two failures side by side, each run one colour.

# %%
page = write_report(out / "overfit", others=[out / "underfit"], path=out / "report.html")
print(f"both runs on one page: {page}")
text = page.read_text()
assert "<b>Over-fitting</b>" in text and "<b>Under-fitting</b>" in text, "the page reads both runs as this lesson does"
if args.open:
    webbrowser.open(page.resolve().as_uri())

# %% [markdown]
# ## What to remember
# - Evaluate on validation during training and plot both curves; one number at the end hides the story.
# - Over-fitting: training loss down, validation loss up. Keep the best model (train() does), stop early
#   (`patience`), and get more data; dropout, weight decay and a lower lr help too.
# - Under-fitting: both losses high. Raise the lr or train longer.
# - All of this used the **validation** set. Choosing settings by it (stage 6) is its job; the test set
#   stays untouched until stage 7.

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
