# %% [markdown]
# # Stage 7: test once, then deploy
#
# Validation chose everything so far: the learning rate, the number of epochs, which checkpoint is "best".
# That makes the validation score a little optimistic: we picked the settings that happened to do well on
# *those* rows. The test set has been held out the whole time (stage 3) so that one number can be honest:
# how the model does on tweets it has never influenced. That only holds if we look at it **once**, after
# every decision is made. minift enforces it: `look_at_test_set(folder)` leaves a marker in the split
# folder, and a second look raises an error unless you pass `again=True` (`--again`).
#
# Then we deploy: save the model (config.json + model.safetensors + tokenizer.json), load it back and
# check it gives identical logits, classify new sentences, and load the same folder with Hugging Face
# `transformers`: its `BertModel` under our mean pooling (or, trained with [CLS] pooling, its
# `BertForSequenceClassification` as it is).
#
#     python tutorials/07_test_and_deploy.py           # the real test set, once (needs 04's full run)
#     python tutorials/07_test_and_deploy.py --again   # a deliberate second look
#     python tutorials/07_test_and_deploy.py --quick   # a *copy* of the split folder, 300 test rows (CI)
#
# Writes runs/tutorials/07_test_and_deploy/{full,quick}/: export/ (the deployable model), and for quick
# runs split-copy/ (the copy whose test set is looked at, so CI never spends the real one's look).

# %%
import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

import minift
from minift import TrainConfig
from minift.classify import finetune_classifier, predict
from minift.corpora import load_classification_splits, split_folder
from minift.data import load_splits
from minift.outputs import look_at_test_set
from minift.tasks import encode_classification

parser = argparse.ArgumentParser(description="Stage 7: one look at the test set, then save, reload, predict, export")
parser.add_argument("--quick", action="store_true", help="a copy of the split folder and 300 test rows (for CI)")
parser.add_argument("--again", action="store_true", help="look at the test set again, knowingly")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
runs = Path(args.runs)
t_start = time.perf_counter()

# %% [markdown]
# ## 7.1 The model to test: stage 4's best checkpoint
#
# Stage 4 saved the model with the best validation accuracy in `best/`. We take the full run's if there
# is one, else the quick run's. If stage 4 has not been run at all, we train a quick one here (400 rows,
# 1 epoch: the point is the procedure, not the score) and say so.

# %%
full_best, quick_best = runs / "04_finetune" / "full" / "best", runs / "04_finetune" / "quick" / "best"
checkpoint = next((c for c in (full_best, quick_best) if (c / "model.safetensors").is_file()), None)
if checkpoint is None:
    print(f"no checkpoint from stage 4 in {full_best} or {quick_best}:\n"
          f"training a quick one here (400 rows, 1 epoch), as `04_finetune.py --quick` would")
    here = runs / "07_test_and_deploy" / "trained-here"
    shutil.rmtree(here, ignore_errors=True)
    quick_cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-4, precision="auto")
    finetune_classifier("minilm", out=str(here), cfg=quick_cfg, limit=400, test=False)
    checkpoint = here / "best"
print(f"\ntesting {checkpoint}")
final = checkpoint == full_best
if not final:
    print("(a quick checkpoint: a few hundred rows, one short epoch, so expect a weak model; run\n"
          " `python tutorials/04_finetune.py` for the real one)")

# %% [markdown]
# ## 7.2 One look at the test set
#
# Quick mode (CI, or just trying the tutorial) must not spend the real test set's one look, so it copies
# the split folder to runs/ and looks at the copy's test set; the copy keeps its own marker, so a second
# `--quick` run is refused just the same. The same goes for a full run that has only a quick model to
# test: the real look is kept for the model of stage 4's full run. A refusal is the lesson, not a
# failure: we print it and stop.

# %%
use_copy = args.quick or not final
out = runs / "07_test_and_deploy" / ("quick" if use_copy else "full")
real_split = split_folder()  # data/splits/tweets-seed0, made by stage 3's recipe on first use
splits, label_names = load_classification_splits()  # makes the split folder if it is not there yet
if use_copy:
    split_dir = out / "split-copy"
    if not (split_dir / "split.json").is_file():
        shutil.copytree(real_split, split_dir, ignore=shutil.ignore_patterns("test_looked_at.json"))
    why = "quick mode" if args.quick else "no full model from stage 4"
    print(f"{why}: looking at a copy of the split folder, {split_dir} (the real one stays unlooked-at)")
else:
    split_dir = real_split
try:
    look_at_test_set(split_dir, again=args.again)
except minift.MiniftError as e:
    print(f"\nrefused: {e}")
    print("\nThis is the lesson: the test score was already reported once. Change something now because of it,\n"
          "and it becomes a second validation set. Rerun with --again only if you accept that.")
    sys.exit(0)
print(f"looking at {split_dir / 'test.jsonl'}{' again (--again)' if args.again else ' for the first time'}")

# %% [markdown]
# ## 7.3 The test metrics
#
# `format_metrics` prints accuracy and macro-F1 beside the majority baseline, per-class precision/recall/F1
# and the confusion matrix (rows: the true label, columns: the prediction). Macro-F1 averages the three
# classes equally, so the rarer class (positive, 18%) counts as much as the others.

# %%
tok = minift.load_tokenizer(checkpoint)
model = minift.load(checkpoint, verbose=False).eval()
assert tuple(model.label_names) == tuple(label_names)  # read from config.json's id2label: they travel with it
test_rows = load_splits(split_dir)["test"]
if args.quick:
    test_rows = test_rows[:300]  # a sample: quick mode is about the procedure
test = encode_classification(test_rows, tok, label_names, max_length=64)
metrics = minift.evaluate(model, test, tok.pad_id, label_names=label_names)
print(f"\ntest set{' (first 300 rows of the copy)' if args.quick else ''}:\n{minift.format_metrics(metrics)}")

# %% [markdown]
# ## 7.4 Save, reload, compare
#
# `save_checkpoint` writes config.json (with id2label from `model.label_names`, so the labels travel with the
# model), model.safetensors (the tensors under Hugging Face's names) and `model.tokenizer_file` (the
# tokenizer.json it was loaded with). Loading it back must give the very same model: we compare logits bit
# for bit.

# %%
export = minift.save_checkpoint(model, out / "export")
print(f"\nsaved to {export}: {', '.join(sorted(p.name for p in export.iterdir()))}")
reloaded = minift.load(export, verbose=False).eval()
sentences = ["What a great flight, thank you so much!", "My bag is lost again and nobody answers the phone.",
             "Google is testing self-driving cars in California.", "I can't wait to ride in a driverless car!!"]
batch = tok(sentences, max_length=64)
with torch.no_grad():
    logits = model(batch["input_ids"], batch["attention_mask"])
    logits_reloaded = reloaded(batch["input_ids"], batch["attention_mask"])
print(f"logits before saving and after reloading identical: {torch.equal(logits, logits_reloaded)}")
assert torch.equal(logits, logits_reloaded)

# %% [markdown]
# ## 7.5 Predict on new text
#
# `predict` tokenizes (cutting texts at the max_length the model was trained with, `model.max_length`), runs
# the model in eval mode and returns the most likely label (named by `model.label_names`) with its probability.
# (From the shell: `minift predict <folder> "some text"`.)

# %%
print()
for text, (label, p) in zip(sentences, predict(reloaded, tok, sentences)):
    print(f"{label:>9} {p:.3f}  {text}")

# %% [markdown]
# ## 7.6 Export for Hugging Face transformers
#
# The folder is already in Hugging Face's format (our parameter names are theirs). A model trained with
# [CLS] pooling says `"architectures": ["BertForSequenceClassification"]` in config.json, so
#
#     from transformers import AutoModelForSequenceClassification, AutoTokenizer
#     folder = "runs/tutorials/07_test_and_deploy/full/export"
#     hf_tok = AutoTokenizer.from_pretrained(folder)
#     hf = AutoModelForSequenceClassification.from_pretrained(folder)
#     hf(**hf_tok(["what a day"], return_tensors="pt")).logits
#
# loads it, and from there the rest of that ecosystem (pipelines, the hub, ONNX export) takes over. One
# catch: transformers' BERT classifier always pools the [CLS] token. A model trained with [CLS] pooling
# (`pooling="cls"`) loads there as it is; the main job's mean pooling does not exist in that class, so its
# config.json claims only `"architectures": ["BertModel"]` (with `"pooling": "mean"`): the encoder loads as
# `AutoModel` and the mean and the head are two lines on top (below).
# minift itself never imports transformers; if it is installed (it is a test dependency), we do it for
# real: its tokenizer must give our token ids and its model our logits.

# %%
try:
    import transformers
except ImportError:
    transformers = None
    print("\ntransformers is not installed (pip install transformers): skipping the live check")
if transformers is not None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    hf_batch = hf_tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    if model.config.pooling == "cls":  # transformers' own classifier: the pooler on [CLS], then the head
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
        with torch.no_grad():
            hf_logits = hf(**hf_batch).logits
    else:
        # transformers' BertForSequenceClassification always pools [CLS]; the main job pools the mean of the
        # tokens (all-MiniLM-L6-v2 was trained that way). The encoder is transformers' BertModel as it is;
        # the mean and the head are two lines on top of it (as sentence-transformers does).
        hf = transformers.AutoModel.from_pretrained(export).eval()
        with torch.no_grad():
            hidden = hf(**hf_batch).last_hidden_state
            mask = hf_batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            hf_logits = pooled @ model.classifier.weight.T + model.classifier.bias
    diff = (hf_logits - logits).abs().max().item()
    same_ids = torch.equal(hf_batch["input_ids"], batch["input_ids"])
    print(f"\ntransformers {transformers.__version__}, from_pretrained({export}):"
          f"\n  tokenizer {type(hf_tok).__name__}: same ids as ours: {same_ids}"
          f"\n  model {type(hf).__name__}, labels {hf.config.id2label}"
          f"\n  max |logits(transformers) - logits(minift)| = {diff:.2e}")
    assert same_ids
    assert diff < 1e-4

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
